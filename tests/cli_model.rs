//! The model commands end to end: `chorus model forward` and `chorus generate` against HF's
//! outputs on tiny_a, `chorus model init` producing a usable checkpoint, and bad input.

mod harness;

use candle_core::Device;
use harness::*;

fn reference() -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(
        fixture("nemotron_h/tiny_a/reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn model_forward_matches_hf_logits() {
    let h = Harness::new();
    let r = reference();
    let input = h.path("in.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("input_ids".to_string(), r["input_ids"].clone())]),
        &input,
    )
    .unwrap();
    let output = h.path("out.safetensors");
    h.ok(&[
        "model",
        "forward",
        "--checkpoint",
        s(&fixture("nemotron_h/tiny_a")),
        "--input",
        s(&input),
        "--output",
        s(&output),
    ]);
    let got = candle_core::safetensors::load(&output, &Device::Cpu).unwrap();
    let err = (&got["logits"] - &r["logits"])
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(err <= 1e-4, "max abs error {err}");
}

#[test]
fn greedy_generate_reproduces_hf() {
    let h = Harness::new();
    let r = reference();
    let prompt: Vec<i64> = r["greedy_prompt"].flatten_all().unwrap().to_vec1().unwrap();
    let want: Vec<i64> = r["greedy_output"].flatten_all().unwrap().to_vec1().unwrap();
    let ids = prompt
        .iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let n = (want.len() - prompt.len()).to_string();
    let out = h.ok(&[
        "generate",
        "--checkpoint",
        s(&fixture("nemotron_h/tiny_a")),
        "--prompt-ids",
        &ids,
        "--max-new-tokens",
        &n,
        "--greedy",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let tokens: Vec<i64> = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_i64().unwrap())
        .collect();
    assert_eq!(tokens, want[prompt.len()..]);
    let logprobs = v["logprobs"].as_array().unwrap();
    assert_eq!(logprobs.len(), tokens.len());
    assert!(logprobs.iter().all(|l| l.as_f64().unwrap() <= 0.0));
}

#[test]
fn init_then_generate_with_text_and_speculation() {
    let h = Harness::new();
    let ckpt = h.path("ckpt");
    h.ok(&[
        "model",
        "init",
        "--config",
        s(&repo().join("configs/models/nano-1.5m.json")),
        "--seed",
        "3",
        "--out",
        s(&ckpt),
    ]);
    assert!(ckpt.join("tokenizer.json").exists());
    let info = h.ok(&["model", "info", "--checkpoint", s(&ckpt)]);
    assert!(info.contains("MEMEM*EMEM*E"), "{info}");
    let plain = h.ok(&[
        "generate",
        "--checkpoint",
        s(&ckpt),
        "--prompt",
        "12+7=",
        "--max-new-tokens",
        "12",
        "--greedy",
        "--json",
    ]);
    let spec = h.ok(&[
        "generate",
        "--checkpoint",
        s(&ckpt),
        "--prompt",
        "12+7=",
        "--max-new-tokens",
        "12",
        "--greedy",
        "--mtp",
        "3",
        "--json",
    ]);
    let tokens = |out: &str| {
        serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()["tokens"].clone()
    };
    assert_eq!(tokens(&plain), tokens(&spec));
    let v: serde_json::Value = serde_json::from_str(spec.trim()).unwrap();
    assert!(v["mtp"]["acceptance_rate"].as_f64().is_some());
    // Sampling is reproducible for a seed.
    let a = h.ok(&[
        "generate",
        "--checkpoint",
        s(&ckpt),
        "--prompt-ids",
        "20,21",
        "--temperature",
        "1.0",
        "--top-p",
        "0.9",
        "--seed",
        "5",
        "--json",
    ]);
    let b = h.ok(&[
        "generate",
        "--checkpoint",
        s(&ckpt),
        "--prompt-ids",
        "20,21",
        "--temperature",
        "1.0",
        "--top-p",
        "0.9",
        "--seed",
        "5",
        "--json",
    ]);
    assert_eq!(a, b);

    // A reasoning budget: the prompt opens a think block; no sample spends more than 3 tokens
    // in it (the untrained model almost never closes it by itself).
    let think = |budget: Option<&str>, seed: &str| -> Vec<u64> {
        let mut args = vec![
            "generate",
            "--checkpoint",
            s(&ckpt),
            "--prompt",
            "<|user|>hi<|end|><|assistant|><think>",
            "--max-new-tokens",
            "12",
            "--temperature",
            "1.0",
            "--seed",
            seed,
            "--json",
        ];
        if let Some(b) = budget {
            args.extend(["--think-budget", b]);
        }
        let v: serde_json::Value = serde_json::from_str(h.ok(&args).trim()).unwrap();
        v["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap())
            .collect()
    };
    let close = chorus_model::tokenizer::Tokenizer::byte_level()
        .token_id("</think>")
        .unwrap() as u64;
    let open = chorus_model::tokenizer::Tokenizer::byte_level()
        .token_id("<think>")
        .unwrap() as u64;
    let inside_before_close = |tokens: &[u64]| {
        let mut longest = 0;
        let mut inside = Some(0);
        for &t in tokens {
            if t == open {
                inside = Some(0);
            } else if t == close {
                inside = None;
            } else if let Some(n) = &mut inside {
                *n += 1;
                longest = longest.max(*n);
            }
        }
        longest
    };
    let seeds = ["1", "2", "3"];
    assert!(
        seeds
            .iter()
            .any(|seed| inside_before_close(&think(None, seed)) > 3),
        "without a budget some sample thinks longer than 3 tokens"
    );
    for seed in seeds {
        let tokens = think(Some("3"), seed);
        assert!(inside_before_close(&tokens) <= 3, "{tokens:?}");
    }
    let err = h.fails(&[
        "generate",
        "--checkpoint",
        s(&ckpt),
        "--prompt-ids",
        "20,21",
        "--think-budget",
        "3",
        "--mtp",
        "2",
    ]);
    assert!(
        err.contains("--think-budget") && err.contains("--mtp"),
        "{err}"
    );
}

#[test]
fn bad_input_is_named() {
    let h = Harness::new();
    let cfg = h.path("bad.json");
    std::fs::write(&cfg, r#"{"model_type": "nemotron_h", "vocab_size": 300, "hidden_size": 32, "hybrid_override_pattern": "MQ"}"#).unwrap();
    let err = h.fails(&[
        "model",
        "init",
        "--config",
        s(&cfg),
        "--out",
        s(&h.path("x")),
    ]);
    assert!(
        err.contains("hybrid_override_pattern") && err.contains("Q"),
        "{err}"
    );
    let err = h.fails(&[
        "generate",
        "--checkpoint",
        s(&fixture("nemotron_h/tiny_a")),
        "--prompt-ids",
        "5,999",
    ]);
    assert!(err.contains("999") && err.contains("320"), "{err}");
    let err = h.fails(&[
        "generate",
        "--checkpoint",
        s(&fixture("nemotron_h/tiny_a")),
        "--prompt-ids",
        "5",
        "--mtp",
        "2",
    ]);
    assert!(err.contains("MTP"), "{err}");
    let err = h.fails(&[
        "model",
        "forward",
        "--checkpoint",
        s(&fixture("nemotron_h/tiny_a")),
        "--input",
        "nope.safetensors",
        "--output",
        "o.safetensors",
        "--device",
        "cuda:0",
    ]);
    assert!(err.contains("CUDA"), "{err}");
}
