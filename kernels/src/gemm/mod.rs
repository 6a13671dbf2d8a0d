//! CPU GEMM/GEMV with NVFP4 or f32 weights: `Y[n, m] = X[n, k] . W[m, k]^T`.
//!
//! Three code paths with f32 (or bf16) activations, and an int8-activation one:
//! - **GEMV** (`n == 1`, NVFP4 weights): each weight row is decoded in registers and
//!   multiplied straight into the activation row, so the weights are read once (0.5625 bytes
//!   per element, software-prefetched) and nothing is written back. The activation row is
//!   first reordered into the order in which the nibbles decode (even elements from low
//!   nibbles, odd ones from high nibbles), so decoding needs no interleave.
//! - **Small batch** (`2 <= n <= 8`, NVFP4 weights, AVX-512 backend): the same register decode,
//!   two weight rows at a time against all `n` reordered activation rows; groups of weight rows
//!   sweep the reduction axis in L1-sized slices.
//!
//!   With bf16 activations on CPUs with AVX-512 BF16 (and `k` a multiple of 256), both of these
//!   decode the nibbles straight to bf16 and multiply with `vdpbf16ps`: E2M1 values are exact
//!   in bf16, so the products are exact and accumulate in f32 (the instruction flushes
//!   subnormal inputs to zero).
//! - **Tiled GEMM** (everything else, and the f32 GEMM): weight tiles are decoded (or copied)
//!   to f32 once into an L2-resident buffer and reused by a register-blocked dot-product
//!   micro-kernel (4x3 ymm with AVX2/FMA, 4x4 zmm with AVX-512) across all activation rows,
//!   which are packed into aligned, padded buffers. When the activations fit in L2 the loop
//!   runs over weight-row blocks outermost (each weight row streams sequentially); otherwise
//!   over `KC`-wide slices of the reduction axis. With bf16 activations and AVX-512 BF16
//!   (`k` a multiple of 32), tiles decode to bf16 instead (block scale times E2M1 value has at
//!   most 6 significant bits, so it is exact) for a 4x4 `vdpbf16ps` micro-kernel, and the
//!   global scale is applied to the partial sums.
//!
//! - **Int8 activations** (opt-in, NVFP4 weights: [`CpuGemm::nvfp4_q8`] and
//!   [`CpuGemm::nvfp4_q8_quantized`], meant for `n <= 8`): the activation rows are first
//!   quantized to int8 per 16-element block with one f32 scale each ([`Q8Activations`]: what
//!   llama.cpp's `Q8_0` does per 32 elements), so that each weight block is multiplied in
//!   integers. Twice an E2M1 value is an integer in -12..=12, so a `vpshufb` (or `vpermb`)
//!   lookup decodes nibbles to exact int8 weights, and `vpdpbusd` (AVX-512 VNNI) or
//!   `vpmaddubsw` + `vpmaddwd` (AVX2, AVX-512 BW) multiply 4 byte pairs per 32-bit lane: several
//!   times as many elements per instruction as widening each nibble to f32. Only each block's
//!   integer sum goes to f32, times the product of its weight and activation scales. Activation
//!   rows are quantized once per call (a few percent of a 1024 x 1024 GEMV), or once for several
//!   weights with [`CpuGemm::nvfp4_q8_quantized`]; larger batches run in chunks of 8 rows.
//!
//!   The price is precision: each activation moves by up to half its block's scale (1/254 of
//!   the block's largest magnitude), so results are not bit-compatible with the f32-activation
//!   paths, nor with the learner's NVFP4 fake quantization, which keeps activations in full
//!   precision (relative output differences of a few 1e-3 on random data). A rollout engine
//!   using it samples from a slightly different policy than the one the learner scores, so it
//!   is opt-in. `benches/nvfp4_gemm.rs` times it against the f32-activation GEMV.
//! - **Tiled int8 GEMM** (opt-in, for batches of about 8 rows and more:
//!   [`CpuGemm::nvfp4_q8_panels`], [`CpuGemm::nvfp4_q8_panels_quantized`]): the same
//!   quantized activations and integer block sums, against weights repacked once into panels
//!   of 16 output rows ([`Nvfp4Q8Panels`]), so that the 16 lanes of a register are 16 output
//!   rows: `vpdpbusd` with a broadcast activation dword completes the block sums of 16 outputs
//!   with no horizontal reduction, and a register tile of 2 panels x 8 activation rows reuses
//!   each decoded weight 8 times. The weights are read once per 128 activation rows instead of
//!   once per 8. AVX2 CPUs (FMA and F16C too) run it on two 8-lane halves of each panel.
//!   Its results are the same bits on every CPU (a portable kernel with the same arithmetic
//!   runs where neither AVX-512 BW nor AVX2 does; see [`CpuGemm::has_fast_q8_panels`]).
//!
//! - **f32 panel GEMM** ([`CpuGemm::f32_panels`], f32 weights repacked once into panels of
//!   16 output rows, [`F32Panels`]): the engine's dense f32 projections from one activation
//!   row up. The 16 lanes of a register are 16 output rows, so a broadcast activation value
//!   and one FMA advance 16 outputs; a register tile of 2 panels x 12 rows (AVX-512F; 1 panel
//!   x 6 rows on AVX2) reuses each weight vector 12 times and stores each output once,
//!   row-major, with no horizontal reduction. Every output is one sequential FMA chain over
//!   `k`, so its bits do not depend on the CPU, the threads, or the other rows in the call.
//!
//! Work is split over weight rows (`m`) between `threads` scoped threads; every thread writes
//! its own columns of `Y`. All paths read every weight exactly once per call (the int8 path
//! once per chunk of 8 activation rows, the tiled int8 GEMM once per 128).

mod avx2;
mod avx512;
mod f32_panels;
mod micro;
mod portable;
mod q8;

use half::bf16;

pub use f32_panels::F32Panels;
pub use q8::{Nvfp4Q8Panels, Q8Activations};

use crate::error::KernelError;
use crate::quant::{BLOCK, Nvfp4Tensor};

