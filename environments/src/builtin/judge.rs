//! The judge: how the code environments run tests against model-written code so that the
//! reward cannot be forged.
//!
//! A policy rewarded for passing tests searches for any way to make the harness say "passed".
//! So the harness that knows the tests (and their expected values) and writes the results —
//! the judge, `judge/judge.py` — runs in a different process from the code under test, and
//! reaches it only through calls whose arguments and return values cross as plain data:
//!
//! - The judge reads its tests from standard input and closes it before the solution starts;
//!   no test, expected value or result marker is ever in a file or in the solution's memory.
//! - The solution runs in a child process (`-I -B`, its own session) with no standard output of
//!   the judge's: it gets `/dev/null` and two pipes of its own. The judge writes results to a
//!   descriptor the child never has, and makes itself non-dumpable, so the child (same user)
//!   cannot open `/proc/<judge>/fd` or `mem` nor attach to it; the sandbox's seccomp filter
//!   denies `ptrace` besides.
//! - A call's return value is serialised in the solution's process from built-in types only
//!   (exact types: a subclass of `int` or an object with its own `__eq__` does not cross) and
//!   rebuilt in the judge from built-ins, so every comparison runs the judge's own `==`.
//! - A solution that exits, hangs, kills or stops the judge, or outlives it, gets no credit for
//!   tests it did not pass: only tests the judge ran to the end count, and full credit needs
//!   the judge's `done` line after the last test. A solution that dies is restarted for the
//!   next test.
//!
//! What this does not stop, because it is not forging: code that computes the right answers.
//! What it gives up: tests may pass and receive only the values listed above (a test that
//! passes a lambda, or checks a mutated argument, fails with the reason).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::script::Runner;
use crate::sandbox::{Limits, Outcome, SandboxRequest};

/// The judge's source, run as `python -I -B -c JUDGE`.
const JUDGE: &str = include_str!("judge/judge.py");

/// Where the code under test comes from.
#[derive(Debug, Clone)]
pub(crate) enum Solution {
    /// One file executed as a module; the tests call `bind` (its names) from their namespace.
    File {
        /// The file, among the request's files.
        path: String,
        /// Names the tests call; each must be a callable the file defines.
        bind: Vec<String>,
    },
    /// The working directory is a package root; the tests import `modules` from it.
    Repository {
        /// Importable module names the tests may use.
        modules: Vec<String>,
    },
}

/// How one test's source is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum TestKind {
    /// Executed in the setup's namespace; passes unless it raises.
    Statement,
    /// Executed as a module; each of its `test*` functions is a test of its own.
    Module,
}

/// One test.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct JudgeTest {
    /// The result's name (a module's test functions are `label.name`).
    pub label: String,
    /// Python source.
    pub source: String,
    /// How it is run.
    pub kind: TestKind,
}

/// What to judge.
#[derive(Debug, Clone)]
pub(crate) struct JudgeRequest {
    /// Files of the solution's side (the solution, or a repository).
    pub files: Vec<(String, Vec<u8>)>,
    /// Where the code under test is.
    pub solution: Solution,
    /// Python run once on the judge's side before the tests (e.g. HumanEval's `check`).
    pub setup: String,
    /// The tests, in order.
    pub tests: Vec<JudgeTest>,
    /// Limits of the whole sandbox run (judge and solution together).
    pub limits: Limits,
    /// How long one call into the solution may take.
    pub call_timeout: Duration,
}

/// One test's result.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(crate) struct TestResult {
    pub test: String,
    pub ok: bool,
    #[serde(default)]
    pub error: String,
}

/// What the judge reported.
#[derive(Debug, Clone)]
pub(crate) struct Verdict {
    /// Tests the judge ran to the end, in order.
    pub results: Vec<TestResult>,
    /// Why no test could run (the code does not run, lacks a function, or the setup fails).
    pub error: Option<String>,
    /// Whether the judge finished: only then were all tests run.
    pub done: bool,
    /// How the sandbox run ended.
    pub outcome: Outcome,
}

impl Verdict {
    /// Tests that passed.
    pub fn passed(&self) -> usize {
        self.results.iter().filter(|r| r.ok).count()
    }

