//! Batched generation on Chorus' engine: tokens/s at several batch sizes, f32 and NVFP4
//! weights (NVFP4 also with int8 activations, `nvfp4-int8`), and each batch size's speed-up
//! over batch 1, all measured in one run.
//!
//! `cargo bench -p chorus-model --bench generation -- [MODEL.json | --checkpoint DIR]
//! [--batches 1,16,64] [--new N] [--prompt N] [--precision f32,nvfp4,nvfp4-int8] [--repeats N]
//! [--json OUT]`
//!
//! The model has random weights from seed 0 (default `configs/models/small-d512.json`), or is
//! read from an HF-layout checkpoint (the peers benchmark, `benches/peers/`, passes the
//! checkpoint it also converts for llama.cpp and loads in PyTorch). Every
//! request has its own prompt (greedy), all requests are submitted at once and run with
//! continuous batching (`max_batch` = the batch size), so a batch of 64 keeps 64 sequences in
//! flight. Prints the CPU and the instruction set the kernels dispatch to.

mod support;

use std::path::PathBuf;

use candle_core::Device;
use chorus_model::engine::{Engine, EngineOptions, Nvfp4Policy};
use chorus_model::{NemotronHConfig, checkpoint};
use support::tokens_per_second;

struct Args {
    model: PathBuf,
    checkpoint: Option<PathBuf>,
    write_checkpoint: Option<PathBuf>,
    json: Option<PathBuf>,
    batches: Vec<usize>,
    new_tokens: usize,
    prompt: usize,
    precisions: Vec<String>,
    repeats: usize,
}

const HELP: &str = "generation bench: tokens/s of Chorus' engine at several batch sizes

  cargo bench -p chorus-model --bench generation -- [MODEL.json] [options]

  MODEL.json      a Nemotron-H config (default configs/models/small-d512.json), random weights
  --checkpoint D  an HF-layout checkpoint folder to measure instead (`chorus model init` writes one)
  --json OUT      also write the results as JSON to OUT
  --write-checkpoint D  write MODEL.json's seed-0 weights to D as an HF-layout checkpoint
                  and stop (the peers benchmark gives every engine these weights)
  --batches LIST  batch sizes, comma-separated (default 1,16,64)
  --new N         new tokens per sequence (default 64)
  --prompt N      prompt tokens per sequence (default 16)
  --precision L   comma-separated from f32, nvfp4 and nvfp4-int8 (NVFP4 weights, activations
                  rounded to int8: every step with AVX2 or AVX-512, else decode steps of up to 64
                  sequences; default f32,nvfp4)
  --repeats N     runs per cell; the best is printed (default 2)";

fn parse_args() -> Args {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut args = Args {
        model: root.join("configs/models/small-d512.json"),
        checkpoint: None,
        write_checkpoint: None,
        json: None,
        batches: vec![1, 16, 64],
        new_tokens: 64,
        prompt: 16,
        precisions: vec!["f32".into(), "nvfp4".into()],
        repeats: 2,
    };
    let mut it = std::env::args().skip(1);
    let number = |flag: &str, v: Option<String>| -> usize {
        v.and_then(|v| v.parse().ok())
            .filter(|&n: &usize| n > 0)
            .unwrap_or_else(|| panic!("{flag} needs a positive whole number\n\n{HELP}"))
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--bench" => {}
            "-h" | "--help" => {
                println!("{HELP}");
                std::process::exit(0);
            }
            "--batches" => {
                let v = it.next().unwrap_or_default();
                args.batches = v
                    .split(',')
                    .map(|b| number("--batches", Some(b.to_string())))
                    .collect();
            }
            "--checkpoint" => args.checkpoint = Some(existing(&root, &flag_value(&a, it.next()))),
            "--write-checkpoint" => {
                args.write_checkpoint = Some(PathBuf::from(flag_value(&a, it.next())))
            }
            "--json" => args.json = Some(PathBuf::from(flag_value(&a, it.next()))),
            "--new" => args.new_tokens = number("--new", it.next()),
            "--prompt" => args.prompt = number("--prompt", it.next()),
            "--repeats" => args.repeats = number("--repeats", it.next()),
            "--precision" => {
                args.precisions = it
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(|p| match p {
                        "f32" | "nvfp4" | "nvfp4-int8" => p.to_string(),
                        other => panic!(
                            "--precision {other:?}: use a comma-separated list of f32, nvfp4 \
                             and nvfp4-int8"
                        ),
                    })
                    .collect()
            }
            other if other.starts_with("--") => panic!("unknown option {other}\n\n{HELP}"),
            // Cargo runs benches inside the package; a path given from the repository root
            // is found there too.
            path => args.model = existing(&root, path),
        }
    }
    args
}

