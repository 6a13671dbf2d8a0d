//! [`LinearOp`]: the one abstraction every projection of the inference engine goes through, so
//! that a quantized kernel (NVFP4) replaces the dense f32 one in a single place.

use chorus_kernels::{CpuGemm, Nvfp4Tensor};

/// A bias-free projection `y = x Wᵀ`, `W: [out, in]` row-major as in HF checkpoints.
#[derive(Clone, Debug)]
pub enum LinearOp {
    /// Dense f32 weights.
    Dense {
        /// `[out_dim, in_dim]`, row-major.
        weight: Vec<f32>,
        /// Output width.
        out_dim: usize,
        /// Input width.
        in_dim: usize,
    },
    /// NVFP4 weights (E2M1 codes, E4M3 scales per 16 inputs, f32 global scale), multiplied by
    /// the CPU kernels of `chorus-kernels` with f32 activations.
    Nvfp4 {
        /// The quantized `[out, in]` weights.
        weight: Nvfp4Tensor,
        /// The kernel chosen for this CPU at build time.
        gemm: CpuGemm,
    },
}

/// Below this many weights one thread is faster than several.
const NVFP4_PARALLEL_MIN: usize = 1 << 20;

impl LinearOp {
    /// A dense projection from a row-major `[out_dim, in_dim]` weight.
    pub fn dense(weight: Vec<f32>, out_dim: usize, in_dim: usize) -> Self {
        assert_eq!(
            weight.len(),
            out_dim * in_dim,
            "weight length must be out_dim * in_dim"
        );
        LinearOp::Dense {
            weight,
            out_dim,
            in_dim,
        }
    }

    /// An NVFP4 projection; the kernel uses every core only for large matrices.
    pub fn nvfp4(weight: Nvfp4Tensor) -> Self {
        let threads = if weight.rows() * weight.cols() >= NVFP4_PARALLEL_MIN {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            1
        };
        LinearOp::Nvfp4 {
            weight,
            gemm: CpuGemm::new(threads),
        }
    }

    /// Input width.
    pub fn in_dim(&self) -> usize {
        match self {
            LinearOp::Dense { in_dim, .. } => *in_dim,
            LinearOp::Nvfp4 { weight, .. } => weight.cols(),
        }
    }

    /// Output width.
    pub fn out_dim(&self) -> usize {
        match self {
            LinearOp::Dense { out_dim, .. } => *out_dim,
            LinearOp::Nvfp4 { weight, .. } => weight.rows(),
        }
    }

    /// Whether the weights are NVFP4.
    pub fn is_nvfp4(&self) -> bool {
        matches!(self, LinearOp::Nvfp4 { .. })
    }

    /// Bytes the weights occupy.
    pub fn weight_bytes(&self) -> usize {
        match self {
            LinearOp::Dense { weight, .. } => weight.len() * 4,
            LinearOp::Nvfp4 { weight, .. } => weight.packed().len() + weight.scales().len() + 4,
        }
    }

    /// `x: [rows, in]` → `y: [rows, out]` (overwritten).
    pub fn forward(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        match self {
            LinearOp::Dense {
                weight,
                out_dim,
                in_dim,
            } => dense_forward(weight, *out_dim, *in_dim, x, rows, y),
            LinearOp::Nvfp4 { weight, gemm } => gemm
                .nvfp4(weight, x, rows, y)
                .expect("operand shapes are fixed when the engine is built"),
        }
    }
}

/// Up to this many activation rows a projection runs as matrix-vector products that read each
/// weight row once for all rows; above, as a GEMM.
const GEMV_MAX_ROWS: usize = 4;

/// Below this many weights a matrix-vector product stays on one thread.
const PARALLEL_GEMV_MIN: usize = 1 << 18;

/// Below this many multiply-adds a single thread beats spawning work.
const PARALLEL_MIN_WORK: usize = 1 << 20;

