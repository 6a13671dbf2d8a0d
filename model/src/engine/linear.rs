//! [`LinearOp`]: the one abstraction every projection of the inference engine goes through, so
//! that a quantized kernel (NVFP4) replaces the dense f32 one in a single place.

use chorus_kernels::{CpuGemm, F32Panels, Nvfp4Q8Panels, Nvfp4Tensor};

use crate::simd;

/// A bias-free projection `y = x Wᵀ`, `W: [out, in]` row-major as in HF checkpoints.
#[derive(Clone, Debug)]
pub enum LinearOp {
    /// Dense f32 weights repacked into panels of 16 output rows, multiplied by the register-tiled
    /// [`CpuGemm::f32_panels`] at every row count: where the CPU has AVX-512F or AVX2 + FMA.
    DensePanels {
        /// The `[out, in]` weights, repacked (the same bytes, plus padding to 16 rows).
        weight: Box<F32Panels>,
        /// The kernel chosen for this CPU at build time.
        gemm: CpuGemm,
    },
    /// Dense f32 weights, row-major, on CPUs without AVX2.
    Dense {
        /// `[out_dim, in_dim]`, row-major.
        weight: Vec<f32>,
        /// Output width.
        out_dim: usize,
        /// Input width.
        in_dim: usize,
    },
    /// NVFP4 weights (E2M1 codes, E4M3 scales per 16 inputs, f32 global scale), multiplied by
    /// the CPU kernels of `chorus-kernels` with f32 activations, or with int8 ones where
    /// `int8_activations` is set: at every row count where `panels` exist, else up to
    /// [`INT8_MAX_ROWS`] rows.
    Nvfp4 {
        /// The quantized `[out, in]` weights.
        weight: Nvfp4Tensor,
        /// The kernel chosen for this CPU at build time.
        gemm: CpuGemm,
        /// Round each activation row to int8 per 16 inputs and multiply with integer dot
        /// products ([`CpuGemm::nvfp4_q8`]).
        int8_activations: bool,
        /// The weights repacked for the tiled int8 GEMM ([`CpuGemm::nvfp4_q8_panels`]),
        /// which takes calls of [`PANELS_MIN_ROWS`] rows and more: kept beside `weight` (10/9
        /// of its bytes) where `int8_activations` is set and the CPU runs the
        /// panel kernel natively (AVX2 with FMA and F16C, or AVX-512 BW).
        panels: Option<Box<Nvfp4Q8Panels>>,
    },
}

/// Without panels (a CPU without AVX2), up to this many rows (a decode step of 64
/// sequences) an NVFP4 projection with int8 activations takes the integer kernel; above (long prefills), the f32 GEMM, which reads the
/// weights once for all rows. The integer kernel reads them once per 8 rows, and still beat the
/// f32 GEMM at 16 and 64 rows on the generation bench's models (1.3-1.5x at batch 16, 1.0-1.4x
/// at 64; at a limit of 32, batch 64 was level), its dot products being that much cheaper.
pub const INT8_MAX_ROWS: usize = 64;

/// From this many rows an NVFP4 projection with int8 activations and panels takes the tiled
/// int8 GEMM, which reads each weight tile once for all rows and keeps 16 output rows in the
/// lanes of a register; below, the int8 matrix-vector kernel, which streams the weights with
/// less work per byte.
pub const PANELS_MIN_ROWS: usize = 4;

/// Below this many weights one thread is faster than several.
const NVFP4_PARALLEL_MIN: usize = 1 << 13;

impl LinearOp {
    /// A dense projection from a row-major `[out_dim, in_dim]` weight: repacked into panels
    /// where the CPU runs [`CpuGemm::f32_panels`] natively, else kept row-major.
    pub fn dense(weight: Vec<f32>, out_dim: usize, in_dim: usize) -> Self {
        assert_eq!(
            weight.len(),
            out_dim * in_dim,
            "weight length must be out_dim * in_dim"
        );
        let gemm = CpuGemm::new(crate::threads::allowed_cpus());
        if gemm.has_fast_f32_panels() && out_dim > 0 && in_dim > 0 {
            let weight = F32Panels::pack(&weight, out_dim, in_dim)
                .expect("the weight's length was checked just above");
            return LinearOp::DensePanels {
                weight: Box::new(weight),
                gemm,
            };
        }
        Self::dense_row_major(weight, out_dim, in_dim)
    }

