//! `swe` (multi-turn): fix a bug in a small generated Python repository.
//!
//! Each task builds a utility library (`mathutil.py`, `listutil.py`, `textutil.py`, and from
//! level 3 an `app.py` that uses them) from function templates, injects one bug into one function
//! (a wrong operator or comparison, an off-by-one, a wrong default, a wrong index, swapped
//! arguments), and writes a visible test file per module whose test of the buggy function fails.
//! Hidden tests (several cases of every function, comparing types as well as values so objects
//! with a permissive `__eq__` do not pass) decide the reward.
//!
//! The repository lives in the episode state as JSON (path → text). The model acts with the
//! chat template's tool calls, `<tool_call>{"name": …, "arguments": {…}}</tool_call>`:
//!
//! - `view {"path", "start"?, "end"?}`: the file with line numbers;
//! - `search {"pattern", "path"?}`: lines containing the text;
//! - `edit {"path", "old", "new"}` replaces one unique occurrence of `old`, or
//!   `edit {"path", "start", "end", "text"}` replaces lines `start..=end` (1-based);
//! - `run_tests {}` runs the visible tests on the current files in the sandbox;
//! - `submit {}` (or an answer without a tool call, or running out of turns) runs the hidden tests
//!   on the current files in the sandbox and ends the episode.
//!
//! Tests run through `swe/run_tests.py`, which imports each test module, calls its `test*`
//! functions and prints the results after a nonce read from stdin. The reward is 1.0 when every
//! hidden test passes, less 0.1 per invalid tool call (at least 0.5), and 0 otherwise. Invalid
//! calls (unreadable markup, unknown tools, missing arguments, edits that match nothing) get an
//! `error:` observation and are counted in the `invalid_calls` component. [`Environment::score`]
//! on a single completion applies its `edit` calls to the starting repository and runs the hidden
//! tests.
//!
//! Levels: 0, one tiny function shown in the prompt with the failing assertion and the kind of
//! bug (one `edit` and `submit` solve it); 1, one module of two or three functions, not shown,
//! with the failing assertion and the kind of bug; 2, two modules, only the failing function
//! named; 3, three modules of two functions (plus `app.py` when the bug is in an app function
//! such as `score_text`, which calls a helper with swapped arguments), no hint; 4, three
//! functions per module and always an `app.py` over the helpers. Prompts list the files and
//! their functions; the model has to look at code itself from level 1. `search` matches plain
//! text, not regular expressions.

use std::collections::BTreeMap;
use std::time::Duration;

use rand::Rng;
use rand::seq::{IndexedRandom, SliceRandom};
use serde::{Deserialize, Serialize};

use super::judge::{JudgeRequest, JudgeTest, Solution, TestKind, judge};
use super::script::{Runner, Script, run_in_sandbox};
use crate::chat::{
    Message, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, ToolCall, parse_completion, parse_tool_calls,
};
use crate::env::{Category, EnvInfo, Environment, Episode, StepOutcome, Turns, response_or_zero};
use crate::error::EnvError;
use crate::sampling::{TaskOrigin, TaskRng, draw_in_split, make_task, stable_hash};
use crate::sandbox::Limits;
use crate::task::{Score, Split, Task};

const NAME: &str = "swe";
const MAX_DIFFICULTY: u32 = 4;
/// The most turns any level allows.
const MAX_TURNS: u32 = 14;
/// Reward lost per invalid tool call when the hidden tests pass.
const INVALID_CALL_PENALTY: f64 = 0.1;
/// The least reward a passing repository earns, however many invalid calls it took.
const PASSING_FLOOR: f64 = 0.5;
/// The test runner written beside the repository.
const RUNNER: Script = Script {
    path: "run_tests.py",
    source: include_str!("swe/run_tests.py"),
};
/// Lines `view` shows at most.
const VIEW_LINES: usize = 80;
/// Matches `search` shows at most.
const SEARCH_MATCHES: usize = 20;
/// A file may not grow beyond this many bytes.
const MAX_FILE_BYTES: usize = 20_000;
const TOOLS_LINE: &str =
    "Tools: view(path), search(pattern), edit(path, old, new), run_tests(), submit().";

/// Multi-turn bug fixing in a generated Python repository, verified by hidden tests.
#[derive(Debug, Clone, Default)]
pub struct Swe;

/// One call and its expected value, both as Python source.
struct Case {
    args: String,
    expected: String,
}

/// A function of the library, its bug and how to test it.
struct Template {
    module: &'static str,
    name: &'static str,
    /// Correct source, ending in a newline.
    source: &'static str,
    /// The text the bug changes (once) and what it becomes.
    bug: (&'static str, &'static str),
    kind: &'static str,
    /// Short enough for a level-0 prompt.
    tiny: bool,
    /// Imports an `app` function needs: (module, function).
    needs: &'static [(&'static str, &'static str)],
    /// Test cases; the first one always exposes the bug.
    cases: fn(&mut TaskRng) -> Vec<Case>,
}

const WORDS: [&str; 16] = [
    "cat", "tree", "river", "lamp", "stone", "cloud", "maple", "pixel", "otter", "bread", "tulip",
    "comet", "ember", "grape", "harbor", "violet",
];
const FULL_NAMES: [&str; 10] = [
    "ada lovelace",
    "alan turing",
    "grace hopper",
    "edsger dijkstra",
    "barbara liskov",
    "donald knuth",
    "ken thompson",
    "radia perlman",
    "john backus",
    "frances allen",
];

fn py_list(values: &[i64]) -> String {
    let items: Vec<String> = values.iter().map(i64::to_string).collect();
    format!("[{}]", items.join(", "))
}

fn py_str(text: &str) -> String {
    format!("'{text}'")
}

fn py_bool(value: bool) -> String {
    if value { "True" } else { "False" }.to_string()
}

/// Python's `repr` of a float for the values used here (Rust's shortest round-trip form).
fn py_float(value: f64) -> String {
    format!("{value:?}")
}

fn case(args: String, expected: String) -> Case {
    Case { args, expected }
}

fn random_list(rng: &mut TaskRng, len: std::ops::RangeInclusive<usize>) -> Vec<i64> {
    let n = rng.random_range(len);
    (0..n).map(|_| rng.random_range(1..=20)).collect()
}

fn word(rng: &mut TaskRng) -> &'static str {
    WORDS.choose(rng).copied().unwrap_or("cat")
}

