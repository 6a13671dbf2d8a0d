//! The NemotronH causal LM for full sequences (training, scoring, parity), built bottom-up from
//! its blocks: `backbone.embeddings` → blocks (pre-RMSNorm → mixer → residual) → `backbone.norm_f`
//! → `lm_head`, plus the optional MTP head (`mtp.*`).

use candle_core::{D, Tensor};

use crate::attention::Attention;
use crate::config::{BlockKind, NemotronHConfig};
use crate::error::Result;
use crate::mamba2::Mamba2;
use crate::moe::{ExpertLoad, LoadCounter, Mlp, Moe};
use crate::nn::{Linear, RmsNorm};
use crate::params::{ParamPath, Params};

/// The mixer of one block.
#[derive(Clone, Debug)]
pub enum Mixer {
    /// A Mamba-2 mixer.
    Mamba(Mamba2),
    /// Attention.
    Attention(Attention),
    /// A (Latent)MoE.
    Moe(Moe),
    /// A dense relu² MLP.
    Mlp(Mlp),
}

/// One residual block: `x + mixer(norm(x))`.
#[derive(Clone, Debug)]
pub struct Block {
    norm: RmsNorm,
    mixer: Mixer,
}

impl Block {
    /// Builds a block of `kind` from the tensors under `p` (`backbone.layers.N`).
    pub fn new(cfg: &NemotronHConfig, kind: BlockKind, p: &ParamPath) -> Result<Self> {
        let m = p.pp("mixer");
        let mixer = match kind {
            BlockKind::Mamba => Mixer::Mamba(Mamba2::new(cfg, &m)?),
            BlockKind::Attention => Mixer::Attention(Attention::new(cfg, &m)?),
            BlockKind::Moe => Mixer::Moe(Moe::new(cfg, &m)?),
            BlockKind::Mlp => Mixer::Mlp(Mlp::new(&m, cfg.hidden_size, cfg.mlp_dim())?),
        };
        Ok(Self {
            norm: RmsNorm::new(&p.pp("norm"), cfg.hidden_size, cfg.norm_eps)?,
            mixer,
        })
    }

    /// `x: [B, T, d]` → `x + mixer(norm(x))`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_counting(x, None)
    }

    /// [`Block::forward`], counting a MoE mixer's routing into `counter`.
    fn forward_counting(
        &self,
        x: &Tensor,
        counter: Option<&mut LoadCounter<'_>>,
    ) -> Result<Tensor> {
        let h = crate::fused::apply_rms_norm(&self.norm, x)?;
        let y = match &self.mixer {
            Mixer::Mamba(m) => m.forward(&h)?,
            Mixer::Attention(a) => a.forward(&h)?,
            Mixer::Moe(m) => m.forward_counting(&h, counter)?,
            Mixer::Mlp(m) => m.forward(&h)?,
        };
        Ok((x + y)?)
    }
}

/// Chorus' multi-token-prediction head: `eh_proj([enorm(embed(t+1)); hnorm(h_t)])` through its
/// own blocks (`mtp_layers_block_type`, by default attention + MoE) and `norm_f`, sharing the
/// backbone's embedding and `lm_head`. Applied to its own output it predicts one more token.
#[derive(Clone, Debug)]
pub struct MtpHead {
    enorm: RmsNorm,
    hnorm: RmsNorm,
    eh_proj: Linear,
    layers: Vec<Block>,
    norm_f: RmsNorm,
}

impl MtpHead {
    /// Builds the head from the tensors under `p` (`mtp`).
    pub fn new(cfg: &NemotronHConfig, p: &ParamPath) -> Result<Self> {
        let d = cfg.hidden_size;
        let layers = cfg
            .mtp_layers
            .iter()
            .enumerate()
            .map(|(i, &k)| Block::new(cfg, k, &p.pp("layers").pp(i)))
            .collect::<Result<_>>()?;
        Ok(Self {
            enorm: RmsNorm::new(&p.pp("enorm"), d, cfg.norm_eps)?,
            hnorm: RmsNorm::new(&p.pp("hnorm"), d, cfg.norm_eps)?,
            eh_proj: Linear::new(&p.pp("eh_proj"), 2 * d, d)?,
            layers,
            norm_f: RmsNorm::new(&p.pp("norm_f"), d, cfg.norm_eps)?,
        })
    }

