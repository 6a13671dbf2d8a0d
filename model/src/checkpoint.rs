//! Checkpoints in HF layout: `config.json` plus `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`; and new random weights from a config and a seed.

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::json;

use crate::config::{BlockKind, NemotronHConfig};
use crate::error::{ModelError, Result};
use crate::params::Params;
use crate::tokenizer::Tokenizer;

/// Adds a tensor by name and shape, its elements from a function of the flat index.
/// Returns whether the model is still within [`MAX_INIT_PARAMETERS`] (a loop over experts
/// stops when it is not).
type AddTensor<'a> = dyn FnMut(String, Vec<usize>, &mut dyn FnMut(usize) -> f32) -> bool + 'a;

pub use crate::layout::{
    CONFIG_FILE, GENERATION_CONFIG_FILE, INDEX_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE,
    WEIGHTS_FILE,
};

/// Most tensors one checkpoint may hold, all shards together (Nemotron 3 Super, NVFP4 with its
/// scales, holds about 200,000). A checkpoint with more is refused before its tensors are read.
pub const MAX_TENSORS: usize = 1 << 20;

/// Most parameters [`init_params`] creates: a `config.json` whose sizes ask for more (or whose
/// shapes overflow) is refused before anything is allocated. Tensors read from a file are
/// bounded by the file itself (safetensors checks that each shape times its dtype's size is
/// its byte range, without overflow).
pub const MAX_INIT_PARAMETERS: usize = 1 << 37;

/// The largest safetensors header (the format's own cap).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// The safetensors files of a checkpoint directory (single file or shards listed by the index),
/// or `path` itself when it is one file. Shards listed by the index must be regular files inside
/// the directory: an index naming `/dev/zero` or `../elsewhere` is refused.
fn weight_files(path: &Path) -> Result<Vec<PathBuf>> {
    Ok(if path.is_file() {
        vec![path.to_path_buf()]
    } else if path.join(INDEX_FILE).is_file() {
        let index_path = path.join(INDEX_FILE);
        let text =
            std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
        let index: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::BadFile {
                path: index_path.clone(),
                message: e.to_string(),
            })?;
        let map = index
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::BadFile {
                path: index_path.clone(),
                message: "no `weight_map` object".into(),
            })?;
        let mut shards = vec![];
        for (tensor, v) in map {
            let bad = |message: String| ModelError::BadFile {
                path: index_path.clone(),
                message: format!("weight_map: `{tensor}`: {message}"),
            };
            let shard = v
                .as_str()
                .ok_or_else(|| bad(format!("{v} is not a shard's file name")))?;
            let inside = Path::new(shard)
                .components()
                .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
            if !inside || shard.is_empty() {
                return Err(bad(format!(
                    "shard `{shard}` is not a file inside the checkpoint directory"
                )));
            }
            shards.push(path.join(shard));
        }
        shards.sort();
        shards.dedup();
        if shards.is_empty() {
            return Err(ModelError::BadFile {
                path: index_path,
                message: "weight_map lists no shard".into(),
            });
        }
        shards
    } else if path.join(WEIGHTS_FILE).is_file() {
        vec![path.join(WEIGHTS_FILE)]
    } else {
        return Err(ModelError::BadFile {
            path: path.to_path_buf(),
            message: format!("no {WEIGHTS_FILE} or {INDEX_FILE} here"),
        });
    })
}

/// The tensor names of a checkpoint, read from the safetensors headers alone.
pub fn tensor_names(path: &Path) -> Result<Vec<String>> {
    use std::io::Read;
    let mut names = vec![];
    for f in weight_files(path)? {
        let bad = |message: String| ModelError::BadFile {
            path: f.clone(),
            message,
        };
        regular_file(&f)?;
        let mut file = std::fs::File::open(&f).map_err(|e| ModelError::io(&f, e))?;
        let mut len = [0u8; 8];
        file.read_exact(&mut len)
            .map_err(|e| ModelError::io(&f, e))?;
        let len = u64::from_le_bytes(len);
        // The format caps its header at 100 MB.
        if len > MAX_HEADER_BYTES {
            return Err(bad(format!("a safetensors header of {len} bytes")));
        }
        let mut header = vec![0u8; len as usize];
        file.read_exact(&mut header)
            .map_err(|e| ModelError::io(&f, e))?;
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&header).map_err(|e| bad(format!("its header: {e}")))?;
        names.extend(
            header
                .into_iter()
                .map(|(k, _)| k)
                .filter(|k| k != "__metadata__"),
        );
        if names.len() > MAX_TENSORS {
            return Err(too_many(&f, names.len()));
        }
    }
    Ok(names)
}