const TEMPLATES: [Template; 15] = [
    Template {
        module: "mathutil",
        name: "add",
        source: "def add(a, b):\n    return a + b\n",
        bug: ("a + b", "a - b"),
        kind: "wrong operator",
        tiny: true,
        needs: &[],
        cases: |rng| {
            (0..4)
                .map(|_| {
                    let (a, b) = (rng.random_range(1..=50), rng.random_range(1..=50));
                    case(format!("{a}, {b}"), (a + b).to_string())
                })
                .collect()
        },
    },
    Template {
        module: "mathutil",
        name: "is_even",
        source: "def is_even(n):\n    return n % 2 == 0\n",
        bug: ("== 0", "== 1"),
        kind: "wrong comparison",
        tiny: true,
        needs: &[],
        cases: |rng| {
            let mut values: Vec<i64> =
                vec![rng.random_range(0..50) * 2, rng.random_range(0..50) * 2 + 1];
            values.push(rng.random_range(0..100));
            values.shuffle(rng);
            values
                .into_iter()
                .map(|n| case(n.to_string(), py_bool(n % 2 == 0)))
                .collect()
        },
    },
    Template {
        module: "mathutil",
        name: "percent",
        source: "def percent(part, whole):\n    return 100 * part // whole\n",
        bug: ("// whole", "// (whole + 1)"),
        kind: "off-by-one",
        tiny: true,
        needs: &[],
        cases: |rng| {
            let k = rng.random_range(1..=20);
            let mut cases = vec![case(format!("{k}, {k}"), "100".into())];
            for _ in 0..3 {
                let (p, w) = (rng.random_range(1..=50), rng.random_range(1..=50));
                cases.push(case(format!("{p}, {w}"), (100 * p / w).to_string()));
            }
            cases
        },
    },
    Template {
        module: "mathutil",
        name: "power",
        source: "def power(base, exp=2):\n    return base ** exp\n",
        bug: ("exp=2", "exp=3"),
        kind: "wrong default",
        tiny: true,
        needs: &[],
        cases: |rng| {
            let b: i64 = rng.random_range(2..=9);
            let mut cases = vec![case(b.to_string(), (b * b).to_string())];
            for _ in 0..3 {
                let (b, e): (i64, u32) = (rng.random_range(2..=9), rng.random_range(0..=4));
                cases.push(case(format!("{b}, {e}"), b.pow(e).to_string()));
            }
            cases
        },
    },
    Template {
        module: "mathutil",
        name: "average",
        source: "def average(values):\n    return sum(values) / len(values)\n",
        bug: ("/ len(values)", "/ (len(values) + 1)"),
        kind: "off-by-one",
        tiny: true,
        needs: &[],
        cases: |rng| {
            // The first list has a whole mean, to keep level-0 prompts short.
            let mut first = random_list(rng, 2..=3);
            let n = first.len() as i64 + 1;
            let sum: i64 = first.iter().sum();
            first.push((1..=20).find(|v| (sum + v) % n == 0).unwrap_or(1));
            let mut lists = vec![first];
            lists.extend((0..3).map(|_| random_list(rng, 2..=4)));
            lists
                .into_iter()
                .map(|values| {
                    let mean = values.iter().sum::<i64>() as f64 / values.len() as f64;
                    case(py_list(&values), py_float(mean))
                })
                .collect()
        },
    },
    Template {
        module: "mathutil",
        name: "clamp",
        source: "def clamp(x, lo, hi):\n    if x < lo:\n        return lo\n    if x > hi:\n        return hi\n    return x\n",
        bug: ("if x < lo:", "if x > lo:"),
        kind: "wrong comparison",
        tiny: false,
        needs: &[],
        cases: |rng| {
            let lo: i64 = rng.random_range(0..=10);
            let hi = lo + rng.random_range(5..=20);
            let inside = rng.random_range(lo + 1..hi);
            let below = lo - rng.random_range(1..=9);
            let above = hi + rng.random_range(1..=9);
            vec![
                case(format!("{inside}, {lo}, {hi}"), inside.to_string()),
                case(format!("{below}, {lo}, {hi}"), lo.to_string()),
                case(format!("{above}, {lo}, {hi}"), hi.to_string()),
                case(format!("{lo}, {lo}, {hi}"), lo.to_string()),
            ]
        },
    },
    Template {
        module: "listutil",
        name: "total",
        source: "def total(items):\n    result = 0\n    for i in range(len(items)):\n        result += items[i]\n    return result\n",
        bug: ("range(len(items))", "range(len(items) - 1)"),
        kind: "off-by-one",
        tiny: false,
        needs: &[],
        cases: |rng| {
            let mut cases: Vec<Case> = (0..3)
                .map(|_| {
                    let values = random_list(rng, 2..=5);
                    case(py_list(&values), values.iter().sum::<i64>().to_string())
                })
                .collect();
            cases.push(case("[]".into(), "0".into()));
            cases
        },
    },
    Template {
        module: "listutil",
        name: "last_n",
        source: "def last_n(items, n=1):\n    return items[-n:]\n",
        bug: ("n=1", "n=2"),
        kind: "wrong default",
        tiny: true,
        needs: &[],
        cases: |rng| {
            let values = random_list(rng, 3..=5);
            let mut cases = vec![case(py_list(&values), py_list(&values[values.len() - 1..]))];
            for _ in 0..3 {
                let values = random_list(rng, 3..=6);
                let n = rng.random_range(1..=values.len());
                cases.push(case(
                    format!("{}, {n}", py_list(&values)),
                    py_list(&values[values.len() - n..]),
                ));
            }
            cases
        },
    },
    Template {
        module: "listutil",
        name: "countdown",
        source: "def countdown(n):\n    return list(range(n, 0, -1))\n",
        bug: ("range(n, 0, -1)", "range(n, 1, -1)"),
        kind: "off-by-one",
        tiny: true,
        needs: &[],
        cases: |rng| {
            let mut cases: Vec<Case> = (0..3)
                .map(|_| {
                    let n: i64 = rng.random_range(2..=8);
                    case(n.to_string(), py_list(&(1..=n).rev().collect::<Vec<_>>()))
                })
                .collect();
            cases.push(case("0".into(), "[]".into()));
            cases
        },
    },
    Template {
        module: "listutil",
        name: "max_index",
        source: "def max_index(values):\n    best = 0\n    for i in range(1, len(values)):\n        if values[i] > values[best]:\n            best = i\n    return best\n",
        bug: ("values[i] > values[best]", "values[i] < values[best]"),
        kind: "wrong comparison",
        tiny: false,
        needs: &[],
        cases: |rng| {
            (0..4)
                .map(|_| {
                    let n = rng.random_range(3..=6);
                    let mut pool: Vec<i64> = (1..=50).collect();
                    pool.shuffle(rng);
                    let values = &pool[..n];
                    let best = (0..n).max_by_key(|&i| values[i]).unwrap_or(0);
                    case(py_list(values), best.to_string())
                })
                .collect()
        },
    },
    Template {
        module: "textutil",
        name: "repeat",
        source: "def repeat(text, times=2):\n    return text * times\n",
        bug: ("times=2", "times=3"),
        kind: "wrong default",
        tiny: true,
        needs: &[],
        cases: |rng| {
            let first = word(rng);
            let mut cases = vec![case(py_str(first), py_str(&first.repeat(2)))];
            for _ in 0..3 {
                let (w, t) = (word(rng), rng.random_range(0..=3));
                cases.push(case(format!("{}, {t}", py_str(w)), py_str(&w.repeat(t))));
            }
            cases
        },
    },
    Template {
        module: "textutil",
        name: "shout",
        source: "def shout(text):\n    return text.upper() + \"!\"\n",
        bug: ("text.upper()", "text.lower()"),
        kind: "wrong method",
        tiny: true,
        needs: &[],
        cases: |rng| {
            (0..3)
                .map(|_| {
                    let w = word(rng);
                    case(py_str(w), py_str(&format!("{}!", w.to_uppercase())))
                })
                .collect()
        },
    },
    Template {
        module: "textutil",
        name: "initials",
        source: "def initials(name):\n    return \"\".join(w[0].upper() for w in name.split())\n",
        bug: ("w[0]", "w[1]"),
        kind: "wrong index",
        tiny: false,
        needs: &[],
        cases: |rng| {
            let mut names = FULL_NAMES.to_vec();
            names.shuffle(rng);
            names
                .iter()
                .take(3)
                .map(|name| {
                    let initials: String = name
                        .split_whitespace()
                        .filter_map(|w| w.chars().next())
                        .flat_map(char::to_uppercase)
                        .collect();
                    case(py_str(name), py_str(&initials))
                })
                .collect()
        },
    },
    Template {
        module: "app",
        name: "score_text",
        source: "def score_text(points, total):\n    return str(percent(points, total)) + \"%\"\n",
        bug: ("percent(points, total)", "percent(total, points)"),
        kind: "swapped arguments",
        tiny: false,
        needs: &[("mathutil", "percent")],
        cases: |rng| {
            (0..3)
                .map(|_| {
                    let p: i64 = rng.random_range(1..=40);
                    let t = p + rng.random_range(1..=60);
                    case(format!("{p}, {t}"), py_str(&format!("{}%", 100 * p / t)))
                })
                .collect()
        },
    },
    Template {
        module: "app",
        name: "label",
        source: "def label(name, width):\n    return pad(shout(name), width)\n",
        bug: ("pad(shout(name), width)", "pad(width, shout(name))"),
        kind: "swapped arguments",
        tiny: false,
        needs: &[("textutil", "pad"), ("textutil", "shout")],
        cases: |rng| {
            (0..3)
                .map(|_| {
                    let w = word(rng);
                    let width = w.len() + 1 + rng.random_range(0..=4);
                    let shouted = format!("{}!", w.to_uppercase());
                    let padded = format!("{shouted}{}", ".".repeat(width - shouted.len()));
                    case(format!("{}, {width}", py_str(w)), py_str(&padded))
                })
                .collect()
        },
    },
];

