//! Building an [`Engine`] from named tensors: every weight is read by its HF name, checked
//! against the config's shape, and stored as the engine keeps it (projections as
//! [`LinearOp`]s, NVFP4 where a checkpoint or the [`Nvfp4Policy`] says so).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Tensor;
use chorus_kernels::{Nvfp4Tensor, QuantizeOptions};

use super::Engine;
use super::block::BlockW;
use super::linear::LinearOp;
use super::mtp::MtpW;
use crate::config::NemotronHConfig;
use crate::error::{ModelError, Result};
use crate::layout::Nvfp4Policy;
use crate::params::Params;
use crate::quantize::read_split;

/// How the engine stores its projections.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineOptions {
    /// Quantize projection weights to NVFP4 on load (checkpoints already in NVFP4 stay so).
    pub nvfp4: Option<Nvfp4Policy>,
    /// NVFP4 projections round their activations to int8 per 16 inputs and multiply them
    /// with integer dot products, as llama.cpp does for its 4-bit types: matrix-vector
    /// products 2-3x faster, logits off by the rounding (about 0.4% of each projection's
    /// largest output), so log-probabilities no longer match the learner's NVFP4 forward pass
    /// exactly. Where the CPU has AVX2 (with FMA and F16C) or AVX-512 BW, every call rounds,
    /// prefill included: from
    /// [`PANELS_MIN_ROWS`](super::PANELS_MIN_ROWS) rows a tiled int8 GEMM runs on a
    /// repacked copy of each projection (10/9 of its NVFP4 bytes, kept beside it).
    /// Elsewhere only calls of up to [`INT8_MAX_ROWS`](super::INT8_MAX_ROWS) rows (decode
    /// steps of up to 64 sequences) round; longer prefills keep f32 activations. No effect on
    /// f32 projections.
    pub int8_activations: bool,
    /// Make each sequence's logits independent of the other sequences in its batch (runs
    /// with `deterministic = true`): [`Engine::forward`] then runs every sequence of a batch
    /// on its own, giving up the shared pass over the weights. Prefill is always the whole
    /// prompt in one call, so chunking cannot vary either.
    pub batch_invariant: bool,
}

/// A tensor as row-major f32 values the engine may keep as they are: its shape and values.
#[derive(Clone, Debug, PartialEq)]
pub struct OwnedTensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f32>,
}

/// Where the named tensors come from.
enum Source<'a> {
    /// Candle tensors, copied out (the caller keeps them).
    Tensors(&'a BTreeMap<String, Tensor>),
    /// Values the engine takes over: each is moved into engine storage when read, so building
    /// from a received weight stream does not copy (and fault in) the model's bytes again.
    Owned(RefCell<BTreeMap<String, OwnedTensor>>),
}

/// Named tensors being read into engine storage, with the NVFP4 policy to apply on the way.
pub(super) struct Weights<'a> {
    map: Source<'a>,
    /// Projections that arrive already in NVFP4, by weight name.
    nvfp4: &'a BTreeMap<String, Nvfp4Tensor>,
    policy: Option<&'a Nvfp4Policy>,
    int8_activations: bool,
}

