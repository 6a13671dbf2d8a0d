//! `instruction_following`: prompts with verifiable constraints (length, keywords, format,
//! casing, sections, endings), every constraint checked and reported as its own score component;
//! or IFEval JSONL rows (`prompt`, `instruction_id_list`, `kwargs`) for the instruction ids this
//! crate supports.
//!
//! The reward is strict (IFEval's prompt-level accuracy): 1.0 only when every constraint holds;
//! the components show which did. Generated prompts always ask to write about a topic and require
//! the topic word, so empty or unrelated output never passes. Level 0 adds one simple constraint;
//! level `l` adds `1 + l/2` (at most 6), chosen so that they can all hold at once. The checks
//! follow IFEval's definitions (words are runs of letters, digits and `_`; keyword and ending
//! matches ignore case).

use std::path::Path;

use rand::Rng;
use rand::seq::IndexedRandom;
use serde::{Deserialize, Serialize};

use super::datasets::{Row, parse_jsonl, read_jsonl, row_error, string_field};
use crate::chat::Message;
use crate::env::{Category, EnvInfo, Environment, Turns, response_or_zero};
use crate::error::EnvError;
use crate::sampling::{TaskOrigin, TaskRng, draw_in_split, make_task, split_of, task_rng};
use crate::task::{Score, Split, Task};

const NAME: &str = "instruction_following";
const MAX_DIFFICULTY: u32 = 10;
const DATASET_SPLIT_NAMESPACE: &str = "dataset";

const TOPICS: [&str; 20] = [
    "cats", "rain", "bread", "trains", "music", "rivers", "stars", "gardens", "tea", "chess",
    "bikes", "snow", "bees", "maps", "clocks", "boats", "owls", "lamps", "books", "kites",
];
/// Sentences the reference writer pads with; none holds a keyword or forbidden word below.
const FILLER: [&str; 8] = [
    "People enjoy them in many places.",
    "They have a long story.",
    "Some people study them closely.",
    "Children often ask about them.",
    "They change with the seasons.",
    "Many books describe them.",
    "Each one is a little different.",
    "They can surprise us.",
];
const KEYWORDS: [&str; 8] = [
    "simple", "bright", "quiet", "green", "history", "future", "gentle", "wonder",
];
const FORBIDDEN: [&str; 8] = [
    "very", "really", "thing", "stuff", "good", "bad", "nice", "awesome",
];
/// (letter, a word rich in it) for letter-frequency constraints.
const LETTER_WORDS: [(char, &str); 6] = [
    ('z', "zoo"),
    ('q', "quiz"),
    ('x', "box"),
    ('j', "jam"),
    ('k', "kit"),
    ('v', "van"),
];
const ENDINGS: [&str; 4] = [
    "That is all.",
    "Any other questions?",
    "Thank you.",
    "The end.",
];

/// Whether a count must reach a bound or stay under it (IFEval's two relations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Relation {
    AtLeast,
    LessThan,
}

impl Relation {
    fn holds(self, count: usize, bound: usize) -> bool {
        match self {
            Relation::AtLeast => count >= bound,
            Relation::LessThan => count < bound,
        }
    }

    fn words(self) -> &'static str {
        match self {
            Relation::AtLeast => "at least",
            Relation::LessThan => "fewer than",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text.trim() {
            "at least" => Some(Relation::AtLeast),
            "less than" => Some(Relation::LessThan),
            _ => None,
        }
    }
}

/// One verifiable constraint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Constraint {
    Words {
        relation: Relation,
        count: usize,
    },
    Sentences {
        relation: Relation,
        count: usize,
    },
    Paragraphs {
        count: usize,
    },
    IncludeKeywords {
        keywords: Vec<String>,
    },
    ForbiddenWords {
        words: Vec<String>,
    },
    KeywordFrequency {
        keyword: String,
        relation: Relation,
        count: usize,
    },
    LetterFrequency {
        letter: char,
        relation: Relation,
        count: usize,
    },
    Lowercase,
    Uppercase,
    CapitalWords {
        relation: Relation,
        count: usize,
    },
    NoCommas,
    EndsWith {
        phrase: String,
    },
    Quoted,
    Title,
    Bullets {
        count: usize,
    },
    Highlights {
        count: usize,
    },
    Sections {
        splitter: String,
        count: usize,
    },
    Json,
    ConstrainedResponse,
    Postscript {
        marker: String,
    },
    Placeholders {
        count: usize,
    },
    RepeatPrompt {
        prompt: String,
    },
}

/// Every IFEval instruction id with a checker here.
const SUPPORTED_IFEVAL_IDS: [&str; 22] = [
    "length_constraints:number_words",
    "length_constraints:number_sentences",
    "length_constraints:number_paragraphs",
    "keywords:existence",
    "keywords:forbidden_words",
    "keywords:frequency",
    "keywords:letter_frequency",
    "change_case:english_lowercase",
    "change_case:english_capital",
    "change_case:capital_word_frequency",
    "punctuation:no_comma",
    "startend:end_checker",
    "startend:quotation",
    "detectable_format:title",
    "detectable_format:number_bullet_lists",
    "detectable_format:number_highlighted_sections",
    "detectable_format:multiple_sections",
    "detectable_format:json_format",
    "detectable_format:constrained_response",
    "detectable_content:postscript",
    "detectable_content:number_placeholders",
    "combination:repeat_prompt",
];

const CONSTRAINED_ANSWERS: [&str; 3] = [
    "My answer is yes.",
    "My answer is no.",
    "My answer is maybe.",
];

/// Runs of letters, digits and `_` (IFEval counts words with `\w+`).
fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
}

fn count_sentences(text: &str) -> usize {
    let mut count = 0;
    let mut in_sentence = false;
    let chars: Vec<char> = text.chars().collect();
    for (i, c) in chars.iter().enumerate() {
        if c.is_alphanumeric() {
            in_sentence = true;
        }
        let ends =
            matches!(c, '.' | '!' | '?') && chars.get(i + 1).is_none_or(|n| n.is_whitespace());
        if ends && in_sentence {
            count += 1;
            in_sentence = false;
        }
    }
    count + usize::from(in_sentence)
}

