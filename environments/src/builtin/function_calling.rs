//! `function_calling`: pick the right tool and fill its arguments from a request, as one
//! `<tool_call>{"name": …, "arguments": {…}}</tool_call>`.
//!
//! Level 0 lists just the right tool and needs one argument (`Tools: get_weather(city)` /
//! `Weather in Oslo?`); higher levels list more tools (up to all seven), use tools with several
//! arguments and requests that set optional ones. Arguments are compared by value: strings
//! ignoring case and surrounding space, numbers numerically; unexpected arguments fail.

use rand::Rng;
use rand::seq::{IndexedRandom, SliceRandom};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::bfcl::same_value;
use crate::chat::{Message, ToolCall, parse_tool_calls};
use crate::env::{Category, EnvInfo, Environment, Turns, response_or_zero};
use crate::error::EnvError;
use crate::sampling::{TaskOrigin, TaskRng, draw_in_split, make_task};
use crate::task::{Score, Split, Task};

const NAME: &str = "function_calling";
const MAX_DIFFICULTY: u32 = 8;

const CITIES: [&str; 20] = [
    "Oslo", "Lima", "Pune", "Cairo", "Quito", "Perth", "Dakar", "Riga", "Hanoi", "Turin", "Accra",
    "Bergen", "Cusco", "Davao", "Essen", "Fiji", "Gdansk", "Hilo", "Izmir", "Juba",
];
const PEOPLE: [&str; 8] = ["Ann", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Ivy"];
const MESSAGES: [&str; 6] = [
    "running late",
    "call me",
    "see you soon",
    "lunch at noon",
    "thanks",
    "on my way",
];
const SONGS: [&str; 12] = [
    "Blue Sky",
    "Night Train",
    "Paper Moon",
    "Red River",
    "Slow Tide",
    "Old Road",
    "Green Door",
    "Lucky Star",
    "Cold Rain",
    "Wild Fire",
    "Short Walk",
    "Long Way",
];
const CURRENCIES: [&str; 6] = ["USD", "EUR", "JPY", "GBP", "INR", "BRL"];
const TOPICS: [&str; 6] = ["birds", "space", "cooking", "chess", "rivers", "robots"];
const EVENTS: [&str; 6] = ["Dentist", "Team sync", "Yoga", "Dinner", "Review", "Flight"];

/// (name, signature as shown in the prompt, shorter signature for level 0).
const TOOLS: [(&str, &str, &str); 7] = [
    (
        "get_weather",
        "get_weather(city, unit?: celsius|fahrenheit)",
        "get_weather(city)",
    ),
    ("play_song", "play_song(title)", "play_song(title)"),
    ("set_alarm", "set_alarm(hour: int, minute: int)", ""),
    ("send_message", "send_message(to, text)", ""),
    (
        "convert_currency",
        "convert_currency(amount: number, from, to)",
        "",
    ),
    ("add_event", "add_event(title, date: YYYY-MM-DD)", ""),
    ("search_books", "search_books(query, limit?: int)", ""),
];

/// Parameters each tool accepts.
fn parameters(tool: &str) -> &'static [&'static str] {
    match tool {
        "get_weather" => &["city", "unit"],
        "play_song" => &["title"],
        "set_alarm" => &["hour", "minute"],
        "send_message" => &["to", "text"],
        "convert_currency" => &["amount", "from", "to"],
        "add_event" => &["title", "date"],
        "search_books" => &["query", "limit"],
        _ => &[],
    }
}

/// Single-call function calling.
#[derive(Debug, Clone, Default)]
pub struct FunctionCalling;

#[derive(Debug, Serialize, Deserialize)]
struct Verification {
    name: String,
    arguments: Map<String, Value>,
}

