//! The MTP head of the engine: it pairs each backbone hidden state with the token that followed
//! it and predicts the token after that, drafting tokens for speculative decoding. It keeps its
//! own layers' caches inside each [`SequenceCache`].

use super::block::BlockW;
use super::cache::LayerCache;
use super::linear::LinearOp;
use super::load::Weights;
use super::norm::rms_norm_rows;
use super::{Engine, LogitsFor, SequenceCache};
use crate::config::NemotronHConfig;
use crate::error::{ModelError, Result};

/// The MTP head's cache state before drafting (see [`Engine::mtp_mark`]).
pub(super) struct MtpMark {
    len: usize,
    states: Vec<Option<(Vec<f32>, Vec<f32>)>>,
}

/// The weights of the MTP head (`mtp.*`).
pub(super) struct MtpW {
    enorm: Vec<f32>,
    hnorm: Vec<f32>,
    eh_proj: LinearOp,
    pub(super) layers: Vec<BlockW>,
    norm_f: Vec<f32>,
}

impl MtpW {
    /// Reads the head under `mtp.`.
    pub(super) fn load(cfg: &NemotronHConfig, w: &Weights) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            enorm: w.vec("mtp.enorm.weight", &[d])?,
            hnorm: w.vec("mtp.hnorm.weight", &[d])?,
            eh_proj: w.linear("mtp.eh_proj", 2 * d, d)?,
            layers: cfg
                .mtp_layers
                .iter()
                .enumerate()
                .map(|(i, &k)| BlockW::load(cfg, w, k, &format!("mtp.layers.{i}")))
                .collect::<Result<_>>()?,
            norm_f: w.vec("mtp.norm_f.weight", &[d])?,
        })
    }

    /// New caches for the head's layers.
    pub(super) fn new_caches(&self) -> Vec<LayerCache> {
        self.layers.iter().map(|b| b.new_cache()).collect()
    }
}

impl Engine {
    /// Runs the MTP head over new positions of one sequence: `hidden[i]` (the backbone's, or the
    /// head's own for recursive drafting) paired with the token that followed it. Returns the
    /// head's hidden states and the logits of its last position (predicting the token after
    /// `next_tokens.last()`).
    pub fn mtp_forward(
        &self,
        cache: &mut SequenceCache,
        hidden: &[f32],
        next_tokens: &[u32],
        record: bool,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        if rayon::current_thread_index().is_none() {
            // On a worker of the pool, as `Engine::forward` runs: from outside it, each of the
            // head's parallel projections was handed over and waited for (two thread wake-ups
            // per matrix), which made a one-token head pass cost about half a backbone pass.
            return rayon::scope(|_| self.mtp_forward(cache, hidden, next_tokens, record));
        }
        let mtp = self
            .mtp
            .as_ref()
            .ok_or_else(|| ModelError::Input("this checkpoint has no MTP head".into()))?;
        let d = self.d;
        let n = next_tokens.len();
        if hidden.len() != n * d || n == 0 {
            return Err(ModelError::Input(
                "MTP input needs one hidden state per next token".into(),
            ));
        }
        let eps = self.cfg.norm_eps as f32;
        let mut e = vec![0f32; n * d];
        for (i, &t) in next_tokens.iter().enumerate() {
            let t = t as usize;
            if t >= self.vocab {
                return Err(ModelError::Input(format!(
                    "token id {t} is outside the vocabulary (size {})",
                    self.vocab
                )));
            }
            rms_norm_rows(
                &self.embeddings[t * d..(t + 1) * d],
                &mtp.enorm,
                eps,
                &mut e[i * d..(i + 1) * d],
            );
        }
        let mut hn = vec![0f32; n * d];
        rms_norm_rows(hidden, &mtp.hnorm, eps, &mut hn);
        let mut cat = Vec::with_capacity(n * 2 * d);
        for i in 0..n {
            cat.extend_from_slice(&e[i * d..(i + 1) * d]);
            cat.extend_from_slice(&hn[i * d..(i + 1) * d]);
        }
        let mut x = vec![0f32; n * d];
        mtp.eh_proj.forward(&cat, n, &mut x);
        #[allow(clippy::single_range_in_vec_init)] // one sequence: the rows 0..n
        let seqs = [0..n];
        for (li, block) in mtp.layers.iter().enumerate() {
            let mut caches = [&mut cache.mtp[li]];
            block.forward(&mut x, d, eps, &seqs, &mut caches, record);
        }
        cache.mtp_len += n;
        let (logits, _) = self.head(&x, &seqs, LogitsFor::Last, &mtp.norm_f);
        Ok((x, logits))
    }

    /// Drops the last `drop` positions of the MTP head's cache (`record` must have been set).
    pub fn mtp_rewind(&self, cache: &mut SequenceCache, drop: usize) {
        let new_len = cache.mtp_len - drop;
        if let Some(mtp) = &self.mtp {
            for (block, layer) in mtp.layers.iter().zip(&mut cache.mtp) {
                block.rewind(layer, new_len, drop);
            }
        }
        cache.mtp_len = new_len;
    }

    /// What drafting changes in the head's caches, so that [`Engine::mtp_restore`] can put it
    /// back: attention caches are cut back to today's length (nothing copied), a Mamba layer's
    /// fixed-size state is copied.
    pub(super) fn mtp_mark(&self, cache: &SequenceCache) -> MtpMark {
        MtpMark {
            len: cache.mtp_len,
            states: cache
                .mtp
                .iter()
                .map(|l| match l {
                    LayerCache::Mamba { conv, ssm, .. } => Some((conv.clone(), ssm.clone())),
                    _ => None,
                })
                .collect(),
        }
    }

    /// Puts the head's caches back to `mark`.
    pub(super) fn mtp_restore(&self, cache: &mut SequenceCache, mark: MtpMark) {
        let width = self.kv_width();
        for (layer, state) in cache.mtp.iter_mut().zip(mark.states) {
            match (layer, state) {
                (LayerCache::Attention { keys, values }, _) => {
                    keys.truncate(mark.len * width);
                    values.truncate(mark.len * width);
                }
                (
                    LayerCache::Mamba {
                        conv,
                        ssm,
                        recorded,
                    },
                    Some((c, s)),
                ) => {
                    *conv = c;
                    *ssm = s;
                    *recorded = None;
                }
                _ => {}
            }
        }
        cache.mtp_len = mark.len;
    }
}
