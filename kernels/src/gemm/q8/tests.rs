//! Tests of the int8-activation path: every SIMD kernel and the SIMD quantizer against the
//! portable reference, independence from threads and batching, extreme scales, and the
//! rounding bound against the f32-activation kernels.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::avx512::Variant;
use super::*;
use crate::CpuGemm;
use crate::quant::QuantizeOptions;

/// f32 unit roundoff.
const U: f64 = f32::EPSILON as f64 / 2.0;

/// Bound on the relative error of `n` rounded operations, `n u / (1 - n u)`.
fn gamma(n: usize) -> f64 {
    n as f64 * U / (1.0 - n as f64 * U)
}

/// Every kernel this CPU runs, the reference first.
fn kernels() -> Vec<Kernel> {
    let mut out = vec![Kernel::Portable];
    if crate::gemm::avx2::available() {
        out.push(Kernel::Avx2);
    }
    for variant in [Variant::Bw, Variant::Vnni, Variant::VnniVbmi] {
        if variant.available() {
            out.push(Kernel::Avx512(variant));
        }
    }
    out
}

fn run(kernel: Kernel, threads: usize, w: &Nvfp4Tensor, x: &Q8Activations) -> Vec<f32> {
    let mut y = vec![f32::NAN; x.rows() * w.rows()];
    run_kernel(kernel, threads, w, x, &mut y);
    y
}

fn random(rng: &mut StdRng, len: usize, scale: f32) -> Vec<f32> {
    (0..len)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect()
}

/// `2 * e2m1` of weight element `(r, c)`, as the kernels' integer.
fn w2(w: &Nvfp4Tensor, r: usize, c: usize) -> i32 {
    (2.0 * e2m1_decode(w.code(r, c))) as i32
}

/// The exact integer dot product of block `b` of weight row `r` and activation row `i`.
fn block_dot(w: &Nvfp4Tensor, x: &Q8Activations, r: usize, i: usize, b: usize) -> i32 {
    (b * BLOCK..(b + 1) * BLOCK)
        .map(|c| w2(w, r, c) * x.value(i, c) as i32)
        .sum()
}

/// `(sum_b dot_b * s_b, sum_b |dot_b * s_b|)` in f64 for output `(i, r)`, both times
/// `global / 2`, with `s_b = w_scale_b * x_scale_b` rounded to f32 as the kernels round it.
fn exact(w: &Nvfp4Tensor, x: &Q8Activations, i: usize, r: usize) -> (f64, f64) {
    let blocks = w.cols() / BLOCK;
    let half_global = (w.global_decode_scale() * 0.5) as f64;
    let (mut sum, mut abs) = (0.0f64, 0.0f64);
    for b in 0..blocks {
        let s = E4M3_TABLE[w.scales()[r * blocks + b] as usize] * x.scale(i, b);
        let c = block_dot(w, x, r, i, b) as f64 * s as f64;
        sum += c;
        abs += c.abs();
    }
    (sum * half_global, abs * half_global)
}

/// Tolerance between two evaluations of output `(i, r)` that differ only in the order (and
/// fusing) of the f32 accumulation over the blocks: each is within `gamma(blocks + 2)` of the
/// exact sum relative to the sum of magnitudes (block products, additions, the global scale),
/// plus one smallest subnormal per operation for gradual underflow.
fn order_tolerance(w: &Nvfp4Tensor, x: &Q8Activations, i: usize, r: usize) -> f64 {
    let blocks = w.cols() / BLOCK;
    let (_, abs) = exact(w, x, i, r);
    2.0 * (gamma(blocks + 2) * abs + (blocks + 2) as f64 * f64::from(f32::from_bits(1)))
}

/// Shapes `(n, m, k)`: ragged `k` (one block, a partial AVX2 group, a partial AVX-512 step,
/// whole steps plus one block), `m` not a multiple of any unroll or chunk, and `n` past
/// `MAX_ROWS` (chunked).
const SHAPES: [(usize, usize, usize); 11] = [
    (1, 1, 16),
    (1, 7, 48),
    (2, 13, 272),
    (1, 37, 128),
    (3, 5, 144),
    (1, 29, 1024),
    (8, 25, 256),
    (1, 31, 4096 + 16),
    (5, 11, 4096 + 16),
    (9, 6, 400),
    (11, 3, 2064),
];

