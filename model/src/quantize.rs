//! Checkpoint conversion to and from NVFP4 in the ModelOpt layout that vLLM and TensorRT-LLM
//! read: for each quantized linear `X`, `X.weight` (uint8 `[out, in/2]`, two E2M1 codes per byte),
//! `X.weight_scale` (F8_E4M3 `[out, in/16]`) and `X.weight_scale_2` (F32 scalar, the global
//! decode scale); every other tensor is copied unchanged, and `config.json` gains a
//! `quantization_config`.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chorus_kernels::{Nvfp4Tensor, QuantizeOptions};
use safetensors::{Dtype, SafeTensors, View};
use serde_json::{Value, json};

use crate::error::{ModelError, Result};
pub use crate::layout::glob_match;
use crate::layout::{
    CONFIG_FILE, GENERATION_CONFIG_FILE, INDEX_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE,
    WEIGHTS_FILE,
};

/// A tensor held as raw little-endian bytes.
#[derive(Clone, Debug)]
pub struct RawTensor {
    /// Element type as stored.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// The elements' bytes, little-endian.
    pub data: Vec<u8>,
}

impl View for &RawTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn bad(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::BadFile {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Reads every tensor of a checkpoint directory (single or sharded) or of one file, as raw bytes.
pub fn read_raw(input: &Path) -> Result<BTreeMap<String, RawTensor>> {
    let files: Vec<PathBuf> = if input.is_file() {
        vec![input.to_path_buf()]
    } else if input.join(INDEX_FILE).is_file() {
        let p = input.join(INDEX_FILE);
        let text = std::fs::read_to_string(&p).map_err(|e| ModelError::io(&p, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| bad(&p, e.to_string()))?;
        let mut files: Vec<PathBuf> = v["weight_map"]
            .as_object()
            .ok_or_else(|| bad(&p, "no `weight_map`"))?
            .values()
            .filter_map(|f| f.as_str())
            .map(|f| input.join(f))
            .collect();
        files.sort();
        files.dedup();
        files
    } else {
        vec![input.join(WEIGHTS_FILE)]
    };
    let mut out = BTreeMap::new();
    for f in files {
        let bytes = std::fs::read(&f).map_err(|e| ModelError::io(&f, e))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(&f, format!("not a safetensors file: {e}")))?;
        for (name, view) in st.tensors() {
            out.insert(
                name,
                RawTensor {
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    data: view.data().to_vec(),
                },
            );
        }
    }
    Ok(out)
}

fn write_raw(path: &Path, tensors: &BTreeMap<String, RawTensor>) -> Result<()> {
    safetensors::serialize_to_file(tensors.iter().map(|(k, v)| (k.as_str(), v)), None, path)
        .map_err(|e| bad(path, e.to_string()))
}

fn to_f32(name: &str, t: &RawTensor) -> Result<Vec<f32>> {
    let d = &t.data;
    Ok(match t.dtype {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|b| half_to_f32(u16::from_le_bytes([b[0], b[1]])))
            .collect(),
        other => {
            return Err(ModelError::Input(format!(
                "tensor `{name}` has dtype {other:?}; quantizable weights must be F32, BF16 or F16"
            )));
        }
    })
}

fn half_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, f) => {
            return f32::from_bits(sign)
                + (if sign != 0 { -1.0 } else { 1.0 }) * f as f32 * 2f32.powi(-24);
        }
        (31, 0) => sign | 0x7f80_0000,
        (31, f) => sign | 0x7f80_0000 | (f << 13),
        (e, f) => sign | ((e + 112) << 23) | (f << 13),
    };
    f32::from_bits(bits)
}

