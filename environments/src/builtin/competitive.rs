//! `competitive`: stdin/stdout programs judged on several test cases with a time limit, each
//! run in the [`sandbox`].
//!
//! Problems are generated from templates with a Python reference solution and a Rust judge that
//! computes the expected output: level 0 reads one integer and prints it plus a constant; then
//! two integers, lists, strings, sorting and distinct counts, range-sum queries and, at the top
//! level, inputs large enough that a quadratic solution runs out of time (prefix sums, a
//! sieve). The verification data holds only the template, its constant and a seed: test inputs
//! are regenerated when scoring, so tasks stay small.
//!
//! The program is the code in the completion ([`extract_code`]); each test case runs it once
//! with the case's input under [`TEST_CPU_SECONDS`] of CPU time. Output is compared line by line
//! with trailing spaces and blank lines ignored. **Reward = the fraction of test cases passed**
//! (full only when all pass). Components: `format`, `tests_passed` (fraction), `all_passed`.
//! Judging stops at the first case that fails to compile (a `SyntaxError`).
//!
//! [`sandbox`]: crate::sandbox

use std::time::Duration;

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::code_python::code_sandbox;
use crate::chat::{Message, extract_code};
use crate::env::{Category, EnvInfo, Environment, Turns, response_or_zero};
use crate::error::EnvError;
use crate::sampling::{TaskOrigin, TaskRng, draw_in_split, make_task};
use crate::sandbox::{Limits, SandboxRequest, Termination};
use crate::task::{Score, Split, Task};

const NAME: &str = "competitive";
const MAX_DIFFICULTY: u32 = 6;
/// CPU seconds each test case may use.
pub const TEST_CPU_SECONDS: u64 = 2;

/// stdin/stdout programming problems.
#[derive(Debug, Clone, Default)]
pub struct Competitive;

#[derive(Debug, Serialize, Deserialize)]
struct Verification {
    /// The template's name.
    problem: String,
    /// Its constant.
    k: i64,
    /// Seeds the test inputs.
    tests_seed: u64,
    /// Input size level.
    level: u32,
    /// Number of test cases.
    cases: usize,
}

/// One problem family.
struct Problem {
    name: &'static str,
    level: u32,
    /// `{k}` is replaced by the constant.
    statement: &'static str,
    /// The reference solution; `{k}` replaced.
    solution: &'static str,
    k: (i64, i64),
    /// An input of about `size` items.
    input: fn(&mut TaskRng, usize) -> String,
    /// The expected output for `k` and an input.
    judge: fn(i64, &str) -> String,
}

fn numbers(text: &str) -> Vec<i64> {
    text.split_whitespace()
        .filter_map(|t| t.parse().ok())
        .collect()
}

fn list_input(rng: &mut TaskRng, size: usize, low: i64, high: i64) -> String {
    let n = rng.random_range(1..=size.max(1));
    let items: Vec<String> = (0..n)
        .map(|_| rng.random_range(low..=high).to_string())
        .collect();
    format!("{n}\n{}\n", items.join(" "))
}

fn word_input(rng: &mut TaskRng, size: usize) -> String {
    let len = rng.random_range(1..=size.clamp(1, 40));
    let word: String = (0..len)
        .map(|_| *b"abcdeiklmnoprstuy".choose(rng).unwrap_or(&b'a') as char)
        .collect();
    format!("{word}\n")
}

/// The numbers after the count on the first line.
fn list_of(input: &str) -> Vec<i64> {
    numbers(input).into_iter().skip(1).collect()
}

