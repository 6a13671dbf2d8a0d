//! Chorus' types to and from the wire messages of the `Environment` service.
//!
//! Two sides use these differently. A server ([`super::serve_environment`]) owns its tasks: the
//! verification data travels as `task_json` and is parsed back into JSON. A client
//! ([`super::RemoteEnvironment`]) treats a plugin's task as opaque: it keeps the wire fields that
//! Chorus' [`Task`] has no place for (`task_json` byte for byte, the plugin's own environment
//! name, its `[0, 1]` difficulty) inside `verification`, so a task sent back to the plugin is the
//! task it made.

use chorus_proto::v1;
use serde::{Deserialize, Serialize};

use crate::chat::{Message, Role};
use crate::env::{Category, EnvInfo, StepOutcome, Turns};
use crate::task::{Score, ScoreComponent, Split, Task};

/// Why a wire message cannot become a Chorus value.
pub(crate) type WireError = String;

pub(crate) fn split_to_wire(split: Split) -> i32 {
    match split {
        Split::Train => v1::Split::Train as i32,
        Split::Heldout => v1::Split::Heldout as i32,
    }
}

pub(crate) fn split_from_wire(split: i32) -> Result<Split, WireError> {
    match v1::Split::try_from(split) {
        Ok(v1::Split::Train) => Ok(Split::Train),
        Ok(v1::Split::Heldout) => Ok(Split::Heldout),
        _ => Err(format!(
            "split {split} is not SPLIT_TRAIN (1) or SPLIT_HELDOUT (2)"
        )),
    }
}

pub(crate) fn message_to_wire(message: &Message) -> v1::ChatMessage {
    v1::ChatMessage {
        role: message.role.as_str().to_string(),
        content: message.content.clone(),
    }
}

pub(crate) fn role_from_wire(role: &str) -> Result<Role, WireError> {
    match role {
        "system" => Ok(Role::System),
        "user" | "" => Ok(Role::User),
        "assistant" => Ok(Role::Assistant),
        "tool" => Ok(Role::Tool),
        other => Err(format!(
            "unknown role `{other}`; allowed: system, user, assistant, tool"
        )),
    }
}

pub(crate) fn message_from_wire(message: &v1::ChatMessage) -> Result<Message, WireError> {
    Ok(Message::new(
        role_from_wire(&message.role)?,
        message.content.clone(),
    ))
}

pub(crate) fn messages_from_wire(messages: &[v1::ChatMessage]) -> Result<Vec<Message>, WireError> {
    messages.iter().map(message_from_wire).collect()
}

/// Fills `system_prompt`, `prompt` and, only when those two cannot say it all, `messages`.
fn prompt_to_wire(prompt: &[Message], wire: &mut v1::Task) {
    let (system, rest) = match prompt.split_first() {
        Some((first, rest)) if first.role == Role::System => (Some(first), rest),
        _ => (None, prompt),
    };
    wire.system_prompt = system.map(|m| m.content.clone()).unwrap_or_default();
    match rest {
        [only] if only.role == Role::User && !(system.is_some_and(|s| s.content.is_empty())) => {
            wire.prompt = only.content.clone();
        }
        _ => {
            wire.prompt = rest
                .iter()
                .find(|m| m.role == Role::User)
                .map(|m| m.content.clone())
                .unwrap_or_default();
            wire.messages = prompt.iter().map(message_to_wire).collect();
        }
    }
}

fn prompt_from_wire(wire: &v1::Task) -> Result<Vec<Message>, WireError> {
    if !wire.messages.is_empty() {
        return messages_from_wire(&wire.messages);
    }
    let mut prompt = Vec::new();
    if !wire.system_prompt.is_empty() {
        prompt.push(Message::system(wire.system_prompt.clone()));
    }
    prompt.push(Message::user(wire.prompt.clone()));
    Ok(prompt)
}

