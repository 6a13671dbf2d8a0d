//! `config.json` of HF `model_type = "nemotron_h"`, read in two stages: [`RawConfig`] mirrors the
//! file (every key optional, HF spellings), [`NemotronHConfig`] is resolved and validated, with
//! derived sizes as methods. Chorus' own settings live under the `"chorus"` key ([`ChorusSettings`]),
//! whose `Default` is the one place their defaults are written.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{ModelError, Result};

/// The mixer of one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockKind {
    /// Mamba-2 selective state-space mixer (`M`, `linear_attention`, `mamba`).
    Mamba,
    /// Grouped-query attention without positional embeddings (`*`, `full_attention`, `attention`).
    Attention,
    /// Sigmoid-routed mixture of relu² experts with a shared expert (`E`, `moe`).
    Moe,
    /// Dense relu² MLP (`-`, `mlp`).
    Mlp,
}

impl BlockKind {
    const ALLOWED_NAMES: &'static str =
        "linear_attention|mamba, full_attention|attention, moe, mlp";
    const ALLOWED_LETTERS: &'static str = "M (Mamba-2), * (attention), E (MoE), - (MLP)";

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "linear_attention" | "mamba" | "mamba2" => Some(Self::Mamba),
            "full_attention" | "attention" => Some(Self::Attention),
            "moe" => Some(Self::Moe),
            "mlp" => Some(Self::Mlp),
            _ => None,
        }
    }

    fn from_letter(c: char) -> Option<Self> {
        match c {
            'M' => Some(Self::Mamba),
            '*' => Some(Self::Attention),
            'E' => Some(Self::Moe),
            '-' => Some(Self::Mlp),
            _ => None,
        }
    }

    /// The name HF writes in `layers_block_type`.
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Mamba => "linear_attention",
            Self::Attention => "full_attention",
            Self::Moe => "moe",
            Self::Mlp => "mlp",
        }
    }

    /// The letter of `hybrid_override_pattern`.
    pub fn letter(self) -> char {
        match self {
            Self::Mamba => 'M',
            Self::Attention => '*',
            Self::Moe => 'E',
            Self::Mlp => '-',
        }
    }
}

/// Settings that are Chorus' own (HF ignores them). `Default` is where their defaults live.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChorusSettings {
    /// How many future tokens the MTP head is trained to predict by applying it recursively
    /// (Nemotron 3 Super: 2), and the default number of drafts for speculative decoding.
    pub mtp_depth: usize,
    /// Weight of the MTP loss relative to the main next-token loss (Nemotron 3 Super: 0.3).
    pub mtp_loss_scale: f64,
}

impl Default for ChorusSettings {
    fn default() -> Self {
        Self {
            mtp_depth: 2,
            mtp_loss_scale: 0.3,
        }
    }
}

