//! MTP speculative decoding with a trained head against plain decoding, in one run.
//!
//! `cargo bench -p chorus-learner --bench mtp_speculation -- [MODEL.json] [--steps N]
//! [--drafts 1,2,3] [--new N] [--train N]`
//!
//! The model (default `configs/models/nano-1.5m.json`, random weights from seed 0) writes its
//! own greedy continuations of `--train` seeded prompts (96 by default; batched, 64 at a time);
//! the MTP head alone is then trained on them for `--steps` steps (`Trainer::mtp_step`, as an
//! `mtp_heal` stage does: the backbone frozen). On 16 other prompts (seeds from 2^32 up), greedy
//! generation at batch 1 runs plain and with speculation (the head drafting `k` tokens a
//! round), with the untrained and with the trained head. Greedy speculation must give exactly
//! the plain tokens, so the benchmark checks that; it prints tokens/s, the acceptance rate and
//! the speed-up over plain decoding.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use chorus_learner::{LearnerConfig, LrSchedule, SftSequence, Trainer};
use chorus_model::engine::{Engine, GenerationRequest, LogitsFor, StepInput};
use chorus_model::sampling::SamplingParams;
use chorus_model::{NemotronHConfig, Params, checkpoint};

const HELP: &str = "mtp_speculation bench: speculative decoding with a trained MTP head

  cargo bench -p chorus-learner --bench mtp_speculation -- [MODEL.json] [options]

  MODEL.json     a Nemotron-H config with an MTP head (default configs/models/nano-1.5m.json)
  --steps N      head-only training steps (default 150)
  --drafts LIST  draft lengths to measure, comma-separated (default 1,2,3)
  --new N        new tokens per generation (default 64)
  --train N      prompts whose continuations the head trains on (default 96); with fewer
                 than steps x 16 the head sees each more than once and can learn them by heart";

struct Args {
    model: PathBuf,
    steps: usize,
    drafts: Vec<usize>,
    new_tokens: usize,
    train: usize,
}

fn parse_args() -> Args {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut a = Args {
        model: root.join("configs/models/nano-1.5m.json"),
        steps: 150,
        drafts: vec![1, 2, 3],
        new_tokens: 64,
        train: 96,
    };
    let number = |flag: &str, v: Option<String>| -> usize {
        v.and_then(|v| v.parse().ok())
            .filter(|&n: &usize| n > 0)
            .unwrap_or_else(|| panic!("{flag} needs a positive whole number\n\n{HELP}"))
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--bench" => {}
            "-h" | "--help" => {
                println!("{HELP}");
                std::process::exit(0);
            }
            "--steps" => a.steps = number("--steps", it.next()),
            "--new" => a.new_tokens = number("--new", it.next()),
            "--train" => a.train = number("--train", it.next()),
            "--drafts" => {
                a.drafts = it
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(|k| number("--drafts", Some(k.to_string())))
                    .collect()
            }
            other if other.starts_with("--") => panic!("unknown option {other}\n\n{HELP}"),
            // Cargo runs benches inside the package; a path given from the repository root is
            // found there too.
            path => {
                a.model = [PathBuf::from(path), root.join(path)]
                    .into_iter()
                    .find(|p| p.exists())
                    .unwrap_or_else(|| PathBuf::from(path))
            }
        }
    }
    a
}

fn prompt(i: usize, vocab: usize) -> Vec<u32> {
    // Seeded prompts of 8 tokens from the non-special ids.
    let mut s = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..8)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % (vocab as u64 - 3) + 3) as u32
        })
        .collect()
}

fn request(prompt: Vec<u32>, n: usize) -> GenerationRequest {
    GenerationRequest {
        prompt,
        max_new_tokens: n,
        sampling: SamplingParams::greedy(),
        seed: 0,
        stop_tokens: vec![],
    }
}

/// Plain and speculative greedy generation on `prompts`, one at a time (batch 1): prints
/// tokens/s, acceptance and speed-up for each draft length, and checks that speculation
/// changed no token.
fn measure(label: &str, engine: &Engine, prompts: &[Vec<u32>], a: &Args) {
    let time = |f: &mut dyn FnMut() -> usize| {
        // Best of two, against a busy machine.
        (0..2)
            .map(|_| {
                let t = Instant::now();
                let n = f();
                n as f64 / t.elapsed().as_secs_f64()
            })
            .fold(0.0, f64::max)
    };
    let mut plain_tokens = vec![];
    let plain = time(&mut || {
        plain_tokens = prompts
            .iter()
            .map(|p| engine.generate(&request(p.clone(), a.new_tokens)).unwrap())
            .map(|g| g.tokens)
            .collect();
        plain_tokens.iter().map(Vec::len).sum()
    });
    println!(
        "{label:<10} {:>6} {plain:>12.0} {:>12} {:>10}",
        "plain", "", "1.00x"
    );
    for &k in &a.drafts {
        let (mut drafted, mut accepted) = (0, 0);
        let rate = time(&mut || {
            let (mut d, mut acc, mut n) = (0, 0, 0);
            for (p, want) in prompts.iter().zip(&plain_tokens) {
                let g = engine
                    .generate_speculative(&request(p.clone(), a.new_tokens), k)
                    .unwrap();
                assert_eq!(&g.tokens, want, "greedy speculation changed the output");
                let stats = g.mtp.expect("speculative generation reports its drafts");
                (d, acc, n) = (d + stats.drafted, acc + stats.accepted, n + g.tokens.len());
            }
            (drafted, accepted) = (d, acc);
            n
        });
        println!(
            "{label:<10} {:>6} {rate:>12.0} {:>11.0}% {:>9.2}x   (a pass of {} tokens costs {:.2} passes of 1)",
            format!("k={k}"),
            100.0 * accepted as f64 / drafted.max(1) as f64,
            rate / plain,
            k + 1,
            verification_cost(engine, &prompts[0], k)
        );
    }
}