/// Refuses a path that is not a regular file (a device, a FIFO, a directory) before it is read.
fn regular_file(f: &Path) -> Result<()> {
    let meta = std::fs::metadata(f).map_err(|e| ModelError::io(f, e))?;
    if meta.is_file() {
        Ok(())
    } else {
        Err(ModelError::BadFile {
            path: f.to_path_buf(),
            message: "not a regular file".into(),
        })
    }
}

fn too_many(f: &Path, n: usize) -> ModelError {
    ModelError::BadFile {
        path: f.to_path_buf(),
        message: format!(
            "the checkpoint holds {n} tensors with this file; allowed: at most {MAX_TENSORS}"
        ),
    }
}

/// `config.json` of checkpoint `dir`, as the weights beside it allow. transformers'
/// `save_pretrained` keeps `num_nextn_predict_layers` but writes no `mtp.*` tensor (its
/// NemotronH has no MTP head), so such a checkpoint loads without the head, with a warning,
/// instead of failing on the missing tensors.
pub fn load_config(dir: &Path) -> Result<NemotronHConfig> {
    let mut cfg = NemotronHConfig::from_file(dir.join(CONFIG_FILE))?;
    if cfg.has_mtp() && !tensor_names(dir)?.iter().any(|n| n.starts_with("mtp.")) {
        tracing::warn!(
            checkpoint = %dir.display(),
            "{}: config.json declares an MTP head but the weights hold no mtp.* tensor (as \
             transformers saves NemotronH); loaded without it, so MTP speculation and MTP \
             training are off",
            dir.display()
        );
        cfg.drop_mtp();
    }
    Ok(cfg)
}

/// Reads every tensor of a checkpoint directory (single file or sharded) or of one
/// `.safetensors` file, converted to f32 on `device`.
pub fn load_tensors(path: &Path, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    let mut count = 0usize;
    for f in weight_files(path)? {
        regular_file(&f)?;
        let bytes = std::fs::read(&f).map_err(|e| ModelError::io(&f, e))?;
        let names = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| ModelError::BadFile {
                path: f.clone(),
                message: e.to_string(),
            })?
            .1;
        count += names.tensors().len();
        if count > MAX_TENSORS {
            return Err(too_many(&f, count));
        }
        if names
            .tensors()
            .keys()
            .any(|k| k.ends_with(".weight_scale_2"))
        {
            // NVFP4 (ModelOpt) projections are read as raw bytes and expanded to f32.
            let (dense, quantized) =
                crate::quantize::split_raw(&crate::quantize::read_raw_file(&f, &bytes)?)?;
            for (name, t) in dense {
                out.insert(name, t.to_device(device)?);
            }
            for (name, q) in quantized {
                out.insert(
                    name,
                    Tensor::from_vec(q.dequantize(), (q.rows(), q.cols()), device)?,
                );
            }
            continue;
        }
        let tensors = candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| {
            ModelError::BadFile {
                path: f.clone(),
                message: e.to_string(),
            }
        })?;
        for (name, t) in tensors {
            out.insert(name, t.to_dtype(candle_core::DType::F32)?);
        }
    }
    Ok(out)
}

/// Reads `config.json` and the weights of a checkpoint directory.
pub fn load_checkpoint(dir: &Path, device: &Device) -> Result<(NemotronHConfig, Params)> {
    let cfg = load_config(dir)?;
    let params = Params::from_tensors(load_tensors(dir, device)?, device)?;
    Ok((cfg, params))
}

