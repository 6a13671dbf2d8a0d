//! The one chat template every environment uses, and the parsing of model completions.
//!
//! A conversation renders as
//!
//! ```text
//! <|user|>12+7=<|end|><|assistant|>
//! ```
//!
//! The model continues after `<|assistant|>` and ends its turn with `<|end|>` (or `</s>`). It may
//! reason first inside `<think>…</think>`; only the text after the think block is its response.
//! Tool calls are `<tool_call>{"name": …, "arguments": {…}}</tool_call>` inside an assistant
//! turn; tool results come back as `tool` turns, `<|tool|><tool_response>…</tool_response><|end|>`.
//! Every marker is one special token of Chorus' byte-level tokenizer (`chorus_model::tokenizer::
//! SPECIAL_TOKENS`), so no newlines pad the template: tiny models with a few hundred tokens of
//! context are trained on these prompts.

use serde::{Deserialize, Serialize};

/// Opens a turn's header: `<|` + role + `|>`.
const ROLE_OPEN: &str = "<|";
/// Closes a turn's header.
const ROLE_CLOSE: &str = "|>";
/// Ends every turn.
pub const END_OF_TURN: &str = "<|end|>";
/// Ends a whole sequence; a completion stops at it as at [`END_OF_TURN`].
pub const END_OF_TEXT: &str = "</s>";
/// Where generation should stop.
pub const STOP_SEQUENCES: [&str; 2] = [END_OF_TURN, END_OF_TEXT];
/// Opens the reasoning block.
pub const THINK_OPEN: &str = "<think>";
/// Closes the reasoning block.
pub const THINK_CLOSE: &str = "</think>";
/// Opens a tool call.
pub const TOOL_CALL_OPEN: &str = "<tool_call>";
/// Closes a tool call.
pub const TOOL_CALL_CLOSE: &str = "</tool_call>";
/// Opens a tool result inside a `tool` turn.
pub const TOOL_RESPONSE_OPEN: &str = "<tool_response>";
/// Closes a tool result.
pub const TOOL_RESPONSE_CLOSE: &str = "</tool_response>";

/// Who speaks a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions that frame the conversation.
    System,
    /// The human (or the environment posing the task).
    User,
    /// The policy being trained.
    Assistant,
    /// The result of a tool call.
    Tool,
}

impl Role {
    /// The role's name as it appears in the template.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Who speaks.
    pub role: Role,
    /// What they say (for the assistant: the full text, think block and tool calls included).
    pub content: String,
}

impl Message {
    /// A message from `role`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }
    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }
    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }
    /// A tool result.
    pub fn tool(content: impl Into<String>) -> Self {
        Self::new(Role::Tool, content)
    }
}

fn render_message(out: &mut String, message: &Message) {
    out.push_str(ROLE_OPEN);
    out.push_str(message.role.as_str());
    out.push_str(ROLE_CLOSE);
    if message.role == Role::Tool {
        out.push_str(TOOL_RESPONSE_OPEN);
        out.push_str(&message.content);
        out.push_str(TOOL_RESPONSE_CLOSE);
    } else {
        out.push_str(&message.content);
    }
    out.push_str(END_OF_TURN);
}

/// Renders a finished conversation (every turn closed), e.g. an SFT example.
pub fn render_conversation(messages: &[Message]) -> String {
    let mut out = String::new();
    for message in messages {
        render_message(&mut out, message);
    }
    out
}

/// Renders a conversation as a prompt: every turn, then the open assistant header the model
/// continues from.
pub fn render_prompt(messages: &[Message]) -> String {
    let mut out = render_conversation(messages);
    out.push_str(ROLE_OPEN);
    out.push_str(Role::Assistant.as_str());
    out.push_str(ROLE_CLOSE);
    out
}

/// What follows the policy's action in a multi-turn episode, up to the point where the policy
/// speaks again: the end-of-turn marker when the action was cut off before it, the environment's
/// observation (if any), and the open assistant header. Appending this to the action's tokens
/// gives the same text as [`render_prompt`] of the conversation so far.
pub fn render_continuation(observation: Option<&Message>, action_closed: bool) -> String {
    let mut out = String::new();
    if !action_closed {
        out.push_str(END_OF_TURN);
    }
    if let Some(message) = observation {
        render_message(&mut out, message);
    }
    out.push_str(ROLE_OPEN);
    out.push_str(Role::Assistant.as_str());
    out.push_str(ROLE_CLOSE);
    out
}

/// A completion split into its reasoning and its response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The text inside `<think>…</think>`, if there was a think block.
    pub thinking: Option<String>,
    /// What the model said after reasoning, trimmed, without the end-of-turn marker.
    pub response: String,
    /// Set when the think block was opened but never closed; the response is then empty,
    /// because an unfinished thought is not an answer.
    pub unterminated_think: bool,
}

