//! NVFP4 weights in the engine: on-load quantization, quantized checkpoints and the f32 model on
//! the dequantized weights all compute the same thing.

mod common;

use candle_core::Device;
use chorus_model::engine::{Engine, EngineOptions, LogitsFor, Nvfp4Policy, StepInput};
use chorus_model::quantize::quantize_checkpoint;
use common::*;

fn logits(engine: &Engine, tokens: &[u32]) -> Vec<f32> {
    let mut cache = engine.new_cache();
    engine
        .forward(
            &mut [StepInput {
                cache: &mut cache,
                tokens,
            }],
            LogitsFor::All,
            false,
        )
        .unwrap()
        .logits
}

fn nvfp4(keep_attention: bool) -> EngineOptions {
    EngineOptions {
        nvfp4: Some(Nvfp4Policy {
            keep_attention,
            exclude: vec![],
        }),
        ..Default::default()
    }
}

#[test]
fn nvfp4_engine_equals_f32_engine_on_dequantized_weights() {
    let dir = fixture_dir("tiny_a");
    let tokens: Vec<u32> = (0..17).map(|i| (i * 37 + 5) % 320).collect();
    let q = Engine::from_checkpoint(&dir, &nvfp4(false)).unwrap();
    assert_eq!(q.nvfp4_projection_count(), (50, 50));

    // The same quantization, expanded back to f32 and run densely.
    let out = tempfile::tempdir().unwrap();
    quantize_checkpoint(&dir, out.path(), &[], |_, _, _| {}).unwrap();
    let (cfg, params) =
        chorus_model::checkpoint::load_checkpoint(out.path(), &Device::Cpu).unwrap();
    let dense = Engine::from_params(&cfg, &params).unwrap();
    assert_eq!(dense.nvfp4_projection_count().0, 0);
    let err = max_abs_diff(&logits(&q, &tokens), &logits(&dense, &tokens));
    assert!(err < 1e-4, "nvfp4 kernel vs dequantized f32: {err}");

    // A quantized checkpoint loads as NVFP4 and matches quantize-on-load exactly.
    let from_file = Engine::from_checkpoint(out.path(), &EngineOptions::default()).unwrap();
    assert_eq!(from_file.nvfp4_projection_count(), (50, 50));
    assert_eq!(logits(&from_file, &tokens), logits(&q, &tokens));

    // Quantization changes the function, but boundedly: each weight carries ~10% RMS error
    // (SQNR ~20 dB), which compounds through tiny_a's six random blocks.
    let f32_engine = Engine::from_checkpoint(&dir, &EngineOptions::default()).unwrap();
    let (a, b) = (logits(&f32_engine, &tokens), logits(&q, &tokens));
    let rel = relative_rms(&a, &b);
    assert!(rel > 1e-3 && rel < 0.5, "relative RMS drift {rel}");
}

#[test]
fn attention_can_stay_in_f32() {
    let q = Engine::from_checkpoint(&fixture_dir("tiny_a"), &nvfp4(true)).unwrap();
    // tiny_a has one attention block: 4 projections stay dense.
    assert_eq!(q.nvfp4_projection_count(), (46, 50));
    let excluded = EngineOptions {
        nvfp4: Some(Nvfp4Policy {
            keep_attention: false,
            exclude: vec!["*.experts.*".into()],
        }),
        ..Default::default()
    };
    let e = Engine::from_checkpoint(&fixture_dir("tiny_a"), &excluded).unwrap();
    assert_eq!(e.nvfp4_projection_count(), (18, 50));
}

#[test]
fn projections_whose_input_is_not_a_multiple_of_16_stay_dense() {
    let cfg = chorus_model::NemotronHConfig::from_json_str(
        r#"{"vocab_size": 40, "hidden_size": 32, "hybrid_override_pattern": "-", "intermediate_size": 40}"#,
    )
    .unwrap();
    let params = random_params(&cfg, 1);
    let e = Engine::from_tensors_with(&cfg, &params.snapshot().unwrap(), &nvfp4(false)).unwrap();
    // up_proj reads 32 inputs (quantized), down_proj reads 40 (kept in f32).
    assert_eq!(e.nvfp4_projection_count(), (1, 2));
    let mut cache = e.new_cache();
    let out = e
        .forward(
            &mut [StepInput {
                cache: &mut cache,
                tokens: &[3, 4, 5],
            }],
            LogitsFor::Last,
            false,
        )
        .unwrap();
    assert!(out.logits.iter().all(|v| v.is_finite()));
}

/// Feeds `tokens` one at a time (decode steps of one row) and returns each step's logits.
fn decoded_logits(engine: &Engine, tokens: &[u32]) -> Vec<f32> {
    let mut cache = engine.new_cache();
    let mut all = vec![];
    for t in tokens {
        let out = engine
            .forward(
                &mut [StepInput {
                    cache: &mut cache,
                    tokens: std::slice::from_ref(t),
                }],
                LogitsFor::Last,
                false,
            )
            .unwrap();
        all.extend(out.logits);
    }
    all
}

fn relative_rms(a: &[f32], b: &[f32]) -> f32 {
    let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f32 = a.iter().map(|x| x * x).sum();
    (num / den).sqrt()
}

