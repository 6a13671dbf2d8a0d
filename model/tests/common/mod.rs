//! Helpers shared by the model's integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use chorus_model::{NemotronHConfig, Params, checkpoint};

pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/nemotron_h")
        .join(name)
}

pub fn load_fixture(name: &str) -> (NemotronHConfig, Params, BTreeMap<String, Tensor>) {
    let dir = fixture_dir(name);
    let (cfg, params) = checkpoint::load_checkpoint(&dir, &Device::Cpu).unwrap();
    let reference =
        checkpoint::load_tensors(&dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    (cfg, params, reference)
}

pub fn ids_of(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_dtype(candle_core::DType::I64)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(|x| x as u32).collect())
        .collect()
}

/// A small config with every block kind, two groups, a latent MoE and an MTP head.
pub fn small_config(pattern: &str, latent: Option<usize>, mtp: bool) -> NemotronHConfig {
    let latent = latent
        .map(|l| l.to_string())
        .unwrap_or_else(|| "null".into());
    let mtp = if mtp { 1 } else { 0 };
    NemotronHConfig::from_json_str(&format!(
        r#"{{"model_type": "nemotron_h", "vocab_size": 40, "hidden_size": 32,
        "hybrid_override_pattern": "{pattern}", "mamba_num_heads": 4, "mamba_head_dim": 8,
        "ssm_state_size": 8, "n_groups": 2, "conv_kernel": 3, "chunk_size": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 48,
        "n_routed_experts": 6, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
        "moe_shared_expert_intermediate_size": 24, "moe_latent_size": {latent},
        "routed_scaling_factor": 2.5, "num_nextn_predict_layers": {mtp}, "eos_token_id": 2}}"#
    ))
    .unwrap()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Random weights with larger scale than the init default, so that every path matters.
pub fn random_params(cfg: &NemotronHConfig, seed: u64) -> Params {
    use rand::{Rng, SeedableRng, rngs::StdRng};
    let mut rng = StdRng::seed_from_u64(seed);
    let p = checkpoint::init_params(cfg, seed, &Device::Cpu).unwrap();
    let mut bumped = BTreeMap::new();
    for (name, var) in p.vars() {
        let t = var.as_tensor();
        let mut noise = |scale: f32| -> Tensor {
            let v: Vec<f32> = (0..t.elem_count())
                .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
                .collect();
            Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap()
        };
        // dt_bias near 0 as in the HF fixture, so that dt stays clear of its clamp.
        let v = if name.ends_with("dt_bias") {
            noise(1.0)
        } else if name.ends_with("A_log") || name.ends_with(".D") || name.contains("norm") {
            (t + noise(0.3)).unwrap()
        } else if name.ends_with("e_score_correction_bias") {
            noise(0.05)
        } else {
            noise(0.15)
        };
        bumped.insert(name.clone(), v);
    }
    p.assign_from(&bumped).unwrap();
    p
}
