//! Scoring given completions offline: the tasks of a user's dataset by row (what
//! `chorus env score` is built on).
//!
//! [`OfflineDataset::open`] reads a dataset file for an environment that can read that format —
//! see [`dataset_readers`] — and gives the task of each row, found by its 0-based line number or
//! its own id. Each row becomes a task exactly as the environment would sample it (same prompt,
//! same verification data), so scores match what a run would give.

use std::path::Path;
use std::sync::Arc;

use crate::builtin::{Bfcl, CodePython, InstructionFollowing, MathWord, Mcqa};
use crate::env::Environment;
use crate::error::EnvError;
use crate::nemo_gym::NemoGym;
use crate::task::{Split, Task};

/// Builds an environment holding just the given JSONL text (one row); `source_name` labels
/// errors.
pub type RowReader = fn(text: &str, source_name: &str) -> Result<Arc<dyn Environment>, EnvError>;

/// An environment that reads users' dataset files, and the format it reads.
#[derive(Clone, Copy)]
pub struct DatasetReader {
    /// The environment's name.
    pub env: &'static str,
    /// The format, for help and errors.
    pub format: &'static str,
    /// Reads one row.
    pub read: RowReader,
}

impl std::fmt::Debug for DatasetReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatasetReader")
            .field("env", &self.env)
            .field("format", &self.format)
            .finish()
    }
}

/// The environment name that reads NeMo Gym data rows (with a server's URL).
pub const NEMO_GYM: &str = "nemo_gym";

/// Every built-in environment that reads a dataset format, with its format. (`nemo_gym` reads
/// NeMo Gym rows too but needs its server's URL: see [`OfflineDataset::open`].)
pub fn dataset_readers() -> Vec<DatasetReader> {
    vec![
        DatasetReader {
            env: "math_word",
            format: "GSM8K JSONL: `question`, `answer` ending in `#### N`",
            read: |text, source| Ok(Arc::new(MathWord::from_gsm8k_str(text, source)?)),
        },
        DatasetReader {
            env: "mcqa",
            format: "ARC/MMLU-style JSONL: `question`, `choices`, `answerKey` or `answer`",
            read: |text, source| Ok(Arc::new(Mcqa::from_jsonl_str(text, source)?)),
        },
        DatasetReader {
            env: "instruction_following",
            format: "IFEval/IFBench JSONL: `prompt`, `instruction_id_list`, `kwargs`",
            read: |text, source| {
                Ok(Arc::new(InstructionFollowing::from_ifeval_str(
                    text, source,
                )?))
            },
        },
        DatasetReader {
            env: "function_calling",
            format: "BFCL JSON lines (`id`, `question`, `function`) joined with their \
                     possible_answer rows (`ground_truth`)",
            read: |text, source| Ok(Arc::new(Bfcl::from_jsonl_str(text, source)?)),
        },
        DatasetReader {
            env: "code_python",
            format: "HumanEval JSONL (`task_id`, `prompt`, `test`, `entry_point`) or MBPP JSONL \
                     (`text`, `test_list`)",
            read: |text, source| {
                let row: serde_json::Value =
                    serde_json::from_str(text).unwrap_or(serde_json::Value::Null);
                if row.get("entry_point").is_some() && row.get("test").is_some() {
                    Ok(Arc::new(CodePython::from_humaneval_str(text, source)?))
                } else if row.get("test_list").is_some() {
                    Ok(Arc::new(CodePython::from_mbpp_str(text, source)?))
                } else {
                    Err(row_error(
                        source,
                        1,
                        "neither HumanEval (`entry_point`, `test`) nor MBPP (`test_list`) fields",
                    ))
                }
            },
        },
    ]
}

/// One row of the file.
#[derive(Debug, Clone)]
struct Row {
    /// 0-based line number.
    line: usize,
    text: String,
    /// The row's own id (`task_id`, else `id`, `uuid` or IFEval's `key`), if it has one.
    own_id: Option<String>,
}