fn f32_tensor(shape: Vec<usize>, v: &[f32]) -> RawTensor {
    RawTensor {
        dtype: Dtype::F32,
        shape,
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// What a conversion did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConversionReport {
    /// Names of the tensors converted to NVFP4.
    pub converted: Vec<String>,
    /// Tensors copied unchanged.
    pub copied: usize,
    /// Bytes of tensor data read.
    pub bytes_in: usize,
    /// Bytes of tensor data written.
    pub bytes_out: usize,
}

/// Whether `name` is a linear projection weight that NVFP4 applies to.
pub fn is_quantizable(name: &str, t: &RawTensor) -> bool {
    name.ends_with("_proj.weight")
        && t.shape.len() == 2
        && t.shape[1].is_multiple_of(16)
        && t.shape[1] > 0
}

fn copy_side_files(input: &Path, output: &Path) -> Result<Option<Value>> {
    std::fs::create_dir_all(output).map_err(|e| ModelError::io(output, e))?;
    let dir = if input.is_file() {
        input.parent().unwrap_or(Path::new(".")).to_path_buf()
    } else {
        input.to_path_buf()
    };
    for file in [
        TOKENIZER_FILE,
        TOKENIZER_CONFIG_FILE,
        GENERATION_CONFIG_FILE,
    ] {
        let from = dir.join(file);
        if from.is_file() {
            std::fs::copy(&from, output.join(file)).map_err(|e| ModelError::io(&from, e))?;
        }
    }
    let cfg = dir.join(CONFIG_FILE);
    if !cfg.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&cfg).map_err(|e| ModelError::io(&cfg, e))?;
    // Python writes bare Infinity, which is not JSON; the config reader accepts it quoted.
    let fixed = crate::config::quote_nonfinite_literals(&text);
    Ok(Some(
        serde_json::from_str(&fixed).map_err(|e| bad(&cfg, e.to_string()))?,
    ))
}

fn write_config(output: &Path, cfg: &Value) -> Result<()> {
    let p = output.join(CONFIG_FILE);
    std::fs::write(&p, serde_json::to_string_pretty(cfg).expect("serialises"))
        .map_err(|e| ModelError::io(&p, e))
}

/// Reads a checkpoint, returning its NVFP4 projections (ModelOpt layout) as NVFP4 tensors by
/// weight name and every other tensor as f32.
pub fn read_split(
    input: &Path,
) -> Result<(
    BTreeMap<String, candle_core::Tensor>,
    BTreeMap<String, Nvfp4Tensor>,
)> {
    split_raw(&read_raw(input)?)
}

/// Splits raw tensors into f32 tensors and NVFP4 projections (see [`read_split`]).
pub fn split_raw(
    raw: &BTreeMap<String, RawTensor>,
) -> Result<(
    BTreeMap<String, candle_core::Tensor>,
    BTreeMap<String, Nvfp4Tensor>,
)> {
    let mut dense = BTreeMap::new();
    let mut quantized = BTreeMap::new();
    for (name, t) in raw {
        if name.ends_with(".weight_scale") || name.ends_with(".weight_scale_2") {
            continue;
        }
        if let Some(q) = nvfp4_of(raw, name, t)? {
            quantized.insert(name.clone(), q);
            continue;
        }
        let v = to_f32(name, t)?;
        dense.insert(
            name.clone(),
            candle_core::Tensor::from_vec(v, t.shape.clone(), &candle_core::Device::Cpu)?,
        );
    }
    Ok((dense, quantized))
}

/// Reads one safetensors file as raw tensors.
pub fn read_raw_file(path: &Path, bytes: &[u8]) -> Result<BTreeMap<String, RawTensor>> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| bad(path, format!("not a safetensors file: {e}")))?;
    Ok(st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            (
                name,
                RawTensor {
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    data: view.data().to_vec(),
                },
            )
        })
        .collect())
}

/// The NVFP4 tensor stored as `name` (+ `_scale`, `_scale_2`), if it is one.
fn nvfp4_of(
    raw: &BTreeMap<String, RawTensor>,
    name: &str,
    t: &RawTensor,
) -> Result<Option<Nvfp4Tensor>> {
    let Some(base) = name.strip_suffix(".weight") else {
        return Ok(None);
    };
    let (Some(s), Some(s2)) = (
        raw.get(&format!("{base}.weight_scale")),
        raw.get(&format!("{base}.weight_scale_2")),
    ) else {
        return Ok(None);
    };
    if t.dtype != Dtype::U8 || t.shape.len() != 2 || s2.data.len() != 4 {
        return Err(ModelError::Input(format!(
            "`{name}` has NVFP4 scales but is not uint8 [out, in/2] with an f32 `weight_scale_2`"
        )));
    }
    let g = f32::from_le_bytes([s2.data[0], s2.data[1], s2.data[2], s2.data[3]]);
    let q = Nvfp4Tensor::from_parts(
        name,
        t.shape[0],
        t.shape[1] * 2,
        t.data.clone(),
        s.data.clone(),
        g,
    )
    .map_err(|e| ModelError::Input(e.to_string()))?;
    Ok(Some(q))
}

