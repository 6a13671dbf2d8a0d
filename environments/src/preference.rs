//! Preference data and a generative reward model (GenRM): a judge that reads two responses,
//! may think, and ends with `[[score_1, score_2, ranking]]`, trained with a verifiable reward.
//!
//! # Preference rows
//!
//! Chorus ships no preference data; [`load_preferences`] reads the user's JSONL file, one row a
//! line, in either of two formats:
//!
//! ```text
//! {"prompt": "Name a prime.", "chosen": "7 is prime.", "rejected": "9 is prime."}
//! {"prompt": [{"role": "user", "content": "Hi"}], "response_1": "Hello!", "response_2": "What?",
//!  "scores": [4, 2], "ranking": 2}
//! ```
//!
//! `prompt` is a string (one user turn) or a list of chat messages. In the second format
//! `scores` are the helpfulness of response 1 and response 2, each 1 (unhelpful) to 5 (very
//! helpful), and `ranking` compares them: 1, 2, 3 = response 1 is much better, better, slightly
//! better; 4, 5, 6 = response 2 is slightly better, better, much better. Unknown keys, empty
//! responses and two identical responses are refused; every error names the file, the line, what
//! was wrong and what is allowed. [`PreferenceRow::split`] puts one prompt in
//! [`HELDOUT_ONE_IN`] into heldout by a hash of the prompt, so rows sharing a prompt share a
//! split and a heldout prompt is never trained on.
//!
//! Pairs also come from verifiable environments: [`pairs_from_environment`] takes a task's
//! reference as chosen and one of its [`Environment::wrong_completions`] as rejected, and
//! [`pair_with_failure`] pairs a reference with a failing completion the caller has (a policy
//! rollout the verifier rejected).
//!
//! # The judge and its reward
//!
//! [`genrm_prompt`] asks the judge to compare two responses; [`parse_judgement`] reads the last
//! `[[score_1, score_2, ranking]]` after the think block into a [`Judgement`]. A chosen/rejected
//! row has no scores of its own, so its ground truth is the most decided verdict:
//! `[[5, 1, 1]]` when the chosen response is shown first, `[[1, 5, 6]]` when it is shown second
//! ([`PreferenceRow::present`] draws the order from the seed, so a judge cannot learn a
//! position). A row with scores keeps them and its order as written.
//!
//! [`genrm_reward`] is Nemotron 3's GenRM reward: `-10` for a malformed judgement, else minus the
//! distance to the truth, `-|s1 - g1| - |s2 - g2| - |r - g_r|`. It is **signed**: 0 is a perfect
//! judgement and everything else is below it, so `Score::is_full` (reward 1.0) never holds for a
//! judgement. [`GenRm`] overrides [`Environment::is_solved`] (reward 0 = solved), which the
//! self-check uses; accuracy is best read from the `pair_correct` component (the judgement
//! prefers the same response as the truth), `format` (the judgement parsed) and `score_error`
//! (the distance, present only when it parsed).
//!
//! # Comparisons for RLHF
//!
//! With a trained judge, the N responses a policy gives to one prompt are compared in pairs
//! ([`comparison_pairs`]: a circle of N comparisons, or all N(N-1)/2 pairs) and each response's
//! reward is the mean of the scores the judgements gave it ([`aggregate_scores`]).

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::chat::{Message, Role, parse_completion};
use crate::env::{Category, EnvInfo, Environment, Turns};
use crate::error::EnvError;
use crate::sampling::{TaskOrigin, make_task, stable_hash, task_rng};
use crate::task::{Score, Split, Task};

/// One prompt in this many lands in heldout.
pub const HELDOUT_ONE_IN: u64 = 10;

/// What a malformed judgement costs: the reward is exactly minus this.
pub const MALFORMED_PENALTY: f64 = 10.0;

/// Helpfulness scores run from 1 to this.
pub const MAX_SCORE: u8 = 5;

/// Rankings run from 1 to this; 1 to 3 prefer the first response, 4 to 6 the second.
pub const MAX_RANKING: u8 = 6;

/// The reward [`aggregate_scores`] gives a response no judgement scored: the middle of the
/// helpfulness scale, so it neither gains nor loses against a typical response.
pub const UNJUDGED_SCORE: f64 = 3.0;

/// The name prefix of a [`GenRm`] environment (`genrm:<file stem>` for one read from a file).
pub const GENRM: &str = "genrm";

/// The keys a row may have, for errors.
const ALLOWED_KEYS: &str =
    "`prompt`, `chosen`, `rejected`, `response_1`, `response_2`, `scores`, `ranking`";
/// The keys of each format.
const CHOSEN_KEYS: [&str; 2] = ["chosen", "rejected"];
const RATED_KEYS: [&str; 4] = ["response_1", "response_2", "scores", "ranking"];
/// Separates the parts of a content key, so `("ab", "c")` and `("a", "bc")` hash differently.
const KEY_SEPARATOR: char = '\u{0}';
/// The RNG stream that decides which response of a chosen/rejected pair is shown first.
const ORDER_STREAM: &str = "genrm-order";
/// How much longer than `n` [`pairs_from_environment`] keeps sampling before giving up.
const PAIR_ATTEMPTS_PER_ROW: usize = 8;
const PAIR_ATTEMPTS_EXTRA: usize = 64;

/// Why preference data could not be read or a pair could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PreferenceError {
    /// The file could not be read.
    #[error("reading preference data {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A line is not a valid row.
    #[error("{source_name} line {line}: {message}")]
    Row {
        /// The file (or a label for in-memory text).
        source_name: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// The file has no rows at all.
    #[error(
        "{source_name} has no preference rows; allowed: one JSON object per line with `prompt` \
         and either `chosen`/`rejected` or `response_1`/`response_2`/`scores`/`ranking`"
    )]
    NoRows {
        /// The file (or a label for in-memory text).
        source_name: String,
    },
    /// A pair built in code (from an environment, or handed to [`GenRm::from_rows`]) is invalid.
    #[error("invalid preference pair: {0}")]
    InvalidPair(String),
}

impl From<PreferenceError> for EnvError {
    fn from(error: PreferenceError) -> Self {
        match error {
            PreferenceError::Io { path, source } => EnvError::Io { path, source },
            PreferenceError::Row {
                source_name,
                line,
                message,
            } => EnvError::DatasetRow {
                source_name,
                line,
                message,
            },
            other => EnvError::InvalidConfig {
                env: GENRM.to_string(),
                message: other.to_string(),
            },
        }
    }
}

/// A judge's verdict on two responses, or the ground truth it is measured against: the
/// helpfulness of each (1 to [`MAX_SCORE`]) and a ranking (1 to [`MAX_RANKING`]).
/// Always in range: [`Judgement::new`] and deserialising both check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawJudgement")]
pub struct Judgement {
    score_1: u8,
    score_2: u8,
    ranking: u8,
}

/// A [`Judgement`] before its ranges are checked.
#[derive(Deserialize)]
struct RawJudgement {
    score_1: u8,
    score_2: u8,
    ranking: u8,
}

impl TryFrom<RawJudgement> for Judgement {
    type Error = String;
    fn try_from(raw: RawJudgement) -> Result<Self, String> {
        Judgement::new(raw.score_1, raw.score_2, raw.ranking)
    }
}

impl Judgement {
    /// The ground truth of a chosen/rejected pair shown chosen first.
    pub const CHOSEN_FIRST: Judgement = Judgement {
        score_1: MAX_SCORE,
        score_2: 1,
        ranking: 1,
    };
    /// The ground truth of a chosen/rejected pair shown chosen second.
    pub const CHOSEN_SECOND: Judgement = Judgement {
        score_1: 1,
        score_2: MAX_SCORE,
        ranking: MAX_RANKING,
    };

