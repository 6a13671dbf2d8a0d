//! Feed-forward blocks: the dense relu² MLP (`-`) and the sigmoid-routed mixture of relu² experts
//! with a shared expert (`E`), optionally working in a latent width (LatentMoE).
//!
//! Routing ([`route`]) is plain Rust over scores so that the training model and the inference
//! engine choose experts by the same code.
//!
//! The training forward pass can also count how many tokens each block routed to each expert
//! ([`ExpertLoad`]): aux-loss-free load balancing (DeepSeek-V3, Nemotron 3) moves
//! `e_score_correction_bias` by those counts between steps. Counting reads the routing decisions
//! the forward pass makes anyway; it changes no number the pass computes.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};

use crate::config::{MoeConfig, NemotronHConfig};
use crate::error::{ModelError, Result};
use crate::nn::{Linear, sigmoid};
use crate::params::ParamPath;

/// `down(relu(up(x))²)`.
#[derive(Clone, Debug)]
pub struct Mlp {
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    pub fn new(p: &ParamPath, dim: usize, hidden: usize) -> Result<Self> {
        Ok(Self {
            up_proj: Linear::new(&p.pp("up_proj"), dim, hidden)?,
            down_proj: Linear::new(&p.pp("down_proj"), hidden, dim)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::fused::apply_linear(
            &self.down_proj,
            &crate::fused::apply_relu2(&crate::fused::apply_linear(&self.up_proj, x)?)?,
        )
    }
}

/// Chooses `top_k` experts for one token from its sigmoid scores.
///
/// `e_score_correction_bias` is added only to choose (grouped top-k as in DeepSeek-V3 / HF:
/// groups ranked by the sum of their two best biased scores); the returned weights are the
/// unbiased scores of the chosen experts, normalised over the top-k when `norm_topk_prob`,
/// times `routed_scaling_factor`.
pub fn route(scores: &[f32], bias: &[f32], cfg: &MoeConfig, chosen: &mut Vec<(usize, f32)>) {
    let e = cfg.num_experts;
    let biased: Vec<f32> = scores.iter().zip(bias).map(|(s, b)| s + b).collect();
    let mut allowed = vec![true; e];
    if cfg.n_group > 1 && cfg.topk_group < cfg.n_group {
        let per = e / cfg.n_group;
        let mut group_scores: Vec<(usize, f32)> = (0..cfg.n_group)
            .map(|g| {
                let mut v: Vec<f32> = biased[g * per..(g + 1) * per].to_vec();
                v.sort_by(|a, b| b.total_cmp(a));
                (g, v.iter().take(2).sum())
            })
            .collect();
        group_scores.sort_by(|a, b| b.1.total_cmp(&a.1));
        allowed.iter_mut().for_each(|a| *a = false);
        for &(g, _) in group_scores.iter().take(cfg.topk_group) {
            allowed[g * per..(g + 1) * per]
                .iter_mut()
                .for_each(|a| *a = true);
        }
    }
    let mut order: Vec<usize> = (0..e).filter(|&i| allowed[i]).collect();
    // Stable order on ties: the lower expert index wins, as a sorted top-k would pick it.
    order.sort_by(|&a, &b| biased[b].total_cmp(&biased[a]).then(a.cmp(&b)));
    chosen.clear();
    chosen.extend(order.iter().take(cfg.top_k).map(|&i| (i, scores[i])));
    let denom = if cfg.norm_topk_prob {
        chosen.iter().map(|c| c.1).sum::<f32>() + 1e-20
    } else {
        1.0
    };
    let scale = cfg.routed_scaling_factor as f32;
    for c in chosen.iter_mut() {
        c.1 = c.1 / denom * scale;
    }
}

/// How many tokens each MoE block routed to each of its experts, accumulated over forward
/// passes; blocks are named by their `e_score_correction_bias` tensor, the parameter that load
/// balancing moves by these counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExpertLoad {
    by_block: BTreeMap<String, Vec<u64>>,
}

impl ExpertLoad {
    /// No tokens counted yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The counts of every block that routed at least once, by bias tensor name: element `i` is
    /// the number of (token, slot) choices of expert `i`, so a block's counts sum to `top_k`
    /// times its counted tokens.
    pub fn blocks(&self) -> impl Iterator<Item = (&str, &[u64])> {
        self.by_block
            .iter()
            .map(|(name, counts)| (name.as_str(), counts.as_slice()))
    }

