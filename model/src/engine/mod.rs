//! The inference engine: the policy over plain f32 buffers, for rollouts.
//!
//! One call of [`Engine::forward`] advances a *ragged* batch: every sequence brings its own
//! [`SequenceCache`] and any number of new tokens (a whole prompt, one decoded token, or `k+1`
//! tokens to verify MTP drafts). Token-local work (norms, projections, experts) runs on all rows
//! of the batch at once, each routed expert as one GEMM over the rows sent to it (experts in
//! parallel); the recurrences (conv, SSM) and attention run per sequence over its cache, the
//! sequences in parallel on the rayon pool. A sequence's numbers never depend on which thread
//! ran it. Prefill, decoding, speculative verification and continuous batching are therefore one
//! code path. It computes what [`crate::NemotronH`] computes (tests hold them to 1e-4).
//!
//! One file per block, as on the training side: `norm.rs` (RMSNorm and activations), `mamba2.rs`,
//! `attention.rs`, `moe.rs` (MoE and dense MLP), `block.rs` (norm + mixer + residual, one layer
//! of the stack), `mtp.rs` (the MTP head), `cache.rs` (per-sequence decode state), `load.rs`
//! (building from named tensors), `linear.rs` (every projection), and `batch.rs` / `generate.rs`
//! (continuous batching and generation on top of [`Engine::forward`]).

mod attention;
mod batch;
mod block;
mod cache;
mod generate;
mod linear;
mod load;
mod mamba2;
mod moe;
mod mtp;
mod norm;

use std::ops::Range;

/// Re-exported where callers of the engine look for it; it lives in the crate's leaf module
/// because training uses the same rule.
pub use crate::layout::Nvfp4Policy;
pub use batch::{ContinuousBatch, Finished};
pub use cache::SequenceCache;
pub use generate::{FinishReason, Generation, GenerationRequest, MtpStats};
pub use linear::{INT8_MAX_ROWS, LinearOp, PANELS_MIN_ROWS};
pub use load::{EngineOptions, OwnedTensor};

use block::BlockW;
use cache::LayerCache;
use mtp::MtpW;
use norm::rms_norm_rows;

use crate::config::NemotronHConfig;
use crate::error::{ModelError, Result};

/// Which logits a forward call returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsFor {
    /// Only each sequence's last new token (prefill, decoding).
    Last,
    /// Every new token (speculative verification, scoring).
    All,
}

/// One sequence's part of a batch: its cache and the tokens it brings.
pub struct StepInput<'a> {
    /// The sequence's decode state, advanced by the call.
    pub cache: &'a mut SequenceCache,
    /// The new tokens (at least one).
    pub tokens: &'a [u32],
}

/// What a forward call returns.
pub struct StepOutput {
    /// `[rows, vocab]`, rows ordered by sequence then token (one per sequence for `Last`).
    pub logits: Vec<f32>,
    /// For each sequence, the range of its rows in `logits`.
    pub logit_rows: Vec<Range<usize>>,
    /// `[all new tokens, d]`: the last block's output (before `norm_f`), the MTP head's input.
    pub hidden: Vec<f32>,
    /// For each sequence, the range of its rows in `hidden`.
    pub hidden_rows: Vec<Range<usize>>,
}

/// The policy, ready for incremental decoding.
pub struct Engine {
    // Private fields, read by the block files below (children of this module).
    cfg: NemotronHConfig,
    d: usize,
    vocab: usize,
    embeddings: Vec<f32>,
    layers: Vec<BlockW>,
    norm_f: Vec<f32>,
    lm_head: LinearOp,
    mtp: Option<MtpW>,
    /// See [`EngineOptions::batch_invariant`].
    batch_invariant: bool,
}

impl Engine {
    /// The model's config.
    pub fn config(&self) -> &NemotronHConfig {
        &self.cfg
    }

    /// The number of token ids.
    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    /// Whether the model has an MTP head for speculative decoding.
    pub fn has_mtp(&self) -> bool {
        self.mtp.is_some()
    }

