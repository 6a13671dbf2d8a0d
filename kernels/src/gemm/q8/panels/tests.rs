//! Tests of the panel GEMM: the packing round trip, every micro-kernel against an independent
//! reference with the documented arithmetic (bit for bit) and against the row kernels of
//! `nvfp4_q8` (within the bound of a different f32 accumulation order), exact cases,
//! independence from threads and batching, extreme scales, and operand errors.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::super::{Kernel as RowKernel, run_kernel as run_rows};
use super::*;
use crate::CpuGemm;
use crate::KernelError;
use crate::gemm::test_support::{bits, bits_from_pool_tasks};
use crate::quant::{BlockLayout, QuantizeOptions};
use crate::scalar::E4M3_TABLE;

/// f32 unit roundoff.
const U: f64 = f32::EPSILON as f64 / 2.0;

/// Bound on the relative error of `n` rounded operations, `n u / (1 - n u)`.
fn gamma(n: usize) -> f64 {
    n as f64 * U / (1.0 - n as f64 * U)
}

/// Every micro-kernel this CPU runs, the portable one first.
fn kernels() -> Vec<Kernel> {
    let mut out = vec![Kernel::Portable];
    for variant in [avx2::Variant::Avx2, avx2::Variant::AvxVnni] {
        if variant.available() {
            out.push(Kernel::Avx2(variant));
        }
    }
    for variant in [Variant::Bw, Variant::Vnni, Variant::VnniVbmi] {
        if variant.available() {
            out.push(Kernel::Avx512(variant));
        }
    }
    out
}

fn run(kernel: Kernel, threads: usize, w: &Nvfp4Q8Panels, x: &Q8Activations) -> Vec<f32> {
    let mut y = vec![f32::NAN; x.rows() * w.rows()];
    run_kernel(kernel, threads, w, Source::Quantized(x), &mut y);
    y
}

/// As `run`, quantizing f32 rows inside the call.
fn run_f32(kernel: Kernel, threads: usize, w: &Nvfp4Q8Panels, x: &[f32], n: usize) -> Vec<f32> {
    let mut y = vec![f32::NAN; n * w.rows()];
    let k = w.cols();
    run_kernel(kernel, threads, w, Source::F32 { x, n, k }, &mut y);
    y
}

fn random(rng: &mut StdRng, len: usize, scale: f32) -> Vec<f32> {
    (0..len)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect()
}

/// The exact integer dot product of block `b` of weight row `r` and activation row `i`
/// (`2 * e2m1` times the int8 values), from the tensor and the accessors only.
fn block_dot(w: &Nvfp4Tensor, x: &Q8Activations, r: usize, i: usize, b: usize) -> i32 {
    (b * BLOCK..(b + 1) * BLOCK)
        .map(|c| (2.0 * e2m1_decode(w.code(r, c))) as i32 * x.value(i, c) as i32)
        .sum()
}

/// The documented arithmetic, written independently of the panel layout, the repacked
/// activations and the tiling: per output, `fma(dot_b, fl(w_scale_b * x_scale_b), acc)` over
/// the blocks in order, then times `global / 2`.
fn reference(w: &Nvfp4Tensor, x: &Q8Activations) -> Vec<f32> {
    let (n, m, blocks) = (x.rows(), w.rows(), w.cols() / BLOCK);
    let half_global = w.global_decode_scale() * 0.5;
    let mut y = vec![0.0f32; n * m];
    for i in 0..n {
        for r in 0..m {
            let mut acc = 0.0f32;
            for b in 0..blocks {
                let s = E4M3_TABLE[w.scales()[r * blocks + b] as usize] * x.scale(i, b);
                acc = (block_dot(w, x, r, i, b) as f32).mul_add(s, acc);
            }
            y[i * m + r] = acc * half_global;
        }
    }
    y
}

/// `sum_b |dot_b * s_b|` in f64 for output `(i, r)`, times `global / 2`.
fn magnitude(w: &Nvfp4Tensor, x: &Q8Activations, i: usize, r: usize) -> f64 {
    let blocks = w.cols() / BLOCK;
    let half_global = (w.global_decode_scale() * 0.5) as f64;
    (0..blocks)
        .map(|b| {
            let s = E4M3_TABLE[w.scales()[r * blocks + b] as usize] * x.scale(i, b);
            (block_dot(w, x, r, i, b) as f64 * s as f64).abs()
        })
        .sum::<f64>()
        * half_global
}