    /// A judgement, if every part is in range.
    pub fn new(score_1: u8, score_2: u8, ranking: u8) -> Result<Self, String> {
        for (name, score) in [("score_1", score_1), ("score_2", score_2)] {
            if !(1..=MAX_SCORE).contains(&score) {
                return Err(format!("{name} is {score}; allowed: 1 to {MAX_SCORE}"));
            }
        }
        if !(1..=MAX_RANKING).contains(&ranking) {
            return Err(format!("ranking is {ranking}; allowed: 1 to {MAX_RANKING}"));
        }
        Ok(Self {
            score_1,
            score_2,
            ranking,
        })
    }

    /// Helpfulness of the first response shown.
    pub fn score_1(self) -> u8 {
        self.score_1
    }

    /// Helpfulness of the second response shown.
    pub fn score_2(self) -> u8 {
        self.score_2
    }

    /// The ranking: 1 = the first response is much better … 6 = the second is much better.
    pub fn ranking(self) -> u8 {
        self.ranking
    }

    /// Whether the verdict prefers the first response (ranking 1 to 3). The ranking always takes
    /// a side, so equal helpfulness scores still prefer one response.
    pub fn prefers_first(self) -> bool {
        self.ranking <= MAX_RANKING / 2
    }

    /// The same verdict about the responses in the other order.
    pub fn swapped(self) -> Self {
        Self {
            score_1: self.score_2,
            score_2: self.score_1,
            ranking: MAX_RANKING + 1 - self.ranking,
        }
    }

    /// `|s1 - t1| + |s2 - t2| + |r - t_r|`: how far this verdict is from `truth`.
    pub fn distance(self, truth: Judgement) -> u32 {
        let gap = |a: u8, b: u8| u32::from(a.abs_diff(b));
        gap(self.score_1, truth.score_1)
            + gap(self.score_2, truth.score_2)
            + gap(self.ranking, truth.ranking)
    }
}

impl fmt::Display for Judgement {
    /// The verdict as the judge writes it: `[[5, 1, 1]]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[[{}, {}, {}]]",
            self.score_1, self.score_2, self.ranking
        )
    }
}

/// What a row says about its two responses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Preference {
    /// One response is better; the order they are shown in is drawn from a seed.
    ChosenRejected {
        /// The better response.
        chosen: String,
        /// The worse response.
        rejected: String,
    },
    /// Both responses scored and ranked by an annotator; shown in this order.
    Rated {
        /// Shown first.
        response_1: String,
        /// Shown second.
        response_2: String,
        /// The annotator's scores and ranking.
        truth: Judgement,
    },
}

/// One row of preference data: a prompt and two responses to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreferenceRow {
    /// The conversation both responses answer.
    pub prompt: Vec<Message>,
    /// The responses and which is better.
    pub preference: Preference,
}

/// A row's two responses in the order a judge sees them, with the truth for that order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresentedPair {
    /// Shown first (response 1).
    pub first: String,
    /// Shown second (response 2).
    pub second: String,
    /// The verdict a perfect judge gives in this order.
    pub truth: Judgement,
    /// For a chosen/rejected row, whether the chosen response is shown first; `None` for a
    /// rated row, which keeps its written order.
    pub chosen_first: Option<bool>,
}

impl PreferenceRow {
    /// A chosen/rejected row, checked like a line of a file.
    pub fn chosen_rejected(
        prompt: Vec<Message>,
        chosen: impl Into<String>,
        rejected: impl Into<String>,
    ) -> Result<Self, PreferenceError> {
        let row = Self {
            prompt,
            preference: Preference::ChosenRejected {
                chosen: chosen.into(),
                rejected: rejected.into(),
            },
        };
        row.validate().map_err(PreferenceError::InvalidPair)?;
        Ok(row)
    }

    /// Why the row is unusable (empty prompt or response, identical responses), if it is.
    pub fn validate(&self) -> Result<(), String> {
        if self.prompt.iter().all(|m| m.content.trim().is_empty()) {
            return Err(
                "`prompt` is empty; allowed: a non-empty string or list of messages".into(),
            );
        }
        let ((name_a, a), (name_b, b)) = self.responses();
        for (name, text) in [(name_a, a), (name_b, b)] {
            if text.trim().is_empty() {
                return Err(format!("`{name}` is empty; allowed: a non-empty string"));
            }
        }
        if a.trim() == b.trim() {
            return Err(format!(
                "`{name_a}` and `{name_b}` are the same text; allowed: two different responses"
            ));
        }
        Ok(())
    }

    /// The two responses with their key names, in written order.
    fn responses(&self) -> ((&'static str, &str), (&'static str, &str)) {
        match &self.preference {
            Preference::ChosenRejected { chosen, rejected } => {
                (("chosen", chosen), ("rejected", rejected))
            }
            Preference::Rated {
                response_1,
                response_2,
                ..
            } => (("response_1", response_1), ("response_2", response_2)),
        }
    }

    /// The prompt as one string, for hashing.
    fn prompt_key(&self) -> String {
        let mut key = String::new();
        for message in &self.prompt {
            key.push_str(message.role.as_str());
            key.push(KEY_SEPARATOR);
            key.push_str(&message.content);
            key.push(KEY_SEPARATOR);
        }
        key
    }

    /// The split this row belongs to: a hash of its prompt, one prompt in [`HELDOUT_ONE_IN`]
    /// heldout. Rows that share a prompt share a split, so a judge is never evaluated on a prompt
    /// it was trained on; the rule reads nothing but the row, so a row lands in the same split
    /// in every file.
    pub fn split(&self) -> Split {
        let hash =
            stable_hash(format!("preference{KEY_SEPARATOR}{}", self.prompt_key()).as_bytes());
        // Fold the high bits in: FNV's low bits are weak for short, similar keys.
        if (hash ^ (hash >> 29) ^ (hash >> 47)).is_multiple_of(HELDOUT_ONE_IN) {
            Split::Heldout
        } else {
            Split::Train
        }
    }

    /// The responses in the order a judge sees them for `seed`, with the truth for that order.
    /// A chosen/rejected row is shown chosen first for about half the seeds (a coin drawn from
    /// the seed and the row's content, so different rows under one seed get independent orders);
    /// a rated row keeps its written order and truth.
    pub fn present(&self, seed: u64) -> PresentedPair {
        match &self.preference {
            Preference::ChosenRejected { chosen, rejected } => {
                let content = format!(
                    "{}{KEY_SEPARATOR}{chosen}{KEY_SEPARATOR}{rejected}",
                    self.prompt_key()
                );
                let mut rng = task_rng(ORDER_STREAM, seed ^ stable_hash(content.as_bytes()), 0);
                if rng.random_bool(0.5) {
                    PresentedPair {
                        first: chosen.clone(),
                        second: rejected.clone(),
                        truth: Judgement::CHOSEN_FIRST,
                        chosen_first: Some(true),
                    }
                } else {
                    PresentedPair {
                        first: rejected.clone(),
                        second: chosen.clone(),
                        truth: Judgement::CHOSEN_SECOND,
                        chosen_first: Some(false),
                    }
                }
            }
            Preference::Rated {
                response_1,
                response_2,
                truth,
            } => PresentedPair {
                first: response_1.clone(),
                second: response_2.clone(),
                truth: *truth,
                chosen_first: None,
            },
        }
    }

    /// The row as a line of the file format [`load_preferences`] reads (the prompt as a string
    /// when it is one user turn), so pairs made in code can be saved and read back.
    pub fn to_json(&self) -> Value {
        let prompt = match self.prompt.as_slice() {
            [only] if only.role == Role::User => Value::String(only.content.clone()),
            messages => serde_json::to_value(messages).unwrap_or(Value::Null),
        };
        let mut row = Map::new();
        row.insert("prompt".into(), prompt);
        match &self.preference {
            Preference::ChosenRejected { chosen, rejected } => {
                row.insert("chosen".into(), chosen.clone().into());
                row.insert("rejected".into(), rejected.clone().into());
            }
            Preference::Rated {
                response_1,
                response_2,
                truth,
            } => {
                row.insert("response_1".into(), response_1.clone().into());
                row.insert("response_2".into(), response_2.clone().into());
                row.insert(
                    "scores".into(),
                    serde_json::json!([truth.score_1, truth.score_2]),
                );
                row.insert("ranking".into(), truth.ranking.into());
            }
        }
        Value::Object(row)
    }
}

