//! `chat_rm`: open chat prompts (explain something, write a short note, give tips, compare two
//! things) scored by a reward model.
//!
//! The reward model is a [`RewardScorer`]. Until a learned one is configured (the staged-training
//! issue trains one and plugs it in with [`ChatRm::with_scorer`]), the default is the transparent
//! [`RubricScorer`], which reads the task's [`Rubric`] and checks, each as a named component:
//!
//! - `on_topic`: the share of the prompt's key terms the answer mentions (plural and singular
//!   forms both count);
//! - `length`: the word count inside the target range (decaying outside it);
//! - `format`: the share of the formatting rules the prompt asked for that hold (sentence count,
//!   bullet or numbered items, greeting and sign-off, title, section headings, final line);
//! - `no_refusal`: the answer does not refuse a benign request;
//! - `no_repetition`: no degenerate loops (a word four times running, a line three times, few
//!   distinct word trigrams);
//! - `original`: the answer is not mostly the prompt copied back.
//!
//! The last three are gates: failing any of them scores 0. Otherwise the reward is the mean of
//! the first three, so 1.0 means every rubric item passed; the reason lists which passed and
//! which failed. Level 0 asks for one short sentence about a word given in the prompt (a tiny
//! model learns to copy the word into a short sentence); higher levels ask for explanations in a
//! few sentences, bullet lists of tips, notes with a greeting and a sign-off, titled numbered
//! lists ending with a question, and two-section comparisons with a verdict line.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use rand::Rng;
use rand::seq::IndexedRandom;
use serde::{Deserialize, Serialize};

use crate::chat::Message;
use crate::env::{Category, EnvInfo, Environment, Turns, response_or_zero};
use crate::error::EnvError;
use crate::sampling::{TaskOrigin, TaskRng, draw_in_split, make_task, stable_hash};
use crate::task::{Score, Split, Task};

const NAME: &str = "chat_rm";
const MAX_DIFFICULTY: u32 = 5;

/// A formatting rule a prompt asks for; each one is checked separately.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "rule")]
pub enum FormatRule {
    /// Between `min` and `max` sentences.
    Sentences {
        /// Fewest sentences.
        min: usize,
        /// Most sentences.
        max: usize,
    },
    /// Exactly `count` lines starting with `- ` (or `* `).
    Bullets {
        /// How many.
        count: usize,
    },
    /// Exactly `count` lines numbered `1.` to `count.`, in order.
    Numbered {
        /// How many.
        count: usize,
    },
    /// The first line greets `name` (`Dear …`, `Hi …`, `Hello …`).
    Greeting {
        /// Who is greeted.
        name: String,
    },
    /// One of the last two lines is a sign-off (`Best …`, `Regards`, `Thanks …`, `Cheers`…).
    SignOff,
    /// The first line is a title starting with `# `.
    Title,
    /// A heading line `## NAME` for each name, in this order.
    Sections {
        /// The section names.
        names: Vec<String>,
    },
    /// The last line starts with this prefix.
    FinalLine {
        /// The prefix.
        prefix: String,
    },
    /// The answer ends with a question mark.
    EndsWithQuestion,
}

/// What the rubric scorer checks for one prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rubric {
    /// Words from the prompt the answer should mention (lowercase).
    pub key_terms: Vec<String>,
    /// Fewest words in a good answer.
    pub min_words: usize,
    /// Most words in a good answer.
    pub max_words: usize,
    /// Formatting the prompt asked for.
    pub format: Vec<FormatRule>,
}

/// What a reward model is asked to judge.
#[derive(Debug, Clone, Copy)]
pub struct RewardRequest<'a> {
    /// The conversation the answer responds to.
    pub prompt: &'a [Message],
    /// The answer (the response after any think block, trimmed).
    pub response: &'a str,
    /// The task's rubric; a learned reward model may ignore it.
    pub rubric: &'a Rubric,
}

/// A reward model for open chat: judges one answer to one prompt. Implementations must not panic
/// on any response and should return a finite reward; 1.0 is "as good as it gets".
pub trait RewardScorer: Send + Sync + fmt::Debug {
    /// A short name for logs and reasons (`rubric`, a checkpoint name…).
    fn name(&self) -> &str;
    /// The reward, with named components and a reason.
    fn score(&self, request: &RewardRequest<'_>) -> Score;
}

/// The transparent default reward model: the rubric checks described in the module docs.
#[derive(Debug, Clone, Copy, Default)]
pub struct RubricScorer;

/// Open chat prompts scored by a [`RewardScorer`] (the [`RubricScorer`] by default).
#[derive(Debug, Clone)]
pub struct ChatRm {
    scorer: Arc<dyn RewardScorer>,
}

impl Default for ChatRm {
    fn default() -> Self {
        Self::with_scorer(Arc::new(RubricScorer))
    }
}

impl ChatRm {
    /// `chat_rm` judged by `scorer` instead of the rubric.
    pub fn with_scorer(scorer: Arc<dyn RewardScorer>) -> Self {
        Self { scorer }
    }

