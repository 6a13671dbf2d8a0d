//! Checkpoints that Hugging Face transformers opens, both ways: the policy a `chorus run`
//! trained loads unedited in `AutoModelForCausalLM` (and its tokenizer in `AutoTokenizer`) and
//! decodes the same greedy tokens as `chorus generate`; a checkpoint written by transformers'
//! `save_pretrained` (config, weights and tokenizer) loads in Chorus and decodes what
//! transformers decoded from it.
//!
//! Needs `CHORUS_TEST_HF_PYTHON`: a Python with torch and transformers (`.ci/run` makes one in
//! `~/.cache/chorus-hf`; README "Run the tests"). Without it the test reports itself skipped,
//! except under CI, where it fails so that a green run cannot hide that it never ran.

mod harness;

use harness::*;

/// A miniature of `configs/models/nano-1.5m.json`: every block kind (Mamba-2, attention,
/// LatentMoE, dense MLP) and an MTP head, over the byte-level vocabulary.
const MODEL: &str = r#"{"model_type": "nemotron_h", "architectures": ["NemotronHForCausalLM"],
  "vocab_size": 270, "hidden_size": 32, "hybrid_override_pattern": "ME*-",
  "mamba_num_heads": 4, "mamba_head_dim": 8, "ssm_state_size": 8, "n_groups": 1,
  "conv_kernel": 4, "chunk_size": 8, "num_attention_heads": 4, "num_key_value_heads": 2,
  "head_dim": 8, "intermediate_size": 48, "n_routed_experts": 4, "num_experts_per_tok": 2,
  "moe_intermediate_size": 16, "moe_shared_expert_intermediate_size": 16,
  "moe_latent_size": 16, "routed_scaling_factor": 2.5, "n_group": 1, "topk_group": 1,
  "num_nextn_predict_layers": 1, "mtp_layers_block_type": ["full_attention", "moe"],
  "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}"#;

const RUN: &str = r#"
name = "interop"
seed = 5
[model]
init_config = "model.json"
[workers]
count = 1
max_batch = 16
[[stages]]
name = "warmup"
kind = "sft"
steps = 3
prompts_per_step = 4
environments = [{ name = "arithmetic" }]
[[stages]]
name = "rl"
kind = "rl"
steps = 2
prompts_per_step = 4
group_size = 4
max_new_tokens = 4
environments = [{ name = "arithmetic" }]
"#;

const PROMPT: &str = "1,65,57,66,75";
const NEW_TOKENS: usize = 12;

/// `CHORUS_TEST_HF_PYTHON` when it imports torch and transformers.
fn hf_python() -> Option<String> {
    python_importing(
        "CHORUS_TEST_HF_PYTHON",
        "torch, transformers",
        "a Python with torch and transformers installed, as .ci/run makes",
        Missing::FailsUnderCi,
    )
}

/// One greedy decode: tokens, their log-probabilities and (transformers only) the gap between
/// the two best logits at each step.
#[derive(Debug)]
struct Decode {
    tokens: Vec<u64>,
    logprobs: Vec<f64>,
    margins: Vec<f64>,
}

impl Decode {
    fn from_json(v: &serde_json::Value) -> Self {
        let list = |key: &str| -> Vec<serde_json::Value> {
            v.get(key)
                .and_then(|x| x.as_array())
                .cloned()
                .unwrap_or_default()
        };
        Self {
            tokens: list("tokens").iter().map(|t| t.as_u64().unwrap()).collect(),
            logprobs: list("logprobs")
                .iter()
                .map(|t| t.as_f64().unwrap())
                .collect(),
            margins: list("margins")
                .iter()
                .map(|t| t.as_f64().unwrap())
                .collect(),
        }
    }
}

fn chorus_greedy(h: &Harness, checkpoint: &str) -> Decode {
    let out = h.ok(&[
        "generate",
        "--checkpoint",
        checkpoint,
        "--prompt-ids",
        PROMPT,
        "--max-new-tokens",
        &NEW_TOKENS.to_string(),
        "--greedy",
        "--json",
    ]);
    Decode::from_json(&serde_json::from_str(out.trim()).expect("generate --json prints JSON"))
}