/// The `[0, 1]` difficulty of a level out of `max_level`.
pub(crate) fn level_fraction(level: u32, max_level: u32) -> f32 {
    if max_level == 0 {
        0.0
    } else {
        (level.min(max_level) as f32) / (max_level as f32)
    }
}

/// A task this server made, for the wire.
pub(crate) fn owned_task_to_wire(task: &Task, max_level: u32) -> Result<v1::Task, WireError> {
    let task_json = serde_json::to_string(&task.verification)
        .map_err(|e| format!("task {}: verification is not JSON: {e}", task.id))?;
    let mut wire = v1::Task {
        environment: task.env.clone(),
        task_id: task.id.clone(),
        split: split_to_wire(task.split),
        task_json,
        difficulty: level_fraction(task.difficulty, max_level),
        level: task.difficulty,
        seed: task.seed,
        ..Default::default()
    };
    prompt_to_wire(&task.prompt, &mut wire);
    Ok(wire)
}

/// A task from the wire that this server made (its `task_json` is its verification data).
pub(crate) fn owned_task_from_wire(wire: &v1::Task) -> Result<Task, WireError> {
    let verification = if wire.task_json.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&wire.task_json)
            .map_err(|e| format!("task {}: task_json is not JSON: {e}", wire.task_id))?
    };
    Ok(Task {
        id: wire.task_id.clone(),
        env: wire.environment.clone(),
        split: split_from_wire(wire.split)?,
        difficulty: wire.level,
        seed: wire.seed,
        prompt: prompt_from_wire(wire)?,
        verification,
    })
}

/// What a client keeps of a plugin's task beyond Chorus' own fields, in `verification`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct PluginTaskData {
    /// The plugin's name for the environment that made the task.
    pub environment: String,
    /// The plugin's `task_json`, byte for byte.
    pub task_json: String,
    /// The plugin's `[0, 1]` difficulty.
    pub difficulty: f32,
}

/// A plugin's task, held by a client registered as `env`.
pub(crate) fn plugin_task_from_wire(wire: &v1::Task, env: &str) -> Result<Task, WireError> {
    let data = PluginTaskData {
        environment: wire.environment.clone(),
        task_json: wire.task_json.clone(),
        difficulty: wire.difficulty,
    };
    Ok(Task {
        id: wire.task_id.clone(),
        env: env.to_string(),
        split: split_from_wire(wire.split)?,
        difficulty: wire.level,
        seed: wire.seed,
        prompt: prompt_from_wire(wire)?,
        verification: serde_json::to_value(data).map_err(|e| e.to_string())?,
    })
}

/// A plugin's task, held by a client, back to the wire exactly as the plugin made it.
pub(crate) fn plugin_task_to_wire(task: &Task) -> Result<v1::Task, WireError> {
    let data: PluginTaskData = serde_json::from_value(task.verification.clone()).map_err(|e| {
        format!(
            "task {} was not made by this plugin (its verification data lacks the plugin's fields: {e})",
            task.id
        )
    })?;
    let mut wire = v1::Task {
        environment: data.environment,
        task_id: task.id.clone(),
        split: split_to_wire(task.split),
        task_json: data.task_json,
        difficulty: data.difficulty,
        level: task.difficulty,
        seed: task.seed,
        ..Default::default()
    };
    prompt_to_wire(&task.prompt, &mut wire);
    Ok(wire)
}

pub(crate) fn components_to_wire(
    components: &[ScoreComponent],
) -> (
    std::collections::HashMap<String, f64>,
    Vec<v1::RewardComponent>,
) {
    (
        components
            .iter()
            .map(|c| (c.name.clone(), c.value))
            .collect(),
        components
            .iter()
            .map(|c| v1::RewardComponent {
                name: c.name.clone(),
                value: c.value,
            })
            .collect(),
    )
}

