//! What a killed service costs a run: runs a config (the quickstart by default) as separate
//! processes — orchestrator, learner (with rolling checkpoints), its rollout workers — once per
//! fault, kills that one service with SIGKILL part-way through (`--at`, a fraction of the run's
//! learner steps) and starts it again at the same address, then prints per fault the time the
//! run took to get past the step it was killed at, and the trajectories lost and duplicated,
//! with `chorus audit`'s verdict: lost are those the ledger marks consumed beyond what the
//! learner reports having trained, duplicated those the learner trained beyond what the ledger
//! consumed (a group trained twice); both must be 0.
//!
//!   cargo bench --bench chaos -- [CONFIG] [--faults learner,worker,orchestrator] [--at 0.4]
//!       [--rl-steps N] [--eval-tasks 64]
//!
//! `--rl-steps` shortens every `rlvr` stage of the config (a quicker measurement of the same
//! run); `--eval-tasks` is the held-out tasks per environment the orchestrator measures.
//!
//! Progress goes to standard error, the table (Markdown, as README shows it) to standard output.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

// Shared with the other run benchmarks.
#[allow(dead_code)]
mod support;

use chorus_orchestrator::ledger::{Ledger, RolloutFilter};

struct Args {
    config: PathBuf,
    faults: Vec<String>,
    at: f64,
    rl_steps: Option<i64>,
    eval_tasks: String,
}

fn parse_args() -> Args {
    let mut args = Args {
        config: PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/configs/quickstart.toml"
        )),
        faults: ["learner", "worker", "orchestrator"]
            .map(String::from)
            .to_vec(),
        at: 0.4,
        rl_steps: None,
        eval_tasks: "64".into(),
    };
    let mut it = std::env::args().skip(1).filter(|a| a != "--bench");
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().unwrap_or_else(|| panic!("{name} needs a value"));
        match a.as_str() {
            "--faults" => {
                args.faults = value("--faults").split(',').map(String::from).collect();
                for f in &args.faults {
                    assert!(
                        ["learner", "worker", "orchestrator"].contains(&f.as_str()),
                        "--faults: `{f}`; allowed: learner, worker, orchestrator"
                    );
                }
            }
            "--at" => {
                args.at = value("--at")
                    .parse()
                    .expect("--at takes a number in (0, 1)");
                assert!(
                    args.at > 0.0 && args.at < 1.0,
                    "--at takes a number in (0, 1)"
                );
            }
            "--rl-steps" => {
                args.rl_steps = Some(
                    value("--rl-steps")
                        .parse()
                        .expect("--rl-steps takes a number"),
                )
            }
            "--eval-tasks" => args.eval_tasks = value("--eval-tasks"),
            "-h" | "--help" => {
                eprintln!(
                    "cargo bench --bench chaos -- [CONFIG] [--faults learner,worker,orchestrator] \
                     [--at FRACTION] [--rl-steps N] [--eval-tasks N]"
                );
                std::process::exit(0);
            }
            path => args.config = PathBuf::from(path),
        }
    }
    args
}