/// Bound on the difference between the panel GEMM and `nvfp4_q8` on output `(i, r)`. Both sum
/// the same terms `dot_b * s_b` (`s_b` rounded the same way): the panel GEMM with one rounding
/// per block (the fma) and one for the global scale, the row kernels with at most two per
/// block (product, addition, in some order) and one for the global scale. Each is then within
/// `gamma(blocks + 2)` of the exact sum relative to the sum of magnitudes, plus one smallest
/// subnormal per operation for gradual underflow; the difference within twice that.
fn order_tolerance(w: &Nvfp4Tensor, x: &Q8Activations, i: usize, r: usize) -> f64 {
    let blocks = w.cols() / BLOCK;
    let abs = magnitude(w, x, i, r);
    2.0 * (gamma(blocks + 2) * abs + (2 * blocks + 2) as f64 * f64::from(f32::from_bits(1)))
}

/// Weight rows 1, 3, 16, 17, 31, 64, 100 (partial, whole and odd numbers of panels).
const ROWS: [usize; 7] = [1, 3, 16, 17, 31, 64, 100];
/// Activation rows 1, 5, 8, 9, 64, 130 (partial, whole and several tiles).
const NS: [usize; 6] = [1, 5, 8, 9, 64, 130];
/// Columns: one block, three, one and a bit AVX-512 steps of the activations, 64 blocks.
const COLS: [usize; 5] = [16, 48, 256, 272, 1024];

/// `(m, n, k)` cases: every pair of `ROWS` and `NS` with a rotating `COLS` (so every value of
/// each is paired with several of the others), and one case large enough for the sliced
/// loop order (more than `PASS_TILES` tiles, more than `SLICE_BLOCKS` blocks, ragged).
fn cases() -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    for (a, &m) in ROWS.iter().enumerate() {
        for (b, &n) in NS.iter().enumerate() {
            out.push((m, n, COLS[(a + 2 * b) % COLS.len()]));
        }
    }
    out.push((37, TILE_ROWS * PASS_TILES + 5, (SLICE_BLOCKS + 1) * BLOCK));
    out
}

#[test]
fn cases_cover_every_size() {
    let cases = cases();
    for k in COLS {
        for m in ROWS {
            assert!(cases.iter().any(|c| (c.0, c.2) == (m, k)), "m={m} k={k}");
        }
        for n in NS {
            assert!(cases.iter().any(|c| (c.1, c.2) == (n, k)), "n={n} k={k}");
        }
    }
}

#[test]
fn packing_round_trips() {
    let mut rng = StdRng::seed_from_u64(11);
    for (si, &(m, k)) in [(1, 16), (3, 48), (16, 256), (17, 272), (31, 1024), (40, 32)]
        .iter()
        .enumerate()
    {
        let layout = if si % 2 == 0 {
            BlockLayout::Row1x16
        } else {
            BlockLayout::Tile16x16
        };
        let options = QuantizeOptions {
            layout,
            ..Default::default()
        };
        let w = Nvfp4Tensor::quantize("w", &random(&mut rng, m * k, 3.0), m, k, &options).unwrap();
        let p = Nvfp4Q8Panels::pack(&w);
        assert_eq!((p.rows(), p.cols()), (m, k));
        assert_eq!(p.global_decode_scale(), w.global_decode_scale());
        assert_eq!(p.bytes(), m.div_ceil(16) * k / 16 * 160);
        for r in 0..m {
            for c in 0..k {
                assert_eq!(p.code(r, c), w.code(r, c), "code ({r}, {c}) m={m} k={k}");
            }
            for b in 0..k / 16 {
                let want = e4m3_decode(w.scales()[r * (k / 16) + b]);
                assert_eq!(p.scale(r, b).to_bits(), want.to_bits(), "scale ({r}, {b})");
            }
        }
        assert_eq!(bits(&p.dequantize()), bits(&w.dequantize()), "m={m} k={k}");
        // The padding rows of the last panel are zero codes with zero scales.
        for r in m..m.div_ceil(16) * 16 {
            for b in 0..k / 16 {
                let block = &p.blocks[r / 16 * (k / 16) + b];
                assert!((0..16).all(|c| block.code(r % 16, c) == 0));
                assert_eq!(p.scales[r / 16 * (k / 16) + b].0[r % 16], 0);
            }
        }
    }
    // Signed and zero scales (`from_parts` allows the sign bit), every code.
    let (m, k) = (5, 32);
    let packed: Vec<u8> = (0..m * k / 2).map(|i| (i * 37 + 11) as u8).collect();
    let scales: Vec<u8> = (0..m * k / 16)
        .map(|i| [0x00, 0x80, 0x38, 0xb9, 0x01][i % 5])
        .collect();
    let w = Nvfp4Tensor::from_parts("w", m, k, packed, scales, 0.75).unwrap();
    let p = Nvfp4Q8Panels::pack(&w);
    assert_eq!(bits(&p.dequantize()), bits(&w.dequantize()));
    let empty = Nvfp4Tensor::from_parts("w", 0, 32, vec![], vec![], 1.0).unwrap();
    assert_eq!(Nvfp4Q8Panels::pack(&empty).bytes(), 0);
    // Every E4M3 scale byte but the two NaNs is exact in the panels' f16 scales.
    let bytes: Vec<u8> = (0..=255u8).filter(|b| b & 0x7f != 0x7f).collect();
    let (m, k) = (bytes.len(), 16);
    let w = Nvfp4Tensor::from_parts("w", m, k, vec![0x71; m * 8], bytes.clone(), 1.0).unwrap();
    let p = Nvfp4Q8Panels::pack(&w);
    for (r, &b) in bytes.iter().enumerate() {
        assert_eq!(
            p.scale(r, 0).to_bits(),
            e4m3_decode(b).to_bits(),
            "byte {b:#04x}"
        );
    }
}