pub(crate) fn components_from_wire(
    map: &std::collections::HashMap<String, f64>,
    ordered: &[v1::RewardComponent],
) -> Vec<ScoreComponent> {
    if !ordered.is_empty() {
        return ordered
            .iter()
            .map(|c| ScoreComponent {
                name: c.name.clone(),
                value: c.value,
            })
            .collect();
    }
    let sorted: std::collections::BTreeMap<_, _> = map.iter().collect();
    sorted
        .into_iter()
        .map(|(name, value)| ScoreComponent {
            name: name.clone(),
            value: *value,
        })
        .collect()
}

pub(crate) fn score_to_wire(score: &Score) -> v1::ScoreResponse {
    let (components, ordered_components) = components_to_wire(&score.components);
    v1::ScoreResponse {
        reward: score.reward,
        components,
        reason: score.reason.clone(),
        ordered_components,
    }
}

pub(crate) fn score_from_wire(wire: &v1::ScoreResponse) -> Result<Score, WireError> {
    if !wire.reward.is_finite() {
        return Err(format!("reward {} is not a finite number", wire.reward));
    }
    Ok(Score {
        reward: wire.reward,
        components: components_from_wire(&wire.components, &wire.ordered_components),
        reason: wire.reason.clone(),
    })
}

pub(crate) fn step_to_wire(outcome: &StepOutcome, state_json: String) -> v1::StepResponse {
    let (reward, components, ordered_components, reason) = match &outcome.score {
        Some(score) => {
            let (map, ordered) = components_to_wire(&score.components);
            (score.reward, map, ordered, score.reason.clone())
        }
        None => (0.0, Default::default(), Vec::new(), String::new()),
    };
    let (observation, observation_role) = match &outcome.observation {
        Some(m) => (m.content.clone(), m.role.as_str().to_string()),
        None => (String::new(), String::new()),
    };
    v1::StepResponse {
        observation,
        done: outcome.done,
        reward,
        reward_components: components,
        state_json,
        reason,
        observation_role,
        ordered_components,
    }
}

pub(crate) fn step_from_wire(wire: &v1::StepResponse) -> Result<StepOutcome, WireError> {
    let observation = if wire.observation.is_empty() && wire.observation_role.is_empty() {
        None
    } else {
        Some(Message::new(
            role_from_wire(&wire.observation_role)?,
            wire.observation.clone(),
        ))
    };
    let score = if wire.done {
        if !wire.reward.is_finite() {
            return Err(format!("reward {} is not a finite number", wire.reward));
        }
        Some(Score {
            reward: wire.reward,
            components: components_from_wire(&wire.reward_components, &wire.ordered_components),
            reason: wire.reason.clone(),
        })
    } else {
        None
    };
    Ok(StepOutcome {
        observation,
        done: wire.done,
        score,
    })
}