/// A `chorus` process, killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `chorus ARGS…` in `dir` and waits for its `listening on` line.
fn start(dir: &Path, args: &[&str], log: &str) -> (Process, std::process::ChildStdout) {
    use std::io::BufRead;
    let stderr = std::fs::File::create(dir.join(log)).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("start chorus");
    let stdout = child.stdout.take().unwrap();
    let mut reader = std::io::BufReader::new(stdout);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(
        line.starts_with("listening on "),
        "chorus {args:?} printed {line:?} (log: {})",
        dir.join(log).display()
    );
    (Process(child), reader.into_inner())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Outcome {
    fault: String,
    killed_after: u64,
    recovered_s: f64,
    wall_s: f64,
    trained: u64,
    consumed: u64,
    audit_clean: bool,
}

/// The newest learner step the ledger holds (0 while it cannot be read).
fn newest_step(rt: &tokio::runtime::Runtime, ledger: &Ledger, run_id: &str) -> u64 {
    rt.block_on(ledger.list_learner_steps(run_id))
        .map(|s| s.iter().map(|s| s.step.step).max().unwrap_or(0))
        .unwrap_or(0)
}

fn one_fault(args: &Args, fault: &str, workers: usize, total_steps: u64) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let doc = variant(args);
    std::fs::write(dir.join("run.toml"), toml::to_string(&doc).unwrap()).unwrap();
    let run_id = format!("chaos-{fault}");
    let common = [
        "--config",
        "run.toml",
        "--run-id",
        run_id.as_str(),
        "--token",
        "tok",
    ];
    let orchestrator_listen = format!("127.0.0.1:{}", free_port());
    let orchestrator_args: Vec<&str> = [
        &[
            "serve",
            "orchestrator",
            "--listen",
            orchestrator_listen.as_str(),
        ][..],
        &[
            "--wait-seconds",
            "300",
            "--eval-tasks",
            args.eval_tasks.as_str(),
        ],
        &common,
    ]
    .concat();
    let started = Instant::now();
    let (mut orchestrator, mut stdout) = start(dir, &orchestrator_args, "orchestrator-1.log");
    let url = format!("http://{orchestrator_listen}");
    let learner_listen = format!("127.0.0.1:{}", free_port());
    let learner_args: Vec<&str> = [
        &["serve", "learner", "--listen", learner_listen.as_str()][..],
        &[
            "--checkpoints",
            "learner-checkpoints",
            "--orchestrator",
            url.as_str(),
        ],
        &common,
    ]
    .concat();
    let (mut learner, _) = start(dir, &learner_args, "learner-1.log");
    let learner_url = format!("http://{learner_listen}");
    let ids: Vec<String> = (0..workers).map(|i| format!("w{i}")).collect();
    let worker_args = |id: &str| -> Vec<String> {
        [
            &[
                "serve",
                "worker",
                "--learner",
                learner_url.as_str(),
                "--id",
                id,
            ][..],
            &["--orchestrator", url.as_str()],
            &common,
        ]
        .concat()
        .into_iter()
        .map(String::from)
        .collect()
    };
    let mut worker_procs: Vec<Process> = ids
        .iter()
        .map(|id| {
            let a = worker_args(id);
            start(
                dir,
                &a.iter().map(String::as_str).collect::<Vec<_>>(),
                &format!("{id}.log"),
            )
            .0
        })
        .collect();

    let db = format!(
        "sqlite://{}",
        dir.join("runs/chaos/ledger.sqlite").display()
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    while !dir.join("runs/chaos/ledger.sqlite").exists() {
        std::thread::sleep(Duration::from_millis(100));
    }
    let ledger = rt.block_on(Ledger::open(&db)).unwrap();
    let kill_at = ((total_steps as f64 * args.at).round() as u64).max(1);
    while newest_step(&rt, &ledger, &run_id) < kill_at {
        std::thread::sleep(Duration::from_millis(100));
    }
    let killed_after = newest_step(&rt, &ledger, &run_id);
    eprintln!("== {fault}: killed after step {killed_after}");
    let killed = Instant::now();
    match fault {
        "learner" => {
            drop(learner);
            learner = start(dir, &learner_args, "learner-2.log").0;
        }
        "worker" => {
            worker_procs.pop();
            let a = worker_args(ids.last().unwrap());
            worker_procs.push(
                start(
                    dir,
                    &a.iter().map(String::as_str).collect::<Vec<_>>(),
                    "w-2.log",
                )
                .0,
            );
        }
        _ => {
            drop(orchestrator);
            (orchestrator, stdout) = start(dir, &orchestrator_args, "orchestrator-2.log");
        }
    }
    // Recovered once the run is past the step it was killed at (a restarted learner trains the
    // steps after its checkpoint again first).
    while newest_step(&rt, &ledger, &run_id) <= killed_after {
        std::thread::sleep(Duration::from_millis(50));
    }
    let recovered_s = killed.elapsed().as_secs_f64();
    eprintln!("== {fault}: past step {killed_after} again after {recovered_s:.1} s");
    let mut out = String::new();
    stdout.read_to_string(&mut out).unwrap();
    let wall_s = started.elapsed().as_secs_f64();
    let (trained, consumed) = rt.block_on(async {
        let steps = ledger.list_learner_steps(&run_id).await.unwrap();
        let trained: u64 = steps.iter().map(|s| s.step.num_trajectories).sum();
        let rows = ledger
            .list_rollouts(&RolloutFilter {
                run_id: Some(run_id.clone()),
                limit: 100_000_000,
                ..Default::default()
            })
            .await
            .unwrap();
        let consumed = rows.iter().filter(|r| r.consumed_at_step.is_some()).count() as u64;
        (trained, consumed)
    });
    let audit = Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(["audit", &run_id, "--db", &db])
        .output()
        .unwrap();
    let audit_text = String::from_utf8_lossy(&audit.stdout);
    eprintln!("{audit_text}");
    drop((orchestrator, learner, worker_procs));
    Outcome {
        fault: fault.into(),
        killed_after,
        recovered_s,
        wall_s,
        trained,
        consumed,
        audit_clean: audit.status.success() && !audit_text.contains("FAIL"),
    }
}

/// The config as the benchmark runs it.
fn variant(args: &Args) -> toml::Table {
    let mut doc = support::load_variant(&args.config, "chaos");
    if let Some(steps) = args.rl_steps {
        for stage in support::stages_of(&mut doc, "rlvr") {
            stage.insert("steps".into(), toml::Value::Integer(steps));
        }
    }
    doc
}

fn main() {
    let args = parse_args();
    let doc = variant(&args);
    let workers = doc
        .get("workers")
        .and_then(|w| w.get("count"))
        .and_then(|c| c.as_integer())
        .unwrap_or(1) as usize;
    let total_steps: u64 = doc
        .get("stages")
        .and_then(|s| s.as_array())
        .expect("the config has [[stages]]")
        .iter()
        .filter_map(|s| s.get("steps").and_then(|n| n.as_integer()))
        .map(|n| n as u64)
        .sum();
    let outcomes: Vec<Outcome> = args
        .faults
        .iter()
        .map(|f| one_fault(&args, f, workers.max(1), total_steps))
        .collect();
    println!(
        "config {}, {total_steps} learner steps, {workers} workers, killed at {:.0}% of the steps",
        args.config.display(),
        args.at * 100.0
    );
    println!();
    println!(
        "| service killed (SIGKILL) | after step | back past it in | run wall time | trajectories trained | consumed in the ledger | lost | duplicated | audit |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for o in &outcomes {
        println!(
            "| {} | {} | {:.1} s | {:.0} s | {} | {} | {} | {} | {} |",
            o.fault,
            o.killed_after,
            o.recovered_s,
            o.wall_s,
            o.trained,
            o.consumed,
            o.consumed.saturating_sub(o.trained),
            o.trained.saturating_sub(o.consumed),
            if o.audit_clean { "clean" } else { "BREACH" }
        );
    }
}
