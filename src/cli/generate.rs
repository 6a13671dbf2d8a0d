//! `chorus generate`: sample from a checkpoint through the incremental decoding engine.

use std::path::PathBuf;

use anyhow::{Context, bail};
use chorus_model::engine::{Engine, EngineOptions, GenerationRequest, Nvfp4Policy};
use chorus_model::sampling::{SamplingParams, ThinkBudget};
use chorus_model::tokenizer::Tokenizer;
use clap::Args;

/// Generate tokens from a checkpoint.
///
/// Examples:
///   chorus generate --checkpoint runs/init --prompt-ids 5,17,42 --max-new-tokens 16 --greedy --json
///   chorus generate --checkpoint runs/init --prompt "12+7=" --temperature 0.8 --top-p 0.95 --seed 1
///   chorus generate --checkpoint runs/init --prompt-ids 5,17 --greedy --mtp 3   (speculative)
///   chorus generate --checkpoint runs/init --prompt "<think>" --temperature 1 --think-budget 8
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct GenerateArgs {
    /// Checkpoint directory (config.json, weights, optional tokenizer.json).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Prompt as comma-separated token ids, e.g. 5,17,42.
    #[arg(
        long,
        value_delimiter = ',',
        conflicts_with = "prompt",
        required_unless_present = "prompt"
    )]
    prompt_ids: Vec<u32>,
    /// Prompt as text (needs the checkpoint's tokenizer.json).
    #[arg(long)]
    prompt: Option<String>,
    /// Number of tokens to generate.
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Greedy decoding (argmax); the default when no --temperature is given.
    #[arg(long, conflicts_with_all = ["temperature", "top_p", "top_k"])]
    greedy: bool,
    /// Sampling temperature (> 0).
    #[arg(long)]
    temperature: Option<f32>,
    /// Nucleus sampling: keep the most likely tokens up to this total probability (0, 1].
    #[arg(long)]
    top_p: Option<f32>,
    /// Keep only the k most likely tokens (0 = no limit).
    #[arg(long)]
    top_k: Option<usize>,
    /// Seed of the sampler; the same seed gives the same sample.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Speculative decoding: draft K tokens per step with the MTP head and verify them in one
    /// pass of the model (the checkpoint needs an MTP head). Prints the acceptance rate.
    #[arg(long, value_name = "K")]
    mtp: Option<usize>,
    /// Stop after the end-of-sequence token of config.json (kept in the output).
    #[arg(long)]
    stop_at_eos: bool,
    /// Reasoning budget: after N tokens inside `<think>`, emit `</think>` and go on to the
    /// answer (the tokens are the checkpoint's tokenizer's, or Chorus' byte-level ones).
    #[arg(long, value_name = "N", conflicts_with = "mtp")]
    think_budget: Option<usize>,
    /// Print `{"tokens": [...], "logprobs": [...]}` for the generated tokens only.
    #[arg(long)]
    json: bool,
    /// Quantize projection weights on load: `nvfp4`. A checkpoint written by `chorus quantize`
    /// is already NVFP4 and needs no flag. Embeddings, lm_head, router gates and norms stay f32.
    #[arg(long, value_parser = ["nvfp4"])]
    quantize: Option<String>,
    /// With --quantize nvfp4: keep attention projections (q/k/v/o) in f32.
    #[arg(long, requires = "quantize")]
    keep_attention_f32: bool,
    /// NVFP4 projections round their inputs to int8 (per 16 values) and multiply with integer
    /// dot products, as llama.cpp does for 4-bit types: faster, with log-probabilities off by
    /// the rounding. With AVX2 or AVX-512, every step rounds (prefill too, through a repacked copy of
    /// the weights: twice the NVFP4 memory); without either, decode steps of up to 64 sequences.
    /// Needs NVFP4 weights (--quantize nvfp4 or a `chorus quantize` checkpoint).
    #[arg(long)]
    int8_activations: bool,
}

pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    let options = EngineOptions {
        nvfp4: a.quantize.as_ref().map(|_| Nvfp4Policy {
            keep_attention: a.keep_attention_f32,
            exclude: vec![],
        }),
        int8_activations: a.int8_activations,
        ..Default::default()
    };
    let engine = Engine::from_checkpoint(&a.checkpoint, &options)?;
    if a.int8_activations && engine.nvfp4_projection_count().0 == 0 {
        anyhow::bail!(
            "--int8-activations rounds the inputs of NVFP4 projections, and {} has none: add \
             --quantize nvfp4 or give a checkpoint written by `chorus quantize`",
            a.checkpoint.display()
        );
    }
    let cfg = engine.config().clone();
    let tokenizer_path = a.checkpoint.join("tokenizer.json");
    let tokenizer = if tokenizer_path.exists() {
        Some(Tokenizer::from_file(&tokenizer_path)?)
    } else {
        None
    };
    let prompt = match &a.prompt {
        Some(text) => {
            let t = tokenizer.as_ref().with_context(|| {
                format!(
                    "--prompt needs {}; give --prompt-ids instead",
                    tokenizer_path.display()
                )
            })?;
            t.encode(text)?
        }
        None => a.prompt_ids.clone(),
    };
    if prompt.is_empty() {
        bail!("the prompt is empty; give --prompt-ids 5,17,42 or --prompt TEXT");
    }
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= cfg.vocab_size) {
        bail!(
            "prompt token id {bad} is outside the vocabulary (ids must be < {})",
            cfg.vocab_size
        );
    }
    let sampling = if a.greedy || a.temperature.is_none() {
        SamplingParams::greedy()
    } else {
        let s = SamplingParams {
            temperature: a.temperature.unwrap_or(1.0),
            top_p: a.top_p.unwrap_or(1.0),
            top_k: a.top_k.unwrap_or(0),
            think_budget: None,
        };
        s.validate().map_err(anyhow::Error::msg)?;
        if s.temperature == 0.0 {
            bail!("--temperature must be > 0 (use --greedy for argmax decoding)");
        }
        s
    };
    let mut sampling = sampling;
    if let Some(tokens) = a.think_budget {
        let t = tokenizer.clone().unwrap_or_else(Tokenizer::byte_level);
        let id = |token: &str| {
            t.token_id(token).with_context(|| {
                format!("--think-budget needs `{token}` to be one token of the tokenizer")
            })
        };
        sampling.think_budget = Some(ThinkBudget {
            tokens,
            open: id("<think>")?,
            close: id("</think>")?,
        });
    }
    let req = GenerationRequest {
        prompt,
        max_new_tokens: a.max_new_tokens,
        sampling,
        seed: a.seed,
        stop_tokens: if a.stop_at_eos {
            cfg.eos_token_ids.clone()
        } else {
            vec![]
        },
    };
    let start = std::time::Instant::now();
    let out = match a.mtp {
        Some(k) => engine.generate_speculative(&req, k)?,
        None => engine.generate(&req)?,
    };
    let secs = start.elapsed().as_secs_f64();
    if a.json {
        let mut v = serde_json::json!({"tokens": out.tokens, "logprobs": out.logprobs});
        if let Some(s) = out.mtp {
            v["mtp"] = serde_json::json!({"drafted": s.drafted, "accepted": s.accepted, "acceptance_rate": s.acceptance_rate()});
        }
        outln!("{v}");
        return Ok(());
    }
    outln!("tokens    {:?}", out.tokens);
    if let Some(t) = &tokenizer {
        outln!("text      {:?}", t.decode(&out.tokens, false)?);
    }
    outln!("finish    {:?}", out.finish);
    outln!(
        "speed     {:.1} tokens/s",
        out.tokens.len() as f64 / secs.max(1e-9)
    );
    let (q, total) = engine.nvfp4_projection_count();
    if q > 0 {
        let activations = if a.int8_activations {
            ", int8 activations in decode steps"
        } else {
            ""
        };
        outln!("nvfp4     {q} of {total} projections{activations}");
    }
    if let Some(s) = out.mtp {
        outln!(
            "mtp       {} of {} drafts accepted ({:.1}%), {} verification passes",
            s.accepted,
            s.drafted,
            100.0 * s.acceptance_rate(),
            s.verify_passes
        );
    }
    Ok(())
}
