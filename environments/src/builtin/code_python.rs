//! `code_python`: write a Python function that passes unit tests, run in the [`sandbox`].
//!
//! Tasks are generated from templates (level 0: `def f(x)` returning `x+3`; then two
//! arguments, lists, strings, number theory, list algorithms and bracket matching), or read from
//! a user's HumanEval JSONL (`task_id`, `prompt`, `test`, `entry_point`, optional
//! `canonical_solution`) or MBPP JSONL (`text`, `test_list`, optional `code`,
//! `test_setup_code`).
//!
//! The code is pulled out of the completion by [`extract_code`] (the last fenced block, else the
//! bare response). A harness in the sandbox executes it, then each test on its own, so one
//! failing test does not hide the others. **Reward = the fraction of tests passed**; only all
//! of them earn the full reward. Components: `format` (code found), `compiled` (the code
//! executed and defines the function), `pass_fraction`. A HumanEval task has a single test (its
//! `check(candidate)`), so it is all-or-nothing. A HumanEval completion that does not define the
//! entry point itself is appended to the task's prompt, as in the original benchmark.
//!
//! [`sandbox`]: crate::sandbox

use std::path::Path;
use std::time::Duration;

use rand::Rng;
use rand::seq::IndexedRandom;
use serde::{Deserialize, Serialize};

use super::datasets::{Row, parse_jsonl, read_jsonl, row_error, string_field};
use super::judge::{JudgeRequest, JudgeTest, Solution, TestKind, judge};
use super::script::run_in_sandbox;
use crate::chat::{Message, extract_code};
use crate::env::{Category, EnvInfo, Environment, Turns, response_or_zero};
use crate::error::EnvError;
use crate::sampling::{TaskOrigin, TaskRng, draw_in_split, make_task, split_of, task_rng};
use crate::sandbox::{self, Limits, Sandbox};
use crate::task::{Score, Split, Task};

const NAME: &str = "code_python";
const MAX_DIFFICULTY: u32 = 6;
const DATASET_SPLIT_NAMESPACE: &str = "dataset";

/// The process-wide sandbox, or the error an environment reports when it cannot run code.
pub(crate) fn code_sandbox(env: &str) -> Result<&'static Sandbox, EnvError> {
    sandbox::shared().map_err(|err| EnvError::InvalidConfig {
        env: env.to_string(),
        message: format!("model-written code needs the sandbox: {err}"),
    })
}

