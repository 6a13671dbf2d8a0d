//! Templates behind `chorus env new NAME --lang rust|python`: a new environment that already
//! works (a "repeat the word" task), for the user to change into their own.
//!
//! The Rust template generated for `my_env` is compiled and tested as part of this crate's
//! tests (`environments/tests/plugin_scaffold/my_env.rs`, checked to equal the generator's
//! output), so what `chorus env new` writes is known to build against this crate.

use std::path::PathBuf;

/// Words the template environments ask the model to repeat.
const WORDS: &str = "\"cat\", \"dog\", \"sun\", \"sky\", \"tea\", \"owl\", \"map\", \"fig\"";

const RUST_KEYWORDS: &[&str] = &[
    "as", "async", "await", "break", "const", "continue", "crate", "dyn", "else", "enum", "extern",
    "false", "fn", "for", "gen", "if", "impl", "in", "let", "loop", "match", "mod", "move", "mut",
    "pub", "ref", "return", "self", "static", "struct", "super", "trait", "true", "type", "unsafe",
    "use", "where", "while", "abstract", "become", "box", "do", "final", "macro", "override",
    "priv", "try", "typeof", "unsized", "virtual", "yield",
];

const PYTHON_KEYWORDS: &[&str] = &[
    "and",
    "as",
    "assert",
    "async",
    "await",
    "break",
    "class",
    "continue",
    "def",
    "del",
    "elif",
    "else",
    "except",
    "finally",
    "for",
    "from",
    "global",
    "if",
    "import",
    "in",
    "is",
    "lambda",
    "nonlocal",
    "not",
    "or",
    "pass",
    "raise",
    "return",
    "try",
    "while",
    "with",
    "yield",
    "none",
    "true",
    "false",
    "chorus_env",
    "grpc",
    "test",
];

/// Checks that `name` can be an environment name, a Rust module and a Python module:
/// lowercase ASCII letters, digits and `_`, starting with a letter, at most 48 characters.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = name.len() <= 48
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !ok {
        return Err(format!(
            "`{name}` cannot be an environment name; allowed: lowercase letters, digits and `_`, \
             starting with a letter, at most 48 characters (e.g. `word_sort`)"
        ));
    }
    if RUST_KEYWORDS.contains(&name) || PYTHON_KEYWORDS.contains(&name) {
        return Err(format!(
            "`{name}` is a reserved word in Rust or Python (or an SDK module); choose another name"
        ));
    }
    Ok(())
}

/// `word_sort` -> `WordSort`.
pub fn type_name(name: &str) -> String {
    name.split('_')
        .filter(|part| !part.is_empty())
        .map(|part| {
            let mut chars = part.chars();
            match chars.next() {
                Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
                None => String::new(),
            }
        })
        .collect()
}

/// The Rust source of a new environment `name`: one file implementing the trait, with how to
/// register it and a test that runs Chorus' self-check on it.
pub fn rust_source(name: &str) -> Result<String, String> {
    check_name(name)?;
    Ok(RUST_TEMPLATE
        .replace("__TYPE__", &type_name(name))
        .replace("__NAME__", name)
        .replace("__WORDS__", WORDS))
}

/// The files of a new Python plugin project `name`, relative to the project directory.
pub fn python_files(name: &str) -> Result<Vec<(PathBuf, String)>, String> {
    check_name(name)?;
    let fill = |t: &str| {
        t.replace("__TYPE__", &type_name(name))
            .replace("__NAME__", name)
            .replace("__WORDS__", WORDS)
    };
    Ok(vec![
        (PathBuf::from("pyproject.toml"), fill(PY_PYPROJECT)),
        (PathBuf::from("README.md"), fill(PY_README)),
        (PathBuf::from(format!("{name}.py")), fill(PY_MODULE)),
        (PathBuf::from(format!("test_{name}.py")), fill(PY_TEST)),
    ])
}

const RUST_TEMPLATE: &str = r#"//! `__NAME__`: a Chorus environment (made by `chorus env new __NAME__ --lang rust`).
//!
//! It asks the model to repeat a word and gives reward 1 for exactly that word. Change
//! `sample`, `score` and `reference` into your task; keep sampling deterministic (the same
//! seed, split and difficulty give the same task) and never fail on bad model output (score 0
//! with a reason instead).
//!
//! Register it where the run builds its registry (`environment_registry` in
//! `src/cli/run.rs`), or in your own program:
//!
//! ```ignore
//! let mut registry = chorus_environments::builtin_registry();
//! registry.register(__TYPE__)?;
//! ```
//!
//! then use `{ name = "__NAME__" }` in a run config. Or serve it to runs as a plugin:
//! `chorus_environments::plugin::serve_environment(Arc::new(__TYPE__), "127.0.0.1:7100", token)`.