/// Writes `config.json` and the weights to `dir`, in shards of at most `max_shard_bytes`
/// (with an index file) when the weights are larger than that.
pub fn save_checkpoint(
    dir: &Path,
    cfg: &NemotronHConfig,
    params: &Params,
    max_shard_bytes: Option<usize>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let config_path = dir.join(CONFIG_FILE);
    let text = serde_json::to_string_pretty(&cfg.to_json()).expect("JSON value serialises");
    std::fs::write(&config_path, text).map_err(|e| ModelError::io(&config_path, e))?;
    save_tensors(dir, &params.snapshot()?, max_shard_bytes)
}

/// Writes what a policy checkpoint needs beside its weights and `config.json` to open without
/// edits in transformers (`AutoModelForCausalLM`, `AutoTokenizer`) and vLLM: `tokenizer.json`,
/// `tokenizer_config.json` (the BOS, EOS and padding tokens by their text) and
/// `generation_config.json` (their ids, where generation stops).
pub fn save_tokenizer_files(
    dir: &Path,
    cfg: &NemotronHConfig,
    tokenizer: &Tokenizer,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    tokenizer.save(&dir.join(TOKENIZER_FILE))?;
    let mut special = serde_json::Map::new();
    special.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    special.insert("clean_up_tokenization_spaces".into(), json!(false));
    let named = [
        ("bos_token", cfg.bos_token_id),
        ("eos_token", cfg.eos_token_ids.first().copied()),
        ("pad_token", cfg.pad_token_id),
    ];
    for (key, id) in named {
        if let Some(text) = id.and_then(|id| tokenizer.token(id)) {
            special.insert(key.into(), json!(text));
        }
    }
    let mut generation = serde_json::Map::new();
    if let Some(id) = cfg.bos_token_id {
        generation.insert("bos_token_id".into(), json!(id));
    }
    match cfg.eos_token_ids.as_slice() {
        [] => {}
        [one] => {
            generation.insert("eos_token_id".into(), json!(one));
        }
        many => {
            generation.insert("eos_token_id".into(), json!(many));
        }
    }
    if let Some(id) = cfg.pad_token_id {
        generation.insert("pad_token_id".into(), json!(id));
    }
    for (file, value) in [
        (TOKENIZER_CONFIG_FILE, special),
        (GENERATION_CONFIG_FILE, generation),
    ] {
        let path = dir.join(file);
        let text = serde_json::to_string_pretty(&value).expect("JSON value serialises");
        std::fs::write(&path, text).map_err(|e| ModelError::io(&path, e))?;
    }
    Ok(())
}

/// Writes named tensors as `model.safetensors`, or as shards plus an index.
pub fn save_tensors(
    dir: &Path,
    tensors: &BTreeMap<String, Tensor>,
    max_shard_bytes: Option<usize>,
) -> Result<()> {
    let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
    let total: usize = tensors.values().map(bytes).sum();
    let limit = max_shard_bytes.unwrap_or(usize::MAX).max(1);
    let mut shards: Vec<HashMap<String, Tensor>> = vec![HashMap::new()];
    let mut size = 0;
    for (name, t) in tensors {
        if size > 0 && size + bytes(t) > limit {
            shards.push(HashMap::new());
            size = 0;
        }
        size += bytes(t);
        shards
            .last_mut()
            .expect("non-empty")
            .insert(name.clone(), t.clone());
    }
    let write = |file: &Path, shard: &HashMap<String, Tensor>| -> Result<()> {
        candle_core::safetensors::save(shard, file).map_err(|e| ModelError::BadFile {
            path: file.to_path_buf(),
            message: e.to_string(),
        })
    };
    // A stale single file or index next to the new weights would be read instead of them.
    for stale in [WEIGHTS_FILE, INDEX_FILE] {
        let _ = std::fs::remove_file(dir.join(stale));
    }
    if shards.len() == 1 {
        return write(&dir.join(WEIGHTS_FILE), &shards[0]);
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let name = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        write(&dir.join(&name), shard)?;
        for k in shard.keys() {
            weight_map.insert(k.clone(), json!(name));
        }
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let path = dir.join(INDEX_FILE);
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&index).expect("serialises"),
    )
    .map_err(|e| ModelError::io(&path, e))
}

