//! AdamW with global grad-norm clipping and savable state (candle has neither state saving nor
//! clipping).
//!
//! f32 parameters on the CPU are updated in place, in three passes over their memory (first
//! moment, second moment, weights). Composed from candle's element-wise ops, an update made some
//! fifteen whole-tensor temporaries per parameter, each a fresh allocation the kernel zero-fills
//! page by page: on `small-d512` (44M parameters) that was most of a second per step, more than
//! half of a forward and backward pass. Other dtypes and devices take the composed path, which
//! the tests hold the in-place one to.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Device, InplaceOp2, InplaceOp3, Layout, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Result, config_err};

/// AdamW settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    /// Decay of the first-moment estimate.
    pub beta1: f64,
    /// Decay of the second-moment estimate.
    pub beta2: f64,
    /// Added to the second moment's square root, against division by zero.
    pub eps: f64,
    /// Decoupled weight decay, per unit of learning rate.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value (0 = no clipping).
    pub max_grad_norm: f64,
}

impl Default for AdamWConfig {
    /// Nemotron 3's RL settings: beta2 0.999, no weight decay, clip at 1.0.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
        }
    }
}

impl AdamWConfig {
    /// Checks every setting's range; the error names the setting.
    pub fn validate(&self) -> Result<()> {
        for (key, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(config_err(key, format!("must be in [0, 1), got {v}")));
            }
        }
        if self.eps <= 0.0 {
            return Err(config_err("eps", format!("must be > 0, got {}", self.eps)));
        }
        if self.weight_decay < 0.0 || self.max_grad_norm < 0.0 {
            return Err(config_err("weight_decay/max_grad_norm", "must be >= 0"));
        }
        Ok(())
    }
}

/// What one optimizer step saw.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Whether clipping scaled the gradients down.
    pub clipped: bool,
}

/// AdamW over named parameters; moments are kept per name so they can be saved and restored.
pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<(String, Var)>,
    exp_avg: BTreeMap<String, Tensor>,
    exp_avg_sq: BTreeMap<String, Tensor>,
    steps: u64,
}

