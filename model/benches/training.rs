//! Training throughput of the policy on candle (CPU): tokens/s of forward + backward of
//! next-token cross-entropy on one `(batch, seq)` batch.
//!
//! `cargo bench -p chorus-model --bench training -- [MODEL.json | --checkpoint DIR]
//! [--batch 8] [--seq 128] [--repeats 3] [--blocks] [--json OUT]`
//!
//! `--blocks` also times forward and backward of one block of each kind on its own (the
//! profile that showed where a step's time goes, block kind by block kind).
//!
//! The peers benchmark (`benches/peers/`) runs it on the checkpoint PyTorch also trains, with
//! the same batch of token ids.

#[path = "support/training.rs"]
mod training_support;

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use chorus_model::{Block, BlockKind, NemotronH, NemotronHConfig, Params, allocator, checkpoint};
use training_support::{training_batch, training_tokens_per_second};

const HELP: &str = "training bench: tokens/s of forward + backward on candle

  cargo bench -p chorus-model --bench training -- [MODEL.json] [options]

  MODEL.json      a Nemotron-H config (default configs/models/small-d512.json), random weights
  --checkpoint D  an HF-layout checkpoint folder to measure instead
  --batch N       sequences per batch (default 8)
  --seq N         tokens per sequence (default 128)
  --repeats N     timed steps after one warm-up; the best is printed (default 3)
  --blocks        also time forward and backward of one block of each kind, alone
  --malloc-defaults  leave glibc malloc's thresholds at their defaults (the `chorus` binary
                  raises them at start-up, as this bench does without this flag)
  --json OUT      also write the result as JSON to OUT";

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let existing = |p: &str| -> PathBuf {
        [PathBuf::from(p), root.join(p)]
            .into_iter()
            .find(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from(p))
    };
    let mut model_path = root.join("configs/models/small-d512.json");
    let (mut checkpoint_dir, mut json): (Option<PathBuf>, Option<PathBuf>) = (None, None);
    let (mut batch, mut seq, mut repeats) = (8usize, 128usize, 3usize);
    let (mut blocks, mut malloc_defaults) = (false, false);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| panic!("{a} needs a value\n\n{HELP}"))
        };
        let number = |v: String| -> usize {
            v.parse()
                .ok()
                .filter(|&n: &usize| n > 0)
                .unwrap_or_else(|| panic!("{a} needs a positive whole number, not {v:?}\n\n{HELP}"))
        };
        match a.as_str() {
            "--bench" => {}
            "-h" | "--help" => {
                println!("{HELP}");
                return;
            }
            "--checkpoint" => checkpoint_dir = Some(existing(&value())),
            "--json" => json = Some(PathBuf::from(value())),
            "--batch" => batch = number(value()),
            "--seq" => seq = number(value()).max(2),
            "--repeats" => repeats = number(value()),
            "--blocks" => blocks = true,
            "--malloc-defaults" => malloc_defaults = true,
            other if other.starts_with("--") => panic!("unknown option {other}\n\n{HELP}"),
            path => model_path = existing(path),
        }
    }
    let (source, cfg, params): (&Path, _, _) = match &checkpoint_dir {
        Some(dir) => {
            let (cfg, params) = checkpoint::load_checkpoint(dir, &Device::Cpu)
                .unwrap_or_else(|e| panic!("reading the checkpoint {}: {e}", dir.display()));
            (dir, cfg, params)
        }
        None => {
            let cfg = NemotronHConfig::from_file(&model_path)
                .unwrap_or_else(|e| panic!("reading {}: {e}", model_path.display()));
            let params = checkpoint::init_params(&cfg, 0, &Device::Cpu).unwrap();
            (&model_path, cfg, params)
        }
    };
    let allocator = if malloc_defaults {
        "glibc malloc with its default thresholds".to_string()
    } else {
        allocator::keep_freed_memory().to_string()
    };
    let cpu = chorus_kernels::cpu_description();
    println!("cpu: {cpu}");
    println!("threads: {}", rayon::current_num_threads());
    println!("allocator: {allocator}");
    println!(
        "model: {} ({} parameters), batch {batch} x {seq} tokens, forward + backward",
        source.display(),
        params.num_elements()
    );
    let model = NemotronH::new(&cfg, &params).unwrap();
    let rate =
        training_tokens_per_second(&model, &training_batch(batch, seq, cfg.vocab_size), repeats);
    println!("training tokens/s: {rate:.0}");
    if blocks {
        print_block_times(&cfg, &params, batch, seq, repeats);
    }
    if let Some(out) = json {
        let report = serde_json::json!({
            "engine": "chorus", "cpu": cpu, "threads": rayon::current_num_threads(),
            "allocator": allocator, "model": source, "parameters": params.num_elements(),
            "training": {"batch": batch, "seq": seq, "tokens_per_second": rate},
        });
        std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap())
            .unwrap_or_else(|e| panic!("writing {}: {e}", out.display()));
    }
}

/// Forward and backward of one block of each kind present, alone, on random `[batch, seq, d]`
/// input (the best of `repeats` after a warm-up), and that times the model's count of them.
fn print_block_times(
    cfg: &NemotronHConfig,
    params: &Params,
    batch: usize,
    seq: usize,
    repeats: usize,
) {
    let layers = params.root().pp("backbone").pp("layers");
    println!("block kind   layers   forward ms   backward ms   x layers ms");
    for (kind, name) in [
        (BlockKind::Mamba, "mamba2"),
        (BlockKind::Attention, "attention"),
        (BlockKind::Moe, "moe"),
        (BlockKind::Mlp, "mlp"),
    ] {
        let Some(index) = cfg.layers.iter().position(|k| *k == kind) else {
            continue;
        };
        let count = cfg.layers.iter().filter(|k| **k == kind).count();
        let block = Block::new(cfg, kind, &layers.pp(index)).unwrap();
        let shape = (batch, seq, cfg.hidden_size);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()).unwrap();
        let weights = Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap();
        let (mut forward, mut backward) = (f64::MAX, f64::MAX);
        for round in 0..=repeats {
            let start = Instant::now();
            let loss = (block.forward(x.as_tensor()).unwrap() * &weights)
                .unwrap()
                .sum_all()
                .unwrap();
            let forward_s = start.elapsed().as_secs_f64();
            let start = Instant::now();
            loss.backward().unwrap();
            // Round 0 is the warm-up.
            if round > 0 {
                forward = forward.min(forward_s);
                backward = backward.min(start.elapsed().as_secs_f64());
            }
        }
        println!(
            "{name:<12} {count:>6} {:>12.1} {:>13.1} {:>13.0}",
            forward * 1e3,
            backward * 1e3,
            (forward + backward) * 1e3 * count as f64
        );
    }
}
