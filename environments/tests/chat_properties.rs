//! Property tests of the chat template's rendering and of tool calls, for content of any kind
//! (the template's own markers included): a prompt is its conversation plus the open assistant
//! header; a multi-turn continuation appended to the policy's action gives the next prompt; a
//! rendered tool call reads back as itself; a tool section lands in the first system message.

use chorus_environments::chat::{
    END_OF_TURN, Message, Role, TOOL_CALL_CLOSE, TOOLS_HEADER, ToolCall, parse_tool_calls,
    render_continuation, render_conversation, render_prompt, tool_section, with_tool_section,
};
use proptest::prelude::*;
use serde_json::{Value, json};

fn text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("<|end|>".to_string()),
        Just("<|assistant|>".to_string()),
        Just("<think>".to_string()),
        Just("</think>".to_string()),
        Just("<tool_call>".to_string()),
        Just("</tool_call>".to_string()),
        Just("<tool_response>".to_string()),
        Just("\"".to_string()),
        Just("\\".to_string()),
        "[ -~]{0,10}",
        "\\PC{0,4}",
    ];
    prop::collection::vec(piece, 0..6).prop_map(|v| v.concat())
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![
        Just(Role::System),
        Just(Role::User),
        Just(Role::Assistant),
        Just(Role::Tool),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    (role(), text()).prop_map(|(r, t)| Message::new(r, t))
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| json!(i)),
        // Binary fractions: serde_json reads them back exactly (not every float's last digit).
        (-1_000_000i64..1_000_000).prop_map(|i| json!(i as f64 / 4.0)),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(text(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, .. ProptestConfig::default() })]

    #[test]
    fn a_prompt_is_its_conversation_and_continuations_extend_it(
        messages in prop::collection::vec(message(), 0..5),
        action in text(),
        observation in prop::option::of(message()),
        closed in any::<bool>(),
    ) {
        let conversation = render_conversation(&messages);
        let prompt = render_prompt(&messages);
        prop_assert_eq!(&prompt, &format!("{conversation}{}", render_continuation(None, true)));
        // The policy's action, closed with the end-of-turn marker or cut off before it, then
        // the continuation: the prompt of the conversation with the action and observation.
        let mut next = messages.clone();
        next.push(Message::assistant(action.clone()));
        next.extend(observation.clone());
        let written = if closed { format!("{action}{END_OF_TURN}") } else { action.clone() };
        prop_assert_eq!(
            format!("{prompt}{written}{}", render_continuation(observation.as_ref(), closed)),
            render_prompt(&next)
        );
    }

    #[test]
    fn a_rendered_tool_call_reads_back_as_itself(name in text(), arguments in json_value()) {
        let call = ToolCall { name, arguments };
        let rendered = call.render();
        let json = serde_json::to_string(&call).unwrap();
        match parse_tool_calls(&rendered) {
            Ok(calls) => prop_assert_eq!(calls, vec![call]),
            // Only a call whose JSON holds the closing marker itself cannot be read back.
            Err(e) => prop_assert!(json.contains(TOOL_CALL_CLOSE), "{e}: {rendered}"),
        }
    }

    #[test]
    fn a_tool_section_lands_in_the_first_system_message(
        messages in prop::collection::vec(message(), 0..4),
        functions in prop::collection::vec(json_value(), 0..4),
    ) {
        let section = tool_section(&functions);
        prop_assert!(section.starts_with(TOOLS_HEADER));
        prop_assert_eq!(section.lines().count(), 1 + functions.iter().map(|f| f.to_string().lines().count()).sum::<usize>());
        let with = with_tool_section(messages.clone(), section.clone());
        let first_is_system = messages.first().is_some_and(|m| m.role == Role::System);
        prop_assert_eq!(with.len(), messages.len() + usize::from(!first_is_system));
        prop_assert_eq!(with[0].role, Role::System);
        prop_assert!(with[0].content.ends_with(&section));
        prop_assert_eq!(&with[1..], if first_is_system { &messages[1..] } else { &messages[..] });
    }
}