    /// `next_embeds, hidden: [B, T, d]` → the head's hidden state `[B, T, d]` (before `norm_f`).
    pub fn forward(&self, next_embeds: &Tensor, hidden: &Tensor) -> Result<Tensor> {
        let x = Tensor::cat(
            &[
                &crate::fused::apply_rms_norm(&self.enorm, next_embeds)?,
                &crate::fused::apply_rms_norm(&self.hnorm, hidden)?,
            ],
            D::Minus1,
        )?;
        let mut h = crate::fused::apply_linear(&self.eh_proj, &x)?;
        for b in &self.layers {
            h = b.forward(&h)?;
        }
        Ok(h)
    }

    /// The head's final norm.
    pub fn norm_f(&self) -> &RmsNorm {
        &self.norm_f
    }
}

/// The whole policy for full-sequence computation.
#[derive(Clone, Debug)]
pub struct NemotronH {
    cfg: NemotronHConfig,
    embeddings: Tensor,
    layers: Vec<Block>,
    norm_f: RmsNorm,
    lm_head: Linear,
    mtp: Option<MtpHead>,
}

impl NemotronH {
    /// Builds the model over `params` (which it shares: training the `Var`s trains the model).
    pub fn new(cfg: &NemotronHConfig, params: &Params) -> Result<Self> {
        Self::build(cfg, params.root())
    }

    /// Builds the model over `params` with the projections that `policy` quantizes running
    /// their forward pass through NVFP4 (straight-through gradients), so that training sees the
    /// weights NVFP4 rollout workers sample from.
    pub fn new_nvfp4(
        cfg: &NemotronHConfig,
        params: &Params,
        policy: &crate::Nvfp4Policy,
    ) -> Result<Self> {
        Self::build(cfg, params.root_nvfp4(policy))
    }