enum Source {
    Builtin(DatasetReader),
    NemoGym(Arc<NemoGym>),
}

/// A dataset file and the environment that reads it.
pub struct OfflineDataset {
    source: Source,
    source_name: String,
    /// Non-blank lines.
    rows: Vec<Row>,
    /// Lines in the file.
    lines: usize,
}

impl std::fmt::Debug for OfflineDataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OfflineDataset")
            .field("source_name", &self.source_name)
            .field("rows", &self.rows.len())
            .finish_non_exhaustive()
    }
}

fn row_error(source_name: &str, line: usize, message: impl Into<String>) -> EnvError {
    EnvError::DatasetRow {
        source_name: source_name.to_string(),
        line,
        message: message.into(),
    }
}

impl OfflineDataset {
    /// Reads `path` for environment `env`: one of [`dataset_readers`], or `nemo_gym` with the
    /// server's `url`. Every line must be JSON (the error names the first that is not); rows are
    /// turned into tasks when asked for.
    pub fn open(env: &str, path: &Path, url: Option<&str>) -> Result<Self, EnvError> {
        let text = std::fs::read_to_string(path).map_err(|source| EnvError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_str(env, &text, &path.display().to_string(), url)
    }

    /// [`open`](Self::open) on text; `source_name` labels errors.
    pub fn from_str(
        env: &str,
        text: &str,
        source_name: &str,
        url: Option<&str>,
    ) -> Result<Self, EnvError> {
        let readers = dataset_readers();
        let known = || {
            let mut names: Vec<String> = readers.iter().map(|r| r.env.to_string()).collect();
            names.push(format!("{NEMO_GYM} (with a url)"));
            names
        };
        let mut rows = Vec::new();
        let mut lines = 0;
        for (line, row) in text.lines().enumerate() {
            lines = line + 1;
            if row.trim().is_empty() {
                continue;
            }
            let value: serde_json::Value = serde_json::from_str(row)
                .map_err(|e| row_error(source_name, line + 1, format!("not JSON: {e}")))?;
            let own_id =
                ["task_id", "id", "uuid", "key"]
                    .iter()
                    .find_map(|key| match value.get(*key) {
                        Some(serde_json::Value::String(s)) => Some(s.clone()),
                        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
                        _ => None,
                    });
            rows.push(Row {
                line,
                text: row.to_string(),
                own_id,
            });
        }
        if rows.is_empty() {
            return Err(row_error(source_name, 0, "the dataset has no rows"));
        }
        let source = if env == NEMO_GYM {
            let url = url.ok_or_else(|| EnvError::InvalidConfig {
                env: NEMO_GYM.into(),
                message: "give the NeMo Gym resources server's address (--url http://host:port)"
                    .into(),
            })?;
            Source::NemoGym(Arc::new(NemoGym::from_jsonl_str(
                NEMO_GYM,
                url,
                text,
                source_name,
            )?))
        } else {
            let reader = readers
                .iter()
                .find(|r| r.env == env)
                .copied()
                .ok_or_else(|| EnvError::InvalidConfig {
                    env: env.to_string(),
                    message: format!(
                        "this environment reads no dataset files; environments that do: {}",
                        known().join(", ")
                    ),
                })?;
            Source::Builtin(reader)
        };
        Ok(Self {
            source,
            source_name: source_name.to_string(),
            rows,
            lines,
        })
    }

    /// How many rows (non-blank lines) the file has.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether it has none (never true for an opened dataset).
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The 0-based line of the row `id` names: a number is a line number from 0; a string is the
    /// row's own id (`task_id`, else `id`, `uuid` or IFEval's `key`) or, failing that, a line
    /// number.
    pub fn find(&self, id: &serde_json::Value) -> Result<usize, String> {
        let line = match id {
            serde_json::Value::Number(n) => n
                .as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| format!("id {n} is not a line number (0, 1, 2, ...)"))?,
            serde_json::Value::String(s) => {
                if let Some(row) = self.rows.iter().find(|r| r.own_id.as_deref() == Some(s)) {
                    return Ok(row.line);
                }
                s.parse::<usize>().map_err(|_| {
                    format!(
                        "no row of {} has the id {s:?} (ids are line numbers from 0 or a row's `task_id`)",
                        self.source_name
                    )
                })?
            }
            other => {
                return Err(format!(
                    "id {other} is neither a line number nor a string task_id"
                ));
            }
        };
        if line >= self.lines {
            // Past the end it cannot be a line: it may be a numeric own id (IFEval's `key`).
            if let Some(row) = self
                .rows
                .iter()
                .find(|r| r.own_id.as_deref() == Some(line.to_string().as_str()))
            {
                return Ok(row.line);
            }
            return Err(format!(
                "id {line}: {} has lines 0 to {}",
                self.source_name,
                self.lines.saturating_sub(1)
            ));
        }
        if !self.rows.iter().any(|r| r.line == line) {
            return Err(format!(
                "id {line}: line {line} of {} is blank",
                self.source_name
            ));
        }
        Ok(line)
    }

