//! The attention mixer of the engine: grouped-query attention over each sequence's KV cache,
//! without positional encoding (Nemotron-H's attention blocks have none; order comes from the
//! Mamba blocks).

use super::cache::LayerCache;
use super::linear::LinearOp;
use super::load::Weights;
use super::{for_each_sequence, split_rows_mut};
use crate::config::NemotronHConfig;
use crate::error::Result;
use crate::simd;

/// The weights of one attention mixer.
pub(super) struct AttnW {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    q: LinearOp,
    k: LinearOp,
    v: LinearOp,
    o: LinearOp,
}

impl AttnW {
    /// Reads the mixer under `mx` (`backbone.layers.N.mixer`).
    pub(super) fn load(cfg: &NemotronHConfig, w: &Weights, mx: &str) -> Result<Self> {
        let d = cfg.hidden_size;
        let a = cfg.attention();
        Ok(Self {
            heads: a.num_heads,
            kv_heads: a.num_kv_heads,
            head_dim: a.head_dim,
            q: w.linear(&format!("{mx}.q_proj"), d, a.num_heads * a.head_dim)?,
            k: w.linear(&format!("{mx}.k_proj"), d, a.num_kv_heads * a.head_dim)?,
            v: w.linear(&format!("{mx}.v_proj"), d, a.num_kv_heads * a.head_dim)?,
            o: w.linear(&format!("{mx}.o_proj"), a.num_heads * a.head_dim, d)?,
        })
    }

    /// A fresh, empty KV cache.
    pub(super) fn new_cache(&self) -> LayerCache {
        LayerCache::Attention {
            keys: vec![],
            values: vec![],
        }
    }

    /// Floats per position in each of the key and value caches.
    pub(super) fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// The projections, for counting and sizing.
    pub(super) fn projections(&self) -> [&LinearOp; 4] {
        [&self.q, &self.k, &self.v, &self.o]
    }

    /// `h: [rows, d]` → `y_out`; each sequence's new keys and values are appended to its cache
    /// and every new token attends to all positions up to its own.
    pub(super) fn forward(
        &self,
        h: &[f32],
        rows: usize,
        seqs: &[std::ops::Range<usize>],
        caches: &mut [&mut LayerCache],
        y_out: &mut [f32],
    ) {
        let (nh, kvh, hd) = (self.heads, self.kv_heads, self.head_dim);
        let group = nh / kvh;
        let kvw = kvh * hd;
        let mut q = vec![0f32; rows * nh * hd];
        let mut k = vec![0f32; rows * kvw];
        let mut v = vec![0f32; rows * kvw];
        self.q.forward(h, rows, &mut q);
        self.k.forward(h, rows, &mut k);
        self.v.forward(h, rows, &mut v);
        let scale = 1.0 / (hd as f32).sqrt();
        let mut out = vec![0f32; rows * nh * hd];
        // Work of the attention loops: new tokens times the positions each attends to.
        let attended: usize = seqs
            .iter()
            .zip(caches.iter())
            .map(|(r, c)| match &**c {
                LayerCache::Attention { keys, .. } => r.len() * (keys.len() / kvw + r.len()),
                _ => 0,
            })
            .sum();
        let work: Vec<_> = seqs
            .iter()
            .zip(caches.iter_mut())
            .zip(split_rows_mut(&mut out, nh * hd, seqs))
            .collect();
        let per_seq = |((range, cache), out_seq): (
            (&std::ops::Range<usize>, &mut &mut LayerCache),
            &mut [f32],
        )| {
            let LayerCache::Attention { keys, values } = &mut **cache else {
                unreachable!("attention block has a KV cache")
            };
            let mut scores = vec![];
            let before = keys.len() / kvw;
            keys.extend_from_slice(&k[range.start * kvw..range.end * kvw]);
            values.extend_from_slice(&v[range.start * kvw..range.end * kvw]);
            for (i, (r, o_row)) in range
                .clone()
                .zip(out_seq.chunks_exact_mut(nh * hd))
                .enumerate()
            {
                let visible = before + i + 1;
                for head in 0..nh {
                    let kv = head / group;
                    let qh = &q[(r * nh + head) * hd..(r * nh + head + 1) * hd];
                    let o = &mut o_row[head * hd..(head + 1) * hd];
                    simd::attend_head(
                        qh,
                        keys,
                        values,
                        kvw,
                        kv * hd,
                        visible,
                        scale,
                        &mut scores,
                        o,
                    );
                }
            }
        };
        for_each_sequence(work, attended * nh * hd, per_seq);
        self.o.forward(&out, rows, y_out);
    }
}