#[test]
fn kernels_equal_the_reference_and_match_the_row_kernels() {
    let mut rng = StdRng::seed_from_u64(12);
    let gemm = CpuGemm::new(2);
    for (ci, (m, n, k)) in cases().into_iter().enumerate() {
        let wf = random(&mut rng, m * k, 0.5 + (ci % 5) as f32);
        let w = Nvfp4Tensor::quantize("w", &wf, m, k, &QuantizeOptions::default()).unwrap();
        let p = Nvfp4Q8Panels::pack(&w);
        let mut xf = random(&mut rng, n * k, 3.0);
        // Blocks of very different magnitudes in one row.
        for (b, block) in xf.chunks_exact_mut(BLOCK).enumerate() {
            let f = 10f32.powi((b + ci) as i32 % 7 - 3);
            block.iter_mut().for_each(|v| *v *= f);
        }
        let x = Q8Activations::quantize(&xf, n, k).unwrap();
        let want = reference(&w, &x);
        let what = format!("m={m} n={n} k={k}");
        for kernel in kernels() {
            for threads in [1, 3] {
                let got = run(kernel, threads, &p, &x);
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "{kernel:?} threads={threads} {what}"
                );
                let got = run_f32(kernel, threads, &p, &xf, n);
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "{kernel:?} threads={threads} f32 {what}"
                );
            }
        }
        // The public entry points take the same path.
        let mut y = vec![f32::NAN; n * m];
        gemm.nvfp4_q8_panels(&p, &xf, n, &mut y).unwrap();
        assert_eq!(bits(&y), bits(&want), "nvfp4_q8_panels {what}");
        let mut y = vec![f32::NAN; n * m];
        gemm.nvfp4_q8_panels_quantized(&p, &x, &mut y).unwrap();
        assert_eq!(bits(&y), bits(&want), "nvfp4_q8_panels_quantized {what}");
        // The row kernels (their portable reference and the fastest), same integers, other
        // order of f32 accumulation.
        let mut rows = vec![f32::NAN; n * m];
        run_rows(RowKernel::Portable, 2, &w, &x, &mut rows);
        let mut fast = vec![f32::NAN; n * m];
        gemm.nvfp4_q8_quantized(&w, &x, &mut fast).unwrap();
        for (i, r) in (0..n).flat_map(|i| (0..m).map(move |r| (i, r))) {
            let tol = order_tolerance(&w, &x, i, r);
            let g = want[i * m + r] as f64;
            for (name, e) in [("portable", &rows), ("nvfp4_q8", &fast)] {
                let e = e[i * m + r] as f64;
                assert!(
                    (g - e).abs() <= tol,
                    "{what} y[{i}, {r}] = {g}, {name} {e}, tolerance {tol}"
                );
            }
        }
    }
}

