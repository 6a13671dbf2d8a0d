//! Property tests of the SFT transcripts reader (`stages.data`): valid chat transcripts with
//! values removed or replaced by values of another type, lines that are not JSON, blank lines.
//! Every file is read, or refused with an error that names the file and a line of it (`:N:`);
//! no line makes the reader panic.

use std::path::Path;

use chorus_orchestrator::transcripts::Transcripts;
use proptest::prelude::*;
use serde_json::{Value, json};

fn row(n: usize) -> Value {
    [
        json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}),
        json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>2+2</think>4"},
            {"role": "user", "content": "3+3?"},
            {"role": "assistant", "content": "6"}
        ]}),
    ][n % 2]
        .clone()
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        Just(json!(-1)),
        Just(json!(u64::MAX)),
        Just(json!("")),
        Just(json!("assistant")),
        Just(json!("tool")),
        "\\PC{0,10}".prop_map(Value::String),
        Just(json!([])),
        Just(json!({})),
        any::<bool>().prop_map(Value::Bool),
    ]
}

/// Every value of `v`, depth first, as JSON pointers.
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                out.push(format!("{at}/{k}"));
                pointers(x, format!("{at}/{k}"), out);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                out.push(format!("{at}/{i}"));
                pointers(x, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

#[derive(Clone, Debug)]
enum Line {
    Row(usize, Vec<(usize, Option<Value>)>),
    Blank,
    Garbage(String),
}

fn line() -> impl Strategy<Value = Line> {
    prop_oneof![
        8 => (any::<usize>(), prop::collection::vec((any::<usize>(), prop::option::of(value())), 0..3))
            .prop_map(|(n, m)| Line::Row(n, m)),
        1 => Just(Line::Blank),
        1 => prop_oneof![Just("{".to_string()), Just("[]".to_string()), "\\PC{1,12}"].prop_map(Line::Garbage),
    ]
}

fn render(l: &Line) -> String {
    match l {
        Line::Blank => String::new(),
        Line::Garbage(g) => g.replace(['\n', '\r'], " "),
        Line::Row(n, mutations) => {
            let mut v = row(*n);
            for (at, with) in mutations {
                let mut all = vec![];
                pointers(&v, String::new(), &mut all);
                if all.is_empty() {
                    break;
                }
                let p = &all[at % all.len()];
                match with {
                    Some(x) => {
                        if let Some(slot) = v.pointer_mut(p) {
                            *slot = x.clone();
                        }
                    }
                    None => {
                        let (parent, key) = p.rsplit_once('/').unwrap();
                        let parent = if parent.is_empty() {
                            Some(&mut v)
                        } else {
                            v.pointer_mut(parent)
                        };
                        match parent {
                            Some(Value::Object(m)) => {
                                m.remove(key);
                            }
                            Some(Value::Array(a)) => {
                                a.remove(key.parse::<usize>().unwrap());
                            }
                            _ => {}
                        }
                    }
                }
            }
            v.to_string()
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, .. ProptestConfig::default() })]

    #[test]
    fn any_transcripts_are_read_or_refused_by_file_and_line(lines in prop::collection::vec(line(), 0..6)) {
        let text = lines.iter().map(render).collect::<Vec<_>>().join("\n");
        let path = Path::new("data/chats.jsonl");
        match Transcripts::parse(&text, path) {
            Ok(t) => {
                prop_assert!(!t.rows.is_empty());
                for r in &t.rows {
                    prop_assert!(r.line >= 1 && r.line <= lines.len());
                }
            }
            Err(e) => {
                let message = e.to_string();
                prop_assert!(message.starts_with("data/chats.jsonl"), "{message}");
                // `path:N: …` with N a line of the file, or the file as a whole (no rows).
                let rest = &message["data/chats.jsonl".len()..];
                let line: Option<usize> = rest
                    .strip_prefix(':')
                    .and_then(|r| r.split(':').next())
                    .and_then(|n| n.parse().ok());
                prop_assert!(
                    line.is_some_and(|n| n >= 1 && n <= lines.len()) || message.contains("no transcripts"),
                    "{message}"
                );
            }
        }
    }
}
