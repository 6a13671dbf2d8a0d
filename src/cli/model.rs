//! `chorus model …`: create a checkpoint, run one forward pass.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use candle_core::{DType, Tensor};
use chorus_model::checkpoint::{self, CONFIG_FILE};
use chorus_model::tokenizer::{BYTE_LEVEL_VOCAB, Tokenizer};
use chorus_model::{NemotronH, NemotronHConfig};
use clap::{Args, Subcommand};

#[derive(Subcommand, Debug)]
pub enum ModelCommand {
    /// Write a new checkpoint with random weights: config.json, model.safetensors and, when the
    /// vocabulary is large enough, Chorus' byte-level tokenizer.json.
    ///
    /// Example: chorus model init --config configs/models/nano-1.5m.json --seed 0 --out runs/init
    Init(InitArgs),
    /// Run one full-sequence forward pass (no cache) and write the logits.
    ///
    /// Reads tensor `input_ids` (integer [B, T]) from --input and writes `logits` (f32 [B, T, V])
    /// to --output, both safetensors files.
    Forward(ForwardArgs),
    /// Print a checkpoint's architecture and parameter count.
    Info(InfoArgs),
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// An HF NemotronH config.json (model_type "nemotron_h").
    #[arg(long)]
    config: PathBuf,
    /// Seed of the random initialisation; the same seed gives the same weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Directory to write the checkpoint to (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Split the weights into shards of at most this many MiB (with an index file).
    #[arg(long)]
    shard_mib: Option<usize>,
}

#[derive(Args, Debug)]
pub struct ForwardArgs {
    /// Checkpoint directory (config.json + model.safetensors or a sharded index).
    #[arg(long)]
    checkpoint: PathBuf,
    /// safetensors file with an integer tensor `input_ids` of shape [B, T].
    #[arg(long)]
    input: PathBuf,
    /// safetensors file to write, holding `logits` f32 [B, T, V].
    #[arg(long)]
    output: PathBuf,
    /// Device to run on: cpu (or cuda:N in CUDA builds).
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Checkpoint directory.
    #[arg(long)]
    checkpoint: PathBuf,
}

pub fn run(cmd: ModelCommand) -> anyhow::Result<()> {
    match cmd {
        ModelCommand::Init(a) => init(a),
        ModelCommand::Forward(a) => forward(a),
        ModelCommand::Info(a) => info(a),
    }
}

fn init(a: InitArgs) -> anyhow::Result<()> {
    let cfg = NemotronHConfig::from_file(&a.config)?;
    eprintln!(
        "initialising {} ({} blocks, d={}) with seed {}",
        cfg.pattern(),
        cfg.layers.len(),
        cfg.hidden_size,
        a.seed
    );
    let params = checkpoint::init_params(&cfg, a.seed, &candle_core::Device::Cpu)?;
    checkpoint::save_checkpoint(&a.out, &cfg, &params, a.shard_mib.map(|m| m << 20))?;
    let tokenizer_note = if cfg.vocab_size >= BYTE_LEVEL_VOCAB {
        checkpoint::save_tokenizer_files(&a.out, &cfg, &Tokenizer::byte_level())?;
        "byte-level tokenizer.json, tokenizer_config.json and generation_config.json written"
    } else {
        "no tokenizer written (the byte-level tokenizer needs vocab_size >= 270)"
    };
    outln!(
        "wrote {} ({} parameters); {tokenizer_note}",
        a.out.display(),
        params.num_elements()
    );
    Ok(())
}

fn forward(a: ForwardArgs) -> anyhow::Result<()> {
    let device = chorus_runtime::device(&a.device)?;
    let (cfg, params) = checkpoint::load_checkpoint(&a.checkpoint, &device)?;
    let model = NemotronH::new(&cfg, &params)?;
    let inputs = candle_core::safetensors::load(&a.input, &device)
        .with_context(|| format!("reading {}", a.input.display()))?;
    let ids = inputs
        .get("input_ids")
        .with_context(|| format!("{} has no tensor `input_ids`", a.input.display()))?;
    if ids.rank() != 2 {
        bail!("`input_ids` must have shape [B, T], got {:?}", ids.dims());
    }
    if !matches!(
        ids.dtype(),
        DType::I64 | DType::U32 | DType::U8 | DType::I32 | DType::I16
    ) {
        bail!("`input_ids` must hold integers, got {:?}", ids.dtype());
    }
    let ids = ids.to_dtype(DType::I64)?;
    let max = ids
        .flatten_all()?
        .to_vec1::<i64>()?
        .into_iter()
        .fold(0, i64::max);
    let min = ids
        .flatten_all()?
        .to_vec1::<i64>()?
        .into_iter()
        .fold(0, i64::min);
    if min < 0 || max as usize >= cfg.vocab_size {
        bail!(
            "`input_ids` must lie in [0, {}), found values in [{min}, {max}]",
            cfg.vocab_size
        );
    }
    let logits: Tensor = model.forward(&ids)?.to_dtype(DType::F32)?;
    let out = HashMap::from([("logits".to_string(), logits.clone())]);
    candle_core::safetensors::save(&out, &a.output)
        .with_context(|| format!("writing {}", a.output.display()))?;
    eprintln!("wrote logits {:?} to {}", logits.dims(), a.output.display());
    Ok(())
}

fn info(a: InfoArgs) -> anyhow::Result<()> {
    let (cfg, params) = checkpoint::load_checkpoint(&a.checkpoint, &candle_core::Device::Cpu)?;
    outln!("checkpoint   {}", a.checkpoint.display());
    outln!("config       {}", a.checkpoint.join(CONFIG_FILE).display());
    outln!(
        "pattern      {} ({} blocks)",
        cfg.pattern(),
        cfg.layers.len()
    );
    outln!("hidden size  {}", cfg.hidden_size);
    outln!("vocabulary   {}", cfg.vocab_size);
    outln!("MTP head     {}", if cfg.has_mtp() { "yes" } else { "no" });
    outln!("parameters   {}", params.num_elements());
    Ok(())
}
