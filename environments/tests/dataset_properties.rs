//! Property tests of every reader of users' JSONL datasets (GSM8K, multiple choice, HumanEval,
//! MBPP, BFCL, IFEval, NeMo Gym rows, preference pairs): valid rows with values removed or
//! replaced by values of another type or absurd size, lines that are not JSON, blank lines.
//! Every file is read, or refused with an error that names the file and a line of it; no row
//! makes a reader panic, and an environment built from rows it accepted samples, gives its
//! reference and its wrong completions, and scores without a panic.

use chorus_environments::builtin::{Bfcl, CodePython, InstructionFollowing, MathWord, Mcqa};
use chorus_environments::preference::parse_preferences;
use chorus_environments::{Environment, NemoGym, Split};
use proptest::prelude::*;
use serde_json::{Value, json};

const SOURCE: &str = "rows.jsonl";

/// What a reader built: an environment to exercise, or nothing to exercise (rows alone).
type Read = Result<Option<Box<dyn Environment>>, String>;

/// A reader: its name, valid rows, and what it builds from text.
struct Reader {
    name: &'static str,
    rows: fn() -> Vec<Value>,
    read: fn(&str) -> Read,
    /// Whether scoring runs a sandbox (then it is not exercised here).
    sandboxed: bool,
}

fn env<E: Environment + 'static, Err: std::fmt::Display>(r: Result<E, Err>) -> Read {
    r.map(|e| Some(Box::new(e) as Box<dyn Environment>))
        .map_err(|e| e.to_string())
}

const READERS: &[Reader] = &[
    Reader {
        name: "gsm8k",
        rows: || {
            vec![
                json!({"question": "What is 2+2?", "answer": "2+2=4\n#### 4"}),
                json!({"question": "Half of 10?", "answer": "10/2=5\n#### 5"}),
            ]
        },
        read: |t| env(MathWord::from_gsm8k_str(t, SOURCE)),
        sandboxed: false,
    },
    Reader {
        name: "mcqa",
        rows: || {
            vec![
                json!({"question": "Capital of France?", "choices": ["Rome", "Paris", "Oslo"], "answer": 1}),
                json!({"question": "Sky?", "choices": ["blue", "red"], "answer": "A", "context": "It is blue."}),
            ]
        },
        read: |t| env(Mcqa::from_jsonl_str(t, SOURCE)),
        sandboxed: false,
    },
    Reader {
        name: "humaneval",
        rows: || {
            vec![json!({
                "task_id": "HumanEval/0",
                "prompt": "def add(a, b):\n    \"\"\"Add.\"\"\"\n",
                "canonical_solution": "    return a + b\n",
                "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n",
                "entry_point": "add"
            })]
        },
        read: |t| env(CodePython::from_humaneval_str(t, SOURCE)),
        sandboxed: true,
    },
    Reader {
        name: "mbpp",
        rows: || {
            vec![json!({
                "task_id": 11,
                "text": "Write a function that adds two numbers.",
                "code": "def add(a, b):\n    return a + b",
                "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"],
                "test_setup_code": ""
            })]
        },
        read: |t| env(CodePython::from_mbpp_str(t, SOURCE)),
        sandboxed: true,
    },
    Reader {
        name: "bfcl",
        rows: || {
            vec![json!({
                "id": "simple_0",
                "question": [[{"role": "user", "content": "Area of a triangle, base 10, height 5."}]],
                "function": [{"name": "area", "description": "Area.", "parameters": {"type": "dict", "properties": {"base": {"type": "integer"}, "height": {"type": "integer"}}, "required": ["base", "height"]}}],
                "ground_truth": [{"area": {"base": [10], "height": [5]}}]
            })]
        },
        read: |t| env(Bfcl::from_jsonl_str(t, SOURCE)),
        sandboxed: false,
    },
    Reader {
        name: "ifeval",
        rows: || {
            vec![
                json!({"key": 2, "prompt": "Describe a city.", "instruction_id_list": ["detectable_format:number_bullet_lists", "startend:end_checker"], "kwargs": [{"num_bullets": 3}, {"end_phrase": "Anything else?"}]}),
                json!({"key": 3, "prompt": "Say hi.", "instruction_id_list": ["detectable_format:title"], "kwargs": [{}]}),
            ]
        },
        read: |t| env(InstructionFollowing::from_ifeval_str(t, SOURCE)),
        sandboxed: false,
    },
    Reader {
        name: "nemo_gym",
        rows: || {
            vec![
                json!({"responses_create_params": {"input": [{"role": "user", "content": "Which is blue? A) sun B) sky."}], "temperature": 1.0}, "expected_answer": "B", "uuid": "q1"}),
                json!({"responses_create_params": {"input": [{"role": "user", "content": "Hot? A) sun B) ice"}], "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}]}, "expected_answer": "A"}),
            ]
        },
        // Built without a server: scoring would call it, so only reading is exercised.
        read: |t| {
            NemoGym::from_jsonl_str("gym", "http://127.0.0.1:9", t, SOURCE)
                .map(|_| None)
                .map_err(|e| e.to_string())
        },
        sandboxed: true,
    },
    Reader {
        name: "preferences",
        rows: || {
            vec![
                json!({"prompt": "Name a prime.", "chosen": "7 is prime.", "rejected": "9 is prime."}),
                json!({"prompt": [{"role": "user", "content": "Hi"}], "response_1": "Hello!", "response_2": "What?", "scores": [4, 2], "ranking": 2}),
            ]
        },
        read: |t| {
            parse_preferences(t, SOURCE)
                .map(|_| None)
                .map_err(|e| e.to_string())
        },
        sandboxed: true,
    },
];

/// A change to a row.
#[derive(Clone, Debug)]
enum Mutation {
    Set(usize, Value),
    Remove(usize),
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        Just(json!(-1)),
        Just(json!(0)),
        Just(json!(u64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(-1e308)),
        Just(json!("")),
        Just(json!("#### ")),
        Just(json!("#### 1e999")),
        "\\PC{0,12}".prop_map(Value::String),
        Just(json!([])),
        Just(json!({})),
        Just(json!([[]])),
        Just(json!([{}])),
        any::<bool>().prop_map(Value::Bool),
    ]
}

/// One line of the file.
#[derive(Clone, Debug)]
enum Line {
    /// Valid row `n` (modulo the reader's rows) with mutations.
    Row(usize, Vec<Mutation>),
    Blank,
    Garbage(String),
}

fn line() -> impl Strategy<Value = Line> {
    prop_oneof![
        8 => (
            any::<usize>(),
            prop::collection::vec(
                prop_oneof![
                    3 => (any::<usize>(), value()).prop_map(|(n, v)| Mutation::Set(n, v)),
                    1 => any::<usize>().prop_map(Mutation::Remove),
                ],
                0..3
            )
        )
            .prop_map(|(n, m)| Line::Row(n, m)),
        1 => Just(Line::Blank),
        1 => prop_oneof![Just("{".to_string()), Just("[]".to_string()), Just("null".to_string()), "\\PC{1,12}"]
            .prop_map(Line::Garbage),
    ]
}

fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let p = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
                out.push(p.clone());
                pointers(x, p, out);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                let p = format!("{at}/{i}");
                out.push(p.clone());
                pointers(x, p, out);
            }
        }
        _ => {}
    }
}