/// A JSON value as an error shows it: compact, and cut short when long.
fn shown(value: &Value) -> String {
    const MAX_CHARS: usize = 60;
    let text = value.to_string();
    if text.chars().count() <= MAX_CHARS {
        text
    } else {
        let cut: String = text.chars().take(MAX_CHARS).collect();
        format!("{cut}…")
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn parse_prompt(value: &Value) -> Result<Vec<Message>, String> {
    const ALLOWED: &str = "allowed: a string or a list of {\"role\", \"content\"} messages \
                           (role system, user, assistant or tool)";
    let messages = match value {
        Value::String(text) => vec![Message::user(text.clone())],
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(index, item)| {
                serde_json::from_value::<Message>(item.clone()).map_err(|err| {
                    format!(
                        "`prompt` message {} is {} ({err}); {ALLOWED}",
                        index + 1,
                        shown(item)
                    )
                })
            })
            .collect::<Result<_, _>>()?,
        other => return Err(format!("`prompt` is {}; {ALLOWED}", shown(other))),
    };
    Ok(messages)
}

fn parse_text(row: &Map<String, Value>, key: &str, needed_by: &str) -> Result<String, String> {
    match row.get(key) {
        Some(Value::String(text)) => Ok(text.clone()),
        Some(other) => Err(format!("`{key}` is {}; allowed: a string", shown(other))),
        None => Err(format!("missing `{key}`; {needed_by}")),
    }
}

fn parse_scores(value: &Value) -> Result<(u8, u8), String> {
    let allowed = format!("allowed: a list of two integers from 1 to {MAX_SCORE}");
    let in_range = |v: &Value| {
        v.as_u64()
            .filter(|s| (1..=u64::from(MAX_SCORE)).contains(s))
            .map(|s| s as u8)
    };
    match value.as_array().map(Vec::as_slice) {
        Some([a, b]) => match (in_range(a), in_range(b)) {
            (Some(a), Some(b)) => Ok((a, b)),
            _ => Err(format!("`scores` is {}; {allowed}", shown(value))),
        },
        _ => Err(format!("`scores` is {}; {allowed}", shown(value))),
    }
}

fn parse_ranking(value: &Value) -> Result<u8, String> {
    match value.as_u64() {
        Some(r) if (1..=u64::from(MAX_RANKING)).contains(&r) => Ok(r as u8),
        Some(_) => Err(format!(
            "`ranking` is {}; allowed: 1 to {MAX_RANKING}",
            shown(value)
        )),
        None => Err(format!(
            "`ranking` is {}; allowed: an integer from 1 to {MAX_RANKING}",
            shown(value)
        )),
    }
}

/// Reads one line's JSON into a row, or says what is wrong and what is allowed.
fn parse_row(value: &Value) -> Result<PreferenceRow, String> {
    let Value::Object(row) = value else {
        return Err(format!(
            "{}, not an object; allowed: one JSON object per line with {ALLOWED_KEYS}",
            json_kind(value)
        ));
    };
    if let Some(unknown) = row.keys().find(|key| {
        *key != "prompt"
            && !CHOSEN_KEYS.contains(&key.as_str())
            && !RATED_KEYS.contains(&key.as_str())
    }) {
        return Err(format!("unknown key `{unknown}`; allowed: {ALLOWED_KEYS}"));
    }
    let has_chosen = CHOSEN_KEYS.iter().any(|k| row.contains_key(*k));
    let has_rated = RATED_KEYS.iter().any(|k| row.contains_key(*k));
    let prompt = match row.get("prompt") {
        Some(value) => parse_prompt(value)?,
        None => return Err("missing `prompt`; every row needs one".into()),
    };
    let preference = match (has_chosen, has_rated) {
        (true, true) => {
            return Err(
                "mixes `chosen`/`rejected` with `response_1`/`response_2`/`scores`/`ranking`; \
                 allowed: one format per line"
                    .into(),
            );
        }
        (false, false) => {
            return Err(
                "no responses; allowed: `chosen` and `rejected`, or `response_1`, \
                        `response_2`, `scores` and `ranking`"
                    .into(),
            );
        }
        (true, false) => {
            let needed = "a chosen/rejected row needs `prompt`, `chosen` and `rejected`";
            Preference::ChosenRejected {
                chosen: parse_text(row, "chosen", needed)?,
                rejected: parse_text(row, "rejected", needed)?,
            }
        }
        (false, true) => {
            let needed = "a rated row needs `prompt`, `response_1`, `response_2`, `scores` and \
                          `ranking`";
            let response_1 = parse_text(row, "response_1", needed)?;
            let response_2 = parse_text(row, "response_2", needed)?;
            let scores = row
                .get("scores")
                .ok_or_else(|| format!("missing `scores`; {needed}"))?;
            let ranking = row
                .get("ranking")
                .ok_or_else(|| format!("missing `ranking`; {needed}"))?;
            let (score_1, score_2) = parse_scores(scores)?;
            let ranking = parse_ranking(ranking)?;
            Preference::Rated {
                response_1,
                response_2,
                truth: Judgement::new(score_1, score_2, ranking)?,
            }
        }
    };
    let row = PreferenceRow { prompt, preference };
    row.validate()?;
    Ok(row)
}

/// Reads preference rows from JSONL text (see the [module docs](self) for the formats); blank
/// lines are skipped and `source_name` labels errors. The first bad line is the error.
pub fn parse_preferences(
    text: &str,
    source_name: &str,
) -> Result<Vec<PreferenceRow>, PreferenceError> {
    let mut rows = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row_error = |message: String| PreferenceError::Row {
            source_name: source_name.to_string(),
            line: index + 1,
            message,
        };
        let value: Value = serde_json::from_str(line).map_err(|err| {
            row_error(format!(
                "not JSON ({err}); allowed: one JSON object per line"
            ))
        })?;
        rows.push(parse_row(&value).map_err(row_error)?);
    }
    if rows.is_empty() {
        return Err(PreferenceError::NoRows {
            source_name: source_name.to_string(),
        });
    }
    Ok(rows)
}

/// Reads the preference rows of a JSONL file (see the [module docs](self) for the formats).
pub fn load_preferences(path: impl AsRef<Path>) -> Result<Vec<PreferenceRow>, PreferenceError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|source| PreferenceError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_preferences(&text, &path.display().to_string())
}

/// A row pairing a task's `reference` completion (chosen) with a `failing` one (rejected), for
/// a failure the caller has, such as a policy rollout the verifier rejected. Only the responses
/// go into the row (the text after any think block): the judge compares what a user would see.
pub fn pair_with_failure(
    task: &Task,
    reference: &str,
    failing: &str,
) -> Result<PreferenceRow, PreferenceError> {
    let chosen = parse_completion(reference).response;
    let rejected = parse_completion(failing).response;
    PreferenceRow::chosen_rejected(task.prompt.clone(), chosen, rejected)
        .map_err(|err| PreferenceError::InvalidPair(format!("task {}: {err}", task.id)))
}

/// `n` chosen/rejected rows from a verifiable single-turn environment: for tasks sampled from
/// `seed`, `seed + 1`, … in `split` at `difficulty`, the task's prompt, its reference as chosen
/// and one of its [`Environment::wrong_completions`] (picked by the seed) as rejected; see
/// [`pairs_from_environment_with_tasks`] for the rules.
pub fn pairs_from_environment(
    env: &dyn Environment,
    split: Split,
    difficulty: u32,
    seed: u64,
    n: usize,
) -> Result<Vec<PreferenceRow>, EnvError> {
    Ok(
        pairs_from_environment_with_tasks(env, split, difficulty, seed, n)?
            .into_iter()
            .map(|(_, row)| row)
            .collect(),
    )
}