/// `pad` is a helper of `label` and a template of its own; it lives apart so `TEMPLATES` stays
/// sorted by module.
const PAD: Template = Template {
    module: "textutil",
    name: "pad",
    source: "def pad(text, width, fill=\".\"):\n    return text + fill * (width - len(text))\n",
    bug: ("(width - len(text))", "(width - len(text) - 1)"),
    kind: "off-by-one",
    tiny: false,
    needs: &[],
    cases: |rng| {
        (0..3)
            .map(|_| {
                let w = word(rng);
                let width = w.len() + rng.random_range(1..=5);
                case(
                    format!("{}, {width}", py_str(w)),
                    py_str(&format!("{w}{}", ".".repeat(width - w.len()))),
                )
            })
            .collect()
    },
};

fn all_templates() -> Vec<&'static Template> {
    TEMPLATES.iter().chain(std::iter::once(&PAD)).collect()
}

fn template(name: &str) -> Option<&'static Template> {
    all_templates().into_iter().find(|t| t.name == name)
}

/// Where the bug is and how to fix it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Bug {
    path: String,
    function: String,
    kind: String,
    /// The buggy line, trimmed (unique in its file).
    buggy_line: String,
    /// The same line fixed.
    fixed_line: String,
    /// The visible test that fails, as `call == expected`.
    failing: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Verification {
    /// The repository at the start, path → text.
    files: BTreeMap<String, String>,
    /// Visible test files (in `files`).
    visible_tests: Vec<String>,
    /// Hidden test files, path → text; written only when the hidden tests run.
    hidden_tests: BTreeMap<String, String>,
    bug: Bug,
    level: u32,
    max_turns: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct SweState {
    files: BTreeMap<String, String>,
    tool_calls: u32,
    invalid_calls: u32,
    edits: u32,
    viewed: Vec<String>,
    searched: bool,
    test_runs: u32,
    /// Whether the latest `run_tests` passed, and whether files changed since.
    last_tests_passed: Option<bool>,
}

/// One function placed in the repository, with its cases.
struct Placed {
    template: &'static Template,
    cases: Vec<Case>,
}

/// The functions of the repository by module, in file order.
fn choose_functions(
    rng: &mut TaskRng,
    level: u32,
) -> Option<(
    BTreeMap<&'static str, Vec<&'static Template>>,
    &'static Template,
)> {
    let library: Vec<&'static Template> = all_templates()
        .into_iter()
        .filter(|t| t.module != "app")
        .collect();
    let mut modules: BTreeMap<&'static str, Vec<&'static Template>> = BTreeMap::new();
    let add = |modules: &mut BTreeMap<&'static str, Vec<&'static Template>>,
               t: &'static Template| {
        let list = modules.entry(t.module).or_default();
        if !list.iter().any(|x| x.name == t.name) {
            list.push(t);
        }
    };
    let buggy: &'static Template = match level {
        0 => {
            let tiny: Vec<&'static Template> = library.iter().copied().filter(|t| t.tiny).collect();
            *tiny.choose(rng)?
        }
        1 | 2 => *library.choose(rng)?,
        _ => *all_templates().choose(rng)?,
    };
    let per_module = match level {
        0 => 1,
        1 | 2 => rng.random_range(2..=3),
        3 => 2,
        _ => 3,
    };
    let module_count = match level {
        0 | 1 => 1,
        2 => 2,
        _ => 3,
    };
    let mut names: Vec<&'static str> = vec!["mathutil", "listutil", "textutil"];
    names.shuffle(rng);
    let home = if buggy.module == "app" {
        buggy.needs.first().map(|(m, _)| *m).unwrap_or("mathutil")
    } else {
        buggy.module
    };
    names.retain(|m| *m != home);
    names.insert(0, home);
    names.truncate(module_count);
    if buggy.module == "app" {
        add(&mut modules, buggy);
        for (_, need) in buggy.needs {
            add(&mut modules, template(need)?);
        }
    } else {
        add(&mut modules, buggy);
    }
    for module in &names {
        let mut pool: Vec<&'static Template> = library
            .iter()
            .copied()
            .filter(|t| t.module == *module)
            .collect();
        pool.shuffle(rng);
        for t in pool {
            if modules.get(module).map_or(0, Vec::len) >= per_module {
                break;
            }
            add(&mut modules, t);
        }
    }
    if level >= 4 && buggy.module != "app" {
        // An app function over helpers, whose own test passes.
        let apps: Vec<&'static Template> = TEMPLATES.iter().filter(|t| t.module == "app").collect();
        let app = *apps.choose(rng)?;
        add(&mut modules, app);
        for (_, need) in app.needs {
            add(&mut modules, template(need)?);
        }
    }
    for list in modules.values_mut() {
        list.shuffle(rng);
    }
    Some((modules, buggy))
}

fn module_source(functions: &[&Placed]) -> String {
    let mut imports: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for placed in functions {
        for (from, name) in placed.template.needs {
            let list = imports.entry(from).or_default();
            if !list.contains(name) {
                list.push(name);
            }
        }
    }
    let mut text = String::new();
    for (from, names) in &imports {
        text.push_str(&format!("from {from} import {}\n", names.join(", ")));
    }
    if !imports.is_empty() {
        text.push_str("\n\n");
    }
    let bodies: Vec<&str> = functions.iter().map(|p| p.template.source).collect();
    text.push_str(&bodies.join("\n\n"));
    text
}

fn visible_test_source(module: &str, functions: &[&Placed]) -> String {
    let names: Vec<&str> = functions.iter().map(|p| p.template.name).collect();
    let mut text = format!("from {module} import {}\n", names.join(", "));
    for placed in functions {
        let Some(first) = placed.cases.first() else {
            continue;
        };
        let call = format!("{}({})", placed.template.name, first.args);
        text.push_str(&format!(
            "\n\ndef test_{}():\n    got = {call}\n    assert got == {}, \"{} returned %r, expected {}\" % (got,)\n",
            placed.template.name,
            first.expected,
            call.replace('"', "\\\"").replace('%', "%%"),
            first.expected.replace('"', "\\\"").replace('%', "%%"),
        ));
    }
    text
}

