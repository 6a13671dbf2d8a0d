//! The inference engine: the policy over plain f32 buffers, for rollouts.
//!
//! One call of [`Engine::forward`] advances a *ragged* batch: every sequence brings its own
//! [`SequenceCache`] and any number of new tokens (a whole prompt, one decoded token, or `k+1`
//! tokens to verify MTP drafts). Token-local work (norms, projections, experts) runs on all rows
//! of the batch at once; the recurrences (conv, SSM) and attention run per sequence over its
//! cache. Prefill, decoding, speculative verification and continuous batching are therefore one
//! code path. It computes what [`crate::NemotronH`] computes (tests hold them to 1e-4).

mod cache;
mod generate;
mod linear;
mod simd;

use std::collections::BTreeMap;

use candle_core::Tensor;

pub use cache::SequenceCache;

use cache::{LayerCache, rewind_layers};
pub use generate::{FinishReason, Generation, GenerationRequest, MtpStats};
pub use linear::LinearOp;

use crate::config::{BlockKind, MambaConfig, MoeConfig, NemotronHConfig};
use crate::error::{ModelError, Result};
use crate::moe::route;
use crate::params::Params;

/// How the engine stores its projections.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineOptions {
    /// Quantize projection weights to NVFP4 on load (checkpoints already in NVFP4 stay so).
    pub nvfp4: Option<Nvfp4Policy>,
}

/// Which projections become NVFP4. Embeddings, `lm_head`, router gates and norms always stay in
/// full precision, as the Nemotron recipe keeps them.
#[derive(Clone, Debug, Default, PartialEq)]
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
            && !self
                .exclude
                .iter()
                .any(|g| crate::quantize::glob_match(g, weight_name))
    }
}

struct Weights<'a> {
    map: &'a BTreeMap<String, Tensor>,
    /// Projections that arrive already in NVFP4, by weight name.
    nvfp4: &'a BTreeMap<String, chorus_kernels::Nvfp4Tensor>,
    policy: Option<&'a Nvfp4Policy>,
}

impl Weights<'_> {
    fn vec(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self
            .map
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor { name: name.into() })?;
        if t.dims() != shape {
            return Err(ModelError::Shape {
                name: name.into(),
                expected: shape.to_vec(),
                got: t.dims().to_vec(),
            });
        }
        Ok(t.flatten_all()?.to_vec1::<f32>()?)
    }

    fn linear(&self, name: &str, in_dim: usize, out_dim: usize) -> Result<LinearOp> {
        let weight_name = format!("{name}.weight");
        if let Some(q) = self.nvfp4.get(&weight_name) {
            if (q.rows(), q.cols()) != (out_dim, in_dim) {
                return Err(ModelError::Shape {
                    name: weight_name,
                    expected: vec![out_dim, in_dim],
                    got: vec![q.rows(), q.cols()],
                });
            }
            return Ok(LinearOp::nvfp4(q.clone()));
        }
        let w = self.vec(&weight_name, &[out_dim, in_dim])?;
        match self.policy {
            Some(p) if p.quantizes(&weight_name, in_dim) => {
                let options = chorus_kernels::QuantizeOptions::default();
                let q = chorus_kernels::Nvfp4Tensor::quantize(
                    &weight_name,
                    &w,
                    out_dim,
                    in_dim,
                    &options,
                )
                .map_err(|e| ModelError::Input(e.to_string()))?;
                Ok(LinearOp::nvfp4(q))
            }
            _ => Ok(LinearOp::dense(w, out_dim, in_dim)),
        }
    }

    fn has(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }
}

struct MambaW {
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

struct AttnW {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    q: LinearOp,
    k: LinearOp,
    v: LinearOp,
    o: LinearOp,
}

struct MlpW {
    up: LinearOp,
    down: LinearOp,
}

struct MoeW {
    cfg: MoeConfig,
    gate: LinearOp,
    bias: Vec<f32>,
    experts: Vec<MlpW>,
    shared: MlpW,
    latent: Option<(LinearOp, LinearOp)>,
}

enum MixerW {
    Mamba(MambaW),
    Attention(AttnW),
    Moe(MoeW),
    Mlp(MlpW),
}

struct BlockW {
    norm: Vec<f32>,
    mixer: MixerW,
}

struct MtpW {
    enorm: Vec<f32>,
    hnorm: Vec<f32>,
    eh_proj: LinearOp,
    layers: Vec<BlockW>,
    norm_f: Vec<f32>,
}

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
    pub cache: &'a mut SequenceCache,
    pub tokens: &'a [u32],
}

