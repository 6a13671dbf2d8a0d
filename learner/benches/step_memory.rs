//! The learner's peak memory and step time against `micro_batch_tokens`, side by side in one run.
//!
//! `cargo bench -p chorus-learner --bench step_memory -- [MODEL.json] [--sequences N]
//! [--prompt N] [--completion N] [--steps N] [--limits LIST]`
//!
//! An RL step on a batch shaped like the recipe's SWE-RL steps (128 multi-turn episodes of about
//! 700 tokens, ragged) runs with each token limit in its own process, so each peak resident set
//! (`VmHWM`) is that setting's alone; the table gives the peak and the time per step, and both as
//! a ratio to the first limit (default: one pass per length bucket, as the learner ran before
//! it had the limit).

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use candle_core::Device;
use chorus_learner::{LearnerConfig, RlSequence, Trainer};
use chorus_model::{NemotronHConfig, checkpoint};

const HELP: &str = "step_memory bench: the learner's peak memory and step time per token limit

  cargo bench -p chorus-learner --bench step_memory -- [MODEL.json] [options]

  MODEL.json       a Nemotron-H config (default configs/models/nano-1.5m.json, random weights)
  --sequences N    sequences in the step's batch (default 128)
  --prompt N       prompt tokens per sequence (default 300)
  --completion N   completion tokens per sequence, +-25% (default 400)
  --steps N        RL steps timed per setting, after one untimed (default 2)
  --limits LIST    micro_batch_tokens to compare, comma-separated; 0 means no limit (one
                   pass per length bucket) (default 0,32768,8192,2048)";

struct Args {
    model: PathBuf,
    sequences: usize,
    prompt: usize,
    completion: usize,
    steps: usize,
    limits: Vec<usize>,
    child: Option<usize>,
}

fn parse_args() -> Args {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut a = Args {
        model: root.join("configs/models/nano-1.5m.json"),
        sequences: 128,
        prompt: 300,
        completion: 400,
        steps: 2,
        limits: vec![0, 32768, 8192, 2048],
        child: None,
    };
    let number = |flag: &str, v: Option<String>, least: usize| -> usize {
        v.and_then(|v| v.parse().ok())
            .filter(|&n: &usize| n >= least)
            .unwrap_or_else(|| panic!("{flag} needs a whole number >= {least}\n\n{HELP}"))
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--bench" => {}
            "-h" | "--help" => {
                println!("{HELP}");
                std::process::exit(0);
            }
            "--sequences" => a.sequences = number("--sequences", it.next(), 1),
            "--prompt" => a.prompt = number("--prompt", it.next(), 1),
            "--completion" => a.completion = number("--completion", it.next(), 4),
            "--steps" => a.steps = number("--steps", it.next(), 1),
            "--limits" => {
                let list = it.next().unwrap_or_default();
                a.limits = list
                    .split(',')
                    .map(|v| number("--limits", Some(v.trim().to_string()), 0))
                    .collect();
            }
            "--child" => a.child = Some(number("--child", it.next(), 0)),
            other if other.starts_with('-') => {
                panic!("unknown option {other}\n\n{HELP}")
            }
            path => a.model = PathBuf::from(path),
        }
    }
    a
}

/// The step's batch: ragged completions, a quarter of them masked out in places (observations
/// of a multi-turn episode), advantages of both signs.
fn batch(a: &Args, vocab: usize) -> Vec<RlSequence> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..a.sequences)
        .map(|i| {
            let spread = (a.completion / 2).max(1) as u64;
            let completion = a.completion * 3 / 4 + (next() % spread) as usize;
            let len = a.prompt + completion;
            RlSequence {
                tokens: (0..len)
                    .map(|_| (3 + next() % (vocab as u64 - 3)) as u32)
                    .collect(),
                prompt_len: a.prompt,
                behavior_logprobs: vec![-(vocab as f32).ln(); completion],
                advantage: if i % 2 == 0 { 1.0 } else { -1.0 },
                ref_logprobs: None,
                loss_mask: (i % 4 == 0).then(|| (0..completion).map(|j| j % 50 < 30).collect()),
            }
        })
        .collect()
}

/// Peak resident set of this process so far, in MiB.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// One setting, in this process: prints `seconds_per_step peak_mib`.
fn child(a: &Args, limit: usize) {
    let cfg = NemotronHConfig::from_file(&a.model).expect("model config");
    let params = checkpoint::init_params(&cfg, 0, &Device::Cpu).expect("init");
    let config = LearnerConfig {
        micro_batch_tokens: if limit == 0 { usize::MAX } else { limit },
        ..LearnerConfig::default()
    };
    let batch = batch(a, cfg.vocab_size);
    let mut trainer = Trainer::new(cfg, params, config).expect("trainer");
    trainer.rl_step(&batch).expect("warm-up step");
    let start = Instant::now();
    for _ in 0..a.steps {
        let report = trainer.rl_step(&batch).expect("step");
        assert!(report.skipped.is_none(), "{:?}", report.skipped);
    }
    let per_step = start.elapsed().as_secs_f64() / a.steps as f64;
    println!("{per_step} {}", peak_rss_mib());
}

fn main() {
    let a = parse_args();
    // As the `chorus` binary does: the peak measured is the one a run would see.
    chorus_model::allocator::keep_freed_memory();
    if let Some(limit) = a.child {
        child(&a, limit);
        return;
    }
    let tokens = a.sequences * (a.prompt + a.completion);
    eprintln!(
        "step_memory: {} on {}, {} threads; {} sequences of ~{} tokens (~{tokens} tokens a step)",
        a.model.display(),
        chorus_kernels::cpu_description(),
        rayon::current_num_threads(),
        a.sequences,
        a.prompt + a.completion,
    );
    let exe = std::env::current_exe().expect("own path");
    let mut rows = vec![];
    for &limit in &a.limits {
        let name = if limit == 0 {
            "none (a pass per bucket)".to_string()
        } else {
            limit.to_string()
        };
        eprintln!("  micro_batch_tokens {name} ...");
        let out = Command::new(&exe)
            .arg(&a.model)
            .args(["--sequences", &a.sequences.to_string()])
            .args(["--prompt", &a.prompt.to_string()])
            .args(["--completion", &a.completion.to_string()])
            .args(["--steps", &a.steps.to_string()])
            .args(["--child", &limit.to_string()])
            .output()
            .expect("run a setting");
        let text = String::from_utf8_lossy(&out.stdout);
        let values: Vec<f64> = text
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        let [seconds, peak] = values[..] else {
            panic!(
                "setting {name} printed {text:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        rows.push((name, seconds, peak));
    }
    let (base_seconds, base_peak) = (rows[0].1, rows[0].2);
    println!("| micro_batch_tokens | s/step | vs first | peak RSS (MiB) | vs first |");
    println!("|---|---|---|---|---|");
    for (name, seconds, peak) in &rows {
        println!(
            "| {name} | {seconds:.2} | {:.2}x | {peak:.0} | {:.2}x |",
            seconds / base_seconds,
            peak / base_peak
        );
    }
}
