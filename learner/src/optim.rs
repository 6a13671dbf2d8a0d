//! AdamW with global grad-norm clipping and savable state (candle has neither state saving nor
//! clipping).

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
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
                sq += g
                    .to_dtype(DType::F64)?
                    .sqr()?
                    .sum_all()?
                    .to_scalar::<f64>()?;
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

    /// The moments as named tensors (`exp_avg.<param>`, `exp_avg_sq.<param>`) for saving.
    pub fn state_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (k, t) in &self.exp_avg {
            out.insert(format!("exp_avg.{k}"), t.clone());
        }
        for (k, t) in &self.exp_avg_sq {
            out.insert(format!("exp_avg_sq.{k}"), t.clone());
        }
        out
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
                map.insert(name.clone(), t.to_dtype(v.dtype())?.to_device(v.device())?);
            }
        }
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

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
            let grads = v
                .as_tensor()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
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
        let m: Vec<f64> = opt.state_tensors()["exp_avg.w"].to_vec1().unwrap();
        // After clipping the gradient is (1,1)/sqrt(2); exp_avg = 0.1 * that.
        assert!((m[0] - 0.1 / 2f64.sqrt()).abs() < 1e-6, "{m:?}");
    }
}