impl AdamW {
    /// Optimises `params` (name, var) with zero moments.
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        cfg.validate()?;
        let mut exp_avg = BTreeMap::new();
        let mut exp_avg_sq = BTreeMap::new();
        for (name, v) in &params {
            exp_avg.insert(name.clone(), v.as_tensor().zeros_like()?.detach());
            exp_avg_sq.insert(name.clone(), v.as_tensor().zeros_like()?.detach());
        }
        Ok(Self {
            cfg,
            params,
            exp_avg,
            exp_avg_sq,
            steps: 0,
        })
    }

    /// Optimizer steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The global L2 norm of the gradients of the optimised parameters (missing gradients count
    /// as zero).
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        self.grad_norm_where(grads, &|_| true)
    }

    /// [`AdamW::grad_norm`] over the optimised parameters whose names pass `updated`.
    pub fn grad_norm_where(
        &self,
        grads: &GradStore,
        updated: &dyn Fn(&str) -> bool,
    ) -> Result<f64> {
        let mut sq = 0f64;
        for (_, v) in self.params.iter().filter(|(n, _)| updated(n)) {
            if let Some(g) = grads.get(v.as_tensor()) {
                sq += match squared_norm_in_place(g) {
                    Some(sq) => sq,
                    None => g
                        .to_dtype(DType::F64)?
                        .sqr()?
                        .sum_all()?
                        .to_scalar::<f64>()?,
                };
            }
        }
        Ok(sq.sqrt())
    }

    /// One AdamW step at learning rate `lr`, after clipping the global gradient norm. The caller
    /// checks the norm is finite first (see [`AdamW::grad_norm`]).
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<StepStats> {
        self.step_where(grads, lr, &|_| true)
    }

    /// [`AdamW::step`] on the parameters whose names pass `updated` (clipping by their norm);
    /// the others are left exactly as they are, moments included, as if they had no gradient.
    pub fn step_where(
        &mut self,
        grads: &GradStore,
        lr: f64,
        updated: &dyn Fn(&str) -> bool,
    ) -> Result<StepStats> {
        let grad_norm = self.grad_norm_where(grads, updated)?;
        self.step_with_norm(grads, lr, updated, grad_norm)
    }

    /// [`AdamW::step_where`] for a caller that already has the gradients' norm
    /// ([`AdamW::grad_norm_where`] over the same `updated`), so it is not computed twice.
    pub fn step_with_norm(
        &mut self,
        grads: &GradStore,
        lr: f64,
        updated: &dyn Fn(&str) -> bool,
        grad_norm: f64,
    ) -> Result<StepStats> {
        let clip = self.cfg.max_grad_norm > 0.0 && grad_norm > self.cfg.max_grad_norm;
        let scale = if clip {
            self.cfg.max_grad_norm / (grad_norm + 1e-6)
        } else {
            1.0
        };
        self.steps += 1;
        let t = self.steps as i32;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        for (name, v) in self.params.iter().filter(|(n, _)| updated(n)) {
            let Some(g) = grads.get(v.as_tensor()) else {
                continue;
            };
            let (m, s) = (&self.exp_avg[name], &self.exp_avg_sq[name]);
            if in_place_applies(&[v.as_tensor(), g, m, s]) {
                let moment = |beta: f64, squared| MomentUpdate {
                    beta: beta as f32,
                    scale: scale as f32,
                    squared,
                };
                m.inplace_op2(g, &moment(b1, false))?;
                s.inplace_op2(g, &moment(b2, true))?;
                v.as_tensor().inplace_op3(
                    m,
                    s,
                    &WeightUpdate {
                        lr: lr as f32,
                        decay: (1.0 - lr * self.cfg.weight_decay) as f32,
                        bias_correction: (bc1 as f32, bc2 as f32),
                        eps: self.cfg.eps as f32,
                    },
                )?;
                continue;
            }
            let g = (g.detach() * scale)?;
            let m = ((&self.exp_avg[name] * b1)? + (&g * (1.0 - b1))?)?;
            let s = ((&self.exp_avg_sq[name] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let update = ((&m / bc1)? / ((&s / bc2)?.sqrt()? + self.cfg.eps)?)?;
            let theta = v.as_tensor().detach();
            let theta = if self.cfg.weight_decay > 0.0 {
                (&theta * (1.0 - lr * self.cfg.weight_decay))?
            } else {
                theta
            };
            v.set(&(theta - (update * lr)?)?)?;
            self.exp_avg.insert(name.clone(), m);
            self.exp_avg_sq.insert(name.clone(), s);
        }
        Ok(StepStats {
            grad_norm,
            clipped: clip,
        })
    }

    /// The moments as named tensors (`exp_avg.<param>`, `exp_avg_sq.<param>`) for saving: copies,
    /// since later steps update the moments in place.
    pub fn state_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for (k, t) in &self.exp_avg {
            out.insert(format!("exp_avg.{k}"), t.copy()?);
        }
        for (k, t) in &self.exp_avg_sq {
            out.insert(format!("exp_avg_sq.{k}"), t.copy()?);
        }
        Ok(out)
    }

    /// Restores moments and the step count saved by [`AdamW::state_tensors`].
    pub fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>, steps: u64) -> Result<()> {
        for (name, v) in &self.params {
            for (prefix, map) in [
                ("exp_avg", &mut self.exp_avg),
                ("exp_avg_sq", &mut self.exp_avg_sq),
            ] {
                let key = format!("{prefix}.{name}");
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| config_err("optimizer state", format!("no tensor `{key}`")))?;
                if t.dims() != v.dims() {
                    return Err(config_err(
                        "optimizer state",
                        format!(
                            "`{key}` has shape {:?}, the parameter {:?}",
                            t.dims(),
                            v.dims()
                        ),
                    ));
                }
                // A copy of its own: steps update the moments in place, and `to_dtype` to the
                // same dtype would share the caller's storage.
                map.insert(
                    name.clone(),
                    t.to_dtype(v.dtype())?.to_device(v.device())?.copy()?,
                );
            }
        }
        self.steps = steps;
        Ok(())
    }
}

/// Whether the in-place update serves these tensors: f32, on the CPU, contiguous.
fn in_place_applies(tensors: &[&Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| t.dtype() == DType::F32 && matches!(t.device(), Device::Cpu) && t.is_contiguous())
}

/// `sum(g^2)` of a contiguous f32 CPU tensor, read in place; `None` for any other tensor.
fn squared_norm_in_place(g: &Tensor) -> Option<f64> {
    if !in_place_applies(&[g]) {
        return None;
    }
    let (storage, layout) = g.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => slice_f32(cpu, layout).ok().map(sum_of_squares),
        _ => None,
    }
}

/// Elements per task of the in-place passes.
const CHUNK: usize = 1 << 16;

/// `sum(v^2)`, accumulated in f64: chunks in parallel, their sums added in order, so the result
/// does not depend on how the pool split the work (a resumed run must repeat the norm, and with
/// it the clipping, bit for bit).
fn sum_of_squares(v: &[f32]) -> f64 {
    v.par_chunks(CHUNK)
        .map(|c| c.iter().map(|&x| x as f64 * x as f64).sum::<f64>())
        .collect::<Vec<f64>>()
        .into_iter()
        .sum()
}

/// The slice of a contiguous f32 CPU storage under `layout`.
fn slice_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("AdamW: a non-contiguous operand".into()))?;
    Ok(&storage.as_slice::<f32>()?[start..end])
}