/// Reduction-axis slice width of the tiled path (a multiple of 32).
const KC: usize = 512;
/// Weight rows decoded per tile in the tiled path (a multiple of 12, like the row chunks).
const MB: usize = 96;
/// Weight rows per block when the activations are small (fewer concurrent weight streams; a
/// multiple of 12).
const MB_SMALL: usize = 12;
/// Largest `n * k` (f32 elements) for which the activations are packed whole (L2-resident).
const SMALL_X: usize = 192 * 1024;
/// Padding (in f32) added to packed row strides so rows do not alias in the L1 cache.
const PAD: usize = 16;
/// Activation rows per micro-kernel call.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const NR: usize = 4;
/// Weight rows per micro-kernel call.
const MR: usize = 3;

/// Which instruction set the kernels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Plain Rust, for every CPU.
    Portable,
    /// AVX2 + FMA (x86-64, detected at run time).
    Avx2Fma,
    /// AVX-512F decode and micro-kernel, plus the small-batch path (x86-64 with AVX-512F,
    /// AVX2 and FMA, detected at run time).
    Avx512,
}

impl Backend {
    /// The fastest backend this CPU supports.
    pub fn detect() -> Backend {
        if avx512::available() {
            Backend::Avx512
        } else if avx2::available() {
            Backend::Avx2Fma
        } else {
            Backend::Portable
        }
    }

    /// Whether this CPU can run the backend.
    pub fn is_supported(self) -> bool {
        match self {
            Backend::Portable => true,
            Backend::Avx2Fma => avx2::available(),
            Backend::Avx512 => avx512::available(),
        }
    }

    /// The instruction sets the backend uses, e.g. `avx2+fma`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Portable => "portable",
            Backend::Avx2Fma => "avx2+fma",
            Backend::Avx512 => "avx512f+avx2+fma",
        }
    }
}

/// This machine's CPU as reports and benchmarks print it: the model name from `/proc/cpuinfo`
/// (where there is one), the hardware threads and the backend the kernels dispatch to, e.g.
/// `Intel(R) Xeon(R) Processor, 2 threads, avx512f+avx2+fma`. Float rounding, and with it
/// every number a run computes, may differ between backends.
pub fn cpu_description() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{model}, {threads} threads, {}", Backend::detect().name())
}

/// A configured CPU GEMM: thread count and instruction set.
///
/// ```
/// use chorus_kernels::{CpuGemm, Nvfp4Tensor, QuantizeOptions};
/// let (m, k, n) = (8, 32, 2);
/// let w: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 - 3.0).collect();
/// let w = Nvfp4Tensor::quantize("w", &w, m, k, &QuantizeOptions::default()).unwrap();
/// let x = vec![1.0f32; n * k];
/// let mut y = vec![0.0f32; n * m];
/// CpuGemm::new(2).nvfp4(&w, &x, n, &mut y).unwrap();
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuGemm {
    threads: usize,
    backend: Backend,
}