    /// An empty cache for a new sequence.
    pub fn new_cache(&self) -> SequenceCache {
        SequenceCache {
            layers: self.layers.iter().map(|b| b.new_cache()).collect(),
            mtp: self.mtp.iter().flat_map(|m| m.new_caches()).collect(),
            len: 0,
            mtp_len: 0,
        }
    }

    fn kv_width(&self) -> usize {
        self.cfg
            .attention
            .as_ref()
            .map(|a| a.num_kv_heads * a.head_dim)
            .unwrap_or(0)
    }

    /// Whether each sequence's numbers are independent of its batch-mates
    /// ([`EngineOptions::batch_invariant`]).
    pub fn is_batch_invariant(&self) -> bool {
        self.batch_invariant
    }

    /// Runs a ragged batch: each sequence's `tokens` are appended to its cache. When `record`
    /// is set, Mamba blocks remember their state before the call and each token's inputs, so
    /// that [`Engine::rewind`] can drop a suffix (speculative decoding) by replaying the rest.
    pub fn forward(
        &self,
        batch: &mut [StepInput],
        which: LogitsFor,
        record: bool,
    ) -> Result<StepOutput> {
        if rayon::current_thread_index().is_none() {
            // Run the step on a worker of the pool: each parallel projection then starts on
            // this thread, which works on its share while a neighbour steals the rest, instead
            // of a caller outside the pool handing every projection over and sleeping until
            // it is done (two thread wake-ups per matrix at batch 1).
            return rayon::scope(|_| self.forward(batch, which, record));
        }
        if !self.batch_invariant || batch.len() <= 1 {
            return self.forward_together(batch, which, record);
        }
        // The projections pick their kernel (GEMV, small-batch, tiled) and loop order from the
        // number of rows, so a row's rounding depends on how many rows share the call. One
        // sequence per call makes the rows those of this sequence alone, whatever joins it.
        let d = self.d;
        let mut out = StepOutput {
            logits: vec![],
            logit_rows: Vec::with_capacity(batch.len()),
            hidden: vec![],
            hidden_rows: Vec::with_capacity(batch.len()),
        };
        for one in batch.chunks_mut(1) {
            let o = self.forward_together(one, which, record)?;
            let (at_logit, at_hidden) = (out.logits.len() / self.vocab, out.hidden.len() / d);
            out.logit_rows
                .push(at_logit..at_logit + o.logits.len() / self.vocab);
            out.hidden_rows
                .push(at_hidden..at_hidden + o.hidden.len() / d);
            out.logits.extend(o.logits);
            out.hidden.extend(o.hidden);
        }
        Ok(out)
    }

    fn forward_together(
        &self,
        batch: &mut [StepInput],
        which: LogitsFor,
        record: bool,
    ) -> Result<StepOutput> {
        let d = self.d;
        let eps = self.cfg.norm_eps as f32;
        let mut seqs = Vec::with_capacity(batch.len());
        let mut x = vec![];
        for s in batch.iter() {
            if s.tokens.is_empty() {
                return Err(ModelError::Input(
                    "a sequence in the batch brings no tokens".into(),
                ));
            }
            let start = x.len() / d;
            for &t in s.tokens {
                let t = t as usize;
                if t >= self.vocab {
                    return Err(ModelError::Input(format!(
                        "token id {t} is outside the vocabulary (size {})",
                        self.vocab
                    )));
                }
                x.extend_from_slice(&self.embeddings[t * d..(t + 1) * d]);
            }
            seqs.push(start..start + s.tokens.len());
        }
        for (li, block) in self.layers.iter().enumerate() {
            let mut caches: Vec<&mut LayerCache> =
                batch.iter_mut().map(|s| &mut s.cache.layers[li]).collect();
            block.forward(&mut x, d, eps, &seqs, &mut caches, record);
        }
        for s in batch.iter_mut() {
            s.cache.len += s.tokens.len();
        }
        let (logits, logit_rows) = self.head(&x, &seqs, which, &self.norm_f);
        Ok(StepOutput {
            logits,
            logit_rows,
            hidden: x,
            hidden_rows: seqs,
        })
    }