fn count_occurrences(haystack: &str, needle: &str) -> usize {
    if needle.is_empty() {
        0
    } else {
        haystack.matches(needle).count()
    }
}

/// `*text*` spans within a line (IFEval's highlighted sections), non-empty.
fn count_highlights(text: &str) -> usize {
    text.lines()
        .map(|line| {
            let line = line.trim_start();
            // A leading `* ` is a bullet, not a highlight.
            let line = line.strip_prefix("* ").unwrap_or(line);
            let parts: Vec<&str> = line.split('*').collect();
            parts
                .iter()
                .skip(1)
                .step_by(2)
                .take((parts.len() - 1) / 2)
                .filter(|p| !p.trim().is_empty())
                .count()
        })
        .sum()
}

fn bullet_lines(text: &str) -> usize {
    text.lines()
        .filter(|line| {
            let line = line.trim_start();
            (line.starts_with('*') && !line.starts_with("**")) || line.starts_with('-')
        })
        .count()
}

fn count_sections(text: &str, splitter: &str) -> usize {
    let mut count = 0;
    let mut rest = text;
    while let Some(at) = rest.find(splitter) {
        let after = rest[at + splitter.len()..].trim_start_matches(' ');
        if after.starts_with(|c: char| c.is_ascii_digit()) {
            count += 1;
        }
        rest = &rest[at + splitter.len()..];
    }
    count
}

/// Paragraphs split by `***`, as IFEval counts them: an empty piece before the first or after
/// the last separator is ignored, an empty one in between makes the layout invalid (`None`).
fn paragraphs(text: &str) -> Option<usize> {
    let pieces: Vec<&str> = text.split("***").map(str::trim).collect();
    let last = pieces.len() - 1;
    let mut count = 0;
    for (index, piece) in pieces.iter().enumerate() {
        if !piece.is_empty() {
            count += 1;
        } else if index != 0 && index != last {
            return None;
        }
    }
    Some(count)
}

fn strip_json_fence(text: &str) -> &str {
    let trimmed = text.trim();
    let inner = trimmed
        .strip_prefix("```json")
        .or_else(|| trimmed.strip_prefix("```"))
        .unwrap_or(trimmed);
    inner.strip_suffix("```").unwrap_or(inner).trim()
}

