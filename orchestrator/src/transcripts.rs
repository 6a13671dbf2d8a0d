//! A user's chat transcripts as supervised data: a JSONL file of `{"messages": [{"role",
//! "content"}, ...]}` rows, rendered with Chorus' chat template into a prompt and a completion
//! whose loss mask covers the assistant's tokens only.
//!
//! The prompt is every message before the first assistant message, then the open assistant
//! header; the completion is the rest of the conversation. Each assistant message is learned
//! (its content and its end-of-turn marker); the messages between them (user, tool, system) are
//! context, rendered as the model will see them at inference and masked out of the loss.

use std::path::{Path, PathBuf};

use chorus_environments::chat::{self, Message, Role};
use serde::Deserialize;

/// A transcript file that cannot be used; names the file, the line and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum TranscriptError {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A row is not a usable transcript.
    #[error("{path}:{line}: {message}")]
    Row {
        /// The file.
        path: PathBuf,
        /// The 1-based line.
        line: usize,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// The file has no transcript at all.
    #[error("{path}: no transcripts (one JSON object per line: {{\"messages\": [...]}})")]
    Empty {
        /// The file.
        path: PathBuf,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Row {
    messages: Vec<RowMessage>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RowMessage {
    role: String,
    content: String,
}

/// One transcript, rendered: the prompt, then the completion as segments of text, each marked
/// `true` when the policy learns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transcript {
    /// The 1-based line it came from, for ids and messages.
    pub line: usize,
    /// The messages before the first assistant message.
    pub prompt: Vec<Message>,
    /// The completion: (text, learned) in order.
    pub segments: Vec<(String, bool)>,
}

/// The transcripts of one file, in file order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transcripts {
    /// Where they came from.
    pub path: PathBuf,
    /// The rows.
    pub rows: Vec<Transcript>,
}

impl Transcripts {
    /// Reads and checks every row of `path`; blank lines are skipped.
    pub fn load(path: &Path) -> Result<Self, TranscriptError> {
        let text = std::fs::read_to_string(path).map_err(|source| TranscriptError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses JSONL `text` (as read from `path`, which errors name).
    pub fn parse(text: &str, path: &Path) -> Result<Self, TranscriptError> {
        let mut rows = vec![];
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let err = |message: String| TranscriptError::Row {
                path: path.to_path_buf(),
                line: i + 1,
                message,
            };
            let row: Row = serde_json::from_str(line).map_err(|e| {
                err(format!(
                    "{e}; each line is {{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}}"
                ))
            })?;
            rows.push(render(row, i + 1).map_err(err)?);
        }
        if rows.is_empty() {
            return Err(TranscriptError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            rows,
        })
    }
}

fn role(name: &str, index: usize) -> Result<Role, String> {
    Ok(match name {
        "system" => Role::System,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        "tool" => Role::Tool,
        other => {
            return Err(format!(
                "messages[{index}].role is {other:?}; allowed: system, user, assistant, tool"
            ));
        }
    })
}

fn render(row: Row, line: usize) -> Result<Transcript, String> {
    let messages: Vec<Message> = row
        .messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| Ok(Message::new(role(&m.role, i)?, m.content)))
        .collect::<Result<_, String>>()?;
    let first = messages
        .iter()
        .position(|m| m.role == Role::Assistant)
        .ok_or("no assistant message: there is nothing to learn")?;
    if first == 0 {
        return Err(
            "the first message is the assistant's: give the user (or system) message it answers"
                .into(),
        );
    }
    let prompt = messages[..first].to_vec();
    let mut segments: Vec<(String, bool)> = vec![];
    let mut context: Vec<&Message> = vec![];
    for m in &messages[first..] {
        if m.role == Role::Assistant {
            if !context.is_empty() {
                segments.push((render_context(&context), false));
                context.clear();
            }
            segments.push((format!("{}{}", m.content, chat::END_OF_TURN), true));
        } else {
            context.push(m);
        }
    }
    // Messages after the last assistant message teach nothing and are left out.
    Ok(Transcript {
        line,
        prompt,
        segments,
    })
}

/// Messages between two assistant turns, followed by the next assistant header: exactly the
/// text [`chat::render_prompt`] puts between them.
fn render_context(messages: &[&Message]) -> String {
    let owned: Vec<Message> = messages.iter().map(|m| (*m).clone()).collect();
    chat::render_prompt(&owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Transcripts, TranscriptError> {
        Transcripts::parse(text, Path::new("chat.jsonl"))
    }

    #[test]
    fn a_transcript_renders_as_the_conversation_with_only_assistant_turns_learned() {
        let t = parse(
            r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "<think>3+3</think>6"}]}"#,
        )
        .unwrap();
        let row = &t.rows[0];
        assert_eq!(row.line, 1);
        assert_eq!(row.prompt.len(), 2);
        let learned: Vec<&str> = row
            .segments
            .iter()
            .filter(|s| s.1)
            .map(|s| s.0.as_str())
            .collect();
        assert_eq!(learned, ["4<|end|>", "<think>3+3</think>6<|end|>"]);
        // Prompt and completion together are exactly the rendered conversation.
        let mut whole = chat::render_prompt(&row.prompt);
        for (text, _) in &row.segments {
            whole.push_str(text);
        }
        let all = [
            Message::system("Be brief."),
            Message::user("2+2?"),
            Message::assistant("4"),
            Message::user("and 3+3?"),
            Message::assistant("<think>3+3</think>6"),
        ];
        assert_eq!(whole, chat::render_conversation(&all));
    }

    #[test]
    fn bad_rows_are_named_by_line() {
        let ok = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#;
        let cases = [
            (
                format!("{ok}\n\n{{\"messages\": [{{\"role\": \"user\", \"content\": \"x\"}}]}}"),
                "chat.jsonl:3: no assistant message",
            ),
            (
                r#"{"messages": [{"role": "bot", "content": "x"}]}"#.to_string(),
                "chat.jsonl:1: messages[0].role is \"bot\"; allowed: system, user, assistant, tool",
            ),
            (
                r#"{"messages": [{"role": "assistant", "content": "x"}]}"#.to_string(),
                "the first message is the assistant's",
            ),
            ("not json".to_string(), "chat.jsonl:1: expected"),
            ("\n\n".to_string(), "no transcripts"),
        ];
        for (text, want) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(want), "{e} should contain {want}");
        }
        assert_eq!(parse(ok).unwrap().rows.len(), 1);
    }
}
