//! The feed-forward mixers of the engine: the dense relu² MLP and the (Latent)MoE, whose
//! experts each run once over the rows routed to them.

use super::linear::LinearOp;
use super::load::Weights;
use super::map_tasks;
use crate::config::{MoeConfig, NemotronHConfig};
use crate::error::Result;
use crate::moe::route;
use crate::simd;

/// Below this many multiply-adds in the routed experts of a call, they run on one thread.
const PARALLEL_EXPERT_WORK: usize = 1 << 20;

/// A relu² MLP: `down(relu(up(x))²)`; also each expert of a MoE.
pub(super) struct MlpW {
    up: LinearOp,
    down: LinearOp,
}

impl MlpW {
    /// Reads `{prefix}.up_proj` and `{prefix}.down_proj`.
    pub(super) fn load(w: &Weights, prefix: &str, dim: usize, hidden: usize) -> Result<Self> {
        Ok(Self {
            up: w.linear(&format!("{prefix}.up_proj"), dim, hidden)?,
            down: w.linear(&format!("{prefix}.down_proj"), hidden, dim)?,
        })
    }

    /// The projections, for counting and sizing.
    pub(super) fn projections(&self) -> [&LinearOp; 2] {
        [&self.up, &self.down]
    }

    /// `x: [rows, dim]` → `y: [rows, dim]`.
    pub(super) fn forward(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        let mut h = vec![0f32; rows * self.up.out_dim()];
        self.up.forward(x, rows, &mut h);
        h.iter_mut().for_each(|v| *v = v.max(0.0) * v.max(0.0));
        self.down.forward(&h, rows, y);
    }
}

/// The weights of one (Latent)MoE mixer.
pub(super) struct MoeW {
    cfg: MoeConfig,
    gate: LinearOp,
    bias: Vec<f32>,
    experts: Vec<MlpW>,
    shared: MlpW,
    latent: Option<(LinearOp, LinearOp)>,
}

impl MoeW {
    /// Reads the mixer under `mx`; experts come either stacked (`experts.up_proj`, one tensor
    /// for all) or one module each (`experts.N.up_proj`).
    pub(super) fn load(cfg: &NemotronHConfig, w: &Weights, mx: &str) -> Result<Self> {
        let d = cfg.hidden_size;
        let m = cfg.moe().clone();
        let width = m.latent_size.unwrap_or(d);
        let experts = if w.has(&format!("{mx}.experts.up_proj")) {
            let up = w.vec(
                &format!("{mx}.experts.up_proj"),
                &[m.num_experts, m.expert_dim, width],
            )?;
            let down = w.vec(
                &format!("{mx}.experts.down_proj"),
                &[m.num_experts, width, m.expert_dim],
            )?;
            let (su, sd) = (m.expert_dim * width, width * m.expert_dim);
            (0..m.num_experts)
                .map(|e| MlpW {
                    up: LinearOp::dense(up[e * su..(e + 1) * su].to_vec(), m.expert_dim, width),
                    down: LinearOp::dense(down[e * sd..(e + 1) * sd].to_vec(), width, m.expert_dim),
                })
                .collect()
        } else {
            (0..m.num_experts)
                .map(|e| MlpW::load(w, &format!("{mx}.experts.{e}"), width, m.expert_dim))
                .collect::<Result<_>>()?
        };
        let latent = match m.latent_size {
            Some(l) => Some((
                w.linear(&format!("{mx}.fc1_latent_proj"), d, l)?,
                w.linear(&format!("{mx}.fc2_latent_proj"), l, d)?,
            )),
            None => None,
        };
        Ok(Self {
            gate: w.linear(&format!("{mx}.gate"), d, m.num_experts)?,
            bias: w.vec(
                &format!("{mx}.gate.e_score_correction_bias"),
                &[m.num_experts],
            )?,
            experts,
            shared: MlpW::load(w, &format!("{mx}.shared_experts"), d, m.shared_expert_dim)?,
            latent,
            cfg: m,
        })
    }

    /// The projections (experts, shared expert, latent pair), for counting and sizing; the
    /// router gate is not one of them (it always stays in full precision).
    pub(super) fn projections(&self) -> Vec<&LinearOp> {
        let mut ops: Vec<&LinearOp> = self.experts.iter().flat_map(|e| e.projections()).collect();
        ops.extend(self.shared.projections());
        if let Some((a, b)) = &self.latent {
            ops.extend([a, b]);
        }
        ops
    }

    /// Bytes of the router gate, which [`MoeW::projections`] leaves out.
    pub(super) fn gate_bytes(&self) -> usize {
        self.gate.weight_bytes()
    }

    /// `h: [rows, d]` → `y_out`: route every row to its top-k experts, run each expert once
    /// over its rows, and add the shared expert.
    pub(super) fn forward(&self, h: &[f32], rows: usize, d: usize, y_out: &mut [f32]) {
        let m = &self.cfg;
        let ne = m.num_experts;
        let mut scores = vec![0f32; rows * ne];
        self.gate.forward(h, rows, &mut scores);
        scores
            .iter_mut()
            .for_each(|s| *s = 1.0 / (1.0 + (-*s).exp()));
        let (latent_in, width) = match &self.latent {
            Some((fc1, _)) => {
                let mut l = vec![0f32; rows * fc1.out_dim()];
                fc1.forward(h, rows, &mut l);
                (l, fc1.out_dim())
            }
            None => (h.to_vec(), d),
        };
        let mut assigned: Vec<Vec<(usize, f32)>> = vec![vec![]; ne];
        let mut chosen = Vec::with_capacity(m.top_k);
        for r in 0..rows {
            route(&scores[r * ne..(r + 1) * ne], &self.bias, m, &mut chosen);
            for &(e, w) in &chosen {
                assigned[e].push((r, w));
            }
        }
        // Every expert runs once over the rows routed to it (one GEMM each); experts run in
        // parallel, and their outputs are added in expert order whatever thread ran them.
        let busy: Vec<(usize, &Vec<(usize, f32)>)> = assigned
            .iter()
            .enumerate()
            .filter(|(_, list)| !list.is_empty())
            .collect();
        let run_expert = |(e, list): (usize, &Vec<(usize, f32)>)| {
            let mut xin = Vec::with_capacity(list.len() * width);
            for &(r, _) in list {
                xin.extend_from_slice(&latent_in[r * width..(r + 1) * width]);
            }
            let mut yexp = vec![0f32; list.len() * width];
            self.experts[e].forward(&xin, list.len(), &mut yexp);
            yexp
        };
        let work = rows * m.top_k * width * m.expert_dim;
        let outputs = map_tasks(busy.clone(), work, PARALLEL_EXPERT_WORK, run_expert);
        let mut acc = vec![0f32; rows * width];
        for ((_, list), yexp) in busy.iter().zip(&outputs) {
            for (i, &(r, w)) in list.iter().enumerate() {
                simd::axpy(
                    &mut acc[r * width..(r + 1) * width],
                    w,
                    &yexp[i * width..(i + 1) * width],
                );
            }
        }
        match &self.latent {
            Some((_, fc2)) => fc2.forward(&acc, rows, y_out),
            None => y_out.copy_from_slice(&acc),
        }
        let mut shared = vec![0f32; rows * d];
        self.shared.forward(h, rows, &mut shared);
        y_out.iter_mut().zip(&shared).for_each(|(a, b)| *a += b);
    }
}