const HIDDEN_PRELUDE: &str = "\n\ndef _same(a, b):\n    if type(a) is not type(b):\n        return False\n    if isinstance(a, (list, tuple)):\n        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))\n    if isinstance(a, float):\n        return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))\n    return a == b\n\n\ndef _check(got, want, call):\n    assert _same(got, want), \"%s returned %r, expected %r\" % (call, got, want)\n";

fn hidden_test_source(module: &str, functions: &[&Placed]) -> String {
    let mut text = format!("import {module}\n{HIDDEN_PRELUDE}");
    for placed in functions {
        for (index, case) in placed.cases.iter().enumerate() {
            let call = format!("{}({})", placed.template.name, case.args);
            text.push_str(&format!(
                "\n\ndef test_{}_{}():\n    _check({module}.{call}, {}, \"{}\")\n",
                placed.template.name,
                index + 1,
                case.expected,
                call.replace('"', "\\\""),
            ));
        }
    }
    text
}

fn build(rng: &mut TaskRng, level: u32) -> Option<(String, Verification)> {
    let (modules, buggy) = choose_functions(rng, level)?;
    let mut placed_by_module: BTreeMap<&str, Vec<Placed>> = BTreeMap::new();
    for (module, templates) in &modules {
        for t in templates {
            placed_by_module.entry(module).or_default().push(Placed {
                template: t,
                cases: (t.cases)(rng),
            });
        }
    }
    let mut files = BTreeMap::new();
    let mut hidden_tests = BTreeMap::new();
    let mut visible_tests = Vec::new();
    for (module, placed) in &placed_by_module {
        let refs: Vec<&Placed> = placed.iter().collect();
        files.insert(format!("{module}.py"), module_source(&refs));
        let test_path = format!("test_{module}.py");
        files.insert(test_path.clone(), visible_test_source(module, &refs));
        visible_tests.push(test_path);
        hidden_tests.insert(
            format!("hidden_test_{module}.py"),
            hidden_test_source(module, &refs),
        );
    }
    let path = format!("{}.py", buggy.module);
    let source = files.get(&path)?.clone();
    let (find, replace) = buggy.bug;
    if source.matches(find).count() != 1 {
        return None;
    }
    let buggy_source = source.replacen(find, replace, 1);
    let buggy_line = buggy_source
        .lines()
        .find(|line| line.contains(replace))?
        .trim()
        .to_string();
    let fixed_line = buggy_line.replacen(replace, find, 1);
    if buggy_source.matches(&buggy_line).count() != 1 {
        return None;
    }
    files.insert(path.clone(), buggy_source.clone());
    let first = placed_by_module
        .get(buggy.module)?
        .iter()
        .find(|p| p.template.name == buggy.name)?
        .cases
        .first()?;
    let failing = format!("{}({}) == {}", buggy.name, first.args, first.expected);
    let bug = Bug {
        path: path.clone(),
        function: buggy.name.to_string(),
        kind: buggy.kind.to_string(),
        buggy_line,
        fixed_line,
        failing: failing.clone(),
    };
    let listing = |with_functions: bool| -> String {
        let mut parts = Vec::new();
        for (module, placed) in &placed_by_module {
            if with_functions {
                let names: Vec<&str> = placed.iter().map(|p| p.template.name).collect();
                parts.push(format!("{module}.py ({})", names.join(", ")));
            } else {
                parts.push(format!("{module}.py"));
            }
        }
        parts.join(", ")
    };
    let prompt = match level {
        0 => format!(
            "{path}:\n{buggy_source}Fails: {failing}\nBug: {}. Tools: edit(path, old, new), submit().",
            buggy.kind
        ),
        1 => format!(
            "Repo: {}, test_{}.py.\nTest fails: {failing}\nBug: {}.\n{TOOLS_LINE}",
            listing(true),
            buggy.module,
            buggy.kind
        ),
        2 => format!(
            "Repo: {} and tests test_*.py.\nThe test of {} fails; fix the bug.\n{TOOLS_LINE}",
            listing(true),
            buggy.name
        ),
        _ => format!(
            "Repo: {} and tests test_*.py.\nOne test fails; find the bug and fix it.\n{TOOLS_LINE}",
            listing(true)
        ),
    };
    let max_turns = match level {
        0 => 6,
        1 => 8,
        2 => 10,
        _ => MAX_TURNS,
    };
    Some((
        prompt,
        Verification {
            files,
            visible_tests,
            hidden_tests,
            bug,
            level,
            max_turns,
        },
    ))
}

/// The limits a test run gets (the visible tests, or the judge and the repository together).
fn test_limits() -> Limits {
    Limits {
        cpu_time: Duration::from_secs(5),
        wall_time: Duration::from_secs(10),
        memory_bytes: 256 << 20,
        max_output_bytes: 1 << 20,
        ..Limits::default()
    }
}

/// One test's result.
#[derive(Debug, Clone, Deserialize)]
struct TestResult {
    test: String,
    ok: bool,
    #[serde(default)]
    error: String,
}

/// Runs `tests` (paths among `files` and `extra`) on `files`; `Err` when no results came back.
fn run_tests(
    files: &BTreeMap<String, String>,
    extra: &BTreeMap<String, String>,
    tests: &[String],
    runner: Runner,
) -> Result<Vec<TestResult>, String> {
    let files = files
        .iter()
        .chain(extra)
        .map(|(path, text)| (path.clone(), text.as_bytes().to_vec()))
        .collect();
    let mut request = RUNNER.request(tests.iter().cloned(), files, Vec::new(), test_limits());
    // The marker of the results line depends on every file run, so code under test cannot
    // print a forged results line ahead of time.
    let fingerprint = serde_json::to_string(&request.files).unwrap_or_default();
    let nonce = format!("chorus-swe-{:016x}", stable_hash(fingerprint.as_bytes()));
    request.stdin = format!("{nonce}\n").into_bytes();
    let outcome = runner(&request)?;
    let stdout = String::from_utf8_lossy(&outcome.stdout);
    let marker = format!("{nonce} ");
    let Some(line) = stdout.lines().rev().find(|l| l.starts_with(&marker)) else {
        return Err(format!(
            "the tests did not finish: the run {}",
            outcome.reason()
        ));
    };
    serde_json::from_str(&line[marker.len()..])
        .map_err(|err| format!("the test results are unreadable: {err}"))
}

/// Runs the hidden tests through the [judge](super::judge): they live on the judge's side
/// only (never a file in the sandbox), and call into the repository's modules, imported in a
/// process of their own. `Err` unless the judge ran every test.
fn judge_hidden(
    files: &BTreeMap<String, String>,
    hidden_tests: &BTreeMap<String, String>,
    runner: Runner,
) -> Result<Vec<TestResult>, String> {
    let modules = files
        .keys()
        .filter_map(|path| path.strip_suffix(".py"))
        .filter(|stem| !stem.contains('/'))
        .map(str::to_string)
        .collect();
    let request = JudgeRequest {
        files: files
            .iter()
            .map(|(path, text)| (path.clone(), text.as_bytes().to_vec()))
            .collect(),
        solution: Solution::Repository { modules },
        setup: String::new(),
        tests: hidden_tests
            .iter()
            .map(|(path, source)| JudgeTest {
                label: path.strip_suffix(".py").unwrap_or(path).to_string(),
                source: source.clone(),
                kind: TestKind::Module,
            })
            .collect(),
        limits: test_limits(),
        call_timeout: Duration::from_secs(4),
    };
    let verdict = judge(&request, runner)?;
    if let Some(error) = verdict.error {
        return Err(error);
    }
    if !verdict.done {
        let passed = verdict.passed();
        return Err(format!(
            "the tests did not finish ({passed} passed before the run {})",
            verdict.outcome.reason()
        ));
    }
    Ok(verdict
        .results
        .into_iter()
        .map(|r| TestResult {
            test: r.test,
            ok: r.ok,
            error: r.error,
        })
        .collect())
}