    /// The counts of the block whose bias tensor is `bias_name`.
    pub fn get(&self, bias_name: &str) -> Option<&[u64]> {
        self.by_block.get(bias_name).map(Vec::as_slice)
    }

    /// Whether nothing was counted.
    pub fn is_empty(&self) -> bool {
        self.by_block.is_empty()
    }

    /// Adds the counts of `other` (e.g. of another forward pass of the same step).
    pub fn merge(&mut self, other: &ExpertLoad) {
        for (name, counts) in &other.by_block {
            let mine = self.counts_mut(name, counts.len());
            for (m, c) in mine.iter_mut().zip(counts) {
                *m += c;
            }
        }
    }

    fn counts_mut(&mut self, bias_name: &str, experts: usize) -> &mut Vec<u64> {
        self.by_block
            .entry(bias_name.to_string())
            .or_insert_with(|| vec![0; experts])
    }
}

/// Where a forward pass counts its routing: into `load`, over the token rows (`[B*T]`, row-major
/// like the input) where `rows` is true (e.g. leaving right padding out), or over every row when
/// `rows` is `None`.
pub(crate) struct LoadCounter<'a> {
    pub(crate) rows: Option<&'a [bool]>,
    pub(crate) load: &'a mut ExpertLoad,
}

/// Mixture-of-experts weights of one block.
#[derive(Clone, Debug)]
pub struct Moe {
    cfg: MoeConfig,
    gate: Tensor,
    score_bias: Tensor,
    /// The full name of `score_bias`, which names the block in an [`ExpertLoad`].
    score_bias_name: String,
    experts: Vec<Mlp>,
    /// The experts' `up_proj` and `down_proj` weights as fused tensors (`[E, out, in]`), when
    /// the store holds them so and no expert's forward pass is quantized: the fused experts op
    /// reads them as they are instead of stacking the experts' weights every call.
    fused: Option<(Tensor, Tensor)>,
    shared: Mlp,
    latent: Option<(Linear, Linear)>,
}

/// Reads the routed experts, in either HF layout: one tensor per expert
/// (`experts.N.up_proj.weight`, as checkpoints are saved) or fused 3-D tensors
/// (`experts.up_proj` `[E, out, in]`, as [`crate::params::Params`] keeps them); with the
/// fused tensors where they were read so and no expert is quantized (see [`Moe::fused`]).
#[allow(clippy::type_complexity)]
fn load_experts(
    p: &ParamPath,
    cfg: &MoeConfig,
    width: usize,
) -> Result<(Vec<Mlp>, Option<(Tensor, Tensor)>)> {
    let experts = p.pp("experts");
    if experts.contains("up_proj") {
        let up = experts.get("up_proj", &[cfg.num_experts, cfg.expert_dim, width])?;
        let down = experts.get("down_proj", &[cfg.num_experts, width, cfg.expert_dim])?;
        let each = (0..cfg.num_experts)
            .map(|i| {
                Ok(Mlp {
                    up_proj: Linear::from_weight(up.get(i)?)
                        .with_nvfp4(experts.pp(i).pp("up_proj").nvfp4_weight("weight", width)),
                    down_proj: Linear::from_weight(down.get(i)?).with_nvfp4(
                        experts
                            .pp(i)
                            .pp("down_proj")
                            .nvfp4_weight("weight", cfg.expert_dim),
                    ),
                })
            })
            .collect::<Result<Vec<Mlp>>>()?;
        let quantized = each
            .iter()
            .any(|e| e.up_proj.is_nvfp4() || e.down_proj.is_nvfp4());
        return Ok((each, (!quantized).then_some((up, down))));
    }
    let each = (0..cfg.num_experts)
        .map(|i| Mlp::new(&experts.pp(i), width, cfg.expert_dim))
        .collect::<Result<Vec<_>>>()?;
    Ok((each, None))
}