const PROBLEMS: &[Problem] = &[
    Problem {
        name: "plus",
        level: 0,
        statement: "Read an integer n. Print n+{k}.",
        solution: "print(int(input())+{k})",
        k: (1, 20),
        input: |rng, _| format!("{}\n", rng.random_range(-50..=999)),
        judge: |k, input| (numbers(input)[0] + k).to_string(),
    },
    Problem {
        name: "times",
        level: 0,
        statement: "Read an integer n. Print n*{k}.",
        solution: "print(int(input())*{k})",
        k: (2, 12),
        input: |rng, _| format!("{}\n", rng.random_range(-50..=999)),
        judge: |k, input| (numbers(input)[0] * k).to_string(),
    },
    Problem {
        name: "pair_sum",
        level: 1,
        statement: "Read two integers a and b on one line. Print a+b+{k}.",
        solution: "a, b = map(int, input().split())\nprint(a+b+{k})",
        k: (0, 9),
        input: |rng, _| {
            format!(
                "{} {}\n",
                rng.random_range(-99..=999),
                rng.random_range(-99..=999)
            )
        },
        judge: |k, input| {
            let v = numbers(input);
            (v[0] + v[1] + k).to_string()
        },
    },
    Problem {
        name: "pair_max",
        level: 1,
        statement: "Read two integers a and b on one line. Print the larger one minus {k}.",
        solution: "a, b = map(int, input().split())\nprint(max(a, b)-{k})",
        k: (0, 9),
        input: |rng, _| {
            format!(
                "{} {}\n",
                rng.random_range(-99..=999),
                rng.random_range(-99..=999)
            )
        },
        judge: |k, input| {
            let v = numbers(input);
            (v[0].max(v[1]) - k).to_string()
        },
    },
    Problem {
        name: "list_sum",
        level: 2,
        statement: "The first line has n, the second n integers. Print their sum.",
        solution: "input()\nprint(sum(map(int, input().split())))",
        k: (0, 0),
        input: |rng, size| list_input(rng, size, -100, 100),
        judge: |_, input| list_of(input).iter().sum::<i64>().to_string(),
    },
    Problem {
        name: "count_multiples",
        level: 2,
        statement: "The first line has n, the second n integers. Print how many are divisible by {k}.",
        solution: "input()\nprint(sum(1 for x in map(int, input().split()) if x % {k} == 0))",
        k: (2, 7),
        input: |rng, size| list_input(rng, size, 0, 100),
        judge: |k, input| {
            list_of(input)
                .iter()
                .filter(|x| *x % k == 0)
                .count()
                .to_string()
        },
    },
    Problem {
        name: "reverse_word",
        level: 3,
        statement: "Read a word. Print it reversed.",
        solution: "print(input().strip()[::-1])",
        k: (0, 0),
        input: |rng, size| word_input(rng, size),
        judge: |_, input| input.trim().chars().rev().collect(),
    },
    Problem {
        name: "count_vowels",
        level: 3,
        statement: "Read a lowercase word. Print how many of its letters are vowels (a, e, i, o, u).",
        solution: "print(sum(c in 'aeiou' for c in input().strip()))",
        k: (0, 0),
        input: |rng, size| word_input(rng, size),
        judge: |_, input| {
            input
                .trim()
                .chars()
                .filter(|c| "aeiou".contains(*c))
                .count()
                .to_string()
        },
    },
    Problem {
        name: "sort_list",
        level: 4,
        statement: "The first line has n, the second n integers. Print them in increasing order, separated by spaces.",
        solution: "input()\nprint(*sorted(map(int, input().split())))",
        k: (0, 0),
        input: |rng, size| list_input(rng, size * 4, -1000, 1000),
        judge: |_, input| {
            let mut v = list_of(input);
            v.sort_unstable();
            v.iter().map(i64::to_string).collect::<Vec<_>>().join(" ")
        },
    },
    Problem {
        name: "distinct",
        level: 4,
        statement: "The first line has n, the second n integers. Print how many different values there are.",
        solution: "input()\nprint(len(set(input().split())))",
        k: (0, 0),
        input: |rng, size| list_input(rng, size * 4, 0, 30),
        judge: |_, input| {
            let mut v = list_of(input);
            v.sort_unstable();
            v.dedup();
            v.len().to_string()
        },
    },
    Problem {
        name: "range_sums",
        level: 5,
        statement: "The first line has n and q. The second has n integers a1..an. Each of the next q lines has l and r (1 <= l <= r <= n). For each, print al+...+ar on its own line.",
        solution: "import sys\ndata = sys.stdin.buffer.read().split()\nn, q = int(data[0]), int(data[1])\npre = [0]\nfor x in data[2:2 + n]:\n    pre.append(pre[-1] + int(x))\nout = []\nfor i in range(q):\n    l, r = int(data[2 + n + 2 * i]), int(data[3 + n + 2 * i])\n    out.append(pre[r] - pre[l - 1])\nprint('\\n'.join(map(str, out)))",
        k: (0, 0),
        input: |rng, size| {
            // Big inputs are exactly `size` long, so a quadratic answer cannot get lucky.
            let (n, q) = if size >= 1_000 {
                (size, size)
            } else {
                (
                    rng.random_range(1..=size.max(1)),
                    rng.random_range(1..=size.max(1)),
                )
            };
            let mut text = format!("{n} {q}\n");
            let items: Vec<String> = (0..n)
                .map(|_| rng.random_range(-1000..=1000).to_string())
                .collect();
            text.push_str(&items.join(" "));
            text.push('\n');
            for _ in 0..q {
                let l = rng.random_range(1..=n);
                let r = rng.random_range(l..=n);
                text.push_str(&format!("{l} {r}\n"));
            }
            text
        },
        judge: |_, input| {
            let v = numbers(input);
            let (n, q) = (v[0] as usize, v[1] as usize);
            let mut prefix = vec![0i64];
            for x in &v[2..2 + n] {
                prefix.push(prefix.last().copied().unwrap_or(0) + x);
            }
            (0..q)
                .map(|i| {
                    let (l, r) = (v[2 + n + 2 * i] as usize, v[3 + n + 2 * i] as usize);
                    (prefix[r] - prefix[l - 1]).to_string()
                })
                .collect::<Vec<_>>()
                .join("\n")
        },
    },
    Problem {
        name: "count_primes",
        level: 6,
        statement: "Read an integer n (1 <= n <= 300000). Print how many primes are at most n.",
        solution: "n = int(input())\nsieve = bytearray([1]) * (n + 1)\nsieve[0:2] = b'\\x00\\x00'[:min(2, n + 1)]\nfor i in range(2, int(n ** 0.5) + 1):\n    if sieve[i]:\n        sieve[i * i::i] = bytearray(len(range(i * i, n + 1, i)))\nprint(sum(sieve))",
        k: (0, 0),
        input: |rng, size| {
            let n = if size >= 1_000 {
                rng.random_range(200_000..=300_000)
            } else {
                rng.random_range(1..=(size as i64 * 10).max(10))
            };
            format!("{n}\n")
        },
        judge: |_, input| {
            let n = numbers(input)[0].max(0) as usize;
            let mut sieve = vec![true; n + 1];
            let mut count = 0;
            for i in 2..=n {
                if sieve[i] {
                    count += 1;
                    let mut j = i * i;
                    while j <= n {
                        sieve[j] = false;
                        j += i;
                    }
                }
            }
            count.to_string()
        },
    },
];