    /// The reward model in use.
    pub fn scorer(&self) -> &dyn RewardScorer {
        self.scorer.as_ref()
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Verification {
    /// What the prompt is about (used to build the reference answer).
    subject: String,
    /// Which template family made the prompt.
    kind: Kind,
    rubric: Rubric,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Kind {
    OneSentence,
    Explain,
    Tips,
    Note,
    Steps,
    Compare,
}

const NOUNS: [&str; 40] = [
    "cats",
    "rain",
    "music",
    "bread",
    "trees",
    "the sea",
    "winter",
    "bicycles",
    "coffee",
    "books",
    "dogs",
    "mountains",
    "gardens",
    "trains",
    "the moon",
    "apples",
    "rivers",
    "snow",
    "birds",
    "friends",
    "summer",
    "soup",
    "clocks",
    "bridges",
    "owls",
    "candles",
    "maps",
    "kites",
    "tea",
    "chess",
    "bees",
    "boats",
    "islands",
    "lamps",
    "stars",
    "cookies",
    "forests",
    "letters",
    "puzzles",
    "violins",
];
const ONE_SENTENCE_TEMPLATES: [&str; 4] = [
    "Write one short sentence about {}.",
    "Describe {} in one sentence.",
    "Say something kind about {} in one sentence.",
    "Tell me one fact about {} in a sentence.",
];
const EXPLAIN_TOPICS: [&str; 24] = [
    "why the sky is blue",
    "how rainbows form",
    "why leaves change color in autumn",
    "how bees make honey",
    "why ice floats on water",
    "how a compass works",
    "why bread rises",
    "how tides work",
    "why cats purr",
    "how plants drink water",
    "why the moon has phases",
    "how a bicycle stays upright",
    "why we have seasons",
    "how a kite flies",
    "why metal feels cold",
    "how clouds make rain",
    "why onions make eyes water",
    "how a thermometer works",
    "why stars twinkle",
    "how a fridge keeps food cold",
    "why the ocean is salty",
    "how birds find their way",
    "how a battery stores energy",
    "why popcorn pops",
];
const EXPLAIN_TEMPLATES: [&str; 3] = [
    "Explain {} in 2 or 3 sentences.",
    "In 2 to 3 sentences, explain {}.",
    "Briefly explain {}, in 2 or 3 sentences.",
];
const ACTIVITIES: [&str; 24] = [
    "learning to cook",
    "running a first race",
    "keeping houseplants alive",
    "studying for exams",
    "saving money",
    "sleeping better",
    "learning a new language",
    "starting a garden",
    "writing a journal",
    "taking better photos",
    "learning the guitar",
    "staying focused at work",
    "hiking in the hills",
    "packing for a trip",
    "drinking more water",
    "reading more books",
    "keeping a tidy desk",
    "cycling to work",
    "baking bread at home",
    "learning to swim",
    "making new friends",
    "caring for a puppy",
    "painting with watercolors",
    "planning a picnic",
];
const NAMES: [&str; 16] = [
    "Ana", "Ben", "Chloe", "David", "Elena", "Farid", "Grace", "Hugo", "Iris", "Jonas", "Keiko",
    "Liam", "Maya", "Nina", "Omar", "Priya",
];
const EVENTS: [&str; 14] = [
    "the garden party",
    "the team dinner",
    "the book club meeting",
    "the school concert",
    "the charity run",
    "the office move",
    "the birthday picnic",
    "the museum trip",
    "the chess tournament",
    "the street market",
    "the film night",
    "the bake sale",
    "the beach cleanup",
    "the choir rehearsal",
];
const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];
const PROCESSES: [&str; 16] = [
    "how to brew tea",
    "how to plant a tree",
    "how to fix a flat tire",
    "how to make a paper plane",
    "how to wash a wool sweater",
    "how to set up a fish tank",
    "how to tie a bow tie",
    "how to boil an egg",
    "how to clean a keyboard",
    "how to pitch a tent",
    "how to repot a cactus",
    "how to fold a fitted sheet",
    "how to sharpen a pencil",
    "how to make lemonade",
    "how to back up a phone",
    "how to change a light bulb",
];
const AUDIENCES: [&str; 5] = [
    "a child",
    "a beginner",
    "a busy parent",
    "a student",
    "a friend",
];
const COMPARISONS: [(&str, &str, &str); 14] = [
    ("tea", "coffee", "a morning drink"),
    ("trains", "planes", "a trip of 500 km"),
    ("cats", "dogs", "a small flat"),
    ("paper books", "ebooks", "a long holiday"),
    ("running", "swimming", "staying fit"),
    ("bikes", "buses", "getting to work"),
    ("tents", "cabins", "a weekend in the woods"),
    ("pens", "pencils", "taking notes"),
    ("laptops", "tablets", "writing essays"),
    ("mountains", "beaches", "a family holiday"),
    ("radio", "podcasts", "learning on the go"),
    ("rice", "pasta", "a quick dinner"),
    ("gloves", "mittens", "a snowy walk"),
    ("violins", "pianos", "a first instrument"),
];

const STOPWORDS: [&str; 36] = [
    "a", "an", "the", "to", "of", "in", "on", "for", "and", "or", "how", "why", "what", "is",
    "are", "do", "does", "with", "your", "my", "at", "by", "from", "it", "its", "be", "this",
    "that", "you", "we", "our", "first", "new", "more", "km", "make",
];
const REFUSALS: [&str; 20] = [
    "i can't help",
    "i cannot help",
    "i can't assist",
    "i cannot assist",
    "i can't do that",
    "i cannot do that",
    "i can't provide",
    "i cannot provide",
    "i won't",
    "i will not",
    "i'm sorry, but",
    "i am sorry, but",
    "as an ai",
    "i'm unable to",
    "i am unable to",
    "i'm not able to",
    "i am not able to",
    "cannot comply",
    "can't comply",
    "i must decline",
];
const SIGN_OFFS: [&str; 10] = [
    "best",
    "regards",
    "kind regards",
    "thanks",
    "thank you",
    "cheers",
    "sincerely",
    "love",
    "warmly",
    "see you",
];

/// Words of `text`: runs of letters, digits and apostrophes, lowercased.
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .map(|w| w.trim_matches('\'').to_lowercase())
        .filter(|w| !w.is_empty())
        .collect()
}

/// A crude stem so that `cat`/`cats`, `berry`/`berries` and `box`/`boxes` match.
fn stem(word: &str) -> String {
    let chars = word.chars().count();
    if chars > 4 && word.ends_with("ies") {
        return format!("{}y", &word[..word.len() - 3]);
    }
    if chars > 4
        && (word.ends_with("ches")
            || word.ends_with("shes")
            || word.ends_with("xes")
            || word.ends_with("sses"))
    {
        return word[..word.len() - 2].to_string();
    }
    if chars > 3 && word.ends_with('s') && !word.ends_with("ss") {
        return word[..word.len() - 1].to_string();
    }
    word.to_string()
}

/// The content words of a phrase: its words minus stop words and numbers, at most `limit`.
fn key_terms(phrase: &str, limit: usize) -> Vec<String> {
    let mut seen = BTreeSet::new();
    words(phrase)
        .into_iter()
        .filter(|w| !STOPWORDS.contains(&w.as_str()) && !w.chars().all(|c| c.is_ascii_digit()))
        .filter(|w| seen.insert(stem(w)))
        .take(limit)
        .collect()
}

/// Non-empty lines, trimmed.
fn lines(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect()
}

/// Sentences: runs ending in `.`, `!` or `?` (or the end of text) that hold a word.
fn sentence_count(text: &str) -> usize {
    text.split(['.', '!', '?', '\n'])
        .filter(|piece| piece.chars().any(char::is_alphanumeric))
        .count()
}

fn bullet_items(text: &str) -> usize {
    lines(text)
        .iter()
        .filter(|l| {
            (l.starts_with("- ") || l.starts_with("* "))
                && l[2..].chars().any(char::is_alphanumeric)
        })
        .count()
}

/// The numbers of lines that look like `N. text` or `N) text`, in order.
fn numbered_items(text: &str) -> Vec<usize> {
    lines(text)
        .iter()
        .filter_map(|l| {
            let digits: String = l.chars().take_while(char::is_ascii_digit).collect();
            let rest = &l[digits.len()..];
            let body = rest.strip_prefix('.').or_else(|| rest.strip_prefix(')'))?;
            if digits.is_empty()
                || !body.starts_with(' ')
                || !body.chars().any(char::is_alphanumeric)
            {
                return None;
            }
            digits.parse().ok()
        })
        .collect()
}

impl FormatRule {
    fn holds(&self, text: &str) -> bool {
        let lines = lines(text);
        match self {
            FormatRule::Sentences { min, max } => {
                let n = sentence_count(text);
                (*min..=*max).contains(&n)
            }
            FormatRule::Bullets { count } => bullet_items(text) == *count,
            FormatRule::Numbered { count } => {
                numbered_items(text) == (1..=*count).collect::<Vec<_>>()
            }
            FormatRule::Greeting { name } => lines.first().is_some_and(|first| {
                let first = first.to_lowercase();
                let name = name.to_lowercase();
                ["dear ", "hi ", "hello ", "hey "]
                    .iter()
                    .any(|g| first.starts_with(&format!("{g}{name}")))
            }),
            FormatRule::SignOff => lines.iter().rev().take(2).any(|line| {
                let line = line.to_lowercase();
                SIGN_OFFS.iter().any(|s| {
                    line.starts_with(s)
                        && line[s.len()..]
                            .chars()
                            .next()
                            .is_none_or(|c| !c.is_alphanumeric())
                })
            }),
            FormatRule::Title => {
                lines.first().is_some_and(|first| {
                    first.starts_with("# ") && first[2..].chars().any(char::is_alphanumeric)
                }) && lines.len() > 1
            }
            FormatRule::Sections { names } => {
                let headings: Vec<String> = lines
                    .iter()
                    .filter_map(|l| l.strip_prefix("## "))
                    .map(|h| h.trim().trim_end_matches(':').to_lowercase())
                    .collect();
                let wanted: Vec<String> = names.iter().map(|n| n.to_lowercase()).collect();
                headings == wanted
            }
            FormatRule::FinalLine { prefix } => lines.last().is_some_and(|last| {
                last.to_lowercase().starts_with(&prefix.to_lowercase()) && last.len() > prefix.len()
            }),
            FormatRule::EndsWithQuestion => text.trim_end().ends_with('?'),
        }
    }