fn summarise(results: &[TestResult]) -> String {
    let passed = results.iter().filter(|r| r.ok).count();
    let mut text = format!(
        "ran {} tests: {passed} passed, {} failed",
        results.len(),
        results.len() - passed
    );
    for failure in results.iter().filter(|r| !r.ok).take(5) {
        text.push_str(&format!("\nFAIL {}: {}", failure.test, failure.error));
    }
    text
}

/// Scores a repository by its hidden tests.
fn hidden_score(
    expected: &Verification,
    files: &BTreeMap<String, String>,
    invalid_calls: u32,
    runner: Runner,
) -> Score {
    if files == &expected.files {
        return Score::zero(format!(
            "the repository is unchanged, so {} still fails",
            expected.bug.failing
        ))
        .with_component("hidden_passed", 0.0);
    }
    let results = match judge_hidden(files, &expected.hidden_tests, runner) {
        Ok(results) => results,
        Err(why) => {
            return Score::zero(format!("hidden tests could not run: {why}"))
                .with_component("hidden_passed", 0.0);
        }
    };
    let passed = results.iter().filter(|r| r.ok).count();
    let fraction = if results.is_empty() {
        0.0
    } else {
        passed as f64 / results.len() as f64
    };
    let all = !results.is_empty() && passed == results.len();
    let score = if all {
        let reward = (1.0 - INVALID_CALL_PENALTY * f64::from(invalid_calls)).max(PASSING_FLOOR);
        let penalty = if invalid_calls > 0 {
            format!(
                "; {invalid_calls} invalid tool call(s) cost {:.1}",
                1.0 - reward
            )
        } else {
            String::new()
        };
        Score {
            reward,
            components: Vec::new(),
            reason: format!("hidden tests: {passed}/{} passed{penalty}", results.len()),
        }
    } else {
        let first = results
            .iter()
            .find(|r| !r.ok)
            .map(|r| format!("; first failure {}: {}", r.test, r.error))
            .unwrap_or_default();
        Score::zero(format!(
            "hidden tests: {passed}/{} passed{first}",
            results.len()
        ))
    };
    score.with_component("hidden_passed", fraction)
}

fn argument<'a>(call: &'a ToolCall, name: &str) -> Option<&'a serde_json::Value> {
    call.arguments.get(name)
}

fn string_argument<'a>(call: &'a ToolCall, name: &str) -> Option<&'a str> {
    argument(call, name).and_then(|v| v.as_str())
}

fn line_argument(call: &ToolCall, name: &str) -> Option<usize> {
    argument(call, name).and_then(|v| {
        v.as_u64()
            .map(|n| n as usize)
            .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
    })
}

/// Applies an `edit` call to `files`; the message to show, or an error for an invalid call.
fn apply_edit(files: &mut BTreeMap<String, String>, call: &ToolCall) -> Result<String, String> {
    let path = string_argument(call, "path").ok_or("edit needs a string argument `path`")?;
    let Some(text) = files.get(path) else {
        return Err(format!("no file {path}"));
    };
    let updated = if let Some(old) = string_argument(call, "old") {
        let new = string_argument(call, "new").ok_or("edit with `old` needs a string `new`")?;
        if old.is_empty() {
            return Err("`old` is empty".into());
        }
        match text.matches(old).count() {
            0 => return Err(format!("`old` text not found in {path}")),
            1 => text.replacen(old, new, 1),
            n => {
                return Err(format!(
                    "`old` text occurs {n} times in {path}; include more of the line"
                ));
            }
        }
    } else if let (Some(start), Some(end)) =
        (line_argument(call, "start"), line_argument(call, "end"))
    {
        let replacement =
            string_argument(call, "text").ok_or("edit with `start`/`end` needs a string `text`")?;
        let mut lines: Vec<&str> = text.lines().collect();
        if start == 0 || start > end || end > lines.len() {
            return Err(format!(
                "lines {start}-{end} are not within 1-{} of {path}",
                lines.len()
            ));
        }
        lines.splice(start - 1..end, replacement.lines());
        let mut joined = lines.join("\n");
        joined.push('\n');
        joined
    } else {
        return Err("edit needs `old` and `new`, or `start`, `end` and `text`".into());
    };
    if updated.len() > MAX_FILE_BYTES {
        return Err(format!("{path} would grow past {MAX_FILE_BYTES} bytes"));
    }
    files.insert(path.to_string(), updated);
    Ok(format!("edited {path}"))
}

fn view(files: &BTreeMap<String, String>, call: &ToolCall) -> Result<String, String> {
    let path = string_argument(call, "path").ok_or("view needs a string argument `path`")?;
    let text = files.get(path).ok_or_else(|| {
        let known: Vec<&str> = files.keys().map(String::as_str).collect();
        format!("no file {path}; files: {}", known.join(", "))
    })?;
    let lines: Vec<&str> = text.lines().collect();
    let start = line_argument(call, "start").unwrap_or(1).max(1);
    let end = line_argument(call, "end")
        .unwrap_or(lines.len())
        .min(lines.len())
        .min(start.saturating_add(VIEW_LINES - 1));
    let mut out = format!("{path}:");
    for (index, line) in lines.iter().enumerate().take(end).skip(start - 1) {
        out.push_str(&format!("\n{}| {line}", index + 1));
    }
    Ok(out)
}

fn search(files: &BTreeMap<String, String>, call: &ToolCall) -> Result<String, String> {
    let pattern = string_argument(call, "pattern")
        .filter(|p| !p.is_empty())
        .ok_or("search needs a non-empty string argument `pattern`")?;
    let only = string_argument(call, "path");
    let mut matches = Vec::new();
    for (path, text) in files {
        if only.is_some_and(|p| p != path) {
            continue;
        }
        for (index, line) in text.lines().enumerate() {
            if line.contains(pattern) {
                matches.push(format!("{path}:{}: {}", index + 1, line.trim_end()));
            }
        }
    }
    if matches.is_empty() {
        return Ok(format!("no line contains {pattern:?}"));
    }
    let shown = matches.len().min(SEARCH_MATCHES);
    let mut out = matches[..shown].join("\n");
    if matches.len() > shown {
        out.push_str(&format!("\n… {} more", matches.len() - shown));
    }
    Ok(out)
}

fn load_state(task: &Task, episode: &Episode) -> Result<SweState, EnvError> {
    serde_json::from_value(episode.state.clone()).map_err(|err| EnvError::BadEpisodeState {
        task_id: task.id.clone(),
        message: err.to_string(),
    })
}

fn tool_call(name: &str, arguments: serde_json::Value) -> String {
    ToolCall {
        name: name.into(),
        arguments,
    }
    .render()
}

fn with_counts(score: Score, state: &SweState) -> Score {
    score
        .with_component("tool_calls", f64::from(state.tool_calls))
        .with_component("invalid_calls", f64::from(state.invalid_calls))
        .with_component("edits", f64::from(state.edits))
}

