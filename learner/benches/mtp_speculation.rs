//! MTP speculative decoding with a trained head against plain decoding, in one run.
//!
//! `cargo bench -p chorus-learner --bench mtp_speculation -- [MODEL.json] [--steps N]
//! [--drafts 1,2,3] [--new N] [--train N] [--sft N] [--threads 1,2]`
//!
//! The model (default `configs/models/nano-1.5m.json`, random weights from seed 0) writes its
//! own greedy continuations of `--train` seeded prompts (96 by default; batched, 64 at a time);
//! with `--sft N` the whole model is first trained for N steps on generated worked-arithmetic
//! text (byte-level), so that it writes text with the structure a trained policy's output has
//! and the prompts are beginnings of such lines (a random model writes noise, which no head
//! can predict: 12% acceptance on `small-d512` without it);
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
                 than steps x 16 the head sees each more than once and can learn them by heart
  --threads LIST measure generation with each of these thread counts (default: the pool's);
                 training always uses every thread
  --sft N        first train the whole model N steps (8 x 128 tokens each) on generated
                 worked-arithmetic text, so that it writes text a head can learn to predict,
                 not a random model's noise (default 0: random weights)";

struct Args {
    model: PathBuf,
    steps: usize,
    drafts: Vec<usize>,
    new_tokens: usize,
    train: usize,
    sft: usize,
    threads: Vec<usize>,
}

fn parse_args() -> Args {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut a = Args {
        model: root.join("configs/models/nano-1.5m.json"),
        steps: 150,
        drafts: vec![1, 2, 3],
        new_tokens: 64,
        train: 96,
        sft: 0,
        threads: vec![],
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
            "--sft" => {
                a.sft = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("--sft needs a whole number of steps\n\n{HELP}"))
            }
            "--threads" => {
                a.threads = it
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(|k| number("--threads", Some(k.to_string())))
                    .collect()
            }
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

/// Prompt `i` for a model of vocabulary size `v`.
type PromptFn = fn(usize, usize) -> Vec<u32>;

/// A seeded xorshift stream.
struct Seeded(u64);

impl Seeded {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// One line of worked arithmetic, the kind of text a math policy writes: stock phrases around
/// numbers, e.g. `We add 37 and 48. 37 + 48 = 85, so the answer is 85.`
fn arithmetic_line(rng: &mut Seeded) -> String {
    let (a, b) = (rng.below(90) + 10, rng.below(90) + 10);
    let (verb, sign, value) = match rng.below(3) {
        0 => ("add", "+", a + b),
        1 => ("subtract", "-", a.max(b) - a.min(b)),
        _ => ("multiply", "*", a * b),
    };
    let (a, b) = if sign == "-" {
        (a.max(b), a.min(b))
    } else {
        (a, b)
    };
    format!("We {verb} {a} and {b}. {a} {sign} {b} = {value}, so the answer is {value}.\n")
}

/// The byte-level ids of `text` (the special tokens come first, then the 256 bytes).
fn byte_ids(text: &str) -> Vec<u32> {
    let offset = chorus_model::tokenizer::SPECIAL_TOKENS.len() as u32;
    text.bytes().map(|b| offset + b as u32).collect()
}

/// `seq` tokens of arithmetic lines from `seed`, after a `<s>`.
fn arithmetic_text(seed: u64, seq: usize) -> Vec<u32> {
    let mut rng = Seeded::new(seed);
    let mut ids = vec![1];
    while ids.len() < seq {
        ids.extend(byte_ids(&arithmetic_line(&mut rng)));
    }
    ids.truncate(seq);
    ids
}

/// The beginning of an arithmetic line (up to its first number), after a `<s>`: a prompt whose
/// continuation a model trained by `--sft` writes in the lines' form.
fn arithmetic_prompt(seed: u64) -> Vec<u32> {
    let line = arithmetic_line(&mut Seeded::new(seed));
    let cut = line.find(" and ").expect("every line names two numbers");
    std::iter::once(1).chain(byte_ids(&line[..cut])).collect()
}

/// A trainer (peak learning rate `peak_lr`) on a copy of `params`, which stay as they are.
fn trainer_on_copy(cfg: &NemotronHConfig, params: &Params, peak_lr: f64) -> Trainer {
    let copy = Params::from_tensors(params.snapshot().unwrap(), &Device::Cpu).unwrap();
    let config = LearnerConfig {
        schedule: LrSchedule {
            peak_lr,
            ..Default::default()
        },
        ..Default::default()
    };
    Trainer::new(cfg.clone(), copy, config).unwrap()
}

/// Trains every parameter of `params` for `steps` SFT steps of 8 x 128 tokens of arithmetic
/// text; returns the trained parameters.
fn teach_text(cfg: &NemotronHConfig, params: &Params, steps: usize) -> Params {
    let mut trainer = trainer_on_copy(cfg, params, 2e-3);
    let started = Instant::now();
    let mut last = 0.0;
    for step in 0..steps {
        let batch: Vec<SftSequence> = (0..8)
            .map(|j| SftSequence {
                tokens: arithmetic_text((step * 8 + j) as u64, 128),
                prompt_len: 1,
                loss_mask: None,
            })
            .collect();
        last = trainer.sft_step(&batch).unwrap().stats.loss;
        if (step + 1) % 25 == 0 {
            eprintln!(
                "  text training: step {} of {steps}, loss {last:.3}",
                step + 1
            );
        }
    }
    println!(
        "(model trained to write arithmetic text: {steps} SFT steps of 8 x 128 tokens in {:.0} s, last loss {last:.3})",
        started.elapsed().as_secs_f64()
    );
    Params::from_tensors(trainer.params().snapshot().unwrap(), &Device::Cpu).unwrap()
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
    if a.threads.is_empty() {
        return measure_here(label, engine, prompts, a);
    }
    for &threads in &a.threads {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("a thread pool for the measurement");
        let label = format!("{label} {threads}t");
        pool.install(|| measure_here(&label, engine, prompts, a));
    }
}

/// [`measure`] on the current thread pool. Plain decoding and each draft length are timed in
/// turn, three rounds, and each keeps its best round: a ratio then compares runs made minutes
/// apart at most, not a plain run at the start with a speculative one at the end.
fn measure_here(label: &str, engine: &Engine, prompts: &[Vec<u32>], a: &Args) {
    let plain_tokens: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| engine.generate(&request(p.clone(), a.new_tokens)).unwrap())
        .map(|g| g.tokens)
        .collect();
    // Mode 0 is plain decoding, mode k drafts k tokens a round.
    let modes: Vec<usize> = std::iter::once(0).chain(a.drafts.iter().copied()).collect();
    let mut best = vec![0f64; modes.len()];
    let mut counts = vec![(0usize, 0usize); modes.len()];
    for _round in 0..3 {
        for (m, &k) in modes.iter().enumerate() {
            let t = Instant::now();
            let (mut drafted, mut accepted, mut n) = (0, 0, 0);
            for (p, want) in prompts.iter().zip(&plain_tokens) {
                let req = request(p.clone(), a.new_tokens);
                if k == 0 {
                    n += engine.generate(&req).unwrap().tokens.len();
                    continue;
                }
                let g = engine.generate_speculative(&req, k).unwrap();
                assert_eq!(&g.tokens, want, "greedy speculation changed the output");
                let stats = g.mtp.expect("speculative generation reports its drafts");
                (drafted, accepted, n) = (
                    drafted + stats.drafted,
                    accepted + stats.accepted,
                    n + g.tokens.len(),
                );
            }
            best[m] = best[m].max(n as f64 / t.elapsed().as_secs_f64());
            counts[m] = (drafted, accepted);
        }
    }
    let plain = best[0];
    println!(
        "{label:<13} {:>6} {plain:>12.0} {:>12} {:>10}",
        "plain", "", "1.00x"
    );
    for (m, &k) in modes.iter().enumerate().skip(1) {
        let (drafted, accepted) = counts[m];
        println!(
            "{label:<13} {:>6} {:>12.0} {:>11.0}% {:>9.2}x   (a pass of {} tokens costs {:.2} passes of 1)",
            format!("k={k}"),
            best[m],
            100.0 * accepted as f64 / drafted.max(1) as f64,
            best[m] / plain,
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
    println!(
        "allocator: {}",
        chorus_model::allocator::keep_freed_memory()
    );
    let cfg = NemotronHConfig::from_file(&a.model)
        .unwrap_or_else(|e| panic!("reading {}: {e}", a.model.display()));
    assert!(
        cfg.has_mtp(),
        "{} has no MTP head (num_nextn_predict_layers = 0)",
        a.model.display()
    );
    let params = checkpoint::init_params(&cfg, 0, &Device::Cpu).unwrap();
    let v = cfg.vocab_size;
    let text = a.sft > 0;
    if text {
        assert!(
            v >= chorus_model::tokenizer::BYTE_LEVEL_VOCAB,
            "--sft writes byte-level text: the model's vocabulary ({v}) must hold the byte-level tokenizer's {}",
            chorus_model::tokenizer::BYTE_LEVEL_VOCAB
        );
    }
    println!("cpu: {}", chorus_kernels::cpu_description());
    println!(
        "model: {} ({} parameters), greedy, batch 1, {} new tokens",
        a.model.display(),
        params.num_elements(),
        a.new_tokens
    );

    let params = if text {
        teach_text(&cfg, &params, a.sft)
    } else {
        params
    };
    // Far from the training prompts' seeds, whatever `--train` is.
    let (train_prompt, heldout_seed): (PromptFn, usize) = if text {
        (|i, _| arithmetic_prompt((1 << 40) + i as u64), 1 << 41)
    } else {
        (prompt, 1 << 32)
    };
    let engine = Engine::from_params(&cfg, &params).unwrap();
    let started = Instant::now();
    let prompts: Vec<Vec<u32>> = (0..a.train).map(|i| train_prompt(i, v)).collect();
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
    let heldout: Vec<Vec<u32>> = (0..16).map(|i| train_prompt(heldout_seed + i, v)).collect();
    if text {
        let tokenizer = chorus_model::tokenizer::Tokenizer::byte_level();
        let sample = engine.generate(&request(heldout[0].clone(), 64)).unwrap();
        println!(
            "(a held-out prompt and its greedy continuation: {:?})",
            tokenizer
                .decode(&[heldout[0].clone(), sample.tokens].concat(), true)
                .unwrap()
        );
    }

    println!(
        "{:<13} {:>6} {:>12} {:>12} {:>10}",
        "head", "mode", "tokens/s", "acceptance", "vs plain"
    );
    measure("untrained", &engine, &heldout, &a);

    let mut trainer = trainer_on_copy(&cfg, &params, 3e-3);
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