    fn describe(&self) -> String {
        match self {
            FormatRule::Sentences { min, max } if min == max => format!("{min} sentence(s)"),
            FormatRule::Sentences { min, max } => format!("{min}-{max} sentences"),
            FormatRule::Bullets { count } => format!("{count} bullet items"),
            FormatRule::Numbered { count } => format!("items numbered 1-{count}"),
            FormatRule::Greeting { name } => format!("greeting to {name}"),
            FormatRule::SignOff => "a sign-off".into(),
            FormatRule::Title => "a '# ' title".into(),
            FormatRule::Sections { names } => format!("sections {}", names.join(", ")),
            FormatRule::FinalLine { prefix } => format!("last line starting '{prefix}'"),
            FormatRule::EndsWithQuestion => "ending with a question".into(),
        }
    }
}

/// Whether the text refuses (an answer to a benign request should not).
fn is_refusal(text: &str) -> bool {
    let lower = text.to_lowercase().replace(['\u{2019}', '\u{2018}'], "'");
    REFUSALS.iter().any(|r| lower.contains(r))
}

/// Why the text looks like a degenerate loop, if it does.
fn degenerate(text: &str) -> Option<String> {
    let words = words(text);
    let mut run = 1;
    for pair in words.windows(2) {
        run = if pair[0] == pair[1] { run + 1 } else { 1 };
        if run >= 4 {
            return Some(format!("`{}` repeated {run} times in a row", pair[0]));
        }
    }
    let mut line_counts: BTreeMap<String, usize> = BTreeMap::new();
    for line in lines(text) {
        if words_in(line) >= 3 {
            *line_counts.entry(line.to_lowercase()).or_default() += 1;
        }
    }
    if let Some((line, count)) = line_counts.iter().find(|(_, c)| **c >= 3) {
        let shown: String = line.chars().take(40).collect();
        return Some(format!("line `{shown}` repeated {count} times"));
    }
    if words.len() >= 12 {
        let trigrams: Vec<&[String]> = words.windows(3).collect();
        let distinct: BTreeSet<&[String]> = trigrams.iter().copied().collect();
        let ratio = distinct.len() as f64 / trigrams.len() as f64;
        if ratio < 0.6 {
            return Some(format!(
                "only {:.0}% of word trigrams are distinct",
                ratio * 100.0
            ));
        }
    }
    None
}

fn words_in(text: &str) -> usize {
    words(text).len()
}

/// Whether most of the answer is the prompt copied back.
fn echoes_prompt(response: &str, prompt: &str) -> bool {
    let answer = words(response);
    let asked = words(prompt);
    if answer.len() < 3 {
        return !answer.is_empty() && answer.iter().all(|w| asked.contains(w)) && answer.len() > 1;
    }
    let asked_trigrams: BTreeSet<&[String]> = asked.windows(3).collect();
    let copied = answer
        .windows(3)
        .filter(|t| asked_trigrams.contains(t))
        .count();
    copied * 2 > answer.len() - 2
}

fn length_score(count: usize, min: usize, max: usize) -> f64 {
    if count < min {
        count as f64 / min.max(1) as f64
    } else if count > max {
        max as f64 / count as f64
    } else {
        1.0
    }
}

impl RewardScorer for RubricScorer {
    fn name(&self) -> &str {
        "rubric"
    }