impl Default for CpuGemm {
    fn default() -> Self {
        CpuGemm::new(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
}

impl CpuGemm {
    /// `threads` worker threads (0 is treated as 1) on the fastest detected backend.
    pub fn new(threads: usize) -> Self {
        CpuGemm {
            threads: threads.max(1),
            backend: Backend::detect(),
        }
    }

    /// Forces a backend; fails if this CPU cannot run it.
    pub fn with_backend(self, backend: Backend) -> Result<Self, KernelError> {
        if !backend.is_supported() {
            return Err(KernelError::UnsupportedBackend {
                backend: backend.name(),
            });
        }
        Ok(CpuGemm { backend, ..self })
    }

    /// Number of worker threads.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// `Y[n, m] = X[n, k] . W^T` with NVFP4 weights `w` (`[m, k]`) and f32 activations
    /// (row-major `[n, k]`). `y` (row-major `[n, m]`) is overwritten.
    pub fn nvfp4(
        &self,
        w: &Nvfp4Tensor,
        x: &[f32],
        n: usize,
        y: &mut [f32],
    ) -> Result<(), KernelError> {
        check_operands(w.rows(), w.cols(), x.len(), n, y.len())?;
        self.run(Weights::Nvfp4(w), Acts::F32(x), n, w.rows(), w.cols(), y);
        Ok(())
    }

    /// As [`CpuGemm::nvfp4`] with bf16 activations.
    pub fn nvfp4_bf16(
        &self,
        w: &Nvfp4Tensor,
        x: &[bf16],
        n: usize,
        y: &mut [f32],
    ) -> Result<(), KernelError> {
        check_operands(w.rows(), w.cols(), x.len(), n, y.len())?;
        self.run(Weights::Nvfp4(w), Acts::Bf16(x), n, w.rows(), w.cols(), y);
        Ok(())
    }

    /// As [`CpuGemm::nvfp4`], with the activations first quantized to int8 per 16-element
    /// block ([`Q8Activations`]) and multiplied with integer dot products: the int8 path of
    /// the module docs, for `n <= 8` (larger batches run in chunks of 8 rows, each reading the
    /// weights again). Its results differ from [`CpuGemm::nvfp4`]'s by the activations'
    /// rounding. Unlike [`CpuGemm::nvfp4`], a non-finite activation is an error
    /// ([`KernelError::NonFinite`]), since int8 cannot carry it.
    pub fn nvfp4_q8(
        &self,
        w: &Nvfp4Tensor,
        x: &[f32],
        n: usize,
        y: &mut [f32],
    ) -> Result<(), KernelError> {
        check_operands(w.rows(), w.cols(), x.len(), n, y.len())?;
        let xq = Q8Activations::quantize(x, n, w.cols())?;
        q8::run(self.threads, self.backend, w, &xq, y);
        Ok(())
    }

    /// As [`CpuGemm::nvfp4_q8`] with activations already quantized (one quantization can
    /// serve every weight that multiplies the same activations). `y` is row-major
    /// `[x.rows(), w.rows()]`; `x.cols()` must be `w.cols()`.
    pub fn nvfp4_q8_quantized(
        &self,
        w: &Nvfp4Tensor,
        x: &Q8Activations,
        y: &mut [f32],
    ) -> Result<(), KernelError> {
        check_quantized(w.rows(), w.cols(), x, y.len())?;
        q8::run(self.threads, self.backend, w, x, y);
        Ok(())
    }

    /// `Y[n, m] = X[n, k] . W^T` with NVFP4 weights repacked into panels ([`Nvfp4Q8Panels`])
    /// and the f32 activations `x` (row-major `[n, k]`) quantized to int8 per 16-element block
    /// as [`Q8Activations`] does, inside the parallel call; `y` (row-major `[n, m]`) is
    /// overwritten. The tiled int8 GEMM of the module docs, for batches of 8 rows and more
    /// (batched decode, prefill) on CPUs where [`CpuGemm::has_fast_q8_panels`] holds: measured
    /// on a 2-core AVX-512 VNNI Xeon, about twice as fast as [`CpuGemm::nvfp4_q8`] (which
    /// reads the weights again for every 8 rows) from 64 rows on and 1.3-1.4x at 8 rows, where
    /// both are bound by memory bandwidth. The AVX2 kernel without AVX-VNNI (the same Xeon with
    /// the AVX2 backend, Zen 3's instruction set): about 1.4x [`CpuGemm::nvfp4_q8`] at 64 rows
    /// and 1.2-1.4x at 8 on weights that fit in cache, but 0.7-1.0x at 8 rows and fewer on a
    /// 33 MB weight, bound by memory bandwidth with 10/9 of the bytes. For a single row
    /// [`CpuGemm::nvfp4_q8`] is faster.
    ///
    /// Rounding: every output is `fl(acc * (global / 2))` with, blocks `b` in order,
    /// `acc = fma(dot_b, fl(w_scale_b * x_scale_b), acc)` from 0, `dot_b` the block's exact
    /// integer dot product of the E2M1 codes (times 2) and the int8 values. These are the
    /// integers [`CpuGemm::nvfp4_q8`] forms, so the two differ only in the order and fusing of
    /// the f32 accumulation (each is within `gamma(k / 16 + 2) * sum_b |dot_b s_b| * global /
    /// 2` of the exact sum of its terms, `gamma(j) = j u / (1 - j u)`, `u = 2^-24`). The result
    /// is the same, bit for bit, on every CPU and backend, for every thread count, and
    /// whatever other rows the call holds: a row computed alone equals the same row in a
    /// batch. It is also the same as [`CpuGemm::nvfp4_q8_panels_quantized`] on
    /// `Q8Activations::quantize(x, n, k)`. As with [`CpuGemm::nvfp4_q8`], a non-finite
    /// activation is an error ([`KernelError::NonFinite`]).
    pub fn nvfp4_q8_panels(
        &self,
        w: &Nvfp4Q8Panels,
        x: &[f32],
        n: usize,
        y: &mut [f32],
    ) -> Result<(), KernelError> {
        check_operands(w.rows(), w.cols(), x.len(), n, y.len())?;
        q8::check_finite(x, w.cols())?;
        // Quantized tile by tile inside the parallel call, to the bits `Q8Activations` gets.
        let src = q8::panels::Source::F32 { x, n, k: w.cols() };
        q8::panels::run(self.threads, self.backend, w, src, y);
        Ok(())
    }

    /// As [`CpuGemm::nvfp4_q8_panels`] with activations already quantized (one quantization
    /// can serve every weight that multiplies the same activations). `y` is row-major
    /// `[x.rows(), w.rows()]`; `x.cols()` must be `w.cols()`.
    pub fn nvfp4_q8_panels_quantized(
        &self,
        w: &Nvfp4Q8Panels,
        x: &Q8Activations,
        y: &mut [f32],
    ) -> Result<(), KernelError> {
        check_quantized(w.rows(), w.cols(), x, y.len())?;
        q8::panels::run(
            self.threads,
            self.backend,
            w,
            q8::panels::Source::Quantized(x),
            y,
        );
        Ok(())
    }

    /// Whether [`CpuGemm::nvfp4_q8_panels`] runs a SIMD micro-kernel with this backend on
    /// this CPU: AVX-512 F and BW with the AVX-512 backend (fastest with VNNI and VBMI), or
    /// AVX2, FMA and F16C with the AVX2 backend or an AVX-512 one without BW (faster with
    /// AVX-VNNI). Otherwise it runs a portable kernel, with the same results but many times
    /// slower than [`CpuGemm::nvfp4`].
    pub fn has_fast_q8_panels(&self) -> bool {
        q8::panels::is_fast(self.backend)
    }

    /// `Y[n, m] = X[n, k] . W^T` with f32 weights repacked into panels of 16 output rows
    /// ([`F32Panels`]) and f32 activations `x` (row-major `[n, k]`); `y` (row-major `[n, m]`)
    /// is overwritten. The f32 panel GEMM of the module docs: a register-tiled micro-kernel
    /// (AVX-512F, or AVX2 + FMA, see [`CpuGemm::has_fast_f32_panels`]) with 16 outputs in the
    /// lanes of a register, for dense f32 projections from one activation row up.
    ///
    /// Rounding: every output is one sequential chain of fused multiply-adds over the
    /// reduction axis in order, `y[r, o] = fma(w[o, k-1], x[r, k-1], ... fma(w[o, 0], x[r, 0],
    /// 0.0))`, so the result is the same, bit for bit (NaN payloads aside), on every CPU and
    /// backend, for every thread count, and whatever other rows the call holds: a row computed
    /// alone equals the same row in a batch (a speculative verification pass reproduces
    /// one-token decoding).
    pub fn f32_panels(
        &self,
        w: &F32Panels,
        x: &[f32],
        n: usize,
        y: &mut [f32],
    ) -> Result<(), KernelError> {
        check_operands(w.rows(), w.cols(), x.len(), n, y.len())?;
        f32_panels::run(self.threads, self.backend, w, x, n, y);
        Ok(())
    }

    /// Whether [`CpuGemm::f32_panels`] runs a SIMD micro-kernel with this backend on this CPU
    /// (AVX-512F with the AVX-512 backend, AVX2 + FMA with the AVX2 one). Otherwise it runs a
    /// portable kernel with the same results, many times slower.
    pub fn has_fast_f32_panels(&self) -> bool {
        f32_panels::is_fast(self.backend)
    }

    /// Reference f32 GEMM on the same layout: `w` is row-major `[m, k]`.
    pub fn f32(
        &self,
        w: &[f32],
        m: usize,
        k: usize,
        x: &[f32],
        n: usize,
        y: &mut [f32],
    ) -> Result<(), KernelError> {
        let need = elements("w", m, k)?;
        if w.len() != need {
            return Err(KernelError::shape(
                "w",
                format!("shape [{m}, {k}] needs {need} elements, got {}", w.len()),
            ));
        }
        check_operands(m, k, x.len(), n, y.len())?;
        self.run(Weights::F32 { data: w, k }, Acts::F32(x), n, m, k, y);
        Ok(())
    }

    /// Dispatch, first match wins: AVX-512 small batch (bf16 `vdpbf16ps`, then f32), GEMV
    /// (AVX-512 bf16, then the backend's f32), then the tiled path (bf16 tiles, then f32).
    fn run(&self, w: Weights<'_>, x: Acts<'_>, n: usize, m: usize, k: usize, y: &mut [f32]) {
        y.fill(0.0);
        if n == 0 || m == 0 || k == 0 {
            return;
        }
        let out = OutPtr(y.as_mut_ptr());
        let threads = self.threads.min(m);
        let backend = self.backend;

        if let (2..=avx512::MAX_BATCH, Weights::Nvfp4(t), Acts::Bf16(xb), Backend::Avx512) =
            (n, &w, &x, backend)
            && avx512::bf16_gemv_supported(k)
        {
            let xs = k + 2 * PAD;
            let mut xp = vec![0u16; n * xs];
            for (dst, src) in xp.chunks_exact_mut(xs).zip(xb.chunks_exact(k)) {
                dst[..k].copy_from_slice(&permute_bf16_row(src));
            }
            split_rows(threads, m, &|rows| {
                // SAFETY: row ranges are disjoint between threads; the callee writes only the
                // columns `rows` of the `n` output rows (row stride `m`).
                unsafe { avx512::batch_rows_bf16(t, &xp, xs, n, rows, out.get(), m) };
            });
            return;
        }

        if let (2..=avx512::MAX_BATCH, Weights::Nvfp4(t), Backend::Avx512) = (n, &w, backend) {
            let xp = permute_activation_rows(&x, n, k, true);
            split_rows(threads, m, &|rows| {
                // SAFETY: row ranges are disjoint between threads; the callee writes only the
                // columns `rows` of the `n` output rows (row stride `m`).
                unsafe { avx512::batch_rows(t, &xp, k + PAD, n, rows, out.get(), m) };
            });
            return;
        }

        if let (1, Weights::Nvfp4(t), Acts::Bf16(xb), Backend::Avx512) = (n, &w, &x, backend)
            && avx512::bf16_gemv_supported(k)
        {
            let xp = permute_bf16_row(xb);
            gemv_parallel(threads, m, out, &|rows, y| {
                avx512::gemv_rows_bf16(t, &xp, rows, y)
            });
            return;
        }

        if let (1, Weights::Nvfp4(t)) = (n, &w) {
            let xp = permute_activation_rows(&x, 1, k, backend == Backend::Avx512);
            gemv_parallel(threads, m, out, &|rows, y| match backend {
                Backend::Avx2Fma => avx2::gemv_rows(t, &xp, rows, y),
                Backend::Avx512 => avx512::gemv_rows(t, &xp, rows, y),
                Backend::Portable => portable::gemv_rows(t, &xp, rows, y),
            });
            return;
        }

        match (&w, &x) {
            (Weights::Nvfp4(t), Acts::Bf16(xb))
                if backend == Backend::Avx512
                    && k.is_multiple_of(32)
                    && avx512::bf16_available() =>
            {
                tiled(&Bf16Tiles { w: t, x: xb }, threads, n, m, k, out);
            }
            _ => {
                let table = match &w {
                    Weights::Nvfp4(t) => match backend {
                        Backend::Avx2Fma => avx2::scale_table(t),
                        Backend::Avx512 => avx512::scale_table(t),
                        Backend::Portable => portable::scale_table(t),
                    },
                    Weights::F32 { .. } => [0.0; 256],
                };
                let ops = F32Tiles {
                    backend,
                    w: &w,
                    x: &x,
                    k,
                    table,
                };
                tiled(&ops, threads, n, m, k, out);
            }
        }
    }
}

/// `a * b` for a buffer of shape `[a, b]` named `tensor`, or a shape error on overflow.
fn elements(tensor: &str, a: usize, b: usize) -> Result<usize, KernelError> {
    a.checked_mul(b)
        .ok_or_else(|| KernelError::shape(tensor, format!("shape [{a}, {b}] overflows")))
}

fn check_operands(
    m: usize,
    k: usize,
    x_len: usize,
    n: usize,
    y_len: usize,
) -> Result<(), KernelError> {
    let need = elements("x", n, k)?;
    if x_len != need {
        return Err(KernelError::shape(
            "x",
            format!("activations [{n}, {k}] need {need} elements, got {x_len}"),
        ));
    }
    let need = elements("y", n, m)?;
    if y_len != need {
        return Err(KernelError::shape(
            "y",
            format!("output [{n}, {m}] needs {need} elements, got {y_len}"),
        ));
    }
    Ok(())
}

/// Checks quantized activations `x` and an output of `y_len` elements against `[m, k]`
/// weights.
fn check_quantized(m: usize, k: usize, x: &Q8Activations, y_len: usize) -> Result<(), KernelError> {
    if x.cols() != k {
        return Err(KernelError::shape(
            "x",
            format!(
                "quantized activations have {} columns, the weights {k}",
                x.cols()
            ),
        ));
    }
    let n = x.rows();
    // x.rows() * k elements exist, so only this product can overflow.
    let need = elements("y", n, m)?;
    if y_len != need {
        return Err(KernelError::shape(
            "y",
            format!("output [{n}, {m}] needs {need} elements, got {y_len}"),
        ));
    }
    Ok(())
}

/// Weight operand of the shared driver.
enum Weights<'a> {
    Nvfp4(&'a Nvfp4Tensor),
    F32 { data: &'a [f32], k: usize },
}

/// Activation operand of the shared driver.
enum Acts<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

impl Acts<'_> {
    #[inline]
    fn get(&self, i: usize) -> f32 {
        match self {
            Acts::F32(x) => x[i],
            Acts::Bf16(x) => x[i].to_f32(),
        }
    }

    /// Copies `x[row, k0..k0 + dst.len()]` into `dst` as f32.
    fn copy_row(&self, row: usize, k: usize, k0: usize, dst: &mut [f32]) {
        let range = row * k + k0..row * k + k0 + dst.len();
        match self {
            Acts::F32(x) => dst.copy_from_slice(&x[range]),
            Acts::Bf16(x) => {
                for (d, s) in dst.iter_mut().zip(&x[range]) {
                    *d = s.to_f32();
                }
            }
        }
    }
}

/// The raw output pointer, shared by threads that write disjoint elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: threads only write disjoint elements of the output (disjoint column ranges).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Splits the `m` elements of a one-row output into `threads` contiguous ranges and runs
/// `f(rows, y[rows])` for each, in parallel.
fn gemv_parallel(
    threads: usize,
    m: usize,
    out: OutPtr,
    f: &(dyn Fn(std::ops::Range<usize>, &mut [f32]) + Sync),
) {
    split_rows(threads, m, &|rows| {
        // SAFETY: the ranges are disjoint between threads and lie within the output of `m`.
        let y = unsafe { std::slice::from_raw_parts_mut(out.get().add(rows.start), rows.len()) };
        f(rows, y);
    });
}

/// Splits `0..m` into chunks of rows handed out dynamically (an atomic counter) to `threads`
/// threads, so that a thread that is descheduled, or slower, delays the call by at most one
/// chunk. Chunks are multiples of 12 rows (the micro-kernels' 3 and 4, the small-batch group).
fn split_rows(threads: usize, m: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
    for_each_chunk(threads, m, m.div_ceil(threads * 8), &|| (), &|rows, _| {
        f(rows)
    });
}

/// Runs `f(rows, scratch)` for chunks of about `chunk` rows (rounded up to a multiple of 12)
/// covering `0..m`, handed out dynamically to `threads` threads; `init` makes each thread's
/// scratch. Results do not depend on which thread runs which chunk.
fn for_each_chunk<S>(
    threads: usize,
    m: usize,
    chunk: usize,
    init: &(dyn Fn() -> S + Sync),
    f: &(dyn Fn(std::ops::Range<usize>, &mut S) + Sync),
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let chunk = chunk.max(1).div_ceil(12) * 12;
    let chunks = m.div_ceil(chunk);
    let next = AtomicUsize::new(0);
    parallel(threads.min(chunks), &|_| {
        let mut scratch = init();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= chunks {
                break;
            }
            f(i * chunk..((i + 1) * chunk).min(m), &mut scratch);
        }
    });
}

/// One parallel dispatch in two phases, for the panel kernels: the threads first claim and
/// `build` the `tiles` (each with a scratch state of its own), then claim the `items` of work
/// and `run` them, each thread waiting for every tile to be built before its first item. Up to
/// `threads` threads, fewer where there are fewer tiles and items.
fn build_then_run<S: Default>(
    threads: usize,
    tiles: usize,
    items: usize,
    build: &(dyn Fn(usize, &mut S) + Sync),
    run: &(dyn Fn(usize) + Sync),
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (claimed, built, next) = (
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    );
    parallel(threads.min(items.max(tiles)), &|_| {
        let mut scratch = S::default();
        loop {
            let t = claimed.fetch_add(1, Ordering::Relaxed);
            if t >= tiles {
                break;
            }
            build(t, &mut scratch);
            built.fetch_add(1, Ordering::Release);
        }
        let mut ready = false;
        loop {
            let item = next.fetch_add(1, Ordering::Relaxed);
            if item >= items {
                break;
            }
            if !ready {
                // Every tile is claimed, so the ones not built yet are being built by running
                // threads, none of which waits for anything: this ends.
                let mut spins = 0u32;
                while built.load(Ordering::Acquire) < tiles {
                    if spins < 100 {
                        std::hint::spin_loop();
                    } else {
                        std::thread::yield_now();
                    }
                    spins += 1;
                }
                ready = true;
            }
            run(item);
        }
    });
}

/// Runs `work(0..threads)`, as tasks of the rayon pool when there is more than one: a decode
/// step makes hundreds of these calls, and starting threads for each cost more than small
/// products take. Called from inside a pool task (experts running in parallel), the tasks
/// join that pool's queue instead of oversubscribing the cores.
fn parallel(threads: usize, work: &(dyn Fn(usize) + Sync)) {
    if threads <= 1 {
        work(0);
        return;
    }
    rayon::scope(|s| {
        for t in 1..threads {
            s.spawn(move |_| work(t));
        }
        work(0);
    });
}

/// The `n` activation rows of a GEMV as f32, each reordered into the order in which the
/// kernels decode low nibbles (even elements) and high nibbles (odd elements): per 16-block
/// `[evens, odds]`, or with `paired`, per pair of blocks A, B
/// `[A evens, B evens, A odds, B odds]` (a last unpaired block stays `[evens, odds]`).
///
/// Rows are stored with stride `k + PAD` when `n > 1`, so that they do not alias in L1.
fn permute_activation_rows(x: &Acts<'_>, n: usize, k: usize, paired: bool) -> Vec<f32> {
    let blocks = k / BLOCK;
    let xs = if n > 1 { k + PAD } else { k };
    let mut xp = vec![0.0f32; n * xs];
    for (b, row) in (0..blocks).flat_map(|b| (0..n).map(move |r| (b, r))) {
        let (xp, x_row) = (&mut xp[row * xs..row * xs + k], row * k);
        let (base, odd_offset) = if paired && b / 2 * 2 + 1 < blocks {
            // Block A of the pair at b/2*2 fills lanes 0..8 of each half, block B 8..16.
            (b / 2 * 2 * BLOCK + (b % 2) * BLOCK / 2, BLOCK)
        } else {
            (b * BLOCK, BLOCK / 2)
        };
        for j in 0..BLOCK / 2 {
            xp[base + j] = x.get(x_row + b * BLOCK + 2 * j);
            xp[base + odd_offset + j] = x.get(x_row + b * BLOCK + 2 * j + 1);
        }
    }
    xp
}

/// A bf16 activation row as raw bits, reordered per 64 elements into `[evens, odds]`: the
/// order of the AVX-512 BF16 GEMV, whose `vdpbf16ps` lanes pair adjacent low (or high)
/// nibbles.
fn permute_bf16_row(x: &[bf16]) -> Vec<u16> {
    let mut xp = vec![0u16; x.len()];
    for (dst, src) in xp.chunks_exact_mut(64).zip(x.chunks_exact(64)) {
        for j in 0..32 {
            dst[j] = src[2 * j].to_bits();
            dst[32 + j] = src[2 * j + 1].to_bits();
        }
    }
    xp
}

/// Element-type specific parts of the tiled path: f32 tiles, or bf16 tiles for the AVX-512
/// BF16 micro-kernel.
trait TileOps: Sync {
    /// Element of the packed buffers.
    type Elem: Copy + Default + Send + Sync;
    /// Copies `x[row, k0..k0 + dst.len()]` into `dst`.
    fn pack_x(&self, row: usize, k0: usize, dst: &mut [Self::Elem]);
    /// Decodes (or copies) `W[row, k0..k0 + dst.len()]` into `dst`.
    fn fill_w(&self, row: usize, k0: usize, dst: &mut [Self::Elem]);
    /// Adds the tile's products into its output.
    ///
    /// # Safety
    ///
    /// As for the micro-kernels' `tile`: this thread may write columns `0..tile.mr` of rows
    /// `0..tile.n` at `tile.y`.
    unsafe fn product(&self, tile: &Tile<'_, Self::Elem>);
}

/// f32 tiles: NVFP4 decode or f32 copy, f32 or bf16 activations, any backend.
struct F32Tiles<'a> {
    backend: Backend,
    w: &'a Weights<'a>,
    x: &'a Acts<'a>,
    k: usize,
    table: [f32; 256],
}

impl TileOps for F32Tiles<'_> {
    type Elem = f32;

