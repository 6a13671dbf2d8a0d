//! Training throughput of the policy on candle (CPU): tokens/s of forward + backward of
//! next-token cross-entropy on one `(batch, seq)` batch.
//!
//! `cargo bench -p chorus-model --bench training -- [MODEL.json | --checkpoint DIR]
//! [--batch 8] [--seq 128] [--repeats 3] [--json OUT]`
//!
//! The peers benchmark (`benches/peers/`) runs it on the checkpoint PyTorch also trains, with
//! the same batch of token ids.

#[path = "support/training.rs"]
mod training_support;

use std::path::{Path, PathBuf};

use candle_core::Device;
use chorus_model::{NemotronH, NemotronHConfig, checkpoint};
use training_support::{training_batch, training_tokens_per_second};

const HELP: &str = "training bench: tokens/s of forward + backward on candle

  cargo bench -p chorus-model --bench training -- [MODEL.json] [options]

  MODEL.json      a Nemotron-H config (default configs/models/small-d512.json), random weights
  --checkpoint D  an HF-layout checkpoint folder to measure instead
  --batch N       sequences per batch (default 8)
  --seq N         tokens per sequence (default 128)
  --repeats N     timed steps after one warm-up; the best is printed (default 3)
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
    let cpu = chorus_kernels::cpu_description();
    println!("cpu: {cpu}");
    println!("threads: {}", rayon::current_num_threads());
    println!(
        "model: {} ({} parameters), batch {batch} x {seq} tokens, forward + backward",
        source.display(),
        params.num_elements()
    );
    let model = NemotronH::new(&cfg, &params).unwrap();
    let rate =
        training_tokens_per_second(&model, &training_batch(batch, seq, cfg.vocab_size), repeats);
    println!("training tokens/s: {rate:.0}");
    if let Some(out) = json {
        let report = serde_json::json!({
            "engine": "chorus", "cpu": cpu, "threads": rayon::current_num_threads(),
            "model": source, "parameters": params.num_elements(),
            "training": {"batch": batch, "seq": seq, "tokens_per_second": rate},
        });
        std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap())
            .unwrap_or_else(|e| panic!("writing {}: {e}", out.display()));
    }
}