/// [`slice_f32`], writable.
fn slice_f32_mut<'a>(
    storage: &'a mut CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a mut [f32]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("AdamW: a non-contiguous operand".into()))?;
    match storage {
        CpuStorage::F32(v) => Ok(&mut v[start..end]),
        _ => candle_core::bail!("AdamW: an f32 operand expected"),
    }
}

/// One moment of AdamW in place, from the gradient `g` (clipped by `scale`):
/// `m = beta*m + (1-beta)*(scale*g)`, or with `(scale*g)^2` for the second moment.
struct MomentUpdate {
    beta: f32,
    scale: f32,
    squared: bool,
}

impl InplaceOp2 for MomentUpdate {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(
        &self,
        moment: &mut CpuStorage,
        moment_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<()> {
        let moment = slice_f32_mut(moment, moment_layout)?;
        let grad = slice_f32(grad, grad_layout)?;
        if moment.len() != grad.len() {
            candle_core::bail!(
                "AdamW: {} moments for {} gradients",
                moment.len(),
                grad.len()
            );
        }
        let Self {
            beta,
            scale,
            squared,
        } = *self;
        moment
            .par_chunks_mut(CHUNK)
            .zip(grad.par_chunks(CHUNK))
            .for_each(|(m, g)| {
                for (m, &g) in m.iter_mut().zip(g) {
                    let g = g * scale;
                    let g = if squared { g * g } else { g };
                    *m = *m * beta + g * (1.0 - beta);
                }
            });
        Ok(())
    }
}

/// The weights' step in place from updated moments:
/// `w = w*decay - lr * (m/bc1) / (sqrt(s/bc2) + eps)`.
struct WeightUpdate {
    lr: f32,
    decay: f32,
    bias_correction: (f32, f32),
    eps: f32,
}

impl InplaceOp3 for WeightUpdate {
    fn name(&self) -> &'static str {
        "adamw-weights"
    }