/// NVFP4 weights whose block scales and global scale are powers of two, with random codes
/// (some blocks zero-scaled, some scales negative: `from_parts` allows the sign bit).
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

/// Activations whose blocks quantize exactly: each block is integers in -40..=40 with one
/// +-127, times a power of two, so its scale is that power and `q = x / scale` (some blocks
/// zero).
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
fn simd_kernels_equal_the_reference_when_arithmetic_is_exact() {
    // With power-of-two scales every block product is an integer times 2^-3 or more and the
    // sums stay below 2^24 such units, so any order of f32 accumulation is exact: the kernels
    // must agree to the bit, which a wrong integer anywhere would break.
    let mut rng = StdRng::seed_from_u64(1);
    for &(n, m, k) in &SHAPES {
        let w = power_of_two_weights(&mut rng, m, k);
        let xf = exact_activations(&mut rng, n, k);
        let x = Q8Activations::quantize(&xf, n, k).unwrap();
        for i in 0..n {
            for c in 0..k {
                let s = x.scale(i, c / BLOCK);
                assert!(
                    s == 0.0 || s.log2().fract() == 0.0,
                    "scale {s} not a power of two"
                );
                assert_eq!(
                    x.value(i, c) as f32 * s,
                    xf[i * k + c],
                    "x[{i}, {c}] inexact"
                );
            }
            for r in 0..m {
                // Block products are multiples of 2^-1 * 2^-2; exact() scales by global / 2.
                let units = exact(&w, &x, i, r).1 / (1.0 / 32.0) / 2f64.powi(-3);
                assert!(units < (1u64 << 24) as f64, "sums may round: {units} units");
            }
        }
        let want = run(Kernel::Portable, 1, &w, &x);
        for (i, r) in (0..n).flat_map(|i| (0..m).map(move |r| (i, r))) {
            assert_eq!(
                want[i * m + r] as f64,
                exact(&w, &x, i, r).0,
                "reference ({i}, {r})"
            );
        }
        for kernel in kernels() {
            for threads in [1, 2] {
                let got = run(kernel, threads, &w, &x);
                assert_eq!(got, want, "{kernel:?} n={n} m={m} k={k} threads={threads}");
            }
        }
    }
}

#[test]
fn simd_kernels_match_the_reference_on_random_data() {
    let mut rng = StdRng::seed_from_u64(2);
    for (si, &(n, m, k)) in SHAPES.iter().enumerate() {
        let wf = random(&mut rng, m * k, 0.5 + si as f32);
        let w = Nvfp4Tensor::quantize("w", &wf, m, k, &QuantizeOptions::default()).unwrap();
        let mut xf = random(&mut rng, n * k, 3.0);
        // Blocks of very different magnitudes in one row.
        for (b, block) in xf.chunks_exact_mut(BLOCK).enumerate() {
            let f = 10f32.powi(b as i32 % 7 - 3);
            block.iter_mut().for_each(|v| *v *= f);
        }
        let x = Q8Activations::quantize(&xf, n, k).unwrap();
        let want = run(Kernel::Portable, 1, &w, &x);
        for kernel in kernels() {
            for threads in [1, 2] {
                let got = run(kernel, threads, &w, &x);
                for (i, r) in (0..n).flat_map(|i| (0..m).map(move |r| (i, r))) {
                    let (g, e) = (got[i * m + r] as f64, want[i * m + r] as f64);
                    let tol = order_tolerance(&w, &x, i, r);
                    assert!(
                        (g - e).abs() <= tol,
                        "{kernel:?} n={n} m={m} k={k} threads={threads} y[{i}, {r}] = {g}, \
                         reference {e}, tolerance {tol}"
                    );
                }
            }
        }
    }
}

