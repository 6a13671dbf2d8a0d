//! Generation with NVFP4 weights against f32 weights, side by side in one run.
//!
//! `cargo bench -p chorus-model --bench nvfp4_generation`
//!
//! For configs/models/nano-1.5m.json and configs/models/small-d512.json (random weights, seed 0):
//! greedy generation tokens/s at batch 1 and batch 16 with every projection in f32 and with
//! projections quantized to NVFP4 on load (embeddings, lm_head, router gates and norms stay f32),
//! plus the bytes of projection weights each decode step reads.

mod support;

use std::path::PathBuf;

use candle_core::Device;
use chorus_model::engine::{Engine, EngineOptions, Nvfp4Policy};
use chorus_model::{NemotronHConfig, checkpoint};
use support::tokens_per_second;

fn main() {
    println!(
        "allocator: {}",
        chorus_model::allocator::keep_freed_memory()
    );
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    println!(
        "{:<12} {:>10} {:>8} {:>12} {:>12} {:>8} {:>14} {:>14}",
        "model", "params", "batch", "f32 t/s", "nvfp4 t/s", "ratio", "f32 MiB", "nvfp4 MiB"
    );
    for name in ["nano-1.5m", "small-d512"] {
        let cfg =
            NemotronHConfig::from_file(root.join(format!("configs/models/{name}.json"))).unwrap();
        let params = checkpoint::init_params(&cfg, 0, &Device::Cpu).unwrap();
        let tensors = params.snapshot().unwrap();
        let dense = Engine::from_tensors(&cfg, &tensors).unwrap();
        let opts = EngineOptions {
            nvfp4: Some(Nvfp4Policy::default()),
            ..Default::default()
        };
        let q = Engine::from_tensors_with(&cfg, &tensors, &opts).unwrap();
        let mib = |e: &Engine| e.weight_bytes() as f64 / (1 << 20) as f64;
        for (batch, n) in [(1, 64), (16, 32)] {
            let (a, b) = (
                tokens_per_second(&dense, batch, 16, n, 2),
                tokens_per_second(&q, batch, 16, n, 2),
            );
            println!(
                "{name:<12} {:>10} {batch:>8} {a:>12.0} {b:>12.0} {:>7.2}x {:>14.1} {:>14.1}",
                params.num_elements(),
                b / a,
                mib(&dense),
                mib(&q)
            );
        }
    }
}
