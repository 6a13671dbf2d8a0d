//! Generation and training throughput of the policy, side by side in one run.
//!
//! `cargo bench -p chorus-model --bench throughput [-- --quick] [-- --no-train]`
//!
//! For each model (the tiny_a HF fixture and configs/models/nano-1.5m.json): generation tokens/s
//! at batch 1 and batch 64 through the incremental engine (greedy, fixed prompt), generation
//! with MTP speculation where the model has a head, and training tokens/s (full forward +
//! backward of next-token cross-entropy on candle).

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use chorus_model::engine::Engine;
use chorus_model::{NemotronH, NemotronHConfig, Params, checkpoint};

mod support;
#[path = "support/training.rs"]
mod training_support;
use support::{request, tokens_per_second};
use training_support::{training_batch, training_tokens_per_second};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Best of `reps` runs of `f`, which returns how many tokens it produced.
fn best_rate(reps: usize, mut f: impl FnMut() -> usize) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            let n = f();
            n as f64 / t.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

fn bench_model(name: &str, cfg: &NemotronHConfig, params: &Params, quick: bool) {
    let engine = Engine::from_params(cfg, params).unwrap();
    let v = cfg.vocab_size;
    let reps = if quick { 1 } else { 3 };
    let new = if quick { 32 } else { 128 };
    let b1 = tokens_per_second(&engine, 1, 16, new, reps);
    let b64 = tokens_per_second(&engine, 64, 16, new, reps);
    let spec = if engine.has_mtp() {
        let k = cfg.chorus.mtp_depth.max(1);
        let mut rate = 0.0;
        let r = best_rate(reps, || {
            let g = engine
                .generate_speculative(&request(0, 16, new, v), k)
                .unwrap();
            rate = g.mtp.unwrap().acceptance_rate();
            g.tokens.len()
        });
        format!("{r:>10.0} (k={k}, acceptance {:.0}%)", 100.0 * rate)
    } else {
        format!("{:>10}", "no head")
    };

    if std::env::args().any(|a| a == "--no-train") {
        println!(
            "{name:<12} {:>9} {:>12.0} {:>12.0} {spec}",
            params.num_elements(),
            b1,
            b64
        );
        return;
    }
    let model = NemotronH::new(cfg, params).unwrap();
    let train = training_tokens_per_second(&model, &training_batch(8, 64, v), reps);
    println!(
        "{name:<12} {:>9} {:>12.0} {:>12.0} {spec} {:>14.0}",
        params.num_elements(),
        b1,
        b64,
        train
    );
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    println!(
        "allocator: {}",
        chorus_model::allocator::keep_freed_memory()
    );
    println!("threads: {} (rayon)", rayon::current_num_threads());
    println!(
        "{:<12} {:>9} {:>12} {:>12} {:>40} {:>14}",
        "model", "params", "gen b=1 t/s", "gen b=64 t/s", "gen b=1 MTP t/s", "train t/s"
    );
    let dir = root().join("tests/fixtures/nemotron_h/tiny_a");
    let (cfg, params) = checkpoint::load_checkpoint(&dir, &Device::Cpu).unwrap();
    bench_model("tiny_a", &cfg, &params, quick);
    let cfg = NemotronHConfig::from_file(root().join("configs/models/nano-1.5m.json")).unwrap();
    let params = checkpoint::init_params(&cfg, 0, &Device::Cpu).unwrap();
    bench_model("nano-1.5m", &cfg, &params, quick);
}