#[test]
fn avx512_variants_give_the_same_bits() {
    // They form the same integers and then run the same f32 code.
    let variants: Vec<Variant> = [Variant::Bw, Variant::Vnni, Variant::VnniVbmi]
        .into_iter()
        .filter(|v| v.available())
        .collect();
    let mut rng = StdRng::seed_from_u64(3);
    for &(n, m, k) in &SHAPES {
        let wf = random(&mut rng, m * k, 1.0);
        let w = Nvfp4Tensor::quantize("w", &wf, m, k, &QuantizeOptions::default()).unwrap();
        let x = Q8Activations::quantize(&random(&mut rng, n * k, 1.0), n, k).unwrap();
        let bits = |v: Variant| {
            let y = run(Kernel::Avx512(v), 2, &w, &x);
            y.iter().map(|f| f.to_bits()).collect::<Vec<_>>()
        };
        for pair in variants.windows(2) {
            assert_eq!(bits(pair[0]), bits(pair[1]), "{pair:?} n={n} m={m} k={k}");
        }
    }
}

#[test]
fn results_do_not_depend_on_threads_or_batch() {
    // Every output is summed the same way whatever the partition of the weight rows and
    // whichever activation rows share the call.
    let mut rng = StdRng::seed_from_u64(4);
    let (n, m, k) = (11, 43, 1040);
    let wf = random(&mut rng, m * k, 1.0);
    let w = Nvfp4Tensor::quantize("w", &wf, m, k, &QuantizeOptions::default()).unwrap();
    let xf = random(&mut rng, n * k, 1.0);
    let x = Q8Activations::quantize(&xf, n, k).unwrap();
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    for kernel in kernels() {
        let all = run(kernel, 1, &w, &x);
        assert_eq!(
            bits(&all),
            bits(&run(kernel, 3, &w, &x)),
            "{kernel:?} threads"
        );
        for i in 0..n {
            let one = Q8Activations::quantize(&xf[i * k..(i + 1) * k], 1, k).unwrap();
            let single = run(kernel, 2, &w, &one);
            assert_eq!(
                bits(&single),
                bits(&all[i * m..(i + 1) * m]),
                "{kernel:?} row {i}"
            );
        }
    }
}

#[test]
fn extreme_scales_and_zero_rows() {
    // Weights: zero blocks, subnormal E4M3 scales, a tiny global scale; activations: a zero
    // row, blocks from 1e-30 to 1e20, blocks with subnormal (scale 0) and denormal-scale
    // values.
    let (m, k) = (7, 272);
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
    let n = 3;
    let mut xf = vec![0.0f32; n * k];
    for (i, v) in xf.iter_mut().enumerate().skip(k) {
        let (c, b) = (i % k, i % k / BLOCK);
        let magnitude = match b % 6 {
            0 => 1e-30,
            1 => 1e20,
            2 => f32::from_bits(3), // Subnormal: the block's scale underflows to 0.
            3 => 1e-37,             // The scale is subnormal.
            4 => 0.0,
            _ => 1.0,
        };
        *v = magnitude * ((c * 7 + i / k) % 13) as f32 - 6.0 * magnitude;
    }
    let x = Q8Activations::quantize(&xf, n, k).unwrap();
    assert_eq!(x.scale(1, 2), 0.0);
    assert!(x.scale(1, 3) > 0.0 && x.scale(1, 3) < f32::MIN_POSITIVE);
    let want = run(Kernel::Portable, 1, &w, &x);
    for kernel in kernels() {
        let got = run(kernel, 2, &w, &x);
        for (i, r) in (0..n).flat_map(|i| (0..m).map(move |r| (i, r))) {
            let (g, e) = (got[i * m + r], want[i * m + r]);
            assert!(g.is_finite(), "{kernel:?} y[{i}, {r}] = {g}");
            if i == 0 || r == 3 {
                assert_eq!(
                    g.to_bits(),
                    0,
                    "{kernel:?} y[{i}, {r}] = {g} from a zero row"
                );
            }
            let tol = order_tolerance(&w, &x, i, r);
            assert!(
                (g as f64 - e as f64).abs() <= tol,
                "{kernel:?} y[{i}, {r}] = {g}, reference {e}, tolerance {tol}"
            );
        }
    }
}