    fn score(&self, request: &RewardRequest<'_>) -> Score {
        let rubric = request.rubric;
        let response = request.response;
        let answer_words = words(response);
        let answer_stems: BTreeSet<String> = answer_words.iter().map(|w| stem(w)).collect();
        let mut passed = Vec::new();
        let mut failed = Vec::new();

        let mentioned: Vec<&String> = rubric
            .key_terms
            .iter()
            .filter(|t| answer_stems.contains(&stem(t)))
            .collect();
        let on_topic = if rubric.key_terms.is_empty() {
            1.0
        } else {
            mentioned.len() as f64 / rubric.key_terms.len() as f64
        };
        let missing: Vec<&str> = rubric
            .key_terms
            .iter()
            .filter(|t| !answer_stems.contains(&stem(t)))
            .map(String::as_str)
            .collect();
        if missing.is_empty() {
            passed.push(format!("on-topic ({})", rubric.key_terms.join(", ")));
        } else {
            failed.push(format!("on-topic (missing {})", missing.join(", ")));
        }

        let count = answer_words.len();
        let length = length_score(count, rubric.min_words, rubric.max_words);
        let length_note = format!(
            "length ({count} words, want {}-{})",
            rubric.min_words, rubric.max_words
        );
        if length >= 1.0 {
            passed.push(length_note);
        } else {
            failed.push(length_note);
        }

        let mut format_ok = 0usize;
        for rule in &rubric.format {
            if rule.holds(response) {
                format_ok += 1;
                passed.push(format!("format: {}", rule.describe()));
            } else {
                failed.push(format!("format: {}", rule.describe()));
            }
        }
        let format = if rubric.format.is_empty() {
            1.0
        } else {
            format_ok as f64 / rubric.format.len() as f64
        };

        let refusal = is_refusal(response);
        if refusal {
            failed.push("no refusal (the answer refuses a benign request)".into());
        } else {
            passed.push("no refusal".into());
        }
        let loop_reason = degenerate(response);
        match &loop_reason {
            Some(why) => failed.push(format!("no repetition ({why})")),
            None => passed.push("no repetition".into()),
        }
        let prompt_text: String = request
            .prompt
            .iter()
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        let echo = echoes_prompt(response, &prompt_text);
        if echo {
            failed.push("original (the answer copies the prompt)".into());
        } else {
            passed.push("original".into());
        }

        let gate = !refusal && loop_reason.is_none() && !echo;
        let reward = if gate {
            (on_topic + length + format) / 3.0
        } else {
            0.0
        };
        let reason = format!(
            "{}: passed {}; failed {}",
            self.name(),
            if passed.is_empty() {
                "none".to_string()
            } else {
                passed.join(", ")
            },
            if failed.is_empty() {
                "none".to_string()
            } else {
                failed.join(", ")
            }
        );
        Score {
            reward,
            components: Vec::new(),
            reason,
        }
        .with_component("on_topic", on_topic)
        .with_component("length", length)
        .with_component("format", format)
        .with_component("no_refusal", if refusal { 0.0 } else { 1.0 })
        .with_component(
            "no_repetition",
            if loop_reason.is_some() { 0.0 } else { 1.0 },
        )
        .with_component("original", if echo { 0.0 } else { 1.0 })
    }
}

fn capitalise(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

fn fill(template: &str, value: &str) -> String {
    template.replacen("{}", value, 1)
}

/// Draws one prompt at `level`: (prompt text, verification).
fn build(rng: &mut TaskRng, level: u32) -> Option<(String, Verification)> {
    let (prompt, subject, kind, rubric) = match level {
        0 => {
            let noun = *NOUNS.choose(rng)?;
            let template = *ONE_SENTENCE_TEMPLATES.choose(rng)?;
            let rubric = Rubric {
                key_terms: key_terms(noun, 2),
                min_words: 3,
                max_words: 15,
                format: vec![FormatRule::Sentences { min: 1, max: 1 }],
            };
            (
                fill(template, noun),
                noun.to_string(),
                Kind::OneSentence,
                rubric,
            )
        }
        1 => {
            let topic = *EXPLAIN_TOPICS.choose(rng)?;
            let template = *EXPLAIN_TEMPLATES.choose(rng)?;
            let rubric = Rubric {
                key_terms: key_terms(topic, 3),
                min_words: 15,
                max_words: 70,
                format: vec![FormatRule::Sentences { min: 2, max: 3 }],
            };
            (
                fill(template, topic),
                topic.to_string(),
                Kind::Explain,
                rubric,
            )
        }
        2 => {
            let activity = *ACTIVITIES.choose(rng)?;
            let count = rng.random_range(3..=5);
            let prompt = format!(
                "Give {count} tips for {activity}, as a list with each tip on a line starting with '- '."
            );
            let rubric = Rubric {
                key_terms: key_terms(activity, 3),
                min_words: count * 4,
                max_words: count * 25,
                format: vec![FormatRule::Bullets { count }],
            };
            (prompt, activity.to_string(), Kind::Tips, rubric)
        }
        3 => {
            let name = *NAMES.choose(rng)?;
            let event = *EVENTS.choose(rng)?;
            let day = *DAYS.choose(rng)?;
            let prompt = format!(
                "Write a short note to {name} about {event} on {day}. Start with 'Dear {name},' and end with a sign-off."
            );
            let mut terms = key_terms(event, 3);
            terms.push(day.to_lowercase());
            let rubric = Rubric {
                key_terms: terms,
                min_words: 25,
                max_words: 120,
                format: vec![
                    FormatRule::Greeting {
                        name: name.to_string(),
                    },
                    FormatRule::SignOff,
                ],
            };
            (prompt, format!("{name}|{event}|{day}"), Kind::Note, rubric)
        }
        4 => {
            let process = *PROCESSES.choose(rng)?;
            let audience = *AUDIENCES.choose(rng)?;
            let count = rng.random_range(3..=5);
            let prompt = format!(
                "Explain {process} to {audience}. Start with a title line beginning with '# ', give {count} numbered steps (1., 2., ...), and end with a question to the reader."
            );
            let rubric = Rubric {
                key_terms: key_terms(process, 3),
                min_words: 20 + count * 4,
                max_words: 60 + count * 25,
                format: vec![
                    FormatRule::Title,
                    FormatRule::Numbered { count },
                    FormatRule::EndsWithQuestion,
                ],
            };
            (prompt, process.to_string(), Kind::Steps, rubric)
        }
        _ => {
            let (a, b, purpose) = *COMPARISONS.choose(rng)?;
            let (first, second) = if rng.random_bool(0.5) { (a, b) } else { (b, a) };
            let prompt = format!(
                "Compare {first} and {second} for {purpose}. Use two sections headed '## {}' and '## {}', then a last line starting with 'Verdict:'.",
                capitalise(first),
                capitalise(second)
            );
            let mut terms = key_terms(&format!("{first} {second}"), 4);
            terms.extend(key_terms(purpose, 2));
            let rubric = Rubric {
                key_terms: terms,
                min_words: 40,
                max_words: 220,
                format: vec![
                    FormatRule::Sections {
                        names: vec![capitalise(first), capitalise(second)],
                    },
                    FormatRule::FinalLine {
                        prefix: "Verdict:".into(),
                    },
                ],
            };
            (
                prompt,
                format!("{first}|{second}|{purpose}"),
                Kind::Compare,
                rubric,
            )
        }
    };

    Some((
        prompt,
        Verification {
            subject,
            kind,
            rubric,
        },
    ))
}

const ONE_SENTENCE_ANSWERS: [&str; 5] = [
    "Everyone has a small story about {}",
    "I always smile when I think about {}",
    "There is something calm and good about {}",
    "Many people find joy in {}",
    "A quiet day feels better with {}",
];
const TIP_LINES: [&str; 8] = [
    "Start small and build a steady routine.",
    "Set one clear goal for each week.",
    "Ask an experienced friend for advice.",
    "Keep a short log of your progress.",
    "Take breaks so you stay fresh.",
    "Prepare what you need the night before.",
    "Celebrate each little win along the way.",
    "Be patient with yourself on hard days.",
];
const STEP_LINES: [&str; 8] = [
    "Gather everything you need before you begin.",
    "Read through the whole plan once.",
    "Work slowly and check each part as you go.",
    "Clean up the space around you.",
    "Look over the result carefully.",
    "Fix anything that does not look right.",
    "Put your tools back where they belong.",
    "Take a moment to enjoy the finished job.",
];

/// A rubric-satisfying answer built from the prompt's subject; `salt` varies the wording.
fn reference_answer(verification: &Verification, salt: u64) -> String {
    let subject = verification.subject.as_str();
    let pick = |options: &[&'static str], offset: u64| -> &'static str {
        options[((salt.wrapping_add(offset)) % options.len() as u64) as usize]
    };
    match verification.kind {
        Kind::OneSentence => format!(
            "{}.",
            capitalise(&fill(pick(&ONE_SENTENCE_ANSWERS, 0), subject))
        ),
        Kind::Explain => {
            let terms = &verification.rubric.key_terms;
            format!(
                "Here is a short answer to {subject}. It comes down to {}, which work together in a simple way. Once you see that link, the everyday effect is easy to follow.",
                terms.join(" and ")
            )
        }
        Kind::Tips => {
            let count = verification
                .rubric
                .format
                .iter()
                .find_map(|r| match r {
                    FormatRule::Bullets { count } => Some(*count),
                    _ => None,
                })
                .unwrap_or(3);
            let mut order: Vec<&str> = TIP_LINES.to_vec();
            order.rotate_left((salt % TIP_LINES.len() as u64) as usize);
            let mut text = format!("Here are {count} tips for {subject}:");
            for tip in order.iter().take(count) {
                text.push_str("\n- ");
                text.push_str(tip);
            }
            text
        }
        Kind::Note => {
            let mut parts = subject.splitn(3, '|');
            let name = parts.next().unwrap_or_default();
            let event = parts.next().unwrap_or_default();
            let day = parts.next().unwrap_or_default();
            format!(
                "Dear {name},\nI wanted to remind you about {event} on {day}. It would mean a lot to see you there, so please let me know if you can come. Thank you for reading this quick note.\nBest wishes,\nSam"
            )
        }
        Kind::Steps => {
            let count = verification
                .rubric
                .format
                .iter()
                .find_map(|r| match r {
                    FormatRule::Numbered { count } => Some(*count),
                    _ => None,
                })
                .unwrap_or(3);
            let mut order: Vec<&str> = STEP_LINES.to_vec();
            order.rotate_left((salt % STEP_LINES.len() as u64) as usize);
            let mut text = format!("# {}\nHere is a simple way to do it.", capitalise(subject));
            for (i, step) in order.iter().take(count).enumerate() {
                text.push_str(&format!("\n{}. {step}", i + 1));
            }
            text.push_str("\nWhich step would you like to try first?");
            text
        }
        Kind::Compare => {
            let mut parts = subject.splitn(3, '|');
            let first = parts.next().unwrap_or_default();
            let second = parts.next().unwrap_or_default();
            let purpose = parts.next().unwrap_or_default();
            format!(
                "## {}\nChoosing {first} works well for {purpose} when you want something familiar and easy to find.\n## {}\nChoosing {second} suits {purpose} better if you value comfort and a little variety over habit.\nVerdict: pick {first} for simplicity, or {second} if you want a change.",
                capitalise(first),
                capitalise(second),
            )
        }
    }
}

impl Environment for ChatRm {
    fn info(&self) -> EnvInfo {
        EnvInfo {
            name: NAME.into(),
            category: Category::Rlhf,
            turns: Turns::Single,
            max_turns: 1,
            default_weight: 0.5,
            max_difficulty: MAX_DIFFICULTY,
            description: format!(
                "Open chat prompts (explain, tips, notes, comparisons) scored by a reward model ({})",
                self.scorer.name()
            ),
        }
    }

    fn sample(&self, seed: u64, split: Split, difficulty: u32) -> Result<Task, EnvError> {
        let level = difficulty.min(MAX_DIFFICULTY);
        let (key, verification) = draw_in_split(NAME, seed, split, difficulty, |rng| {
            let (prompt, verification) = build(rng, level)?;
            Some((prompt, verification))
        })?;
        let origin = TaskOrigin {
            env: NAME,
            seed,
            split,
            difficulty,
        };
        make_task(
            origin,
            &key,
            vec![Message::user(key.clone())],
            &verification,
        )
    }

    fn score(&self, task: &Task, completion: &str) -> Result<Score, EnvError> {
        self.check_task(task)?;
        let verification: Verification = task.verification_as()?;
        let response = match response_or_zero(completion) {
            Ok(response) => response,
            Err(zero) => return Ok(zero),
        };
        let request = RewardRequest {
            prompt: &task.prompt,
            response: &response,
            rubric: &verification.rubric,
        };
        let mut score = self.scorer.score(&request);
        if !score.reward.is_finite() {
            score = Score::zero(format!(
                "reward model {} returned a non-finite reward ({})",
                self.scorer.name(),
                score.reason
            ));
        }
        Ok(score)
    }

    fn reference(&self, task: &Task) -> Result<String, EnvError> {
        self.check_task(task)?;
        let verification: Verification = task.verification_as()?;
        let salt = stable_hash(task.id.as_bytes());
        Ok(reference_answer(&verification, salt))
    }

    fn wrong_completions(&self, task: &Task) -> Result<Vec<String>, EnvError> {
        self.check_task(task)?;
        let verification: Verification = task.verification_as()?;
        let reference = self.reference(task)?;
        let prompt = task
            .prompt
            .first()
            .map(|m| m.content.clone())
            .unwrap_or_default();
        let subject_word = verification
            .rubric
            .key_terms
            .first()
            .cloned()
            .unwrap_or_else(|| "it".into());
        let mut off_topic = reference.clone();
        for term in &verification.rubric.key_terms {
            for form in [
                term.clone(),
                capitalise(term),
                stem(term),
                capitalise(&stem(term)),
            ] {
                off_topic = off_topic.replace(&form, "zebras");
            }
        }
        let mut wrong = vec![
            "I'm sorry, but I can't help with that.".into(),
            format!("I cannot help with {subject_word}. {reference}"),
            prompt.clone(),
            format!("{subject_word} {subject_word} {subject_word} {subject_word} {subject_word}"),
            [reference.as_str(); 4].join("\n"),
            off_topic,
            TIP_LINES.join(" "),
        ];
        let unformatted = reference.replace(['\n', '#', '-'], " ").replace("  ", " ");
        if unformatted != reference {
            wrong.push(unformatted);
        }
        Ok(wrong)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin::testkit::*;

    #[test]
    fn self_check_passes_at_every_level() {
        assert_self_check_passes(&ChatRm::default(), &[0, 1, 2, 3, 4, 5], 12);
    }

    #[test]
    fn splits_are_disjoint() {
        assert_splits_disjoint(&ChatRm::default(), 0, 200);
        assert_splits_disjoint(&ChatRm::default(), 3, 200);
    }

    #[test]
    fn references_pass_every_item_at_every_level() {
        let env = ChatRm::default();
        for level in 0..=MAX_DIFFICULTY {
            for seed in 0..40 {
                let task = train_task(&env, seed, level);
                let reference = env.reference(&task).unwrap();
                let score = env.score(&task, &reference).unwrap();
                assert!(score.is_full(), "level {level}: {reference:?} -> {score:?}");
                assert!(score.reason.contains("failed none"), "{}", score.reason);
            }
        }
    }

    #[test]
    fn level_zero_is_a_short_sentence_about_a_word_in_the_prompt() {
        let env = ChatRm::default();
        let task = train_task(&env, 3, 0);
        assert!(task.prompt_text().len() < 80, "{}", task.prompt_text());
        let verification: Verification = task.verification_as().unwrap();
        let noun = verification.subject.trim_start_matches("the ");
        let good = format!("{} are lovely to see.", capitalise(noun));
        assert_eq!(reward(&env, &task, &good), 1.0, "{good}");
        // Too long and two sentences: partial credit, not full.
        let long = format!(
            "{good} I could talk about them all day long with anyone who listens. Really I could."
        );
        let score = env.score(&task, &long).unwrap();
        assert!(score.reward > 0.3 && score.reward < 1.0, "{score:?}");
        assert_eq!(score.component("format"), Some(0.0));
        assert!(
            score.reason.contains("format: 1 sentence"),
            "{}",
            score.reason
        );
        // Off-topic: no key term.
        let score = env.score(&task, "Zebras are lovely to see.").unwrap();
        assert_eq!(score.component("on_topic"), Some(0.0));
        assert!(!score.is_full());
    }

    #[test]
    fn gates_zero_refusals_loops_and_echoes() {
        let env = ChatRm::default();
        let task = train_task(&env, 8, 1);
        let reference = env.reference(&task).unwrap();
        let refusal = env
            .score(&task, &format!("I'm sorry, but I can’t help. {reference}"))
            .unwrap();
        assert_eq!(refusal.reward, 0.0);
        assert_eq!(refusal.component("no_refusal"), Some(0.0));
        let looped = env
            .score(&task, &format!("{reference} the the the the the"))
            .unwrap();
        assert_eq!(looped.reward, 0.0);
        assert!(looped.reason.contains("repeated"), "{}", looped.reason);
        let echo = env.score(&task, &task.prompt[0].content).unwrap();
        assert_eq!(echo.component("original"), Some(0.0));
        assert_eq!(echo.reward, 0.0);
    }

    #[test]
    fn format_rules_are_checked_one_by_one() {
        let numbered = "# T\n1. a b\n2. c d\n3. e f\nOk?";
        assert!(FormatRule::Numbered { count: 3 }.holds(numbered));
        assert!(!FormatRule::Numbered { count: 2 }.holds(numbered));
        assert!(FormatRule::Title.holds(numbered));
        assert!(FormatRule::EndsWithQuestion.holds(numbered));
        assert!(!FormatRule::Title.holds("# Only a title"));
        assert!(FormatRule::Bullets { count: 2 }.holds("Tips:\n- one\n* two"));
        assert!(!FormatRule::Bullets { count: 2 }.holds("- one\n- \n- three\n- four"));
        let note = "Hi Ana,\ntext\nCheers,\nSam";
        assert!(FormatRule::Greeting { name: "Ana".into() }.holds(note));
        assert!(!FormatRule::Greeting { name: "Ben".into() }.holds(note));
        assert!(FormatRule::SignOff.holds(note));
        assert!(!FormatRule::SignOff.holds("Dear Ana,\nBestow the gift.\nSam"));
        let sections = "## Tea\nx\n## Coffee:\ny\nVerdict: tea";
        assert!(
            FormatRule::Sections {
                names: vec!["Tea".into(), "Coffee".into()]
            }
            .holds(sections)
        );
        assert!(
            !FormatRule::Sections {
                names: vec!["Coffee".into(), "Tea".into()]
            }
            .holds(sections)
        );
        assert!(
            FormatRule::FinalLine {
                prefix: "Verdict:".into()
            }
            .holds(sections)
        );
        assert!(
            !FormatRule::FinalLine {
                prefix: "Verdict:".into()
            }
            .holds("Verdict:")
        );
        assert_eq!(sentence_count("One. Two! Three?"), 3);
        assert_eq!(sentence_count("No end mark"), 1);
    }

    #[test]
    fn stems_match_plurals_both_ways() {
        assert_eq!(stem("cats"), stem("cat"));
        assert_eq!(stem("berries"), stem("berry"));
        assert_eq!(stem("boxes"), stem("box"));
        assert_eq!(stem("glass"), "glass");
        assert_eq!(
            key_terms("how to fix a flat tire", 3),
            vec!["fix", "flat", "tire"]
        );
    }

    /// A stand-in for a learned reward model: the environment reports whatever it says, and a
    /// non-finite reward becomes 0 with the reason.
    #[derive(Debug)]
    struct Fixed(f64);

    impl RewardScorer for Fixed {
        fn name(&self) -> &str {
            "fixed"
        }
        fn score(&self, request: &RewardRequest<'_>) -> Score {
            Score {
                reward: self.0,
                components: Vec::new(),
                reason: format!("{} words", words_in(request.response)),
            }
        }
    }

    #[test]
    fn another_reward_model_can_replace_the_rubric() {
        let env = ChatRm::with_scorer(Arc::new(Fixed(0.25)));
        assert!(env.info().description.contains("fixed"));
        let task = train_task(&env, 1, 2);
        let score = env.score(&task, "two words").unwrap();
        assert_eq!(score.reward, 0.25);
        assert_eq!(score.reason, "2 words");
        let broken = ChatRm::with_scorer(Arc::new(Fixed(f64::NAN)));
        let score = broken.score(&task, "two words").unwrap();
        assert_eq!(score.reward, 0.0);
        assert!(score.reason.contains("non-finite"), "{}", score.reason);
    }
}
