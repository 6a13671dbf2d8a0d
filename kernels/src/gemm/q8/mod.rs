//! The int8-activation path: NVFP4 weights against activations quantized to int8 per 16-element
//! block ([`Q8Activations`]), with integer dot products per block.
//!
//! Twice an E2M1 value is an integer in -12..=12, so a `vpshufb` lookup turns a nibble into an
//! exact int8 weight, and a block's 16 products sum exactly in integers (at most
//! `16 * 12 * 127 = 24384` in magnitude). Each block then costs one f32 multiply-add with the
//! product of its two scales: `y = global / 2 * sum_b dot_b * (w_scale_b * x_scale_b)`.
//!
//! The x86 kernels look nibbles up as `2 * e2m1 + 12` ([`LUT`]), which is never negative: the
//! unsigned operand of `vpmaddubsw`/`vpdpbusd` can then be the weights with no per-element
//! sign fix-up, and the offset comes back out per block as `12 * sum_j q_j`, computed once with
//! the activations ([`Q8Activations`] keeps it). The integer results are the same as the
//! reference's: only the order of the f32 accumulation of the blocks differs.

mod avx2;
mod avx512;
pub(super) mod panels;

use std::ops::Range;

pub use panels::Nvfp4Q8Panels;

use super::{Backend, OutPtr, split_rows};
use crate::error::KernelError;
use crate::quant::{BLOCK, Nvfp4Tensor};
use crate::scalar::{E4M3_TABLE, e2m1_decode};

/// Blocks whose evens, then odds, are stored together (see [`Q8Activations`]).
const GROUP: usize = 8;
/// Rows are padded to a multiple of this many elements (16 blocks, the AVX-512 step), so that
/// kernels read whole steps without bounds checks; the padding is zero.
const ROW_ALIGN: usize = 256;
/// Added to `2 * e2m1(code)` by the x86 lookup tables so that weights are unsigned.
const OFFSET: i32 = 12;
/// Activation rows that one kernel call multiplies with each decoded weight row; larger
/// batches run in chunks of this many rows.
const MAX_ROWS: usize = 8;

/// `2 * e2m1(code) + OFFSET` for the 16 codes: the x86 kernels' nibble lookup.
const LUT: [u8; 16] = {
    let twice = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];
    let mut lut = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        lut[i] = (twice[i] + OFFSET) as u8;
        i += 1;
    }
    lut
};

/// Activation rows quantized to int8 for
/// [`CpuGemm::nvfp4_q8_quantized`](crate::CpuGemm::nvfp4_q8_quantized): one f32 scale per 16
/// consecutive elements of a row (NVFP4's block), `scale = max|x| / 127`, and
/// `q = round_ties_even(x / scale)` (in -127..=127), so every element is within half a scale,
/// `|x - q * scale| <= scale * (1/2 + 127 * 2^-24)` (the division rounds too), and the block's
/// largest magnitude maps to +-127. A block of zeros gets scale 0, as does a block whose
/// largest magnitude is below about 1e-43, whose scale underflows; below about 1.5e-36 the
/// scale is subnormal and the rounding coarser.
///
/// This is llama.cpp's `Q8_0` with NVFP4's 16-element blocks instead of 32: quantizing once
/// per call lets every weight block be multiplied with integer dot products (`vpmaddubsw`,
/// `vpdpbusd`), several times as many elements per instruction as decoding the weights to f32.
/// One quantization can serve every projection of the same activations.
///
/// Storage is in the order the kernels decode nibbles: each group of 8 blocks (128 elements)
/// holds the even elements of its blocks (8 per block, block by block), then the odd ones;
/// rows are padded with zeros to a multiple of 256 elements.
///
/// ```
/// use chorus_kernels::Q8Activations;
/// let x: Vec<f32> = (0..32).map(|i| i as f32 - 8.0).collect();
/// let q = Q8Activations::quantize(&x, 1, 32)?;
/// // Block 0 holds -8..=7, block 1 holds 8..=23: each block's largest magnitude maps to 127.
/// assert_eq!(q.value(0, 0), -127);
/// assert_eq!(q.value(0, 31), 127);
/// assert_eq!(q.scale(0, 1), 23.0 / 127.0);
/// let back = q.dequantize();
/// assert!(x.iter().zip(&back).all(|(a, b)| (a - b).abs() <= 23.0 / 127.0 / 2.0));
/// # Ok::<(), chorus_kernels::KernelError>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Q8Activations {
    rows: usize,
    cols: usize,
    /// `rows` rows of `stride` values, in kernel order.
    qs: Vec<i8>,
    /// `rows` rows of `stride / 16` block scales (zero past `cols / 16`).
    scales: Vec<f32>,
    /// `OFFSET * sum_j q_j` of every block, laid out as `scales`.
    offsets: Vec<i32>,
    stride: usize,
}