impl Weights<'_> {
    /// The tensor `name`, which must have `shape`, flattened. Each name is read once.
    pub(super) fn vec(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let missing = || ModelError::MissingTensor { name: name.into() };
        let wrong_shape = |got: &[usize]| ModelError::Shape {
            name: name.into(),
            expected: shape.to_vec(),
            got: got.to_vec(),
        };
        match &self.map {
            Source::Tensors(map) => {
                let t = map.get(name).ok_or_else(missing)?;
                if t.dims() != shape {
                    return Err(wrong_shape(t.dims()));
                }
                Ok(t.flatten_all()?.to_vec1::<f32>()?)
            }
            Source::Owned(map) => {
                let mut map = map.borrow_mut();
                let t = map.get(name).ok_or_else(missing)?;
                if t.shape != shape {
                    return Err(wrong_shape(&t.shape));
                }
                if t.data.len() != shape.iter().product::<usize>() {
                    return Err(ModelError::Input(format!(
                        "tensor `{name}` of shape {shape:?} holds {} values",
                        t.data.len()
                    )));
                }
                Ok(map.remove(name).expect("looked up above").data)
            }
        }
    }

    /// The projection `{name}.weight` (`[out_dim, in_dim]`): NVFP4 if it arrived so or the
    /// policy quantizes it, else dense f32.
    pub(super) fn linear(&self, name: &str, in_dim: usize, out_dim: usize) -> Result<LinearOp> {
        let weight_name = format!("{name}.weight");
        if let Some(q) = self.nvfp4.get(&weight_name) {
            if (q.rows(), q.cols()) != (out_dim, in_dim) {
                return Err(ModelError::Shape {
                    name: weight_name,
                    expected: vec![out_dim, in_dim],
                    got: vec![q.rows(), q.cols()],
                });
            }
            return Ok(LinearOp::nvfp4(q.clone(), self.int8_activations));
        }
        let w = self.vec(&weight_name, &[out_dim, in_dim])?;
        match self.policy {
            Some(p) if p.quantizes(&weight_name, in_dim) => {
                let options = QuantizeOptions::default();
                let q = Nvfp4Tensor::quantize(&weight_name, &w, out_dim, in_dim, &options)
                    .map_err(|e| ModelError::Input(e.to_string()))?;
                Ok(LinearOp::nvfp4(q, self.int8_activations))
            }
            _ => Ok(LinearOp::dense(w, out_dim, in_dim)),
        }
    }

    /// Whether a tensor `name` exists (and was not read yet).
    pub(super) fn has(&self, name: &str) -> bool {
        match &self.map {
            Source::Tensors(map) => map.contains_key(name),
            Source::Owned(map) => map.borrow().contains_key(name),
        }
    }
}

impl Engine {
    /// Builds the engine from the current values of `params`.
    pub fn from_params(cfg: &NemotronHConfig, params: &Params) -> Result<Self> {
        Self::from_tensors(cfg, &params.snapshot()?)
    }

    /// Builds the engine from named tensors (HF names).
    pub fn from_tensors(cfg: &NemotronHConfig, tensors: &BTreeMap<String, Tensor>) -> Result<Self> {
        Self::build(
            cfg,
            Source::Tensors(tensors),
            &BTreeMap::new(),
            &EngineOptions::default(),
        )
    }

    /// Builds the engine from named tensors with storage options (e.g. NVFP4 on load).
    pub fn from_tensors_with(
        cfg: &NemotronHConfig,
        tensors: &BTreeMap<String, Tensor>,
        options: &EngineOptions,
    ) -> Result<Self> {
        Self::build(cfg, Source::Tensors(tensors), &BTreeMap::new(), options)
    }

    /// Builds the engine from named tensors it takes over (HF names): dense weights are kept
    /// as given, not copied, which is how a worker installs a version it received.
    pub fn from_owned(
        cfg: &NemotronHConfig,
        tensors: BTreeMap<String, OwnedTensor>,
        options: &EngineOptions,
    ) -> Result<Self> {
        Self::build(
            cfg,
            Source::Owned(RefCell::new(tensors)),
            &BTreeMap::new(),
            options,
        )
    }

    /// Loads a checkpoint directory, keeping NVFP4 projections of a quantized checkpoint
    /// (ModelOpt layout) in NVFP4 and applying `options` to the rest.
    pub fn from_checkpoint(dir: &Path, options: &EngineOptions) -> Result<Self> {
        let cfg = crate::checkpoint::load_config(dir)?;
        let (dense, quantized) = read_split(dir)?;
        Self::build(&cfg, Source::Tensors(&dense), &quantized, options)
    }

    fn build(
        cfg: &NemotronHConfig,
        tensors: Source<'_>,
        nvfp4: &BTreeMap<String, Nvfp4Tensor>,
        options: &EngineOptions,
    ) -> Result<Self> {
        let w = Weights {
            map: tensors,
            nvfp4,
            policy: options.nvfp4.as_ref(),
            int8_activations: options.int8_activations,
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
            Some(MtpW::load(cfg, &w)?)
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
            batch_invariant: options.batch_invariant,
        })
    }
}
