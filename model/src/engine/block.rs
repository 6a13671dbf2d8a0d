//! One layer of the stack: RMSNorm, then the layer's mixer (Mamba-2, attention, MoE or MLP),
//! added back to the residual stream. The backbone and the MTP head are both lists of these.

use std::ops::Range;

use super::attention::AttnW;
use super::cache::LayerCache;
use super::linear::LinearOp;
use super::load::Weights;
use super::mamba2::MambaW;
use super::moe::{MlpW, MoeW};
use super::norm::rms_norm_rows;
use crate::config::{BlockKind, NemotronHConfig};
use crate::error::Result;

/// The mixer of a layer, by kind.
pub(super) enum MixerW {
    Mamba(MambaW),
    Attention(AttnW),
    Moe(Box<MoeW>),
    Mlp(MlpW),
}

/// The weights of one layer.
pub(super) struct BlockW {
    norm: Vec<f32>,
    mixer: MixerW,
}

impl BlockW {
    /// Reads the layer of `kind` under `prefix` (`backbone.layers.N` or `mtp.layers.N`).
    pub(super) fn load(
        cfg: &NemotronHConfig,
        w: &Weights,
        kind: BlockKind,
        prefix: &str,
    ) -> Result<Self> {
        let d = cfg.hidden_size;
        let mx = format!("{prefix}.mixer");
        let mixer = match kind {
            BlockKind::Mamba => MixerW::Mamba(MambaW::load(cfg, w, &mx)?),
            BlockKind::Attention => MixerW::Attention(AttnW::load(cfg, w, &mx)?),
            BlockKind::Moe => MixerW::Moe(Box::new(MoeW::load(cfg, w, &mx)?)),
            BlockKind::Mlp => MixerW::Mlp(MlpW::load(w, &mx, d, cfg.mlp_dim())?),
        };
        Ok(Self {
            norm: w.vec(&format!("{prefix}.norm.weight"), &[d])?,
            mixer,
        })
    }

    /// The state this layer keeps for a new sequence.
    pub(super) fn new_cache(&self) -> LayerCache {
        match &self.mixer {
            MixerW::Mamba(m) => m.new_cache(),
            MixerW::Attention(a) => a.new_cache(),
            MixerW::Moe(_) | MixerW::Mlp(_) => LayerCache::Stateless,
        }
    }

    /// Every projection of the layer (the MoE router gate excluded).
    pub(super) fn projections(&self) -> Vec<&LinearOp> {
        match &self.mixer {
            MixerW::Mamba(m) => m.projections().to_vec(),
            MixerW::Attention(a) => a.projections().to_vec(),
            MixerW::Moe(m) => m.projections(),
            MixerW::Mlp(m) => m.projections().to_vec(),
        }
    }

    /// Bytes of the layer's weights that a decode step streams (projections and router gate).
    pub(super) fn weight_bytes(&self) -> usize {
        let gate = match &self.mixer {
            MixerW::Moe(m) => m.gate_bytes(),
            _ => 0,
        };
        gate + self
            .projections()
            .iter()
            .map(|o| o.weight_bytes())
            .sum::<usize>()
    }

    /// Drops the last `drop` tokens of the last call (made with `record`) from this layer's
    /// cache, leaving `new_len` positions.
    pub(super) fn rewind(&self, cache: &mut LayerCache, new_len: usize, drop: usize) {
        match (&self.mixer, cache) {
            (MixerW::Mamba(m), cache) => m.rewind(cache, drop),
            (MixerW::Attention(a), LayerCache::Attention { keys, values }) => {
                keys.truncate(new_len * a.kv_width());
                values.truncate(new_len * a.kv_width());
            }
            _ => {}
        }
    }

    /// `x: [rows, d]` updated in place: `x += mixer(norm(x))`. `seqs[i]` is the row range of
    /// sequence `i`, `caches[i]` its cache for this block.
    pub(super) fn forward(
        &self,
        x: &mut [f32],
        d: usize,
        eps: f32,
        seqs: &[Range<usize>],
        caches: &mut [&mut LayerCache],
        record: bool,
    ) {
        let rows = x.len() / d;
        let mut h = vec![0f32; x.len()];
        rms_norm_rows(x, &self.norm, eps, &mut h);
        let mut y = vec![0f32; x.len()];
        match &self.mixer {
            MixerW::Mamba(m) => m.forward(&h, rows, eps, seqs, caches, record, &mut y),
            MixerW::Attention(a) => a.forward(&h, rows, seqs, caches, &mut y),
            MixerW::Moe(m) => m.forward(&h, rows, d, &mut y),
            MixerW::Mlp(m) => m.forward(&h, rows, &mut y),
        }
        x.iter_mut().zip(&y).for_each(|(a, b)| *a += b);
    }
}
