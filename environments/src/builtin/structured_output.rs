//! `structured_output`: reply with bare JSON that satisfies the JSON Schema in the prompt.
//!
//! The validator covers the subset the generator uses: `type` (object, array, string, integer,
//! number, boolean, null), `properties`, `required`, `additionalProperties: false`, `enum`,
//! `minimum`/`maximum`, `minLength`/`maxLength`, `items`, `minItems`/`maxItems`. Unknown keywords
//! are ignored. A fenced code block is a parse error, as in NeMo Gym's structured_outputs. Level
//! 0 is one required integer property; higher levels add properties, strings, booleans, enums,
//! bounds, arrays, optional properties and nested objects.

use rand::Rng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::chat::Message;
use crate::env::{Category, EnvInfo, Environment, Turns, response_or_zero};
use crate::error::EnvError;
use crate::sampling::{TaskOrigin, TaskRng, draw_in_split, make_task};
use crate::task::{Score, Split, Task};

const NAME: &str = "structured_output";
const MAX_DIFFICULTY: u32 = 10;
const FIELD_NAMES: [&str; 32] = [
    "id", "name", "age", "tags", "price", "active", "color", "size", "count", "city", "score",
    "email", "level", "items", "owner", "note", "title", "year", "rank", "code", "kind", "day",
    "team", "width", "height", "label", "mode", "state", "total", "user", "words", "zone",
];
const ENUM_WORDS: [&str; 10] = [
    "red", "blue", "small", "large", "low", "high", "on", "off", "yes", "no",
];
/// Most validation errors listed in a reason.
const MAX_REPORTED_ERRORS: usize = 3;

/// JSON replies validated against a generated JSON Schema.
#[derive(Debug, Clone, Default)]
pub struct StructuredOutput;

#[derive(Debug, Serialize, Deserialize)]
struct Verification {
    schema: Value,
}

fn type_matches(expected: &str, value: &Value) -> bool {
    match expected {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => {
            value.as_i64().is_some()
                || value.as_u64().is_some()
                || value.as_f64().is_some_and(|f| f.fract() == 0.0)
        }
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        _ => false,
    }
}

