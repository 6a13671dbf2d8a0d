//! The quickstart's result across seeds: runs a config (the quickstart by default) once per
//! seed, one after another, and prints per seed and environment the held-out accuracy before
//! RL, after it, and the gain, each with its 95% interval, the wall time of each run and the CPU
//! it ran on, then whether each seed met the quickstart's promise (a mean gain of at least 15
//! points, no environment ending more than 3 points below where RL started, at most 15 minutes).
//!
//!   cargo bench --bench quickstart_seeds -- [CONFIG] [--seeds 0,1,2] [--eval-tasks N]
//!
//! A seed sets both the run's `seed` (task draws, sampling) and `[model] init_seed` (the
//! initial weights). Three quickstart seeds take about three quickstarts' time; progress goes to
//! standard error, the tables (Markdown, as README shows them) to standard output.

use std::path::PathBuf;

// Shared with the staleness benchmark, which uses all of it.
#[allow(dead_code)]
mod support;

/// The promise README makes for the quickstart.
const MIN_GAIN_POINTS: f64 = 15.0;
const MAX_ENV_LOSS_POINTS: f64 = 3.0;
const MAX_WALL_SECONDS: f64 = 15.0 * 60.0;

struct Args {
    config: PathBuf,
    seeds: Vec<u64>,
    eval_tasks: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        config: PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/configs/quickstart.toml"
        )),
        seeds: vec![0, 1, 2],
        eval_tasks: 256,
    };
    let mut it = std::env::args().skip(1).filter(|a| a != "--bench");
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().unwrap_or_else(|| panic!("{name} needs a value"));
        match a.as_str() {
            "--seeds" => {
                args.seeds = value("--seeds")
                    .split(',')
                    .map(|s| {
                        s.trim().parse().unwrap_or_else(|e| {
                            panic!("--seeds takes numbers like 0,1,2: {s}: {e}")
                        })
                    })
                    .collect()
            }
            "--eval-tasks" => {
                args.eval_tasks = value("--eval-tasks")
                    .parse()
                    .unwrap_or_else(|e| panic!("--eval-tasks: {e}"))
            }
            other if !other.starts_with("--") => args.config = PathBuf::from(other),
            other => panic!("unknown option {other}; allowed: CONFIG --seeds 0,1,2 --eval-tasks N"),
        }
    }
    assert!(!args.seeds.is_empty(), "--seeds needs at least one seed");
    args
}

fn percent(x: &serde_json::Value) -> f64 {
    100.0 * x.as_f64().expect("a number")
}

fn interval(x: &serde_json::Value, signed: bool) -> String {
    let (lo, hi) = (percent(&x[0]), percent(&x[1]));
    if signed {
        format!("[{lo:+.1}, {hi:+.1}]")
    } else {
        format!("[{lo:.1}, {hi:.1}]")
    }
}

fn main() {
    let args = parse_args();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut summaries = vec![];
    for (i, &seed) in args.seeds.iter().enumerate() {
        let name = format!("seed{seed}");
        let mut doc = support::load_variant(&args.config, &name);
        doc.insert("seed".into(), toml::Value::Integer(seed as i64));
        if let Some(model) = doc.get_mut("model").and_then(|m| m.as_table_mut())
            && model.contains_key("init_config")
        {
            model.insert("init_seed".into(), toml::Value::Integer(seed as i64));
        }
        eprintln!("== seed {seed} ({} of {})", i + 1, args.seeds.len());
        let run_args = ["--eval-tasks".to_string(), args.eval_tasks.to_string()];
        summaries.push((seed, support::run(dir.path(), &name, &doc, &run_args)));
    }

    let cpu = summaries[0].1["cpu"]
        .as_str()
        .unwrap_or("unknown")
        .to_string();
    println!(
        "{} with seeds {:?}, {} held-out tasks per environment, on {cpu}; intervals are 95%.\n",
        args.config.display(),
        args.seeds,
        args.eval_tasks
    );
    println!("| seed | environment | after warm-up | after RL | gain (points) |");
    println!("|---|---|---|---|---|");
    let mut verdicts = vec![];
    for (seed, s) in &summaries {
        let envs = s["environments"].as_object().expect("environments");
        let mut worst_loss = f64::NEG_INFINITY;
        for (env, r) in envs {
            println!(
                "| {seed} | {env} | {:.1}% {} | {:.1}% {} | {:+.1} {} |",
                percent(&r["before"]),
                interval(&r["before_interval"], false),
                percent(&r["after"]),
                interval(&r["after_interval"], false),
                percent(&r["gain"]),
                interval(&r["gain_interval"], true),
            );
            worst_loss = worst_loss.max(-percent(&r["gain"]));
        }
        println!(
            "| {seed} | **mean** | {:.1}% {} | {:.1}% {} | **{:+.1}** {} |",
            percent(&s["mean_before"]),
            interval(&s["mean_before_interval"], false),
            percent(&s["mean_after"]),
            interval(&s["mean_after_interval"], false),
            percent(&s["mean_gain"]),
            interval(&s["mean_gain_interval"], true),
        );
        verdicts.push((
            *seed,
            percent(&s["mean_gain"]),
            worst_loss,
            s["wall_seconds"].as_f64().unwrap_or(f64::NAN),
        ));
    }
    let gains: Vec<f64> = verdicts.iter().map(|v| v.1).collect();
    let mean_gain = gains.iter().sum::<f64>() / gains.len() as f64;
    let (lo, hi) = gains
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &g| {
            (a.min(g), b.max(g))
        });
    println!(
        "\nmean gain over seeds {mean_gain:+.1} points (lowest {lo:+.1}, highest {hi:+.1}).\n"
    );
    println!("| seed | mean gain | worst environment | wall time | promise |");
    println!("|---|---|---|---|---|");
    for (seed, gain, worst_loss, wall) in &verdicts {
        let mut missed = vec![];
        if *gain < MIN_GAIN_POINTS {
            missed.push(format!("gain below {MIN_GAIN_POINTS}"));
        }
        if *worst_loss > MAX_ENV_LOSS_POINTS {
            missed.push(format!(
                "an environment lost more than {MAX_ENV_LOSS_POINTS} points"
            ));
        }
        if *wall > MAX_WALL_SECONDS {
            missed.push("longer than 15 minutes".to_string());
        }
        println!(
            "| {seed} | {gain:+.1} | {:+.1} | {:.0} s | {} |",
            -worst_loss,
            wall,
            if missed.is_empty() {
                "met".to_string()
            } else {
                format!("missed: {}", missed.join(", "))
            }
        );
    }
}
