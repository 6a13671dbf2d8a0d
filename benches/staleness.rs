//! Time to accuracy, synchronous against asynchronous: runs a config (the quickstart by
//! default) twice in one go, once with every RL stage at `max_staleness = 0` (the synchronous
//! baseline, same code path) and once as written, each with a learning curve (`chorus run
//! --eval-every N`), and reports how long each took to reach the accuracy both of them reach,
//! and the ratio.
//!
//!   cargo bench --bench staleness -- [CONFIG] [--eval-every N] [--eval-tasks N] [--rl-steps N]
//!
//! A full quickstart pair takes about twice the quickstart's own time.

use std::path::{Path, PathBuf};

mod support;

struct Args {
    config: PathBuf,
    eval_every: u64,
    eval_tasks: usize,
    rl_steps: Option<u64>,
}

fn parse_args() -> Args {
    let mut args = Args {
        config: PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/configs/quickstart.toml"
        )),
        eval_every: 20,
        eval_tasks: 256,
        rl_steps: None,
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
            other if !other.starts_with("--") => args.config = PathBuf::from(other),
            other => panic!(
                "unknown option {other}; allowed: CONFIG --eval-every N --eval-tasks N --rl-steps N"
            ),
        }
    }
    args
}

/// The config with every RL stage's staleness bound (and step count) replaced when given.
fn variant(
    config: &Path,
    staleness: Option<u64>,
    rl_steps: Option<u64>,
    name: &str,
) -> toml::Table {
    let mut doc = support::load_variant(config, name);
    for stage in support::stages_of(&mut doc, "rl") {
        if let Some(s) = staleness {
            stage.insert("max_staleness".into(), toml::Value::Integer(s as i64));
        }
        if let Some(n) = rl_steps {
            stage.insert("steps".into(), toml::Value::Integer(n as i64));
        }
    }
    doc
}

struct Outcome {
    label: &'static str,
    summary: serde_json::Value,
}

impl Outcome {
    fn curve(&self) -> Vec<(f64, f64)> {
        self.summary["curve"]
            .as_array()
            .expect("summary has a curve")
            .iter()
            .map(|p| {
                (
                    p["seconds"].as_f64().unwrap(),
                    p["mean_accuracy"].as_f64().unwrap(),
                )
            })
            .collect()
    }
    fn final_accuracy(&self) -> f64 {
        self.summary["mean_after"].as_f64().unwrap()
    }
    /// Seconds until the curve first reaches `target`.
    fn time_to(&self, target: f64) -> Option<f64> {
        self.curve()
            .into_iter()
            .find(|(_, acc)| *acc >= target - 1e-9)
            .map(|(t, _)| t)
    }
}

fn main() {
    let args = parse_args();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut outcomes = vec![];
    for (label, staleness) in [("max_staleness = 0", Some(0)), ("as configured", None)] {
        let name = if staleness == Some(0) {
            "sync"
        } else {
            "async"
        };
        let doc = variant(&args.config, staleness, args.rl_steps, name);
        eprintln!("== {label}");
        let run_args = [
            "--eval-every".to_string(),
            args.eval_every.to_string(),
            "--eval-tasks".to_string(),
            args.eval_tasks.to_string(),
        ];
        let summary = support::run(dir.path(), name, &doc, &run_args);
        outcomes.push(Outcome { label, summary });
    }
    let target = outcomes
        .iter()
        .map(Outcome::final_accuracy)
        .fold(f64::INFINITY, f64::min);
    println!(
        "time to reach {:.1}% mean held-out accuracy (the lower of the two final accuracies), from the start of the run:",
        100.0 * target
    );
    println!(
        "{:<20} {:>10} {:>10} {:>12} {:>10}",
        "", "final acc", "wall s", "to target s", "max lag"
    );
    let mut times = vec![];
    for o in &outcomes {
        let t = o.time_to(target);
        times.push(t);
        println!(
            "{:<20} {:>9.1}% {:>10.1} {:>12} {:>10}",
            o.label,
            100.0 * o.final_accuracy(),
            o.summary["wall_seconds"].as_f64().unwrap(),
            t.map(|t| format!("{t:.1}")).unwrap_or_else(|| "-".into()),
            o.summary["max_lag"]
                .as_u64()
                .map(|l| l.to_string())
                .unwrap_or_else(|| "-".into()),
        );
    }
    if let (Some(sync), Some(asynchronous)) = (times[0], times[1]) {
        println!(
            "ratio (synchronous / asynchronous time to target): {:.2}x",
            sync / asynchronous
        );
    }
    let wall = |o: &Outcome| o.summary["wall_seconds"].as_f64().unwrap();
    println!(
        "ratio of whole-run wall time (synchronous / asynchronous): {:.2}x",
        wall(&outcomes[0]) / wall(&outcomes[1])
    );
}