/// What a forward call returns.
pub struct StepOutput {
    /// `[rows, vocab]`, rows ordered by sequence then token (one per sequence for `Last`).
    pub logits: Vec<f32>,
    /// For each sequence, the range of its rows in `logits`.
    pub logit_rows: Vec<std::ops::Range<usize>>,
    /// `[all new tokens, d]`: the last block's output (before `norm_f`), the MTP head's input.
    pub hidden: Vec<f32>,
    /// For each sequence, the range of its rows in `hidden`.
    pub hidden_rows: Vec<std::ops::Range<usize>>,
}

/// The policy, ready for incremental decoding.
pub struct Engine {
    cfg: NemotronHConfig,
    d: usize,
    vocab: usize,
    embeddings: Vec<f32>,
    layers: Vec<BlockW>,
    norm_f: Vec<f32>,
    lm_head: LinearOp,
    mtp: Option<MtpW>,
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

fn softplus(x: f32) -> f32 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * inv * g;
        }
    }
}

impl MlpW {
    fn load(w: &Weights, prefix: &str, dim: usize, hidden: usize) -> Result<Self> {
        Ok(Self {
            up: w.linear(&format!("{prefix}.up_proj"), dim, hidden)?,
            down: w.linear(&format!("{prefix}.down_proj"), hidden, dim)?,
        })
    }

    fn forward(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        let mut h = vec![0f32; rows * self.up.out_dim()];
        self.up.forward(x, rows, &mut h);
        h.iter_mut().for_each(|v| *v = v.max(0.0) * v.max(0.0));
        self.down.forward(&h, rows, y);
    }
}