/// Quantizes every projection weight of `input` (a checkpoint directory or a `.safetensors`
/// file) not matched by an `exclude` glob, writing the ModelOpt NVFP4 layout to `output`.
/// `progress(i, n, name)` is called per tensor.
pub fn quantize_checkpoint(
    input: &Path,
    output: &Path,
    exclude: &[String],
    mut progress: impl FnMut(usize, usize, &str),
) -> Result<ConversionReport> {
    let tensors = read_raw(input)?;
    let mut report = ConversionReport {
        bytes_in: tensors.values().map(|t| t.data.len()).sum(),
        ..Default::default()
    };
    let mut out = BTreeMap::new();
    let n = tensors.len();
    for (i, (name, t)) in tensors.iter().enumerate() {
        progress(i + 1, n, name);
        if is_quantizable(name, t) && !exclude.iter().any(|g| glob_match(g, name)) {
            let (rows, cols) = (t.shape[0], t.shape[1]);
            let q = Nvfp4Tensor::quantize(
                name,
                &to_f32(name, t)?,
                rows,
                cols,
                &QuantizeOptions::default(),
            )
            .map_err(|e| ModelError::Input(e.to_string()))?;
            let base = name.strip_suffix(".weight").expect("checked suffix");
            let scale2 = q.global_decode_scale();
            let (_, _, packed, scales, _) = q.into_parts();
            out.insert(
                name.clone(),
                RawTensor {
                    dtype: Dtype::U8,
                    shape: vec![rows, cols / 2],
                    data: packed,
                },
            );
            out.insert(
                format!("{base}.weight_scale"),
                RawTensor {
                    dtype: Dtype::F8_E4M3,
                    shape: vec![rows, cols / 16],
                    data: scales,
                },
            );
            out.insert(
                format!("{base}.weight_scale_2"),
                RawTensor {
                    dtype: Dtype::F32,
                    shape: vec![],
                    data: scale2.to_le_bytes().to_vec(),
                },
            );
            report.converted.push(name.clone());
        } else {
            out.insert(name.clone(), t.clone());
            report.copied += 1;
        }
    }
    report.bytes_out = out.values().map(|t| t.data.len()).sum();
    let cfg = copy_side_files(input, output)?;
    write_raw(&output.join(WEIGHTS_FILE), &out)?;
    if let Some(mut cfg) = cfg {
        cfg["quantization_config"] = json!({"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16, "exclude_modules": exclude});
        write_config(output, &cfg)?;
    }
    Ok(report)
}

/// Turns an NVFP4 checkpoint back into f32 weights.
pub fn dequantize_checkpoint(
    input: &Path,
    output: &Path,
    mut progress: impl FnMut(usize, usize, &str),
) -> Result<ConversionReport> {
    let tensors = read_raw(input)?;
    let mut report = ConversionReport {
        bytes_in: tensors.values().map(|t| t.data.len()).sum(),
        ..Default::default()
    };
    let mut out = BTreeMap::new();
    let n = tensors.len();
    for (i, (name, t)) in tensors.iter().enumerate() {
        progress(i + 1, n, name);
        if name.ends_with(".weight_scale") || name.ends_with(".weight_scale_2") {
            continue;
        }
        match nvfp4_of(&tensors, name, t)? {
            Some(q) => {
                out.insert(
                    name.clone(),
                    f32_tensor(vec![q.rows(), q.cols()], &q.dequantize()),
                );
                report.converted.push(name.clone());
            }
            None => {
                out.insert(name.clone(), t.clone());
                report.copied += 1;
            }
        }
    }
    report.bytes_out = out.values().map(|t| t.data.len()).sum();
    let cfg = copy_side_files(input, output)?;
    write_raw(&output.join(WEIGHTS_FILE), &out)?;
    if let Some(mut cfg) = cfg {
        if let Some(o) = cfg.as_object_mut() {
            o.remove("quantization_config");
        }
        write_config(output, &cfg)?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_decodes() {
        assert_eq!(half_to_f32(0x3c00), 1.0);
        assert_eq!(half_to_f32(0xc000), -2.0);
        assert_eq!(half_to_f32(0x0001), 2f32.powi(-24));
    }
}
