//! Training through NVFP4: with `nvfp4_forward` on, the learner's log-probabilities of samples
//! from NVFP4 rollout workers match the workers' own (the sampling mismatch shrinks), every
//! parameter still gets a gradient through the straight-through estimator, and steps move the
//! policy.

use candle_core::Device;
use chorus_learner::*;
use chorus_model::engine::{Engine, EngineOptions, GenerationRequest, Nvfp4Policy};
use chorus_model::sampling::SamplingParams;
use chorus_model::{NemotronH, NemotronHConfig, checkpoint};

/// Every projection's input width is a multiple of 16, so all of them quantize.
fn config() -> NemotronHConfig {
    NemotronHConfig::from_json_str(
        r#"{"model_type": "nemotron_h", "vocab_size": 40, "hidden_size": 32,
        "hybrid_override_pattern": "M*E", "mamba_num_heads": 4, "mamba_head_dim": 8,
        "ssm_state_size": 16, "n_groups": 1, "conv_kernel": 4, "chunk_size": 8,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
        "moe_shared_expert_intermediate_size": 16, "routed_scaling_factor": 1.0}"#,
    )
    .unwrap()
}

fn trainer(nvfp4: bool) -> Trainer {
    let cfg = config();
    let params = checkpoint::init_params(&cfg, 5, &Device::Cpu).unwrap();
    let lc = LearnerConfig {
        nvfp4_forward: nvfp4.then(Nvfp4Policy::default),
        ..Default::default()
    };
    Trainer::new(cfg, params, lc).unwrap()
}

/// Samples from an NVFP4 engine built from the trainer's current weights, as a worker would.
fn nvfp4_rollouts(t: &Trainer) -> Vec<RlSequence> {
    let options = EngineOptions {
        nvfp4: Some(Nvfp4Policy::default()),
        ..Default::default()
    };
    let engine =
        Engine::from_tensors_with(t.model_config(), &t.params().snapshot().unwrap(), &options)
            .unwrap();
    let (quantized, total) = engine.nvfp4_projection_count();
    assert!(quantized > 0 && quantized == total, "{quantized}/{total}");
    (0..8)
        .map(|i| {
            let prompt = vec![3, 5 + i as u32, 7];
            let g = engine
                .generate(&GenerationRequest {
                    prompt: prompt.clone(),
                    max_new_tokens: 10,
                    sampling: SamplingParams::default(),
                    seed: i,
                    stop_tokens: vec![],
                })
                .unwrap();
            RlSequence {
                tokens: prompt.iter().chain(&g.tokens).copied().collect(),
                prompt_len: prompt.len(),
                behavior_logprobs: g.logprobs.clone(),
                advantage: if i % 2 == 0 { 1.0 } else { -1.0 },
                ref_logprobs: None,
                loss_mask: None,
            }
        })
        .collect()
}

fn mismatch(model: &NemotronH, batch: &[RlSequence]) -> f64 {
    rl_loss(model, batch, &Objective::default())
        .unwrap()
        .1
        .mean_abs_logprob_diff
}

#[test]
fn training_through_nvfp4_shrinks_the_sampling_mismatch() {
    let full = trainer(false);
    let through = trainer(true);
    let batch = nvfp4_rollouts(&full);
    let off = mismatch(full.model(), &batch);
    let on = mismatch(through.model(), &batch);
    eprintln!(
        "mean |log pi_learner - log pi_worker|: full precision {off:.3e}, through NVFP4 {on:.3e}"
    );
    assert!(off > 1e-3, "NVFP4 sampling should differ from f32: {off}");
    assert!(
        on < off / 20.0,
        "training through NVFP4 should remove most of the mismatch: {on} vs {off}"
    );
}

#[test]
fn straight_through_gradients_reach_every_quantized_projection() {
    let t = trainer(true);
    let batch = nvfp4_rollouts(&t);
    let (loss, _) = rl_loss(t.model(), &batch, &Objective::default()).unwrap();
    let grads = loss.backward().unwrap();
    let mut quantized = 0;
    for (name, var) in t.params().vars() {
        if !name.ends_with("_proj.weight") {
            continue;
        }
        quantized += 1;
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name} got no gradient"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0, "{name} got a zero gradient");
    }
    assert!(quantized >= 8);
}

#[test]
fn steps_through_nvfp4_stay_in_sync_with_nvfp4_workers() {
    let mut t = trainer(true);
    for _ in 0..3 {
        let batch = nvfp4_rollouts(&t);
        let report = t.rl_step(&batch).unwrap();
        assert!(report.skipped.is_none(), "{report:?}");
        // Fresh samples from the updated weights, quantized the workers' way, still match.
        assert!(report.stats.mean_abs_logprob_diff < 1e-3, "{report:?}");
    }
    let batch = nvfp4_rollouts(&t);
    assert!(mismatch(t.model(), &batch) < 1e-3);
}