fn mutate(mut v: Value, mutations: &[Mutation]) -> Value {
    for m in mutations {
        let mut all = vec![];
        pointers(&v, String::new(), &mut all);
        if all.is_empty() {
            break;
        }
        match m {
            Mutation::Set(n, x) => {
                if let Some(slot) = v.pointer_mut(&all[n % all.len()]) {
                    *slot = x.clone();
                }
            }
            Mutation::Remove(n) => {
                let p = &all[n % all.len()];
                let (parent, key) = p.rsplit_once('/').unwrap();
                let parent = if parent.is_empty() {
                    Some(&mut v)
                } else {
                    v.pointer_mut(parent)
                };
                match parent {
                    Some(Value::Object(m)) => {
                        m.remove(&key.replace("~1", "/").replace("~0", "~"));
                    }
                    Some(Value::Array(a)) => {
                        if let Ok(i) = key.parse::<usize>()
                            && i < a.len()
                        {
                            a.remove(i);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    v
}

/// Uses an environment built from accepted rows: a panic here is a row the reader should have
/// refused.
fn exercise(env: &dyn Environment, sandboxed: bool) {
    for split in Split::ALL {
        for seed in 0..3 {
            let Ok(task) = env.sample(seed, split, 0) else {
                continue;
            };
            let reference = env.reference(&task);
            let _ = env.wrong_completions(&task);
            if !sandboxed {
                let _ = env.score(&task, "");
                let _ = env.score(
                    &task,
                    "<think>x</think>\\boxed{4} The answer is B. ```\n1\n```",
                );
                if let Ok(r) = reference {
                    let _ = env.score(&task, &r);
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, .. ProptestConfig::default() })]

    #[test]
    fn any_rows_are_read_or_refused_by_file_and_line(which in 0..READERS.len(), lines in prop::collection::vec(line(), 0..6)) {
        let reader = &READERS[which];
        let rows = (reader.rows)();
        let text: Vec<String> = lines
            .iter()
            .map(|l| match l {
                Line::Row(n, m) => mutate(rows[n % rows.len()].clone(), m).to_string(),
                Line::Blank => "   ".to_string(),
                Line::Garbage(g) => g.replace('\n', " "),
            })
            .collect();
        let text = text.join("\n");
        match (reader.read)(&text) {
            Ok(Some(env)) => exercise(env.as_ref(), reader.sandboxed),
            Ok(None) => {}
            // IFEval refuses the instruction ids it cannot verify all at once, by id, without
            // their file and lines (`EnvError::UnsupportedInstructions`).
            Err(message) if reader.name == "ifeval" && message.starts_with("unsupported IFEval instruction ids") => {}
            Err(message) => {
                prop_assert!(message.contains(SOURCE), "{}: `{message}` does not name the file", reader.name);
                // `line N`, with N a line of the file (0: the file as a whole, e.g. no rows).
                let n: Option<usize> = message
                    .split(SOURCE)
                    .nth(1)
                    .and_then(|rest| rest.trim_start_matches([':', ' ']).strip_prefix("line "))
                    .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
                    .and_then(|d| d.parse().ok());
                prop_assert!(
                    n.is_some_and(|n| n <= lines.len()) || !text.lines().any(|l| !l.trim().is_empty()),
                    "{}: `{message}` names no line of the {} lines",
                    reader.name,
                    lines.len()
                );
            }
        }
    }
}