    /// Every test ran and passed (and there was at least one).
    #[cfg(test)]
    pub fn all_passed(&self) -> bool {
        self.done
            && self.error.is_none()
            && !self.results.is_empty()
            && self.results.iter().all(|r| r.ok)
    }
}

/// The sandbox request that runs the judge: the solution's files only, the judge's source on
/// its command line and its configuration on standard input, marked by `nonce`.
fn sandbox_request(request: &JudgeRequest, nonce: &str) -> SandboxRequest {
    let (solution, bind, modules) = match &request.solution {
        Solution::File { path, bind } => (Some(path.clone()), bind.clone(), Vec::new()),
        Solution::Repository { modules } => (None, Vec::new(), modules.clone()),
    };
    let config = serde_json::json!({
        "nonce": nonce,
        "solution": solution,
        "bind": bind,
        "modules": modules,
        "setup": request.setup,
        "tests": request.tests,
        "call_timeout": request.call_timeout.as_secs_f64(),
    });
    SandboxRequest {
        // argv[0] is a stand-in the runner replaces by the sandbox's Python.
        argv: vec![
            "python3".into(),
            "-I".into(),
            "-B".into(),
            "-c".into(),
            JUDGE.into(),
        ],
        files: request.files.clone(),
        stdin: config.to_string().into_bytes(),
        limits: request.limits.clone(),
    }
}