    fn head(
        &self,
        x: &[f32],
        seqs: &[Range<usize>],
        which: LogitsFor,
        norm: &[f32],
    ) -> (Vec<f32>, Vec<Range<usize>>) {
        let d = self.d;
        let picked: Vec<usize> = match which {
            LogitsFor::Last => seqs.iter().map(|r| r.end - 1).collect(),
            LogitsFor::All => seqs.iter().flat_map(|r| r.clone()).collect(),
        };
        let mut rows = vec![];
        let mut at = 0;
        for r in seqs {
            let n = if which == LogitsFor::Last { 1 } else { r.len() };
            rows.push(at..at + n);
            at += n;
        }
        let mut sel = Vec::with_capacity(picked.len() * d);
        for &r in &picked {
            sel.extend_from_slice(&x[r * d..(r + 1) * d]);
        }
        let mut normed = vec![0f32; sel.len()];
        rms_norm_rows(&sel, norm, self.cfg.norm_eps as f32, &mut normed);
        let mut logits = vec![0f32; picked.len() * self.vocab];
        self.lm_head.forward(&normed, picked.len(), &mut logits);
        (logits, rows)
    }

    /// Drops the last `drop` tokens of the last forward call from `cache` (which must have been
    /// run with `record`).
    pub fn rewind(&self, cache: &mut SequenceCache, drop: usize) {
        let new_len = cache.len - drop;
        for (block, layer) in self.layers.iter().zip(&mut cache.layers) {
            block.rewind(layer, new_len, drop);
        }
        cache.len = new_len;
    }

    /// Projections stored in NVFP4, out of all projections.
    pub fn nvfp4_projection_count(&self) -> (usize, usize) {
        let ops: Vec<&LinearOp> = self
            .layers
            .iter()
            .chain(self.mtp.iter().flat_map(|m| m.layers.iter()))
            .flat_map(|b| b.projections())
            .collect();
        (ops.iter().filter(|o| o.is_nvfp4()).count(), ops.len())
    }

    /// Bytes of all weights (what one decode step streams from memory).
    pub fn weight_bytes(&self) -> usize {
        self.layers.iter().map(|b| b.weight_bytes()).sum::<usize>() + self.lm_head.weight_bytes()
    }
}

/// Below this many multiply-adds of per-sequence work (recurrences, attention) one thread is
/// faster than handing sequences to the pool.
const PARALLEL_SEQUENCE_WORK: usize = 1 << 16;

/// Splits `buf` (`[rows, width]`) into the rows of each sequence; `seqs` are the consecutive
/// row ranges of a batch, in order.
fn split_rows_mut<'a>(
    mut buf: &'a mut [f32],
    width: usize,
    seqs: &[Range<usize>],
) -> Vec<&'a mut [f32]> {
    let mut parts = Vec::with_capacity(seqs.len());
    let mut at = 0;
    for r in seqs {
        debug_assert_eq!(r.start, at, "sequences' rows are consecutive");
        let (head, rest) = std::mem::take(&mut buf).split_at_mut(r.len() * width);
        parts.push(head);
        buf = rest;
        at = r.end;
    }
    parts
}

/// Runs `f` on every sequence's share of a block's per-sequence work (`work` multiply-adds in
/// all); see [`map_tasks`].
fn for_each_sequence<T: Send>(items: Vec<T>, work: usize, f: impl Fn(T) + Sync + Send) {
    map_tasks(items, work, PARALLEL_SEQUENCE_WORK, f);
}

/// `f` of every item, in item order: on the rayon pool when there are several items and
/// `work` reaches `min_work`, else in order on this thread. Each call of `f` must touch only
/// its own item's data, so results do not depend on the choice.
fn map_tasks<T: Send, R: Send>(
    items: Vec<T>,
    work: usize,
    min_work: usize,
    f: impl Fn(T) -> R + Sync + Send,
) -> Vec<R> {
    use rayon::prelude::*;
    if items.len() > 1 && work >= min_work && rayon::current_num_threads() > 1 {
        items.into_par_iter().map(f).collect()
    } else {
        items.into_iter().map(f).collect()
    }
}