fn flag_value(flag: &str, value: Option<String>) -> String {
    value.unwrap_or_else(|| panic!("{flag} needs a value\n\n{HELP}"))
}

/// `path` as given, or under the repository root: cargo runs benches inside the package.
fn existing(root: &std::path::Path, path: &str) -> PathBuf {
    [PathBuf::from(path), root.join(path)]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(path))
}

fn main() {
    let a = parse_args();
    let allocator = chorus_model::allocator::keep_freed_memory();
    let (source, cfg, params) = match &a.checkpoint {
        Some(dir) => {
            let (cfg, params) = checkpoint::load_checkpoint(dir, &Device::Cpu)
                .unwrap_or_else(|e| panic!("reading the checkpoint {}: {e}", dir.display()));
            (dir, cfg, params)
        }
        None => {
            let cfg = NemotronHConfig::from_file(&a.model)
                .unwrap_or_else(|e| panic!("reading {}: {e}", a.model.display()));
            let params = checkpoint::init_params(&cfg, 0, &Device::Cpu).unwrap();
            (&a.model, cfg, params)
        }
    };
    if let Some(dir) = &a.write_checkpoint {
        checkpoint::save_checkpoint(dir, &cfg, &params, None)
            .unwrap_or_else(|e| panic!("writing the checkpoint {}: {e}", dir.display()));
        println!(
            "wrote {} as a checkpoint to {}",
            source.display(),
            dir.display()
        );
        return;
    }
    let tensors = params.snapshot().unwrap();
    let cpu = chorus_kernels::cpu_description();
    println!("cpu: {cpu}");
    println!("threads: {}", rayon::current_num_threads());
    println!("allocator: {allocator}");
    println!(
        "model: {} ({} parameters), prompt {} tokens, {} new tokens per sequence, greedy",
        source.display(),
        params.num_elements(),
        a.prompt,
        a.new_tokens
    );
    println!(
        "{:<10} {:>6} {:>12} {:>14}",
        "precision", "batch", "tokens/s", "vs batch 1"
    );
    let mut rows = Vec::new();
    for precision in &a.precisions {
        let opts = EngineOptions {
            nvfp4: precision.starts_with("nvfp4").then(Nvfp4Policy::default),
            int8_activations: precision == "nvfp4-int8",
            ..Default::default()
        };
        let engine = Engine::from_tensors_with(&cfg, &tensors, &opts).unwrap();
        let mut batch1 = None;
        for &b in &a.batches {
            let r = tokens_per_second(&engine, b, a.prompt, a.new_tokens, a.repeats);
            if b == 1 {
                batch1 = Some(r);
            }
            let ratio = batch1.map_or(format!("{:>14}", "-"), |b1| format!("{:>13.2}x", r / b1));
            println!("{precision:<10} {b:>6} {r:>12.0} {ratio}");
            rows.push(serde_json::json!({
                "precision": precision, "batch": b, "tokens_per_second": r,
            }));
        }
    }
    if let Some(out) = &a.json {
        let report = serde_json::json!({
            "engine": "chorus",
            "cpu": cpu,
            "threads": rayon::current_num_threads(),
            "allocator": allocator.to_string(),
            "model": source,
            "parameters": params.num_elements(),
            "prompt": a.prompt,
            "new": a.new_tokens,
            "generation": rows,
        });
        std::fs::write(out, serde_json::to_string_pretty(&report).unwrap())
            .unwrap_or_else(|e| panic!("writing {}: {e}", out.display()));
    }
}