/// NVFP4 weights whose block scales and global scale are powers of two, with random codes
/// (some blocks zero-scaled, some scales negative).
fn power_of_two_weights(rng: &mut StdRng, m: usize, k: usize) -> Nvfp4Tensor {
    let packed: Vec<u8> = (0..m * k / 2).map(|_| rng.random()).collect();
    let scales: Vec<u8> = (0..m * k / BLOCK)
        .map(|_| match rng.random_range(0..8) {
            0 => 0,
            // E4M3 2^p has exponent field p + 7 and no mantissa.
            1 => 0x80 | ((rng.random_range(-1i32..=0) + 7) << 3) as u8,
            _ => ((rng.random_range(-1i32..=0) + 7) << 3) as u8,
        })
        .collect();
    Nvfp4Tensor::from_parts("w", m, k, packed, scales, 1.0 / 16.0).unwrap()
}

/// Activations whose blocks quantize exactly: integers in -40..=40 with one +-127, times a
/// power of two (some blocks zero).
fn exact_activations(rng: &mut StdRng, n: usize, k: usize) -> Vec<f32> {
    let mut x = vec![0.0f32; n * k];
    for block in x.chunks_exact_mut(BLOCK) {
        if rng.random_range(0..8) == 0 {
            continue;
        }
        let p = (2.0f32).powi(rng.random_range(-2..=0));
        for v in block.iter_mut() {
            *v = rng.random_range(-40i32..=40) as f32 * p;
        }
        let at = rng.random_range(0..BLOCK);
        block[at] = if rng.random() { 127.0 } else { -127.0 } * p;
    }
    x
}

#[test]
fn exact_arithmetic_gives_the_exact_sum() {
    // Power-of-two scales: every term is an integer times 2^-3 and the sums stay below 2^24
    // such units, so every order of f32 accumulation is exact. The panel GEMM, the row
    // kernels and the exact sum must then agree to the bit, which any wrong integer breaks.
    let mut rng = StdRng::seed_from_u64(13);
    for &(m, n, k) in &[
        (1, 1, 16),
        (17, 5, 272),
        (31, 9, 1024),
        (64, 130, 48),
        (3, 64, 256),
    ] {
        let w = power_of_two_weights(&mut rng, m, k);
        let x = Q8Activations::quantize(&exact_activations(&mut rng, n, k), n, k).unwrap();
        let p = Nvfp4Q8Panels::pack(&w);
        let mut exact = vec![0.0f32; n * m];
        for (i, r) in (0..n).flat_map(|i| (0..m).map(move |r| (i, r))) {
            let blocks = k / BLOCK;
            let sum: f64 = (0..blocks)
                .map(|b| {
                    let s = E4M3_TABLE[w.scales()[r * blocks + b] as usize] * x.scale(i, b);
                    block_dot(&w, &x, r, i, b) as f64 * s as f64
                })
                .sum::<f64>()
                / 32.0;
            assert!(
                sum.abs() * 8.0 * 32.0 < (1u64 << 24) as f64,
                "sums may round"
            );
            exact[i * m + r] = sum as f32;
            assert_eq!(exact[i * m + r] as f64, sum);
        }
        let mut rows = vec![f32::NAN; n * m];
        run_rows(RowKernel::Portable, 1, &w, &x, &mut rows);
        assert_eq!(rows, exact, "row kernel m={m} n={n} k={k}");
        for kernel in kernels() {
            assert_eq!(
                run(kernel, 2, &p, &x),
                exact,
                "{kernel:?} m={m} n={n} k={k}"
            );
        }
    }
}

