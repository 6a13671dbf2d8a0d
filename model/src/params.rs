//! The parameter store: every weight of a model by its HF tensor name, as candle [`Var`]s so the
//! learner can differentiate through them. Model blocks read it through [`ParamPath`], whose
//! `pp()` mirrors the checkpoint path exactly (`backbone.layers.3.mixer.in_proj.weight`).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{ModelError, Result};
use crate::layout::Nvfp4Policy;

/// Named model parameters (and buffers such as `e_score_correction_bias`).
#[derive(Clone, Debug)]
pub struct Params {
    vars: BTreeMap<String, Var>,
    device: Device,
}

impl Params {
    /// An empty store on `device`.
    pub fn new(device: Device) -> Self {
        Self {
            vars: BTreeMap::new(),
            device,
        }
    }

    /// A store holding `tensors`, converted to f32 on `device`.
    pub fn from_tensors(
        tensors: impl IntoIterator<Item = (String, Tensor)>,
        device: &Device,
    ) -> Result<Self> {
        let mut p = Self::new(device.clone());
        for (name, t) in tensors {
            p.insert(name, t)?;
        }
        Ok(p)
    }

    /// Adds or replaces one tensor.
    pub fn insert(&mut self, name: impl Into<String>, t: Tensor) -> Result<()> {
        let t = t.to_dtype(DType::F32)?.to_device(&self.device)?;
        self.vars.insert(name.into(), Var::from_tensor(&t)?);
        Ok(())
    }

    /// A copy of every parameter in `dtype` (e.g. F64 for gradient checks, BF16 for speed).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let mut vars = BTreeMap::new();
        for (k, v) in &self.vars {
            vars.insert(
                k.clone(),
                Var::from_tensor(&v.as_tensor().to_dtype(dtype)?)?,
            );
        }
        Ok(Self {
            vars,
            device: self.device.clone(),
        })
    }

    /// The device the parameters live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A root path for reading parameters.
    pub fn root(&self) -> ParamPath<'_> {
        ParamPath {
            params: self,
            prefix: String::new(),
            nvfp4: None,
        }
    }

    /// A root path whose projections, where `policy` quantizes them, run their forward pass
    /// through NVFP4 with straight-through gradients (see [`crate::nn::Linear`]).
    pub fn root_nvfp4<'a>(&'a self, policy: &'a Nvfp4Policy) -> ParamPath<'a> {
        ParamPath {
            params: self,
            prefix: String::new(),
            nvfp4: Some(policy),
        }
    }

    /// The tensor called `name` with the shape `shape`, or an error naming it.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let var = self
            .vars
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
            })?;
        let got = var.dims();
        if got != shape {
            return Err(ModelError::Shape {
                name: name.to_string(),
                expected: shape.to_vec(),
                got: got.to_vec(),
            });
        }
        Ok(var.as_tensor().clone())
    }

    /// Whether a tensor called `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.vars.contains_key(name)
    }

    /// All parameters by name, sorted.
    pub fn vars(&self) -> &BTreeMap<String, Var> {
        &self.vars
    }

    /// Names of all stored tensors, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.vars.keys().map(|s| s.as_str())
    }

    /// Total number of scalar parameters.
    pub fn num_elements(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    /// Overwrites every parameter with the value of the same name in `other` (same shapes),
    /// keeping the `Var`s (and so every model built on them) in place.
    pub fn assign_from(&self, other: &BTreeMap<String, Tensor>) -> Result<()> {
        for (name, var) in &self.vars {
            let t = other
                .get(name)
                .ok_or_else(|| ModelError::MissingTensor { name: name.clone() })?;
            if t.dims() != var.dims() {
                return Err(ModelError::Shape {
                    name: name.clone(),
                    expected: var.dims().to_vec(),
                    got: t.dims().to_vec(),
                });
            }
            var.set(&t.to_dtype(DType::F32)?.to_device(&self.device)?)?;
        }
        Ok(())
    }

    /// A frozen copy: new `Var`s over copies of every tensor (same dtype and device), so that a
    /// model built on it keeps today's weights while these train on (a reference policy).
    pub fn detached_copy(&self) -> Result<Self> {
        let mut vars = BTreeMap::new();
        for (k, v) in &self.vars {
            vars.insert(
                k.clone(),
                Var::from_tensor(&v.as_tensor().detach().copy()?)?,
            );
        }
        Ok(Self {
            vars,
            device: self.device.clone(),
        })
    }

    /// A detached copy of every tensor, e.g. to save or to publish a policy version.
    pub fn snapshot(&self) -> Result<BTreeMap<String, Tensor>> {
        self.vars
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().detach().copy()?)))
            .collect()
    }
}

/// A position in the parameter tree, like candle's `VarBuilder` but failing on a missing tensor
/// instead of creating one.
#[derive(Clone)]
pub struct ParamPath<'a> {
    params: &'a Params,
    prefix: String,
    nvfp4: Option<&'a Nvfp4Policy>,
}

impl<'a> ParamPath<'a> {
    /// The path one level down.
    pub fn pp(&self, name: impl std::fmt::Display) -> ParamPath<'a> {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        ParamPath {
            params: self.params,
            prefix,
            nvfp4: self.nvfp4,
        }
    }

    /// Whether the projection weight `name` below this path (input width `in_dim`) runs its
    /// forward pass through NVFP4; returns its full name if so.
    pub fn nvfp4_weight(&self, name: &str, in_dim: usize) -> Option<String> {
        let full = self.name(name);
        self.nvfp4
            .filter(|policy| policy.quantizes(&full, in_dim))
            .map(|_| full)
    }

    /// The full name of `name` below this path.
    pub fn name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// The tensor `name` below this path, checked against `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.params.get(&self.name(name), shape)
    }

    /// Whether `name` exists below this path.
    pub fn contains(&self, name: &str) -> bool {
        self.params.contains(&self.name(name))
    }

    /// The device of the store.
    pub fn device(&self) -> &Device {
        self.params.device()
    }
}