    /// A dense projection kept row-major whatever the CPU: the path of CPUs without AVX2,
    /// which the tests also run where panels exist.
    pub(crate) fn dense_row_major(weight: Vec<f32>, out_dim: usize, in_dim: usize) -> Self {
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

    /// An NVFP4 projection; the kernel uses every core only for large matrices. With
    /// `int8_activations`, the activations are rounded to int8 (see
    /// [`crate::engine::EngineOptions::int8_activations`] for which calls).
    pub fn nvfp4(weight: Nvfp4Tensor, int8_activations: bool) -> Self {
        let threads = if weight.rows() * weight.cols() >= NVFP4_PARALLEL_MIN {
            crate::threads::allowed_cpus()
        } else {
            1
        };
        let gemm = CpuGemm::new(threads);
        let panels = (int8_activations && gemm.has_fast_q8_panels())
            .then(|| Box::new(Nvfp4Q8Panels::pack(&weight)));
        LinearOp::Nvfp4 {
            weight,
            gemm,
            int8_activations,
            panels,
        }
    }

    /// Input width.
    pub fn in_dim(&self) -> usize {
        match self {
            LinearOp::Dense { in_dim, .. } => *in_dim,
            LinearOp::DensePanels { weight, .. } => weight.cols(),
            LinearOp::Nvfp4 { weight, .. } => weight.cols(),
        }
    }

    /// Output width.
    pub fn out_dim(&self) -> usize {
        match self {
            LinearOp::Dense { out_dim, .. } => *out_dim,
            LinearOp::DensePanels { weight, .. } => weight.rows(),
            LinearOp::Nvfp4 { weight, .. } => weight.rows(),
        }
    }

    /// Whether the weights are NVFP4.
    pub fn is_nvfp4(&self) -> bool {
        matches!(self, LinearOp::Nvfp4 { .. })
    }

    /// Bytes the weights occupy, the int8 panels included where kept.
    pub fn weight_bytes(&self) -> usize {
        match self {
            LinearOp::Dense { weight, .. } => weight.len() * 4,
            LinearOp::DensePanels { weight, .. } => weight.bytes(),
            LinearOp::Nvfp4 { weight, panels, .. } => {
                weight.packed().len()
                    + weight.scales().len()
                    + 4
                    + panels.as_ref().map_or(0, |p| p.bytes())
            }
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
            LinearOp::DensePanels { weight, gemm } => gemm
                .f32_panels(weight, x, rows, y)
                .expect("operand shapes are fixed when the engine is built"),
            LinearOp::Nvfp4 {
                weight,
                gemm,
                int8_activations,
                panels,
            } => {
                // A non-finite activation cannot be rounded to int8: the f32 kernel then
                // carries it to the logits, where the engine reports it.
                let int8 = *int8_activations
                    && match panels {
                        Some(p) if rows >= PANELS_MIN_ROWS => {
                            gemm.nvfp4_q8_panels(p, x, rows, y).is_ok()
                        }
                        _ => rows <= INT8_MAX_ROWS && gemm.nvfp4_q8(weight, x, rows, y).is_ok(),
                    };
                if !int8 {
                    gemm.nvfp4(weight, x, rows, y)
                        .expect("operand shapes are fixed when the engine is built");
                }
            }
        }
    }
}

/// With row-major weights (CPUs without AVX2), up to this many activation rows a projection
/// runs as matrix-vector products that read each weight row once for all rows; above, on the
/// GEMM library.
const GEMV_MAX_ROWS: usize = 4;

/// Below this many weights a matrix-vector product stays on one thread. Low for the reason
/// `NVFP4_PARALLEL_MIN` is: at 1 << 18 the experts, latent and key/value projections of
/// small-d512 ran on one core and f32 batch 1 was about 1.5x slower.
const PARALLEL_GEMV_MIN: usize = 1 << 12;

/// Below this many multiply-adds a single thread beats spawning work.
const PARALLEL_MIN_WORK: usize = 1 << 20;

/// Runs `kernel` (which writes output-major, `[out, rows]`) over the weight rows, split over
/// the pool for large matrices, and puts the result in `y` (`[rows, out]`).
fn out_major_rows(
    kernel: fn(&[f32], usize, &[f32], &mut [f32]),
    w: &[f32],
    out_dim: usize,
    in_dim: usize,
    x: &[f32],
    rows: usize,
    y: &mut [f32],
) {
    // For one row, output-major is `y` itself.
    let mut transposed = vec![];
    let out_major: &mut [f32] = if rows == 1 {
        &mut *y
    } else {
        transposed.resize(out_dim * rows, 0.0);
        &mut transposed
    };
    if out_dim * in_dim >= PARALLEL_GEMV_MIN && rayon::current_num_threads() > 1 {
        use rayon::prelude::*;
        let chunk = out_dim.div_ceil(rayon::current_num_threads() * 4).max(8);
        out_major
            .par_chunks_mut(chunk * rows)
            .zip(w.par_chunks(chunk * in_dim))
            .for_each(|(yc, wc)| kernel(wc, in_dim, x, yc));
    } else {
        kernel(w, in_dim, x, out_major);
    }
    if rows > 1 {
        for (o, outs) in transposed.chunks_exact(rows).enumerate() {
            for (r, &v) in outs.iter().enumerate() {
                y[r * out_dim + o] = v;
            }
        }
    }
}

fn dense_forward(w: &[f32], out_dim: usize, in_dim: usize, x: &[f32], rows: usize, y: &mut [f32]) {
    debug_assert_eq!(x.len(), rows * in_dim);
    debug_assert_eq!(y.len(), rows * out_dim);
    if rows == 0 || out_dim == 0 {
        return;
    }
    if rows <= GEMV_MAX_ROWS {
        // Matrix-vector products, each weight row read from memory once and multiplied with
        // every activation row while it sits in L1. Each output is the same dot product
        // whatever the row count or split (a speculative verification pass of 2-4 tokens
        // reproduces one-token decoding).
        out_major_rows(simd::gemv_rows, w, out_dim, in_dim, x, rows, y);
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
            // Edges of the panels (16 outputs) and of the row tiles, a k that is not a
            // multiple of 16, and split over the pool.
            (5, 6, 17),
            (7, 13, 64),
            (16, 40, 100),
            (32, 9, 15),
            (33, 12, 48),
            (64, 20, 40),
            (65, 12, 48),
            (16, 1030, 300),
        ] {
            let w: Vec<f32> = (0..out * inp).map(|_| next()).collect();
            let x: Vec<f32> = (0..rows * inp).map(|_| next()).collect();
            let want = reference(&w, out, inp, &x, rows);
            // Panels where the CPU has them, and the row-major path of CPUs without AVX2.
            for op in [
                LinearOp::dense(w.clone(), out, inp),
                LinearOp::dense_row_major(w.clone(), out, inp),
            ] {
                let mut y = vec![f32::NAN; rows * out];
                op.forward(&x, rows, &mut y);
                for (a, b) in y.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-4, "{rows}x{out}x{inp}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn dense_weights_take_panels_where_the_cpu_runs_them_and_a_row_keeps_its_bits_in_a_batch() {
        let (out, inp) = (37, 70);
        let w: Vec<f32> = (0..out * inp)
            .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let x: Vec<f32> = (0..24 * inp)
            .map(|i| ((i * 53) % 97) as f32 / 48.0 - 1.0)
            .collect();
        let op = LinearOp::dense(w, out, inp);
        let panels = CpuGemm::new(1).has_fast_f32_panels();
        assert_eq!(matches!(op, LinearOp::DensePanels { .. }), panels);
        if !panels {
            return;
        }
        let mut together = vec![0f32; 24 * out];
        op.forward(&x, 24, &mut together);
        // A speculative verification pass (2-5 rows) must reproduce one-token decoding.
        for few in [1, 2, 3, 5] {
            let mut alone = vec![0f32; few * out];
            op.forward(&x[..few * inp], few, &mut alone);
            for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "{few} rows: output {i}");
            }
        }
    }
}
