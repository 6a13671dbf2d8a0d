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
    let num: f32 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f32 = a.iter().map(|x| x * x).sum();
    let rel = (num / den).sqrt();
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