    fn cpu_fwd(
        &self,
        weights: &mut CpuStorage,
        weights_layout: &Layout,
        m: &CpuStorage,
        m_layout: &Layout,
        s: &CpuStorage,
        s_layout: &Layout,
    ) -> candle_core::Result<()> {
        let w = slice_f32_mut(weights, weights_layout)?;
        let (m, s) = (slice_f32(m, m_layout)?, slice_f32(s, s_layout)?);
        if w.len() != m.len() || w.len() != s.len() {
            candle_core::bail!(
                "AdamW: {} weights for {} and {} moments",
                w.len(),
                m.len(),
                s.len()
            );
        }
        let Self {
            lr,
            decay,
            bias_correction: (bc1, bc2),
            eps,
        } = *self;
        w.par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK).zip(s.par_chunks(CHUNK)))
            .for_each(|(w, (m, s))| {
                for ((w, &m), &s) in w.iter_mut().zip(m).zip(s) {
                    *w = *w * decay - lr * ((m / bc1) / ((s / bc2).sqrt() + eps));
                }
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The gradients of `sum(v^2)`.
    fn grads_of_sum_of_squares(v: &Var) -> GradStore {
        v.as_tensor()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
    }

    #[test]
    fn matches_the_adamw_formula() {
        let v = Var::new(&[1.0f64, -2.0], &Device::Cpu).unwrap();
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
            max_grad_norm: 0.0,
        };
        let mut opt = AdamW::new(vec![("w".into(), v.clone())], cfg).unwrap();
        // loss = sum(w^2) -> grad 2w
        let (mut m, mut s, mut w) = ([0f64; 2], [0f64; 2], [1.0f64, -2.0]);
        for t in 1..=3 {
            let grads = grads_of_sum_of_squares(&v);
            opt.step(&grads, 0.01).unwrap();
            for i in 0..2 {
                let g = 2.0 * w[i];
                m[i] = 0.9 * m[i] + 0.1 * g;
                s[i] = 0.99 * s[i] + 0.01 * g * g;
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let sh = s[i] / (1.0 - 0.99f64.powi(t));
                w[i] = w[i] * (1.0 - 0.01 * 0.1) - 0.01 * mh / (sh.sqrt() + 1e-8);
            }
            let got: Vec<f64> = v.as_tensor().to_vec1().unwrap();
            assert!(
                (got[0] - w[0]).abs() < 1e-12 && (got[1] - w[1]).abs() < 1e-12,
                "{got:?} vs {w:?}"
            );
        }
    }

    #[test]
    fn clipping_reports_the_norm_and_scales() {
        let v = Var::new(&[3.0f64, 4.0], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(
            vec![("w".into(), v.clone())],
            AdamWConfig {
                max_grad_norm: 1.0,
                ..Default::default()
            },
        )
        .unwrap();
        let grads = (v.as_tensor() * 1.0)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap(); // grad (1, 1)
        let st = opt.step(&grads, 0.0).unwrap();
        assert!((st.grad_norm - 2f64.sqrt()).abs() < 1e-12 && st.clipped);
        let m: Vec<f64> = opt.state_tensors().unwrap()["exp_avg.w"].to_vec1().unwrap();
        // After clipping the gradient is (1,1)/sqrt(2); exp_avg = 0.1 * that.
        assert!((m[0] - 0.1 / 2f64.sqrt()).abs() < 1e-6, "{m:?}");
    }

    /// Steps `w` (two parameters, f32 or f64 per `dtype`) three times on the loss
    /// `sum(c * w^3)`, with weight decay and clipping that bites; returns the weights, the
    /// moments and the reported norms.
    fn three_steps(dtype: DType) -> (Vec<Vec<f64>>, Vec<Vec<f64>>, Vec<f64>) {
        let values: Vec<Vec<f64>> = vec![
            (0..1000).map(|i| ((i as f64) * 0.37).sin()).collect(),
            (0..77).map(|i| ((i as f64) * 1.3).cos() * 2.0).collect(),
        ];
        let vars: Vec<(String, Var)> = values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let t = Tensor::new(v.as_slice(), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                (format!("w{i}"), Var::from_tensor(&t).unwrap())
            })
            .collect();
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            max_grad_norm: 5.0,
            ..Default::default()
        };
        let mut opt = AdamW::new(vars.clone(), cfg).unwrap();
        let mut norms = vec![];
        for step in 0..3 {
            let mut loss = Tensor::zeros((), dtype, &Device::Cpu).unwrap();
            for (_, v) in &vars {
                let cube = v.as_tensor().powf(3.0).unwrap();
                loss = (loss + (cube * (0.5 + step as f64)).unwrap().sum_all().unwrap()).unwrap();
            }
            let grads = loss.backward().unwrap();
            norms.push(opt.step(&grads, 0.01).unwrap().grad_norm);
        }
        let read = |t: &Tensor| -> Vec<f64> { t.to_dtype(DType::F64).unwrap().to_vec1().unwrap() };
        let weights = vars.iter().map(|(_, v)| read(v.as_tensor())).collect();
        let state = opt.state_tensors().unwrap();
        let moments = state.values().map(read).collect();
        (weights, moments, norms)
    }

    #[test]
    fn the_in_place_f32_update_matches_the_composed_f64_one() {
        let (w32, m32, n32) = three_steps(DType::F32);
        let (w64, m64, n64) = three_steps(DType::F64);
        assert!(n64[0] > 5.0, "clipping must bite: norm {}", n64[0]);
        for (a, b) in n32.iter().zip(&n64) {
            assert!((a - b).abs() <= 1e-5 * b, "norm {a} vs {b}");
        }
        for (got, want) in w32.iter().chain(&m32).zip(w64.iter().chain(&m64)) {
            assert_eq!(got.len(), want.len());
            for (a, b) in got.iter().zip(want) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
            }
        }
        // The weights moved: a comparison of two unchanged copies would pass too.
        let start = ((1.0f64) * 0.37).sin();
        assert!((w64[0][1] - start).abs() > 1e-3);
    }

    #[test]
    fn the_gradient_norm_adds_its_chunks_in_order_whatever_the_thread_count() {
        // Chunks of very different magnitudes, so that another order of the additions (a tree
        // of halves, as a parallel reduction makes) gives other bits.
        let v: Vec<f32> = (0..9 * CHUNK + 17)
            .map(|i| ((i as f32) * 0.001).sin() * 10f32.powi((i / CHUNK) as i32 * 3 % 11 - 5))
            .collect();
        let in_order = v
            .chunks(CHUNK)
            .map(|c| c.iter().map(|&x| x as f64 * x as f64).sum::<f64>())
            .fold(0.0, |acc, s| acc + s);
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let got = pool.install(|| sum_of_squares(&v));
            assert_eq!(
                got.to_bits(),
                in_order.to_bits(),
                "{threads} threads: {got} vs {in_order}"
            );
        }
    }

    #[test]
    fn saved_and_loaded_moments_do_not_alias_the_live_ones() {
        let v = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![("w".into(), v.clone())], AdamWConfig::default()).unwrap();
        let step = |opt: &mut AdamW| {
            let grads = grads_of_sum_of_squares(&v);
            opt.step(&grads, 0.01).unwrap();
        };
        step(&mut opt);
        let saved = opt.state_tensors().unwrap();
        let before: Vec<f32> = saved["exp_avg.w"].to_vec1().unwrap();
        step(&mut opt);
        assert_eq!(saved["exp_avg.w"].to_vec1::<f32>().unwrap(), before);
        opt.load_state(&saved, 1).unwrap();
        step(&mut opt);
        assert_eq!(saved["exp_avg.w"].to_vec1::<f32>().unwrap(), before);
    }
}