impl Swe {
    /// Plays one action; returns the observation, or the final score when the episode ends.
    fn act(
        expected: &Verification,
        state: &mut SweState,
        action: &str,
        runner: Runner,
    ) -> Result<String, Score> {
        let parsed = parse_completion(action);
        if parsed.unterminated_think {
            state.invalid_calls += 1;
            return Ok("error: the <think> block is never closed; no tool was called".into());
        }
        if !parsed.response.contains(TOOL_CALL_OPEN) {
            // An answer without a tool call submits the repository as it is.
            return Err(hidden_score(
                expected,
                &state.files,
                state.invalid_calls,
                runner,
            ));
        }
        let calls = match parse_tool_calls(&parsed.response) {
            Ok(calls) => calls,
            Err(err) => {
                state.tool_calls += 1;
                state.invalid_calls += 1;
                return Ok(format!("error: {err}"));
            }
        };
        let mut replies = Vec::new();
        for call in &calls {
            state.tool_calls += 1;
            let reply = match call.name.as_str() {
                "view" => view(&state.files, call).inspect(|_| {
                    if let Some(path) = string_argument(call, "path")
                        && !state.viewed.iter().any(|p| p == path)
                    {
                        state.viewed.push(path.to_string());
                    }
                }),
                "search" => {
                    state.searched = true;
                    search(&state.files, call)
                }
                "edit" => apply_edit(&mut state.files, call).inspect(|_| {
                    state.edits += 1;
                    state.last_tests_passed = None;
                }),
                "run_tests" => {
                    state.test_runs += 1;
                    Ok(
                        match run_tests(
                            &state.files,
                            &BTreeMap::new(),
                            &expected.visible_tests,
                            runner,
                        ) {
                            Ok(results) => {
                                state.last_tests_passed = Some(results.iter().all(|r| r.ok));
                                summarise(&results)
                            }
                            Err(why) => {
                                state.last_tests_passed = Some(false);
                                format!("could not run the tests: {why}")
                            }
                        },
                    )
                }
                "submit" => {
                    return Err(hidden_score(
                        expected,
                        &state.files,
                        state.invalid_calls,
                        runner,
                    ));
                }
                other => Err(format!(
                    "unknown tool {other}; use view, search, edit, run_tests or submit"
                )),
            };
            match reply {
                Ok(text) => replies.push(text),
                Err(message) => {
                    state.invalid_calls += 1;
                    replies.push(format!("error: {message}"));
                }
            }
        }
        Ok(replies.join("\n"))
    }

    fn score_with(task: &Task, completion: &str, runner: Runner) -> Result<Score, EnvError> {
        let expected: Verification = task.verification_as()?;
        let response = match response_or_zero(completion) {
            Ok(response) => response,
            Err(zero) => return Ok(zero),
        };
        let mut files = expected.files.clone();
        let mut invalid = 0;
        let calls = match parse_tool_calls(&response) {
            Ok(calls) => calls,
            Err(err) => {
                return Ok(Score::zero(format!("unreadable tool call: {err}"))
                    .with_component("hidden_passed", 0.0));
            }
        };
        for call in calls.iter().filter(|c| c.name == "edit") {
            if apply_edit(&mut files, call).is_err() {
                invalid += 1;
            }
        }
        Ok(hidden_score(&expected, &files, invalid, runner)
            .with_component("invalid_calls", f64::from(invalid)))
    }

    fn step_with(
        task: &Task,
        episode: &mut Episode,
        action: &str,
        runner: Runner,
    ) -> Result<StepOutcome, EnvError> {
        if episode.done {
            return Err(EnvError::EpisodeFinished {
                task_id: task.id.clone(),
            });
        }
        let expected: Verification = task.verification_as()?;
        let mut state = load_state(task, episode)?;
        episode.messages.push(Message::assistant(action));
        episode.turn += 1;
        let mut outcome = match Self::act(&expected, &mut state, action, runner) {
            Ok(observation) => StepOutcome {
                observation: Some(Message::tool(observation)),
                done: false,
                score: None,
            },
            Err(score) => StepOutcome {
                observation: None,
                done: true,
                score: Some(score),
            },
        };
        if !outcome.done && episode.turn >= expected.max_turns {
            let score = hidden_score(&expected, &state.files, state.invalid_calls, runner);
            let reason = format!(
                "out of turns after {}; submitted as is: {}",
                expected.max_turns, score.reason
            );
            outcome.done = true;
            outcome.score = Some(Score { reason, ..score });
        }
        if let Some(score) = outcome.score.take() {
            outcome.score = Some(with_counts(score, &state));
        }
        if let Some(observation) = &outcome.observation {
            episode.messages.push(observation.clone());
        }
        episode.done = outcome.done;
        episode.state = serde_json::to_value(&state).map_err(|source| EnvError::Serialize {
            env: NAME.into(),
            source,
        })?;
        Ok(outcome)
    }
}

/// The reference's fix. Its arguments come in the tool's own order (`path`, `old`, `new`), not
/// JSON's sorted one, so the line to replace is written before its replacement, which a model
/// can then copy from it with one change (sorted, `new` would come first, and a model would
/// have to write the fix before the line it fixes).
fn fix_call(bug: &Bug) -> String {
    // Structs serialise their fields in declaration order; a `serde_json::Value` sorts them.
    #[derive(Serialize)]
    struct Edit<'a> {
        name: &'static str,
        arguments: EditArguments<'a>,
    }
    #[derive(Serialize)]
    struct EditArguments<'a> {
        path: &'a str,
        old: &'a str,
        new: &'a str,
    }
    let call = Edit {
        name: "edit",
        arguments: EditArguments {
            path: &bug.path,
            old: &bug.buggy_line,
            new: &bug.fixed_line,
        },
    };
    let json = serde_json::to_string(&call).expect("strings serialise");
    format!("{TOOL_CALL_OPEN}{json}{TOOL_CALL_CLOSE}")
}

impl Environment for Swe {
    fn info(&self) -> EnvInfo {
        EnvInfo {
            name: NAME.into(),
            category: Category::Software,
            turns: Turns::Multi,
            max_turns: MAX_TURNS,
            default_weight: 0.5,
            max_difficulty: MAX_DIFFICULTY,
            description: "Fix a bug in a generated Python repository with view/search/edit/run_tests tools; reward when the hidden tests pass in the sandbox".into(),
        }
    }

    fn sample(&self, seed: u64, split: Split, difficulty: u32) -> Result<Task, EnvError> {
        let level = difficulty.min(MAX_DIFFICULTY);
        let (key, verification) =
            draw_in_split(NAME, seed, split, difficulty, |rng| build(rng, level))?;
        let origin = TaskOrigin {
            env: NAME,
            seed,
            split,
            difficulty,
        };
        let files = serde_json::to_string(&verification.files).unwrap_or_default();
        make_task(
            origin,
            &format!("{key}|{files}"),
            vec![Message::user(key)],
            &verification,
        )
    }

    fn score(&self, task: &Task, completion: &str) -> Result<Score, EnvError> {
        self.check_task(task)?;
        Self::score_with(task, completion, run_in_sandbox)
    }

    fn reference(&self, task: &Task) -> Result<String, EnvError> {
        self.check_task(task)?;
        let episode = self.start(task)?;
        self.reference_action(task, &episode)
    }