/// Splits a completion (the text generated after the assistant header) into reasoning and
/// response. Text after the first stop sequence (`<|end|>`, `</s>`) is ignored. A `</think>`
/// without an opening tag is accepted, since the template may pre-fill `<think>` into the prompt.
pub fn parse_completion(completion: &str) -> Completion {
    let end = STOP_SEQUENCES
        .iter()
        .filter_map(|stop| completion.find(stop))
        .min();
    let turn = &completion[..end.unwrap_or(completion.len())];
    if let Some(close) = turn.rfind(THINK_CLOSE) {
        let before = &turn[..close];
        let thinking = match before.find(THINK_OPEN) {
            Some(open) => &before[open + THINK_OPEN.len()..],
            None => before,
        };
        return Completion {
            thinking: Some(thinking.trim().to_string()),
            response: turn[close + THINK_CLOSE.len()..].trim().to_string(),
            unterminated_think: false,
        };
    }
    if let Some(open) = turn.find(THINK_OPEN) {
        return Completion {
            thinking: Some(turn[open + THINK_OPEN.len()..].trim().to_string()),
            response: String::new(),
            unterminated_think: true,
        };
    }
    Completion {
        thinking: None,
        response: turn.trim().to_string(),
        unterminated_think: false,
    }
}

/// Why a completion's think block is malformed, or `None` when it is well formed: at most one
/// `<think>` and one `</think>` in the turn, in that order, and a block that is opened is closed.
/// A lone `</think>` is well formed (the template may pre-fill `<think>`); no think block at all
/// is too. RL stages give a malformed completion a fixed penalty instead of its reward.
pub fn malformed_think(completion: &str) -> Option<String> {
    let end = STOP_SEQUENCES
        .iter()
        .filter_map(|stop| completion.find(stop))
        .min();
    let turn = &completion[..end.unwrap_or(completion.len())];
    let opens = turn.matches(THINK_OPEN).count();
    let closes = turn.matches(THINK_CLOSE).count();
    if opens > 1 || closes > 1 {
        return Some(format!(
            "{opens} `{THINK_OPEN}` and {closes} `{THINK_CLOSE}` in one turn; at most one of each"
        ));
    }
    match (turn.find(THINK_OPEN), turn.find(THINK_CLOSE)) {
        (Some(_), None) => Some(format!("`{THINK_OPEN}` is never closed")),
        (Some(open), Some(close)) if close < open => {
            Some(format!("`{THINK_CLOSE}` comes before `{THINK_OPEN}`"))
        }
        _ => None,
    }
}

/// The content of the last `\boxed{…}` in `text` (braces balanced), if any.
pub fn last_boxed(text: &str) -> Option<&str> {
    let start = text.rfind("\\boxed{")? + "\\boxed{".len();
    let mut depth = 1usize;
    for (offset, ch) in text[start..].char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&text[start..start + offset]);
                }
            }
            _ => {}
        }
    }
    None
}

/// The final answer inside a response: the last `\boxed{…}`, else the last `<answer>…</answer>`,
/// else what follows the last `####`, else the whole response; trimmed.
pub fn final_answer(response: &str) -> &str {
    if let Some(boxed) = last_boxed(response) {
        return boxed.trim();
    }
    if let Some(open) = response.rfind("<answer>") {
        let rest = &response[open + "<answer>".len()..];
        let inner = match rest.find("</answer>") {
            Some(close) => &rest[..close],
            None => rest,
        };
        return inner.trim();
    }
    if let Some(marker) = response.rfind("####") {
        return response[marker + 4..].trim();
    }
    response.trim()
}

/// The final answer of a completion, or `None` when it has none (empty, or an unterminated
/// think block): [`parse_completion`] then [`final_answer`].
pub fn extract_answer(completion: &str) -> Option<String> {
    let parsed = parse_completion(completion);
    if parsed.unterminated_think {
        return None;
    }
    Some(final_answer(&parsed.response).to_string()).filter(|answer| !answer.is_empty())
}

/// The code in a response: the body of the last fenced block (three backticks, any language
/// tag such as `python`; an unclosed last fence runs to the end), else, when the response has
/// no fence at all, the whole response (tiny models answer with bare code). `None` when that
/// leaves nothing.
pub fn extract_code(response: &str) -> Option<String> {
    const FENCE: &str = "```";
    let fences: Vec<usize> = response.match_indices(FENCE).map(|(i, _)| i).collect();
    let code = match fences.as_slice() {
        [] => response,
        _ => {
            // Pair fences from the start: 0-1, 2-3, …; the last pair (or a lone opener) wins.
            let open = fences[(fences.len() - 1) / 2 * 2];
            let after_open = &response[open + FENCE.len()..];
            // The rest of the opening line is the language tag.
            let body_start = after_open.find('\n').map_or(after_open.len(), |i| i + 1);
            let body = &after_open[body_start..];
            match body.find(FENCE) {
                Some(close) => &body[..close],
                None => body,
            }
        }
    };
    let code = code.trim_matches('\n').trim_end();
    (!code.trim().is_empty()).then(|| code.to_string())
}