/// Python source for a string literal (double-quoted, escaped).
pub(crate) fn py_str(text: &str) -> String {
    let mut out = String::from("\"");
    for ch in text.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A Python value used in tests.
#[derive(Debug, Clone, PartialEq)]
enum Py {
    Int(i64),
    Bool(bool),
    Str(String),
    List(Vec<i64>),
}

impl Py {
    fn literal(&self) -> String {
        match self {
            Py::Int(n) => n.to_string(),
            Py::Bool(b) => if *b { "True" } else { "False" }.to_string(),
            Py::Str(s) => py_str(s),
            Py::List(items) => format!(
                "[{}]",
                items
                    .iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

/// One generated function family.
struct Template {
    /// Lowest level it appears at.
    level: u32,
    /// Function name (`{k}` is not used in names).
    name: &'static str,
    /// Parameter list, e.g. `xs` or `a, b`.
    params: &'static str,
    /// What it returns; `{k}` is replaced by the task's constant.
    describe: &'static str,
    /// The reference body (after the `def` line, indented); `{k}` replaced.
    body: &'static str,
    /// Range of the constant `k`.
    k: (i64, i64),
    /// Draws one argument tuple.
    args: fn(&mut TaskRng, u32) -> Vec<Py>,
    /// The expected result for `k` and the arguments.
    eval: fn(i64, &[Py]) -> Py,
}

fn int(rng: &mut TaskRng, low: i64, high: i64) -> Py {
    Py::Int(rng.random_range(low..=high))
}

fn ints(rng: &mut TaskRng, level: u32) -> Vec<i64> {
    let len = rng.random_range(0..=3 + level as usize);
    (0..len).map(|_| rng.random_range(-9..=20)).collect()
}

fn word(rng: &mut TaskRng) -> String {
    let len = rng.random_range(1..=5);
    (0..len)
        .map(|_| *b"abcdeilnorst".choose(rng).unwrap_or(&b'a') as char)
        .collect()
}

fn as_int(value: &Py) -> i64 {
    match value {
        Py::Int(n) => *n,
        _ => 0,
    }
}

fn as_list(value: &Py) -> &[i64] {
    match value {
        Py::List(items) => items,
        _ => &[],
    }
}

fn as_str(value: &Py) -> &str {
    match value {
        Py::Str(s) => s,
        _ => "",
    }
}

const TEMPLATES: &[Template] = &[
    Template {
        level: 0,
        name: "f",
        params: "x",
        describe: "x+{k}",
        body: "return x+{k}",
        k: (1, 20),
        args: |rng, _| vec![int(rng, -9, 99)],
        eval: |k, a| Py::Int(as_int(&a[0]) + k),
    },
    Template {
        level: 0,
        name: "f",
        params: "x",
        describe: "x*{k}",
        body: "return x*{k}",
        k: (2, 20),
        args: |rng, _| vec![int(rng, -9, 99)],
        eval: |k, a| Py::Int(as_int(&a[0]) * k),
    },
    Template {
        level: 0,
        name: "f",
        params: "x",
        describe: "x-{k}",
        body: "return x-{k}",
        k: (1, 20),
        args: |rng, _| vec![int(rng, -9, 99)],
        eval: |k, a| Py::Int(as_int(&a[0]) - k),
    },
    Template {
        level: 1,
        name: "f",
        params: "a, b",
        describe: "a*b+{k}",
        body: "return a*b+{k}",
        k: (1, 9),
        args: |rng, _| vec![int(rng, -9, 30), int(rng, -9, 30)],
        eval: |k, a| Py::Int(as_int(&a[0]) * as_int(&a[1]) + k),
    },
    Template {
        level: 1,
        name: "f",
        params: "a, b",
        describe: "max(a, b)+{k}",
        body: "return max(a, b)+{k}",
        k: (1, 9),
        args: |rng, _| vec![int(rng, -9, 30), int(rng, -9, 30)],
        eval: |k, a| Py::Int(as_int(&a[0]).max(as_int(&a[1])) + k),
    },
    Template {
        level: 2,
        name: "sum_evens",
        params: "xs",
        describe: "the sum of the even numbers in the list xs",
        body: "return sum(x for x in xs if x % 2 == 0)",
        k: (0, 0),
        args: |rng, level| vec![Py::List(ints(rng, level))],
        eval: |_, a| Py::Int(as_list(&a[0]).iter().filter(|x| *x % 2 == 0).sum()),
    },
    Template {
        level: 2,
        name: "count_above",
        params: "xs",
        describe: "how many numbers in the list xs are greater than {k}",
        body: "return sum(1 for x in xs if x > {k})",
        k: (0, 9),
        args: |rng, level| vec![Py::List(ints(rng, level))],
        eval: |k, a| Py::Int(as_list(&a[0]).iter().filter(|x| **x > k).count() as i64),
    },
    Template {
        level: 2,
        name: "add_each",
        params: "xs",
        describe: "a new list with {k} added to every number of the list xs",
        body: "return [x + {k} for x in xs]",
        k: (1, 9),
        args: |rng, level| vec![Py::List(ints(rng, level))],
        eval: |k, a| Py::List(as_list(&a[0]).iter().map(|x| x + k).collect()),
    },
    Template {
        level: 3,
        name: "reverse",
        params: "s",
        describe: "the string s reversed",
        body: "return s[::-1]",
        k: (0, 0),
        args: |rng, _| vec![Py::Str(word(rng))],
        eval: |_, a| Py::Str(as_str(&a[0]).chars().rev().collect()),
    },
    Template {
        level: 3,
        name: "count_vowels",
        params: "s",
        describe: "how many vowels (a, e, i, o, u) the lowercase string s has",
        body: "return sum(1 for c in s if c in 'aeiou')",
        k: (0, 0),
        args: |rng, _| vec![Py::Str(word(rng) + &word(rng))],
        eval: |_, a| {
            Py::Int(
                as_str(&a[0])
                    .chars()
                    .filter(|c| "aeiou".contains(*c))
                    .count() as i64,
            )
        },
    },
    Template {
        level: 3,
        name: "is_palindrome",
        params: "s",
        describe: "True if the string s reads the same backwards, else False",
        body: "return s == s[::-1]",
        k: (0, 0),
        args: |rng, _| {
            let w = word(rng);
            if rng.random_bool(0.5) {
                let mirrored: String = w.chars().rev().collect();
                vec![Py::Str(format!("{w}{mirrored}"))]
            } else {
                vec![Py::Str(w)]
            }
        },
        eval: |_, a| {
            let s = as_str(&a[0]);
            Py::Bool(s.chars().eq(s.chars().rev()))
        },
    },
    Template {
        level: 4,
        name: "digit_sum",
        params: "n",
        describe: "the sum of the decimal digits of the non-negative integer n",
        body: "return sum(int(d) for d in str(n))",
        k: (0, 0),
        args: |rng, _| vec![int(rng, 0, 99_999)],
        eval: |_, a| {
            Py::Int(
                as_int(&a[0])
                    .to_string()
                    .bytes()
                    .map(|d| i64::from(d - b'0'))
                    .sum(),
            )
        },
    },
    Template {
        level: 4,
        name: "gcd",
        params: "a, b",
        describe: "the greatest common divisor of the positive integers a and b",
        body: "while b:\n        a, b = b, a % b\n    return a",
        k: (0, 0),
        args: |rng, _| vec![int(rng, 1, 500), int(rng, 1, 500)],
        eval: |_, a| {
            let (mut x, mut y) = (as_int(&a[0]), as_int(&a[1]));
            while y != 0 {
                (x, y) = (y, x % y);
            }
            Py::Int(x)
        },
    },
    Template {
        level: 4,
        name: "is_prime",
        params: "n",
        describe: "True if the integer n is a prime number, else False",
        body: "if n < 2:\n        return False\n    return all(n % d for d in range(2, int(n ** 0.5) + 1))",
        k: (0, 0),
        args: |rng, _| vec![int(rng, -3, 200)],
        eval: |_, a| {
            let n = as_int(&a[0]);
            Py::Bool(n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| n % d != 0))
        },
    },
    Template {
        level: 5,
        name: "dedupe",
        params: "xs",
        describe: "the list xs without repeated numbers, keeping the first occurrence of each in order",
        body: "seen = set()\n    out = []\n    for x in xs:\n        if x not in seen:\n            seen.add(x)\n            out.append(x)\n    return out",
        k: (0, 0),
        args: |rng, level| {
            vec![Py::List(
                (0..rng.random_range(0..=4 + level))
                    .map(|_| rng.random_range(0..=6))
                    .collect(),
            )]
        },
        eval: |_, a| {
            let mut out: Vec<i64> = Vec::new();
            for x in as_list(&a[0]) {
                if !out.contains(x) {
                    out.push(*x);
                }
            }
            Py::List(out)
        },
    },
    Template {
        level: 5,
        name: "running_sum",
        params: "xs",
        describe: "the list of running totals of xs (element i is xs[0] + ... + xs[i])",
        body: "out = []\n    total = 0\n    for x in xs:\n        total += x\n        out.append(total)\n    return out",
        k: (0, 0),
        args: |rng, level| vec![Py::List(ints(rng, level))],
        eval: |_, a| {
            let mut total = 0;
            Py::List(
                as_list(&a[0])
                    .iter()
                    .map(|x| {
                        total += x;
                        total
                    })
                    .collect(),
            )
        },
    },
    Template {
        level: 6,
        name: "longest_run",
        params: "xs",
        describe: "the length of the longest strictly increasing run of consecutive elements of xs (0 for an empty list)",
        body: "best = cur = 0\n    prev = None\n    for x in xs:\n        cur = cur + 1 if prev is not None and x > prev else 1\n        best = max(best, cur)\n        prev = x\n    return best",
        k: (0, 0),
        args: |rng, level| vec![Py::List(ints(rng, level + 3))],
        eval: |_, a| {
            let (mut best, mut cur, mut prev) = (0, 0, None);
            for &x in as_list(&a[0]) {
                cur = if prev.is_some_and(|p| x > p) {
                    cur + 1
                } else {
                    1
                };
                best = best.max(cur);
                prev = Some(x);
            }
            Py::Int(best)
        },
    },
    Template {
        level: 6,
        name: "balanced",
        params: "s",
        describe: "True if the brackets ( ) [ ] in s are balanced and properly nested, else False",
        body: "stack = []\n    pairs = {')': '(', ']': '['}\n    for c in s:\n        if c in '([':\n            stack.append(c)\n        elif c in pairs:\n            if not stack or stack.pop() != pairs[c]:\n                return False\n    return not stack",
        k: (0, 0),
        args: |rng, level| {
            let len = rng.random_range(0..=4 + level as usize);
            vec![Py::Str(
                (0..len)
                    .map(|_| *b"()[]".choose(rng).unwrap_or(&b'(') as char)
                    .collect(),
            )]
        },
        eval: |_, a| {
            let mut stack = Vec::new();
            for c in as_str(&a[0]).chars() {
                match c {
                    '(' | '[' => stack.push(c),
                    ')' | ']' => {
                        let want = if c == ')' { '(' } else { '[' };
                        if stack.pop() != Some(want) {
                            return Py::Bool(false);
                        }
                    }
                    _ => {}
                }
            }
            Py::Bool(stack.is_empty())
        },
    },
];

/// What the verifier needs (all Python source).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Verification {
    /// The function under test.
    entry_point: String,
    /// Prepended to a completion that does not define `entry_point` (HumanEval's prompt).
    #[serde(default)]
    prefix: String,
    /// Executed after the solution, before the tests (HumanEval's `check`, MBPP's setup).
    #[serde(default)]
    setup: String,
    /// Statements, each one test (`assert f(1) == 4`, `check(f)`).
    tests: Vec<String>,
    /// A solution that passes every test, if known.
    reference: Option<String>,
    /// Whether the reference is given bare (levels 0-1) or in a fenced block.
    #[serde(default)]
    bare_reference: bool,
}

/// Python unit-test tasks.
#[derive(Debug, Clone)]
pub struct CodePython {
    name: String,
    source: Source,
}

#[derive(Debug, Clone)]
enum Source {
    Generated,
    Dataset(Vec<DatasetTask>),
}

#[derive(Debug, Clone)]
struct DatasetTask {
    prompt: String,
    verification: Verification,
    split: Split,
}

impl Default for CodePython {
    fn default() -> Self {
        Self::generated()
    }
}

impl CodePython {
    /// Tasks generated from templates.
    pub fn generated() -> Self {
        Self {
            name: NAME.to_string(),
            source: Source::Generated,
        }
    }

    /// HumanEval JSONL text (`task_id`, `prompt`, `test`, `entry_point`, optional
    /// `canonical_solution`). `source_name` labels errors.
    pub fn from_humaneval_str(text: &str, source_name: &str) -> Result<Self, EnvError> {
        let rows = parse_jsonl(text, source_name)?;
        Self::from_rows(&rows, source_name, humaneval_task)
    }

    /// MBPP JSONL text (`text`, `test_list`, optional `code` and `test_setup_code`).
    pub fn from_mbpp_str(text: &str, source_name: &str) -> Result<Self, EnvError> {
        let rows = parse_jsonl(text, source_name)?;
        Self::from_rows(&rows, source_name, mbpp_task)
    }

    /// A HumanEval or MBPP JSONL file, told apart by the first row's keys (`entry_point` and
    /// `test`, or `test_list`).
    pub fn from_jsonl_file(path: impl AsRef<Path>) -> Result<Self, EnvError> {
        let path = path.as_ref();
        let rows = read_jsonl(path)?;
        let source_name = path.display().to_string();
        let first = &rows[0].value;
        if first.get("entry_point").is_some() && first.get("test").is_some() {
            Self::from_rows(&rows, &source_name, humaneval_task)
        } else if first.get("test_list").is_some() {
            Self::from_rows(&rows, &source_name, mbpp_task)
        } else {
            Err(row_error(
                &source_name,
                rows[0].line,
                "neither HumanEval (`entry_point`, `test`) nor MBPP (`test_list`) fields",
            ))
        }
    }

    fn from_rows(
        rows: &[Row],
        source_name: &str,
        parse: fn(&Row, &str) -> Result<DatasetTask, EnvError>,
    ) -> Result<Self, EnvError> {
        let tasks = rows
            .iter()
            .map(|row| parse(row, source_name))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            name: NAME.to_string(),
            source: Source::Dataset(tasks),
        })
    }

    /// The same environment under another name (e.g. `humaneval`).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
}

fn humaneval_task(row: &Row, source_name: &str) -> Result<DatasetTask, EnvError> {
    let prompt = string_field(row, "prompt", source_name)?.to_string();
    let test = string_field(row, "test", source_name)?.to_string();
    let entry_point = string_field(row, "entry_point", source_name)?.to_string();
    if !is_identifier(&entry_point) {
        return Err(row_error(
            source_name,
            row.line,
            format!("`entry_point` {entry_point:?} is not a Python identifier"),
        ));
    }
    if !test.contains("def check") {
        return Err(row_error(
            source_name,
            row.line,
            "`test` does not define `check(candidate)`",
        ));
    }
    let reference = row
        .value
        .get("canonical_solution")
        .and_then(|v| v.as_str())
        .map(|body| format!("{prompt}{body}"));
    let shown = format!("Complete this Python function:\n```python\n{prompt}```");
    Ok(DatasetTask {
        split: split_of(DATASET_SPLIT_NAMESPACE, &prompt),
        prompt: shown,
        verification: Verification {
            tests: vec![format!("check({entry_point})")],
            entry_point,
            prefix: prompt,
            setup: test,
            reference,
            bare_reference: false,
        },
    })
}

fn mbpp_task(row: &Row, source_name: &str) -> Result<DatasetTask, EnvError> {
    let text = string_field(row, "text", source_name)?.to_string();
    let tests: Vec<String> = row
        .value
        .get("test_list")
        .and_then(|v| v.as_array())
        .ok_or_else(|| row_error(source_name, row.line, "missing list field `test_list`"))?
        .iter()
        .map(|t| t.as_str().map(str::to_string))
        .collect::<Option<_>>()
        .ok_or_else(|| row_error(source_name, row.line, "`test_list` holds a non-string"))?;
    let first = tests
        .first()
        .ok_or_else(|| row_error(source_name, row.line, "`test_list` is empty"))?;
    let entry_point = first
        .trim_start()
        .strip_prefix("assert")
        .map(|rest| {
            rest.trim_start()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|name| is_identifier(name))
        .ok_or_else(|| {
            row_error(
                source_name,
                row.line,
                format!("cannot find the function name in the first test {first:?}"),
            )
        })?;
    let setup = row
        .value
        .get("test_setup_code")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_string();
    let reference = row
        .value
        .get("code")
        .and_then(|v| v.as_str())
        .map(|code| code.replace("\r\n", "\n"));
    let shown = format!(
        "{text}\nYour code should pass these tests:\n{}\nAnswer with the code in a ```python block.",
        tests.join("\n")
    );
    Ok(DatasetTask {
        split: split_of(DATASET_SPLIT_NAMESPACE, &text),
        prompt: shown,
        verification: Verification {
            entry_point,
            prefix: String::new(),
            setup,
            tests,
            reference,
            bare_reference: false,
        },
    })
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_alphabetic() || c == '_')
        && chars.all(|c| c.is_alphanumeric() || c == '_')
}

fn fill(text: &str, k: i64) -> String {
    text.replace("{k}", &k.to_string())
}

/// A generated task: prompt text and verification.
fn generate(rng: &mut TaskRng, level: u32) -> Option<(String, Verification)> {
    let top: Vec<&Template> = TEMPLATES
        .iter()
        .filter(|t| t.level == level.min(MAX_DIFFICULTY))
        .collect();
    let easier: Vec<&Template> = TEMPLATES
        .iter()
        .filter(|t| t.level < level.min(MAX_DIFFICULTY))
        .collect();
    let template = if !easier.is_empty() && rng.random_bool(0.25) {
        *easier.choose(rng)?
    } else {
        *top.choose(rng)?
    };
    let k = rng.random_range(template.k.0..=template.k.1);
    let cases = 4 + level as usize / 2;
    let mut tests = Vec::new();
    let mut examples = Vec::new();
    for _ in 0..cases * 3 {
        if tests.len() == cases {
            break;
        }
        let args = (template.args)(rng, level);
        let call = format!(
            "{}({})",
            template.name,
            args.iter().map(Py::literal).collect::<Vec<_>>().join(", ")
        );
        let test = format!("assert {call} == {}", (template.eval)(k, &args).literal());
        if !tests.contains(&test) {
            examples.push(format!("{call} == {}", (template.eval)(k, &args).literal()));
            tests.push(test);
        }
    }
    let body = fill(template.body, k);
    let code = format!("def {}({}):\n    {body}", template.name, template.params);
    let bare = template.level <= 1;
    let prompt = if bare {
        format!(
            "Write Python def {}({}) returning {}.",
            template.name,
            template.params,
            fill(template.describe, k)
        )
    } else {
        format!(
            "Write a Python function {}({}) that returns {}. Example: {}. Answer with the code in a ```python block.",
            template.name,
            template.params,
            fill(template.describe, k),
            examples.first()?
        )
    };
    Some((
        prompt,
        Verification {
            entry_point: template.name.to_string(),
            prefix: String::new(),
            setup: String::new(),
            tests,
            reference: Some(code),
            bare_reference: bare,
        },
    ))
}

/// How long one call of the solution's function may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(4);

/// The limits tests run under.
fn test_limits() -> Limits {
    Limits {
        cpu_time: Duration::from_secs(5),
        wall_time: Duration::from_secs(10),
        memory_bytes: 512 << 20,
        max_processes: 16,
        max_output_bytes: 256 << 10,
    }
}

/// A function body whose first line lost its indentation (completions are trimmed): the first
/// line indented to match the rest, or every line by four spaces when none is indented.
fn indent_body(code: &str) -> String {
    let mut lines = code.lines();
    let first = lines.next().unwrap_or("");
    let rest: Vec<&str> = lines.collect();
    let indented_rest = rest
        .iter()
        .any(|l| l.starts_with("    ") || l.starts_with('\t'));
    if first.starts_with(' ') || first.starts_with('\t') {
        code.to_string()
    } else if indented_rest || rest.is_empty() {
        std::iter::once(format!("    {first}"))
            .chain(rest.iter().map(|l| l.to_string()))
            .collect::<Vec<_>>()
            .join("\n")
    } else {
        code.lines()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Runs `code` against the tests; the score.
fn run_tests(env: &str, verification: &Verification, code: &str) -> Result<Score, EnvError> {
    let defines_entry = code.contains(&format!("def {}", verification.entry_point));
    let solution = if defines_entry || verification.prefix.is_empty() {
        code.to_string()
    } else {
        format!("{}{}\n", verification.prefix, indent_body(code))
    };
    if !solution.contains(&verification.entry_point) {
        return Ok(Score::zero(format!(
            "the code never mentions the function {}",
            verification.entry_point
        ))
        .with_component("format", 1.0)
        .with_component("compiled", 0.0)
        .with_component("pass_fraction", 0.0));
    }
    let request = JudgeRequest {
        files: vec![("solution.py".into(), solution.into_bytes())],
        solution: Solution::File {
            path: "solution.py".into(),
            bind: vec![verification.entry_point.clone()],
        },
        setup: verification.setup.clone(),
        tests: verification
            .tests
            .iter()
            .enumerate()
            .map(|(index, test)| JudgeTest {
                label: index.to_string(),
                source: test.clone(),
                kind: TestKind::Statement,
            })
            .collect(),
        limits: test_limits(),
        call_timeout: CALL_TIMEOUT,
    };
    let verdict = judge(&request, run_in_sandbox).map_err(|message| EnvError::InvalidConfig {
        env: env.to_string(),
        message,
    })?;
    let total = verification.tests.len().max(1);
    let passed: std::collections::BTreeSet<usize> = verdict
        .results
        .iter()
        .filter(|r| r.ok)
        .filter_map(|r| r.test.parse().ok())
        .collect();
    let first_failure = verdict.results.iter().find(|r| !r.ok).map(|r| {
        let test = r
            .test
            .parse::<usize>()
            .ok()
            .and_then(|i| verification.tests.get(i))
            .map_or("", String::as_str);
        format!(
            "{} failed: {}",
            test.chars().take(120).collect::<String>(),
            r.error
        )
    });
    let done = verdict.done;
    let error = verdict.error.clone();
    let outcome = verdict.outcome;
    let count = passed.iter().filter(|i| **i < total).count();
    let fraction = count as f64 / total as f64;
    let compiled = error.is_none() && (done || count > 0 || first_failure.is_some());
    let reason = if let Some(error) = error {
        error
    } else if !done && count < total {
        format!(
            "{count}/{total} tests passed before the program {}",
            outcome.reason()
        )
    } else if count == total {
        format!("all {total} tests passed")
    } else {
        format!(
            "{count}/{total} tests passed; {}",
            first_failure.unwrap_or_default()
        )
    };
    // Full reward only when the harness got through every test.
    let reward = if count == total && done {
        1.0
    } else {
        fraction.min(1.0 - 1e-6)
    };
    Ok(Score {
        reward,
        components: Vec::new(),
        reason,
    }
    .with_component("format", 1.0)
    .with_component("compiled", if compiled { 1.0 } else { 0.0 })
    .with_component("pass_fraction", fraction))
}

impl Environment for CodePython {
    fn info(&self) -> EnvInfo {
        let (description, max_difficulty) = match &self.source {
            Source::Generated => (
                "Write a Python function that passes unit tests (run in the sandbox); reward = fraction passed".to_string(),
                MAX_DIFFICULTY,
            ),
            Source::Dataset(tasks) => (
                format!("{} HumanEval/MBPP-style Python tasks, tests run in the sandbox", tasks.len()),
                0,
            ),
        };
        EnvInfo {
            name: self.name.clone(),
            category: Category::Code,
            turns: Turns::Single,
            max_turns: 1,
            default_weight: 1.0,
            max_difficulty,
            description,
        }
    }

    fn sample(&self, seed: u64, split: Split, difficulty: u32) -> Result<Task, EnvError> {
        let origin = TaskOrigin {
            env: &self.name,
            seed,
            split,
            difficulty,
        };
        match &self.source {
            Source::Generated => {
                let level = difficulty.min(MAX_DIFFICULTY);
                let (key, (prompt, verification)) =
                    draw_in_split(&self.name, seed, split, difficulty, |rng| {
                        let (prompt, verification) = generate(rng, level)?;
                        Some((prompt.clone(), (prompt, verification)))
                    })?;
                make_task(origin, &key, vec![Message::user(prompt)], &verification)
            }
            Source::Dataset(tasks) => {
                let in_split: Vec<&DatasetTask> =
                    tasks.iter().filter(|t| t.split == split).collect();
                if in_split.is_empty() {
                    return Err(EnvError::SplitExhausted {
                        env: self.name.clone(),
                        split,
                        difficulty,
                        seed,
                        attempts: tasks.len(),
                    });
                }
                let index = task_rng(&self.name, seed, 0).random_range(0..in_split.len());
                let task = in_split[index];
                make_task(
                    origin,
                    &task.prompt,
                    vec![Message::user(task.prompt.clone())],
                    &task.verification,
                )
            }
        }
    }

    fn score(&self, task: &Task, completion: &str) -> Result<Score, EnvError> {
        self.check_task(task)?;
        let verification: Verification = task.verification_as()?;
        if verification.tests.is_empty() || !is_identifier(&verification.entry_point) {
            return Err(task.invalid_verification("no tests, or a bad entry point"));
        }
        let response = match response_or_zero(completion) {
            Ok(response) => response,
            Err(zero) => return Ok(zero),
        };
        let Some(code) = extract_code(&response) else {
            return Ok(Score::zero("no code in the response").with_component("format", 0.0));
        };
        run_tests(&self.name, &verification, &code)
    }

    fn reference(&self, task: &Task) -> Result<String, EnvError> {
        self.check_task(task)?;
        let verification: Verification = task.verification_as()?;
        let code = verification
            .reference
            .ok_or_else(|| EnvError::NoReference {
                env: self.name.clone(),
                task_id: task.id.clone(),
                reason: "the dataset row has no `canonical_solution` / `code`".into(),
            })?;
        Ok(if verification.bare_reference {
            code
        } else {
            format!("```python\n{}\n```", code.trim_end())
        })
    }

    fn wrong_completions(&self, task: &Task) -> Result<Vec<String>, EnvError> {
        self.check_task(task)?;
        let verification: Verification = task.verification_as()?;
        let name = &verification.entry_point;
        Ok(vec![
            format!("```python\ndef {name}(*args):\n    return None\n```"),
            format!("```python\ndef {name}(*args):\n    raise NotImplementedError\n```"),
            format!("```python\ndef {name}(*args)\n    return 0\n```"),
            "```python\nimport sys\nsys.exit(0)\n```".to_string(),
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
        assert_self_check_passes(&CodePython::generated(), &levels, 2);
    }

    #[test]
    fn splits_are_disjoint() {
        assert_splits_disjoint(&CodePython::generated(), 0, 150);
        assert_splits_disjoint(&CodePython::generated(), 4, 150);
    }

    #[test]
    fn level_zero_is_tiny_and_its_reference_bare() {
        let env = CodePython::generated();
        for seed in 0..20 {
            let task = train_task(&env, seed, 0);
            assert!(task.prompt_text().len() < 80, "{}", task.prompt_text());
            let reference = env.reference(&task).unwrap();
            assert!(reference.starts_with("def f(x):"), "{reference}");
        }
    }

    #[test]
    fn partial_solutions_get_partial_credit_and_reasons() {
        let env = CodePython::generated();
        let task = Task {
            verification: serde_json::to_value(Verification {
                entry_point: "f".into(),
                prefix: String::new(),
                setup: String::new(),
                tests: vec![
                    "assert f(1) == 2".into(),
                    "assert f(2) == 4".into(),
                    "assert f(0) == 0".into(),
                    "assert f(5) == 10".into(),
                ],
                reference: Some("def f(x):\n    return 2*x".into()),
                bare_reference: true,
            })
            .unwrap(),
            ..train_task(&env, 0, 0)
        };
        let score = env.score(&task, "def f(x):\n    return x + 1").unwrap();
        assert_eq!(score.component("pass_fraction"), Some(0.25), "{score:?}");
        assert!((score.reward - 0.25).abs() < 1e-9);
        assert!(
            score.reason.contains("1/4 tests passed"),
            "{}",
            score.reason
        );
        assert!(
            score.reason.contains("assert f(2) == 4"),
            "{}",
            score.reason
        );
        let full = env
            .score(&task, "```python\ndef f(x):\n    return 2*x\n```")
            .unwrap();
        assert!(full.is_full(), "{full:?}");
        let syntax = env.score(&task, "def f(x) return").unwrap();
        assert_eq!(syntax.reward, 0.0);
        assert_eq!(syntax.component("compiled"), Some(0.0));
        assert!(syntax.reason.contains("SyntaxError"), "{}", syntax.reason);
        // A solution that prints fake results or exits early gains nothing.
        let forged = env
            .score(
                &task,
                "import sys\nprint('@@0 pass 0')\ndef f(x):\n    sys.exit(0)",
            )
            .unwrap();
        assert_eq!(forged.reward, 0.0, "{forged:?}");
        let looping = env
            .score(&task, "def f(x):\n    while True:\n        pass")
            .unwrap();
        assert_eq!(looping.reward, 0.0);
        assert!(looping.reason.contains("limit"), "{}", looping.reason);
    }

    const HUMANEVAL: &str = r#"{"task_id": "HumanEval/0", "prompt": "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n", "canonical_solution": "    return a + b\n", "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n", "entry_point": "add"}
{"task_id": "HumanEval/1", "prompt": "def neg(x):\n", "canonical_solution": "    return -x\n", "test": "def check(candidate):\n    assert candidate(3) == -3\n", "entry_point": "neg"}
{"task_id": "HumanEval/2", "prompt": "def sq(x):\n", "canonical_solution": "    return x * x\n", "test": "def check(candidate):\n    assert candidate(3) == 9\n", "entry_point": "sq"}
{"task_id": "HumanEval/3", "prompt": "def half(x):\n", "canonical_solution": "    return x // 2\n", "test": "def check(candidate):\n    assert candidate(9) == 4\n", "entry_point": "half"}
{"task_id": "HumanEval/4", "prompt": "def inc(x):\n", "canonical_solution": "    return x + 1\n", "test": "def check(candidate):\n    assert candidate(9) == 10\n", "entry_point": "inc"}
{"task_id": "HumanEval/5", "prompt": "def dbl(x):\n", "canonical_solution": "    return x * 2\n", "test": "def check(candidate):\n    assert candidate(9) == 18\n", "entry_point": "dbl"}
{"task_id": "HumanEval/6", "prompt": "def dec(x):\n", "canonical_solution": "    return x - 1\n", "test": "def check(candidate):\n    assert candidate(9) == 8\n", "entry_point": "dec"}
{"task_id": "HumanEval/7", "prompt": "def ident(x):\n", "canonical_solution": "    return x\n", "test": "def check(candidate):\n    assert candidate(9) == 9\n", "entry_point": "ident"}"#;

    const MBPP: &str = r#"{"task_id": 11, "text": "Write a python function to remove first and last occurrence of a given character from the string.", "code": "def remove_Occ(s,ch): \r\n    for i in range(len(s)): \r\n        if (s[i] == ch): \r\n            s = s[0 : i] + s[i + 1:] \r\n            break\r\n    for i in range(len(s) - 1,-1,-1):  \r\n        if (s[i] == ch): \r\n            s = s[0 : i] + s[i + 1:] \r\n            break\r\n    return s ", "test_list": ["assert remove_Occ(\"hello\",\"l\") == \"heo\"", "assert remove_Occ(\"abcda\",\"a\") == \"bcd\"", "assert remove_Occ(\"PHP\",\"P\") == \"H\""], "test_setup_code": ""}
{"task_id": 12, "text": "Write a function to add one.", "code": "def add_one(x):\n    return x + 1", "test_list": ["assert add_one(1) == 2", "assert add_one(-1) == 0"]}
{"task_id": 13, "text": "Write a function to square.", "code": "def square(x):\n    return x * x", "test_list": ["assert square(3) == 9"]}
{"task_id": 14, "text": "Write a function to negate.", "code": "def negate(x):\n    return -x", "test_list": ["assert negate(3) == -3"]}
{"task_id": 15, "text": "Write a function to triple.", "code": "def triple(x):\n    return 3 * x", "test_list": ["assert triple(3) == 9"]}
{"task_id": 16, "text": "Write a function to halve.", "code": "def halve(x):\n    return x // 2", "test_list": ["assert halve(8) == 4"]}"#;

    fn check_dataset(env: &CodePython) {
        let options = crate::CheckOptions {
            tasks_per_split: 3,
            difficulties: Some(vec![0]),
            base_seed: 0,
        };
        let report = crate::check_environment(env, &options);
        // A tiny dataset may have no heldout rows; everything else must pass.
        let failures: Vec<_> = report
            .failures
            .iter()
            .filter(|f| f.kind != crate::FailureKind::SampleFailed)
            .collect();
        assert!(failures.is_empty(), "{failures:#?}");
    }

    #[test]
    fn humaneval_rows_run_their_check_function() {
        let env = CodePython::from_humaneval_str(HUMANEVAL, "he.jsonl").unwrap();
        check_dataset(&env);
        let Source::Dataset(tasks) = &env.source else {
            panic!("not a dataset")
        };
        let add = tasks
            .iter()
            .find(|t| t.verification.entry_point == "add")
            .unwrap();
        let task = make_task(
            TaskOrigin {
                env: NAME,
                seed: 0,
                split: add.split,
                difficulty: 0,
            },
            &add.prompt,
            vec![Message::user(add.prompt.clone())],
            &add.verification,
        )
        .unwrap();
        // A body-only completion is appended to the prompt, as in HumanEval.
        assert!(env.score(&task, "    return a + b\n").unwrap().is_full());
        assert!(
            env.score(&task, "```python\ndef add(a, b):\n    return a + b\n```")
                .unwrap()
                .is_full()
        );
        assert!(!env.score(&task, "    return a - b\n").unwrap().is_full());
        let two_lines = "    c = a + b\n    return c";
        assert!(env.score(&task, two_lines).unwrap().is_full());
        let err = CodePython::from_humaneval_str(
            r#"{"prompt": "x", "test": "def check(c): pass"}"#,
            "bad.jsonl",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("bad.jsonl line 1") && err.contains("entry_point"),
            "{err}"
        );
    }

    #[test]
    fn mbpp_rows_count_each_assert() {
        let env = CodePython::from_mbpp_str(MBPP, "mbpp.jsonl").unwrap();
        check_dataset(&env);
        let Source::Dataset(tasks) = &env.source else {
            panic!("not a dataset")
        };
        let row = tasks
            .iter()
            .find(|t| t.verification.entry_point == "remove_Occ")
            .unwrap();
        assert_eq!(row.verification.tests.len(), 3);
        let task = make_task(
            TaskOrigin {
                env: NAME,
                seed: 0,
                split: row.split,
                difficulty: 0,
            },
            &row.prompt,
            vec![Message::user(row.prompt.clone())],
            &row.verification,
        )
        .unwrap();
        assert!(
            env.score(&task, &env.reference(&task).unwrap())
                .unwrap()
                .is_full()
        );
        let partial = env
            .score(
                &task,
                "```python\ndef remove_Occ(s, ch):\n    return 'heo'\n```",
            )
            .unwrap();
        assert!((partial.reward - 1.0 / 3.0).abs() < 1e-9, "{partial:?}");
        let err = CodePython::from_mbpp_str(r#"{"text": "t", "test_list": []}"#, "m.jsonl")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("m.jsonl line 1") && err.contains("empty"),
            "{err}"
        );
    }
}