    fn pack_x(&self, row: usize, k0: usize, dst: &mut [f32]) {
        self.x.copy_row(row, self.k, k0, dst);
    }

    fn fill_w(&self, row: usize, k0: usize, dst: &mut [f32]) {
        match self.w {
            Weights::Nvfp4(t) => match self.backend {
                Backend::Avx2Fma => avx2::decode_row(t, &self.table, row, k0, dst),
                Backend::Avx512 => avx512::decode_row(t, &self.table, row, k0, dst),
                Backend::Portable => portable::decode_row(t, &self.table, row, k0, dst),
            },
            Weights::F32 { data, k } => {
                let start = row * k + k0;
                dst.copy_from_slice(&data[start..start + dst.len()]);
            }
        }
    }

    unsafe fn product(&self, tile: &Tile<'_, f32>) {
        // SAFETY: forwarded contract.
        unsafe {
            match self.backend {
                Backend::Avx2Fma => avx2::tile(tile),
                Backend::Avx512 => avx512::tile(tile),
                Backend::Portable => portable::tile(tile),
            }
        }
    }
}

/// bf16 tiles (AVX-512 BF16): weights decoded to bf16 times their block scale (exact), bf16
/// activations as raw bits, the global scale applied to the partial sums.
struct Bf16Tiles<'a> {
    w: &'a Nvfp4Tensor,
    x: &'a [bf16],
}

