//! `chorus quantize`: convert a checkpoint to NVFP4 (ModelOpt layout) and back.

use std::path::PathBuf;

use chorus_model::quantize::{dequantize_checkpoint, quantize_checkpoint};
use clap::Args;

/// Quantize a checkpoint's linear projection weights to NVFP4, or convert one back to f32.
///
/// Every tensor whose name ends in `_proj.weight` (the experts' included) with an input width
/// that is a multiple of 16 becomes `X.weight` (uint8, two 4-bit codes per byte),
/// `X.weight_scale` (F8_E4M3, one per 16 inputs) and `X.weight_scale_2` (f32 global decode
/// scale); everything else is copied unchanged and config.json gains a quantization_config.
///
/// Examples:
///   chorus quantize --input runs/nano --output runs/nano-nvfp4
///   chorus quantize --input runs/nano --output runs/nano-nvfp4 --exclude '*.mixer.q_proj.weight' --exclude 'mtp.*'
///   chorus quantize --dequantize --input runs/nano-nvfp4 --output runs/nano-f32
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct QuantizeArgs {
    /// Checkpoint directory (config.json + weights) or a single .safetensors file.
    #[arg(long)]
    input: PathBuf,
    /// Directory to write (created if missing).
    #[arg(long)]
    output: PathBuf,
    /// Keep tensors matching this glob (`*`, `?`) in full precision; repeatable.
    #[arg(long)]
    exclude: Vec<String>,
    /// Convert an NVFP4 checkpoint back to f32.
    #[arg(long, conflicts_with = "exclude")]
    dequantize: bool,
}

pub fn run(a: QuantizeArgs) -> anyhow::Result<()> {
    let bar: std::cell::OnceCell<Option<indicatif::ProgressBar>> = std::cell::OnceCell::new();
    let progress = |i: usize, n: usize, name: &str| match bar
        .get_or_init(|| super::progress::bar(n as u64, "quantize", "tensors"))
    {
        Some(b) => {
            b.set_position(i as u64);
            b.set_message(name.to_string());
            if i == n {
                b.finish();
            }
        }
        None if i == n || i.is_multiple_of(100) => eprintln!("[{i}/{n}] {name}"),
        None => {}
    };
    let report = if a.dequantize {
        dequantize_checkpoint(&a.input, &a.output, progress)?
    } else {
        quantize_checkpoint(&a.input, &a.output, &a.exclude, progress)?
    };
    outln!(
        "{} {} tensors, copied {}; {:.2} MiB -> {:.2} MiB in {}",
        if a.dequantize {
            "dequantized"
        } else {
            "quantized"
        },
        report.converted.len(),
        report.copied,
        report.bytes_in as f64 / (1 << 20) as f64,
        report.bytes_out as f64 / (1 << 20) as f64,
        a.output.display()
    );
    Ok(())
}