impl Q8Activations {
    /// Quantizes the row-major `[n, k]` activations `x`; `k` must be a multiple of 16 and every
    /// element finite.
    pub fn quantize(x: &[f32], n: usize, k: usize) -> Result<Self, KernelError> {
        let mut q = Q8Activations::default();
        q.requantize(x, n, k)?;
        Ok(q)
    }

    /// As [`Q8Activations::quantize`], reusing this value's buffers (a decode loop quantizes
    /// one row per step). On error `self` is left empty.
    pub fn requantize(&mut self, x: &[f32], n: usize, k: usize) -> Result<(), KernelError> {
        self.rows = 0;
        self.cols = 0;
        self.stride = 0;
        self.qs.clear();
        self.scales.clear();
        self.offsets.clear();
        if !k.is_multiple_of(BLOCK) {
            return Err(KernelError::shape(
                "x",
                format!("activations [{n}, {k}]: the last dimension must be a multiple of {BLOCK}"),
            ));
        }
        let need = super::elements("x", n, k)?;
        if x.len() != need {
            return Err(KernelError::shape(
                "x",
                format!(
                    "activations [{n}, {k}] need {need} elements, got {}",
                    x.len()
                ),
            ));
        }
        check_finite(x, k)?;
        let stride = k.div_ceil(ROW_ALIGN) * ROW_ALIGN;
        let sstride = stride / BLOCK;
        self.qs.resize(n * stride, 0);
        self.scales.resize(n * sstride, 0.0);
        self.offsets.resize(n * sstride, 0);
        let simd = crate::gemm::avx2::available();
        for (r, row) in x.chunks_exact(k.max(1)).enumerate().take(n) {
            let qs = &mut self.qs[r * stride..(r + 1) * stride];
            let scales = &mut self.scales[r * sstride..(r + 1) * sstride];
            let offsets = &mut self.offsets[r * sstride..(r + 1) * sstride];
            if simd {
                avx2::quantize_row(row, qs, scales, offsets);
            } else {
                quantize_row(row, qs, scales, offsets);
            }
        }
        self.rows = n;
        self.cols = k;
        self.stride = stride;
        Ok(())
    }

    /// Number of rows (`n`).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns (`k`, a multiple of 16).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The int8 value of element `(row, col)`.
    pub fn value(&self, row: usize, col: usize) -> i8 {
        assert!(
            row < self.rows && col < self.cols,
            "({row}, {col}) out of range"
        );
        let j = col % BLOCK;
        let odd = if j % 2 == 1 { 64 } else { 0 };
        self.qs[row * self.stride + group_base(col / BLOCK) + odd + j / 2]
    }

    /// The scale of block `block` (elements `16 * block..16 * block + 16`) of row `row`.
    pub fn scale(&self, row: usize, block: usize) -> f32 {
        assert!(
            row < self.rows && block < self.cols / BLOCK,
            "({row}, {block}) out of range"
        );
        self.scales[row * self.stride / BLOCK + block]
    }

    /// The represented values `value * scale`, row-major `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            for c in 0..self.cols {
                out.push(self.value(r, c) as f32 * self.scale(r, c / BLOCK));
            }
        }
        out
    }

    /// Rows `r0..r1` as the kernels read them.
    fn view(&self, r0: usize, r1: usize) -> Q8Rows<'_> {
        assert!(r0 <= r1 && r1 <= self.rows);
        let ss = self.stride / BLOCK;
        Q8Rows {
            qs: &self.qs[r0 * self.stride..r1 * self.stride],
            scales: &self.scales[r0 * ss..r1 * ss],
            offsets: &self.offsets[r0 * ss..r1 * ss],
            stride: self.stride,
            rows: r1 - r0,
            cols: self.cols,
        }
    }
}