/// Draws from N(0, 1) by Box–Muller, so initialisation depends only on the seed.
fn normal(rng: &mut StdRng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// Initial values in the spirit of HF's `_init_weights` for NemotronH: N(0, 0.02) projections
/// and embeddings, unit norms, `A_log = log(1..=H)`, `D = 1`, `dt_bias` = softplus⁻¹ of a
/// log-uniform dt in [0.001, 0.1], output projections scaled by 1/sqrt(layers).
pub fn init_params(cfg: &NemotronHConfig, seed: u64, device: &Device) -> Result<Params> {
    let mut rng = StdRng::seed_from_u64(seed);
    let std = 0.02f32;
    let d = cfg.hidden_size;
    let out_scale = 1.0 / (cfg.layers.len() as f32).sqrt();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = vec![];
    // Parameters so far; past MAX_INIT_PARAMETERS (or on an overflow) nothing more is
    // allocated and the first tensor that went past is the error.
    let mut total = 0usize;
    let mut too_big: Option<String> = None;
    let mut add = |name: String, shape: Vec<usize>, f: &mut dyn FnMut(usize) -> f32| {
        if too_big.is_some() {
            return false;
        }
        let n = shape.iter().try_fold(1usize, |a, &b| a.checked_mul(b));
        match n.and_then(|n| Some((n, total.checked_add(n)?))) {
            Some((n, t)) if t <= MAX_INIT_PARAMETERS => {
                total = t;
                let v = (0..n).map(&mut *f).collect();
                tensors.push((name, shape, v));
                true
            }
            _ => {
                too_big = Some(format!(
                    "`{name}` of shape {shape:?} takes the model past {MAX_INIT_PARAMETERS} \
                     parameters; allowed: at most {MAX_INIT_PARAMETERS}"
                ));
                false
            }
        }
    };
    let block = |prefix: &str, kind: BlockKind, add: &mut AddTensor<'_>, rng: &mut StdRng| {
        add(format!("{prefix}.norm.weight"), vec![d], &mut |_| 1.0);
        let mx = format!("{prefix}.mixer");
        match kind {
            BlockKind::Mamba => {
                let m = cfg.mamba();
                add(
                    format!("{mx}.in_proj.weight"),
                    vec![m.in_proj_dim(), d],
                    &mut |_| normal(rng) * std,
                );
                let bound = 1.0 / (m.conv_kernel as f32).sqrt();
                add(
                    format!("{mx}.conv1d.weight"),
                    vec![m.conv_dim(), 1, m.conv_kernel],
                    &mut |_| (rng.random::<f32>() * 2.0 - 1.0) * bound,
                );
                if m.conv_bias {
                    add(format!("{mx}.conv1d.bias"), vec![m.conv_dim()], &mut |_| {
                        (rng.random::<f32>() * 2.0 - 1.0) * bound
                    });
                }
                let (lo, hi) = (0.001f64.ln(), 0.1f64.ln());
                add(format!("{mx}.dt_bias"), vec![m.num_heads], &mut |_| {
                    let dt = (lo + rng.random::<f64>() * (hi - lo)).exp().max(1e-4);
                    (dt + (-(-dt).exp_m1()).ln()) as f32
                });
                add(format!("{mx}.A_log"), vec![m.num_heads], &mut |i| {
                    ((i + 1) as f32).ln()
                });
                add(format!("{mx}.D"), vec![m.num_heads], &mut |_| 1.0);
                add(format!("{mx}.norm.weight"), vec![m.inner()], &mut |_| 1.0);
                add(
                    format!("{mx}.out_proj.weight"),
                    vec![d, m.inner()],
                    &mut |_| normal(rng) * std * out_scale,
                );
            }
            BlockKind::Attention => {
                let a = cfg.attention();
                for (n, rows) in [
                    ("q_proj", a.num_heads),
                    ("k_proj", a.num_kv_heads),
                    ("v_proj", a.num_kv_heads),
                ] {
                    add(
                        format!("{mx}.{n}.weight"),
                        vec![rows.saturating_mul(a.head_dim), d],
                        &mut |_| normal(rng) * std,
                    );
                }
                add(
                    format!("{mx}.o_proj.weight"),
                    vec![d, a.num_heads.saturating_mul(a.head_dim)],
                    &mut |_| normal(rng) * std * out_scale,
                );
            }
            BlockKind::Moe => {
                let m = cfg.moe();
                let width = m.latent_size.unwrap_or(d);
                add(
                    format!("{mx}.gate.weight"),
                    vec![m.num_experts, d],
                    &mut |_| normal(rng) * std,
                );
                add(
                    format!("{mx}.gate.e_score_correction_bias"),
                    vec![m.num_experts],
                    &mut |_| 0.0,
                );
                for e in 0..m.num_experts {
                    let up = add(
                        format!("{mx}.experts.{e}.up_proj.weight"),
                        vec![m.expert_dim, width],
                        &mut |_| normal(rng) * std,
                    );
                    let down = add(
                        format!("{mx}.experts.{e}.down_proj.weight"),
                        vec![width, m.expert_dim],
                        &mut |_| normal(rng) * std * out_scale,
                    );
                    if !(up && down) {
                        break;
                    }
                }
                add(
                    format!("{mx}.shared_experts.up_proj.weight"),
                    vec![m.shared_expert_dim, d],
                    &mut |_| normal(rng) * std,
                );
                add(
                    format!("{mx}.shared_experts.down_proj.weight"),
                    vec![d, m.shared_expert_dim],
                    &mut |_| normal(rng) * std * out_scale,
                );
                if let Some(l) = m.latent_size {
                    add(
                        format!("{mx}.fc1_latent_proj.weight"),
                        vec![l, d],
                        &mut |_| normal(rng) * std,
                    );
                    add(
                        format!("{mx}.fc2_latent_proj.weight"),
                        vec![d, l],
                        &mut |_| normal(rng) * std,
                    );
                }
            }
            BlockKind::Mlp => {
                let h = cfg.mlp_dim();
                add(format!("{mx}.up_proj.weight"), vec![h, d], &mut |_| {
                    normal(rng) * std
                });
                add(format!("{mx}.down_proj.weight"), vec![d, h], &mut |_| {
                    normal(rng) * std * out_scale
                });
            }
        }
    };
    add(
        "backbone.embeddings.weight".into(),
        vec![cfg.vocab_size, d],
        &mut |_| normal(&mut rng) * std,
    );
    for (i, &k) in cfg.layers.iter().enumerate() {
        block(&format!("backbone.layers.{i}"), k, &mut add, &mut rng);
    }
    add("backbone.norm_f.weight".into(), vec![d], &mut |_| 1.0);
    if !cfg.tie_word_embeddings {
        add(
            "lm_head.weight".into(),
            vec![cfg.vocab_size, d],
            &mut |_| normal(&mut rng) * std,
        );
    }
    if cfg.has_mtp() {
        for n in ["enorm", "hnorm", "norm_f"] {
            add(format!("mtp.{n}.weight"), vec![d], &mut |_| 1.0);
        }
        add(
            "mtp.eh_proj.weight".into(),
            vec![d, d.saturating_mul(2)],
            &mut |_| normal(&mut rng) * std,
        );
        for (i, &k) in cfg.mtp_layers.iter().enumerate() {
            block(&format!("mtp.layers.{i}"), k, &mut add, &mut rng);
        }
    }
    if let Some(message) = too_big {
        return Err(ModelError::Input(message));
    }
    let tensors = tensors
        .into_iter()
        .map(|(name, shape, v)| Ok((name, Tensor::from_vec(v, shape, device)?)))
        .collect::<Result<Vec<_>>>()?;
    Params::from_tensors(tensors, device)
}