#[test]
fn int8_path_is_within_the_rounding_bound_of_the_f32_path() {
    // Per element `|x - q * s| <= s * (1/2 + 127 u)` (the division's rounding moves `x / s`,
    // at most 127, by 127 u before it is rounded to an integer), so output (i, r) moves by at
    // most `sum_b s_b (1/2 + 127 u) sum_{j in b} |w_j|` from the f32-activation product on the
    // same weights. Each computed result adds its own f32 rounding: at most
    // `gamma(blocks + 2) sum_j |w_j| |x^_j|` for the int8 path (as `order_tolerance`, with
    // `|dot_b| s_b <= sum_j |w_j q_j s_b|`) and `gamma(k + 2) sum_j |w_j| |x_j|` for the f32
    // path (products, then any order of additions).
    let mut rng = StdRng::seed_from_u64(5);
    let mut worst = 0.0f64;
    for (si, &(n, m, k)) in SHAPES.iter().enumerate() {
        let wf = random(&mut rng, m * k, 1.0 + si as f32);
        let w = Nvfp4Tensor::quantize("w", &wf, m, k, &QuantizeOptions::default()).unwrap();
        let wd = w.dequantize();
        let xf = random(&mut rng, n * k, 2.0);
        let x = Q8Activations::quantize(&xf, n, k).unwrap();
        let xd = x.dequantize();
        let blocks = k / BLOCK;
        for backend in [Backend::Portable, Backend::Avx2Fma, Backend::Avx512] {
            let Ok(gemm) = CpuGemm::new(2).with_backend(backend) else {
                continue;
            };
            let mut yq = vec![f32::NAN; n * m];
            gemm.nvfp4_q8(&w, &xf, n, &mut yq).unwrap();
            let mut yf = vec![f32::NAN; n * m];
            gemm.nvfp4(&w, &xf, n, &mut yf).unwrap();
            for (i, r) in (0..n).flat_map(|i| (0..m).map(move |r| (i, r))) {
                let (wr, xr, xdr) = (&wd[r * k..][..k], &xf[i * k..][..k], &xd[i * k..][..k]);
                let mut bound = 0.0f64;
                let (mut abs_q, mut abs_f) = (0.0f64, 0.0f64);
                for b in 0..blocks {
                    let range = b * BLOCK..(b + 1) * BLOCK;
                    let wsum: f64 = wr[range.clone()].iter().map(|&v| (v as f64).abs()).sum();
                    bound += x.scale(i, b) as f64 * (0.5 + 127.0 * U) * wsum;
                    for j in range {
                        abs_q += (wr[j] as f64 * xdr[j] as f64).abs();
                        abs_f += (wr[j] as f64 * xr[j] as f64).abs();
                    }
                }
                let tol = bound + gamma(blocks + 2) * abs_q + gamma(k + 2) * abs_f;
                let diff = (yq[i * m + r] as f64 - yf[i * m + r] as f64).abs();
                assert!(
                    diff <= tol,
                    "{backend:?} n={n} m={m} k={k} y[{i}, {r}]: int8 {}, f32 {}, |diff| {diff} > \
                     bound {tol}",
                    yq[i * m + r],
                    yf[i * m + r]
                );
                worst = worst.max(diff / tol);
                // And the int8 path is the product with the dequantized activations, up to
                // f32 rounding only.
                let exact_q: f64 = wr.iter().zip(xdr).map(|(&a, &b)| a as f64 * b as f64).sum();
                let tol_q = gamma(blocks + 2) * abs_q + (blocks + 2) as f64 * 1e-45;
                assert!(
                    (yq[i * m + r] as f64 - exact_q).abs() <= tol_q,
                    "{backend:?} n={n} m={m} k={k} y[{i}, {r}] = {}, W . dequantized x = \
                     {exact_q} (tolerance {tol_q})",
                    yq[i * m + r]
                );
            }
        }
    }
    // The bound is worst-case; random data should use a fair part of it but never all.
    assert!(
        worst > 0.01,
        "worst |diff| / bound = {worst}: the comparison is vacuous"
    );
}