/// `config.json` as written by HF, every key optional so that errors can name what is missing.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawConfig {
    /// `"nemotron_h"`; anything else is refused.
    pub model_type: Option<String>,
    /// Number of token ids.
    pub vocab_size: Option<usize>,
    /// Width of the residual stream.
    pub hidden_size: Option<usize>,
    /// Number of blocks; checked against the pattern.
    pub num_hidden_layers: Option<usize>,
    /// Kind of each block by name (`mamba`, `attention`, `moe`, `mlp`).
    pub layers_block_type: Option<Vec<String>>,
    /// Kind of each block as one character each (`M`, `*`, `E`, `-`).
    pub hybrid_override_pattern: Option<String>,
    /// Epsilon of every RMSNorm.
    pub layer_norm_epsilon: Option<f64>,
    /// Whether `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: Option<bool>,
    // Mamba-2
    /// Mamba-2 heads.
    pub mamba_num_heads: Option<usize>,
    /// Width of each Mamba-2 head.
    pub mamba_head_dim: Option<usize>,
    /// SSM state size per head.
    pub ssm_state_size: Option<usize>,
    /// Groups sharing B and C.
    pub n_groups: Option<usize>,
    /// Taps of the causal convolution.
    pub conv_kernel: Option<usize>,
    /// Chunk length of the SSD scan.
    pub chunk_size: Option<usize>,
    /// Whether the convolution has a bias.
    pub use_conv_bias: Option<bool>,
    /// Whether Mamba projections have a bias (HF's older name).
    pub use_bias: Option<bool>,
    /// Whether Mamba projections have a bias.
    pub mamba_proj_bias: Option<bool>,
    /// Activation of the Mamba block; only `silu` is supported.
    pub mamba_hidden_act: Option<String>,
    /// Lower clamp of dt (HF's reference path).
    pub time_step_min: Option<f64>,
    /// `[min, max]` clamp of dt (HF's fused kernels).
    pub time_step_limit: Option<Value>,
    // attention
    /// Query heads of attention blocks.
    pub num_attention_heads: Option<usize>,
    /// Key/value heads of attention blocks.
    pub num_key_value_heads: Option<usize>,
    /// Width of each attention head.
    pub head_dim: Option<usize>,
    /// Whether attention projections have a bias; only `false` is supported.
    pub attention_bias: Option<bool>,
    // dense MLP
    /// Hidden width of dense MLP blocks.
    pub intermediate_size: Option<usize>,
    /// Activation of MLP and expert blocks; only `relu2` is supported.
    pub mlp_hidden_act: Option<String>,
    /// Whether MLP projections have a bias; only `false` is supported.
    pub mlp_bias: Option<bool>,
    // MoE
    /// Routed experts per MoE block.
    pub n_routed_experts: Option<usize>,
    /// Experts each token is routed to.
    pub num_experts_per_tok: Option<usize>,
    /// Hidden width of each routed expert.
    pub moe_intermediate_size: Option<usize>,
    /// Hidden width of the shared expert.
    pub moe_shared_expert_intermediate_size: Option<usize>,
    /// LatentMoE: width the routed experts run at (`None`: the full width).
    pub moe_latent_size: Option<usize>,
    /// Scale of the routed experts' combined output.
    pub routed_scaling_factor: Option<f64>,
    /// Whether the top-k routing weights are renormalised to sum to one.
    pub norm_topk_prob: Option<bool>,
    /// Expert groups for group-limited routing.
    pub n_group: Option<usize>,
    /// Groups each token may route into.
    pub topk_group: Option<usize>,
    /// Number of shared experts; only one is supported.
    pub n_shared_experts: Option<usize>,
    // MTP
    /// Blocks of the MTP head (0: no head).
    pub num_nextn_predict_layers: Option<usize>,
    /// Kind of each MTP block by name.
    pub mtp_layers_block_type: Option<Vec<String>>,
    // special tokens
    /// Beginning-of-sequence token id.
    pub bos_token_id: Option<Value>,
    /// End-of-sequence token id, or a list of them.
    pub eos_token_id: Option<Value>,
    /// Padding token id.
    pub pad_token_id: Option<Value>,
    /// Chorus' own settings (the `"chorus"` key).
    pub chorus: Option<ChorusSettings>,
}

/// Mamba-2 sizes.
#[derive(Debug, Clone, PartialEq)]
pub struct MambaConfig {
    /// Heads.
    pub num_heads: usize,
    /// Width of each head.
    pub head_dim: usize,
    /// SSM state size per head.
    pub state_size: usize,
    /// Groups sharing B and C.
    pub n_groups: usize,
    /// Taps of the causal convolution.
    pub conv_kernel: usize,
    /// Chunk length of the SSD scan.
    pub chunk_size: usize,
    /// Whether the convolution has a bias.
    pub conv_bias: bool,
    /// Whether `in_proj` and `out_proj` have a bias.
    pub proj_bias: bool,
    /// Lower bound of dt after softplus. HF's reference (PyTorch) path clamps to
    /// `time_step_min`; the fused kernels clamp to `time_step_limit`. Chorus applies both bounds.
    pub dt_min: f64,
    /// Upper bound of dt after softplus (see `dt_min`).
    pub dt_max: f64,
}

impl MambaConfig {
    /// Width of the SSM input and output (`num_heads * head_dim`).
    pub fn inner(&self) -> usize {
        self.num_heads * self.head_dim
    }
    /// Channels of the causal convolution: x, B and C.
    pub fn conv_dim(&self) -> usize {
        self.inner() + 2 * self.n_groups * self.state_size
    }
    /// Output width of `in_proj`: z, xBC and dt.
    pub fn in_proj_dim(&self) -> usize {
        self.inner() + self.conv_dim() + self.num_heads
    }
    /// Heads that share one B/C group.
    pub fn heads_per_group(&self) -> usize {
        self.num_heads / self.n_groups
    }
    /// Width of one group of the gated RMSNorm.
    pub fn norm_group_size(&self) -> usize {
        self.inner() / self.n_groups
    }
}