/// Fails with [`KernelError::NonFinite`] (tensor `x`, row-major with `k` columns) at the
/// first non-finite element of `x`.
pub(super) fn check_finite(x: &[f32], k: usize) -> Result<(), KernelError> {
    // A scan without early exit vectorizes; the position is only looked for on failure.
    if x.iter().fold(false, |bad, v| bad | !v.is_finite()) {
        let i = x.iter().position(|v| !v.is_finite()).unwrap();
        return Err(KernelError::NonFinite {
            tensor: "x".to_string(),
            row: i / k,
            col: i % k,
            value: x[i],
        });
    }
    Ok(())
}

/// Offset of block `b`'s first even element in a row: group `b / 8` holds 64 evens, then 64
/// odds.
fn group_base(b: usize) -> usize {
    b / GROUP * GROUP * BLOCK + b % GROUP * (BLOCK / 2)
}

/// Quantizes one row (finite, a multiple of 16 long) into its part of the storage: the
/// reference for the SIMD quantizer, which gives the same bits.
fn quantize_row(x: &[f32], qs: &mut [i8], scales: &mut [f32], offsets: &mut [i32]) {
    for (b, xb) in x.chunks_exact(BLOCK).enumerate() {
        let (scale, q) = quantize_block(xb.try_into().unwrap());
        let base = group_base(b);
        for j in 0..BLOCK / 2 {
            qs[base + j] = q[2 * j];
            qs[base + 64 + j] = q[2 * j + 1];
        }
        scales[b] = scale;
        offsets[b] = OFFSET * q.iter().map(|&v| v as i32).sum::<i32>();
    }
}

/// Scale and int8 values of one block (its elements finite).
fn quantize_block(x: &[f32; BLOCK]) -> (f32, [i8; BLOCK]) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let scale = amax / 127.0;
    let mut q = [0i8; BLOCK];
    if scale > 0.0 {
        // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer, ties to even, in
        // the default rounding mode (|v| <= 127 here). Unlike `round_ties_even`, it needs no
        // SSE4.1, so the loop vectorizes on the x86-64 baseline.
        const MAGIC: f32 = 12_582_912.0;
        for (q, &v) in q.iter_mut().zip(x) {
            // The clamp only acts when the scale is subnormal and inexact.
            *q = (((v / scale).clamp(-127.0, 127.0) + MAGIC) - MAGIC) as i8;
        }
    }
    (scale, q)
}

/// A range of rows of a [`Q8Activations`], as the kernels read them: `rows` rows of `stride`
/// values and `stride / 16` scales and offsets each.
#[derive(Clone, Copy)]
struct Q8Rows<'a> {
    qs: &'a [i8],
    scales: &'a [f32],
    offsets: &'a [i32],
    stride: usize,
    rows: usize,
    cols: usize,
}

impl Q8Rows<'_> {
    /// Pointers to row `i`'s values, scales and offsets (`i < rows`).
    fn row(&self, i: usize) -> (*const i8, *const f32, *const i32) {
        assert!(i < self.rows);
        let ss = self.stride / BLOCK;
        (
            self.qs[i * self.stride..].as_ptr(),
            self.scales[i * ss..].as_ptr(),
            self.offsets[i * ss..].as_ptr(),
        )
    }
}

/// Which int8 kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Portable,
    Avx2,
    Avx512(avx512::Variant),
}

impl Kernel {
    /// The kernel for `backend`: the AVX-512 backend needs only AVX-512F, the int8 kernels BW
    /// as well, so it falls back to AVX2 without BW.
    fn for_backend(backend: Backend) -> Kernel {
        match backend {
            Backend::Portable => Kernel::Portable,
            Backend::Avx2Fma => Kernel::Avx2,
            Backend::Avx512 => avx512::Variant::detect().map_or(Kernel::Avx2, Kernel::Avx512),
        }
    }

