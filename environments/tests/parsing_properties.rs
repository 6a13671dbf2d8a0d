//! Property tests of what reads model output: no input makes a parser panic, and the NeMo Gym
//! adapter's reading of tool calls gives back exactly the calls and text a completion holds.

use chorus_environments::chat::{
    ToolCall, extract_answer, extract_code, final_answer, last_boxed, malformed_think,
    parse_completion, parse_tool_calls, strip_tool_calls,
};
use chorus_environments::nemo_gym::output_items;
use proptest::prelude::*;
use serde_json::{Value, json};

/// Strings rich in the template's markers, so the parsers meet them in every arrangement.
fn markup() -> impl Strategy<Value = String> {
    let pieces = prop_oneof![
        Just("<think>".to_string()),
        Just("</think>".to_string()),
        Just("<tool_call>".to_string()),
        Just("</tool_call>".to_string()),
        Just("<|end|>".to_string()),
        Just("</s>".to_string()),
        Just("\\boxed{".to_string()),
        Just("}".to_string()),
        Just("```python\n".to_string()),
        Just("```".to_string()),
        Just("{\"name\": \"f\", \"arguments\": {\"x\": 1}}".to_string()),
        "[ -~]{0,12}",
        "\\PC{0,6}",
    ];
    prop::collection::vec(pieces, 0..24).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    #[test]
    fn no_completion_makes_a_parser_panic(text in markup()) {
        let parsed = parse_completion(&text);
        let _ = malformed_think(&text);
        let _ = parse_tool_calls(&parsed.response);
        let _ = strip_tool_calls(&parsed.response);
        let _ = extract_code(&parsed.response);
        let _ = extract_answer(&text);
        let _ = last_boxed(&text);
        let _ = final_answer(&parsed.response);
        let items = output_items(&parsed.response, "p", 0);
        // Every item is a message or a function call, with the fields NeMo Gym requires.
        for item in &items {
            match item["type"].as_str() {
                Some("message") => prop_assert!(item["content"][0]["text"].is_string()),
                Some("function_call") => {
                    prop_assert!(item["name"].is_string() && item["call_id"].is_string());
                    let arguments = item["arguments"].as_str().unwrap();
                    prop_assert!(serde_json::from_str::<Value>(arguments).is_ok());
                }
                other => prop_assert!(false, "item type {other:?}"),
            }
        }
        // An unterminated think block has no response.
        if parsed.unterminated_think {
            prop_assert!(parsed.response.is_empty());
        }
    }
}

/// A piece of an answer: text (no markup in it) or a tool call.
#[derive(Clone, Debug)]
enum Part {
    Text(String),
    Call(String, Value),
}

fn part() -> impl Strategy<Value = Part> {
    prop_oneof![
        "[a-zA-Z0-9 ,.?!]{1,20}"
            .prop_filter("not blank", |t| !t.trim().is_empty())
            .prop_map(Part::Text),
        (
            "[a-z_]{1,10}",
            prop::collection::btree_map("[a-z]{1,5}", -1000i64..1000, 0..3)
        )
            .prop_map(|(name, args)| Part::Call(name, json!(args))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn tool_calls_and_text_come_back_as_items_in_order(parts in prop::collection::vec(part(), 1..8)) {
        let completion: String = parts
            .iter()
            .map(|p| match p {
                Part::Text(t) => t.clone(),
                Part::Call(name, arguments) => ToolCall { name: name.clone(), arguments: arguments.clone() }.render(),
            })
            .collect();
        // What the items should be: calls one each, consecutive text merged and trimmed.
        let mut expected: Vec<Value> = vec![];
        let mut text = String::new();
        for p in &parts {
            match p {
                Part::Text(t) => text.push_str(t),
                Part::Call(name, arguments) => {
                    if !text.trim().is_empty() {
                        expected.push(json!({"message": text.trim()}));
                    }
                    text.clear();
                    expected.push(json!({"call": name, "arguments": arguments}));
                }
            }
        }
        if !text.trim().is_empty() {
            expected.push(json!({"message": text.trim()}));
        }
        let got: Vec<Value> = output_items(&completion, "p", 0)
            .iter()
            .map(|item| match item["type"].as_str() {
                Some("message") => json!({"message": item["content"][0]["text"]}),
                _ => json!({
                    "call": item["name"],
                    "arguments": serde_json::from_str::<Value>(item["arguments"].as_str().unwrap()).unwrap(),
                }),
            })
            .collect();
        prop_assert_eq!(got, expected);
    }
}