use chorus_environments::chat::{Message, parse_completion};
use chorus_environments::{
    Category, EnvError, EnvInfo, Environment, Score, Split, Task, Turns, split_of, stable_hash,
    task_rng,
};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// The environment's name: the registry key and what run configs say.
pub const NAME: &str = "__NAME__";

const WORDS: &[&str] = &[__WORDS__];

/// What the verifier needs to know about a task; the model never sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Verification {
    word: String,
}

/// The `__NAME__` environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct __TYPE__;

impl Environment for __TYPE__ {
    fn info(&self) -> EnvInfo {
        EnvInfo {
            name: NAME.to_string(),
            category: Category::Knowledge,
            turns: Turns::Single,
            max_turns: 1,
            default_weight: 1.0,
            max_difficulty: 2,
            description: "Repeat a word (or several); exact match".to_string(),
        }
    }

    fn sample(&self, seed: u64, split: Split, difficulty: u32) -> Result<Task, EnvError> {
        let mut rng = task_rng(NAME, seed, difficulty);
        // Draw until the content falls in the requested split: the split is a hash of the
        // content, so train and heldout never share a task.
        for _ in 0..1000 {
            let count = 1 + difficulty.min(2) as usize;
            let word = (0..count)
                .map(|_| WORDS[rng.random_range(0..WORDS.len())])
                .collect::<Vec<_>>()
                .join(" ");
            if split_of(NAME, &word) != split {
                continue;
            }
            let verification =
                serde_json::to_value(Verification { word: word.clone() }).map_err(|source| {
                    EnvError::Serialize {
                        env: NAME.to_string(),
                        source,
                    }
                })?;
            return Ok(Task {
                id: format!(
                    "{NAME}-{split}-d{difficulty}-{:016x}",
                    stable_hash(word.as_bytes())
                ),
                env: NAME.to_string(),
                split,
                difficulty,
                seed,
                prompt: vec![Message::user(format!("Repeat: {word}"))],
                verification,
            });
        }
        Err(EnvError::SplitExhausted {
            env: NAME.to_string(),
            split,
            difficulty,
            seed,
            attempts: 1000,
        })
    }