#[test]
fn quantization_rounds_to_nearest_even_per_block() {
    let mut rng = StdRng::seed_from_u64(6);
    let (n, k) = (3, 144);
    let mut xf = random(&mut rng, n * k, 5.0);
    // Row 1, block 0: scale 1 exactly, with ties at +-0.5, 1.5, 2.5.
    let ties = [
        127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.25, -126.5, 126.5, 0.0, 1.0, -1.0,
    ];
    xf[k..k + BLOCK].fill(0.0);
    xf[k..k + ties.len()].copy_from_slice(&ties);
    // Row 1, block 1: zeros. Row 2, block 2: below the smallest representable scale.
    xf[k + BLOCK..k + 2 * BLOCK].fill(0.0);
    xf[2 * k + 2 * BLOCK..2 * k + 3 * BLOCK].fill(f32::from_bits(5));
    let x = Q8Activations::quantize(&xf, n, k).unwrap();
    let want_ties = [127, 0, 2, 2, 0, -2, -2, 3, -126, 126, 0, 1, -1];
    for (c, &want) in want_ties.iter().enumerate() {
        assert_eq!(x.value(1, c), want, "tie at column {c} ({})", ties[c]);
    }
    assert_eq!(x.scale(1, 0), 1.0);
    assert_eq!(x.scale(1, 1), 0.0);
    assert_eq!(x.scale(2, 2), 0.0);
    let deq = x.dequantize();
    for i in 0..n {
        for b in 0..k / BLOCK {
            let block = &xf[i * k + b * BLOCK..][..BLOCK];
            let amax = block.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let s = x.scale(i, b);
            assert_eq!(s, amax / 127.0, "scale of block ({i}, {b})");
            for (j, &v) in block.iter().enumerate() {
                let c = b * BLOCK + j;
                let q = x.value(i, c);
                assert!(q != i8::MIN, "-128 at ({i}, {c})");
                assert_eq!(deq[i * k + c], q as f32 * s);
                if v.abs() == amax && s > 0.0 {
                    assert_eq!(q.unsigned_abs(), 127, "block maximum at ({i}, {c})");
                }
                let err = (v as f64 - q as f64 * s as f64).abs();
                assert!(
                    err <= s as f64 * (0.5 + 127.0 * U) || (s == 0.0 && amax < 1e-42),
                    "x[{i}, {c}] = {v} -> {q} * {s}: error {err}"
                );
                if s > 0.0 {
                    // Away from ties, the nearest integer of the exact quotient.
                    let t = v as f64 / s as f64;
                    if (t - t.floor() - 0.5).abs() > 1e-4 {
                        assert_eq!(q as f64, t.round(), "x[{i}, {c}] = {v} / {s}");
                    }
                }
            }
            let sum: i32 = (0..BLOCK).map(|j| x.value(i, b * BLOCK + j) as i32).sum();
            assert_eq!(x.offsets[i * x.stride / BLOCK + b], OFFSET * sum);
        }
    }
    // Reuse: a smaller requantization equals a fresh one, padding included.
    let mut reused = x.clone();
    reused.requantize(&xf[..96], 1, 96).unwrap();
    assert_eq!(reused, Q8Activations::quantize(&xf[..96], 1, 96).unwrap());
}