    fn build(cfg: &NemotronHConfig, root: crate::params::ParamPath<'_>) -> Result<Self> {
        let bb = root.pp("backbone");
        let d = cfg.hidden_size;
        let embeddings = bb.pp("embeddings").get("weight", &[cfg.vocab_size, d])?;
        let layers = cfg
            .layers
            .iter()
            .enumerate()
            .map(|(i, &k)| Block::new(cfg, k, &bb.pp("layers").pp(i)))
            .collect::<Result<_>>()?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::from_weight(embeddings.clone())
        } else {
            Linear::new(&root.pp("lm_head"), d, cfg.vocab_size)?
        };
        let mtp = if cfg.has_mtp() {
            Some(MtpHead::new(cfg, &root.pp("mtp"))?)
        } else {
            None
        };
        Ok(Self {
            cfg: cfg.clone(),
            embeddings,
            layers,
            norm_f: RmsNorm::new(&bb.pp("norm_f"), d, cfg.norm_eps)?,
            lm_head,
            mtp,
        })
    }

    /// The model's config.
    pub fn config(&self) -> &NemotronHConfig {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &candle_core::Device {
        self.embeddings.device()
    }

    /// `ids: [B, T]` (u32 or i64) → embeddings `[B, T, d]`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let flat = ids.flatten_all()?.to_dtype(candle_core::DType::U32)?;
        Ok(self
            .embeddings
            .index_select(&flat, 0)?
            .reshape((b, t, self.cfg.hidden_size))?)
    }

    /// `ids: [B, T]` → the last block's output `[B, T, d]` (before `norm_f`).
    pub fn hidden(&self, ids: &Tensor) -> Result<Tensor> {
        self.hidden_counting(ids, None)
    }

    fn hidden_counting(
        &self,
        ids: &Tensor,
        mut counter: Option<&mut LoadCounter<'_>>,
    ) -> Result<Tensor> {
        let mut h = self.embed(ids)?;
        for b in &self.layers {
            h = b.forward_counting(&h, counter.as_deref_mut())?;
        }
        Ok(h)
    }

    /// The backbone's final norm (`backbone.norm_f`), which [`NemotronH::logits`] applies before
    /// `lm_head`: heads other than `lm_head` (a reward model's score) read the same normed state.
    pub fn norm_f(&self) -> &RmsNorm {
        &self.norm_f
    }

    /// `norm_f` then `lm_head`: `[B, T, d]` → logits `[B, T, V]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        crate::fused::apply_linear(
            &self.lm_head,
            &crate::fused::apply_rms_norm(&self.norm_f, hidden)?,
        )
    }

    /// One full forward pass without cache: `ids: [B, T]` → logits `[B, T, V]`. Right padding is
    /// harmless (the model is causal); mask padded positions in the loss.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.logits(&self.hidden(ids)?)
    }

    /// [`NemotronH::forward`] (the same logits, bit for bit), also adding to `load` how many
    /// tokens each backbone MoE block routed to each expert: over the positions where `counted`
    /// (`[B*T]`, row-major like `ids`) is true, or over every position when it is `None`. The
    /// learner counts only real tokens, not right padding, for load balancing.
    pub fn forward_counting_experts(
        &self,
        ids: &Tensor,
        counted: Option<&[bool]>,
        load: &mut ExpertLoad,
    ) -> Result<Tensor> {
        let mut counter = LoadCounter {
            rows: counted,
            load,
        };
        self.logits(&self.hidden_counting(ids, Some(&mut counter))?)
    }

    /// The MTP head's predictions at depths 1..=`depth` from the backbone's `hidden` for `ids`:
    /// element `k-1` is `[B, T-k, V]`, where position `t` predicts `ids[t+k+1]`. Empty without a head.
    pub fn mtp_logits(&self, ids: &Tensor, hidden: &Tensor, depth: usize) -> Result<Vec<Tensor>> {
        let Some(head) = &self.mtp else {
            return Ok(vec![]);
        };
        let t = ids.dim(1)?;
        let embeds = self.embed(ids)?;
        let mut h = hidden.clone();
        let mut out = vec![];
        for k in 1..=depth.min(t.saturating_sub(1)) {
            let len = t - k;
            let next = embeds.narrow(1, k, len)?;
            h = head.forward(&next, &h.narrow(1, 0, len)?)?;
            out.push(crate::fused::apply_linear(
                &self.lm_head,
                &crate::fused::apply_rms_norm(head.norm_f(), &h)?,
            )?);
        }
        Ok(out)
    }

    /// Whether the checkpoint has an MTP head.
    pub fn has_mtp(&self) -> bool {
        self.mtp.is_some()
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::checkpoint::init_params;

    fn tiny_moe() -> (NemotronH, NemotronHConfig) {
        let cfg = NemotronHConfig::from_json_str(
            r#"{"model_type": "nemotron_h", "vocab_size": 24, "hidden_size": 16,
            "hybrid_override_pattern": "E*E", "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 8, "n_routed_experts": 4,
            "num_experts_per_tok": 2, "moe_intermediate_size": 8,
            "moe_shared_expert_intermediate_size": 8}"#,
        )
        .unwrap();
        let params = init_params(&cfg, 3, &Device::Cpu).unwrap();
        (NemotronH::new(&cfg, &params).unwrap(), cfg)
    }

    #[test]
    fn counting_experts_changes_no_logit_and_counts_only_the_rows_asked() {
        let (model, _) = tiny_moe();
        let ids = Tensor::new(&[[1u32, 5, 7, 9, 2], [3, 4, 0, 0, 0]], &Device::Cpu).unwrap();
        let plain: Vec<f32> = model
            .forward(&ids)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut all = ExpertLoad::new();
        let counted = model
            .forward_counting_experts(&ids, None, &mut all)
            .unwrap();
        let counted: Vec<f32> = counted.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(plain, counted, "counting changed the forward pass");
        let names: Vec<&str> = all.blocks().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "backbone.layers.0.mixer.gate.e_score_correction_bias",
                "backbone.layers.2.mixer.gate.e_score_correction_bias"
            ]
        );
        // Every row chooses top_k = 2 experts in every block.
        for (_, counts) in all.blocks() {
            assert_eq!(counts.iter().sum::<u64>(), 10 * 2);
        }
        // Right padding left out: 5 + 2 real tokens.
        let real = [
            true, true, true, true, true, true, true, false, false, false,
        ];
        let mut some = ExpertLoad::new();
        model
            .forward_counting_experts(&ids, Some(&real), &mut some)
            .unwrap();
        for (_, counts) in some.blocks() {
            assert_eq!(counts.iter().sum::<u64>(), 7 * 2);
        }
        // Passes add up.
        let mut twice = all.clone();
        twice.merge(&all);
        let name = "backbone.layers.0.mixer.gate.e_score_correction_bias";
        let doubled: Vec<u64> = all.get(name).unwrap().iter().map(|c| 2 * c).collect();
        assert_eq!(twice.get(name).unwrap(), doubled.as_slice());
        let e = model
            .forward_counting_experts(&ids, Some(&real[..4]), &mut ExpertLoad::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("4 rows to count for 10"), "{e}");
    }
}