#[test]
fn results_do_not_depend_on_threads_or_batch() {
    // Each output's arithmetic is fixed by its row and column alone: a row computed alone, or
    // at another position among other rows, or with any number of threads, gives the same
    // bits.
    let mut rng = StdRng::seed_from_u64(14);
    let (m, n, k) = (45, 21, 1040);
    let w = Nvfp4Tensor::quantize(
        "w",
        &random(&mut rng, m * k, 1.0),
        m,
        k,
        &QuantizeOptions::default(),
    )
    .unwrap();
    let p = Nvfp4Q8Panels::pack(&w);
    let xf = random(&mut rng, n * k, 1.0);
    let x = Q8Activations::quantize(&xf, n, k).unwrap();
    // The rows in reverse order: every row moves to another tile position.
    let rev: Vec<f32> = (0..n)
        .rev()
        .flat_map(|i| xf[i * k..(i + 1) * k].to_vec())
        .collect();
    let xr = Q8Activations::quantize(&rev, n, k).unwrap();
    for kernel in kernels() {
        let all = bits(&run(kernel, 1, &p, &x));
        for threads in [2, 3, 5] {
            assert_eq!(
                all,
                bits(&run(kernel, threads, &p, &x)),
                "{kernel:?} {threads}"
            );
            assert_eq!(
                all,
                bits(&run_f32(kernel, threads, &p, &xf, n)),
                "{kernel:?} {threads} f32"
            );
        }
        let reversed = bits(&run(kernel, 2, &p, &xr));
        for i in 0..n {
            let one = Q8Activations::quantize(&xf[i * k..(i + 1) * k], 1, k).unwrap();
            let single = bits(&run(kernel, 2, &p, &one));
            assert_eq!(single, all[i * m..(i + 1) * m], "{kernel:?} row {i} alone");
            let j = n - 1 - i;
            assert_eq!(
                single,
                reversed[j * m..(j + 1) * m],
                "{kernel:?} row {i} moved"
            );
        }
    }
    // Large batches take the sliced loop order, which must not change a bit either.
    let n = 8 * PASS_TILES + 3;
    let k = SLICE_BLOCKS * BLOCK * 2 + 32;
    let xf = random(&mut rng, n * k, 1.0);
    let x = Q8Activations::quantize(&xf, n, k).unwrap();
    let w = Nvfp4Tensor::quantize(
        "w",
        &random(&mut rng, 33 * k, 1.0),
        33,
        k,
        &Default::default(),
    )
    .unwrap();
    let p = Nvfp4Q8Panels::pack(&w);
    for kernel in kernels().into_iter().skip(1) {
        let all = bits(&run(kernel, 2, &p, &x));
        for i in [0, 7, 8, n - 1] {
            let one = Q8Activations::quantize(&xf[i * k..(i + 1) * k], 1, k).unwrap();
            assert_eq!(
                bits(&run(kernel, 1, &p, &one)),
                all[i * 33..(i + 1) * 33],
                "row {i}"
            );
        }
    }
}

#[test]
fn nested_calls_from_pool_tasks_finish() {
    // Called from tasks of the rayon pool (the engine runs experts in parallel), the calls'
    // own tasks queue behind busy workers; a thread waiting for tiles that an unstarted task
    // was to build would hang. Every call must finish with the same bits as alone.
    let mut rng = StdRng::seed_from_u64(16);
    let (m, n, k) = (40, 37, 272);
    let w = Nvfp4Tensor::quantize(
        "w",
        &random(&mut rng, m * k, 1.0),
        m,
        k,
        &Default::default(),
    )
    .unwrap();
    let p = Nvfp4Q8Panels::pack(&w);
    let xf = random(&mut rng, n * k, 1.0);
    let want = bits(&run_f32(
        Kernel::for_backend(Backend::detect()),
        1,
        &p,
        &xf,
        n,
    ));
    let results = bits_from_pool_tasks(n * m, |task, y| {
        CpuGemm::new(1 + task % 5)
            .nvfp4_q8_panels(&p, &xf, n, y)
            .unwrap();
    });
    for (task, got) in results.into_iter().enumerate() {
        assert_eq!(got, want, "task {task}");
    }
}

#[test]
fn extreme_scales_and_zero_rows() {
    // Weights: zero blocks, subnormal E4M3 scales, a tiny global scale; activations: a zero
    // row, blocks from 1e-30 to 1e20, blocks with a zero or a subnormal scale.
    let (m, k) = (19, 272);
    let mut wf = vec![0.0f32; m * k];
    for (i, v) in wf.iter_mut().enumerate() {
        let (r, c) = (i / k, i % k);
        *v = match (r, c / BLOCK % 4) {
            (3, _) => 0.0,
            (_, 0) => 0.0,
            (_, 1) => ((c % 5) as f32 - 2.0) * 5e-33,
            _ => ((c % 11) as f32 - 5.0) * 1e-28,
        };
    }
    let w = Nvfp4Tensor::quantize("w", &wf, m, k, &QuantizeOptions::default()).unwrap();
    assert!(
        w.scales().iter().any(|&s| s != 0 && s < 8),
        "no subnormal block scale"
    );
    let n = 10;
    let mut xf = vec![0.0f32; n * k];
    for (i, v) in xf.iter_mut().enumerate().skip(k) {
        let (c, b) = (i % k, i % k / BLOCK);
        let magnitude = match b % 6 {
            0 => 1e-30,
            1 => 1e20,
            2 => f32::from_bits(3),
            3 => 1e-37,
            4 => 0.0,
            _ => 1.0,
        };
        *v = magnitude * ((c * 7 + i / k) % 13) as f32 - 6.0 * magnitude;
    }
    let x = Q8Activations::quantize(&xf, n, k).unwrap();
    let p = Nvfp4Q8Panels::pack(&w);
    let want = reference(&w, &x);
    for kernel in kernels() {
        let got = run(kernel, 2, &p, &x);
        assert_eq!(bits(&got), bits(&want), "{kernel:?}");
        for (i, r) in (0..n).flat_map(|i| (0..m).map(move |r| (i, r))) {
            assert!(got[i * m + r].is_finite());
            if i == 0 || r == 3 {
                assert_eq!(got[i * m + r].to_bits(), 0, "y[{i}, {r}] from a zero row");
            }
        }
    }
}