/// What one verification pass of `k + 1` tokens (recorded, then all drafts rewound) costs
/// in plain one-token passes, on a cache that holds a prompt: speculation pays only when this
/// is well below `1 + accepted drafts per round`.
fn verification_cost(engine: &Engine, prompt: &[u32], k: usize) -> f64 {
    let pass = |cache: &mut chorus_model::engine::SequenceCache, tokens: &[u32], which, record| {
        engine
            .forward(&mut [StepInput { cache, tokens }], which, record)
            .unwrap();
    };
    let mut cache = engine.new_cache();
    pass(&mut cache, prompt, LogitsFor::Last, false);
    let reps = 20;
    let (one, verify): (Vec<u32>, Vec<u32>) = (vec![prompt[0]], vec![prompt[0]; k + 1]);
    let mut best = (f64::MAX, f64::MAX);
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..reps {
            pass(&mut cache, &one, LogitsFor::Last, false);
        }
        best.0 = best.0.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        for _ in 0..reps {
            pass(&mut cache, &verify, LogitsFor::All, true);
            engine.rewind(&mut cache, k);
        }
        best.1 = best.1.min(t.elapsed().as_secs_f64());
    }
    best.1 / best.0
}

fn main() {
    let a = parse_args();
    let cfg = NemotronHConfig::from_file(&a.model)
        .unwrap_or_else(|e| panic!("reading {}: {e}", a.model.display()));
    assert!(
        cfg.has_mtp(),
        "{} has no MTP head (num_nextn_predict_layers = 0)",
        a.model.display()
    );
    let params = checkpoint::init_params(&cfg, 0, &Device::Cpu).unwrap();
    let v = cfg.vocab_size;
    println!("cpu: {}", chorus_kernels::cpu_description());
    println!(
        "model: {} ({} parameters), greedy, batch 1, {} new tokens",
        a.model.display(),
        params.num_elements(),
        a.new_tokens
    );

    let engine = Engine::from_params(&cfg, &params).unwrap();
    let started = Instant::now();
    let prompts: Vec<Vec<u32>> = (0..a.train).map(|i| prompt(i, v)).collect();
    let requests: Vec<GenerationRequest> = prompts.iter().map(|p| request(p.clone(), 48)).collect();
    let train: Vec<SftSequence> = engine
        .generate_batch(&requests, 64)
        .unwrap()
        .into_iter()
        .zip(prompts)
        .map(|(g, p)| SftSequence {
            prompt_len: p.len(),
            tokens: p.into_iter().chain(g.tokens).collect(),
            loss_mask: None,
        })
        .collect();
    println!(
        "(training data: the model's continuations of {} prompts, 48 tokens each, in {:.0} s)",
        a.train,
        started.elapsed().as_secs_f64()
    );
    // Far from the training prompts' seeds, whatever `--train` is.
    let heldout: Vec<Vec<u32>> = (0..16).map(|i| prompt((1 << 32) + i, v)).collect();

    println!(
        "{:<10} {:>6} {:>12} {:>12} {:>10}",
        "head", "mode", "tokens/s", "acceptance", "vs plain"
    );
    measure("untrained", &engine, &heldout, &a);

    let snapshot = Params::from_tensors(params.snapshot().unwrap(), &Device::Cpu).unwrap();
    let config = LearnerConfig {
        schedule: LrSchedule {
            peak_lr: 3e-3,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut trainer = Trainer::new(cfg.clone(), snapshot, config).unwrap();
    let started = Instant::now();
    let mut last = 0.0;
    for step in 0..a.steps {
        let at = (step * 16) % train.len();
        let batch: Vec<SftSequence> = (0..16)
            .map(|j| train[(at + j) % train.len()].clone())
            .collect();
        last = trainer.mtp_step(&batch).unwrap().stats.loss;
        if (step + 1) % 50 == 0 {
            eprintln!(
                "  head training: step {} of {}, loss {last:.3}",
                step + 1,
                a.steps
            );
        }
    }
    println!(
        "(head trained: {} steps of 16 of the model's own continuations in {:.0} s, last loss {last:.3})",
        a.steps,
        started.elapsed().as_secs_f64()
    );
    let trained = Engine::from_params(&cfg, trainer.params()).unwrap();
    measure("trained", &trained, &heldout, &a);
}