/// A request for tool `index` and the call that serves it.
fn request(rng: &mut TaskRng, index: usize, level: u32) -> Option<(String, Map<String, Value>)> {
    let optional = level >= 2 && rng.random_bool(0.5);
    let (text, args) = match index {
        0 => {
            let city = *CITIES.choose(rng)?;
            if optional {
                let unit = *["celsius", "fahrenheit"].choose(rng)?;
                (
                    format!("Weather in {city} in {unit}?"),
                    json!({"city": city, "unit": unit}),
                )
            } else {
                (format!("Weather in {city}?"), json!({"city": city}))
            }
        }
        1 => {
            let song = *SONGS.choose(rng)?;
            (format!("Play {song}."), json!({"title": song}))
        }
        2 => {
            let (hour, minute) = (rng.random_range(0..24), rng.random_range(0..12) * 5);
            (
                format!("Wake me at {hour}:{minute:02}."),
                json!({"hour": hour, "minute": minute}),
            )
        }
        3 => {
            let (to, text) = (*PEOPLE.choose(rng)?, *MESSAGES.choose(rng)?);
            (
                format!("Text {to}: {text}"),
                json!({"to": to, "text": text}),
            )
        }
        4 => {
            let amount = rng.random_range(1..500) * 5;
            let mut codes = CURRENCIES.to_vec();
            codes.shuffle(rng);
            (
                format!("Convert {amount} {} to {}.", codes[0], codes[1]),
                json!({"amount": amount, "from": codes[0], "to": codes[1]}),
            )
        }
        5 => {
            let title = *EVENTS.choose(rng)?;
            let date = format!(
                "2026-{:02}-{:02}",
                rng.random_range(1..=12),
                rng.random_range(1..=28)
            );
            (
                format!("Add {title} on {date}."),
                json!({"title": title, "date": date}),
            )
        }
        _ => {
            let topic = *TOPICS.choose(rng)?;
            if optional {
                let limit = rng.random_range(2..10);
                (
                    format!("Find {limit} books about {topic}."),
                    json!({"query": topic, "limit": limit}),
                )
            } else {
                (
                    format!("Find books about {topic}."),
                    json!({"query": topic}),
                )
            }
        }
    };
    Some((text, args.as_object()?.clone()))
}

fn score_call(expected: &Verification, call: &ToolCall) -> Score {
    if call.name != expected.name {
        return Score::zero(format!("called {}, expected {}", call.name, expected.name))
            .with_component("called", 1.0)
            .with_component("name", 0.0)
            .with_component("arguments", 0.0);
    }
    let given = call.arguments.as_object().cloned().unwrap_or_default();
    let mut problems = Vec::new();
    let mut right = 0;
    for (key, want) in &expected.arguments {
        match given.get(key) {
            Some(got) if same_value(want, got) => right += 1,
            Some(got) => problems.push(format!("{key}={got}, expected {want}")),
            None => problems.push(format!("missing {key}")),
        }
    }
    for key in given
        .keys()
        .filter(|k| !expected.arguments.contains_key(*k))
    {
        if parameters(&expected.name).contains(&key.as_str()) {
            problems.push(format!("{key} was not asked for"));
        } else {
            problems.push(format!("{} has no parameter {key}", expected.name));
        }
    }
    let fraction = right as f64 / expected.arguments.len().max(1) as f64;
    let reason = if problems.is_empty() {
        format!("correct call to {}", expected.name)
    } else {
        problems.join("; ")
    };
    Score::binary(problems.is_empty(), reason)
        .with_component("called", 1.0)
        .with_component("name", 1.0)
        .with_component("arguments", fraction)
}

impl Environment for FunctionCalling {
    fn info(&self) -> EnvInfo {
        EnvInfo {
            name: NAME.into(),
            category: Category::ToolUse,
            turns: Turns::Single,
            max_turns: 1,
            default_weight: 1.0,
            max_difficulty: MAX_DIFFICULTY,
            description:
                "Choose a tool and its arguments for a request; one <tool_call> compared by value"
                    .into(),
        }
    }