impl TileOps for Bf16Tiles<'_> {
    type Elem = u16;

    fn pack_x(&self, row: usize, k0: usize, dst: &mut [u16]) {
        let src = &self.x[row * self.w.cols() + k0..][..dst.len()];
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_bits();
        }
    }

    fn fill_w(&self, row: usize, k0: usize, dst: &mut [u16]) {
        avx512::decode_row_bf16(self.w, row, k0, dst);
    }

    unsafe fn product(&self, tile: &Tile<'_, u16>) {
        // SAFETY: forwarded contract.
        unsafe { avx512::tile_bf16(tile, self.w.global_decode_scale()) }
    }
}

/// The tiled path (see the module docs).
///
/// When the activations fit in L2 (small `n`) they are packed once, shared by all threads,
/// and chunks of weight rows are handed out dynamically; each chunk runs over weight-row
/// blocks outermost, so each weight row is read as one sequential stream. Otherwise every
/// thread owns a fixed range of weight rows and runs over `KC`-wide slices of the reduction
/// axis outermost, packing only that slice of the activations, which all its weight tiles
/// then reuse from cache.
fn tiled<O: TileOps>(ops: &O, threads: usize, n: usize, m: usize, k: usize, out: OutPtr) {
    // Row strides: whole 64-byte lines plus one line of padding against L1 aliasing.
    let pad = 64 / std::mem::size_of::<O::Elem>();
    let ws = KC + pad;
    let product = |x: &[O::Elem], xs: usize, w: &[O::Elem], kw: usize, mb0: usize, mr: usize| {
        let tile = Tile {
            x,
            xs,
            w,
            ws,
            kw,
            n,
            mr,
            // SAFETY: mb0 < m <= the output length, so the offset stays inside the output.
            y: unsafe { out.get().add(mb0) },
            ys: m,
        };
        // SAFETY: the caller hands this thread columns mb0..mb0 + mr of all `n` output rows.
        unsafe { ops.product(&tile) };
    };
    let fill = |wbuf: &mut [O::Elem], mb0: usize, mr: usize, k0: usize, kw: usize| {
        for i in 0..mr {
            ops.fill_w(mb0 + i, k0, &mut wbuf[i * ws..i * ws + kw]);
        }
    };

    if n * k <= SMALL_X {
        let xs = k + pad;
        let mut xstore = AlignedBuf::<O::Elem>::new(n * xs);
        let xbuf = xstore.as_mut_slice();
        for r in 0..n {
            ops.pack_x(r, 0, &mut xbuf[r * xs..r * xs + k]);
        }
        let xbuf = &*xbuf;
        for_each_chunk(
            threads,
            m,
            m.div_ceil(threads * 8),
            &|| AlignedBuf::<O::Elem>::new(MB_SMALL * ws),
            &|rows, wstore| {
                let wbuf = wstore.as_mut_slice();
                for mb0 in rows.clone().step_by(MB_SMALL) {
                    let mr = MB_SMALL.min(rows.end - mb0);
                    for k0 in (0..k).step_by(KC) {
                        let kw = KC.min(k - k0);
                        fill(wbuf, mb0, mr, k0, kw);
                        product(&xbuf[k0..], xs, &wbuf[..mr * ws], kw, mb0, mr);
                    }
                }
            },
        );
    } else {
        let chunk = m.div_ceil(threads).div_ceil(12) * 12;
        parallel(threads, &|t0: usize| {
            let rows = (t0 * chunk).min(m)..((t0 + 1) * chunk).min(m);
            if rows.is_empty() {
                return;
            }
            let mut wstore = AlignedBuf::<O::Elem>::new(MB * ws);
            let wbuf = wstore.as_mut_slice();
            let mut xstore = AlignedBuf::<O::Elem>::new(n * ws);
            let xbuf = xstore.as_mut_slice();
            for k0 in (0..k).step_by(KC) {
                let kw = KC.min(k - k0);
                for r in 0..n {
                    ops.pack_x(r, k0, &mut xbuf[r * ws..r * ws + kw]);
                }
                for mb0 in rows.clone().step_by(MB) {
                    let mr = MB.min(rows.end - mb0);
                    fill(wbuf, mb0, mr, k0, kw);
                    product(xbuf, ws, &wbuf[..mr * ws], kw, mb0, mr);
                }
            }
        });
    }
}

