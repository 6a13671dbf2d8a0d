//! Names shared by every part of the crate: the checkpoint's file names, `*`/`?` globs over
//! tensor names, and [`Nvfp4Policy`], the rule that says which projections run in NVFP4.
//!
//! The engine (inference), [`crate::nn::Linear`] (training through NVFP4), checkpoints and the
//! ModelOpt converter all need these, so they live in this leaf module, which imports nothing
//! from the crate: whatever depends on it, no import cycle can run through it.

use serde::{Deserialize, Serialize};

/// The config file of a checkpoint directory (HF layout).
pub const CONFIG_FILE: &str = "config.json";
/// The weights of an unsharded checkpoint.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The index that lists the shards of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The tokenizer of a checkpoint (HF `tokenizers` format).
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The tokenizer's settings for transformers' `AutoTokenizer` (its special tokens).
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// The token ids generation starts, pads and stops with (transformers, vLLM).
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";

/// Whether `name` matches `pattern`, where `*` stands for any run of characters (including
/// none) and `?` for exactly one.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            // Backtrack: let the last `*` swallow one more character.
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Which projections become NVFP4, for the engine and for training alike (one rule, so the
/// learner trains through exactly the weights the workers sample from). Embeddings, `lm_head`,
/// router gates and norms always stay in full precision, as the Nemotron recipe keeps them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Nvfp4Policy {
    /// Keep attention projections (`q_proj`, `k_proj`, `v_proj`, `o_proj`) in f32.
    pub keep_attention: bool,
    /// Further tensors to keep in f32, as `*`/`?` globs over weight names.
    pub exclude: Vec<String>,
}

impl Nvfp4Policy {
    /// Whether the projection weight `weight_name` with input width `in_dim` becomes NVFP4.
    pub fn quantizes(&self, weight_name: &str, in_dim: usize) -> bool {
        let attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
            .iter()
            .any(|p| weight_name.ends_with(&format!(".{p}.weight")));
        weight_name.ends_with("_proj.weight")
            && in_dim.is_multiple_of(16)
            && !(self.keep_attention && attention)
            && !self.exclude.iter().any(|g| glob_match(g, weight_name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_whole_names() {
        assert!(glob_match(
            "backbone.layers.*.mixer.q_proj.weight",
            "backbone.layers.12.mixer.q_proj.weight"
        ));
        assert!(glob_match("mtp.*", "mtp.eh_proj.weight"));
        assert!(!glob_match("mtp.*", "backbone.mtp"));
        assert!(glob_match("layers.?.x", "layers.3.x"));
        assert!(!glob_match("layers.?.x", "layers.13.x"));
        assert!(glob_match("*", ""));
        assert!(glob_match(
            "backbone.layers.?.mixer.*",
            "backbone.layers.3.mixer.in_proj.weight"
        ));
        assert!(!glob_match(
            "backbone.layers.?.mixer.*",
            "backbone.layers.13.mixer.in_proj.weight"
        ));
    }

    #[test]
    fn the_policy_quantizes_projections_with_blockable_inputs_only() {
        let all = Nvfp4Policy::default();
        assert!(all.quantizes("backbone.layers.0.mixer.in_proj.weight", 64));
        assert!(!all.quantizes("backbone.layers.0.mixer.in_proj.weight", 40));
        assert!(!all.quantizes("backbone.layers.0.mixer.gate.weight", 64));
        assert!(!all.quantizes("backbone.embeddings.weight", 64));
        assert!(all.quantizes("backbone.layers.1.mixer.q_proj.weight", 64));
        let keep = Nvfp4Policy {
            keep_attention: true,
            exclude: vec!["mtp.*".into()],
        };
        assert!(!keep.quantizes("backbone.layers.1.mixer.q_proj.weight", 64));
        assert!(!keep.quantizes("mtp.eh_proj.weight", 64));
        assert!(keep.quantizes("backbone.layers.0.mixer.out_proj.weight", 64));
    }
}