    /// `Y[i, r] = W[r, :] . x_i` for the weight rows `r` in `rows` and the `x.rows <=
    /// MAX_ROWS` activation rows.
    ///
    /// # Safety
    ///
    /// `y` must point to a row-major `[x.rows, ys]` output of which the caller may write
    /// columns `rows` of every row, with no other thread touching them.
    unsafe fn rows(
        self,
        w: &Nvfp4Tensor,
        x: Q8Rows<'_>,
        rows: Range<usize>,
        y: *mut f32,
        ys: usize,
    ) {
        assert!(x.cols == w.cols() && (1..=MAX_ROWS).contains(&x.rows));
        assert!(rows.end <= w.rows() && rows.end <= ys);
        // SAFETY: forwarded contract; operand shapes asserted.
        unsafe {
            match self {
                Kernel::Portable => portable(w, x, rows, y, ys),
                Kernel::Avx2 => avx2::rows(w, x, rows, y, ys),
                Kernel::Avx512(variant) => avx512::rows(w, x, rows, y, ys, variant),
            }
        }
    }
}

/// `y = x . W^T` (`y` row-major `[x.rows(), w.rows()]`), the operands already checked.
pub(super) fn run(
    threads: usize,
    backend: Backend,
    w: &Nvfp4Tensor,
    x: &Q8Activations,
    y: &mut [f32],
) {
    run_kernel(Kernel::for_backend(backend), threads, w, x, y);
}

fn run_kernel(kernel: Kernel, threads: usize, w: &Nvfp4Tensor, x: &Q8Activations, y: &mut [f32]) {
    let (n, m) = (x.rows(), w.rows());
    assert!(x.cols() == w.cols() && y.len() == n * m);
    y.fill(0.0);
    if n == 0 || m == 0 || w.cols() == 0 {
        return;
    }
    for r0 in (0..n).step_by(MAX_ROWS) {
        let view = x.view(r0, (r0 + MAX_ROWS).min(n));
        let out = OutPtr(y[r0 * m..].as_mut_ptr());
        split_rows(threads.min(m), m, &|rows| {
            // SAFETY: row ranges are disjoint between threads; the kernel writes only the
            // columns `rows` of the `view.rows` output rows that start at `out` (stride `m`).
            unsafe { kernel.rows(w, view, rows, out.get(), m) };
        });
    }
}

/// The reference: each block's dot product exactly in integers, then
/// `y = (sum_b dot_b * (w_scale_b * x_scale_b)) * (global / 2)` in f32, block by block.
///
/// # Safety
///
/// As for [`Kernel::rows`].
unsafe fn portable(w: &Nvfp4Tensor, x: Q8Rows<'_>, rows: Range<usize>, y: *mut f32, ys: usize) {
    let k = w.cols();
    let blocks = k / BLOCK;
    let half_global = w.global_decode_scale() * 0.5;
    for r in rows {
        let packed = &w.packed()[r * k / 2..(r + 1) * k / 2];
        let wscales = &w.scales()[r * blocks..(r + 1) * blocks];
        for i in 0..x.rows {
            let ss = x.stride / BLOCK;
            let qs = &x.qs[i * x.stride..(i + 1) * x.stride];
            let xscales = &x.scales[i * ss..(i + 1) * ss];
            let mut acc = 0.0f32;
            for (b, (bytes, &ws)) in packed.chunks_exact(BLOCK / 2).zip(wscales).enumerate() {
                let base = group_base(b);
                let mut dot = 0i32;
                for (j, &byte) in bytes.iter().enumerate() {
                    let lo = (2.0 * e2m1_decode(byte & 0x0f)) as i32;
                    let hi = (2.0 * e2m1_decode(byte >> 4)) as i32;
                    dot += lo * qs[base + j] as i32 + hi * qs[base + 64 + j] as i32;
                }
                acc += dot as f32 * (E4M3_TABLE[ws as usize] * xscales[b]);
            }
            // SAFETY: per the contract, column r of row i at `y` is ours.
            unsafe { *y.add(i * ys + r) = acc * half_global };
        }
    }
}

#[cfg(test)]
mod tests;