    fn sample(&self, seed: u64, split: Split, difficulty: u32) -> Result<Task, EnvError> {
        let level = difficulty.min(MAX_DIFFICULTY);
        let (key, verification) = draw_in_split(NAME, seed, split, difficulty, |rng| {
            // Level 0 keeps to the one-argument tools.
            let index = if level == 0 {
                rng.random_range(0..2)
            } else {
                rng.random_range(0..TOOLS.len())
            };
            let (text, arguments) = request(rng, index, level)?;
            let mut shown: Vec<usize> = (0..TOOLS.len()).filter(|&i| i != index).collect();
            shown.shuffle(rng);
            shown.truncate((level as usize).min(TOOLS.len() - 1));
            shown.push(index);
            shown.shuffle(rng);
            let signatures: Vec<&str> = shown
                .iter()
                .map(|&i| if level == 0 { TOOLS[i].2 } else { TOOLS[i].1 })
                .collect();
            let content = format!("Tools: {}\n{text}", signatures.join("; "));
            Some((
                content,
                Verification {
                    name: TOOLS[index].0.to_string(),
                    arguments,
                },
            ))
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
        let expected: Verification = task.verification_as()?;
        let response = match response_or_zero(completion) {
            Ok(response) => response,
            Err(zero) => return Ok(zero),
        };
        Ok(match parse_tool_calls(&response) {
            Err(err) => {
                Score::zero(format!("malformed tool call: {err}")).with_component("called", 0.0)
            }
            Ok(calls) => match calls.as_slice() {
                [] => Score::zero("no tool call").with_component("called", 0.0),
                [call] => score_call(&expected, call),
                more => Score::zero(format!("{} tool calls, expected one", more.len()))
                    .with_component("called", 0.0),
            },
        })
    }

    fn reference(&self, task: &Task) -> Result<String, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        Ok(ToolCall {
            name: expected.name,
            arguments: Value::Object(expected.arguments),
        }
        .render())
    }

    fn wrong_completions(&self, task: &Task) -> Result<Vec<String>, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        let reference = self.reference(task)?;
        let mut missing = expected.arguments.clone();
        let first = missing.keys().next().cloned().unwrap_or_default();
        missing.remove(&first);
        let mut extra = expected.arguments.clone();
        extra.insert("verbose".into(), json!(true));
        let other = TOOLS
            .iter()
            .find(|(name, _, _)| *name != expected.name)
            .map(|(name, _, _)| *name)
            .unwrap_or("none");
        Ok(vec![
            ToolCall {
                name: expected.name.clone(),
                arguments: Value::Object(missing),
            }
            .render(),
            ToolCall {
                name: expected.name.clone(),
                arguments: Value::Object(extra),
            }
            .render(),
            ToolCall {
                name: other.into(),
                arguments: Value::Object(expected.arguments.clone()),
            }
            .render(),
            format!("{reference}{reference}"),
            reference.replace("</tool_call>", ""),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin::testkit::*;

    #[test]
    fn self_check_passes() {
        assert_self_check_passes(&FunctionCalling, &[0, 1, 4, 8], 10);
    }

    #[test]
    fn splits_are_disjoint() {
        assert_splits_disjoint(&FunctionCalling, 0, 40);
        assert_splits_disjoint(&FunctionCalling, 5, 100);
    }

    #[test]
    fn level_zero_is_short() {
        for seed in 0..10 {
            let task = train_task(&FunctionCalling, seed, 0);
            assert!(
                task.prompt[0].content.len() < 50,
                "{}",
                task.prompt[0].content
            );
        }
    }

    #[test]
    fn arguments_compare_by_value() {
        let task = Task {
            verification: json!({"name": "set_alarm", "arguments": {"hour": 7, "minute": 5}}),
            ..train_task(&FunctionCalling, 0, 3)
        };
        let call = |args: Value| {
            ToolCall {
                name: "set_alarm".into(),
                arguments: args,
            }
            .render()
        };
        assert_eq!(
            reward(
                &FunctionCalling,
                &task,
                &call(json!({"minute": 5.0, "hour": "7"}))
            ),
            1.0
        );
        assert_eq!(
            reward(
                &FunctionCalling,
                &task,
                &call(json!({"hour": 7, "minute": 6}))
            ),
            0.0
        );
        let partial = FunctionCalling
            .score(&task, &call(json!({"hour": 7})))
            .unwrap();
        assert_eq!(partial.component("arguments"), Some(0.5));
        assert_eq!(reward(&FunctionCalling, &task, "set_alarm(7, 5)"), 0.0);
    }
}