fn dense_forward(w: &[f32], out_dim: usize, in_dim: usize, x: &[f32], rows: usize, y: &mut [f32]) {
    debug_assert_eq!(x.len(), rows * in_dim);
    debug_assert_eq!(y.len(), rows * out_dim);
    if rows == 0 || out_dim == 0 {
        return;
    }
    if rows <= GEMV_MAX_ROWS {
        // Matrix-vector products, bound by reading the weights: each weight row is read from
        // memory once and multiplied with every activation row while it sits in L1 (a
        // speculative verification pass of k+1 tokens then costs about one pass, not k+1).
        // Large matrices are split by output rows over the pool, so every core streams its
        // share. Each output is the same dot product whatever the row count or split.
        if out_dim * in_dim >= PARALLEL_GEMV_MIN && rayon::current_num_threads() > 1 {
            use rayon::prelude::*;
            let chunk = out_dim.div_ceil(rayon::current_num_threads() * 4).max(8);
            let starts: Vec<usize> = (0..out_dim).step_by(chunk).collect();
            let out = SharedOut(y.as_mut_ptr());
            starts.par_iter().for_each(|&o0| {
                let o1 = (o0 + chunk).min(out_dim);
                // SAFETY: tasks write disjoint output columns o0..o1 of each of the `rows`
                // rows of `y` (row stride `out_dim`), all inside `y`.
                unsafe { gemv_rows(w, in_dim, out_dim, x, rows, o0..o1, out.get()) };
            });
        } else {
            // SAFETY: as above, one task writing every column.
            unsafe { gemv_rows(w, in_dim, out_dim, x, rows, 0..out_dim, y.as_mut_ptr()) };
        }
        return;
    }
    let work = rows * out_dim * in_dim;
    let parallelism = if work >= PARALLEL_MIN_WORK {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the slices cover exactly rows×in, out×in and rows×out elements with the strides
    // given (row-major), as asserted above; gemm writes only inside `y`.
    unsafe {
        gemm::gemm(
            rows,
            out_dim,
            in_dim,
            y.as_mut_ptr(),
            1,
            out_dim as isize,
            false,
            x.as_ptr(),
            1,
            in_dim as isize,
            w.as_ptr(),
            in_dim as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// The output pointer of a split matrix-vector product, shared by tasks that write disjoint
/// elements.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: tasks only write disjoint elements through it (see `gemv_rows`' callers).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The pointer (a method, so that closures capture the `Sync` wrapper, not its field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `y[r, o] = W[o, :] . x[r, :]` for the outputs `o` in `outs` and every row `r < rows`.
///
/// # Safety
///
/// `y` points to `rows * out_dim` floats; no other thread writes columns `outs` meanwhile.
unsafe fn gemv_rows(
    w: &[f32],
    in_dim: usize,
    out_dim: usize,
    x: &[f32],
    rows: usize,
    outs: std::ops::Range<usize>,
    y: *mut f32,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function is compiled for; the caller
            // keeps the output contract.
            unsafe { gemv_rows_avx2(w, in_dim, out_dim, x, rows, outs, y) };
            return;
        }
    }
    // SAFETY: forwarded contract.
    unsafe { gemv_rows_portable(w, in_dim, out_dim, x, rows, outs, y) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gemv_rows_avx2(
    w: &[f32],
    in_dim: usize,
    out_dim: usize,
    x: &[f32],
    rows: usize,
    outs: std::ops::Range<usize>,
    y: *mut f32,
) {
    // SAFETY: forwarded contract.
    unsafe { gemv_rows_portable(w, in_dim, out_dim, x, rows, outs, y) }
}

/// Written with eight independent accumulators so the compiler vectorises it (AVX2 when
/// inlined into [`gemv_rows_avx2`]).
#[inline(always)]
unsafe fn gemv_rows_portable(
    w: &[f32],
    in_dim: usize,
    out_dim: usize,
    x: &[f32],
    rows: usize,
    outs: std::ops::Range<usize>,
    y: *mut f32,
) {
    for o in outs {
        let wr = &w[o * in_dim..(o + 1) * in_dim];
        for (r, xr) in x.chunks_exact(in_dim).take(rows).enumerate() {
            // SAFETY: r < rows and o < out_dim, inside the caller's `rows * out_dim` floats.
            unsafe { *y.add(r * out_dim + o) = dot(wr, xr) };
        }
    }
}

/// Dot product with eight lanes of accumulation.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(w: &[f32], out: usize, inp: usize, x: &[f32], rows: usize) -> Vec<f32> {
        let mut y = vec![0f32; rows * out];
        for r in 0..rows {
            for o in 0..out {
                y[r * out + o] = (0..inp)
                    .map(|i| x[r * inp + i] as f64 * w[o * inp + i] as f64)
                    .sum::<f64>() as f32;
            }
        }
        y
    }

    #[test]
    fn dense_matches_reference_for_many_shapes() {
        let mut seed = 7u32;
        let mut next = || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for (rows, out, inp) in [
            (1, 5, 3),
            (1, 64, 196),
            (2, 17, 33),
            (3, 9, 70),
            (64, 40, 64),
            (130, 7, 129),
            // Large enough that one row's product is split over the pool.
            (1, 600, 512),
            (2, 1030, 300),
            (4, 700, 400),
            (3, 5, 17),
        ] {
            let w: Vec<f32> = (0..out * inp).map(|_| next()).collect();
            let x: Vec<f32> = (0..rows * inp).map(|_| next()).collect();
            let mut y = vec![f32::NAN; rows * out];
            LinearOp::dense(w.clone(), out, inp).forward(&x, rows, &mut y);
            let want = reference(&w, out, inp, &x, rows);
            for (a, b) in y.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "{rows}x{out}x{inp}: {a} vs {b}");
            }
        }
    }
}