#[test]
fn simd_kernels_run_where_expected() {
    let fast = Variant::detect().is_some() && Backend::detect() == Backend::Avx512;
    let avx2 = avx2::Variant::detect();
    assert_eq!(CpuGemm::new(1).has_fast_q8_panels(), fast || avx2.is_some());
    if let Ok(g) = CpuGemm::new(1).with_backend(Backend::Avx2Fma) {
        assert_eq!(g.has_fast_q8_panels(), avx2.is_some());
        assert_eq!(
            Kernel::for_backend(Backend::Avx2Fma),
            avx2.map_or(Kernel::Portable, Kernel::Avx2)
        );
    }
    let portable = CpuGemm::new(1).with_backend(Backend::Portable).unwrap();
    assert!(!portable.has_fast_q8_panels());
    assert_eq!(Kernel::for_backend(Backend::Portable), Kernel::Portable);
}

#[test]
fn rejects_bad_operands() {
    let w = Nvfp4Tensor::quantize("w", &[1.0; 64], 2, 32, &QuantizeOptions::default()).unwrap();
    let p = Nvfp4Q8Panels::pack(&w);
    let g = CpuGemm::new(1);
    let mut y = vec![0.0; 2];
    let err = g.nvfp4_q8_panels(&p, &[0.0; 31], 1, &mut y).unwrap_err();
    assert!(err.is_shape() && err.to_string().contains("`x`"), "{err}");
    let err = g
        .nvfp4_q8_panels(&p, &[0.0; 32], 1, &mut [0.0; 3])
        .unwrap_err();
    assert!(err.is_shape() && err.to_string().contains("`y`"), "{err}");
    let err = g.nvfp4_q8_panels(&p, &[], usize::MAX, &mut y).unwrap_err();
    assert!(err.is_shape(), "{err}");
    let mut x = [0.5f32; 32];
    x[17] = f32::INFINITY;
    let err = g.nvfp4_q8_panels(&p, &x, 1, &mut y).unwrap_err();
    assert!(
        matches!(&err, KernelError::NonFinite { tensor, row: 0, col: 17, .. } if tensor == "x"),
        "{err}"
    );
    let xq = Q8Activations::quantize(&[1.0; 48], 1, 48).unwrap();
    let err = g.nvfp4_q8_panels_quantized(&p, &xq, &mut y).unwrap_err();
    assert!(
        err.is_shape() && err.to_string().contains("`x`") && err.to_string().contains("48"),
        "{err}"
    );
    let xq = Q8Activations::quantize(&[1.0; 64], 2, 32).unwrap();
    let err = g.nvfp4_q8_panels_quantized(&p, &xq, &mut y).unwrap_err();
    assert!(
        err.is_shape() && err.to_string().contains("`y`") && err.to_string().contains("[2, 2]"),
        "{err}"
    );
    // Correct shapes: 32 ones against weights of ones (scale 1 after quantization).
    let mut y4 = vec![f32::NAN; 4];
    g.nvfp4_q8_panels_quantized(&p, &xq, &mut y4).unwrap();
    assert_eq!(y4, [32.0; 4]);
    // Empty batch, no columns, no rows.
    g.nvfp4_q8_panels(&p, &[], 0, &mut []).unwrap();
    let empty = Nvfp4Tensor::from_parts("w", 3, 0, vec![], vec![], 1.0).unwrap();
    let mut y3 = vec![f32::NAN; 3];
    g.nvfp4_q8_panels(&Nvfp4Q8Panels::pack(&empty), &[], 1, &mut y3)
        .unwrap();
    assert_eq!(y3, [0.0; 3]);
    let none = Nvfp4Tensor::from_parts("w", 0, 32, vec![], vec![], 1.0).unwrap();
    g.nvfp4_q8_panels(&Nvfp4Q8Panels::pack(&none), &[1.0; 64], 2, &mut [])
        .unwrap();
}
