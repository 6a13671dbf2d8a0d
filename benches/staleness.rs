//! Time to accuracy, synchronous against asynchronous: runs a config's RL stages
//! (`configs/async-balanced.toml`'s by default: the quickstart with `sudoku` added, whose steps
//! cost about as much generation as training on 2 cores) twice in one go, once with every RL stage at `max_staleness = 0`
//! (the synchronous baseline, same code path) and once as written (or at `--max-staleness N`),
//! each with a learning curve (`--eval-every N`), and reports how long each took to reach the
//! accuracy both of them reach, and the ratio.
//!
//! The stages before the first RL stage (the supervised warm-up) run once, first;
//! both variants start their RL from its checkpoint, and their clocks start there.
//!
//! `--processes` runs the learner, one worker and the orchestrator as separate processes
//! (`chorus serve`), the learner pinned to CPU 0 and the worker and orchestrator to the other
//! CPUs, as a cluster gives training and generation accelerators of their own: only then can
//! overlapping them save time (in one process they share every core). It also prints each side's
//! idle fraction, `1 - busy / wall`, from their Prometheus metrics (the learner's
//! `chorus_learner_step_seconds`, the worker's `chorus_worker_engine_busy_seconds`) and each
//! process's CPU seconds (from `/proc`), which show how much of the CPUs they share the worker
//! and the orchestrator use.
//!
//! `--worker-max-batch N` caps how many sequences a worker decodes at once (`[workers]
//! max_batch`) in both variants, one way to shift a step's cost towards generation (on the
//! quickstart's nano model, 16 instead of 64 changed neither side's busy time: README, run 8).
//!
//!   cargo bench --bench staleness -- [CONFIG] [--eval-every N] [--eval-tasks N] [--rl-steps N]
//!       [--max-staleness N] [--worker-max-batch N] [--processes] [--keep DIR]
//!
//! `--keep DIR` leaves the runs' ledgers (`sync.db`, `async.db`), logs and summaries in `DIR`
//! (`chorus inspect` reads them), for a look at where a step's time went.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

mod support;

const HELP: &str =
    "staleness bench: time to a common held-out accuracy, synchronous (max_staleness = 0)
against asynchronous, in one run

  cargo bench --bench staleness -- [CONFIG] [options]

  CONFIG              a run config (default configs/async-balanced.toml); its stages before the
                      first RL stage run once, then its RL stages run twice
  --rl-steps N        RL steps per variant (default: the config's own)
  --eval-every N      held-out evaluation every N RL steps, the learning curve (default 20)
  --eval-tasks N      held-out tasks per environment (default 256)
  --max-staleness N   the asynchronous variant's bound (default: the config's own)
  --worker-max-batch N  sequences a worker decodes at once, in both variants
  --processes         learner, worker and orchestrator as separate processes, the learner on
                      CPU 0 and the others on the rest (needs 2 CPUs and `taskset`); prints idle
                      fractions and CPU seconds per process
  --keep DIR          keep the runs' ledgers, logs and summaries in DIR

  README, \"Asynchrony: time to accuracy\", shows runs of it and how to read them.";

struct Args {
    config: PathBuf,
    eval_every: u64,
    eval_tasks: usize,
    rl_steps: Option<u64>,
    max_staleness: Option<u64>,
    worker_max_batch: Option<u64>,
    processes: bool,
    /// Where the runs' files (ledgers, logs, summaries) go and stay; a temporary folder,
    /// removed at the end, when not given.
    keep: Option<PathBuf>,
}

