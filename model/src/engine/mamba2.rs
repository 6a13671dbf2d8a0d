//! The Mamba-2 mixer of the engine: per token, the causal conv over the cached last `K-1`
//! inputs, the selective-state update of every head, and the gated RMSNorm — the recurrent form
//! of what the training side's chunked SSD scan computes over whole sequences.

use super::cache::{LayerCache, Recorded};
use super::linear::LinearOp;
use super::load::Weights;
use super::norm::{silu, softplus};
use super::{for_each_sequence, split_rows_mut};
use crate::config::{MambaConfig, NemotronHConfig};
use crate::error::Result;
use crate::simd;

/// The weights of one Mamba-2 mixer.
pub(super) struct MambaW {
    cfg: MambaConfig,
    in_proj: LinearOp,
    conv_w_t: Vec<f32>, // [K, C]: taps outermost so the per-token loop runs over channels
    conv_b: Vec<f32>,
    dt_bias: Vec<f32>,
    a: Vec<f32>, // -exp(A_log)
    d: Vec<f32>,
    norm_w: Vec<f32>,
    out_proj: LinearOp,
}

impl MambaW {
    /// Reads the mixer under `mx` (`backbone.layers.N.mixer`).
    pub(super) fn load(cfg: &NemotronHConfig, w: &Weights, mx: &str) -> Result<Self> {
        let d = cfg.hidden_size;
        let m = cfg.mamba().clone();
        let conv_b = if m.conv_bias {
            w.vec(&format!("{mx}.conv1d.bias"), &[m.conv_dim()])?
        } else {
            vec![0.0; m.conv_dim()]
        };
        Ok(Self {
            in_proj: w.linear(&format!("{mx}.in_proj"), d, m.in_proj_dim())?,
            conv_w_t: {
                let w = w.vec(
                    &format!("{mx}.conv1d.weight"),
                    &[m.conv_dim(), 1, m.conv_kernel],
                )?;
                let (c, k) = (m.conv_dim(), m.conv_kernel);
                (0..k * c).map(|i| w[(i % c) * k + i / c]).collect()
            },
            conv_b,
            dt_bias: w.vec(&format!("{mx}.dt_bias"), &[m.num_heads])?,
            a: w.vec(&format!("{mx}.A_log"), &[m.num_heads])?
                .iter()
                .map(|v| -v.exp())
                .collect(),
            d: w.vec(&format!("{mx}.D"), &[m.num_heads])?,
            norm_w: w.vec(&format!("{mx}.norm.weight"), &[m.inner()])?,
            out_proj: w.linear(&format!("{mx}.out_proj"), m.inner(), d)?,
            cfg: m,
        })
    }

    /// A fresh cache: zero conv inputs and SSM state.
    pub(super) fn new_cache(&self) -> LayerCache {
        LayerCache::Mamba {
            conv: vec![0.0; (self.cfg.conv_kernel - 1) * self.cfg.conv_dim()],
            ssm: vec![0.0; self.cfg.num_heads * self.cfg.head_dim * self.cfg.state_size],
            recorded: None,
        }
    }

    /// The projections, for counting and sizing.
    pub(super) fn projections(&self) -> [&LinearOp; 2] {
        [&self.in_proj, &self.out_proj]
    }