/// Validates `value` against `schema`, appending `path: problem` lines to `errors`.
fn validate(schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    let Some(schema) = schema.as_object() else {
        return;
    };
    if let Some(expected) = schema.get("type") {
        let allowed: Vec<&str> = match expected {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if !allowed.is_empty() && !allowed.iter().any(|t| type_matches(t, value)) {
            errors.push(format!(
                "{path}: expected {}, got {}",
                allowed.join(" or "),
                kind_of(value)
            ));
            return;
        }
    }
    if let Some(Value::Array(options)) = schema.get("enum")
        && !options.contains(value)
    {
        errors.push(format!(
            "{path}: {value} is not one of {}",
            Value::Array(options.clone())
        ));
    }
    if let Some(number) = value.as_f64() {
        if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
            && number < min
        {
            errors.push(format!("{path}: {number} < minimum {min}"));
        }
        if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
            && number > max
        {
            errors.push(format!("{path}: {number} > maximum {max}"));
        }
    }
    if let Some(text) = value.as_str() {
        let length = text.chars().count() as u64;
        if schema
            .get("minLength")
            .and_then(Value::as_u64)
            .is_some_and(|min| length < min)
        {
            errors.push(format!("{path}: string shorter than minLength"));
        }
        if schema
            .get("maxLength")
            .and_then(Value::as_u64)
            .is_some_and(|max| length > max)
        {
            errors.push(format!("{path}: string longer than maxLength"));
        }
    }
    if let Some(items) = value.as_array() {
        let count = items.len() as u64;
        if schema
            .get("minItems")
            .and_then(Value::as_u64)
            .is_some_and(|min| count < min)
        {
            errors.push(format!("{path}: fewer than minItems items"));
        }
        if schema
            .get("maxItems")
            .and_then(Value::as_u64)
            .is_some_and(|max| count > max)
        {
            errors.push(format!("{path}: more than maxItems items"));
        }
        if let Some(item_schema) = schema.get("items") {
            for (i, item) in items.iter().enumerate() {
                validate(item_schema, item, &format!("{path}[{i}]"), errors);
            }
        }
    }
    if let Some(object) = value.as_object() {
        let properties = schema.get("properties").and_then(Value::as_object);
        if let Some(Value::Array(required)) = schema.get("required") {
            for key in required.iter().filter_map(Value::as_str) {
                if !object.contains_key(key) {
                    errors.push(format!("{path}: missing required property `{key}`"));
                }
            }
        }
        for (key, item) in object {
            match properties.and_then(|p| p.get(key)) {
                Some(property_schema) => {
                    validate(property_schema, item, &format!("{path}.{key}"), errors)
                }
                None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    errors.push(format!("{path}: unexpected property `{key}`"));
                }
                None => {}
            }
        }
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// A random property schema; which kinds are possible grows with the level.
fn random_property(rng: &mut TaskRng, level: u32, depth: u32) -> Value {
    let kinds = match level {
        0 => 3,
        1 => 4,
        2 => 5,
        3 | 4 => 6,
        _ if depth > 0 => 6,
        _ => 7,
    };
    match rng.random_range(0..kinds) {
        0 => {
            if level >= 3 {
                let min = rng.random_range(0..50);
                json!({"type": "integer", "minimum": min, "maximum": min + rng.random_range(1..100)})
            } else {
                json!({"type": "integer"})
            }
        }
        1 => {
            if level >= 5 {
                let min = rng.random_range(1..4);
                json!({"type": "string", "minLength": min, "maxLength": min + rng.random_range(2..10)})
            } else {
                json!({"type": "string"})
            }
        }
        2 => json!({"type": "boolean"}),
        3 => {
            let mut words = ENUM_WORDS.to_vec();
            words.shuffle(rng);
            json!({"type": "string", "enum": words[..rng.random_range(2..4)]})
        }
        4 => json!({"type": "number", "minimum": 0, "maximum": rng.random_range(1..1000)}),
        5 => {
            let mut array =
                json!({"type": "array", "items": random_property(rng, level.min(3), depth + 1)});
            if level >= 5 {
                let min = rng.random_range(1..3);
                array["minItems"] = json!(min);
                array["maxItems"] = json!(min + rng.random_range(0..3));
            }
            array
        }
        _ => random_object(rng, level, depth + 1, 2 + level as usize / 4),
    }
}

fn random_object(rng: &mut TaskRng, level: u32, depth: u32, fields: usize) -> Value {
    let mut names = FIELD_NAMES.to_vec();
    names.shuffle(rng);
    let mut properties = Map::new();
    for name in names.iter().take(fields.min(FIELD_NAMES.len())) {
        properties.insert(name.to_string(), random_property(rng, level, depth));
    }
    let keys: Vec<String> = properties.keys().cloned().collect();
    let required: Vec<String> = if level < 4 {
        keys
    } else {
        let mut chosen: Vec<String> = keys
            .iter()
            .filter(|_| rng.random_bool(0.7))
            .cloned()
            .collect();
        if chosen.is_empty() {
            chosen.push(keys[0].clone());
        }
        chosen
    };
    let mut object = json!({"type": "object", "properties": properties, "required": required});
    if level >= 3 {
        object["additionalProperties"] = json!(false);
    }
    object
}

/// A value that satisfies `schema` (for the subset generated here).
fn example_value(schema: &Value) -> Value {
    if let Some(Value::Array(options)) = schema.get("enum") {
        return options.first().cloned().unwrap_or(Value::Null);
    }
    match schema.get("type").and_then(Value::as_str).unwrap_or("null") {
        "object" => {
            let mut object = Map::new();
            if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
                for (key, property) in properties {
                    object.insert(key.clone(), example_value(property));
                }
            }
            Value::Object(object)
        }
        "array" => {
            let count = schema.get("minItems").and_then(Value::as_u64).unwrap_or(1);
            let item = schema
                .get("items")
                .map(example_value)
                .unwrap_or(Value::Null);
            Value::Array(vec![item; count as usize])
        }
        "string" => {
            let length = schema.get("minLength").and_then(Value::as_u64).unwrap_or(2) as usize;
            Value::String("ab".repeat(length.div_ceil(2))[..length].to_string())
        }
        "integer" => json!(schema.get("minimum").and_then(Value::as_i64).unwrap_or(1)),
        "number" => json!(schema.get("minimum").and_then(Value::as_f64).unwrap_or(0.0) + 0.5),
        "boolean" => Value::Bool(true),
        _ => Value::Null,
    }
}

impl Environment for StructuredOutput {
    fn info(&self) -> EnvInfo {
        EnvInfo {
            name: NAME.into(),
            category: Category::StructuredOutput,
            turns: Turns::Single,
            max_turns: 1,
            default_weight: 1.0,
            max_difficulty: MAX_DIFFICULTY,
            description: "Reply with bare JSON satisfying a JSON Schema given in the prompt".into(),
        }
    }

    fn sample(&self, seed: u64, split: Split, difficulty: u32) -> Result<Task, EnvError> {
        let level = difficulty.min(MAX_DIFFICULTY);
        let (key, schema) = draw_in_split(NAME, seed, split, difficulty, |rng| {
            let schema = random_object(rng, level, 0, 1 + level as usize / 2);
            let text = serde_json::to_string(&schema).ok()?;
            Some((text, schema))
        })?;
        let prompt = vec![Message::user(format!("JSON matching {key}"))];
        let origin = TaskOrigin {
            env: NAME,
            seed,
            split,
            difficulty,
        };
        make_task(origin, &key, prompt, &Verification { schema })
    }

    fn score(&self, task: &Task, completion: &str) -> Result<Score, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        let response = match response_or_zero(completion) {
            Ok(response) => response,
            Err(zero) => return Ok(zero),
        };
        let value: Value = match serde_json::from_str(&response) {
            Ok(value) => value,
            Err(err) => {
                return Ok(Score::zero(format!("parse_error: {err}")).with_component("parsed", 0.0));
            }
        };
        let mut errors = Vec::new();
        validate(&expected.schema, &value, "$", &mut errors);
        let score = if errors.is_empty() {
            Score::full("valid against the schema")
        } else {
            let shown: Vec<&str> = errors
                .iter()
                .take(MAX_REPORTED_ERRORS)
                .map(String::as_str)
                .collect();
            Score::zero(format!(
                "validation_error ({} problems): {}",
                errors.len(),
                shown.join("; ")
            ))
        };
        Ok(score
            .with_component("parsed", 1.0)
            .with_component("valid", f64::from(errors.is_empty())))
    }

    fn reference(&self, task: &Task) -> Result<String, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        Ok(example_value(&expected.schema).to_string())
    }

    fn wrong_completions(&self, task: &Task) -> Result<Vec<String>, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        let good = example_value(&expected.schema);
        let mut wrong = vec![format!("```json\n{good}\n```"), "[]".to_string()];
        let required: Vec<String> = expected.schema["required"]
            .as_array()
            .map(|r| {
                r.iter()
                    .filter_map(|k| k.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if let (Some(first), Value::Object(object)) = (required.first(), &good) {
            let mut missing = object.clone();
            missing.remove(first);
            wrong.push(Value::Object(missing).to_string());
            let mut mistyped = object.clone();
            let bad_value = if object.get(first).is_some_and(Value::is_object) {
                json!(7)
            } else {
                json!({"x": [1]})
            };
            mistyped.insert(first.clone(), bad_value);
            wrong.push(Value::Object(mistyped).to_string());
        }
        Ok(wrong)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin::testkit::*;

    #[test]
    fn self_check_passes() {
        assert_self_check_passes(&StructuredOutput, &[0, 1, 3, 5, 10], 10);
    }

    #[test]
    fn splits_are_disjoint() {
        assert_splits_disjoint(&StructuredOutput, 0, 100);
        assert_splits_disjoint(&StructuredOutput, 6, 100);
    }

    #[test]
    fn level_zero_is_one_simple_property() {
        for seed in 0..20 {
            let task = train_task(&StructuredOutput, seed, 0);
            assert!(
                task.prompt[0].content.len() < 100,
                "{}",
                task.prompt[0].content
            );
            let reference: Value =
                serde_json::from_str(&StructuredOutput.reference(&task).unwrap()).unwrap();
            let object = reference.as_object().unwrap();
            assert_eq!(object.len(), 1);
            assert!(
                object
                    .values()
                    .all(|v| v.is_i64() || v.is_string() || v.is_boolean()),
                "{reference}"
            );
        }
    }

    #[test]
    fn validator_reports_each_rule() {
        let schema = json!({
            "type": "object",
            "properties": {
                "n": {"type": "integer", "minimum": 1, "maximum": 3},
                "c": {"type": "string", "enum": ["red", "blue"]},
                "t": {"type": "array", "items": {"type": "string", "maxLength": 2}, "minItems": 1}
            },
            "required": ["n", "c"],
            "additionalProperties": false
        });
        let errors = |value: Value| {
            let mut errors = Vec::new();
            validate(&schema, &value, "$", &mut errors);
            errors
        };
        assert!(errors(json!({"n": 2, "c": "red", "t": ["ab"]})).is_empty());
        assert!(
            errors(json!({"n": 2.0, "c": "red"})).is_empty(),
            "2.0 is an integer in JSON Schema"
        );
        assert_eq!(errors(json!({"n": 5, "c": "red"})).len(), 1);
        assert_eq!(errors(json!({"n": 1, "c": "green"})).len(), 1);
        assert_eq!(errors(json!({"c": "red"})).len(), 1);
        assert_eq!(errors(json!({"n": 1, "c": "red", "x": 0})).len(), 1);
        assert_eq!(errors(json!({"n": 1, "c": "red", "t": []})).len(), 1);
        assert_eq!(
            errors(json!({"n": 1, "c": "red", "t": ["abc", 4]})).len(),
            2
        );
        assert_eq!(errors(json!({"n": "1", "c": "red"})).len(), 1);
    }

    #[test]
    fn parse_and_validation_errors_are_told_apart() {
        let task = train_task(&StructuredOutput, 2, 2);
        let parse = StructuredOutput.score(&task, "{not json").unwrap();
        assert!(parse.reason.starts_with("parse_error"), "{}", parse.reason);
        let invalid = StructuredOutput.score(&task, "{}").unwrap();
        assert!(
            invalid.reason.starts_with("validation_error"),
            "{}",
            invalid.reason
        );
        assert_eq!(invalid.component("parsed"), Some(1.0));
    }
}