/// A zeroed buffer whose usable part starts on a 64-byte boundary, so that with row strides
/// that are multiples of 64 bytes no vector load splits a cache line.
struct AlignedBuf<T> {
    data: Vec<T>,
    offset: usize,
    len: usize,
}

impl<T: Copy + Default> AlignedBuf<T> {
    fn new(len: usize) -> Self {
        let slack = 64 / std::mem::size_of::<T>();
        let data = vec![T::default(); len + slack];
        let offset = data.as_ptr().align_offset(64).min(slack);
        AlignedBuf { data, offset, len }
    }

    fn as_mut_slice(&mut self) -> &mut [T] {
        &mut self.data[self.offset..self.offset + self.len]
    }
}

/// One decoded weight tile against all packed activation rows; results add into `y`.
/// Elements are f32, or bf16 bits (`u16`) for the bf16 micro-kernel.
struct Tile<'a, T> {
    /// Packed activations: `n` rows of stride `xs` (first `kw` of each valid).
    x: &'a [T],
    xs: usize,
    /// Decoded weights: `mr` rows of stride `ws` (first `kw` of each valid).
    w: &'a [T],
    ws: usize,
    kw: usize,
    n: usize,
    mr: usize,
    /// Output element (row 0, first column of the tile); row stride `ys`.
    y: *mut f32,
    ys: usize,
}