fn parse_args() -> Args {
    let mut args = Args {
        config: PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/configs/async-balanced.toml"
        )),
        eval_every: 20,
        eval_tasks: 256,
        rl_steps: None,
        max_staleness: None,
        worker_max_batch: None,
        processes: false,
        keep: None,
    };
    let mut it = std::env::args().skip(1).filter(|a| a != "--bench");
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .unwrap_or_else(|| panic!("{name} needs a value"))
                .parse::<u64>()
                .unwrap_or_else(|e| panic!("{name}: {e}"))
        };
        match a.as_str() {
            "--eval-every" => args.eval_every = value("--eval-every").max(1),
            "--eval-tasks" => args.eval_tasks = value("--eval-tasks") as usize,
            "--rl-steps" => args.rl_steps = Some(value("--rl-steps")),
            "--max-staleness" => args.max_staleness = Some(value("--max-staleness").max(1)),
            "--worker-max-batch" => {
                args.worker_max_batch = Some(value("--worker-max-batch").max(1))
            }
            "--processes" => args.processes = true,
            "--help" | "-h" => {
                println!("{HELP}");
                std::process::exit(0);
            }
            "--keep" => {
                args.keep = Some(PathBuf::from(
                    it.next().unwrap_or_else(|| panic!("--keep needs a folder")),
                ))
            }
            other if !other.starts_with("--") => args.config = PathBuf::from(other),
            other => panic!(
                "unknown option {other}; allowed: CONFIG --eval-every N --eval-tasks N \
                 --rl-steps N --max-staleness N --worker-max-batch N --processes --keep DIR"
            ),
        }
    }
    args
}

/// Whether a `[[stages]]` table is an RL stage (`rl` is `rlvr`'s older name).
fn is_rl(stage: &toml::Value) -> bool {
    matches!(
        stage.get("kind").and_then(|k| k.as_str()),
        Some("rl" | "rlvr")
    )
}

/// The config cut at its first RL stage: `before` keeps the stages ahead of it (None when
/// there are none), the other keeps it and every later stage.
fn split_at_rl(config: &Path) -> (Option<toml::Table>, toml::Table) {
    let doc = support::load_variant(config, "warmup");
    let stages = doc
        .get("stages")
        .and_then(|s| s.as_array())
        .expect("the config has [[stages]]")
        .clone();
    let first_rl = stages
        .iter()
        .position(is_rl)
        .expect("the config has an RL stage (kind = \"rlvr\")");
    let with = |stages: &[toml::Value]| {
        let mut d = doc.clone();
        d.insert("stages".into(), toml::Value::Array(stages.to_vec()));
        d
    };
    let before = (first_rl > 0).then(|| with(&stages[..first_rl]));
    (before, with(&stages[first_rl..]))
}

/// `rl` renamed `name`, starting from `checkpoint` when given, every RL stage at `staleness`
/// (and `rl_steps` steps) when given.
fn variant(
    rl: &toml::Table,
    checkpoint: Option<&Path>,
    staleness: Option<u64>,
    rl_steps: Option<u64>,
    name: &str,
) -> toml::Table {
    let mut doc = rl.clone();
    doc.insert("name".into(), toml::Value::String(name.into()));
    if let Some(dir) = checkpoint {
        let mut model = toml::Table::new();
        model.insert(
            "checkpoint".into(),
            toml::Value::String(dir.display().to_string()),
        );
        if let Some(t) = rl
            .get("model")
            .and_then(|m| m.get("tokenizer"))
            .and_then(|t| t.as_str())
        {
            model.insert("tokenizer".into(), toml::Value::String(t.into()));
        }
        doc.insert("model".into(), toml::Value::Table(model));
    }
    for kind in ["rl", "rlvr"] {
        for stage in support::stages_of(&mut doc, kind) {
            if let Some(s) = staleness {
                stage.insert("max_staleness".into(), toml::Value::Integer(s as i64));
            }
            if let Some(n) = rl_steps {
                stage.insert("steps".into(), toml::Value::Integer(n as i64));
            }
        }
    }
    doc
}

struct Outcome {
    label: String,
    summary: serde_json::Value,
    /// Idle fractions of the learner and the worker, when measured (`--processes`).
    idle: Option<(f64, f64)>,
    /// CPU seconds (user and system) of the learner, worker and orchestrator processes, when
    /// they ran apart (`--processes`) and Linux' `/proc` could tell.
    cpu: Option<[Option<f64>; 3]>,
}