/// Chorus' greedy tokens equal transformers', with log-probabilities within float32 noise. Two
/// correct implementations may only part where transformers' two best logits are nearly tied;
/// after such a step the rest is not compared.
fn assert_same_greedy(what: &str, chorus: &Decode, hf: &Decode) {
    assert_eq!(chorus.tokens.len(), NEW_TOKENS, "{what}: {chorus:?}");
    assert_eq!(hf.tokens.len(), NEW_TOKENS, "{what}: {hf:?}");
    for i in 0..NEW_TOKENS {
        if chorus.tokens[i] != hf.tokens[i] {
            assert!(
                hf.margins[i] < 1e-4 && i > 0,
                "{what}: token {i} differs (chorus {:?}, transformers {:?}) and transformers' \
                 best logit led by {} there, not a tie",
                chorus.tokens,
                hf.tokens,
                hf.margins[i]
            );
            println!("{what}: parted at token {i} on a near tie");
            return;
        }
        let diff = (chorus.logprobs[i] - hf.logprobs[i]).abs();
        assert!(
            diff < 1e-3,
            "{what}: token {i}'s log-probability is {} in Chorus and {} in transformers",
            chorus.logprobs[i],
            hf.logprobs[i]
        );
    }
}

#[test]
fn a_trained_checkpoint_round_trips_through_transformers() {
    let Some(python) = hf_python() else { return };
    let h = Harness::new();
    std::fs::write(h.path("model.json"), MODEL).unwrap();
    std::fs::write(h.path("run.toml"), RUN).unwrap();
    h.ok(&["run", "run.toml", "--eval-tasks", "2"]);
    h.audit_clean(&h.ledger_url("interop"));
    let checkpoint = "runs/interop/checkpoint";
    let chorus = chorus_greedy(&h, checkpoint);

    let hf = python_json(
        &h,
        &python,
        "hf_interop.py",
        &[checkpoint, PROMPT, &NEW_TOKENS.to_string(), "saved_by_hf"],
    );

    assert_eq!(hf["model_class"], "NemotronHForCausalLM", "{hf}");
    assert_eq!(
        (
            &hf["bos_token_id"],
            &hf["eos_token_id"],
            &hf["pad_token_id"]
        ),
        (&1.into(), &2.into(), &0.into()),
        "AutoTokenizer must find the config's special tokens: {hf}"
    );
    assert_eq!(
        hf["decoded_prompt"], "<s>3+4=",
        "the tokenizer decodes byte tokens"
    );
    assert_same_greedy(
        "loaded in transformers",
        &chorus,
        &Decode::from_json(&hf["loaded"]),
    );

    // transformers moved every weight before saving, so agreeing with its second decode means
    // Chorus read transformers' files, not its own.
    let moved = Decode::from_json(&hf["moved"]);
    let reloaded = chorus_greedy(&h, "saved_by_hf");
    assert_same_greedy("saved by transformers", &reloaded, &moved);
    let changed = chorus
        .logprobs
        .iter()
        .zip(&reloaded.logprobs)
        .any(|(a, b)| (a - b).abs() > 1e-2);
    assert!(
        changed || chorus.tokens != reloaded.tokens,
        "the moved weights decoded exactly as the trained ones: {chorus:?} {reloaded:?}"
    );
}

#[test]
fn a_trained_dense_checkpoint_serves_in_vllm_with_the_same_greedy_tokens() {
    let Some(python) = vllm_python() else { return };
    let h = Harness::new();
    std::fs::write(h.path("model.json"), VLLM_DENSE_MODEL).unwrap();
    std::fs::write(h.path("run.toml"), RUN).unwrap();
    h.ok(&["run", "run.toml", "--eval-tasks", "2"]);
    let checkpoint = "runs/interop/checkpoint";
    let chorus = chorus_greedy(&h, checkpoint);
    let vllm = python_json(
        &h,
        &python,
        "vllm_greedy.py",
        &[checkpoint, PROMPT, &NEW_TOKENS.to_string()],
    );
    let vllm = Decode::from_json(&vllm);
    // vLLM reports no logit margins: tokens must agree outright.
    assert_eq!(
        chorus.tokens, vllm.tokens,
        "chorus {chorus:?}\nvllm {vllm:?}"
    );
    for (i, (a, b)) in chorus.logprobs.iter().zip(&vllm.logprobs).enumerate() {
        assert!(
            (a - b).abs() < 1e-3,
            "token {i}: log-probability {a} in Chorus, {b} in vLLM"
        );
    }
}