fn category_name(category: Category) -> String {
    serde_json::to_value(category)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The category a plugin names; unknown or empty names fall back to `knowledge`.
pub(crate) fn category_from_wire(name: &str) -> Category {
    serde_json::from_value(serde_json::Value::String(name.to_string()))
        .unwrap_or(Category::Knowledge)
}

pub(crate) fn info_to_wire(info: &EnvInfo) -> v1::DescribeResponse {
    v1::DescribeResponse {
        name: info.name.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        description: info.description.clone(),
        multi_turn: info.turns == Turns::Multi,
        max_turns: info.max_turns,
        category: category_name(info.category),
        max_level: info.max_difficulty,
        default_weight: info.default_weight,
        ..Default::default()
    }
}

pub(crate) fn info_from_wire(wire: &v1::DescribeResponse) -> EnvInfo {
    EnvInfo {
        name: wire.name.clone(),
        category: category_from_wire(&wire.category),
        turns: if wire.multi_turn {
            Turns::Multi
        } else {
            Turns::Single
        },
        max_turns: wire.max_turns.max(1),
        default_weight: if wire.default_weight > 0.0 && wire.default_weight.is_finite() {
            wire.default_weight
        } else {
            1.0
        },
        max_difficulty: wire.max_level,
        description: wire.description.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(prompt: Vec<Message>) -> Task {
        Task {
            id: "t1".into(),
            env: "arithmetic".into(),
            split: Split::Heldout,
            difficulty: 2,
            seed: 77,
            prompt,
            verification: serde_json::json!({"answer": 19, "steps": ["a", "b"]}),
        }
    }

    #[test]
    fn owned_tasks_round_trip_whatever_their_prompt() {
        for prompt in [
            vec![Message::user("12+7=")],
            vec![Message::system("be brief"), Message::user("12+7=")],
            vec![
                Message::system(""),
                Message::user("a"),
                Message::assistant("b"),
                Message::tool("c"),
                Message::user("d"),
            ],
        ] {
            let t = task(prompt);
            let wire = owned_task_to_wire(&t, 4).unwrap();
            assert_eq!(wire.difficulty, 0.5);
            assert_eq!(owned_task_from_wire(&wire).unwrap(), t, "{wire:?}");
        }
        // A plain two-turn prompt travels without `messages`, as plugins written by hand do.
        let wire =
            owned_task_to_wire(&task(vec![Message::system("s"), Message::user("u")]), 0).unwrap();
        assert!(wire.messages.is_empty());
        assert_eq!(
            (wire.system_prompt.as_str(), wire.prompt.as_str()),
            ("s", "u")
        );
    }

    #[test]
    fn plugin_tasks_go_back_byte_for_byte() {
        let wire = v1::Task {
            environment: "word_count".into(),
            task_id: "wc-1".into(),
            split: v1::Split::Train as i32,
            system_prompt: String::new(),
            prompt: "count: a b".into(),
            task_json: "{\"b\": 2,  \"a\": [1]}".into(),
            difficulty: 0.25,
            level: 1,
            seed: 9,
            messages: vec![],
        };
        let t = plugin_task_from_wire(&wire, "http://127.0.0.1:1").unwrap();
        assert_eq!(t.env, "http://127.0.0.1:1");
        assert_eq!(t.prompt, vec![Message::user("count: a b")]);
        assert_eq!(plugin_task_to_wire(&t).unwrap(), wire);
        let mut foreign = t.clone();
        foreign.verification = serde_json::json!({"answer": 1});
        assert!(
            plugin_task_to_wire(&foreign)
                .unwrap_err()
                .contains("not made by this plugin")
        );
    }

    #[test]
    fn bad_wire_values_are_named() {
        let mut wire = v1::Task {
            split: 0,
            ..Default::default()
        };
        assert!(
            owned_task_from_wire(&wire)
                .unwrap_err()
                .contains("SPLIT_TRAIN")
        );
        wire.split = 1;
        wire.messages = vec![v1::ChatMessage {
            role: "robot".into(),
            content: "x".into(),
        }];
        assert!(owned_task_from_wire(&wire).unwrap_err().contains("robot"));
        let nan = v1::ScoreResponse {
            reward: f64::NAN,
            ..Default::default()
        };
        assert!(score_from_wire(&nan).is_err());
    }

    #[test]
    fn scores_steps_and_infos_round_trip() {
        let score = Score::zero("no")
            .with_component("z_first", 1.0)
            .with_component("a_second", 0.0);
        assert_eq!(score_from_wire(&score_to_wire(&score)).unwrap(), score);
        let outcome = StepOutcome {
            observation: Some(Message::tool("")),
            done: true,
            score: Some(score),
        };
        let wire = step_to_wire(&outcome, "{}".into());
        assert_eq!(step_from_wire(&wire).unwrap(), outcome);
        let silent = StepOutcome {
            observation: None,
            done: false,
            score: None,
        };
        assert_eq!(
            step_from_wire(&step_to_wire(&silent, String::new())).unwrap(),
            silent
        );
        let info = EnvInfo {
            name: "game".into(),
            category: Category::Game,
            turns: Turns::Multi,
            max_turns: 5,
            default_weight: 0.5,
            max_difficulty: 3,
            description: "d".into(),
        };
        assert_eq!(info_from_wire(&info_to_wire(&info)), info);
        assert_eq!(category_from_wire("no such"), Category::Knowledge);
    }
}
