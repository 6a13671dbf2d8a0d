//! `code_output`: predict what a generated Python program prints.
//!
//! The ground truth comes from running the program in the [`sandbox`] when the task is sampled,
//! and is kept in the task's verification data, so scoring runs nothing. Programs grow with
//! difficulty: level 0 is one `print` of a one-digit sum; then variables, loops, strings, lists
//! and comprehensions, functions with conditionals, and dictionaries, `while` loops and several
//! lines of output. The answer is the last fenced block of the response if there is one, else
//! its final answer ([`final_answer`]: `\boxed{}`, `<answer>`, `####`, or the whole response);
//! it must equal the output line for line (trailing spaces and blank lines ignored). Binary
//! reward; components `format` and `lines_matched`.
//!
//! [`sandbox`]: crate::sandbox

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use rand::Rng;
use rand::seq::{IndexedRandom, SliceRandom};
use serde::{Deserialize, Serialize};

use super::code_python::{code_sandbox, py_str};
use crate::chat::{Message, final_answer};
use crate::env::{Category, EnvInfo, Environment, Turns, response_or_zero};
use crate::error::EnvError;
use crate::sampling::{TaskOrigin, TaskRng, draw_in_split, make_task};
use crate::sandbox::{Limits, SandboxRequest};
use crate::task::{Score, Split, Task};

const NAME: &str = "code_output";
const MAX_DIFFICULTY: u32 = 6;
/// Outputs remembered per process (sampling the same task twice runs it once).
const CACHE_LIMIT: usize = 50_000;

/// Predict a program's output.
#[derive(Debug, Clone, Default)]
pub struct CodeOutput;

#[derive(Debug, Serialize, Deserialize)]
struct Verification {
    program: String,
    /// What the program printed in the sandbox.
    output: String,
}

fn pick<'a>(rng: &mut TaskRng, items: &[&'a str]) -> &'a str {
    items.choose(rng).copied().unwrap_or("a")
}

fn word(rng: &mut TaskRng) -> String {
    let len = rng.random_range(2..=5);
    (0..len)
        .map(|_| *b"abcdeilmnoprstu".choose(rng).unwrap_or(&b'a') as char)
        .collect()
}

fn list(rng: &mut TaskRng, len: usize, high: i64) -> Vec<i64> {
    (0..len).map(|_| rng.random_range(0..=high)).collect()
}