    /// `h: [rows, d]` → `y_out`, advancing each sequence's conv and SSM state; with `record`,
    /// the state before the call and every token's recurrence inputs are kept so that
    /// [`MambaW::rewind`] can drop a suffix.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward(
        &self,
        h: &[f32],
        rows: usize,
        eps: f32,
        seqs: &[std::ops::Range<usize>],
        caches: &mut [&mut LayerCache],
        record: bool,
        y_out: &mut [f32],
    ) {
        let m = &self.cfg;
        let (inner, cd, nh, hd, ns) = (
            m.inner(),
            m.conv_dim(),
            m.num_heads,
            m.head_dim,
            m.state_size,
        );
        let pw = m.in_proj_dim();
        let mut proj = vec![0f32; rows * pw];
        self.in_proj.forward(h, rows, &mut proj);
        let mut ys = vec![0f32; rows * inner];
        let work: Vec<_> = seqs
            .iter()
            .zip(caches.iter_mut())
            .zip(split_rows_mut(&mut ys, inner, seqs))
            .collect();
        // Each sequence's recurrence is independent of the others': the sequences run in
        // parallel, every one in token order, so a sequence's numbers do not depend on its
        // batch-mates or on the thread that runs it.
        let per_seq = |((range, cache), ys_seq): (
            (&std::ops::Range<usize>, &mut &mut LayerCache),
            &mut [f32],
        )| {
            let LayerCache::Mamba {
                conv,
                ssm,
                recorded,
            } = &mut **cache
            else {
                unreachable!("Mamba block has a Mamba cache")
            };
            let mut xbc = vec![0f32; cd];
            // With `record`, the state before the call (one copy) and each token's inputs to
            // the recurrence, from which `rewind` replays the tokens it keeps.
            *recorded = record.then(|| Recorded {
                conv: conv.clone(),
                ssm: ssm.clone(),
                inputs: Vec::with_capacity(range.len() * (cd + nh)),
            });
            for (r, yr) in range.clone().zip(ys_seq.chunks_exact_mut(inner)) {
                let p = &proj[r * pw..(r + 1) * pw];
                let (z, recurrence_in) = (&p[..inner], &p[inner..]);
                if let Some(rec) = recorded.as_mut() {
                    rec.inputs.extend_from_slice(recurrence_in);
                }
                self.advance(conv, ssm, recurrence_in, &mut xbc, yr);
                // Gated RMSNorm per group.
                let gsz = m.norm_group_size();
                for g in 0..m.n_groups {
                    let seg = g * gsz..(g + 1) * gsz;
                    for i in seg.clone() {
                        yr[i] *= silu(z[i]);
                    }
                    let ms = yr[seg.clone()].iter().map(|v| v * v).sum::<f32>() / gsz as f32;
                    let inv = 1.0 / (ms + eps).sqrt();
                    for i in seg {
                        yr[i] *= inv * self.norm_w[i];
                    }
                }
            }
        };
        for_each_sequence(work, rows * nh * hd * ns, per_seq);
        self.out_proj.forward(&ys, rows, y_out);
    }

    /// One token of the recurrence: the causal conv over the cached inputs (which then take in
    /// this token's), and every head's SSM update; `y[..inner]` gets the heads' outputs before
    /// the gated norm. `recurrence_in` is the token's `[xBC, dt]` part of `in_proj`'s output.
    fn advance(
        &self,
        conv: &mut [f32],
        ssm: &mut [f32],
        recurrence_in: &[f32],
        xbc: &mut [f32],
        y: &mut [f32],
    ) {
        let m = &self.cfg;
        let (inner, cd, nh, hd, ns, kk) = (
            m.inner(),
            m.conv_dim(),
            m.num_heads,
            m.head_dim,
            m.state_size,
            m.conv_kernel,
        );
        let (hpg, gs) = (m.heads_per_group(), m.n_groups * ns);
        let (dt_min, dt_max) = (m.dt_min as f32, m.dt_max as f32);
        let (xbc_in, dt_raw) = recurrence_in.split_at(cd);
        simd::conv_step(&self.conv_w_t, &self.conv_b, conv, xbc_in, xbc);
        if kk > 1 {
            conv.copy_within(cd.., 0);
            conv[(kk - 2) * cd..].copy_from_slice(xbc_in);
        }
        let (xs, bm, cm) = (&xbc[..inner], &xbc[inner..inner + gs], &xbc[inner + gs..]);
        for head in 0..nh {
            let dt = softplus(dt_raw[head] + self.dt_bias[head]).clamp(dt_min, dt_max);
            let da = (dt * self.a[head]).exp();
            let g = head / hpg;
            let (b, c) = (&bm[g * ns..(g + 1) * ns], &cm[g * ns..(g + 1) * ns]);
            let span = head * hd..(head + 1) * hd;
            simd::ssm_head(
                &mut ssm[head * hd * ns..(head + 1) * hd * ns],
                da,
                dt,
                self.d[head],
                &xs[span.clone()],
                b,
                c,
                &mut y[span],
            );
        }
    }

    /// Drops the last `drop` tokens of the last call (made with `record`): the state goes back
    /// to where that call started and the tokens it keeps are replayed, with the same
    /// arithmetic as the call itself, so the state is what it was after them.
    pub(super) fn rewind(&self, cache: &mut LayerCache, drop: usize) {
        let LayerCache::Mamba {
            conv,
            ssm,
            recorded,
        } = cache
        else {
            unreachable!("Mamba block has a Mamba cache")
        };
        let Some(rec) = recorded.take() else {
            assert_eq!(drop, 0, "rewind within the recorded call");
            return;
        };
        if drop == 0 {
            return;
        }
        let width = self.cfg.conv_dim() + self.cfg.num_heads;
        let keep = (rec.inputs.len() / width)
            .checked_sub(drop)
            .expect("rewind within the recorded call");
        conv.copy_from_slice(&rec.conv);
        ssm.copy_from_slice(&rec.ssm);
        let mut xbc = vec![0f32; self.cfg.conv_dim()];
        let mut y = vec![0f32; self.cfg.inner()];
        for token in rec.inputs.chunks_exact(width).take(keep) {
            self.advance(conv, ssm, token, &mut xbc, &mut y);
        }
    }
}