/// Attention sizes.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionConfig {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention).
    pub num_kv_heads: usize,
    /// Width of each head.
    pub head_dim: usize,
}

impl AttentionConfig {
    /// Query heads per key/value head.
    pub fn group(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }
}

/// Mixture-of-experts sizes and routing constants.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    /// Routed experts.
    pub num_experts: usize,
    /// Experts each token is routed to.
    pub top_k: usize,
    /// Hidden width of each routed expert.
    pub expert_dim: usize,
    /// Hidden width of the shared expert.
    pub shared_expert_dim: usize,
    /// LatentMoE: width the routed experts run at (`None`: the full width).
    pub latent_size: Option<usize>,
    /// Scale of the routed experts' combined output.
    pub routed_scaling_factor: f64,
    /// Whether the top-k routing weights are renormalised to sum to one.
    pub norm_topk_prob: bool,
    /// Expert groups for group-limited routing.
    pub n_group: usize,
    /// Groups each token may route into.
    pub topk_group: usize,
}

/// A resolved, validated NemotronH configuration.
#[derive(Debug, Clone)]
pub struct NemotronHConfig {
    /// Number of token ids.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Kind of each backbone block, in order.
    pub layers: Vec<BlockKind>,
    /// Epsilon of every RMSNorm.
    pub norm_eps: f64,
    /// Whether `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Mamba-2 sizes, when the model has Mamba blocks.
    pub mamba: Option<MambaConfig>,
    /// Attention sizes, when the model has attention blocks.
    pub attention: Option<AttentionConfig>,
    /// Hidden width of dense MLP blocks, when it has any.
    pub mlp_dim: Option<usize>,
    /// MoE sizes, when the model has MoE blocks.
    pub moe: Option<MoeConfig>,
    /// Blocks of the MTP head; empty when the checkpoint has none.
    pub mtp_layers: Vec<BlockKind>,
    /// Beginning-of-sequence token id.
    pub bos_token_id: Option<u32>,
    /// Tokens that end a generation.
    pub eos_token_ids: Vec<u32>,
    /// Padding token id.
    pub pad_token_id: Option<u32>,
    /// Chorus' own settings.
    pub chorus: ChorusSettings,
    /// The file's JSON, kept so that saving writes back every key, known or not.
    raw_json: Value,
}

/// Replaces the bare `Infinity`, `-Infinity` and `NaN` tokens that Python's json writes (invalid
/// JSON) with strings, leaving string contents untouched.
pub(crate) fn quote_nonfinite_literals(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_string = true;
        }
        let mut replaced = false;
        for lit in ["-Infinity", "Infinity", "NaN"] {
            if rest.starts_with(lit) {
                out.push('"');
                out.push_str(lit);
                out.push('"');
                rest = &rest[lit.len()..];
                replaced = true;
                break;
            }
        }
        if !replaced {
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

fn float_value(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "infinity" | "inf" | "+inf" | "+infinity" => Some(f64::INFINITY),
            "-infinity" | "-inf" => Some(f64::NEG_INFINITY),
            other => other.parse().ok(),
        },
        Value::Object(map) => map.get("__float__").and_then(float_value),
        _ => None,
    }
}

fn token_ids(key: &str, v: &Option<Value>) -> Result<Vec<u32>> {
    let bad = || ModelError::config(key, "must be a token id, a list of token ids or null");
    match v {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Number(n)) => Ok(vec![n.as_u64().ok_or_else(bad)? as u32]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_u64().map(|x| x as u32).ok_or_else(bad))
            .collect(),
        Some(_) => Err(bad()),
    }
}

fn required<T: Copy>(key: &str, v: Option<T>, why: &str) -> Result<T> {
    v.ok_or_else(|| ModelError::config(key, format!("missing (required {why})")))
}

fn positive(key: &str, v: Option<usize>, why: &str) -> Result<usize> {
    let v = required(key, v, why)?;
    if v == 0 {
        return Err(ModelError::config(key, "must be greater than 0"));
    }
    Ok(v)
}

fn divides(key: &str, what: usize, by_key: &str, by: usize) -> Result<()> {
    if by == 0 || !what.is_multiple_of(by) {
        return Err(ModelError::config(
            key,
            format!("{what} is not divisible by `{by_key}` = {by}"),
        ));
    }
    Ok(())
}

