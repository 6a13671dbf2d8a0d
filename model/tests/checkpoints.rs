//! Checkpoints round-trip in HF layout (single file and sharded) and new models start from a seed.

mod common;

use candle_core::Device;
use chorus_model::checkpoint::{
    INDEX_FILE, WEIGHTS_FILE, init_params, load_checkpoint, save_checkpoint,
};
use chorus_model::engine::{Engine, GenerationRequest};
use chorus_model::sampling::SamplingParams;
use common::*;

fn same_params(a: &chorus_model::Params, b: &chorus_model::Params) {
    assert_eq!(a.names().collect::<Vec<_>>(), b.names().collect::<Vec<_>>());
    for (name, va) in a.vars() {
        let x: Vec<f32> = va.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let y: Vec<f32> = b.vars()[name]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(x, y, "{name}");
    }
}

#[test]
fn save_and_load_single_file_and_sharded() {
    let (cfg, params, _) = load_fixture("tiny_a");
    for shard in [None, Some(64 * 1024)] {
        let dir = tempfile::tempdir().unwrap();
        save_checkpoint(dir.path(), &cfg, &params, shard).unwrap();
        assert_eq!(dir.path().join(INDEX_FILE).exists(), shard.is_some());
        assert_eq!(dir.path().join(WEIGHTS_FILE).exists(), shard.is_none());
        let (cfg2, params2) = load_checkpoint(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(cfg2.layers, cfg.layers);
        same_params(&params, &params2);
    }
}

#[test]
fn init_is_deterministic_per_seed_and_complete() {
    let cfg = small_config("MEM*-E", Some(16), true);
    let a = init_params(&cfg, 7, &Device::Cpu).unwrap();
    let b = init_params(&cfg, 7, &Device::Cpu).unwrap();
    let c = init_params(&cfg, 8, &Device::Cpu).unwrap();
    same_params(&a, &b);
    let wa: Vec<f32> = a.vars()["lm_head.weight"]
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let wc: Vec<f32> = c.vars()["lm_head.weight"]
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_ne!(wa, wc);
    // Every tensor the model reads exists: building both runners succeeds and generates.
    chorus_model::NemotronH::new(&cfg, &a).unwrap();
    let engine = Engine::from_params(&cfg, &a).unwrap();
    let out = engine
        .generate(&GenerationRequest {
            prompt: vec![3, 4],
            max_new_tokens: 5,
            sampling: SamplingParams::greedy(),
            seed: 0,
            stop_tokens: vec![],
        })
        .unwrap();
    assert_eq!(out.tokens.len(), 5);
}

#[test]
fn missing_tensor_is_named() {
    let (cfg, params, _) = load_fixture("tiny_a");
    let mut tensors = params.snapshot().unwrap();
    tensors.remove("backbone.layers.3.mixer.dt_bias");
    let dir = tempfile::tempdir().unwrap();
    chorus_model::checkpoint::save_tensors(dir.path(), &tensors, None).unwrap();
    std::fs::write(dir.path().join("config.json"), cfg.to_json().to_string()).unwrap();
    let (cfg2, params2) = load_checkpoint(dir.path(), &Device::Cpu).unwrap();
    let err = chorus_model::NemotronH::new(&cfg2, &params2)
        .unwrap_err()
        .to_string();
    assert!(err.contains("backbone.layers.3.mixer.dt_bias"), "{err}");
}

/// What transformers' `save_pretrained` leaves of a Chorus policy: `config.json` still declares
/// the MTP head, the weights hold no `mtp.*` tensor. It loads without the head (both the
/// training model and the engine), and says so in the config; the backbone is untouched.
#[test]
fn a_checkpoint_whose_mtp_tensors_are_gone_loads_without_the_head() {
    let cfg = small_config("ME*-", Some(16), true);
    assert!(cfg.has_mtp());
    let params = init_params(&cfg, 3, &Device::Cpu).unwrap();
    let full = tempfile::tempdir().unwrap();
    save_checkpoint(full.path(), &cfg, &params, None).unwrap();
    let (kept, _) = load_checkpoint(full.path(), &Device::Cpu).unwrap();
    assert!(kept.has_mtp(), "the head stays where its tensors are");

    let mut tensors = params.snapshot().unwrap();
    tensors.retain(|name, _| !name.starts_with("mtp."));
    let cut = tempfile::tempdir().unwrap();
    chorus_model::checkpoint::save_tensors(cut.path(), &tensors, None).unwrap();
    std::fs::write(cut.path().join("config.json"), cfg.to_json().to_string()).unwrap();
    let (cfg2, params2) = load_checkpoint(cut.path(), &Device::Cpu).unwrap();
    assert!(!cfg2.has_mtp());
    assert_eq!(cfg2.to_json()["num_nextn_predict_layers"], 0);
    assert_eq!(cfg2.layers, cfg.layers);
    chorus_model::NemotronH::new(&cfg2, &params2).unwrap();
    let engine = Engine::from_checkpoint(cut.path(), &Default::default()).unwrap();
    let request = GenerationRequest {
        prompt: vec![3, 4],
        max_new_tokens: 4,
        sampling: SamplingParams::greedy(),
        seed: 0,
        stop_tokens: vec![],
    };
    let full_engine = Engine::from_checkpoint(full.path(), &Default::default()).unwrap();
    assert_eq!(
        engine.generate(&request).unwrap().tokens,
        full_engine.generate(&request).unwrap().tokens,
        "the backbone decodes as before"
    );
}

/// A worker builds its engine from the tensors it received, taken over rather than copied
/// (`Engine::from_owned`): that engine must be the one `from_tensors_with` builds, for every
/// block kind, a latent MoE, the MTP head and NVFP4 on load, and must read every tensor once.
#[test]
fn an_engine_built_from_owned_tensors_is_the_one_built_from_candle_tensors() {
    use chorus_model::engine::{EngineOptions, OwnedTensor};
    let cfg = small_config("MEM*-E", Some(16), true);
    let params = random_params(&cfg, 11);
    let tensors = params.snapshot().unwrap();
    let owned = || {
        tensors
            .iter()
            .map(|(name, t)| {
                let data = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let tensor = OwnedTensor {
                    shape: t.dims().to_vec(),
                    data,
                };
                (name.clone(), tensor)
            })
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let request = GenerationRequest {
        prompt: vec![3, 4, 9, 1],
        max_new_tokens: 12,
        sampling: SamplingParams::greedy(),
        seed: 0,
        stop_tokens: vec![],
    };
    for options in [
        EngineOptions::default(),
        EngineOptions {
            nvfp4: Some(Default::default()),
            ..Default::default()
        },
    ] {
        let copied = Engine::from_tensors_with(&cfg, &tensors, &options).unwrap();
        let taken = Engine::from_owned(&cfg, owned(), &options).unwrap();
        let (a, b) = (
            copied.generate(&request).unwrap(),
            taken.generate(&request).unwrap(),
        );
        assert_eq!(a.tokens, b.tokens);
        assert_eq!(a.logprobs, b.logprobs);
        let (a, b) = (
            copied.generate_speculative(&request, 2).unwrap(),
            taken.generate_speculative(&request, 2).unwrap(),
        );
        assert_eq!((a.tokens, a.logprobs, a.mtp), (b.tokens, b.logprobs, b.mtp));
    }

    let mut short = owned();
    short.get_mut("backbone.norm_f.weight").unwrap().data.pop();
    let err = Engine::from_owned(&cfg, short, &EngineOptions::default())
        .err()
        .expect("a tensor shorter than its shape is refused")
        .to_string();
    assert!(err.contains("backbone.norm_f.weight"), "{err}");
    let mut missing = owned();
    missing.remove("mtp.eh_proj.weight");
    let err = Engine::from_owned(&cfg, missing, &EngineOptions::default())
        .err()
        .expect("a missing tensor is refused")
        .to_string();
    assert!(err.contains("mtp.eh_proj.weight"), "{err}");
}