fn problem(name: &str) -> Option<&'static Problem> {
    PROBLEMS.iter().find(|p| p.name == name)
}

/// Items per test input at `level`: small until level 5, then large enough that quadratic
/// work takes far longer than [`TEST_CPU_SECONDS`].
fn input_size(level: u32, case: usize) -> usize {
    match level {
        0..=4 => 3 + level as usize * 2,
        5 => 200,
        // The last two cases at the top level are the big ones.
        _ if case >= 2 => 100_000,
        _ => 300,
    }
}

/// The test inputs of a task.
fn test_inputs(p: &Problem, v: &Verification) -> Vec<String> {
    let mut rng = TaskRng::seed_from_u64(v.tests_seed);
    (0..v.cases)
        .map(|case| (p.input)(&mut rng, input_size(v.level, case)))
        .collect()
}

fn fill(text: &str, k: i64) -> String {
    text.replace("{k}", &k.to_string())
}

/// Lines without trailing spaces, without leading and trailing blank lines.
fn normalise(text: &str) -> Vec<&str> {
    let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
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

fn short(text: &str) -> String {
    let line = text.lines().next().unwrap_or("");
    if line.len() > 60 || text.lines().nth(1).is_some() {
        format!("{}…", line.chars().take(60).collect::<String>())
    } else {
        line.to_string()
    }
}

impl Environment for Competitive {
    fn info(&self) -> EnvInfo {
        EnvInfo {
            name: NAME.into(),
            category: Category::Code,
            turns: Turns::Single,
            max_turns: 1,
            default_weight: 1.0,
            max_difficulty: MAX_DIFFICULTY,
            description: "stdin/stdout programs judged on several test cases with a time limit, in the sandbox"
                .into(),
        }
    }

    fn sample(&self, seed: u64, split: Split, difficulty: u32) -> Result<Task, EnvError> {
        let level = difficulty.min(MAX_DIFFICULTY);
        let (key, (p, k, tests_seed)) = draw_in_split(NAME, seed, split, difficulty, |rng| {
            let top: Vec<&Problem> = PROBLEMS.iter().filter(|p| p.level == level).collect();
            let easier: Vec<&Problem> = PROBLEMS.iter().filter(|p| p.level < level).collect();
            let p = if !easier.is_empty() && rng.random_bool(0.25) {
                *easier.choose(rng)?
            } else {
                *top.choose(rng)?
            };
            let k = rng.random_range(p.k.0..=p.k.1);
            let tests_seed: u64 = rng.random();
            // The statement and example make the prompt; the key is the prompt's content.
            let mut example_rng = TaskRng::seed_from_u64(tests_seed ^ 0x5eed);
            let example = (p.input)(&mut example_rng, input_size(level.min(4), 0));
            Some((format!("{}|{k}|{example}", p.name), (p, k, tests_seed)))
        })?;
        let mut example_rng = TaskRng::seed_from_u64(tests_seed ^ 0x5eed);
        let example = (p.input)(&mut example_rng, input_size(level.min(4), 0));
        let example_output = (p.judge)(k, &example);
        let statement = fill(p.statement, k);
        let prompt = if level == 0 {
            format!(
                "{statement} Example: {} -> {example_output}",
                example.trim()
            )
        } else {
            format!(
                "{statement}\nExample input:\n{}\nExample output:\n{example_output}\nWrite a Python 3 program that reads stdin and writes stdout, in a ```python block.",
                example.trim_end()
            )
        };
        let verification = Verification {
            problem: p.name.to_string(),
            k,
            tests_seed,
            level,
            cases: 3 + level as usize / 2,
        };
        let origin = TaskOrigin {
            env: NAME,
            seed,
            split,
            difficulty,
        };
        make_task(origin, &key, vec![Message::user(prompt)], &verification)
    }

    fn score(&self, task: &Task, completion: &str) -> Result<Score, EnvError> {
        self.check_task(task)?;
        let v: Verification = task.verification_as()?;
        let p = problem(&v.problem)
            .ok_or_else(|| task.invalid_verification(format!("unknown problem {:?}", v.problem)))?;
        if v.cases == 0 {
            return Err(task.invalid_verification("no test cases"));
        }
        let response = match response_or_zero(completion) {
            Ok(response) => response,
            Err(zero) => return Ok(zero),
        };
        let Some(code) = extract_code(&response) else {
            return Ok(Score::zero("no code in the response").with_component("format", 0.0));
        };
        let sandbox = code_sandbox(NAME)?;
        let limits = Limits {
            cpu_time: Duration::from_secs(TEST_CPU_SECONDS),
            wall_time: Duration::from_secs(TEST_CPU_SECONDS * 3),
            memory_bytes: 256 << 20,
            max_processes: 8,
            max_output_bytes: 4 << 20,
        };
        let mut passed = 0;
        let mut first_failure: Option<String> = None;
        for (index, input) in test_inputs(p, &v).iter().enumerate() {
            let request = SandboxRequest {
                argv: vec![sandbox.python().to_string(), "solution.py".into()],
                files: vec![("solution.py".into(), code.as_bytes().to_vec())],
                stdin: input.as_bytes().to_vec(),
                limits: limits.clone(),
            };
            let outcome = sandbox
                .run(&request)
                .map_err(|err| EnvError::InvalidConfig {
                    env: NAME.into(),
                    message: format!("the sandbox failed to start: {err}"),
                })?;
            let expected = (p.judge)(v.k, input);
            let stdout = String::from_utf8_lossy(&outcome.stdout);
            let ok = outcome.success() && normalise(&stdout) == normalise(&expected);
            if ok {
                passed += 1;
                continue;
            }
            let why = match outcome.termination {
                Termination::Exited(0) => format!(
                    "wrong answer (expected {:?}, got {:?})",
                    short(&expected),
                    short(&stdout)
                ),
                Termination::CpuTimeLimit | Termination::WallTimeLimit => {
                    format!("time limit exceeded ({TEST_CPU_SECONDS} s)")
                }
                _ => outcome.reason(),
            };
            first_failure.get_or_insert_with(|| format!("test {}: {why}", index + 1));
            let stderr = String::from_utf8_lossy(&outcome.stderr);
            if stderr.contains("SyntaxError") || stderr.contains("IndentationError") {
                break;
            }
        }
        let fraction = passed as f64 / v.cases as f64;
        let all = passed == v.cases;
        let reason = match first_failure {
            None => format!("all {} tests passed", v.cases),
            Some(failure) => format!("{passed}/{} tests passed; {failure}", v.cases),
        };
        Ok(Score {
            reward: if all { 1.0 } else { fraction.min(1.0 - 1e-6) },
            components: Vec::new(),
            reason,
        }
        .with_component("format", 1.0)
        .with_component("tests_passed", fraction)
        .with_component("all_passed", if all { 1.0 } else { 0.0 }))
    }

    fn reference(&self, task: &Task) -> Result<String, EnvError> {
        self.check_task(task)?;
        let v: Verification = task.verification_as()?;
        let p = problem(&v.problem)
            .ok_or_else(|| task.invalid_verification(format!("unknown problem {:?}", v.problem)))?;
        let code = fill(p.solution, v.k);
        Ok(if v.level == 0 {
            code
        } else {
            format!("```python\n{code}\n```")
        })
    }

    fn wrong_completions(&self, task: &Task) -> Result<Vec<String>, EnvError> {
        self.check_task(task)?;
        Ok(vec![
            "```python\nprint(0)\n```".to_string(),
            "```python\nimport sys\nprint(sys.stdin.read())\n```".to_string(),
            "```python\nprint(input()\n```".to_string(),
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
        assert_self_check_passes(&Competitive, &levels, 2);
    }

    #[test]
    fn splits_are_disjoint() {
        assert_splits_disjoint(&Competitive, 0, 150);
        assert_splits_disjoint(&Competitive, 4, 100);
    }

    #[test]
    fn level_zero_is_tiny() {
        let task = train_task(&Competitive, 3, 0);
        assert!(task.prompt_text().len() < 100, "{}", task.prompt_text());
        let reference = Competitive.reference(&task).unwrap();
        assert!(reference.starts_with("print(int(input())"), "{reference}");
    }

    #[test]
    fn slow_and_partial_solutions_lose_credit_with_reasons() {
        // A quadratic range-sum solution passes the small cases and times out on the big ones.
        let (seed, task) = (0..500)
            .map(|seed| (seed, train_task(&Competitive, seed, 6)))
            .find(|(_, t)| t.verification["problem"] == "range_sums")
            .expect("a range_sums task at level 6");
        let _ = seed;
        let quadratic = "```python\nimport sys\ndata = sys.stdin.read().split()\nn, q = int(data[0]), int(data[1])\na = [int(x) for x in data[2:2 + n]]\nfor i in range(q):\n    l, r = int(data[2 + n + 2 * i]), int(data[3 + n + 2 * i])\n    print(sum(a[l - 1:r]))\n```";
        let score = Competitive.score(&task, quadratic).unwrap();
        assert!(!score.is_full(), "{score:?}");
        assert!(score.component("tests_passed").unwrap() > 0.0, "{score:?}");
        assert!(score.reason.contains("time limit"), "{}", score.reason);
        let reference = Competitive.reference(&task).unwrap();
        assert!(Competitive.score(&task, &reference).unwrap().is_full());
        let wrong = Competitive
            .score(&task, "```python\nprint(1)\n```")
            .unwrap();
        assert_eq!(wrong.reward, 0.0);
        assert!(wrong.reason.contains("wrong answer"), "{}", wrong.reason);
    }
}