/// A tool call as the model writes it: `<tool_call>{"name": "…", "arguments": {…}}</tool_call>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The tool's name.
    pub name: String,
    /// The arguments, a JSON object.
    #[serde(default)]
    pub arguments: serde_json::Value,
}

impl ToolCall {
    /// Renders the call in the template's markup.
    pub fn render(&self) -> String {
        let json = serde_json::to_string(self).unwrap_or_else(|_| "{}".to_string());
        format!("{TOOL_CALL_OPEN}{json}{TOOL_CALL_CLOSE}")
    }
}

/// Opens the tool section of a system message: the functions the model may call follow, one
/// JSON object (`name`, `description`, `parameters` as JSON Schema) a line.
pub const TOOLS_HEADER: &str = "You can call these functions:";

/// The template's tool section: [`TOOLS_HEADER`], then each function's definition as one line
/// of JSON. Environments that offer tools put it in the system message (after any instructions),
/// so every dataset's tools reach the model in the same form.
pub fn tool_section<'a>(functions: impl IntoIterator<Item = &'a serde_json::Value>) -> String {
    let mut out = String::from(TOOLS_HEADER);
    for function in functions {
        out.push('\n');
        out.push_str(&function.to_string());
    }
    out
}

/// `messages` with [`tool_section`] of `functions` appended to the first system message, or
/// as a new first system message when there is none.
pub fn with_tool_section(mut messages: Vec<Message>, section: String) -> Vec<Message> {
    match messages.first_mut() {
        Some(first) if first.role == Role::System => {
            if !first.content.is_empty() {
                first.content.push_str("\n\n");
            }
            first.content.push_str(&section);
        }
        _ => messages.insert(0, Message::system(section)),
    }
    messages
}

/// Why a tool call in a response could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ToolCallError {
    /// `<tool_call>` without `</tool_call>`.
    #[error("tool call {index} is not closed with {TOOL_CALL_CLOSE}")]
    Unclosed {
        /// 0-based index of the call in the response.
        index: usize,
    },
    /// The body is not a JSON object with a string `name`.
    #[error("tool call {index} is not valid JSON with a `name`: {message}")]
    BadJson {
        /// 0-based index of the call in the response.
        index: usize,
        /// The parser's message.
        message: String,
    },
}

/// Every tool call in a response, in order. Text between calls is ignored.
pub fn parse_tool_calls(response: &str) -> Result<Vec<ToolCall>, ToolCallError> {
    let mut calls = Vec::new();
    let mut rest = response;
    while let Some(open) = rest.find(TOOL_CALL_OPEN) {
        let index = calls.len();
        let body_start = open + TOOL_CALL_OPEN.len();
        let close = rest[body_start..]
            .find(TOOL_CALL_CLOSE)
            .ok_or(ToolCallError::Unclosed { index })?;
        let body = rest[body_start..body_start + close].trim();
        let call: ToolCall = serde_json::from_str(body).map_err(|err| ToolCallError::BadJson {
            index,
            message: err.to_string(),
        })?;
        calls.push(call);
        rest = &rest[body_start + close + TOOL_CALL_CLOSE.len()..];
    }
    Ok(calls)
}