impl Constraint {
    /// The IFEval id this constraint corresponds to.
    fn id(&self) -> &'static str {
        match self {
            Constraint::Words { .. } => "length_constraints:number_words",
            Constraint::Sentences { .. } => "length_constraints:number_sentences",
            Constraint::Paragraphs { .. } => "length_constraints:number_paragraphs",
            Constraint::IncludeKeywords { .. } => "keywords:existence",
            Constraint::ForbiddenWords { .. } => "keywords:forbidden_words",
            Constraint::KeywordFrequency { .. } => "keywords:frequency",
            Constraint::LetterFrequency { .. } => "keywords:letter_frequency",
            Constraint::Lowercase => "change_case:english_lowercase",
            Constraint::Uppercase => "change_case:english_capital",
            Constraint::CapitalWords { .. } => "change_case:capital_word_frequency",
            Constraint::NoCommas => "punctuation:no_comma",
            Constraint::EndsWith { .. } => "startend:end_checker",
            Constraint::Quoted => "startend:quotation",
            Constraint::Title => "detectable_format:title",
            Constraint::Bullets { .. } => "detectable_format:number_bullet_lists",
            Constraint::Highlights { .. } => "detectable_format:number_highlighted_sections",
            Constraint::Sections { .. } => "detectable_format:multiple_sections",
            Constraint::Json => "detectable_format:json_format",
            Constraint::ConstrainedResponse => "detectable_format:constrained_response",
            Constraint::Postscript { .. } => "detectable_content:postscript",
            Constraint::Placeholders { .. } => "detectable_content:number_placeholders",
            Constraint::RepeatPrompt { .. } => "combination:repeat_prompt",
        }
    }

    /// The instruction as the prompt states it.
    fn describe(&self) -> String {
        match self {
            Constraint::Words { relation, count } => {
                format!("Use {} {count} words.", relation.words())
            }
            Constraint::Sentences { relation, count } => {
                format!("Write {} {count} sentences.", relation.words())
            }
            Constraint::Paragraphs { count } => {
                format!("Write {count} paragraphs separated by ***.")
            }
            Constraint::IncludeKeywords { keywords } => {
                format!("Include the words {}.", keywords.join(" and "))
            }
            Constraint::ForbiddenWords { words } => {
                format!("Do not use the words {}.", words.join(" or "))
            }
            Constraint::KeywordFrequency {
                keyword,
                relation,
                count,
            } => {
                format!("Use the word {keyword} {} {count} times.", relation.words())
            }
            Constraint::LetterFrequency {
                letter,
                relation,
                count,
            } => {
                format!(
                    "Use the letter {letter} {} {count} times.",
                    relation.words()
                )
            }
            Constraint::Lowercase => "Use only lowercase letters.".into(),
            Constraint::Uppercase => "Use only capital letters.".into(),
            Constraint::CapitalWords { relation, count } => {
                format!("Write {} {count} words in ALL CAPS.", relation.words())
            }
            Constraint::NoCommas => "Do not use commas.".into(),
            Constraint::EndsWith { phrase } => format!("End with the exact phrase \"{phrase}\"."),
            Constraint::Quoted => "Wrap the whole reply in double quotes.".into(),
            Constraint::Title => "Give a title in double angle brackets, like <<title>>.".into(),
            Constraint::Bullets { count } => {
                format!("Use exactly {count} bullet points like * item.")
            }
            Constraint::Highlights { count } => {
                format!("Highlight at least {count} parts like *this*.")
            }
            Constraint::Sections { splitter, count } => {
                format!("Use {count} sections, each starting with {splitter} X.")
            }
            Constraint::Json => "Reply in JSON only.".into(),
            Constraint::ConstrainedResponse => {
                format!("Answer with one of: {}", CONSTRAINED_ANSWERS.join(" / "))
            }
            Constraint::Postscript { marker } => {
                format!("End with a postscript starting with {marker}")
            }
            Constraint::Placeholders { count } => {
                format!("Include at least {count} placeholders in square brackets like [name].")
            }
            Constraint::RepeatPrompt { prompt } => {
                format!("First repeat the request word for word: {prompt}")
            }
        }
    }

    /// Whether `response` satisfies the constraint, with a short explanation when it does not.
    fn check(&self, response: &str) -> Result<(), String> {
        let lower = response.to_lowercase();
        let fail = |message: String| Err(message);
        match self {
            Constraint::Words { relation, count } => {
                let n = words(response).count();
                if relation.holds(n, *count) {
                    Ok(())
                } else {
                    fail(format!("{n} words, want {} {count}", relation.words()))
                }
            }
            Constraint::Sentences { relation, count } => {
                let n = count_sentences(response);
                if relation.holds(n, *count) {
                    Ok(())
                } else {
                    fail(format!("{n} sentences, want {} {count}", relation.words()))
                }
            }
            Constraint::Paragraphs { count } => match paragraphs(response) {
                Some(found) if found == *count => Ok(()),
                Some(found) => fail(format!("{found} paragraph(s) split by ***, want {count}")),
                None => fail("an empty paragraph between *** separators".into()),
            },
            Constraint::IncludeKeywords { keywords } => {
                let missing: Vec<&str> = keywords
                    .iter()
                    .filter(|k| !lower.contains(&k.to_lowercase()))
                    .map(String::as_str)
                    .collect();
                if missing.is_empty() {
                    Ok(())
                } else {
                    fail(format!("missing {}", missing.join(", ")))
                }
            }
            Constraint::ForbiddenWords { words: forbidden } => {
                let used: Vec<&str> = forbidden
                    .iter()
                    .filter(|f| words(&lower).any(|w| w == f.to_lowercase()))
                    .map(String::as_str)
                    .collect();
                if used.is_empty() {
                    Ok(())
                } else {
                    fail(format!("uses {}", used.join(", ")))
                }
            }
            Constraint::KeywordFrequency {
                keyword,
                relation,
                count,
            } => {
                let n = count_occurrences(&lower, &keyword.to_lowercase());
                if relation.holds(n, *count) {
                    Ok(())
                } else {
                    fail(format!("{keyword} appears {n} times"))
                }
            }
            Constraint::LetterFrequency {
                letter,
                relation,
                count,
            } => {
                let target = letter.to_ascii_lowercase();
                let n = lower.chars().filter(|c| *c == target).count();
                if relation.holds(n, *count) {
                    Ok(())
                } else {
                    fail(format!("letter {letter} appears {n} times"))
                }
            }
            Constraint::Lowercase => {
                if response == lower {
                    Ok(())
                } else {
                    fail("has capital letters".into())
                }
            }
            Constraint::Uppercase => {
                if response == response.to_uppercase() {
                    Ok(())
                } else {
                    fail("has lowercase letters".into())
                }
            }
            Constraint::CapitalWords { relation, count } => {
                let n = words(response)
                    .filter(|w| w.chars().any(char::is_alphabetic) && *w == w.to_uppercase())
                    .count();
                if relation.holds(n, *count) {
                    Ok(())
                } else {
                    fail(format!("{n} all-caps words"))
                }
            }
            Constraint::NoCommas => {
                if response.contains(',') {
                    fail("contains a comma".into())
                } else {
                    Ok(())
                }
            }
            Constraint::EndsWith { phrase } => {
                let body = lower.trim().trim_matches('"').trim_end();
                if body.ends_with(&phrase.trim().to_lowercase()) {
                    Ok(())
                } else {
                    fail(format!("does not end with {phrase:?}"))
                }
            }
            Constraint::Quoted => {
                let t = response.trim();
                if t.len() > 1 && t.starts_with('"') && t.ends_with('"') {
                    Ok(())
                } else {
                    fail("not wrapped in double quotes".into())
                }
            }
            Constraint::Title => {
                let titled = response.find("<<").is_some_and(|open| {
                    response[open + 2..].find(">>").is_some_and(|close| {
                        let title = &response[open + 2..open + 2 + close];
                        !title.trim().is_empty() && !title.contains('\n')
                    })
                });
                if titled {
                    Ok(())
                } else {
                    fail("no <<title>>".into())
                }
            }
            Constraint::Bullets { count } => {
                let n = bullet_lines(response);
                if n == *count {
                    Ok(())
                } else {
                    fail(format!("{n} bullet points, want exactly {count}"))
                }
            }
            Constraint::Highlights { count } => {
                let n = count_highlights(response);
                if n >= *count {
                    Ok(())
                } else {
                    fail(format!("{n} highlighted parts, want {count}"))
                }
            }
            Constraint::Sections { splitter, count } => {
                let n = count_sections(response, splitter);
                if n >= *count {
                    Ok(())
                } else {
                    fail(format!("{n} sections marked {splitter:?}, want {count}"))
                }
            }
            Constraint::Json => {
                match serde_json::from_str::<serde_json::Value>(strip_json_fence(response)) {
                    Ok(_) => Ok(()),
                    Err(err) => fail(format!("not JSON: {err}")),
                }
            }
            Constraint::ConstrainedResponse => {
                if CONSTRAINED_ANSWERS.iter().any(|a| response.contains(a)) {
                    Ok(())
                } else {
                    fail("not one of the allowed answers".into())
                }
            }
            Constraint::Postscript { marker } => {
                let marker = marker.to_lowercase();
                let found = lower
                    .lines()
                    .any(|line| line.trim_start().starts_with(&marker));
                if found {
                    Ok(())
                } else {
                    fail(format!("no line starting with {marker}"))
                }
            }
            Constraint::Placeholders { count } => {
                let n = response
                    .split('[')
                    .skip(1)
                    .filter(|part| part.find(']').is_some_and(|close| close > 0))
                    .count();
                if n >= *count {
                    Ok(())
                } else {
                    fail(format!("{n} placeholders, want {count}"))
                }
            }
            Constraint::RepeatPrompt { prompt } => {
                if lower.trim().starts_with(&prompt.trim().to_lowercase()) {
                    Ok(())
                } else {
                    fail("does not start with the request".into())
                }
            }
        }
    }
}

