//! # chorus-model
//!
//! The one policy family Chorus trains and serves: the hybrid of NVIDIA Nemotron 3 (HF
//! `model_type = "nemotron_h"`) — Mamba-2 blocks with a few attention blocks, (Latent)MoE and
//! dense relu² feed-forward blocks, and Chorus' multi-token-prediction head.
//!
//! Two ways to run it, over the same weights and tensor names as HF checkpoints:
//! - [`NemotronH`]: full sequences on candle, differentiable through every parameter — what the
//!   learner trains and what parity tests compare with HF transformers.
//! - [`engine::Engine`]: incremental decoding for rollouts — per-sequence caches (conv, SSM, KV)
//!   in a batch whose sequences may join and leave between steps, sampling, and MTP speculative
//!   decoding. Its projections sit behind [`engine::LinearOp`], the one place a quantized
//!   kernel (NVFP4) plugs in.
//!
//! Configs are read in two stages ([`config::RawConfig`] → [`NemotronHConfig`]); checkpoints are
//! HF safetensors ([`checkpoint`]); tokenizers are HF `tokenizer.json` files, including the
//! byte-level one Chorus builds for models trained from scratch ([`tokenizer`]).
//!
//! Invariants: tensor names are HF's (`backbone.layers.N.mixer.*`, `mtp.*` for Chorus' head);
//! the engine and [`NemotronH`] agree to 1e-4 on logits; weights are immutable inside the
//! engine, decode state lives in caches apart from them.

#![deny(missing_docs)]

pub mod allocator;
mod attention;
pub mod checkpoint;
pub mod config;
pub mod engine;
mod error;
mod fused;
mod layout;
mod mamba2;
mod moe;
mod nemotron_h;
pub mod nn;
mod params;
pub mod quantize;
pub mod sampling;
mod simd;
pub mod threads;
pub mod tokenizer;

pub use config::{BlockKind, ChorusSettings, NemotronHConfig};
pub use error::{ModelError, Result};
pub use layout::Nvfp4Policy;
pub use mamba2::{Mamba2, MambaState, ssd_chunked};
pub use moe::{ExpertLoad, route};
pub use nemotron_h::{Block, Mixer, MtpHead, NemotronH};
pub use params::{ParamPath, Params, fuse_experts};