/// [`pairs_from_environment`], with the task each row came from. The rules:
///
/// - Only the responses go into a row (the text after any think block), and both are scored
///   again as they stand: the chosen one must solve the task ([`Environment::is_solved`]; an
///   environment whose reference does not is an error) and the rejected one must not.
/// - A task with no wrong completion left after that (none at all, only empty responses, or
///   only ones that match the reference) is skipped, as is a task whose prompt an earlier row
///   already has.
/// - Sampling stops after `8n + 64` tasks; finding fewer than `n` rows by then is an error
///   naming how many were found, since a smaller set than asked for is rarely what a caller
///   wants (raise the difficulty for a bigger task space).
/// - Multi-turn environments are refused: their reference is only a first action.
pub fn pairs_from_environment_with_tasks(
    env: &dyn Environment,
    split: Split,
    difficulty: u32,
    seed: u64,
    n: usize,
) -> Result<Vec<(Task, PreferenceRow)>, EnvError> {
    collect_pairs(env, split, difficulty, seed, n, n)
}

/// Like [`pairs_from_environment`], but content with fewer than `n` rows when the environment's
/// task space at `difficulty` has fewer distinct prompts (an error only when it gives none): for
/// a reward model that takes what an environment can give.
pub fn pairs_from_environment_up_to(
    env: &dyn Environment,
    split: Split,
    difficulty: u32,
    seed: u64,
    n: usize,
) -> Result<Vec<PreferenceRow>, EnvError> {
    Ok(collect_pairs(env, split, difficulty, seed, n, n.min(1))?
        .into_iter()
        .map(|(_, row)| row)
        .collect())
}

/// Up to `n` rows, an error when fewer than `required` are found.
fn collect_pairs(
    env: &dyn Environment,
    split: Split,
    difficulty: u32,
    seed: u64,
    n: usize,
    required: usize,
) -> Result<Vec<(Task, PreferenceRow)>, EnvError> {
    let info = env.info();
    if info.turns == Turns::Multi {
        return Err(EnvError::InvalidConfig {
            env: info.name,
            message: "preference pairs come from single-turn environments only; a multi-turn \
                      reference is one action, not a whole answer"
                .into(),
        });
    }
    let attempts = n
        .saturating_mul(PAIR_ATTEMPTS_PER_ROW)
        .saturating_add(PAIR_ATTEMPTS_EXTRA);
    let mut rows = Vec::with_capacity(n);
    let mut seen_prompts = BTreeSet::new();
    let mut without_wrong = 0usize;
    for offset in 0..attempts as u64 {
        if rows.len() == n {
            break;
        }
        let task_seed = seed.wrapping_add(offset);
        let task = env.sample(task_seed, split, difficulty)?;
        if !seen_prompts.insert(task.prompt_text()) {
            continue;
        }
        let chosen = parse_completion(&env.reference(&task)?).response;
        let chosen_score = env.score(&task, &chosen)?;
        if !env.is_solved(&chosen_score) {
            return Err(EnvError::NoReference {
                env: info.name,
                task_id: task.id,
                reason: format!(
                    "its reference's response {chosen:?} scores {} ({}), not solved",
                    chosen_score.reward, chosen_score.reason
                ),
            });
        }
        let wrong = env.wrong_completions(&task)?;
        // Start at a seeded position so a large set uses every kind of wrong completion.
        let start = if wrong.is_empty() {
            0
        } else {
            task_rng(ORDER_STREAM, task_seed, difficulty).random_range(0..wrong.len())
        };
        let mut rejected = None;
        for k in 0..wrong.len() {
            let candidate = parse_completion(&wrong[(start + k) % wrong.len()]).response;
            if candidate.is_empty() || candidate == chosen {
                continue;
            }
            if !env.is_solved(&env.score(&task, &candidate)?) {
                rejected = Some(candidate);
                break;
            }
        }
        let Some(rejected) = rejected else {
            without_wrong += 1;
            continue;
        };
        let row = PreferenceRow::chosen_rejected(task.prompt.clone(), chosen, rejected)?;
        rows.push((task, row));
    }
    if rows.len() < required {
        return Err(EnvError::InvalidConfig {
            env: info.name,
            message: format!(
                "found {} of the {n} preference pairs asked for in {attempts} {split} tasks at \
                 difficulty {difficulty} ({without_wrong} had no usable wrong completion, the \
                 rest repeated a prompt); ask for fewer or use a higher difficulty",
                rows.len()
            ),
        });
    }
    Ok(rows)
}

/// The conversation as the judge reads it: a lone user turn as plain text, anything longer as
/// `role: content` lines. No template markers, which would end the judge's own turn.
fn render_context(prompt: &[Message]) -> (&'static str, String) {
    match prompt {
        [only] if only.role == Role::User => ("prompt", only.content.clone()),
        messages => {
            let lines: Vec<String> = messages
                .iter()
                .map(|m| format!("{}: {}", m.role.as_str(), m.content))
                .collect();
            ("conversation", lines.join("\n"))
        }
    }
}

/// The judge's conversation: the row's prompt, the two responses (give responses without their
/// think blocks), and the instructions to rate each, rank the pair and end with
/// `[[score_1, score_2, ranking]]`. The judge may think first; [`parse_judgement`] reads only
/// what follows the think block.
pub fn genrm_prompt(row_prompt: &[Message], response_a: &str, response_b: &str) -> Vec<Message> {
    let (what, context) = render_context(row_prompt);
    let heading = if what == "prompt" {
        "Prompt"
    } else {
        "Conversation"
    };
    vec![Message::user(format!(
        "{heading}:\n{context}\n\nResponse 1:\n{response_a}\n\nResponse 2:\n{response_b}\n\n\
         Compare the two responses to the {what}. You may think first. Rate how helpful each \
         response is from 1 (not helpful) to {MAX_SCORE} (very helpful), then rank them from 1 \
         to {MAX_RANKING}: 1, 2, 3 = response 1 is much better, better, slightly better; 4, 5, 6 \
         = response 2 is slightly better, better, much better. End with [[score_1, score_2, \
         ranking]]."
    ))]
}

/// Reads a judge's completion: the last `[[a, b, c]]` in the response after the think block
/// (text after the first end-of-turn marker is ignored), with `a` and `b` integers 1 to 5 and
/// `c` an integer 1 to 6. Earlier brackets, and any inside the think block, are not read; a
/// last bracket that is not three such integers is malformed rather than passed over, so a
/// judge cannot hedge with several verdicts. The error says why.
pub fn parse_judgement(completion: &str) -> Result<Judgement, String> {
    let parsed = parse_completion(completion);
    if parsed.unterminated_think {
        return Err("the <think> block is never closed, so there is no verdict".into());
    }
    let response = parsed.response;
    let close = response
        .rfind("]]")
        .ok_or("no [[score_1, score_2, ranking]] verdict after the thinking")?;
    let open = response[..close]
        .rfind("[[")
        .ok_or("the last `]]` has no `[[` before it")?;
    let inner = &response[open + 2..close];
    let parts: Vec<&str> = inner.split(',').map(str::trim).collect();
    let [a, b, c] = parts.as_slice() else {
        return Err(format!(
            "the verdict [[{inner}]] has {} parts; allowed: three, [[score_1, score_2, ranking]]",
            parts.len()
        ));
    };
    let integer = |text: &str, name: &str, max: u8| -> Result<u8, String> {
        match text.parse::<i64>() {
            Ok(value) if (1..=i64::from(max)).contains(&value) => Ok(value as u8),
            Ok(value) => Err(format!("{name} is {value}; allowed: 1 to {max}")),
            Err(_) => Err(format!(
                "{name} is {text:?}; allowed: an integer from 1 to {max}"
            )),
        }
    };
    Judgement::new(
        integer(a, "score_1", MAX_SCORE)?,
        integer(b, "score_2", MAX_SCORE)?,
        integer(c, "ranking", MAX_RANKING)?,
    )
}