/// Runs the tests in the sandbox; `Err` when the sandbox itself could not run.
pub(crate) fn judge(request: &JudgeRequest, runner: Runner) -> Result<Verdict, String> {
    // Unguessable, though nothing outside the judge can reach the line it marks anyway.
    let nonce = format!(
        "chorus-judge-{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    );
    let outcome = runner(&sandbox_request(request, &nonce))?;
    let stdout = String::from_utf8_lossy(&outcome.stdout).into_owned();
    let marker = format!("{nonce} ");
    let mut results = Vec::new();
    let mut error = None;
    let mut done = false;
    for line in stdout.lines() {
        let Some(rest) = line.strip_prefix(&marker) else {
            continue;
        };
        let (kind, value) = rest.split_once(' ').unwrap_or((rest, ""));
        match kind {
            "result" => {
                if let Ok(result) = serde_json::from_str::<TestResult>(value) {
                    results.push(result);
                }
            }
            "error" => error = serde_json::from_str::<String>(value).ok(),
            "done" => done = true,
            _ => {}
        }
    }
    Ok(Verdict {
        results,
        error,
        done,
        outcome,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin::testkit::run_directly;

    fn statement(label: &str, source: &str) -> JudgeTest {
        JudgeTest {
            label: label.into(),
            source: source.into(),
            kind: TestKind::Statement,
        }
    }

    fn file_request(code: &str, tests: Vec<JudgeTest>) -> JudgeRequest {
        JudgeRequest {
            files: vec![("solution.py".into(), code.as_bytes().to_vec())],
            solution: Solution::File {
                path: "solution.py".into(),
                bind: vec!["f".into()],
            },
            setup: String::new(),
            tests,
            limits: Limits::default(),
            call_timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn values_cross_as_built_ins_and_compare_on_the_judges_side() {
        let code = "def f(kind):\n    return {'int': 2**100, 'float': 0.1, 'tuple': (1, 'a'), 'nested': [{1: {2, 3}}, b'x', None, True], 'nan': float('nan'), 'range': range(3), 'complex': 1j}[kind]\n";
        let tests = vec![
            statement("0", "assert f('int') == 2**100 and type(f('int')) is int"),
            statement("1", "assert f('float') == 0.1"),
            statement(
                "2",
                "assert f('tuple') == (1, 'a') and type(f('tuple')) is tuple",
            ),
            statement("3", "assert f('nested') == [{1: {2, 3}}, b'x', None, True]"),
            statement("4", "x = f('nan'); assert x != x"),
            statement("5", "assert f('range') == range(3) and f('complex') == 1j"),
            statement("6", "assert f('int') == 3"),
        ];
        let verdict = judge(&file_request(code, tests), run_directly).unwrap();
        assert!(verdict.done && verdict.error.is_none(), "{verdict:?}");
        let ok: Vec<bool> = verdict.results.iter().map(|r| r.ok).collect();
        assert_eq!(
            ok,
            [true, true, true, true, true, true, false],
            "{verdict:?}"
        );
        assert!(!verdict.all_passed());
    }

    #[test]
    fn objects_that_claim_equality_do_not_cross() {
        let code = "class Yes:\n    def __eq__(self, other):\n        return True\n\nclass Int(int):\n    def __eq__(self, other):\n        return True\n\ndef f(which):\n    return Yes() if which else Int(0)\n";
        let tests = vec![
            statement("0", "assert f(1) == 5"),
            statement("1", "assert f(0) == 5"),
        ];
        let verdict = judge(&file_request(code, tests), run_directly).unwrap();
        assert!(verdict.done, "{verdict:?}");
        assert_eq!(verdict.passed(), 0, "{verdict:?}");
        assert!(
            verdict.results[0].error.contains("type Yes cannot cross"),
            "{verdict:?}"
        );
        assert!(
            verdict.results[1].error.contains("type Int cannot cross"),
            "{verdict:?}"
        );
    }

    #[test]
    fn built_in_exceptions_arrive_as_themselves_and_a_dead_solution_is_restarted() {
        let code = "import os\n\ndef f(x):\n    if x == 0:\n        os._exit(0)\n    if x < 0:\n        raise ValueError('negative')\n    return x\n";
        let tests = vec![
            statement("0", "f(0)"),
            statement(
                "1",
                "try:\n    f(-1)\nexcept ValueError as err:\n    assert str(err) == 'negative'\nelse:\n    raise AssertionError('no error')",
            ),
            statement("2", "assert f(4) == 4"),
        ];
        let verdict = judge(&file_request(code, tests), run_directly).unwrap();
        let ok: Vec<bool> = verdict.results.iter().map(|r| r.ok).collect();
        assert_eq!(ok, [false, true, true], "{verdict:?}");
        assert!(
            verdict.results[0].error.contains("process ended"),
            "{verdict:?}"
        );
    }

    #[test]
    fn code_that_does_not_run_or_lacks_the_function_is_an_error() {
        for (code, want) in [
            ("def f(:\n", "the code does not run: SyntaxError"),
            ("def g(x):\n    return x\n", "defines no function f"),
            ("import sys\nsys.exit(0)\n", "the code does not run"),
        ] {
            let verdict = judge(
                &file_request(code, vec![statement("0", "f(1)")]),
                run_directly,
            )
            .unwrap();
            let error = verdict.error.clone().unwrap_or_default();
            assert!(error.contains(want), "{code:?}: {verdict:?}");
            assert!(verdict.results.is_empty() && !verdict.all_passed());
        }
    }

    #[test]
    fn repository_modules_are_imported_on_the_solutions_side() {
        let request = JudgeRequest {
            files: vec![
                ("app.py".into(), b"from util import twice\n\ndef quad(x):\n    return twice(twice(x))\n".to_vec()),
                ("util.py".into(), b"def twice(x):\n    return 2 * x\n".to_vec()),
            ],
            solution: Solution::Repository {
                modules: vec!["app".into(), "util".into()],
            },
            setup: String::new(),
            tests: vec![JudgeTest {
                label: "hidden_test_app".into(),
                source: "import app\nfrom util import twice\n\ndef test_quad():\n    assert app.quad(3) == 12\n\ndef test_twice():\n    assert twice(2) == 5\n".into(),
                kind: TestKind::Module,
            }],
            limits: Limits::default(),
            call_timeout: Duration::from_secs(5),
        };
        let verdict = judge(&request, run_directly).unwrap();
        assert!(verdict.done, "{verdict:?}");
        let got: Vec<(&str, bool)> = verdict
            .results
            .iter()
            .map(|r| (r.test.as_str(), r.ok))
            .collect();
        assert_eq!(
            got,
            [
                ("hidden_test_app.test_quad", true),
                ("hidden_test_app.test_twice", false)
            ]
        );
    }
}