/// Writes a response meant to satisfy every constraint (checked afterwards by the caller).
fn write_reference(topic: &str, constraints: &[Constraint]) -> String {
    let has = |pred: fn(&Constraint) -> bool| constraints.iter().any(pred);
    if has(|c| matches!(c, Constraint::ConstrainedResponse)) {
        return CONSTRAINED_ANSWERS[0].to_string();
    }
    let subject = if topic.is_empty() {
        "This topic".to_string()
    } else {
        capitalise(topic)
    };
    let mut sentences = vec![format!("{subject} are worth a look.")];
    for constraint in constraints {
        match constraint {
            // The topic is already the subject of the first sentence.
            Constraint::IncludeKeywords { keywords } if keywords.iter().all(|k| k == topic) => {}
            Constraint::IncludeKeywords { keywords } => {
                sentences.push(format!("It is {}.", keywords.join(" and ")))
            }
            Constraint::KeywordFrequency {
                keyword,
                relation: Relation::AtLeast,
                count,
            } => sentences.push(format!("{}.", vec![keyword.as_str(); *count].join(" "))),
            Constraint::LetterFrequency {
                letter,
                relation: Relation::AtLeast,
                count,
            } => {
                let word = LETTER_WORDS
                    .iter()
                    .find(|(l, _)| l == letter)
                    .map(|(_, w)| w.to_string())
                    .unwrap_or_else(|| letter.to_string());
                sentences.push(format!("{}.", vec![word.as_str(); *count].join(" ")))
            }
            Constraint::CapitalWords {
                relation: Relation::AtLeast,
                count,
            } => sentences.push(format!("{}.", vec!["WOW"; *count].join(" "))),
            Constraint::Placeholders { count } => {
                let slots: Vec<String> = (1..=*count).map(|i| format!("[item{i}]")).collect();
                sentences.push(format!("See {}.", slots.join(" ")));
            }
            Constraint::Highlights { count } => {
                let marks: Vec<String> = (1..=*count).map(|i| format!("*point {i}*")).collect();
                sentences.push(format!("Note {}.", marks.join(" and ")));
            }
            _ => {}
        }
    }
    let min_words = constraints
        .iter()
        .filter_map(|c| match c {
            Constraint::Words {
                relation: Relation::AtLeast,
                count,
            } => Some(*count),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    let min_sentences = constraints
        .iter()
        .filter_map(|c| match c {
            Constraint::Sentences {
                relation: Relation::AtLeast,
                count,
            } => Some(*count),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    let mut filler = FILLER.iter().cycle();
    while words(&sentences.join(" ")).count() < min_words || sentences.len() < min_sentences {
        sentences.push(filler.next().map(|s| s.to_string()).unwrap_or_default());
    }
    let mut body = layout(&sentences, constraints);
    for constraint in constraints {
        match constraint {
            Constraint::Title => body = format!("<<{subject}>>\n{body}"),
            Constraint::RepeatPrompt { prompt } => body = format!("{prompt}\n{body}"),
            _ => {}
        }
    }
    if let Some(Constraint::Postscript { marker }) = constraints
        .iter()
        .find(|c| matches!(c, Constraint::Postscript { .. }))
    {
        body = format!("{body}\n{marker} Thanks for reading.");
    }
    if let Some(Constraint::EndsWith { phrase }) = constraints
        .iter()
        .find(|c| matches!(c, Constraint::EndsWith { .. }))
    {
        body = format!("{body}\n{phrase}");
    }
    if has(|c| matches!(c, Constraint::Lowercase)) {
        body = body.to_lowercase();
    }
    if has(|c| matches!(c, Constraint::Uppercase)) {
        body = body.to_uppercase();
    }
    if has(|c| matches!(c, Constraint::Json)) {
        body = serde_json::json!({ "response": body }).to_string();
    }
    if has(|c| matches!(c, Constraint::Quoted)) {
        body = format!("\"{body}\"");
    }
    body
}

/// Arranges sentences as bullets, sections or paragraphs when asked, else as one paragraph.
fn layout(sentences: &[String], constraints: &[Constraint]) -> String {
    for constraint in constraints {
        match constraint {
            Constraint::Bullets { count } => {
                let mut items: Vec<String> = sentences.to_vec();
                let mut filler = FILLER.iter().cycle();
                while items.len() < *count {
                    items.push(filler.next().map(|s| s.to_string()).unwrap_or_default());
                }
                let (head, tail) = items.split_at(items.len() - count);
                let bullets: Vec<String> = tail.iter().map(|s| format!("* {s}")).collect();
                let intro = if head.is_empty() {
                    String::new()
                } else {
                    format!("{}\n", head.join(" "))
                };
                return format!("{intro}{}", bullets.join("\n"));
            }
            Constraint::Sections { splitter, count } => {
                return spread(
                    sentences,
                    *count,
                    |i, text| format!("{splitter} {i}\n{text}"),
                    "\n\n",
                );
            }
            Constraint::Paragraphs { count } => {
                return spread(sentences, *count, |_, text| text, "\n***\n");
            }
            _ => {}
        }
    }
    sentences.join(" ")
}

/// Spreads sentences over `parts` non-empty groups.
fn spread(
    sentences: &[String],
    parts: usize,
    render: impl Fn(usize, String) -> String,
    separator: &str,
) -> String {
    let parts = parts.max(1);
    let mut groups: Vec<Vec<String>> = vec![Vec::new(); parts];
    for (i, sentence) in sentences.iter().enumerate() {
        groups[i % parts].push(sentence.clone());
    }
    let mut filler = FILLER.iter().cycle();
    for group in &mut groups {
        if group.is_empty() {
            group.push(filler.next().map(|s| s.to_string()).unwrap_or_default());
        }
    }
    groups
        .into_iter()
        .enumerate()
        .map(|(i, g)| render(i + 1, g.join(" ")))
        .collect::<Vec<_>>()
        .join(separator)
}

/// `text` without any occurrence of `word`, whatever its case.
fn remove_ignoring_case(text: &str, word: &str) -> String {
    let needle = word.to_lowercase();
    if needle.is_empty() {
        return text.to_string();
    }
    let mut out = String::new();
    let mut rest = text;
    loop {
        let lower = rest.to_lowercase();
        // Only byte-preserving (ASCII-length) lowercasing lets indices carry over.
        match lower.find(&needle).filter(|_| lower.len() == rest.len()) {
            Some(at) => {
                out.push_str(&rest[..at]);
                rest = &rest[at + needle.len()..];
            }
            None => {
                out.push_str(rest);
                return out;
            }
        }
    }
}

fn capitalise(word: &str) -> String {
    let mut chars = word.chars();
    chars
        .next()
        .map(|first| first.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

/// Families of constraints that cannot be combined with one another.
fn family(constraint: &Constraint) -> &'static str {
    match constraint {
        Constraint::Lowercase | Constraint::Uppercase | Constraint::CapitalWords { .. } => "case",
        Constraint::Bullets { .. }
        | Constraint::Sections { .. }
        | Constraint::Paragraphs { .. }
        | Constraint::Json => "layout",
        Constraint::Words { .. } | Constraint::Sentences { .. } => "length",
        other => other.id(),
    }
}

/// A random constraint; level 0 draws only from the simplest ones.
fn random_constraint(rng: &mut TaskRng, level: u32) -> Option<Constraint> {
    let simple = level == 0;
    let kinds = if simple { 4 } else { 19 };
    let count = |rng: &mut TaskRng, low: usize, high: usize| rng.random_range(low..=high);
    Some(match rng.random_range(0..kinds) {
        0 => Constraint::Lowercase,
        1 => Constraint::Uppercase,
        2 => Constraint::NoCommas,
        3 => Constraint::EndsWith {
            phrase: ENDINGS.choose(rng)?.to_string(),
        },
        4 => Constraint::Words {
            relation: Relation::AtLeast,
            count: count(rng, 10, 60),
        },
        5 => Constraint::Words {
            relation: Relation::LessThan,
            count: count(rng, 40, 90),
        },
        6 => Constraint::Sentences {
            relation: Relation::AtLeast,
            count: count(rng, 2, 6),
        },
        7 => {
            let n = count(rng, 1, 2);
            Constraint::IncludeKeywords {
                keywords: KEYWORDS
                    .choose_multiple(rng, n)
                    .map(|s| s.to_string())
                    .collect(),
            }
        }
        8 => {
            let n = count(rng, 1, 3);
            Constraint::ForbiddenWords {
                words: FORBIDDEN
                    .choose_multiple(rng, n)
                    .map(|s| s.to_string())
                    .collect(),
            }
        }
        9 => Constraint::KeywordFrequency {
            keyword: KEYWORDS.choose(rng)?.to_string(),
            relation: Relation::AtLeast,
            count: count(rng, 2, 4),
        },
        10 => {
            let (letter, _) = *LETTER_WORDS.choose(rng)?;
            Constraint::LetterFrequency {
                letter,
                relation: Relation::AtLeast,
                count: count(rng, 2, 5),
            }
        }
        11 => Constraint::CapitalWords {
            relation: Relation::AtLeast,
            count: count(rng, 1, 3),
        },
        12 => Constraint::Quoted,
        13 => Constraint::Title,
        14 => Constraint::Bullets {
            count: count(rng, 2, 5),
        },
        15 => Constraint::Highlights {
            count: count(rng, 1, 3),
        },
        16 => Constraint::Sections {
            splitter: ["Section", "PART"].choose(rng)?.to_string(),
            count: count(rng, 2, 4),
        },
        17 => Constraint::Postscript {
            marker: ["P.S.", "P.P.S."].choose(rng)?.to_string(),
        },
        _ => Constraint::Placeholders {
            count: count(rng, 1, 3),
        },
    })
}

/// Checks every constraint; the reward is 1 only when all hold.
fn score_constraints(constraints: &[Constraint], response: &str) -> Score {
    let mut failures = Vec::new();
    let mut components = Vec::new();
    for (index, constraint) in constraints.iter().enumerate() {
        let result = constraint.check(response);
        components.push((
            format!("{index}:{}", constraint.id()),
            f64::from(result.is_ok()),
        ));
        if let Err(why) = result {
            failures.push(format!("{}: {why}", constraint.id()));
        }
    }
    let passed = components.iter().filter(|(_, v)| *v == 1.0).count();
    let reason = if failures.is_empty() {
        format!("all {} constraints hold", constraints.len())
    } else {
        format!(
            "{passed}/{} constraints hold; {}",
            constraints.len(),
            failures.join("; ")
        )
    };
    let mut score = Score::binary(failures.is_empty(), reason);
    for (name, value) in components {
        score = score.with_component(name, value);
    }
    score
}

/// Instruction following with verifiable constraints.
#[derive(Debug, Clone)]
pub struct InstructionFollowing {
    name: String,
    source: Source,
}

#[derive(Debug, Clone)]
enum Source {
    Generated,
    Dataset(Vec<IfevalPrompt>),
}

#[derive(Debug, Clone)]
struct IfevalPrompt {
    prompt: String,
    constraints: Vec<Constraint>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Verification {
    /// The topic word generated prompts require; empty for dataset rows.
    topic: String,
    constraints: Vec<Constraint>,
}

impl Default for InstructionFollowing {
    fn default() -> Self {
        Self::generated()
    }
}

fn ifeval_constraint(
    id: &str,
    kwargs: &serde_json::Value,
    prompt: &str,
) -> Result<Constraint, String> {
    let usize_arg = |key: &str| {
        kwargs
            .get(key)
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .ok_or_else(|| format!("`{id}` needs integer `{key}`"))
    };
    let str_arg = |key: &str| {
        kwargs
            .get(key)
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .ok_or_else(|| format!("`{id}` needs string `{key}`"))
    };
    let relation_arg = |key: &str| {
        let text = str_arg(key)?;
        Relation::parse(&text).ok_or_else(|| format!("`{id}` has unknown relation {text:?}"))
    };
    let list_arg = |key: &str| -> Result<Vec<String>, String> {
        kwargs
            .get(key)
            .and_then(|v| v.as_array())
            .map(|items| {
                items
                    .iter()
                    .filter_map(|i| i.as_str().map(str::to_string))
                    .collect()
            })
            .ok_or_else(|| format!("`{id}` needs list `{key}`"))
    };
    Ok(match id {
        "length_constraints:number_words" => Constraint::Words {
            relation: relation_arg("relation")?,
            count: usize_arg("num_words")?,
        },
        "length_constraints:number_sentences" => Constraint::Sentences {
            relation: relation_arg("relation")?,
            count: usize_arg("num_sentences")?,
        },
        "length_constraints:number_paragraphs" => Constraint::Paragraphs {
            count: usize_arg("num_paragraphs")?,
        },
        "keywords:existence" => Constraint::IncludeKeywords {
            keywords: list_arg("keywords")?,
        },
        "keywords:forbidden_words" => Constraint::ForbiddenWords {
            words: list_arg("forbidden_words")?,
        },
        "keywords:frequency" => Constraint::KeywordFrequency {
            keyword: str_arg("keyword")?,
            relation: relation_arg("relation")?,
            count: usize_arg("frequency")?,
        },
        "keywords:letter_frequency" => Constraint::LetterFrequency {
            letter: str_arg("letter")?.chars().next().ok_or("empty `letter`")?,
            relation: relation_arg("let_relation")?,
            count: usize_arg("let_frequency")?,
        },
        "change_case:english_lowercase" => Constraint::Lowercase,
        "change_case:english_capital" => Constraint::Uppercase,
        "change_case:capital_word_frequency" => Constraint::CapitalWords {
            relation: relation_arg("capital_relation")?,
            count: usize_arg("capital_frequency")?,
        },
        "punctuation:no_comma" => Constraint::NoCommas,
        "startend:end_checker" => Constraint::EndsWith {
            phrase: str_arg("end_phrase")?,
        },
        "startend:quotation" => Constraint::Quoted,
        "detectable_format:title" => Constraint::Title,
        "detectable_format:number_bullet_lists" => Constraint::Bullets {
            count: usize_arg("num_bullets")?,
        },
        "detectable_format:number_highlighted_sections" => Constraint::Highlights {
            count: usize_arg("num_highlights")?,
        },
        "detectable_format:multiple_sections" => Constraint::Sections {
            splitter: str_arg("section_spliter")?,
            count: usize_arg("num_sections")?,
        },
        "detectable_format:json_format" => Constraint::Json,
        "detectable_format:constrained_response" => Constraint::ConstrainedResponse,
        "detectable_content:postscript" => Constraint::Postscript {
            marker: str_arg("postscript_marker")?,
        },
        "detectable_content:number_placeholders" => Constraint::Placeholders {
            count: usize_arg("num_placeholders")?,
        },
        "combination:repeat_prompt" => Constraint::RepeatPrompt {
            prompt: str_arg("prompt_to_repeat").unwrap_or_else(|_| prompt.to_string()),
        },
        other => return Err(format!("unsupported id {other}")),
    })
}

fn ifeval_row(
    row: &Row,
    source_name: &str,
    unsupported: &mut Vec<String>,
) -> Result<IfevalPrompt, EnvError> {
    let prompt = string_field(row, "prompt", source_name)?.to_string();
    let ids: Vec<&str> = row
        .value
        .get("instruction_id_list")
        .and_then(|v| v.as_array())
        .ok_or_else(|| row_error(source_name, row.line, "missing list `instruction_id_list`"))?
        .iter()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| row_error(source_name, row.line, "non-string instruction id"))
        })
        .collect::<Result<_, _>>()?;
    let empty = Vec::new();
    let kwargs = row
        .value
        .get("kwargs")
        .and_then(|v| v.as_array())
        .unwrap_or(&empty);
    let mut constraints = Vec::new();
    for (index, id) in ids.iter().enumerate() {
        if !SUPPORTED_IFEVAL_IDS.contains(id) {
            if !unsupported.iter().any(|u| u == id) {
                unsupported.push(id.to_string());
            }
            continue;
        }
        let args = kwargs
            .get(index)
            .cloned()
            .unwrap_or(serde_json::Value::Null);
        let constraint = ifeval_constraint(id, &args, &prompt)
            .map_err(|message| row_error(source_name, row.line, message))?;
        constraints.push(constraint);
    }
    Ok(IfevalPrompt {
        prompt,
        constraints,
    })
}

impl InstructionFollowing {
    /// Generated prompts.
    pub fn generated() -> Self {
        Self {
            name: NAME.to_string(),
            source: Source::Generated,
        }
    }

    /// IFEval JSONL text. Fails, naming them, if any row uses instruction ids without a checker
    /// here (see [`InstructionFollowing::supported_ifeval_ids`]).
    pub fn from_ifeval_str(text: &str, source_name: &str) -> Result<Self, EnvError> {
        Self::from_rows(&parse_jsonl(text, source_name)?, source_name)
    }

    /// An IFEval JSONL file.
    pub fn from_ifeval_file(path: impl AsRef<Path>) -> Result<Self, EnvError> {
        let path = path.as_ref();
        Self::from_rows(&read_jsonl(path)?, &path.display().to_string())
    }

    fn from_rows(rows: &[Row], source_name: &str) -> Result<Self, EnvError> {
        let mut unsupported = Vec::new();
        let prompts = rows
            .iter()
            .map(|row| ifeval_row(row, source_name, &mut unsupported))
            .collect::<Result<Vec<_>, _>>()?;
        if !unsupported.is_empty() {
            unsupported.sort();
            return Err(EnvError::UnsupportedInstructions {
                unsupported,
                supported: Self::supported_ifeval_ids()
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            });
        }
        Ok(Self {
            name: NAME.to_string(),
            source: Source::Dataset(prompts),
        })
    }

    /// The IFEval instruction ids this environment can verify.
    pub fn supported_ifeval_ids() -> &'static [&'static str] {
        &SUPPORTED_IFEVAL_IDS
    }

    /// The same environment under another name (e.g. `ifeval`).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    fn generate(rng: &mut TaskRng, level: u32) -> Option<(String, Verification)> {
        let topic = TOPICS.choose(rng)?.to_string();
        let wanted = (1 + level as usize / 2).min(6);
        let mut constraints: Vec<Constraint> = vec![Constraint::IncludeKeywords {
            keywords: vec![topic.clone()],
        }];
        let mut families = vec!["topic"];
        for _ in 0..wanted * 4 {
            if constraints.len() > wanted {
                break;
            }
            let candidate = random_constraint(rng, level)?;
            let fam = family(&candidate);
            // JSON replies have their own shape: keep them free of wrappers and endings.
            let json_conflict = (matches!(candidate, Constraint::Json) && constraints.len() > 1)
                || constraints.iter().any(|c| matches!(c, Constraint::Json));
            if families.contains(&fam) || json_conflict {
                continue;
            }
            families.push(fam);
            constraints.push(candidate);
        }
        let instructions: Vec<String> = constraints[1..].iter().map(Constraint::describe).collect();
        let prompt = format!("Write about {topic}. {}", instructions.join(" "));
        let verification = Verification {
            topic: topic.clone(),
            constraints,
        };
        // Keep only prompts whose reference really satisfies them.
        let reference = write_reference(&topic, &verification.constraints);
        score_constraints(&verification.constraints, &reference)
            .is_full()
            .then_some((prompt, verification))
    }
}

impl Environment for InstructionFollowing {
    fn info(&self) -> EnvInfo {
        let (description, max_difficulty) = match &self.source {
            Source::Generated => (
                "Write about a topic under verifiable constraints; every constraint checked"
                    .to_string(),
                MAX_DIFFICULTY,
            ),
            Source::Dataset(rows) => (
                format!("{} IFEval prompts with verifiable constraints", rows.len()),
                0,
            ),
        };
        EnvInfo {
            name: self.name.clone(),
            category: Category::InstructionFollowing,
            turns: Turns::Single,
            max_turns: 1,
            default_weight: 1.0,
            max_difficulty,
            description,
        }
    }

    fn sample(&self, seed: u64, split: Split, difficulty: u32) -> Result<Task, EnvError> {
        let origin = TaskOrigin {
            env: &self.name,
            seed,
            split,
            difficulty,
        };
        let (prompt, verification) = match &self.source {
            Source::Generated => {
                let level = difficulty.min(MAX_DIFFICULTY);
                draw_in_split(&self.name, seed, split, difficulty, |rng| {
                    Self::generate(rng, level)
                })?
            }
            Source::Dataset(prompts) => {
                let in_split: Vec<&IfevalPrompt> = prompts
                    .iter()
                    .filter(|p| split_of(DATASET_SPLIT_NAMESPACE, &p.prompt) == split)
                    .collect();
                if in_split.is_empty() {
                    return Err(EnvError::SplitExhausted {
                        env: self.name.clone(),
                        split,
                        difficulty,
                        seed,
                        attempts: prompts.len(),
                    });
                }
                let chosen =
                    in_split[task_rng(&self.name, seed, 0).random_range(0..in_split.len())];
                (
                    chosen.prompt.clone(),
                    Verification {
                        topic: String::new(),
                        constraints: chosen.constraints.clone(),
                    },
                )
            }
        };
        make_task(
            origin,
            &prompt,
            vec![Message::user(prompt.clone())],
            &verification,
        )
    }

    fn score(&self, task: &Task, completion: &str) -> Result<Score, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        let response = match response_or_zero(completion) {
            Ok(response) => response,
            Err(zero) => return Ok(zero),
        };
        Ok(score_constraints(&expected.constraints, &response))
    }

    fn reference(&self, task: &Task) -> Result<String, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        let reference = write_reference(&expected.topic, &expected.constraints);
        let score = score_constraints(&expected.constraints, &reference);
        if score.is_full() {
            Ok(reference)
        } else {
            Err(EnvError::NoReference {
                env: self.name.clone(),
                task_id: task.id.clone(),
                reason: score.reason,
            })
        }
    }

    fn wrong_completions(&self, task: &Task) -> Result<Vec<String>, EnvError> {
        let reference = self.reference(task)?;
        let expected: Verification = task.verification_as()?;
        let mut wrong = Vec::new();
        // Break one constraint at a time where a simple edit can.
        for constraint in &expected.constraints {
            let broken = match constraint {
                Constraint::Lowercase => format!("Capital {reference}"),
                Constraint::Uppercase => format!("{reference} lower"),
                Constraint::NoCommas => format!("{reference}, yes"),
                Constraint::EndsWith { .. } => format!("{reference}\nExtra words."),
                Constraint::IncludeKeywords { keywords } => {
                    keywords.iter().fold(reference.clone(), |text, keyword| {
                        remove_ignoring_case(&text, keyword)
                    })
                }
                Constraint::Quoted => reference.trim_matches('"').to_string(),
                _ => continue,
            };
            wrong.push(broken);
        }
        Ok(wrong)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin::testkit::*;

    #[test]
    fn self_check_passes() {
        assert_self_check_passes(&InstructionFollowing::generated(), &[0, 1, 3, 6, 10], 12);
    }

    #[test]
    fn splits_are_disjoint() {
        assert_splits_disjoint(&InstructionFollowing::generated(), 0, 200);
        assert_splits_disjoint(&InstructionFollowing::generated(), 6, 100);
    }

    #[test]
    fn every_constraint_kind_appears_and_its_reference_holds() {
        let env = InstructionFollowing::generated();
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..300 {
            let task = train_task(&env, seed, 8);
            let v: Verification = task.verification_as().unwrap();
            seen.extend(v.constraints.iter().map(|c| c.id()));
        }
        assert!(seen.len() >= 17, "{seen:?}");
    }

    #[test]
    fn checks_follow_ifeval_definitions() {
        let ok = |c: Constraint, text: &str| c.check(text).is_ok();
        assert!(ok(
            Constraint::Words {
                relation: Relation::LessThan,
                count: 4
            },
            "one two, three!"
        ));
        assert!(!ok(
            Constraint::Words {
                relation: Relation::LessThan,
                count: 3
            },
            "one two, three!"
        ));
        assert!(ok(
            Constraint::Sentences {
                relation: Relation::AtLeast,
                count: 2
            },
            "Hi there. Bye now"
        ));
        assert!(ok(Constraint::Bullets { count: 2 }, "intro\n* a\n- b"));
        assert!(!ok(Constraint::Bullets { count: 2 }, "* a\n* b\n* c"));
        assert!(ok(Constraint::Highlights { count: 2 }, "*one* and *two*"));
        assert!(!ok(Constraint::Highlights { count: 1 }, "* bullet only"));
        assert!(ok(
            Constraint::Sections {
                splitter: "Section".into(),
                count: 2
            },
            "Section 1\na\nSection 2\nb"
        ));
        assert!(ok(Constraint::Paragraphs { count: 2 }, "a\n***\nb"));
        assert!(!ok(Constraint::Paragraphs { count: 2 }, "a\n***\n"));
        assert!(ok(Constraint::Paragraphs { count: 2 }, "a\n***\nb\n***"));
        assert!(!ok(Constraint::Paragraphs { count: 2 }, "a\n***\n***\nb"));
        assert!(ok(Constraint::Json, "```json\n{\"a\": 1}\n```"));
        assert!(ok(
            Constraint::EndsWith {
                phrase: "The end.".into()
            },
            "\"story. THE END.\""
        ));
        assert!(ok(
            Constraint::ForbiddenWords {
                words: vec!["bad".into()]
            },
            "badge is fine"
        ));
        assert!(!ok(
            Constraint::ForbiddenWords {
                words: vec!["bad".into()]
            },
            "Bad idea"
        ));
        assert!(ok(Constraint::Title, "<<Cats>>\ntext"));
        assert!(ok(
            Constraint::Postscript {
                marker: "P.S.".into()
            },
            "hi\np.s. bye"
        ));
        assert!(ok(Constraint::Placeholders { count: 2 }, "[a] and [b]"));
        assert!(ok(
            Constraint::CapitalWords {
                relation: Relation::AtLeast,
                count: 1
            },
            "a BIG deal"
        ));
    }

    #[test]
    fn components_name_each_constraint() {
        let env = InstructionFollowing::generated();
        let task = train_task(&env, 5, 6);
        let v: Verification = task.verification_as().unwrap();
        let score = env.score(&task, &env.reference(&task).unwrap()).unwrap();
        assert_eq!(score.components.len(), v.constraints.len());
        assert!(score.components.iter().all(|c| c.value == 1.0));
        let bad = env.score(&task, "nothing relevant").unwrap();
        assert_eq!(bad.reward, 0.0);
        assert!(
            bad.component("0:keywords:existence") == Some(0.0),
            "{bad:?}"
        );
    }

    #[test]
    fn ifeval_rows_load_and_unsupported_ids_are_named() {
        let rows = r#"{"key": 1, "prompt": "Write a poem about the sea.", "instruction_id_list": ["change_case:english_lowercase", "length_constraints:number_words"], "kwargs": [{}, {"relation": "at least", "num_words": 12, "keyword": null}]}
{"key": 2, "prompt": "Describe a city.", "instruction_id_list": ["detectable_format:number_bullet_lists", "startend:end_checker"], "kwargs": [{"num_bullets": 3}, {"end_phrase": "Is there anything else I can help with?"}]}
{"key": 3, "prompt": "Say hi.", "instruction_id_list": ["detectable_format:title", "detectable_content:postscript"], "kwargs": [{}, {"postscript_marker": "P.S."}]}"#;
        let env = InstructionFollowing::from_ifeval_str(rows, "ifeval.jsonl")
            .unwrap()
            .with_name("ifeval");
        let mut scored = 0;
        for split in Split::ALL {
            for seed in 0..12 {
                let Ok(task) = env.sample(seed, split, 0) else {
                    continue;
                };
                let reference = env.reference(&task).unwrap();
                assert!(
                    env.score(&task, &reference).unwrap().is_full(),
                    "{reference}"
                );
                scored += 1;
            }
        }
        assert!(scored > 0);
        let unsupported = r#"{"prompt": "p", "instruction_id_list": ["language:response_language", "punctuation:no_comma"], "kwargs": [{"language": "fr"}, {}]}"#;
        let err = InstructionFollowing::from_ifeval_str(unsupported, "x.jsonl")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("language:response_language") && err.contains("punctuation:no_comma"),
            "{err}"
        );
        let bad_args = r#"{"prompt": "p", "instruction_id_list": ["keywords:frequency"], "kwargs": [{"keyword": "x"}]}"#;
        let err = InstructionFollowing::from_ifeval_str(bad_args, "x.jsonl")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1") && err.contains("relation"), "{err}");
    }
}