/// Nemotron 3's GenRM reward for a judge's `completion` against `truth`:
///
/// - malformed (see [`parse_judgement`]): exactly `-MALFORMED_PENALTY` (-10); there are no
///   scores to compare, so no other term applies;
/// - otherwise `-(|s1 - g1| + |s2 - g2| + |r - g_r|)`, from 0 (perfect) down to -13.
///
/// The reward is signed and 0 is the best, so `Score::is_full` never holds; a maximally wrong
/// verdict (-13) is below a malformed one, as in the original formula. Components: `format` (1
/// when the verdict parsed), `pair_correct` (1 when it prefers the same response as the truth —
/// ranking ≤ 3 exactly when the truth's is; the ranking always takes a side, so equal truth
/// scores need no other rule; 0 when malformed) and `score_error` (the distance; absent when
/// malformed, so its mean is over verdicts that parsed).
pub fn genrm_reward(completion: &str, truth: Judgement) -> Score {
    match parse_judgement(completion) {
        Err(reason) => Score {
            reward: -MALFORMED_PENALTY,
            components: Vec::new(),
            reason: format!("malformed judgement: {reason}"),
        }
        .with_component("format", 0.0)
        .with_component("pair_correct", 0.0),
        Ok(judgement) => {
            let error = judgement.distance(truth);
            let pair_correct = judgement.prefers_first() == truth.prefers_first();
            let reason = if error == 0 {
                format!("{judgement} matches the truth")
            } else {
                format!(
                    "{judgement} is {error} from the truth {truth}; {} the better response",
                    if pair_correct { "picks" } else { "misses" }
                )
            };
            Score {
                reward: -f64::from(error),
                components: Vec::new(),
                reason,
            }
            .with_component("format", 1.0)
            .with_component("pair_correct", if pair_correct { 1.0 } else { 0.0 })
            .with_component("score_error", f64::from(error))
        }
    }
}

/// Which pairs of a prompt's N responses a judge compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Comparisons {
    /// Each response against the next, round a circle: N comparisons, every response shown
    /// once first and once second.
    Circular,
    /// Every pair once, the lower index first: N(N-1)/2 comparisons.
    AllPairs,
}

/// The `(i, j)` pairs to judge among `n` responses, response `i` shown first. Circular:
/// `(i, (i + 1) % n)` for every `i`, so for two responses both orders, `(0, 1)` and `(1, 0)`;
/// all pairs: every `i < j` in order. Fewer than two responses have nothing to compare: empty.
pub fn comparison_pairs(n: usize, comparisons: Comparisons) -> Vec<(usize, usize)> {
    if n < 2 {
        return Vec::new();
    }
    match comparisons {
        Comparisons::Circular => (0..n).map(|i| (i, (i + 1) % n)).collect(),
        Comparisons::AllPairs => (0..n)
            .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
            .collect(),
    }
}

/// Each of `n` responses' reward from judgements of pairs `(i, j, judgement)` (response `i`
/// shown first). The rule:
///
/// - a judgement gives response `i` its `score_1` and response `j` its `score_2`;
/// - when `score_1 == score_2` the ranking breaks the tie: `3.5 - ranking` is added to `i`'s
///   score and subtracted from `j`'s (ranking 1 gives `i` +2.5 and `j` -2.5; ranking 6 the
///   reverse), so a tied score can leave the 1 to 5 range;
/// - a response's reward is the mean of the scores it received; one with none gets
///   [`UNJUDGED_SCORE`] (3.0). Malformed judgements are the caller's to drop before this.
///
/// Judgements naming a response `>= n` are ignored.
pub fn aggregate_scores(n: usize, judgements: &[(usize, usize, Judgement)]) -> Vec<f64> {
    let mut sums = vec![0.0; n];
    let mut counts = vec![0usize; n];
    let midpoint = f64::from(MAX_RANKING + 1) / 2.0;
    for &(i, j, judgement) in judgements {
        if i >= n || j >= n {
            continue;
        }
        let (mut first, mut second) = (f64::from(judgement.score_1), f64::from(judgement.score_2));
        if judgement.score_1 == judgement.score_2 {
            let lean = midpoint - f64::from(judgement.ranking);
            first += lean;
            second -= lean;
        }
        sums[i] += first;
        counts[i] += 1;
        sums[j] += second;
        counts[j] += 1;
    }
    sums.iter()
        .zip(&counts)
        .map(|(&sum, &count)| {
            if count == 0 {
                UNJUDGED_SCORE
            } else {
                sum / count as f64
            }
        })
        .collect()
}

/// The verification data of a [`GenRm`] task.
#[derive(Debug, Serialize, Deserialize)]
struct Verification {
    /// The verdict a perfect judge gives for the order shown.
    truth: Judgement,
    /// Whether the chosen response is shown first (`None` for a rated row).
    chosen_first: Option<bool>,
}

/// A generative reward model environment: each task shows a judge one preference row's two
/// responses ([`genrm_prompt`]) and scores its verdict with [`genrm_reward`].
///
/// Rows carry no difficulty, so every level draws from the whole split. The reference is the
/// truth's verdict (`[[5, 1, 1]]`…), for SFT warm-up and the self-check. Not in the built-in
/// registry: it needs the user's data.
#[derive(Debug, Clone)]
pub struct GenRm {
    name: String,
    rows: Vec<PreferenceRow>,
    /// Indices into `rows` of each split.
    train: Vec<usize>,
    heldout: Vec<usize>,
}

impl GenRm {
    /// An environment named `name` over `rows`; each row is checked as a line of a file would be.
    pub fn from_rows(
        name: impl Into<String>,
        rows: Vec<PreferenceRow>,
    ) -> Result<Self, PreferenceError> {
        let name = name.into();
        if rows.is_empty() {
            return Err(PreferenceError::NoRows { source_name: name });
        }
        for (index, row) in rows.iter().enumerate() {
            row.validate()
                .map_err(|err| PreferenceError::InvalidPair(format!("row {index}: {err}")))?;
        }
        let (train, heldout): (Vec<usize>, Vec<usize>) =
            (0..rows.len()).partition(|&i| rows[i].split() == Split::Train);
        Ok(Self {
            name,
            rows,
            train,
            heldout,
        })
    }

    /// The rows of a JSONL file ([`load_preferences`]), named `genrm:<file stem>`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, PreferenceError> {
        let path = path.as_ref();
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Self::from_rows(format!("{GENRM}:{stem}"), load_preferences(path)?)
    }

    /// Every row, in file order.
    pub fn rows(&self) -> &[PreferenceRow] {
        &self.rows
    }

    /// How many rows each split has: (train, heldout).
    pub fn split_sizes(&self) -> (usize, usize) {
        (self.train.len(), self.heldout.len())
    }

    fn verification(task: &Task) -> Result<Verification, EnvError> {
        task.verification_as()
    }
}

impl Environment for GenRm {
    fn info(&self) -> EnvInfo {
        EnvInfo {
            name: self.name.clone(),
            category: Category::Rlhf,
            turns: Turns::Single,
            max_turns: 1,
            default_weight: 1.0,
            max_difficulty: 0,
            description: "Judge two responses to a prompt: [[score_1, score_2, ranking]], reward \
                          minus the distance to the truth (0 is perfect, -10 malformed)"
                .into(),
        }
    }