impl Moe {
    pub fn new(cfg: &NemotronHConfig, p: &ParamPath) -> Result<Self> {
        let m = cfg.moe().clone();
        let d = cfg.hidden_size;
        let width = m.latent_size.unwrap_or(d);
        let latent = match m.latent_size {
            Some(l) => Some((
                Linear::new(&p.pp("fc1_latent_proj"), d, l)?,
                Linear::new(&p.pp("fc2_latent_proj"), l, d)?,
            )),
            None => None,
        };
        let (experts, fused) = load_experts(p, &m, width)?;
        Ok(Self {
            gate: p.pp("gate").get("weight", &[m.num_experts, d])?,
            score_bias: p
                .pp("gate")
                .get("e_score_correction_bias", &[m.num_experts])?,
            score_bias_name: p.pp("gate").name("e_score_correction_bias"),
            experts,
            fused,
            shared: Mlp::new(&p.pp("shared_experts"), d, m.shared_expert_dim)?,
            latent,
            cfg: m,
        })
    }

    /// `x: [B, T, d]` → `[B, T, d]`. Gradients reach the router through the chosen scores.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_counting(x, None)
    }

    /// [`Moe::forward`], also adding the experts each counted token row is routed to into
    /// `counter`'s load.
    pub(crate) fn forward_counting(
        &self,
        x: &Tensor,
        counter: Option<&mut LoadCounter<'_>>,
    ) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let d = *dims.last().expect("rank >= 1");
        let flat = x.reshape(((), d))?;
        let n = flat.dim(0)?;
        if let Some(rows) = counter.as_ref().and_then(|c| c.rows)
            && rows.len() != n
        {
            return Err(ModelError::Input(format!(
                "{}: {} rows to count for {n} token rows",
                self.score_bias_name,
                rows.len()
            )));
        }
        let mut counts = counter.map(|c| {
            let counts = c
                .load
                .counts_mut(&self.score_bias_name, self.cfg.num_experts);
            (c.rows, counts)
        });
        let k = self.cfg.top_k;
        let scores = sigmoid(&flat.matmul(&self.gate.t()?)?)?; // [N, E]
        let host: Vec<Vec<f32>> = scores.detach().to_dtype(DType::F32)?.to_vec2()?;
        let bias: Vec<f32> = self.score_bias.to_dtype(DType::F32)?.to_vec1()?;
        let mut chosen = Vec::with_capacity(k);
        let mut index = Vec::with_capacity(n * k);
        let mut rows_of: Vec<Vec<(u32, u32)>> = vec![vec![]; self.cfg.num_experts];
        for (row, s) in host.iter().enumerate() {
            route(s, &bias, &self.cfg, &mut chosen);
            for (slot, &(e, _)) in chosen.iter().enumerate() {
                index.push(e as u32);
                rows_of[e].push((row as u32, (row * k + slot) as u32));
            }
            if let Some((rows, counts)) = counts.as_mut()
                && rows.is_none_or(|r| r[row])
            {
                for &(e, _) in &chosen {
                    counts[e] += 1;
                }
            }
        }
        let index = Tensor::from_vec(index, (n, k), x.device())?;
        let mut weights = scores.gather(&index, 1)?;
        if self.cfg.norm_topk_prob {
            weights = weights.broadcast_div(&(weights.sum_keepdim(1)? + 1e-20)?)?;
        }
        let weights = (weights * self.cfg.routed_scaling_factor)?.flatten_all()?;

        let h = match &self.latent {
            Some((fc1, _)) => crate::fused::apply_linear(fc1, &flat)?,
            None => flat.clone(),
        };
        let out = if crate::fused::applies(&[&h]) {
            self.fused_experts(&h, &weights, rows_of, k)?
        } else {
            self.composed_experts(&h, &weights, &rows_of)?
        };
        let out = match &self.latent {
            Some((_, fc2)) => crate::fused::apply_linear(fc2, &out)?,
            None => out,
        };
        Ok((out.reshape(dims)? + self.shared.forward(x)?)?)
    }

    /// The routed experts' weighted sum for every row of `h: [N, width]`, as one fused op
    /// ([`crate::fused::routed_experts`]); `weights: [N * k]` by output slot.
    fn fused_experts(
        &self,
        h: &Tensor,
        weights: &Tensor,
        rows_of: crate::fused::ExpertRows,
        k: usize,
    ) -> Result<Tensor> {
        let (n, width) = h.dims2()?;
        let stack = |f: fn(&Mlp) -> &Linear| -> Result<Tensor> {
            let ws = self
                .experts
                .iter()
                .map(|e| f(e).effective_weight())
                .collect::<Result<Vec<_>>>()?;
            Ok(Tensor::stack(&ws, 0)?)
        };
        let (up, down) = match &self.fused {
            Some((up, down)) => (up.clone(), down.clone()),
            None => (stack(|e| &e.up_proj)?, stack(|e| &e.down_proj)?),
        };
        let y = crate::fused::routed_experts(h, &up, &down, rows_of, n * k)?
            .ok_or_else(|| ModelError::Input("routed experts: not an f32 CPU tensor".into()))?;
        Ok(y.reshape((n, k, width))?
            .broadcast_mul(&weights.reshape((n, k, 1))?)?
            .sum(1)?)
    }

    /// [`Moe::fused_experts`] from candle's ops, one expert at a time (any dtype and device).
    fn composed_experts(
        &self,
        h: &Tensor,
        weights: &Tensor,
        rows_of: &crate::fused::ExpertRows,
    ) -> Result<Tensor> {
        let mut out = Tensor::zeros(h.dims(), h.dtype(), h.device())?;
        for (e, rows) in rows_of.iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            let row_idx = Tensor::from_vec(
                rows.iter().map(|r| r.0).collect::<Vec<_>>(),
                rows.len(),
                h.device(),
            )?;
            let w_idx = Tensor::from_vec(
                rows.iter().map(|r| r.1).collect::<Vec<_>>(),
                rows.len(),
                h.device(),
            )?;
            let y = self.experts[e].forward(&h.index_select(&row_idx, 0)?)?;
            let y = y.broadcast_mul(&weights.index_select(&w_idx, 0)?.unsqueeze(1)?)?;
            out = out.index_add(&row_idx, &y, 0)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(n_group: usize, topk_group: usize) -> MoeConfig {
        MoeConfig {
            num_experts: 8,
            top_k: 2,
            expert_dim: 4,
            shared_expert_dim: 4,
            latent_size: None,
            routed_scaling_factor: 2.5,
            norm_topk_prob: true,
            n_group,
            topk_group,
        }
    }

    #[test]
    fn bias_chooses_but_does_not_weigh() {
        let scores = [0.9, 0.8, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6];
        let mut bias = [0.0f32; 8];
        bias[2] = 1.0; // lifts expert 2 into the top-2
        let mut chosen = vec![];
        route(&scores, &bias, &cfg(1, 1), &mut chosen);
        assert_eq!(chosen.iter().map(|c| c.0).collect::<Vec<_>>(), vec![2, 0]);
        let total = 0.1 + 0.9;
        assert!((chosen[0].1 - 0.1 / total * 2.5).abs() < 1e-6);
        assert!((chosen[1].1 - 0.9 / total * 2.5).abs() < 1e-6);
    }

    #[test]
    fn grouped_routing_keeps_to_the_best_groups() {
        // Groups of 2: {0,1} {2,3} {4,5} {6,7}; the best group by top-2 sum is {4,5}.
        let scores = [0.9, 0.0, 0.5, 0.5, 0.7, 0.6, 0.1, 0.1];
        let mut chosen = vec![];
        route(&scores, &[0.0; 8], &cfg(4, 1), &mut chosen);
        assert_eq!(chosen.iter().map(|c| c.0).collect::<Vec<_>>(), vec![4, 5]);
    }
}