    fn score(&self, task: &Task, completion: &str) -> Result<Score, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        let parsed = parse_completion(completion);
        if parsed.unterminated_think || parsed.response.is_empty() {
            return Ok(Score::zero("no answer"));
        }
        let correct = parsed.response == expected.word;
        Ok(Score::binary(
            correct,
            if correct {
                format!("repeated {:?}", expected.word)
            } else {
                format!("said {:?}, expected {:?}", parsed.response, expected.word)
            },
        ))
    }

    fn reference(&self, task: &Task) -> Result<String, EnvError> {
        self.check_task(task)?;
        Ok(task.verification_as::<Verification>()?.word)
    }

    fn wrong_completions(&self, task: &Task) -> Result<Vec<String>, EnvError> {
        let word = self.reference(task)?;
        Ok(vec![format!("{word} {word}"), word.to_uppercase()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_the_self_check() {
        let report = chorus_environments::check_environment(
            &__TYPE__,
            &chorus_environments::CheckOptions::default(),
        );
        assert!(report.passed, "{:#?}", report.failures);
    }

    #[test]
    fn registers_under_its_name() {
        let mut registry = chorus_environments::Registry::new();
        registry.register(__TYPE__).unwrap();
        assert_eq!(registry.get(NAME).unwrap().info().name, NAME);
    }
}
"#;

const PY_PYPROJECT: &str = r#"[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "__NAME__"
version = "0.1.0"
description = "The __NAME__ environment for Chorus runs (a gRPC plugin)"
requires-python = ">=3.9"
# chorus-env is Chorus' Python SDK: pip install CHORUS_CHECKOUT/environments/python
dependencies = ["chorus-env"]

[project.scripts]
__NAME__ = "__NAME__:main"

[tool.setuptools]
py-modules = ["__NAME__"]
"#;

const PY_README: &str = r#"# __NAME__

A Chorus environment plugin (made by `chorus env new __NAME__ --lang python`). It asks the
model to repeat a word; change `sample`, `score` and `reference` in `__NAME__.py` into your task.

```sh
pip install CHORUS_CHECKOUT/environments/python   # the chorus-env SDK
pip install .
python test___NAME__.py                           # checks the environment in-process
__NAME__ --port 50051 --token s3cret              # serve it
```

In the run config: `environments = [{ url = "http://127.0.0.1:50051" }]`, then
`chorus run run.toml --token s3cret`.
"#;

const PY_MODULE: &str = r#""""__NAME__: a Chorus environment plugin (made by `chorus env new __NAME__ --lang python`).

It asks the model to repeat a word and gives reward 1 for exactly that word. Change sample(),
score() and reference() into your task. Keep sampling deterministic (the same seed, split and
level give the same task) and never raise on bad model output (score 0 with a reason instead).

Serve it: ``python __NAME__.py --port 50051 --token s3cret``.
"""

import random

import chorus_env

WORDS = [__WORDS__]


class __TYPE__(chorus_env.Environment):
    name = "__NAME__"
    description = "Repeat a word (or several); exact match"
    category = "knowledge"
    max_level = 2

    def sample(self, seed, split, level):
        rng = random.Random(f"{self.name}:{seed}:{level}")
        # The split is a hash of the content, so train and heldout never share a task.
        for _ in range(1000):
            word = " ".join(rng.choice(WORDS) for _ in range(1 + min(level, 2)))
            if chorus_env.split_of(self.name, word) == split:
                return chorus_env.Task(
                    task_id=f"{self.name}-{split}-{level}-{word.replace(' ', '_')}",
                    prompt=f"Repeat: {word}",
                    data={"word": word},
                )
        raise ValueError(f"no {split} task for seed {seed}")

    def score(self, task, completion):
        answer = chorus_env.response_text(completion)
        expected = task.data["word"]
        if not answer:
            return chorus_env.Score(0.0, "no answer")
        if answer == expected:
            return chorus_env.Score(1.0, f"repeated {expected!r}")
        return chorus_env.Score(0.0, f"said {answer!r}, expected {expected!r}")

    def reference(self, task):
        return task.data["word"]

    def wrong_completions(self, task):
        word = task.data["word"]
        return [f"{word} {word}", word.upper()]


def main(argv=None):
    chorus_env.main_for(__TYPE__, argv)


if __name__ == "__main__":
    main()
"#;

const PY_TEST: &str = r#""""Checks __NAME__ in-process: deterministic sampling, disjoint splits, references score 1,
wrong answers do not. Run with ``python test___NAME__.py`` (or pytest)."""

from __NAME__ import __TYPE__


def test_references_score_full_and_wrong_answers_do_not():
    env = __TYPE__()
    for split in ("train", "heldout"):
        for level in range(env.max_level + 1):
            for seed in range(8):
                task = env.sample(seed, split, level)
                assert env.sample(seed, split, level) == task, "sampling must be deterministic"
                assert env.score(task, env.reference(task)).reward == 1.0
                for wrong in env.wrong_completions(task) + ["", "<think>unfinished"]:
                    assert env.score(task, wrong).reward < 1.0, wrong


def test_splits_are_disjoint():
    env = __TYPE__()
    train = {env.sample(s, "train", 1).prompt for s in range(50)}
    heldout = {env.sample(s, "heldout", 1).prompt for s in range(50)}
    assert not train & heldout


if __name__ == "__main__":
    test_references_score_full_and_wrong_answers_do_not()
    test_splits_are_disjoint()
    print("ok")
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_become_type_names() {
        assert_eq!(type_name("word_sort"), "WordSort");
        assert_eq!(type_name("a1_b2"), "A1B2");
        for bad in ["", "Word", "1abc", "a-b", "a b", "match", "class", "test"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        let err = check_name("Bad-Name").unwrap_err();
        assert!(err.contains("lowercase letters"), "{err}");
    }

    #[test]
    fn templates_leave_no_placeholder() {
        let rust = rust_source("word_sort").unwrap();
        assert!(
            rust.contains("pub struct WordSort;") && !rust.contains("__"),
            "{rust}"
        );
        for (path, text) in python_files("word_sort").unwrap() {
            assert!(
                !text.contains("__NAME__")
                    && !text.contains("__TYPE__")
                    && !text.contains("__WORDS__"),
                "{}",
                path.display()
            );
        }
    }
}