/// The response with every tool call removed, trimmed (what the model said besides calling tools).
pub fn strip_tool_calls(response: &str) -> String {
    let mut out = String::new();
    let mut rest = response;
    while let Some(open) = rest.find(TOOL_CALL_OPEN) {
        out.push_str(&rest[..open]);
        match rest[open..].find(TOOL_CALL_CLOSE) {
            Some(close) => rest = &rest[open + close + TOOL_CALL_CLOSE.len()..],
            None => {
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out.trim().to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn malformed_think_blocks_are_named() {
        use super::malformed_think;
        for ok in [
            "42",
            "<think>add</think>42",
            "add</think>42",
            "<think>a</think>42<|end|><think>",
        ] {
            assert_eq!(malformed_think(ok), None, "{ok}");
        }
        for (bad, why) in [
            ("<think>add", "never closed"),
            ("<think>a</think><think>b</think>42", "at most one"),
            ("a</think>b</think>", "at most one"),
            ("</think>x<think>", "comes before"),
        ] {
            let reason = malformed_think(bad).unwrap_or_default();
            assert!(reason.contains(why), "{bad}: {reason}");
        }
    }

    use super::*;

    #[test]
    fn a_continuation_after_an_action_renders_like_the_whole_conversation() {
        let start = vec![Message::user("play")];
        let action = "<tool_call>{}</tool_call>";
        let observation = Message::tool("ok");
        let whole = render_prompt(&[
            start[0].clone(),
            Message::assistant(action),
            observation.clone(),
        ]);
        let closed = format!(
            "{}{action}{END_OF_TURN}{}",
            render_prompt(&start),
            render_continuation(Some(&observation), true)
        );
        assert_eq!(closed, whole);
        let cut = format!(
            "{}{action}{}",
            render_prompt(&start),
            render_continuation(Some(&observation), false)
        );
        assert_eq!(cut, whole);
    }

    #[test]
    fn prompt_renders_turns_and_open_assistant_header() {
        let prompt = render_prompt(&[Message::user("12+7=")]);
        assert_eq!(prompt, "<|user|>12+7=<|end|><|assistant|>");
        let convo = render_conversation(&[
            Message::system("s"),
            Message::assistant("<tool_call>{}</tool_call>"),
            Message::tool("k1=3"),
        ]);
        assert_eq!(
            convo,
            "<|system|>s<|end|><|assistant|><tool_call>{}</tool_call><|end|>\
             <|tool|><tool_response>k1=3</tool_response><|end|>"
        );
    }

    #[test]
    fn completion_strips_think_block_and_end_marker() {
        let parsed = parse_completion("<think>7+12 is 19</think> 19<|end|>junk");
        assert_eq!(parsed.response, "19");
        assert_eq!(parsed.thinking.as_deref(), Some("7+12 is 19"));
        assert!(!parsed.unterminated_think);
        let prefilled = parse_completion("so 19</think>19");
        assert_eq!(prefilled.response, "19");
        assert_eq!(parse_completion("19</s><|end|>").response, "19");
        let plain = parse_completion(" 19 ");
        assert_eq!(plain.response, "19");
        assert_eq!(plain.thinking, None);
    }

    #[test]
    fn unterminated_think_has_no_response() {
        let parsed = parse_completion("<think>19 maybe");
        assert!(parsed.unterminated_think);
        assert_eq!(parsed.response, "");
    }

    #[test]
    fn final_answer_prefers_boxed_then_tags_then_hashes() {
        assert_eq!(
            final_answer("so \\boxed{1} no \\boxed{\\frac{3}{4}}"),
            "\\frac{3}{4}"
        );
        assert_eq!(final_answer("x <answer> 42 </answer>"), "42");
        assert_eq!(final_answer("work\n#### 1,000"), "1,000");
        assert_eq!(final_answer(" 19 "), "19");
        assert_eq!(final_answer("\\boxed{unclosed"), "\\boxed{unclosed");
    }

    #[test]
    fn extract_answer_combines_both_steps() {
        assert_eq!(
            extract_answer("<think>a</think>so \\boxed{7}<|end|>").as_deref(),
            Some("7")
        );
        assert_eq!(extract_answer("<think>a"), None);
        assert_eq!(extract_answer("  <|end|>"), None);
    }

    #[test]
    fn code_is_the_last_fenced_block_or_the_bare_response() {
        assert_eq!(
            extract_code("Here:\n```python\ndef f(x):\n    return x\n```\nDone").as_deref(),
            Some("def f(x):\n    return x")
        );
        assert_eq!(
            extract_code("```\nold\n```\ntext\n```py\nnew\n```").as_deref(),
            Some("new")
        );
        assert_eq!(extract_code("```python\nx = 1").as_deref(), Some("x = 1"));
        assert_eq!(
            extract_code("def f(x): return x+3").as_deref(),
            Some("def f(x): return x+3")
        );
        assert_eq!(extract_code("```python\n```"), None);
        assert_eq!(extract_code("  "), None);
    }

    #[test]
    fn tool_calls_round_trip_and_reject_garbage() {
        let call = ToolCall {
            name: "lookup".into(),
            arguments: serde_json::json!({"key": "k1"}),
        };
        let text = format!("let me check {} ok", call.render());
        assert_eq!(parse_tool_calls(&text).unwrap(), vec![call]);
        assert_eq!(strip_tool_calls(&text), "let me check  ok");
        assert!(matches!(
            parse_tool_calls("<tool_call>{\"name\":1}</tool_call>"),
            Err(ToolCallError::BadJson { index: 0, .. })
        ));
        assert!(matches!(
            parse_tool_calls("<tool_call>{}"),
            Err(ToolCallError::Unclosed { index: 0 })
        ));
        assert!(parse_tool_calls("no calls").unwrap().is_empty());
    }
}