impl Outcome {
    /// The learning curve: (RL steps since the first point, seconds, mean accuracy) per point.
    fn curve(&self) -> Vec<(u64, f64, f64)> {
        let points = self.summary["curve"]
            .as_array()
            .expect("summary has a curve");
        let version = |p: &serde_json::Value| p["version"].as_u64().unwrap_or(0);
        let base = points.first().map_or(0, version);
        points
            .iter()
            .map(|p| {
                (
                    version(p).saturating_sub(base),
                    p["seconds"].as_f64().unwrap(),
                    p["mean_accuracy"].as_f64().unwrap(),
                )
            })
            .collect()
    }
    fn final_accuracy(&self) -> f64 {
        self.summary["mean_after"].as_f64().unwrap()
    }
    fn wall(&self) -> f64 {
        self.summary["wall_seconds"].as_f64().unwrap()
    }
    /// Accuracy before RL (the curve's first point).
    fn start_accuracy(&self) -> f64 {
        self.curve().first().map_or(0.0, |p| p.2)
    }
    /// Seconds and RL steps until the curve first reaches `target`, interpolated linearly
    /// between the evaluation below the target and the first one at or above it (the curve is
    /// measured only every `--eval-every` steps; the first point, before RL, never counts).
    fn time_to(&self, target: f64) -> Option<(f64, f64)> {
        let curve = self.curve();
        let i = (1..curve.len()).find(|&i| curve[i].2 >= target - 1e-9)?;
        let ((s0, t0, a0), (s1, t1, a1)) = (curve[i - 1], curve[i]);
        let f = if a1 > a0 {
            ((target - a0) / (a1 - a0)).clamp(0.0, 1.0)
        } else {
            1.0
        };
        Some((t0 + f * (t1 - t0), s0 as f64 + f * (s1 as f64 - s0 as f64)))
    }
    /// Wall seconds per RL step.
    fn seconds_per_step(&self) -> Option<f64> {
        let steps = self.summary["steps"].as_u64().filter(|&n| n > 0)?;
        Some(self.wall() / steps as f64)
    }
}

/// A port on 127.0.0.1 free a moment ago (for a metrics endpoint, whose address is given
/// rather than reported).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A service process and the URL it printed.
struct Service {
    child: Child,
    url: String,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The CPUs for the worker and the orchestrator: every CPU but 0, as `taskset` writes them.
fn other_cpus() -> String {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        n >= 2,
        "--processes pins the learner and the worker to different CPUs; this machine has one"
    );
    format!("1-{}", n - 1)
}

/// `taskset -c CPUS chorus --metrics ADDR serve ARGS…`, once it printed `listening on URL`.
fn serve(cpus: &str, metrics: u16, args: &[&str], log: &Path) -> Service {
    let mut child = Command::new("taskset")
        .args(["-c", cpus, env!("CARGO_BIN_EXE_chorus")])
        .args(["--metrics", &format!("127.0.0.1:{metrics}"), "serve"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).expect("log file"))
        .spawn()
        .expect("start taskset (util-linux) and chorus");
    let mut line = String::new();
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    stdout
        .read_line(&mut line)
        .expect("read the service's first line");
    // Drained, so that whatever else the service prints never blocks it or breaks its pipe.
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| {
            panic!(
                "chorus serve {args:?} printed {line:?}, not `listening on URL` (log: {})",
                log.display()
            )
        })
        .to_string();
    Service { child, url }
}