/// tiny_a with NVFP4 projections, with f32 activations and with int8 ones.
fn f32_and_int8_engines() -> (Engine, Engine) {
    let dir = fixture_dir("tiny_a");
    let f32_acts = Engine::from_checkpoint(&dir, &nvfp4(false)).unwrap();
    let int8 = Engine::from_checkpoint(
        &dir,
        &EngineOptions {
            int8_activations: true,
            ..nvfp4(false)
        },
    )
    .unwrap();
    (f32_acts, int8)
}

#[test]
fn int8_activations_round_decode_steps_and_keep_sequences_independent() {
    let tokens: Vec<u32> = (0..17).map(|i| (i * 37 + 5) % 320).collect();
    let (f32_acts, int8) = f32_and_int8_engines();

    // Decode steps (one row) go through int8: not the same numbers, but within the rounding.
    // Each projection's inputs carry at most half a step of 1/127 of their block's largest
    // value (a few 1e-3 of its output); through tiny_a's six blocks and 17 steps of recurrent
    // state that measured 1.4e-2 of the logits (the NVFP4 weights themselves move them by
    // 1e-1). A 17-token prefill (17 rows) rounds the same way: 1.4e-2 too.
    for (name, run) in [
        ("decode", decoded_logits as fn(&Engine, &[u32]) -> Vec<f32>),
        ("prefill", logits),
    ] {
        let rel = relative_rms(&run(&f32_acts, &tokens), &run(&int8, &tokens));
        assert!(
            rel > 1e-5 && rel < 5e-2,
            "int8 {name} drifts {rel} from f32 activations"
        );
    }

    // Ragged sequences decoded together give each one's logits alone. Each row is rounded to
    // int8 on its own, so rows never mix; three rows take the int8 matrix-vector kernel in
    // both cases (equal up to the order of f32 sums), six the tiled panel kernel where the
    // CPU has it, against that kernel alone: the f32 sums of the same integers in another
    // order, 1e-4 of the largest logit at most.
    for (n, bound) in [(3, 1e-5), (6, 1e-4)] {
        let worst = ragged_decode_vs_alone(&int8, &tokens, n);
        assert!(
            worst < bound,
            "a sequence decoded in a batch of {n} differs from alone by {worst} of the largest logit"
        );
    }
}

/// Splits `tokens` into `n` ragged prompts, prefills each alone, decodes one more token for all
/// of them in one step and for each alone, and returns the largest difference of logits
/// relative to the largest logit.
fn ragged_decode_vs_alone(engine: &Engine, tokens: &[u32], n: usize) -> f32 {
    let prompts: Vec<&[u32]> = (0..n)
        .map(|i| {
            let (a, b) = (i * tokens.len() / n, (i + 1) * tokens.len() / n);
            &tokens[a..b.max(a + 1)]
        })
        .collect();
    let mut caches: Vec<_> = prompts.iter().map(|_| engine.new_cache()).collect();
    for (cache, p) in caches.iter_mut().zip(&prompts) {
        engine
            .forward(
                &mut [StepInput { cache, tokens: p }],
                LogitsFor::Last,
                false,
            )
            .unwrap();
    }
    let next: Vec<u32> = (0..n as u32).map(|i| 7 + 4 * i).collect();
    let mut inputs: Vec<StepInput> = caches
        .iter_mut()
        .zip(&next)
        .map(|(cache, t)| StepInput {
            cache,
            tokens: std::slice::from_ref(t),
        })
        .collect();
    let together = engine
        .forward(&mut inputs, LogitsFor::Last, false)
        .unwrap()
        .logits;
    let vocab = together.len() / n;
    let largest = together.iter().fold(0f32, |m, v| m.max(v.abs()));
    let mut worst = 0f32;
    for (i, p) in prompts.iter().enumerate() {
        let mut cache = engine.new_cache();
        engine
            .forward(
                &mut [StepInput {
                    cache: &mut cache,
                    tokens: p,
                }],
                LogitsFor::Last,
                false,
            )
            .unwrap();
        let step = engine
            .forward(
                &mut [StepInput {
                    cache: &mut cache,
                    tokens: std::slice::from_ref(&next[i]),
                }],
                LogitsFor::Last,
                false,
            )
            .unwrap()
            .logits;
        worst = worst.max(max_abs_diff(&together[i * vocab..(i + 1) * vocab], &step) / largest);
    }
    worst
}

#[test]
fn int8_activations_round_long_prefills_where_the_panel_kernel_runs() {
    // More rows than a decode step of 64 sequences.
    let tokens: Vec<u32> = (0..80).map(|i| (i * 37 + 5) % 320).collect();
    let (f32_acts, int8) = f32_and_int8_engines();
    let (a, b) = (logits(&f32_acts, &tokens), logits(&int8, &tokens));
    if chorus_kernels::CpuGemm::new(2).has_fast_q8_panels() {
        // Rounded like decode steps (see above): within a few percent, but not equal.
        let rel = relative_rms(&a, &b);
        assert!(
            rel > 1e-5 && rel < 5e-2,
            "an 80-row int8 prefill drifts {rel} from f32 activations"
        );
    } else {
        assert_eq!(
            a, b,
            "without the panel kernel, long prefills keep f32 activations"
        );
    }
}