    fn sample(&self, seed: u64, split: Split, difficulty: u32) -> Result<Task, EnvError> {
        let in_split = match split {
            Split::Train => &self.train,
            Split::Heldout => &self.heldout,
        };
        if in_split.is_empty() {
            return Err(EnvError::SplitExhausted {
                env: self.name.clone(),
                split,
                difficulty,
                seed,
                attempts: self.rows.len(),
            });
        }
        let pick = task_rng(&self.name, seed, 0).random_range(0..in_split.len());
        let row = &self.rows[in_split[pick]];
        let shown = row.present(seed);
        let prompt = genrm_prompt(&row.prompt, &shown.first, &shown.second);
        // The shown order is part of the content: the same row in the other order is another task.
        let key = crate::chat::render_conversation(&prompt);
        let origin = TaskOrigin {
            env: &self.name,
            seed,
            split,
            difficulty,
        };
        make_task(
            origin,
            &key,
            prompt,
            &Verification {
                truth: shown.truth,
                chosen_first: shown.chosen_first,
            },
        )
    }

    fn score(&self, task: &Task, completion: &str) -> Result<Score, EnvError> {
        self.check_task(task)?;
        Ok(genrm_reward(completion, Self::verification(task)?.truth))
    }

    fn reference(&self, task: &Task) -> Result<String, EnvError> {
        self.check_task(task)?;
        Ok(Self::verification(task)?.truth.to_string())
    }

    fn wrong_completions(&self, task: &Task) -> Result<Vec<String>, EnvError> {
        self.check_task(task)?;
        let truth = Self::verification(task)?.truth;
        // One step off in the ranking, staying in range (and on the same side unless it is 3/4).
        let near_ranking = if truth.ranking == 1 {
            2
        } else {
            truth.ranking - 1
        };
        let near = Judgement::new(truth.score_1, truth.score_2, near_ranking)
            .map_err(|err| task.invalid_verification(err))?;
        Ok(vec![
            // Malformed: two numbers only.
            format!("[[{}, {}]]", truth.score_1, truth.score_2),
            // Malformed: a score out of range.
            format!(
                "[[{}, {}, {}]]",
                MAX_SCORE + 1,
                truth.score_2,
                truth.ranking
            ),
            // The verdict inside the thinking only.
            format!("<think>{truth}</think>"),
            // Well formed, the pair ranked the wrong way round.
            truth.swapped().to_string(),
            near.to_string(),
        ])
    }

