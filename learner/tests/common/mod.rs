//! Helpers shared by the learner's integration tests: a tiny MoE policy, rollouts sampled from
//! it as a worker would, RL sequences and objectives by name.
#![allow(dead_code)]

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use chorus_learner::{LearnerConfig, LrSchedule, Objective, RlSequence, Trainer};
use chorus_model::engine::{Engine, GenerationRequest};
use chorus_model::sampling::SamplingParams;
use chorus_model::{NemotronHConfig, checkpoint};

/// Mamba, attention and a 4-expert top-2 MoE block (`backbone.layers.2`), with an MTP head
/// (attention + MoE) when `mtp`.
pub fn config(mtp: bool) -> NemotronHConfig {
    NemotronHConfig::from_json_str(&format!(
        r#"{{"model_type": "nemotron_h", "vocab_size": 24, "hidden_size": 32,
        "hybrid_override_pattern": "M*E", "mamba_num_heads": 4, "mamba_head_dim": 8,
        "ssm_state_size": 8, "n_groups": 1, "conv_kernel": 4, "chunk_size": 8,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
        "moe_shared_expert_intermediate_size": 16, "routed_scaling_factor": 1.0,
        "num_nextn_predict_layers": {}}}"#,
        u8::from(mtp)
    ))
    .unwrap()
}

/// The routing bias of the backbone's MoE block.
pub const BIAS: &str = "backbone.layers.2.mixer.gate.e_score_correction_bias";
/// The router weight of the backbone's MoE block.
pub const GATE: &str = "backbone.layers.2.mixer.gate.weight";

/// A trainer over the seed-1 initialisation of `config(mtp)` with settings `lc`.
pub fn trainer_with(mtp: bool, lc: LearnerConfig) -> Trainer {
    let cfg = config(mtp);
    let params = checkpoint::init_params(&cfg, 1, &Device::Cpu).unwrap();
    Trainer::new(cfg, params, lc).unwrap()
}

/// A trainer with the default settings at learning rate `lr`.
pub fn trainer(lr: f64) -> Trainer {
    trainer_with(
        false,
        LearnerConfig {
            schedule: LrSchedule {
                peak_lr: lr,
                ..Default::default()
            },
            ..Default::default()
        },
    )
}

/// `n` completions of 6 tokens sampled with the current weights, as a rollout worker would;
/// each rewarded by how often it says token 7 (minus a baseline).
pub fn rollouts(t: &Trainer, n: usize) -> Vec<RlSequence> {
    let engine = Engine::from_params(t.model_config(), t.params()).unwrap();
    (0..n)
        .map(|i| {
            let prompt = vec![3, 4 + (i % 3) as u32];
            let g = engine
                .generate(&GenerationRequest {
                    prompt: prompt.clone(),
                    max_new_tokens: 6,
                    sampling: SamplingParams::default(),
                    seed: i as u64,
                    stop_tokens: vec![],
                })
                .unwrap();
            let hits = g.tokens.iter().filter(|&&x| x == 7).count() as f32;
            RlSequence {
                tokens: prompt.iter().chain(&g.tokens).copied().collect(),
                prompt_len: prompt.len(),
                behavior_logprobs: g.logprobs,
                advantage: hits - 0.5,
                ref_logprobs: None,
                loss_mask: None,
            }
        })
        .collect()
}

/// `Objective::default()` with `settings` applied by name.
pub fn objective(settings: &[(&str, &str)]) -> Objective {
    let mut o = Objective::default();
    for (k, v) in settings {
        o.set(k, v).unwrap();
    }
    o
}

/// The weights as host vectors, by name.
pub fn weights(t: &Trainer) -> BTreeMap<String, Vec<f32>> {
    t.params()
        .snapshot()
        .unwrap()
        .into_iter()
        .map(|(n, w)| (n, w.flatten_all().unwrap().to_vec1().unwrap()))
        .collect()
}

/// Overwrites one parameter.
pub fn set_param(t: &Trainer, name: &str, values: &[f32]) {
    let var = &t.params().vars()[name];
    var.set(&Tensor::from_vec(values.to_vec(), var.dims(), &Device::Cpu).unwrap())
        .unwrap();
}