/// CPU seconds (user and system, every thread) process `pid` has used so far, from
/// `/proc/PID/stat`; a process that exited but is not reaped yet still has its totals there.
/// `None` off Linux.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
    // utime and stime are fields 14 and 15 of the whole line (11 and 12 here), in clock ticks
    // of USER_HZ, which Linux fixes at 100 for everything it reports to user space.
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// The sum of the histogram `name` at the Prometheus endpoint on `port`.
fn metric_sum(port: u16, name: &str) -> f64 {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint");
    write!(
        stream,
        "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .expect("ask for metrics");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read metrics");
    let key = format!("{name}_sum");
    text.lines()
        .filter(|l| l.starts_with(&key))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Runs `doc` as separate processes (see the module docs) and returns its summary and the
/// learner's and the worker's idle fractions.
fn run_processes(dir: &Path, name: &str, doc: &toml::Table, args: &Args) -> Outcome {
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(&config, toml::to_string(doc).expect("serialise the config")).unwrap();
    let config = config.display().to_string();
    let common = ["--config", &config, "--run-id", name, "--token", "bench"];
    let (learner_metrics, worker_metrics) = (free_port(), free_port());
    let others = other_cpus();
    eprintln!("== {name}: learner on CPU 0, worker and orchestrator on CPUs {others}");
    let learner = serve(
        "0",
        learner_metrics,
        &[&["learner", "--listen", "127.0.0.1:0"][..], &common].concat(),
        &dir.join(format!("{name}-learner.log")),
    );
    let worker = serve(
        &others,
        worker_metrics,
        &[
            &["worker", "--listen", "127.0.0.1:0", "--id", "w0"][..],
            &["--learner", &learner.url],
            &common,
        ]
        .concat(),
        &dir.join(format!("{name}-worker.log")),
    );
    let (eval_every, eval_tasks) = (args.eval_every.to_string(), args.eval_tasks.to_string());
    let db = format!("sqlite://{}", dir.join(format!("{name}.db")).display());
    let runs = dir.display().to_string();
    let mut orchestrator = Command::new("taskset")
        .args(["-c", &others, env!("CARGO_BIN_EXE_chorus"), "serve"])
        .args([
            "orchestrator",
            "--learner",
            &learner.url,
            "--worker",
            &worker.url,
        ])
        .args(common)
        .args(["--eval-every", &eval_every, "--eval-tasks", &eval_tasks])
        .args(["--db", &db, "--runs-dir", &runs])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the orchestrator");
    let mut stdout = vec![];
    orchestrator
        .stdout
        .take()
        .expect("stdout")
        .read_to_end(&mut stdout)
        .expect("read the orchestrator's summary");
    // Its output ends when it exits; read its CPU time before `wait` reaps it (`taskset`
    // execs `chorus`, so the pid is the orchestrator's own).
    let orchestrator_cpu = cpu_seconds(orchestrator.id());
    let status = orchestrator.wait().expect("wait for the orchestrator");
    assert!(status.success(), "the orchestrator of {name} failed");
    let summary: serde_json::Value =
        serde_json::from_slice(&stdout).expect("the orchestrator prints the run's summary");
    let wall = summary["wall_seconds"].as_f64().unwrap();
    let learner_busy = metric_sum(learner_metrics, "chorus_learner_step_seconds");
    let worker_busy = metric_sum(worker_metrics, "chorus_worker_engine_busy_seconds");
    let cpu = [
        cpu_seconds(learner.child.id()),
        cpu_seconds(worker.child.id()),
        orchestrator_cpu,
    ];
    Outcome {
        label: String::new(),
        summary,
        idle: Some((1.0 - learner_busy / wall, 1.0 - worker_busy / wall)),
        cpu: Some(cpu),
    }
}

fn main() {
    let args = parse_args();
    let temporary = tempfile::tempdir().expect("temp dir");
    let dir = match &args.keep {
        Some(keep) => {
            std::fs::create_dir_all(keep).expect("create the --keep folder");
            keep.clone()
        }
        None => temporary.path().to_path_buf(),
    };
    let (before, rl) = split_at_rl(&args.config);
    let checkpoint = before.map(|doc| {
        eprintln!("== the stages before RL, once (both variants start from their checkpoint)");
        support::run(dir.as_path(), "warmup", &doc, &[]);
        let checkpoint = dir.as_path().join("warmup").join("checkpoint");
        assert!(
            checkpoint.join("config.json").exists(),
            "the warm-up wrote no checkpoint at {}",
            checkpoint.display()
        );
        checkpoint
    });
    let asynchronous = args.max_staleness.map_or("as configured".to_string(), |s| {
        format!("max_staleness = {s}")
    });
    let mut outcomes = vec![];
    for (label, staleness, name) in [
        ("max_staleness = 0".to_string(), Some(0), "sync"),
        (asynchronous, args.max_staleness, "async"),
    ] {
        let mut doc = variant(&rl, checkpoint.as_deref(), staleness, args.rl_steps, name);
        if let Some(n) = args.worker_max_batch {
            let workers = doc
                .entry("workers")
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let workers = workers.as_table_mut().expect("[workers] is a table");
            workers.insert("max_batch".into(), toml::Value::Integer(n as i64));
        }
        eprintln!("== {label}");
        let mut outcome = if args.processes {
            run_processes(dir.as_path(), name, &doc, &args)
        } else {
            let run_args = [
                "--eval-every".to_string(),
                args.eval_every.to_string(),
                "--eval-tasks".to_string(),
                args.eval_tasks.to_string(),
            ];
            Outcome {
                label: String::new(),
                summary: support::run(dir.as_path(), name, &doc, &run_args),
                idle: None,
                cpu: None,
            }
        };
        outcome.label = label;
        outcomes.push(outcome);
    }
    if let Some(n) = args.worker_max_batch {
        println!("both variants: [workers] max_batch = {n} (--worker-max-batch)");
    }
    report(&outcomes, args.processes);
}

fn report(outcomes: &[Outcome], processes: bool) {
    if let Some(cpu) = outcomes[0].summary["cpu"].as_str() {
        println!("cpu (the orchestrator's process): {cpu}");
    }
    let target = outcomes
        .iter()
        .map(Outcome::final_accuracy)
        .fold(f64::INFINITY, f64::min);
    println!(
        "time to reach {:.1}% mean held-out accuracy (the lower of the two final accuracies), from the start of RL{}:",
        100.0 * target,
        if processes {
            " (learner on CPU 0, worker on the others)"
        } else {
            " (one process)"
        }
    );
    println!(
        "{:<20} {:>10} {:>10} {:>10} {:>12} {:>11} {:>8} {:>13} {:>12}",
        "",
        "final acc",
        "wall s",
        "s / step",
        "to target s",
        "steps to it",
        "max lag",
        "learner idle",
        "worker idle"
    );
    let percent = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{:.0}%", 100.0 * x));
    let start = outcomes
        .iter()
        .map(Outcome::start_accuracy)
        .fold(f64::NEG_INFINITY, f64::max);
    if target <= start {
        println!(
            "(the target is not above the {:.1}% both started RL from: no time to it is measured; \
             run more RL steps)",
            100.0 * start
        );
    }
    let mut times = vec![];
    for o in outcomes {
        let t = o.time_to(target);
        times.push(t);
        println!(
            "{:<20} {:>9.1}% {:>10.1} {:>10} {:>12} {:>11} {:>8} {:>13} {:>12}",
            o.label,
            100.0 * o.final_accuracy(),
            o.wall(),
            o.seconds_per_step()
                .map_or("-".into(), |s| format!("{s:.3}")),
            t.filter(|_| target > start)
                .map_or("-".into(), |(t, _)| format!("{t:.1}")),
            t.filter(|_| target > start)
                .map_or("-".into(), |(_, n)| format!("{n:.1}")),
            o.summary["max_lag"]
                .as_u64()
                .map(|l| l.to_string())
                .unwrap_or_else(|| "-".into()),
            percent(o.idle.map(|i| i.0)),
            percent(o.idle.map(|i| i.1)),
        );
    }
    if let (Some((sync, sync_steps)), Some((asynchronous, async_steps)), true) =
        (times[0], times[1], target > start)
    {
        println!(
            "ratio (synchronous / asynchronous time to target): {:.2}x (steps to it: {sync_steps:.1} \
             and {async_steps:.1})",
            sync / asynchronous
        );
    }
    println!(
        "ratio of whole-run wall time (synchronous / asynchronous): {:.2}x",
        outcomes[0].wall() / outcomes[1].wall()
    );
    println!(
        "to target: interpolated linearly between the evaluation below the target and the \
         first one at or above it (every --eval-every RL steps)"
    );
    if processes {
        println!(
            "{:<20} {:>13} {:>12} {:>18} {:>26}",
            "",
            "learner cpu s",
            "worker cpu s",
            "orchestrator cpu s",
            "worker + orchestrator / wall"
        );
        for o in outcomes {
            let [learner, worker, orchestrator] = o.cpu.unwrap_or([None; 3]);
            let seconds = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.1}"));
            let shared = worker
                .zip(orchestrator)
                .map(|(w, r)| format!("{:.0}%", 100.0 * (w + r) / o.wall()));
            println!(
                "{:<20} {:>13} {:>12} {:>18} {:>26}",
                o.label,
                seconds(learner),
                seconds(worker),
                seconds(orchestrator),
                shared.unwrap_or_else(|| "-".into())
            );
        }
        println!(
            "cpu s: user and system time of each process over its whole life (start-up and \
             evaluations included); the worker and the orchestrator share the CPUs but 0"
        );
        println!(
            "idle = 1 - busy / wall: the learner busy in its steps (training and publishing), the \
             worker's engine thread busy installing, prefilling or decoding"
        );
    }
}