fn parse_block_list(key: &str, names: &[String]) -> Result<Vec<BlockKind>> {
    names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            BlockKind::from_name(n).ok_or_else(|| {
                ModelError::config(
                    format!("{key}[{i}]"),
                    format!(
                        "unknown block type `{n}`; allowed: {}",
                        BlockKind::ALLOWED_NAMES
                    ),
                )
            })
        })
        .collect()
}

fn parse_pattern(key: &str, pattern: &str) -> Result<Vec<BlockKind>> {
    pattern
        .chars()
        .enumerate()
        .map(|(i, c)| {
            BlockKind::from_letter(c).ok_or_else(|| {
                ModelError::config(
                    key,
                    format!(
                        "unknown block letter `{c}` at position {i}; allowed: {}",
                        BlockKind::ALLOWED_LETTERS
                    ),
                )
            })
        })
        .collect()
}

impl NemotronHConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json_str(&text).map_err(|e| match e {
            ModelError::Config { key, message } => ModelError::BadFile {
                path: path.to_path_buf(),
                message: format!("config key `{key}`: {message}"),
            },
            other => other,
        })
    }

    /// Parses and validates the text of a `config.json`.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let raw_json: Value = serde_json::from_str(&quote_nonfinite_literals(text))
            .map_err(|e| ModelError::config("<file>", format!("not valid JSON: {e}")))?;
        let raw: RawConfig = serde_json::from_value(raw_json.clone())
            .map_err(|e| ModelError::config("<file>", format!("{e}")))?;
        Self::resolve(raw, raw_json)
    }

    fn resolve(raw: RawConfig, raw_json: Value) -> Result<Self> {
        if let Some(t) = &raw.model_type
            && t != "nemotron_h"
        {
            return Err(ModelError::config(
                "model_type",
                format!("`{t}` is not supported; allowed: nemotron_h"),
            ));
        }
        let vocab_size = positive("vocab_size", raw.vocab_size, "always")?;
        let hidden_size = positive("hidden_size", raw.hidden_size, "always")?;
        let layers = match (&raw.layers_block_type, &raw.hybrid_override_pattern) {
            (Some(list), _) => parse_block_list("layers_block_type", list)?,
            (None, Some(p)) => parse_pattern("hybrid_override_pattern", p)?,
            (None, None) => {
                return Err(ModelError::config(
                    "layers_block_type",
                    "missing (give `layers_block_type` or `hybrid_override_pattern`)",
                ));
            }
        };
        if layers.is_empty() {
            return Err(ModelError::config(
                "layers_block_type",
                "must list at least one block",
            ));
        }
        if let Some(n) = raw.num_hidden_layers
            && n != layers.len()
        {
            return Err(ModelError::config(
                "num_hidden_layers",
                format!("is {n} but the block pattern has {} blocks", layers.len()),
            ));
        }
        let num_mtp = raw.num_nextn_predict_layers.unwrap_or(0);
        let mtp_layers = if num_mtp == 0 {
            vec![]
        } else {
            if num_mtp != 1 {
                return Err(ModelError::config(
                    "num_nextn_predict_layers",
                    format!(
                        "{num_mtp} is not supported; allowed: 0 or 1 (one MTP head applied recursively)"
                    ),
                ));
            }
            match &raw.mtp_layers_block_type {
                Some(list) => parse_block_list("mtp_layers_block_type", list)?,
                None => vec![BlockKind::Attention, BlockKind::Moe],
            }
        };
        let uses = |k: BlockKind| layers.contains(&k) || mtp_layers.contains(&k);

        let mamba = if uses(BlockKind::Mamba) {
            let why = "by Mamba-2 blocks";
            let m = MambaConfig {
                num_heads: positive("mamba_num_heads", raw.mamba_num_heads, why)?,
                head_dim: positive("mamba_head_dim", raw.mamba_head_dim, why)?,
                state_size: positive("ssm_state_size", raw.ssm_state_size, why)?,
                n_groups: positive("n_groups", raw.n_groups, why)?,
                conv_kernel: positive("conv_kernel", raw.conv_kernel, why)?,
                chunk_size: positive("chunk_size", raw.chunk_size, why)?,
                conv_bias: raw.use_conv_bias.unwrap_or(true),
                proj_bias: raw.mamba_proj_bias.or(raw.use_bias).unwrap_or(false),
                dt_min: 0.0,
                dt_max: f64::INFINITY,
            };
            if let Some(act) = &raw.mamba_hidden_act
                && act != "silu"
                && act != "swish"
            {
                return Err(ModelError::config(
                    "mamba_hidden_act",
                    format!("`{act}` is not supported; allowed: silu"),
                ));
            }
            if m.proj_bias {
                return Err(ModelError::config(
                    "use_bias",
                    "biases on Mamba projections are not supported; allowed: false",
                ));
            }
            divides("mamba_num_heads", m.num_heads, "n_groups", m.n_groups)?;
            let (lo, hi) = match &raw.time_step_limit {
                None | Some(Value::Null) => (0.0, f64::INFINITY),
                Some(Value::Array(items)) if items.len() == 2 => {
                    match (float_value(&items[0]), float_value(&items[1])) {
                        (Some(lo), Some(hi)) if lo <= hi => (lo, hi),
                        _ => {
                            return Err(ModelError::config(
                                "time_step_limit",
                                "must be [low, high] with numbers, \"Infinity\" or {\"__float__\": \"Infinity\"}",
                            ));
                        }
                    }
                }
                Some(_) => {
                    return Err(ModelError::config(
                        "time_step_limit",
                        "must be a two-element list [low, high]",
                    ));
                }
            };
            let time_step_min = raw.time_step_min.unwrap_or(0.001);
            Some(MambaConfig {
                dt_min: lo.max(time_step_min),
                dt_max: hi,
                ..m
            })
        } else {
            None
        };

        let attention = if uses(BlockKind::Attention) {
            let why = "by attention blocks";
            let num_heads = positive("num_attention_heads", raw.num_attention_heads, why)?;
            let num_kv_heads = positive("num_key_value_heads", raw.num_key_value_heads, why)?;
            divides(
                "num_attention_heads",
                num_heads,
                "num_key_value_heads",
                num_kv_heads,
            )?;
            let head_dim = match raw.head_dim {
                Some(h) => h,
                None => {
                    divides("hidden_size", hidden_size, "num_attention_heads", num_heads)?;
                    hidden_size / num_heads
                }
            };
            if raw.attention_bias == Some(true) {
                return Err(ModelError::config(
                    "attention_bias",
                    "attention biases are not supported; allowed: false",
                ));
            }
            Some(AttentionConfig {
                num_heads,
                num_kv_heads,
                head_dim,
            })
        } else {
            None
        };

        for (key, act) in [("mlp_hidden_act", &raw.mlp_hidden_act)] {
            if let Some(a) = act
                && a != "relu2"
            {
                return Err(ModelError::config(
                    key,
                    format!("`{a}` is not supported; allowed: relu2"),
                ));
            }
        }
        if raw.mlp_bias == Some(true) {
            return Err(ModelError::config(
                "mlp_bias",
                "MLP biases are not supported; allowed: false",
            ));
        }
        let mlp_dim = if uses(BlockKind::Mlp) {
            Some(positive(
                "intermediate_size",
                raw.intermediate_size,
                "by MLP blocks",
            )?)
        } else {
            None
        };

        let moe = if uses(BlockKind::Moe) {
            let why = "by MoE blocks";
            let num_experts = positive("n_routed_experts", raw.n_routed_experts, why)?;
            let top_k = positive("num_experts_per_tok", raw.num_experts_per_tok, why)?;
            if top_k > num_experts {
                return Err(ModelError::config(
                    "num_experts_per_tok",
                    format!("{top_k} is more than `n_routed_experts` = {num_experts}"),
                ));
            }
            let n_group = raw.n_group.unwrap_or(1).max(1);
            let topk_group = raw.topk_group.unwrap_or(1).max(1);
            divides("n_routed_experts", num_experts, "n_group", n_group)?;
            if topk_group > n_group {
                return Err(ModelError::config(
                    "topk_group",
                    format!("{topk_group} is more than `n_group` = {n_group}"),
                ));
            }
            if raw.n_shared_experts.unwrap_or(1) != 1 {
                return Err(ModelError::config(
                    "n_shared_experts",
                    "only one shared expert is supported; allowed: 1",
                ));
            }
            Some(MoeConfig {
                num_experts,
                top_k,
                expert_dim: positive("moe_intermediate_size", raw.moe_intermediate_size, why)?,
                shared_expert_dim: positive(
                    "moe_shared_expert_intermediate_size",
                    raw.moe_shared_expert_intermediate_size,
                    why,
                )?,
                latent_size: match raw.moe_latent_size {
                    Some(0) => {
                        return Err(ModelError::config("moe_latent_size", "must be > 0 or null"));
                    }
                    other => other,
                },
                routed_scaling_factor: raw.routed_scaling_factor.unwrap_or(1.0),
                norm_topk_prob: raw.norm_topk_prob.unwrap_or(true),
                n_group,
                topk_group,
            })
        } else {
            None
        };

        let eos_token_ids = token_ids("eos_token_id", &raw.eos_token_id)?;
        let one = |key: &str, v: &Option<Value>| -> Result<Option<u32>> {
            Ok(token_ids(key, v)?.first().copied())
        };
        Ok(Self {
            vocab_size,
            hidden_size,
            layers,
            norm_eps: raw.layer_norm_epsilon.unwrap_or(1e-5),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            mamba,
            attention,
            mlp_dim,
            moe,
            mtp_layers,
            bos_token_id: one("bos_token_id", &raw.bos_token_id)?,
            eos_token_ids,
            pad_token_id: one("pad_token_id", &raw.pad_token_id)?,
            chorus: raw.chorus.unwrap_or_default(),
            raw_json,
        })
    }

    /// The Mamba-2 sizes; only called for configs that have Mamba blocks.
    pub fn mamba(&self) -> &MambaConfig {
        self.mamba
            .as_ref()
            .expect("validated: config has Mamba blocks")
    }
    /// The attention sizes; only called for configs that have attention blocks.
    pub fn attention(&self) -> &AttentionConfig {
        self.attention
            .as_ref()
            .expect("validated: config has attention blocks")
    }
    /// The MoE sizes; only called for configs that have MoE blocks.
    pub fn moe(&self) -> &MoeConfig {
        self.moe.as_ref().expect("validated: config has MoE blocks")
    }
    /// Width of the dense MLP; only called for configs that have MLP blocks.
    pub fn mlp_dim(&self) -> usize {
        self.mlp_dim.expect("validated: config has MLP blocks")
    }
    /// Whether the checkpoint has an MTP head.
    pub fn has_mtp(&self) -> bool {
        !self.mtp_layers.is_empty()
    }
    /// The block pattern as `hybrid_override_pattern` letters.
    pub fn pattern(&self) -> String {
        self.layers.iter().map(|b| b.letter()).collect()
    }

    /// The same policy without its MTP head (for weights that have none): `config.json` then
    /// says so too (`num_nextn_predict_layers = 0`).
    pub fn drop_mtp(&mut self) {
        self.mtp_layers.clear();
        if let Value::Object(map) = &mut self.raw_json {
            map.insert("num_nextn_predict_layers".into(), 0.into());
            map.remove("mtp_layers_block_type");
        }
    }

    /// The JSON to write as `config.json`: the original keys, with the Chorus settings in force.
    pub fn to_json(&self) -> Value {
        let mut v = self.raw_json.clone();
        if let Value::Object(map) = &mut v {
            map.insert(
                "chorus".into(),
                serde_json::to_value(&self.chorus).expect("settings serialise"),
            );
            map.entry("num_hidden_layers")
                .or_insert(self.layers.len().into());
            // Non-finite bounds in the form transformers (5.x) writes and reads; a bare
            // `Infinity` or the string "Infinity" is refused by transformers and vLLM.
            if let Some(Value::Array(bounds)) = map.get_mut("time_step_limit") {
                for bound in bounds.iter_mut() {
                    if let Some(x) = float_value(bound).filter(|x| !x.is_finite()) {
                        let word = match x {
                            x if x > 0.0 => "Infinity",
                            x if x < 0.0 => "-Infinity",
                            _ => "NaN",
                        };
                        *bound = serde_json::json!({ "__float__": word });
                    }
                }
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"{
        "model_type": "nemotron_h", "vocab_size": 64, "hidden_size": 32,
        "hybrid_override_pattern": "ME*-",
        "mamba_num_heads": 4, "mamba_head_dim": 8, "ssm_state_size": 8, "n_groups": 2,
        "conv_kernel": 4, "chunk_size": 8,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "intermediate_size": 48,
        "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
        "moe_shared_expert_intermediate_size": 16, "routed_scaling_factor": 2.5,
        "eos_token_id": 2, "time_step_limit": TSL
    }"#;

    fn with(tsl: &str) -> Result<NemotronHConfig> {
        NemotronHConfig::from_json_str(&BASE.replace("TSL", tsl))
    }

    #[test]
    fn time_step_limit_in_every_form() {
        for tsl in [
            "[0.0, Infinity]",
            r#"[0.0, {"__float__": "Infinity"}]"#,
            "null",
            r#"[0.0, "inf"]"#,
        ] {
            let c = with(tsl).unwrap();
            assert_eq!(c.mamba().dt_max, f64::INFINITY, "{tsl}");
            assert_eq!(c.mamba().dt_min, 0.001, "{tsl}");
            // Written in transformers' current form, which reads back the same.
            let written = c.to_json();
            if tsl != "null" {
                assert_eq!(
                    written["time_step_limit"],
                    serde_json::json!([0.0, {"__float__": "Infinity"}]),
                    "{tsl}"
                );
            }
            let again = NemotronHConfig::from_json_str(&written.to_string()).unwrap();
            assert_eq!(again.mamba().dt_max, f64::INFINITY, "{tsl}");
        }
        let c = with("[0.01, 0.5]").unwrap();
        assert_eq!((c.mamba().dt_min, c.mamba().dt_max), (0.01, 0.5));
        assert_eq!(
            c.to_json()["time_step_limit"],
            serde_json::json!([0.01, 0.5])
        );
        let bad = with("[1.0]").unwrap_err().to_string();
        assert!(bad.contains("time_step_limit"), "{bad}");
    }

    #[test]
    fn pattern_and_block_list_agree() {
        let c = with("null").unwrap();
        assert_eq!(c.pattern(), "ME*-");
        let text = BASE.replace("TSL", "null").replace(
            r#""hybrid_override_pattern": "ME*-""#,
            r#""layers_block_type": ["mamba", "moe", "full_attention", "mlp"]"#,
        );
        assert_eq!(
            NemotronHConfig::from_json_str(&text).unwrap().layers,
            c.layers
        );
    }

    #[test]
    fn errors_name_the_key() {
        let unknown = BASE.replace("TSL", "null").replace("ME*-", "MX*-");
        let e = NemotronHConfig::from_json_str(&unknown)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("hybrid_override_pattern") && e.contains('X') && e.contains("allowed"),
            "{e}"
        );

        let indivisible = BASE
            .replace("TSL", "null")
            .replace(r#""num_key_value_heads": 2"#, r#""num_key_value_heads": 3"#);
        let e = NemotronHConfig::from_json_str(&indivisible)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("num_attention_heads") && e.contains("num_key_value_heads"),
            "{e}"
        );

        let missing = BASE
            .replace("TSL", "null")
            .replace(r#""ssm_state_size": 8,"#, "");
        let e = NemotronHConfig::from_json_str(&missing)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ssm_state_size") && e.contains("missing"), "{e}");

        let groups = BASE
            .replace("TSL", "null")
            .replace(r#""n_groups": 2"#, r#""n_groups": 3"#);
        let e = NemotronHConfig::from_json_str(&groups)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("mamba_num_heads") && e.contains("n_groups"),
            "{e}"
        );
    }

    #[test]
    fn keys_of_absent_block_kinds_are_not_required() {
        let text = r#"{"vocab_size": 10, "hidden_size": 8, "hybrid_override_pattern": "-",
                       "intermediate_size": 16}"#;
        let c = NemotronHConfig::from_json_str(text).unwrap();
        assert!(c.mamba.is_none() && c.moe.is_none() && c.attention.is_none());
    }

    #[test]
    fn nonfinite_literals_inside_strings_are_left_alone() {
        assert_eq!(
            quote_nonfinite_literals(r#"{"a": "NaN x", "b": -Infinity}"#),
            r#"{"a": "NaN x", "b": "-Infinity"}"#
        );
    }

    #[test]
    fn saving_keeps_unknown_keys() {
        let c = with("null").unwrap();
        let back = NemotronHConfig::from_json_str(&c.to_json().to_string()).unwrap();
        assert_eq!(back.layers, c.layers);
        assert_eq!(back.chorus, ChorusSettings::default());
    }
}
