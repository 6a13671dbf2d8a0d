//! The speed cost of `deterministic = true`: runs a config (the quickstart by default, its
//! stages shortened) twice in one go, once as written with `deterministic = false` and once with
//! `deterministic = true`, and prints both wall times and their ratio.
//!
//!   cargo bench --bench deterministic -- [CONFIG] [--steps N] [--eval-tasks N]
//!
//! `--steps N` (default 10) caps every stage's step count, so the pair takes minutes, not the
//! quickstart's quarter of an hour; the ratio is what it measures.

use std::path::PathBuf;

mod support;

fn main() {
    let mut config = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/configs/quickstart.toml"
    ));
    let (mut steps, mut eval_tasks) = (10i64, 32u64);
    let mut it = std::env::args().skip(1).filter(|a| a != "--bench");
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .unwrap_or_else(|| panic!("{name} needs a value"))
                .parse::<u64>()
                .unwrap_or_else(|e| panic!("{name}: {e}"))
        };
        match a.as_str() {
            "--steps" => steps = value("--steps").max(1) as i64,
            "--eval-tasks" => eval_tasks = value("--eval-tasks"),
            other if !other.starts_with("--") => config = PathBuf::from(other),
            other => panic!("unknown option {other}; allowed: CONFIG --steps N --eval-tasks N"),
        }
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let mut walls = vec![];
    for deterministic in [false, true] {
        let name = if deterministic { "det" } else { "nondet" };
        let mut doc = support::load_variant(&config, name);
        doc.insert("deterministic".into(), toml::Value::Boolean(deterministic));
        for kind in ["sft", "rl"] {
            for stage in support::stages_of(&mut doc, kind) {
                let n = stage
                    .get("steps")
                    .and_then(|s| s.as_integer())
                    .unwrap_or(steps);
                stage.insert("steps".into(), toml::Value::Integer(n.min(steps)));
            }
        }
        let args = ["--eval-tasks".to_string(), eval_tasks.to_string()];
        let summary = support::run(dir.path(), name, &doc, &args);
        walls.push((
            deterministic,
            summary["wall_seconds"].as_f64().expect("wall_seconds"),
            summary["trajectories"].as_u64().unwrap_or(0),
        ));
    }
    println!(
        "{:<16} {:>10} {:>14}",
        "deterministic", "wall s", "trajectories"
    );
    for (d, wall, n) in &walls {
        println!("{:<16} {wall:>10.1} {n:>14}", d.to_string());
    }
    println!(
        "ratio (deterministic / not, whole-run wall time): {:.2}x",
        walls[1].1 / walls[0].1
    );
}