#[test]
fn simd_quantizer_gives_the_reference_bits() {
    if !crate::gemm::avx2::available() {
        return;
    }
    let mut rng = StdRng::seed_from_u64(7);
    for k in [16, 48, 128, 272, 4096 + 16] {
        let mut x = random(&mut rng, k, 4.0);
        for (b, block) in x.chunks_exact_mut(BLOCK).enumerate() {
            match (b + 1) % 6 {
                0 => block.fill(0.0),
                // Ties at scale 1.
                1 => {
                    for (j, v) in block.iter_mut().enumerate() {
                        *v = j as f32 * 8.5 - 60.5;
                    }
                    block[15] = 127.0;
                }
                2 => block.iter_mut().for_each(|v| *v *= 1e-40),
                3 => block.iter_mut().for_each(|v| *v *= 1e30),
                4 => block.iter_mut().for_each(|v| *v = -v.abs()),
                _ => {}
            }
        }
        let stride = k.div_ceil(ROW_ALIGN) * ROW_ALIGN;
        let quantize = |simd: bool| {
            let mut qs = vec![0i8; stride];
            let mut scales = vec![0.0f32; stride / BLOCK];
            let mut offsets = vec![0i32; stride / BLOCK];
            if simd {
                avx2::quantize_row(&x, &mut qs, &mut scales, &mut offsets);
            } else {
                quantize_row(&x, &mut qs, &mut scales, &mut offsets);
            }
            let bits: Vec<u32> = scales.iter().map(|s| s.to_bits()).collect();
            (qs, bits, offsets)
        };
        let (want, got) = (quantize(false), quantize(true));
        assert!(want.0.iter().any(|&q| q != 0) && want.1.iter().any(|&s| s != 0));
        assert_eq!(got, want, "k={k}");
    }
}

#[test]
fn lookup_table_is_twice_e2m1_plus_offset() {
    for (code, &v) in LUT.iter().enumerate() {
        assert_eq!(
            v as i32 - OFFSET,
            (2.0 * e2m1_decode(code as u8)) as i32,
            "code {code}"
        );
    }
}

#[test]
fn rejects_bad_operands() {
    let w = Nvfp4Tensor::quantize("w", &[1.0; 64], 2, 32, &QuantizeOptions::default()).unwrap();
    let g = CpuGemm::new(1);
    let mut y = vec![0.0; 2];
    let err = g.nvfp4_q8(&w, &[0.0; 31], 1, &mut y).unwrap_err();
    assert!(err.is_shape() && err.to_string().contains("`x`"), "{err}");
    let err = g.nvfp4_q8(&w, &[0.0; 32], 1, &mut [0.0; 3]).unwrap_err();
    assert!(err.is_shape() && err.to_string().contains("`y`"), "{err}");
    let err = g.nvfp4_q8(&w, &[], usize::MAX, &mut y).unwrap_err();
    assert!(err.is_shape(), "{err}");
    let mut x = [0.5f32; 32];
    x[17] = f32::NAN;
    let err = g.nvfp4_q8(&w, &x, 1, &mut y).unwrap_err();
    assert!(
        matches!(&err, KernelError::NonFinite { tensor, row: 0, col: 17, value }
            if tensor == "x" && value.is_nan()),
        "{err}"
    );
    assert!(
        err.is_non_finite() && err.to_string().contains("[0, 17]"),
        "{err}"
    );
    let err = Q8Activations::quantize(&[0.0; 24], 1, 24).unwrap_err();
    assert!(
        err.is_shape() && err.to_string().contains("multiple of 16"),
        "{err}"
    );
    let xq = Q8Activations::quantize(&[1.0; 48], 1, 48).unwrap();
    let err = g.nvfp4_q8_quantized(&w, &xq, &mut y).unwrap_err();
    assert!(err.is_shape() && err.to_string().contains("`x`"), "{err}");
    let xq = Q8Activations::quantize(&[1.0; 64], 2, 32).unwrap();
    let err = g.nvfp4_q8_quantized(&w, &xq, &mut y).unwrap_err();
    assert!(err.is_shape() && err.to_string().contains("`y`"), "{err}");
    let mut y4 = vec![f32::NAN; 4];
    g.nvfp4_q8_quantized(&w, &xq, &mut y4).unwrap();
    assert_eq!(y4, [32.0; 4]);
    // Empty batch, no columns.
    g.nvfp4_q8(&w, &[], 0, &mut []).unwrap();
    let empty = Nvfp4Tensor::from_parts("w", 3, 0, vec![], vec![], 1.0).unwrap();
    let mut y3 = vec![f32::NAN; 3];
    g.nvfp4_q8(&empty, &[], 1, &mut y3).unwrap();
    assert_eq!(y3, [0.0; 3]);
}