    fn is_solved(&self, score: &Score) -> bool {
        // Perfect is a distance of 0: the reward is minus a whole number, so compare loosely.
        score.reward >= -1e-9
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin::Arithmetic;
    use crate::check::{CheckOptions, check_environment};

    /// `count` chosen/rejected rows with distinct prompts, as JSONL lines.
    fn chosen_rejected_lines(count: usize) -> Vec<String> {
        (0..count)
            .map(|i| {
                serde_json::json!({
                    "prompt": format!("What is {i} plus one?"),
                    "chosen": format!("{} is {i} plus one.", i + 1),
                    "rejected": format!("It is {}.", i + 7),
                })
                .to_string()
            })
            .collect()
    }

    fn line_error(text: &str) -> (usize, String) {
        match parse_preferences(text, "prefs.jsonl").unwrap_err() {
            PreferenceError::Row { line, message, .. } => (line, message),
            other => panic!("not a row error: {other}"),
        }
    }

    #[test]
    fn both_formats_parse_and_round_trip() {
        let text = r#"{"prompt": "Name a prime.", "chosen": "7 is prime.", "rejected": "9 is prime."}

{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "response_1": "Hello!", "response_2": "What do you want?", "scores": [4, 2], "ranking": 2}
"#;
        let rows = parse_preferences(text, "prefs.jsonl").unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].prompt, vec![Message::user("Name a prime.")]);
        assert_eq!(
            rows[0].preference,
            Preference::ChosenRejected {
                chosen: "7 is prime.".into(),
                rejected: "9 is prime.".into()
            }
        );
        assert_eq!(rows[1].prompt[0], Message::system("Be brief."));
        assert_eq!(
            rows[1].preference,
            Preference::Rated {
                response_1: "Hello!".into(),
                response_2: "What do you want?".into(),
                truth: Judgement::new(4, 2, 2).unwrap(),
            }
        );
        // A rated row keeps its order and truth whatever the seed.
        for seed in 0..5 {
            let shown = rows[1].present(seed);
            assert_eq!(shown.first, "Hello!");
            assert_eq!(shown.truth.to_string(), "[[4, 2, 2]]");
            assert_eq!(shown.chosen_first, None);
        }
        let written: Vec<String> = rows.iter().map(|r| r.to_json().to_string()).collect();
        assert_eq!(
            parse_preferences(&written.join("\n"), "again").unwrap(),
            rows
        );
    }

    #[test]
    fn each_bad_line_names_its_line_and_what_is_allowed() {
        let good = &chosen_rejected_lines(1)[0];
        let cases: [(&str, &str); 16] = [
            ("not json", "not JSON"),
            ("[1, 2]", "a list, not an object"),
            (
                r#"{"prompt": "p", "chosen": "a", "rejected": "b", "id": 3}"#,
                "unknown key `id`; allowed: `prompt`",
            ),
            (r#"{"chosen": "a", "rejected": "b"}"#, "missing `prompt`"),
            (
                r#"{"prompt": 5, "chosen": "a", "rejected": "b"}"#,
                "`prompt` is 5; allowed: a string or a list",
            ),
            (
                r#"{"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}"#,
                "`prompt` message 1",
            ),
            (
                r#"{"prompt": " ", "chosen": "a", "rejected": "b"}"#,
                "`prompt` is empty",
            ),
            (r#"{"prompt": "p", "chosen": "a"}"#, "missing `rejected`"),
            (
                r#"{"prompt": "p", "chosen": "  ", "rejected": "b"}"#,
                "`chosen` is empty; allowed: a non-empty string",
            ),
            (
                r#"{"prompt": "p", "chosen": "same", "rejected": "same"}"#,
                "the same text",
            ),
            (
                r#"{"prompt": "p", "chosen": 1, "rejected": "b"}"#,
                "`chosen` is 1; allowed: a string",
            ),
            (
                r#"{"prompt": "p", "chosen": "a", "response_2": "b"}"#,
                "mixes",
            ),
            (r#"{"prompt": "p"}"#, "no responses"),
            (
                r#"{"prompt": "p", "response_1": "a", "response_2": "b", "scores": [1, 6], "ranking": 1}"#,
                "`scores` is [1,6]; allowed: a list of two integers from 1 to 5",
            ),
            (
                r#"{"prompt": "p", "response_1": "a", "response_2": "b", "scores": [1, 2], "ranking": 9}"#,
                "`ranking` is 9; allowed: 1 to 6",
            ),
            (
                r#"{"prompt": "p", "response_1": "a", "response_2": "b", "scores": [1, 2], "ranking": 2.5}"#,
                "`ranking` is 2.5; allowed: an integer from 1 to 6",
            ),
        ];
        for (bad, wanted) in cases {
            // Two good lines and a blank one first, so the bad row is line 4.
            let text = format!("{good}\n\n{good}\n{bad}\n{good}\n");
            let (line, message) = line_error(&text);
            assert_eq!(line, 4, "{bad}: {message}");
            assert!(message.contains(wanted), "{bad}: {message}");
        }
        let missing = r#"{"prompt": "p", "response_1": "a", "response_2": "b", "scores": [1, 2]}"#;
        assert!(line_error(missing).1.contains("missing `ranking`"));
        let full = parse_preferences(&format!("{good}\n{{}}"), "prefs.jsonl")
            .unwrap_err()
            .to_string();
        assert!(
            full.starts_with("prefs.jsonl line 2: missing `prompt`"),
            "{full}"
        );
        assert!(matches!(
            parse_preferences("\n \n", "empty.jsonl"),
            Err(PreferenceError::NoRows { .. })
        ));
    }

    #[test]
    fn files_are_read_and_errors_name_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("helpful.jsonl");
        std::fs::write(&path, chosen_rejected_lines(3).join("\n")).unwrap();
        assert_eq!(load_preferences(&path).unwrap().len(), 3);
        let env = GenRm::from_file(&path).unwrap();
        assert_eq!(env.info().name, "genrm:helpful");
        let bad = dir.path().join("bad.jsonl");
        std::fs::write(&bad, r#"{"prompt": "p", "response_1": "a", "response_2": "b", "scores": [1, 2], "ranking": 7}"#).unwrap();
        let err = load_preferences(&bad).unwrap_err().to_string();
        assert!(
            err.contains("bad.jsonl line 1: `ranking` is 7; allowed: 1 to 6"),
            "{err}"
        );
        let missing = load_preferences(dir.path().join("nope.jsonl")).unwrap_err();
        assert!(matches!(missing, PreferenceError::Io { .. }), "{missing}");
        // Converted for callers that speak `EnvError`, the line survives.
        let env_error = EnvError::from(load_preferences(&bad).unwrap_err());
        assert!(matches!(env_error, EnvError::DatasetRow { line: 1, .. }));
    }

    #[test]
    fn the_split_is_deterministic_disjoint_and_about_one_in_ten() {
        let rows = parse_preferences(&chosen_rejected_lines(2_000).join("\n"), "x").unwrap();
        let heldout = rows.iter().filter(|r| r.split() == Split::Heldout).count();
        assert!((120..280).contains(&heldout), "{heldout}");
        for row in &rows {
            assert_eq!(row.split(), row.clone().split());
            // Another pair for the same prompt lands in the same split.
            let other = PreferenceRow::chosen_rejected(row.prompt.clone(), "yes", "no").unwrap();
            assert_eq!(other.split(), row.split());
        }
        let env = GenRm::from_rows("genrm", rows).unwrap();
        let (train, heldout) = split_prompts(&env, 300);
        assert!(train.is_disjoint(&heldout));
        assert!(
            train.len() > 100 && heldout.len() > 20,
            "{} / {}",
            train.len(),
            heldout.len()
        );
    }

    fn split_prompts(env: &GenRm, seeds: u64) -> (BTreeSet<String>, BTreeSet<String>) {
        let prompts = |split| {
            (0..seeds)
                .map(|seed| {
                    let task = env.sample(seed, split, 0).unwrap();
                    // The row's prompt, whatever order the responses came in.
                    task.prompt[0]
                        .content
                        .split("\n\nResponse 1:")
                        .next()
                        .unwrap()
                        .to_string()
                })
                .collect::<BTreeSet<_>>()
        };
        (prompts(Split::Train), prompts(Split::Heldout))
    }

    #[test]
    fn the_order_is_seeded_balanced_and_sets_the_truth() {
        let row = PreferenceRow::chosen_rejected(vec![Message::user("p")], "good", "bad").unwrap();
        let mut chosen_first = 0;
        for seed in 0..400 {
            let shown = row.present(seed);
            assert_eq!(shown, row.present(seed));
            if shown.chosen_first == Some(true) {
                chosen_first += 1;
                assert_eq!(
                    (shown.first.as_str(), shown.second.as_str()),
                    ("good", "bad")
                );
                assert_eq!(shown.truth.to_string(), "[[5, 1, 1]]");
            } else {
                assert_eq!(
                    (shown.first.as_str(), shown.second.as_str()),
                    ("bad", "good")
                );
                assert_eq!(shown.truth.to_string(), "[[1, 5, 6]]");
            }
        }
        assert!((150..250).contains(&chosen_first), "{chosen_first} of 400");
        // Through the environment: the task's truth matches the order in its prompt.
        let rows = parse_preferences(&chosen_rejected_lines(40).join("\n"), "x").unwrap();
        let env = GenRm::from_rows("genrm", rows).unwrap();
        let mut orders = BTreeSet::new();
        for seed in 0..40 {
            let task = env.sample(seed, Split::Train, 0).unwrap();
            let verification: Verification = task.verification_as().unwrap();
            let text = &task.prompt[0].content;
            let chosen_at = text.find(" plus one.").unwrap();
            let rejected_at = text.find("It is ").unwrap();
            assert_eq!(verification.chosen_first, Some(chosen_at < rejected_at));
            orders.insert(verification.chosen_first);
        }
        assert_eq!(orders.len(), 2);
    }

    #[test]
    fn judgements_are_read_from_the_last_bracket_after_thinking() {
        let judged = |text: &str| parse_judgement(text).map(|j| j.to_string());
        assert_eq!(judged("[[5, 1, 1]]").unwrap(), "[[5, 1, 1]]");
        assert_eq!(judged("Verdict: [[ 4 ,2,  2 ]].").unwrap(), "[[4, 2, 2]]");
        assert_eq!(
            judged("<think>maybe [[1, 5, 6]]</think>So [[4, 2, 2]]").unwrap(),
            "[[4, 2, 2]]"
        );
        assert_eq!(
            judged("First [[1, 2, 3]], on reflection [[2, 1, 2]]").unwrap(),
            "[[2, 1, 2]]"
        );
        assert_eq!(
            judged("[[3, 3, 4]]<|end|>[[1, 1, 1]]").unwrap(),
            "[[3, 3, 4]]"
        );
        for (bad, why) in [
            ("no verdict here", "no [[score_1"),
            ("<think>[[4, 2, 2]]</think>", "no [[score_1"),
            ("<think>[[4, 2, 2]]", "never closed"),
            ("[[1, 2, 3]] then [[2, 1]]", "2 parts"),
            ("[[5, 1, 1, 2]]", "4 parts"),
            ("[[6, 1, 1]]", "score_1 is 6; allowed: 1 to 5"),
            ("[[5, 0, 1]]", "score_2 is 0"),
            ("[[5, 1, 7]]", "ranking is 7; allowed: 1 to 6"),
            ("[[5, 1, -1]]", "ranking is -1"),
            ("[[5.0, 1, 1]]", "allowed: an integer"),
            ("[[a, b, c]]", "allowed: an integer"),
            ("only ]] closing", "no `[[`"),
        ] {
            let reason = parse_judgement(bad).unwrap_err();
            assert!(reason.contains(why), "{bad}: {reason}");
        }
    }

    #[test]
    fn the_reward_is_minus_the_distance_or_minus_ten() {
        let truth = Judgement::CHOSEN_FIRST;
        let perfect = genrm_reward("<think>first is right</think>[[5, 1, 1]]", truth);
        assert_eq!(perfect.reward, 0.0);
        assert_eq!(perfect.component("format"), Some(1.0));
        assert_eq!(perfect.component("pair_correct"), Some(1.0));
        assert_eq!(perfect.component("score_error"), Some(0.0));
        // Signed: the best judgement is not `is_full`.
        assert!(!perfect.is_full());
        let malformed = genrm_reward("[[5, 1]]", truth);
        assert_eq!(malformed.reward, -10.0);
        assert_eq!(malformed.component("format"), Some(0.0));
        assert_eq!(malformed.component("pair_correct"), Some(0.0));
        assert_eq!(malformed.component("score_error"), None);
        // |4-5| + |1-1| + |2-1| = 2, same side.
        let close = genrm_reward("[[4, 1, 2]]", truth);
        assert_eq!(close.reward, -2.0);
        assert_eq!(close.component("pair_correct"), Some(1.0));
        // Every term off: 4 + 4 + 5 = 13, below a malformed verdict.
        let reversed = genrm_reward("[[1, 5, 6]]", truth);
        assert_eq!(reversed.reward, -13.0);
        assert_eq!(reversed.component("pair_correct"), Some(0.0));
        // Off by one across the middle: tied truth scores, the ranking decides the side.
        let tied = Judgement::new(3, 3, 4).unwrap();
        let across = genrm_reward("[[3, 3, 3]]", tied);
        assert_eq!(across.reward, -1.0);
        assert_eq!(across.component("pair_correct"), Some(0.0));
        let within = genrm_reward("[[3, 3, 5]]", tied);
        assert_eq!(within.reward, -1.0);
        assert_eq!(within.component("pair_correct"), Some(1.0));
    }

    #[test]
    fn comparison_pairs_cover_each_mode() {
        use Comparisons::{AllPairs, Circular};
        assert_eq!(comparison_pairs(0, Circular), vec![]);
        assert_eq!(comparison_pairs(1, AllPairs), vec![]);
        assert_eq!(comparison_pairs(2, Circular), vec![(0, 1), (1, 0)]);
        assert_eq!(comparison_pairs(3, Circular), vec![(0, 1), (1, 2), (2, 0)]);
        assert_eq!(
            comparison_pairs(4, Circular),
            vec![(0, 1), (1, 2), (2, 3), (3, 0)]
        );
        assert_eq!(comparison_pairs(2, AllPairs), vec![(0, 1)]);
        assert_eq!(comparison_pairs(3, AllPairs), vec![(0, 1), (0, 2), (1, 2)]);
        assert_eq!(
            comparison_pairs(4, AllPairs),
            vec![(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
        );
        assert_eq!(
            serde_json::to_value([Circular, AllPairs]).unwrap(),
            serde_json::json!(["circular", "all_pairs"])
        );
    }

    #[test]
    fn aggregation_takes_means_and_breaks_ties_by_ranking() {
        let j = |a, b, r| Judgement::new(a, b, r).unwrap();
        let judgements = [
            (0, 1, j(4, 2, 2)),
            // Tied at 3, ranking 5 leans 1.5 towards response 2: 1 gets 1.5, 2 gets 4.5.
            (1, 2, j(3, 3, 5)),
            (2, 0, j(5, 4, 3)),
            (0, 9, j(1, 1, 1)),
        ];
        let rewards = aggregate_scores(4, &judgements);
        // 0: (4 + 4) / 2; 1: (2 + 1.5) / 2; 2: (4.5 + 5) / 2; 3: never judged.
        assert_eq!(rewards, vec![4.0, 1.75, 4.75, UNJUDGED_SCORE]);
        // Ranking 1 on a tie: +2.5 / -2.5.
        assert_eq!(aggregate_scores(2, &[(0, 1, j(2, 2, 1))]), vec![4.5, -0.5]);
    }

    #[test]
    fn genrm_passes_the_environment_self_check() {
        let rated = (0..30).map(|i| {
            serde_json::json!({
                "prompt": [{"role": "user", "content": format!("Tip {i}?")}],
                "response_1": format!("Drink water, tip {i}."),
                "response_2": "No.",
                "scores": [(i % 5) + 1, 2],
                "ranking": (i % 6) + 1,
            })
            .to_string()
        });
        let lines: Vec<String> = chosen_rejected_lines(60).into_iter().chain(rated).collect();
        let env = GenRm::from_rows(
            "genrm:test",
            parse_preferences(&lines.join("\n"), "x").unwrap(),
        )
        .unwrap();
        let (train, heldout) = env.split_sizes();
        assert!(train > 0 && heldout > 0, "{train} / {heldout}");
        let options = CheckOptions {
            tasks_per_split: 12,
            difficulties: None,
            base_seed: 3,
        };
        let report = check_environment(&env, &options);
        assert!(report.passed, "{:#?}", report.failures);
        assert_eq!(report.tasks_checked, 24);
        // The reference is a verdict with the full (zero) reward.
        let task = env.sample(1, Split::Train, 0).unwrap();
        let reference = env.reference(&task).unwrap();
        assert!(parse_judgement(&reference).is_ok());
        assert!(env.is_solved(&env.score(&task, &reference).unwrap()));
        let empty = GenRm::from_rows("genrm", Vec::new()).unwrap_err();
        assert!(matches!(empty, PreferenceError::NoRows { .. }));
    }

    #[test]
    fn the_judge_prompt_shows_both_responses_and_the_verdict_format() {
        let conversation = vec![Message::system("Be kind."), Message::user("Hi")];
        let prompt = genrm_prompt(&conversation, "Hello!", "Go away.");
        assert_eq!(prompt.len(), 1);
        let text = &prompt[0].content;
        assert!(text.starts_with("Conversation:\nsystem: Be kind.\nuser: Hi\n\nResponse 1:\nHello!\n\nResponse 2:\nGo away."), "{text}");
        assert!(
            text.ends_with("End with [[score_1, score_2, ranking]]."),
            "{text}"
        );
        let single = genrm_prompt(&[Message::user("Hi")], "a", "b");
        assert!(single[0].content.starts_with("Prompt:\nHi\n"));
        // The template's markers never appear, so the judge's turn is not cut short.
        assert!(!text.contains("<|"));
    }

    #[test]
    fn arithmetic_pairs_prefer_the_reference() {
        let pairs = pairs_from_environment_with_tasks(&Arithmetic, Split::Train, 2, 5, 12).unwrap();
        assert_eq!(pairs.len(), 12);
        for (task, row) in &pairs {
            assert_eq!(row.prompt, task.prompt);
            let Preference::ChosenRejected { chosen, rejected } = &row.preference else {
                panic!("not a chosen/rejected row: {row:?}");
            };
            assert_eq!(chosen, &Arithmetic.reference(task).unwrap());
            assert!(
                Arithmetic.score(task, chosen).unwrap().is_full(),
                "{chosen}"
            );
            assert!(
                !Arithmetic.score(task, rejected).unwrap().is_full(),
                "{rejected}"
            );
        }
        // Deterministic, and the plain form gives the same rows.
        let again = pairs_from_environment(&Arithmetic, Split::Train, 2, 5, 12).unwrap();
        assert_eq!(
            again,
            pairs.into_iter().map(|(_, row)| row).collect::<Vec<_>>()
        );
        // A caller's own failing rollout pairs the same way.
        let task = Arithmetic.sample(0, Split::Train, 0).unwrap();
        let reference = Arithmetic.reference(&task).unwrap();
        let row = pair_with_failure(&task, &reference, "<think>hmm</think>1000").unwrap();
        assert_eq!(
            row.preference,
            Preference::ChosenRejected {
                chosen: reference.clone(),
                rejected: "1000".into()
            }
        );
        assert!(pair_with_failure(&task, &reference, &reference).is_err());
        assert!(pair_with_failure(&task, &reference, "<think>no answer").is_err());
    }

    #[test]
    fn builtin_single_turn_environments_give_pairs() {
        use crate::builtin::{
            Calendar, ChatRm, Countdown, FunctionCalling, InstructionFollowing, KnightsKnaves,
            MathWord, Mcqa, MultiHop, Needle, Safety, StructuredOutput, Sudoku,
        };
        let envs: Vec<Box<dyn Environment>> = vec![
            Box::new(Countdown),
            Box::new(MultiHop),
            Box::new(Needle::default()),
            Box::new(KnightsKnaves),
            Box::new(Sudoku),
            Box::new(MathWord::generated()),
            Box::new(Mcqa::generated()),
            Box::new(InstructionFollowing::generated()),
            Box::new(StructuredOutput),
            Box::new(FunctionCalling),
            Box::new(Calendar),
            Box::new(Safety),
            Box::new(ChatRm::default()),
        ];
        for env in &envs {
            let name = env.info().name;
            for difficulty in [0, env.info().max_difficulty] {
                let pairs =
                    pairs_from_environment_with_tasks(env.as_ref(), Split::Train, difficulty, 1, 4)
                        .unwrap_or_else(|err| panic!("{name} level {difficulty}: {err}"));
                for (task, row) in pairs {
                    let Preference::ChosenRejected { rejected, .. } = &row.preference else {
                        unreachable!()
                    };
                    assert!(
                        !env.score(&task, rejected).unwrap().is_full(),
                        "{name}: {rejected}"
                    );
                }
            }
        }
        let multi = pairs_from_environment(&crate::builtin::ToolAgent, Split::Train, 0, 0, 1);
        assert!(matches!(multi, Err(EnvError::InvalidConfig { .. })));
        let too_many = pairs_from_environment(&Arithmetic, Split::Heldout, 0, 0, 500).unwrap_err();
        assert!(too_many.to_string().contains("of the 500"), "{too_many}");
    }
}
