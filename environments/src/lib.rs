//! Verifiable environments for Chorus.
//!
//! An [`Environment`] describes itself ([`EnvInfo`]), samples [`Task`]s deterministically from a
//! seed, a [`Split`] and a difficulty level, scores completions into a [`Score`] (a reward with
//! named components and a reason), gives reference solutions, and, when multi-turn, advances an
//! [`Episode`] with [`Environment::step`]. Every prompt uses the one chat template in [`chat`].
//!
//! ```
//! use chorus_environments::{builtin_registry, Split};
//!
//! let registry = builtin_registry();
//! let env = registry.get("arithmetic").unwrap();
//! let task = env.sample(7, Split::Train, 0).unwrap();
//! let answer = env.reference(&task).unwrap();
//! assert!(env.score(&task, &answer).unwrap().is_full());
//! ```
//!
//! Multi-turn episodes run through [`Environment::start`] and [`Environment::step`]; the
//! reference policy ([`Environment::reference_action`], played by [`run_reference_episode`])
//! gives SFT demonstrations for them too. [`check_environment`] is the self-check behind
//! `chorus env check`; [`Registry::list`] is the data behind `chorus env list`.
//!
//! # Environments in other processes
//!
//! [`plugin::RemoteEnvironment`] is an environment served by another process over the gRPC
//! `Environment` service of `chorus-proto` (a plugin in any language; `environments/python/` is
//! the Python SDK), and [`plugin::serve_environment`] serves any environment that way.
//! [`NemoGym`] uses a NeMo Gym resources server and its JSONL rows. [`offline`] gives a
//! dataset's tasks by row, for scoring given completions (`chorus env score`), and
//! [`plugin::scaffold`] the templates of `chorus env new`.
//!
//! # Preference data and a generative reward model
//!
//! [`preference`] reads a user's preference pairs (chosen/rejected, or two responses with
//! helpfulness scores and a ranking), makes pairs from verifiable environments, and holds the
//! GenRM judge format (`[[score_1, score_2, ranking]]`), its signed reward (0 is a perfect
//! judgement), the [`GenRm`] environment that trains a judge on the pairs, and the pairwise
//! comparisons that turn a judge's verdicts into RLHF rewards. [`GenRm`] needs the user's data,
//! so it is not in the built-in registry.
//!
//! # Built-in environments
//!
//! | name | category | turns | verifies |
//! |---|---|---|---|
//! | `arithmetic` | math | single | exact integer value |
//! | `countdown` | math | single | expression reaches the target, numbers used at most once, exact division |
//! | `math_word` | math | single | numeric equivalence (`1,200`, `$1200`, `3/4`, `\boxed{}`, `#### N`); also GSM8K JSONL |
//! | `multi_hop` | long context | single | value at the end of an assignment chain |
//! | `needle` | long context | single | a code hidden in configurable filler |
//! | `knights_knaves` | logic | single | everyone's kind; unique solutions by brute force |
//! | `sudoku` | logic | single | 4x4/6x6/9x9 validity and givens |
//! | `mcqa` | knowledge | single | choice letter; also ARC/MMLU JSONL |
//! | `instruction_following` | instruction following | single | every constraint, one component each; also IFEval JSONL |
//! | `structured_output` | structured output | single | JSON Schema validity |
//! | `function_calling` | tool use | single | tool name and arguments by value; also BFCL rows (`Bfcl`) |
//! | `calendar` | planning | single | a meeting slot that fits every busy block |
//! | `safety` | safety | single | refuse harmful requests, answer harmless look-alikes |
//! | `tool_agent` | tool use | multi | final answer after `lookup`/`calc` tool calls |
//! | `game` | game | multi | tic-tac-toe result against the best forcible one |
//! | `sql` | data | single | the query's result set against the gold query's, both run read-only by SQLite in the sandbox |
//! | `swe` | software | multi | hidden tests of a generated Python repository after view/search/edit/run_tests tool calls, in the sandbox |
//! | `chat_rm` | RLHF | single | a reward model; by default a transparent rubric (key terms, length, format, no refusal, no loops) |
//! | `code_python` | code | single | fraction of unit tests passed, each run in the sandbox; also HumanEval/MBPP JSONL |
//! | `code_output` | code | single | a generated program's exact output, ground truth from the sandbox at sample time |
//! | `competitive` | code | single | fraction of stdin/stdout test cases passed under a CPU limit, in the sandbox |
//!
//! # Sandbox
//!
//! Model-written code runs only through [`sandbox::Sandbox::run`] (usually the process-wide
//! [`sandbox::shared`]): no network (a fresh network namespace), a private tmpfs `/tmp` as the
//! working directory and the only writable place, a read-only view of `/usr`, the interpreter's
//! prefix, `/etc/ld.so.cache` and a few device nodes and nothing else of the host, a PID
//! namespace (the program sees and can signal only its own processes), and limits on CPU time,
//! wall time, memory, processes and output ([`sandbox::Limits`]). Two backends:
//! bubblewrap (`bwrap`) when installed, else namespaces set up by the crate itself (user,
//! mount, PID, network, IPC, UTS; `pivot_root` onto a read-only tmpfs). Both add rlimits and,
//! where this process may create them, cgroup v1 `pids` and `memory` groups; as root the
//! program runs as a per-run unprivileged host uid, so `RLIMIT_NPROC` caps a fork bomb even
//! without cgroups. Each [`sandbox::Outcome`] names the backend that ran it, and how the run
//! ended ([`sandbox::Termination`]) with a reason for the score. A binary that calls
//! [`sandbox::spawner::serve_or_enable`] first in `main` (as `chorus` does) has the shared
//! sandbox's runs started from a small spawner process, so a large training process is never
//! forked. `chat::extract_code` is how code is pulled out of a completion.
//!
//! # Invariants
//!
//! - Only [`chat`] knows the prompt template and how answers are pulled out of completions.
//! - Code a model wrote (or a program whose output is a task's answer) runs only through
//!   [`sandbox::Sandbox::run`], never directly on the host.
//! - Sampling is a pure function of `(environment, seed, split, difficulty)`, using the
//!   portable ChaCha8 RNG ([`task_rng`]); nothing reads global randomness.
//! - The split of a task is a hash of its content ([`split_of`]), so train and heldout never
//!   share a prompt.
//! - Scoring never panics and never errors on model output: garbage scores 0 with a reason (or,
//!   for a signed reward such as GenRM's, its fixed penalty).
//!   Errors ([`EnvError`]) are about tasks, datasets and configuration.
//! - Difficulty 0 is meant for a freshly initialised tiny model trained for minutes on a CPU:
//!   prompts of at most a couple of hundred bytes, short plain-text answers.
#![deny(missing_docs)]

pub mod builtin;
pub mod chat;
mod check;
mod env;
mod error;
pub mod nemo_gym;
mod nemo_gym_http;
pub mod offline;
pub mod plugin;
pub mod preference;
mod registry;
mod sampling;
pub mod sandbox;
mod task;

pub use builtin::builtin_registry;
pub use check::{
    CheckFailure, CheckOptions, CheckReport, FailureKind, PromptStats, check_all,
    check_environment, run_reference_episode,
};
pub use env::{Category, EnvInfo, Environment, Episode, StepOutcome, Turns};
pub use error::EnvError;
pub use nemo_gym::{NemoGym, NemoGymOptions};
pub use preference::GenRm;
pub use registry::Registry;
pub use sampling::{TaskRng, split_of, stable_hash, task_rng};
pub use task::{Score, ScoreComponent, Split, Task};