    /// The environment and the task of the row on 0-based `line`. A row the environment cannot
    /// read is an error naming the line (1-based, as editors count) and what is wrong.
    pub fn task(&self, line: usize) -> Result<(Arc<dyn Environment>, Task), EnvError> {
        let row = self
            .rows
            .iter()
            .find(|r| r.line == line)
            .ok_or_else(|| row_error(&self.source_name, line + 1, "no row on this line"))?;
        match &self.source {
            Source::NemoGym(env) => {
                let task = env
                    .task_at_line(line + 1)
                    .ok_or_else(|| row_error(&self.source_name, line + 1, "no row on this line"))?;
                Ok((env.clone(), task))
            }
            Source::Builtin(reader) => {
                let env = (reader.read)(&row.text, &self.source_name).map_err(|e| {
                    let message = match e {
                        EnvError::DatasetRow { message, .. } => message,
                        other => other.to_string(),
                    };
                    row_error(
                        &self.source_name,
                        line + 1,
                        format!("not a {} row ({}): {message}", reader.env, reader.format),
                    )
                })?;
                let task = match env.sample(0, Split::Train, 0) {
                    Ok(task) => task,
                    Err(EnvError::SplitExhausted { .. }) => env.sample(0, Split::Heldout, 0)?,
                    Err(e) => return Err(e),
                };
                Ok((env, task))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GSM8K: &str = r#"{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=<<3+4=7>>7\n#### 7", "task_id": "gsm-a"}

{"question": "A box holds 12 eggs. How many in 2 boxes?", "answer": "Two boxes.\\n#### 24"}
{"question": "broken", "answer": "no hashes"}
"#;

    #[test]
    fn rows_are_found_by_line_or_own_id_and_score_like_a_run() {
        let data = OfflineDataset::from_str("math_word", GSM8K, "g.jsonl", None).unwrap();
        assert_eq!(data.len(), 3);
        assert_eq!(data.find(&serde_json::json!("gsm-a")).unwrap(), 0);
        assert_eq!(data.find(&serde_json::json!(2)).unwrap(), 2);
        assert_eq!(data.find(&serde_json::json!("2")).unwrap(), 2);
        for (id, wanted) in [
            (serde_json::json!(1), "blank"),
            (serde_json::json!(9), "lines 0 to 3"),
            (serde_json::json!("nope"), "task_id"),
            (serde_json::json!(-1), "line number"),
            (serde_json::json!(null), "neither"),
        ] {
            let err = data.find(&id).unwrap_err();
            assert!(err.contains(wanted), "{id}: {err}");
        }
        let (env, task) = data.task(2).unwrap();
        assert!(task.prompt[0].content.contains("12 eggs"));
        assert!(env.score(&task, "#### 24").unwrap().is_full());
        assert!(!env.score(&task, "23").unwrap().is_full());
        let (env, task) = data.task(0).unwrap();
        assert!(env.score(&task, "7").unwrap().is_full());
        // The bad row is reported with its real line (1-based) and the format expected.
        let err = data.task(3).err().unwrap().to_string();
        assert!(
            err.contains("g.jsonl line 4") && err.contains("GSM8K"),
            "{err}"
        );
    }

    #[test]
    fn unreadable_files_and_environments_are_explained() {
        let err = OfflineDataset::from_str("math_word", "{}\nnot json\n", "x.jsonl", None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("x.jsonl line 2") && err.contains("not JSON"),
            "{err}"
        );
        let err = OfflineDataset::from_str("arithmetic", GSM8K, "g", None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("math_word") && err.contains("nemo_gym"),
            "{err}"
        );
        let err = OfflineDataset::from_str("nemo_gym", GSM8K, "g", None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--url"), "{err}");
        // A GSM8K file handed to mcqa: the first row says what mcqa expected.
        let data = OfflineDataset::from_str("mcqa", GSM8K, "g", None).unwrap();
        let err = data.task(0).err().unwrap().to_string();
        assert!(err.contains("line 1") && err.contains("mcqa"), "{err}");
    }

    #[test]
    fn arc_and_ifeval_rows_score_like_their_environments() {
        let arc = r#"{"id": "arc-1", "question": "Which is a planet?", "choices": {"text": ["Mars", "the Moon"], "label": ["A", "B"]}, "answerKey": "A"}"#;
        let data = OfflineDataset::from_str("mcqa", arc, "arc.jsonl", None).unwrap();
        let (env, task) = data
            .task(data.find(&serde_json::json!("arc-1")).unwrap())
            .unwrap();
        assert!(env.score(&task, "A").unwrap().is_full());
        assert!(!env.score(&task, "B").unwrap().is_full());

        let ifeval = r#"{"key": 1001, "prompt": "Write one sentence about the sea.", "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]}
{"key": 1002, "prompt": "p", "instruction_id_list": ["language:response_language"], "kwargs": [{"language": "fr"}]}"#;
        let data =
            OfflineDataset::from_str("instruction_following", ifeval, "if.jsonl", None).unwrap();
        let (env, task) = data
            .task(data.find(&serde_json::json!(1001)).unwrap())
            .unwrap();
        assert!(
            env.score(&task, "the sea is calm today.")
                .unwrap()
                .is_full()
        );
        assert!(
            !env.score(&task, "The Sea is calm today.")
                .unwrap()
                .is_full()
        );
        assert_eq!(data.find(&serde_json::json!("1002")).unwrap(), 1);
        // An instruction without a checker here is reported on its line.
        let err = data.task(1).err().unwrap().to_string();
        assert!(
            err.contains("if.jsonl line 2") && err.contains("language:response_language"),
            "{err}"
        );
    }

    #[test]
    fn humaneval_and_mbpp_rows_run_in_the_sandbox() {
        let rows = r#"{"task_id": "HumanEval/0", "prompt": "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n", "canonical_solution": "    return a + b\n", "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n", "entry_point": "add"}
{"task_id": 11, "text": "Write a function to double a number.", "test_list": ["assert double(2) == 4", "assert double(0) == 0"]}
{"question": "not code"}"#;
        let data = OfflineDataset::from_str("code_python", rows, "code.jsonl", None).unwrap();
        let (env, task) = data
            .task(data.find(&serde_json::json!("HumanEval/0")).unwrap())
            .unwrap();
        assert!(env.score(&task, "    return a + b\n").unwrap().is_full());
        assert!(!env.score(&task, "    return a - b\n").unwrap().is_full());
        let (env, task) = data
            .task(data.find(&serde_json::json!(1)).unwrap())
            .unwrap();
        assert!(
            env.score(&task, "def double(x):\n    return 2 * x\n")
                .unwrap()
                .is_full()
        );
        let err = data.task(2).err().unwrap().to_string();
        assert!(
            err.contains("code.jsonl line 3") && err.contains("MBPP"),
            "{err}"
        );
    }
}
