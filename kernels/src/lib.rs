//! NVFP4 (4-bit floating point) format and CPU kernels for Chorus.
//!
//! NVFP4 stores each element as a 4-bit E2M1 code (values 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their
//! negatives), one E4M3 (`fn`) scale per 16 consecutive elements along the last axis, and one
//! FP32 global scale per tensor: 4.5 bits per element. This crate provides
//!
//! - the scalar codecs ([`e2m1_encode`], [`e4m3_encode`], ... with round-to-nearest-even and
//!   saturation, plus stochastic E2M1 rounding);
//! - [`Nvfp4Tensor`]: quantization of a row-major 2-D f32 tensor with TransformerEngine's rule
//!   (1x16 or 16x16 block scales, nearest-even or seeded stochastic rounding) and
//!   dequantization, in the ModelOpt checkpoint layout (`weight`, `weight_scale`,
//!   `weight_scale_2`);
//! - the 16x16 random Hadamard transform of the NVFP4 training recipe
//!   ([`hadamard16_forward`], [`hadamard16_inverse`]);
//! - [`CpuGemm`]: multi-threaded `Y = X . W^T` with NVFP4 weights and f32 or bf16 activations
//!   (a bandwidth-oriented GEMV for one row, a tiled GEMM otherwise), and an f32 GEMM on the
//!   same layout for comparison. The instruction set is chosen at run time ([`Backend`]):
//!   AVX-512, AVX2/FMA, or portable Rust. Opt-in, [`CpuGemm::nvfp4_q8`] first quantizes the
//!   activations to int8 per 16-element block ([`Q8Activations`]) and multiplies with integer
//!   dot products: faster, but not bit-compatible with the f32-activation product. For
//!   batches (batched decode, prefill), [`CpuGemm::nvfp4_q8_panels`] runs the same integer
//!   products as a tiled GEMM on weights repacked once into 16-row panels ([`Nvfp4Q8Panels`]);
//! - [`CpuGemm::f32_panels`]: an f32 GEMM for dense f32 weights repacked once into 16-row
//!   panels ([`F32Panels`]), each output one sequential FMA chain (the same bits on every CPU,
//!   thread count and batch);
//! - with the `cuda` feature (off by default), module `cuda`: the CUDA kernels in `kernels/cuda/`
//!   (quantize, dequantize, NVFP4-weight GEMM), compiled at run time with NVRTC.
//!
//! # CUDA status
//!
//! The CUDA kernels exist and compile (NVRTC 12.8, machine code for sm_75 to sm_120), and
//! match the CPU kernels when run under the CPU emulation of CUDA in `kernels/cuda/emu/`, but
//! they have **not yet run on a GPU**: none has been available to this project so far. On a
//! machine with an NVIDIA GPU, its driver and the NVRTC library, run
//! `cargo test -p chorus-kernels --features cuda` (set `CHORUS_REQUIRE_GPU=1` so that a
//! missing device fails instead of skipping); the tests compare the CUDA quantizer with the
//! CPU one byte for byte (golden vectors included) and each GEMM kernel with the CPU
//! dequantized product. `cargo bench -p chorus-kernels --features cuda --bench nvfp4_gemm --
//! --cuda` times them beside the CPU kernels.
//!
//! ```
//! use chorus_kernels::{CpuGemm, Nvfp4Tensor, QuantizeOptions};
//!
//! let (m, k) = (4, 32);
//! let w: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
//! let q = Nvfp4Tensor::quantize("layers.0.mlp.up", &w, m, k, &QuantizeOptions::default())?;
//! assert_eq!(q.packed().len(), m * k / 2);
//! assert_eq!(q.scales().len(), m * k / 16);
//!
//! let x = vec![1.0f32; k];
//! let mut y = vec![0.0f32; m];
//! CpuGemm::new(2).nvfp4(&q, &x, 1, &mut y)?;
//! let deq = q.dequantize();
//! let want: f32 = deq[..k].iter().sum();
//! assert!((y[0] - want).abs() < 1e-4);
//! # Ok::<(), chorus_kernels::KernelError>(())
//! ```
//!
//! # Invariants
//!
//! - **No tensor framework.** The crate depends on no candle and, by default, on no GPU
//!   runtime; tensors cross its boundary as slices and [`Nvfp4Tensor`]. The `cuda` feature
//!   adds cudarc (driver and NVRTC, loaded dynamically, so building needs no CUDA toolkit) and
//!   device buffers of its own (`cuda::CudaNvfp4Weight`, ...). On Hopper the GEMM dequantizes
//!   NVFP4 to BF16 in its prologue for the tensor cores; the Blackwell FP4 tensor-core path is
//!   not written.
//! - **Bit-exact format.** Quantization follows TransformerEngine, including its edge cases
//!   (all-zero blocks get scale 0, an all-zero tensor gets global decode scale 1); the golden
//!   vectors in `tests/fixtures/nvfp4_vectors.json` are matched byte for byte.
//! - **Packing.** Element `2i` is the low nibble of byte `i`; scales are row-major
//!   `[rows, cols/16]` even for 16x16 tiles (each tile's scale is repeated on its 16 rows).
//! - **Errors are typed and name the tensor** ([`KernelError`]); non-finite input is rejected.
//! - **Kernels agree with the dequantized product.** Every backend is tested against the f32
//!   product of the dequantized weights; they differ only in summation order. For a given
//!   backend, results are bit-for-bit independent of the thread count. The int8-activation
//!   kernels are tested against their portable reference (bit for bit where f32 arithmetic is
//!   exact) and against the product of the weights with the dequantized activations; the tiled
//!   int8 GEMM bit for bit against an independent reference with its documented arithmetic,
//!   and within the bound of the accumulation order against the row-wise int8 kernels.

#![deny(missing_docs)]

#[cfg(feature = "cuda")]
pub mod cuda;
mod error;
mod gemm;
mod hadamard;
mod quant;
mod scalar;

pub use error::KernelError;
pub use gemm::{Backend, CpuGemm, F32Panels, Nvfp4Q8Panels, Q8Activations, cpu_description};
pub use hadamard::{HADAMARD_SIGNS, hadamard16_forward, hadamard16_inverse, hadamard16_matrix};
pub use quant::{BLOCK, BlockLayout, Nvfp4Tensor, QuantizeOptions, Rounding};
pub use scalar::{
    E2M1_MAGNITUDES, E2M1_MAX, E4M3_MAX, e2m1_decode, e2m1_encode, e2m1_encode_stochastic,
    e4m3_decode, e4m3_encode,
};