impl BlockW {
    fn load(cfg: &NemotronHConfig, w: &Weights, kind: BlockKind, prefix: &str) -> Result<Self> {
        let d = cfg.hidden_size;
        let mx = format!("{prefix}.mixer");
        let mixer = match kind {
            BlockKind::Mamba => {
                let m = cfg.mamba().clone();
                let conv_b = if m.conv_bias {
                    w.vec(&format!("{mx}.conv1d.bias"), &[m.conv_dim()])?
                } else {
                    vec![0.0; m.conv_dim()]
                };
                MixerW::Mamba(MambaW {
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
            BlockKind::Attention => {
                let a = cfg.attention();
                MixerW::Attention(AttnW {
                    heads: a.num_heads,
                    kv_heads: a.num_kv_heads,
                    head_dim: a.head_dim,
                    q: w.linear(&format!("{mx}.q_proj"), d, a.num_heads * a.head_dim)?,
                    k: w.linear(&format!("{mx}.k_proj"), d, a.num_kv_heads * a.head_dim)?,
                    v: w.linear(&format!("{mx}.v_proj"), d, a.num_kv_heads * a.head_dim)?,
                    o: w.linear(&format!("{mx}.o_proj"), a.num_heads * a.head_dim, d)?,
                })
            }
            BlockKind::Moe => {
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
                            up: LinearOp::dense(
                                up[e * su..(e + 1) * su].to_vec(),
                                m.expert_dim,
                                width,
                            ),
                            down: LinearOp::dense(
                                down[e * sd..(e + 1) * sd].to_vec(),
                                width,
                                m.expert_dim,
                            ),
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
                MixerW::Moe(MoeW {
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
            BlockKind::Mlp => MixerW::Mlp(MlpW::load(w, &mx, d, cfg.mlp_dim())?),
        };
        Ok(Self {
            norm: w.vec(&format!("{prefix}.norm.weight"), &[d])?,
            mixer,
        })
    }

    fn new_cache(&self) -> LayerCache {
        match &self.mixer {
            MixerW::Mamba(m) => LayerCache::Mamba {
                conv: vec![0.0; (m.cfg.conv_kernel - 1) * m.cfg.conv_dim()],
                ssm: vec![0.0; m.cfg.num_heads * m.cfg.head_dim * m.cfg.state_size],
                history: vec![],
            },
            MixerW::Attention(_) => LayerCache::Attention {
                keys: vec![],
                values: vec![],
            },
            MixerW::Moe(_) | MixerW::Mlp(_) => LayerCache::Stateless,
        }
    }

    /// `x: [rows, d]` updated in place: `x += mixer(norm(x))`. `seqs[i]` is the row range of
    /// sequence `i`, `caches[i]` its cache for this block.
    fn forward(
        &self,
        x: &mut [f32],
        d: usize,
        eps: f32,
        seqs: &[std::ops::Range<usize>],
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

impl MambaW {
    #[allow(clippy::too_many_arguments)]
    fn forward(
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
        let (inner, cd, nh, hd, ns, kk) = (
            m.inner(),
            m.conv_dim(),
            m.num_heads,
            m.head_dim,
            m.state_size,
            m.conv_kernel,
        );
        let hpg = m.heads_per_group();
        let gs = m.n_groups * ns;
        let pw = m.in_proj_dim();
        let mut proj = vec![0f32; rows * pw];
        self.in_proj.forward(h, rows, &mut proj);
        let mut ys = vec![0f32; rows * inner];
        let mut xbc = vec![0f32; cd];
        let (dt_min, dt_max) = (m.dt_min as f32, m.dt_max as f32);
        for (range, cache) in seqs.iter().zip(caches.iter_mut()) {
            let LayerCache::Mamba { conv, ssm, history } = &mut **cache else {
                unreachable!("Mamba block has a Mamba cache")
            };
            if record {
                history.clear();
                history.push((conv.clone(), ssm.clone()));
            }
            for r in range.clone() {
                let p = &proj[r * pw..(r + 1) * pw];
                let (z, xbc_in, dt_raw) = (&p[..inner], &p[inner..inner + cd], &p[inner + cd..]);
                simd::conv_step(&self.conv_w_t, &self.conv_b, conv, xbc_in, &mut xbc);
                if kk > 1 {
                    conv.copy_within(cd.., 0);
                    conv[(kk - 2) * cd..].copy_from_slice(xbc_in);
                }
                let (xs, bm, cm) = (&xbc[..inner], &xbc[inner..inner + gs], &xbc[inner + gs..]);
                let yr = &mut ys[r * inner..(r + 1) * inner];
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
                        &mut yr[span],
                    );
                }
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
                if record {
                    history.push((conv.clone(), ssm.clone()));
                }
            }
        }
        self.out_proj.forward(&ys, rows, y_out);
    }
}

impl AttnW {
    fn forward(
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
        let mut scores = vec![];
        for (range, cache) in seqs.iter().zip(caches.iter_mut()) {
            let LayerCache::Attention { keys, values } = &mut **cache else {
                unreachable!("attention block has a KV cache")
            };
            let before = keys.len() / kvw;
            keys.extend_from_slice(&k[range.start * kvw..range.end * kvw]);
            values.extend_from_slice(&v[range.start * kvw..range.end * kvw]);
            for (i, r) in range.clone().enumerate() {
                let visible = before + i + 1;
                for head in 0..nh {
                    let kv = head / group;
                    let qh = &q[(r * nh + head) * hd..(r * nh + head + 1) * hd];
                    let o = &mut out[(r * nh + head) * hd..(r * nh + head + 1) * hd];
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
        }
        self.o.forward(&out, rows, y_out);
    }
}

impl MoeW {
    fn forward(&self, h: &[f32], rows: usize, d: usize, y_out: &mut [f32]) {
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
        let mut acc = vec![0f32; rows * width];
        let mut xin = vec![];
        let mut yexp = vec![];
        for (e, list) in assigned.iter().enumerate() {
            if list.is_empty() {
                continue;
            }
            xin.clear();
            for &(r, _) in list {
                xin.extend_from_slice(&latent_in[r * width..(r + 1) * width]);
            }
            yexp.resize(list.len() * width, 0.0);
            self.experts[e].forward(&xin, list.len(), &mut yexp);
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

impl Engine {
    /// Builds the engine from the current values of `params`.
    pub fn from_params(cfg: &NemotronHConfig, params: &Params) -> Result<Self> {
        Self::from_tensors(cfg, &params.snapshot()?)
    }

    /// Builds the engine from named tensors (HF names).
    pub fn from_tensors(cfg: &NemotronHConfig, tensors: &BTreeMap<String, Tensor>) -> Result<Self> {
        Self::build(cfg, tensors, &BTreeMap::new(), &EngineOptions::default())
    }

    /// Builds the engine from named tensors with storage options (e.g. NVFP4 on load).
    pub fn from_tensors_with(
        cfg: &NemotronHConfig,
        tensors: &BTreeMap<String, Tensor>,
        options: &EngineOptions,
    ) -> Result<Self> {
        Self::build(cfg, tensors, &BTreeMap::new(), options)
    }

    /// Loads a checkpoint directory, keeping NVFP4 projections of a quantized checkpoint
    /// (ModelOpt layout) in NVFP4 and applying `options` to the rest.
    pub fn from_checkpoint(dir: &std::path::Path, options: &EngineOptions) -> Result<Self> {
        let cfg = NemotronHConfig::from_file(dir.join(crate::checkpoint::CONFIG_FILE))?;
        let (dense, quantized) = crate::quantize::read_split(dir)?;
        Self::build(&cfg, &dense, &quantized, options)
    }

    fn build(
        cfg: &NemotronHConfig,
        tensors: &BTreeMap<String, Tensor>,
        nvfp4: &BTreeMap<String, chorus_kernels::Nvfp4Tensor>,
        options: &EngineOptions,
    ) -> Result<Self> {
        let w = Weights {
            map: tensors,
            nvfp4,
            policy: options.nvfp4.as_ref(),
        };
        let d = cfg.hidden_size;
        let layers = cfg
            .layers
            .iter()
            .enumerate()
            .map(|(i, &k)| BlockW::load(cfg, &w, k, &format!("backbone.layers.{i}")))
            .collect::<Result<_>>()?;
        let embeddings = w.vec("backbone.embeddings.weight", &[cfg.vocab_size, d])?;
        let lm_head = if cfg.tie_word_embeddings {
            LinearOp::dense(embeddings.clone(), cfg.vocab_size, d)
        } else {
            w.linear("lm_head", d, cfg.vocab_size)?
        };
        let mtp = if cfg.has_mtp() {
            Some(MtpW {
                enorm: w.vec("mtp.enorm.weight", &[d])?,
                hnorm: w.vec("mtp.hnorm.weight", &[d])?,
                eh_proj: w.linear("mtp.eh_proj", 2 * d, d)?,
                layers: cfg
                    .mtp_layers
                    .iter()
                    .enumerate()
                    .map(|(i, &k)| BlockW::load(cfg, &w, k, &format!("mtp.layers.{i}")))
                    .collect::<Result<_>>()?,
                norm_f: w.vec("mtp.norm_f.weight", &[d])?,
            })
        } else {
            None
        };
        Ok(Self {
            cfg: cfg.clone(),
            d,
            vocab: cfg.vocab_size,
            embeddings,
            layers,
            norm_f: w.vec("backbone.norm_f.weight", &[d])?,
            lm_head,
            mtp,
        })
    }

    pub fn config(&self) -> &NemotronHConfig {
        &self.cfg
    }

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
            mtp: self
                .mtp
                .iter()
                .flat_map(|m| m.layers.iter().map(|b| b.new_cache()))
                .collect(),
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

    /// Runs a ragged batch: each sequence's `tokens` are appended to its cache. When `record`
    /// is set, Mamba blocks remember their state after each token so that [`Engine::rewind`]
    /// can drop a suffix (speculative decoding).
    pub fn forward(
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
        seqs: &[std::ops::Range<usize>],
        which: LogitsFor,
        norm: &[f32],
    ) -> (Vec<f32>, Vec<std::ops::Range<usize>>) {
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
        rewind_layers(&mut cache.layers, self.kv_width(), new_len, drop);
        cache.len = new_len;
    }

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
        rewind_layers(&mut cache.mtp, self.kv_width(), new_len, drop);
        cache.mtp_len = new_len;
    }

    /// Projections stored in NVFP4, out of all projections.
    pub fn nvfp4_projection_count(&self) -> (usize, usize) {
        fn block_ops<'a>(b: &'a BlockW, ops: &mut Vec<&'a LinearOp>) {
            match &b.mixer {
                MixerW::Mamba(m) => ops.extend([&m.in_proj, &m.out_proj]),
                MixerW::Attention(a) => ops.extend([&a.q, &a.k, &a.v, &a.o]),
                MixerW::Moe(m) => {
                    ops.extend(m.experts.iter().flat_map(|e| [&e.up, &e.down]));
                    ops.extend([&m.shared.up, &m.shared.down]);
                    if let Some((a, b)) = &m.latent {
                        ops.extend([a, b]);
                    }
                }
                MixerW::Mlp(m) => ops.extend([&m.up, &m.down]),
            }
        }
        let mut ops: Vec<&LinearOp> = vec![];
        for b in self
            .layers
            .iter()
            .chain(self.mtp.iter().flat_map(|m| m.layers.iter()))
        {
            block_ops(b, &mut ops);
        }
        (ops.iter().filter(|o| o.is_nvfp4()).count(), ops.len())
    }

    /// Bytes of all weights (what one decode step streams from memory).
    pub fn weight_bytes(&self) -> usize {
        let block = |b: &BlockW| -> usize {
            match &b.mixer {
                MixerW::Mamba(m) => m.in_proj.weight_bytes() + m.out_proj.weight_bytes(),
                MixerW::Attention(a) => {
                    a.q.weight_bytes()
                        + a.k.weight_bytes()
                        + a.v.weight_bytes()
                        + a.o.weight_bytes()
                }
                MixerW::Moe(m) => {
                    m.gate.weight_bytes()
                        + m.experts
                            .iter()
                            .map(|e| e.up.weight_bytes() + e.down.weight_bytes())
                            .sum::<usize>()
                        + m.shared.up.weight_bytes()
                        + m.shared.down.weight_bytes()
                        + m.latent
                            .as_ref()
                            .map(|(a, b)| a.weight_bytes() + b.weight_bytes())
                            .unwrap_or(0)
                }
                MixerW::Mlp(m) => m.up.weight_bytes() + m.down.weight_bytes(),
            }
        };
        self.layers.iter().map(block).sum::<usize>() + self.lm_head.weight_bytes()
    }
}