fn list_literal(items: &[i64]) -> String {
    format!(
        "[{}]",
        items
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// One generated program at `level`.
fn program(rng: &mut TaskRng, level: u32) -> String {
    let n = |rng: &mut TaskRng, high: i64| rng.random_range(0..=high);
    match level {
        0 => {
            let op = pick(rng, &["+", "-", "*"]);
            format!("print({}{op}{})", n(rng, 9), n(rng, 9))
        }
        1 => {
            let (a, k, m) = (n(rng, 20), n(rng, 9), rng.random_range(2..=5));
            let op = pick(rng, &["+", "-", "*"]);
            let op2 = pick(rng, &["+", "-", "//", "%"]);
            format!("a = {a}\nb = a {op} {k}\nprint(b {op2} {m})")
        }
        2 => {
            let (count, k) = (rng.random_range(2..=6), rng.random_range(1..=5));
            match rng.random_range(0..3) {
                0 => format!("s = 0\nfor i in range({count}):\n    s += i * {k}\nprint(s)"),
                1 => format!("x = 1\nfor i in range({count}):\n    x = x * 2 + {k}\nprint(x)"),
                _ => format!(
                    "n = 0\nfor i in range({}):\n    if i % {} == 0:\n        n += 1\nprint(n)",
                    count * 3,
                    k + 1
                ),
            }
        }
        3 => {
            let (a, b) = (word(rng), word(rng));
            match rng.random_range(0..4) {
                0 => format!("s = {}\nprint(s[::-1] + {})", py_str(&a), py_str(&b)),
                1 => format!(
                    "s = {}\nprint(s.upper(), len(s))",
                    py_str(&format!("{a} {b}"))
                ),
                2 => format!(
                    "words = [{}, {}]\nprint('-'.join(words))",
                    py_str(&a),
                    py_str(&b)
                ),
                _ => format!(
                    "s = {}\nprint(s.count({}))",
                    py_str(&format!("{a}{b}{a}")),
                    py_str(&a[..1])
                ),
            }
        }
        4 => {
            let len = rng.random_range(3..=6);
            let xs = list(rng, len, 20);
            let k = rng.random_range(2..=4);
            match rng.random_range(0..3) {
                0 => format!(
                    "xs = {}\nprint([x * {k} for x in xs if x % 2 == 1])",
                    list_literal(&xs)
                ),
                1 => format!(
                    "xs = {}\nprint(sorted(xs)[:{k}], sum(xs))",
                    list_literal(&xs)
                ),
                _ => format!(
                    "xs = {}\nys = [x % {k} for x in xs]\nprint(ys, max(ys))",
                    list_literal(&xs)
                ),
            }
        }
        5 => {
            let (m, d) = (rng.random_range(2..=5), rng.random_range(1..=4));
            let args: Vec<i64> = list(rng, 3, 30);
            format!(
                "def f(n):\n    if n % {m} == 0:\n        return n // {m}\n    return n * 2 + {d}\n\nprint(f({}), f({}), f(f({})))",
                args[0], args[1], args[2]
            )
        }
        _ => match rng.random_range(0..3) {
            0 => {
                let mut letters: Vec<char> = word(rng).chars().chain(word(rng).chars()).collect();
                letters.shuffle(rng);
                let text: String = letters.into_iter().collect();
                format!(
                    "d = {{}}\nfor c in {}:\n    d[c] = d.get(c, 0) + 1\nfor key in sorted(d):\n    print(key, d[key])",
                    py_str(&text)
                )
            }
            1 => format!(
                "n = {}\nsteps = 0\nwhile n != 1:\n    n = n // 2 if n % 2 == 0 else 3 * n + 1\n    steps += 1\nprint(steps)",
                rng.random_range(2..=40)
            ),
            _ => {
                let len = rng.random_range(3..=6);
                let xs = list(rng, len, 9);
                format!(
                    "xs = {}\ntotal = 0\nfor i, x in enumerate(xs):\n    total += i * x\n    print(i, total)",
                    list_literal(&xs)
                )
            }
        },
    }
}

/// Lines without trailing spaces, without leading and trailing blank lines.
fn normalise(text: &str) -> Vec<String> {
    let lines: Vec<String> = text.lines().map(|l| l.trim_end().to_string()).collect();
    let start = lines
        .iter()
        .position(|l| !l.is_empty())
        .unwrap_or(lines.len());
    let end = lines
        .iter()
        .rposition(|l| !l.is_empty())
        .map_or(start, |i| i + 1);
    lines[start..end].to_vec()
}

/// Runs `program` in the sandbox (once per process per program) and returns its stdout.
fn ground_truth(program: &str) -> Result<String, EnvError> {
    static CACHE: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(output) = cache.lock().ok().and_then(|c| c.get(program).cloned()) {
        return Ok(output);
    }
    let sandbox = code_sandbox(NAME)?;
    let request = SandboxRequest {
        argv: vec![sandbox.python().to_string(), "program.py".into()],
        files: vec![("program.py".into(), program.as_bytes().to_vec())],
        stdin: Vec::new(),
        limits: Limits {
            cpu_time: Duration::from_secs(5),
            wall_time: Duration::from_secs(20),
            memory_bytes: 256 << 20,
            max_processes: 4,
            max_output_bytes: 64 << 10,
        },
    };
    let outcome = sandbox
        .run(&request)
        .map_err(|err| EnvError::InvalidConfig {
            env: NAME.into(),
            message: format!("the sandbox failed to start: {err}"),
        })?;
    if !outcome.success() {
        return Err(EnvError::InvalidConfig {
            env: NAME.into(),
            message: format!(
                "a generated program failed in the sandbox ({}): {program:?}",
                outcome.reason()
            ),
        });
    }
    let output = String::from_utf8_lossy(&outcome.stdout).to_string();
    if let Ok(mut cache) = cache.lock() {
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(program.to_string(), output.clone());
    }
    Ok(output)
}

/// The predicted output in a response: the last fenced block, else the final answer.
fn predicted(response: &str) -> String {
    if response.contains("```") {
        crate::chat::extract_code(response).unwrap_or_default()
    } else {
        final_answer(response).to_string()
    }
}

impl Environment for CodeOutput {
    fn info(&self) -> EnvInfo {
        EnvInfo {
            name: NAME.into(),
            category: Category::Code,
            turns: Turns::Single,
            max_turns: 1,
            default_weight: 1.0,
            max_difficulty: MAX_DIFFICULTY,
            description:
                "Predict a generated Python program's output (ground truth from the sandbox)".into(),
        }
    }

    fn sample(&self, seed: u64, split: Split, difficulty: u32) -> Result<Task, EnvError> {
        let level = difficulty.min(MAX_DIFFICULTY);
        let (key, program) = draw_in_split(NAME, seed, split, difficulty, |rng| {
            // Revisit easier levels now and then.
            let at = if level > 0 && rng.random_bool(0.25) {
                rng.random_range(0..level)
            } else {
                level
            };
            let program = program(rng, at);
            Some((program.clone(), program))
        })?;
        let output = ground_truth(&program)?;
        let prompt = if level == 0 {
            format!("What does this Python print?\n{program}")
        } else {
            format!(
                "What does this Python program print? Give the exact output.\n```python\n{program}\n```"
            )
        };
        let origin = TaskOrigin {
            env: NAME,
            seed,
            split,
            difficulty,
        };
        make_task(
            origin,
            &key,
            vec![Message::user(prompt)],
            &Verification { program, output },
        )
    }

    fn score(&self, task: &Task, completion: &str) -> Result<Score, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        let response = match response_or_zero(completion) {
            Ok(response) => response,
            Err(zero) => return Ok(zero),
        };
        let want = normalise(&expected.output);
        let got = normalise(&predicted(&response));
        if got.is_empty() {
            return Ok(Score::zero("no predicted output").with_component("format", 0.0));
        }
        let matched = want.iter().zip(&got).filter(|(a, b)| a == b).count();
        let fraction = matched as f64 / want.len().max(got.len()).max(1) as f64;
        let correct = want == got;
        let reason = if correct {
            "the output matches".to_string()
        } else {
            let first = (0..want.len().max(got.len()))
                .find(|&i| want.get(i) != got.get(i))
                .unwrap_or(0);
            format!(
                "line {}: expected {:?}, got {:?}",
                first + 1,
                want.get(first).map_or("", String::as_str),
                got.get(first).map_or("", String::as_str)
            )
        };
        Ok(Score::binary(correct, reason)
            .with_component("format", 1.0)
            .with_component("lines_matched", fraction))
    }

    fn reference(&self, task: &Task) -> Result<String, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        let output = expected.output.trim_end().to_string();
        Ok(if output.contains('\n') {
            format!("```\n{output}\n```")
        } else {
            output
        })
    }

    fn wrong_completions(&self, task: &Task) -> Result<Vec<String>, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        let output = expected.output.trim_end();
        // Change the last character: a digit moves by one, anything else becomes `?`.
        let mut altered: Vec<char> = output.chars().collect();
        if let Some(last) = altered.last_mut() {
            *last = match last.to_digit(10) {
                Some(d) => char::from_digit((d + 1) % 10, 10).unwrap_or('?'),
                None => '?',
            };
        }
        let altered: String = altered.into_iter().collect();
        Ok(vec![
            format!("```\n{altered}\n```"),
            format!("```python\n{}\n```", expected.program),
            format!("{output}\n{output}"),
            "None".to_string(),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin::testkit::*;

    #[test]
    fn self_check_passes_at_every_level() {
        let levels: Vec<u32> = (0..=MAX_DIFFICULTY).collect();
        assert_self_check_passes(&CodeOutput, &levels, 3);
    }

    #[test]
    fn splits_are_disjoint() {
        assert_splits_disjoint(&CodeOutput, 0, 120);
        assert_splits_disjoint(&CodeOutput, 3, 60);
    }

    #[test]
    fn ground_truth_comes_from_running_the_program() {
        let task = train_task(&CodeOutput, 4, 0);
        let expected: Verification = task.verification_as().unwrap();
        let (a, rest) = expected.program["print(".len()..].split_at(1);
        let (op, b) = rest.split_at(1);
        let (a, b): (i64, i64) = (a.parse().unwrap(), b[..1].parse().unwrap());
        let value = match op {
            "+" => a + b,
            "-" => a - b,
            _ => a * b,
        };
        assert_eq!(expected.output, format!("{value}\n"));
        assert!(task.prompt_text().len() < 80, "{}", task.prompt_text());
    }

    #[test]
    fn answers_are_compared_line_by_line() {
        let task = Task {
            verification: serde_json::json!({"program": "print(1)\nprint('a b')", "output": "1\na b\n"}),
            ..train_task(&CodeOutput, 0, 5)
        };
        for good in [
            "```\n1\na b\n```",
            "1\na b  \n\n",
            "<think>hm</think>```text\n1\na b\n```",
        ] {
            assert_eq!(reward(&CodeOutput, &task, good), 1.0, "{good}");
        }
        let score = CodeOutput.score(&task, "```\n1\nab\n```").unwrap();
        assert_eq!(score.reward, 0.0);
        assert!(score.reason.contains("line 2"), "{}", score.reason);
        assert_eq!(score.component("lines_matched"), Some(0.5));
    }
}