    fn wrong_completions(&self, task: &Task) -> Result<Vec<String>, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        let bug = &expected.bug;
        let test_path = format!("test_{}", bug.path);
        let assert_line = expected
            .files
            .get(&test_path)
            .and_then(|text| {
                text.lines()
                    .skip_while(|l| !l.contains(&format!("def test_{}(", bug.function)))
                    .find(|l| l.trim_start().starts_with("assert "))
            })
            .map(|l| l.trim().to_string())
            .unwrap_or_default();
        Ok(vec![
            tool_call("submit", serde_json::json!({})),
            tool_call(
                "edit",
                serde_json::json!({"path": bug.path, "old": bug.buggy_line, "new": bug.buggy_line}),
            ),
            tool_call(
                "edit",
                serde_json::json!({"path": bug.path, "old": bug.buggy_line, "new": "return None"}),
            ),
            tool_call(
                "edit",
                serde_json::json!({"path": test_path, "old": assert_line, "new": "assert True"}),
            ),
            format!("<think>{}</think>", fix_call(bug)),
            fix_call(bug).replace("edit", "edt"),
        ])
    }

    fn start(&self, task: &Task) -> Result<Episode, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        let state = SweState {
            files: expected.files,
            ..SweState::default()
        };
        let state = serde_json::to_value(&state).map_err(|source| EnvError::Serialize {
            env: NAME.into(),
            source,
        })?;
        Ok(Episode::new(task, state))
    }

    fn step(
        &self,
        task: &Task,
        episode: &mut Episode,
        action: &str,
    ) -> Result<StepOutcome, EnvError> {
        self.check_task(task)?;
        Self::step_with(task, episode, action, run_in_sandbox)
    }

    /// Level 0: fix, submit. Level 1: view, fix, run the tests, submit. From level 2: run the
    /// tests, (from level 3) search for the failing function, view its file, fix, run the tests
    /// again, submit.
    fn reference_action(&self, task: &Task, episode: &Episode) -> Result<String, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        let state = load_state(task, episode)?;
        let bug = &expected.bug;
        let fixed = state
            .files
            .get(&bug.path)
            .is_some_and(|text| !text.contains(&bug.buggy_line));
        let level = expected.level;
        let action = if fixed {
            if level >= 1 && state.last_tests_passed != Some(true) {
                tool_call("run_tests", serde_json::json!({}))
            } else {
                tool_call("submit", serde_json::json!({}))
            }
        } else if level >= 2 && state.test_runs == 0 {
            tool_call("run_tests", serde_json::json!({}))
        } else if level >= 3 && !state.searched {
            tool_call(
                "search",
                serde_json::json!({"pattern": format!("def {}(", bug.function)}),
            )
        } else if level >= 1 && !state.viewed.contains(&bug.path) {
            tool_call("view", serde_json::json!({"path": bug.path}))
        } else {
            fix_call(bug)
        };
        Ok(action)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin::testkit::*;
    use crate::sandbox::{Outcome, SandboxRequest};

    /// Plays the reference policy with the direct runner.
    fn direct_reference_episode(task: &Task) -> (Score, Episode) {
        let mut episode = Swe.start(task).unwrap();
        loop {
            let action = Swe.reference_action(task, &episode).unwrap();
            let outcome = Swe::step_with(task, &mut episode, &action, run_directly).unwrap();
            if outcome.done {
                return (outcome.score.unwrap(), episode);
            }
            assert!(episode.turn < MAX_TURNS, "{:#?}", episode.messages);
        }
    }

    #[test]
    fn the_reference_fix_writes_the_line_before_its_replacement() {
        for seed in 0..12 {
            let task = train_task(&Swe, seed, 0);
            let expected: Verification = task.verification_as().unwrap();
            let fix = fix_call(&expected.bug);
            let at = |key: &str| fix.find(&format!("\"{key}\":")).unwrap();
            assert!(at("path") < at("old") && at("old") < at("new"), "{fix}");
            let calls = parse_tool_calls(&fix).unwrap();
            assert_eq!(calls.len(), 1, "{fix}");
            assert_eq!(calls[0].name, "edit");
            assert_eq!(
                calls[0].arguments,
                serde_json::json!({
                    "path": expected.bug.path,
                    "old": expected.bug.buggy_line,
                    "new": expected.bug.fixed_line,
                })
            );
        }
    }

    #[test]
    fn self_check_passes_in_the_sandbox() {
        assert_self_check_passes(&Swe, &[0, 2, 4], 3);
    }

    #[test]
    fn tools_run_the_current_files_in_the_sandbox() {
        let task = train_task(&Swe, 6, 1);
        let expected: Verification = task.verification_as().unwrap();
        let mut episode = Swe.start(&task).unwrap();
        let run = tool_call("run_tests", serde_json::json!({}));
        let before = Swe.step(&task, &mut episode, &run).unwrap();
        assert!(before.observation.unwrap().content.contains("1 failed"));
        Swe.step(&task, &mut episode, &fix_call(&expected.bug))
            .unwrap();
        let after = Swe.step(&task, &mut episode, &run).unwrap();
        assert!(after.observation.unwrap().content.contains(" 0 failed"));
        let end = Swe
            .step(
                &task,
                &mut episode,
                &tool_call("submit", serde_json::json!({})),
            )
            .unwrap();
        assert!(end.score.unwrap().is_full());
        // A repository whose code never returns is stopped by the sandbox's limits and fails.
        let hang = tool_call(
            "edit",
            serde_json::json!({"path": expected.bug.path, "old": expected.bug.buggy_line, "new": "while True: pass"}),
        );
        let score = Swe.score(&task, &hang).unwrap();
        assert_eq!(score.reward, 0.0);
        assert!(score.reason.contains("could not run"), "{}", score.reason);
    }

    #[test]
    fn every_template_is_tested_by_its_cases_and_its_bug_is_caught() {
        // Each function alone, fixed and buggy, through the real runner.
        for t in all_templates() {
            let mut rng = crate::sampling::task_rng("swe-test", 1, 0);
            let placed = Placed {
                template: t,
                cases: (t.cases)(&mut rng),
            };
            let refs = [&placed];
            let mut files = BTreeMap::new();
            for (from, name) in t.needs {
                let helper = template(name).unwrap();
                let entry: &mut String = files.entry(format!("{from}.py")).or_default();
                if !entry.is_empty() {
                    entry.push_str("\n\n");
                }
                entry.push_str(helper.source);
            }
            files.insert(format!("{}.py", t.module), module_source(&refs));
            let hidden = BTreeMap::from([(
                "hidden_test_x.py".to_string(),
                hidden_test_source(t.module, &refs),
            )]);
            files.insert("test_x.py".into(), visible_test_source(t.module, &refs));
            let tests = vec!["test_x.py".to_string(), "hidden_test_x.py".to_string()];
            let results = run_tests(&files, &hidden, &tests, run_directly).unwrap();
            assert!(results.iter().all(|r| r.ok), "{}: {results:#?}", t.name);
            let path = format!("{}.py", t.module);
            let buggy = files[&path].replacen(t.bug.0, t.bug.1, 1);
            assert_ne!(buggy, files[&path], "{}", t.name);
            files.insert(path, buggy);
            let results = run_tests(&files, &hidden, &tests[..1], run_directly).unwrap();
            assert!(
                !results[0].ok && results[0].test == format!("test_x.test_{}", t.name),
                "{}: {results:#?}",
                t.name
            );
        }
    }

    #[test]
    fn reference_episodes_win_and_the_bug_is_real_at_every_level() {
        for level in 0..=MAX_DIFFICULTY {
            for seed in 0..3 {
                let task = train_task(&Swe, seed, level);
                let expected: Verification = task.verification_as().unwrap();
                let results = run_tests(
                    &expected.files,
                    &BTreeMap::new(),
                    &expected.visible_tests,
                    run_directly,
                )
                .unwrap();
                let failing: Vec<&TestResult> = results.iter().filter(|r| !r.ok).collect();
                assert_eq!(failing.len(), 1, "level {level}: {results:#?}");
                assert!(
                    failing[0]
                        .test
                        .ends_with(&format!("test_{}", expected.bug.function))
                );
                let (score, episode) = direct_reference_episode(&task);
                assert!(
                    score.is_full(),
                    "level {level}: {score:?} {:#?}",
                    episode.messages
                );
                assert_eq!(score.component("invalid_calls"), Some(0.0));
                for wrong in Swe.wrong_completions(&task).unwrap() {
                    let score = Swe::score_with(&task, &wrong, run_directly).unwrap();
                    assert!(!score.is_full(), "level {level}: {wrong} -> {score:?}");
                }
            }
        }
    }

    #[test]
    fn level_zero_is_one_edit_away_and_fits_a_tiny_context() {
        for seed in 0..60 {
            let task = train_task(&Swe, seed, 0);
            assert!(task.prompt_text().len() <= 200, "{}", task.prompt_text());
            let expected: Verification = task.verification_as().unwrap();
            assert_eq!(expected.files.len(), 2);
            assert!(task.prompt[0].content.contains(&expected.bug.buggy_line));
        }
        let task = train_task(&Swe, 5, 0);
        let expected: Verification = task.verification_as().unwrap();
        let score = Swe::score_with(&task, &fix_call(&expected.bug), run_directly).unwrap();
        assert!(score.is_full(), "{score:?}");
    }

    #[test]
    fn tools_view_search_edit_and_penalise_invalid_calls() {
        let task = train_task(&Swe, 2, 2);
        let expected: Verification = task.verification_as().unwrap();
        let bug = &expected.bug;
        let mut episode = Swe.start(&task).unwrap();
        let mut step =
            |action: String| Swe::step_with(&task, &mut episode, &action, run_directly).unwrap();
        let seen = step(tool_call("view", serde_json::json!({"path": bug.path})));
        let text = seen.observation.unwrap().content;
        assert!(text.contains(&format!("| {}", "def ")), "{text}");
        let found = step(tool_call(
            "search",
            serde_json::json!({"pattern": bug.buggy_line}),
        ));
        assert!(found.observation.unwrap().content.starts_with(&bug.path));
        let bad = step("<tool_call>{not json}</tool_call>".into());
        assert!(bad.observation.unwrap().content.starts_with("error:"));
        let missing = step(tool_call(
            "edit",
            serde_json::json!({"path": bug.path, "old": "no such text", "new": "x"}),
        ));
        assert!(missing.observation.unwrap().content.contains("not found"));
        let unknown = step(tool_call("rm", serde_json::json!({"path": bug.path})));
        assert!(
            unknown
                .observation
                .unwrap()
                .content
                .contains("unknown tool")
        );
        let failing = step(tool_call("run_tests", serde_json::json!({})));
        let report = failing.observation.unwrap().content;
        assert!(report.contains("1 failed"), "{report}");
        // Fix by line range this time.
        let line = expected.files[&bug.path]
            .lines()
            .position(|l| l.trim() == bug.buggy_line)
            .unwrap()
            + 1;
        let indent: String = expected.files[&bug.path]
            .lines()
            .nth(line - 1)
            .unwrap()
            .chars()
            .take_while(|c| *c == ' ')
            .collect();
        let fixed = step(tool_call(
            "edit",
            serde_json::json!({"path": bug.path, "start": line, "end": line, "text": format!("{indent}{}", bug.fixed_line)}),
        ));
        assert_eq!(
            fixed.observation.unwrap().content,
            format!("edited {}", bug.path)
        );
        let passing = step(tool_call("run_tests", serde_json::json!({})));
        assert!(passing.observation.unwrap().content.contains("0 failed"));
        let end = step("Done, the bug is fixed.".into());
        assert!(end.done);
        let score = end.score.unwrap();
        assert_eq!(score.component("invalid_calls"), Some(3.0));
        assert!((score.reward - 0.7).abs() < 1e-9, "{score:?}");
        assert!(score.reason.contains("3 invalid"), "{}", score.reason);
        let state: SweState = serde_json::from_value(episode.state.clone()).unwrap();
        assert_eq!(state.edits, 1);
    }

    #[test]
    fn objects_that_equal_everything_do_not_pass_hidden_tests() {
        let task = train_task(&Swe, 4, 0);
        let expected: Verification = task.verification_as().unwrap();
        let bug = &expected.bug;
        let source = &expected.files[&bug.path];
        let cheat = format!(
            "class _Any:\n    def __eq__(self, other):\n        return True\n\n\n{}",
            source
                .lines()
                .map(|l| if l.trim_start().starts_with("return ") {
                    "    return _Any()".to_string()
                } else {
                    l.replace("exp=3", "exp=2")
                        .replace("times=3", "times=2")
                        .replace("n=2", "n=1")
                })
                .collect::<Vec<_>>()
                .join("\n")
        );
        let call = tool_call(
            "edit",
            serde_json::json!({"path": bug.path, "start": 1, "end": source.lines().count(), "text": cheat}),
        );
        let score = Swe::score_with(&task, &call, run_directly).unwrap();
        assert_eq!(score.reward, 0.0, "{score:?}");
    }

    #[test]
    fn running_out_of_turns_submits_the_repository() {
        let task = train_task(&Swe, 1, 1);
        let mut episode = Swe.start(&task).unwrap();
        let mut last = None;
        while !episode.done {
            let view = tool_call("view", serde_json::json!({"path": "nope.py"}));
            last = Some(Swe::step_with(&task, &mut episode, &view, run_directly).unwrap());
        }
        let score = last.unwrap().score.unwrap();
        assert_eq!(score.reward, 0.0);
        assert!(score.reason.contains("out of turns"), "{}", score.reason);
        assert_eq!(episode.turn, 8);
    }

    #[test]
    fn a_sandbox_that_cannot_start_fails_the_run_with_the_reason() {
        fn broken(_: &SandboxRequest) -> Result<Outcome, String> {
            Err("the sandbox is unavailable: no backend works here".into())
        }
        let task = train_task(&Swe, 2, 0);
        let expected: Verification = task.verification_as().unwrap();
        let score = Swe::score_with(&task, &fix_call(&expected.bug), broken).unwrap();
        assert_eq!(score.reward, 0.0);
        assert!(
            score.reason.contains("no backend works"),
            "{}",
            score.reason
        );
        let mut episode = Swe.start(&task).unwrap();
        let run = tool_call("run_tests", serde_json::json!({}));
        let outcome = Swe::step_with(&task, &mut episode, &run, broken).unwrap();
        let reply = outcome.observation.unwrap().content;
        assert!(reply.starts_with("could not run the tests"), "{reply}");
        let state: SweState = serde_json::from_value(episode.state).unwrap();
        assert_eq!(state.invalid_calls, 0, "not the model's fault");
    }

    #[test]
    fn splits_are_disjoint() {
        assert_splits_disjoint(&Swe, 0, 200);
        assert_splits_disjoint(&Swe, 3, 100);
    }
}