/// Helpers shared by the panel kernels' tests.
#[cfg(test)]
mod test_support {
    /// The bit patterns of `v`, for exact comparisons.
    pub(crate) fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|f| f.to_bits()).collect()
    }

    /// Runs `call(task, y)` from 24 tasks of the rayon pool at once, each into its own `y` of
    /// `len` NaNs, and returns each task's output bits: calls nested in pool tasks must finish
    /// (their own tasks queue behind busy workers) with the same bits as alone.
    pub(crate) fn bits_from_pool_tasks(
        len: usize,
        call: impl Fn(usize, &mut [f32]) + Sync,
    ) -> Vec<Vec<u32>> {
        let results = std::sync::Mutex::new(vec![Vec::new(); 24]);
        rayon::scope(|s| {
            for task in 0..24 {
                let (call, results) = (&call, &results);
                s.spawn(move |_| {
                    let mut y = vec![f32::NAN; len];
                    call(task, &mut y);
                    results.lock().unwrap()[task] = bits(&y);
                });
            }
        });
        results.into_inner().unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{BlockLayout, QuantizeOptions};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn reference(w: &[f32], m: usize, k: usize, x: &[f32], n: usize) -> Vec<f32> {
        let mut y = vec![0.0f32; n * m];
        for i in 0..n {
            for j in 0..m {
                let mut s = 0.0f64;
                for t in 0..k {
                    s += x[i * k + t] as f64 * w[j * k + t] as f64;
                }
                y[i * m + j] = s as f32;
            }
        }
        y
    }

    fn backends() -> Vec<Backend> {
        [Backend::Portable, Backend::Avx2Fma, Backend::Avx512]
            .into_iter()
            .filter(|b| b.is_supported())
            .collect()
    }

    fn assert_close(got: &[f32], want: &[f32], x: &[f32], w: &[f32], k: usize, what: &str) {
        // Error bound of an f32 dot product: ~k * eps * sum |x||w|; use the row scale.
        let xs = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let ws = w.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let tol = 1e-6 * (k as f32) * xs * ws + 1e-6;
        for (i, (g, e)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - e).abs() <= tol,
                "{what}: y[{i}] = {g}, want {e} (tol {tol})"
            );
        }
    }

    fn random(rng: &mut StdRng, len: usize, scale: f32) -> Vec<f32> {
        (0..len)
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
            .collect()
    }

    #[test]
    fn nvfp4_matches_dequantized_product() {
        let mut rng = StdRng::seed_from_u64(42);
        let shapes = [
            (1, 1, 16),
            (1, 7, 48),
            (1, 33, 160),
            (2, 5, 32),
            (3, 10, 1040),
            (4, 3, 16),
            (5, 97, 96),
            (6, 14, 80),
            (7, 25, 2064),
            (8, 100, 528),
            (13, 31, 1056),
            (17, 200, 64),
            (1, 301, 2064),
            // k a multiple of 256: the AVX-512 BF16 GEMV and small-batch paths.
            (1, 45, 1024),
            (1, 3, 256),
            (2, 29, 768),
            (5, 14, 256),
            (8, 27, 1280),
            // Large enough (n * k > SMALL_X) for the reduction-outer loop order.
            (203, 37, 1040),
            (203, 37, 1024),
            (20, 11, 544),
        ];
        assert!(shapes.iter().any(|&(n, _, k)| n * k > SMALL_X));
        assert!(shapes.iter().any(|&(n, _, k)| n > 1 && n * k <= SMALL_X));
        for (si, &(n, m, k)) in shapes.iter().enumerate() {
            let wf = random(&mut rng, m * k, 2.0);
            let layout = if si % 2 == 0 {
                BlockLayout::Row1x16
            } else {
                BlockLayout::Tile16x16
            };
            let options = QuantizeOptions {
                layout,
                ..Default::default()
            };
            let w = Nvfp4Tensor::quantize("w", &wf, m, k, &options).unwrap();
            let wd = w.dequantize();
            let x = random(&mut rng, n * k, 1.5);
            let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            let xbf: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
            let want = reference(&wd, m, k, &x, n);
            let want_bf = reference(&wd, m, k, &xbf, n);
            for backend in backends() {
                for threads in [1, 2, 3] {
                    let g = CpuGemm::new(threads).with_backend(backend).unwrap();
                    let what = format!("n={n} m={m} k={k} {backend:?} threads={threads}");
                    let mut y = vec![f32::NAN; n * m];
                    g.nvfp4(&w, &x, n, &mut y).unwrap();
                    assert_close(&y, &want, &x, &wd, k, &what);
                    let mut y = vec![f32::NAN; n * m];
                    g.nvfp4_bf16(&w, &xb, n, &mut y).unwrap();
                    assert_close(&y, &want_bf, &xbf, &wd, k, &format!("bf16 {what}"));
                    let mut y = vec![f32::NAN; n * m];
                    g.f32(&wd, m, k, &x, n, &mut y).unwrap();
                    assert_close(&y, &want, &x, &wd, k, &format!("f32 {what}"));
                }
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_thread_count() {
        // Each output element is summed in the same order whatever the partition, so runs are
        // reproducible bit for bit across thread counts.
        let mut rng = StdRng::seed_from_u64(9);
        for &(n, m, k) in &[(1, 50, 512), (3, 50, 512), (11, 50, 1040), (300, 40, 1024)] {
            let wf = random(&mut rng, m * k, 1.0);
            let w = Nvfp4Tensor::quantize("w", &wf, m, k, &QuantizeOptions::default()).unwrap();
            let x = random(&mut rng, n * k, 1.0);
            for backend in backends() {
                let run = |threads| {
                    let mut y = vec![0.0f32; n * m];
                    CpuGemm::new(threads)
                        .with_backend(backend)
                        .unwrap()
                        .nvfp4(&w, &x, n, &mut y)
                        .unwrap();
                    y.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                };
                assert_eq!(run(1), run(3), "n={n} {backend:?}");
            }
        }
    }

    #[test]
    fn gemv_handles_extreme_scales() {
        // Zero blocks, subnormal block scales and a tiny global scale.
        let (m, k) = (9, 64);
        let mut wf = vec![0.0f32; m * k];
        for (i, v) in wf.iter_mut().enumerate() {
            *v = match i % 64 {
                0..16 => 0.0,
                16..32 => ((i % 5) as f32 - 2.0) * 1e-6,
                _ => ((i % 11) as f32 - 5.0) * 1e-3,
            };
        }
        let w = Nvfp4Tensor::quantize("w", &wf, m, k, &QuantizeOptions::default()).unwrap();
        let wd = w.dequantize();
        let x: Vec<f32> = (0..k).map(|i| (i as f32 * 0.37).sin()).collect();
        let want = reference(&wd, m, k, &x, 1);
        for backend in backends() {
            let mut y = vec![0.0; m];
            CpuGemm::new(2)
                .with_backend(backend)
                .unwrap()
                .nvfp4(&w, &x, 1, &mut y)
                .unwrap();
            for (g, e) in y.iter().zip(&want) {
                assert!((g - e).abs() <= 1e-5 * e.abs() + 1e-12, "{g} vs {e}");
            }
        }
    }

    #[test]
    fn rejects_bad_operands() {
        let w = Nvfp4Tensor::quantize("w", &[1.0; 64], 2, 32, &QuantizeOptions::default()).unwrap();
        let g = CpuGemm::new(1);
        let mut y = vec![0.0; 2];
        let err = g.nvfp4(&w, &[0.0; 31], 1, &mut y).unwrap_err();
        assert!(err.is_shape() && err.to_string().contains("`x`"), "{err}");
        let err = g.nvfp4(&w, &[0.0; 32], 1, &mut [0.0; 3]).unwrap_err();
        assert!(err.is_shape() && err.to_string().contains("`y`"), "{err}");
        let err = g.f32(&[0.0; 10], 2, 32, &[0.0; 32], 1, &mut y).unwrap_err();
        assert!(err.is_shape() && err.to_string().contains("`w`"), "{err}");
        let err = g.nvfp4(&w, &[], usize::MAX, &mut y).unwrap_err();
        assert!(err.is_shape(), "{err}");
        // Empty batch is fine.
        g.nvfp4(&w, &[], 0, &mut []).unwrap();
        // Zero threads means one.
        assert_eq!(CpuGemm::new(0).threads(), 1);
        assert!(Backend::detect().is_supported());
    }
}
