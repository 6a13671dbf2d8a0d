//! Tests of the f32 panel GEMM: the packing round trip, every micro-kernel bit for bit
//! against an independent naive reference of the documented FMA chain over ragged shapes,
//! independence from threads and batching, nested calls from pool tasks, and operand errors.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::CpuGemm;
use crate::gemm::test_support::{bits, bits_from_pool_tasks};

/// Every micro-kernel this CPU runs, the portable one first.
fn kernels() -> Vec<Kernel> {
    [Kernel::Portable, Kernel::Avx2, Kernel::Avx512]
        .into_iter()
        .filter(|k| k.available())
        .collect()
}

/// Every backend this CPU runs.
fn backends() -> Vec<Backend> {
    [Backend::Portable, Backend::Avx2Fma, Backend::Avx512]
        .into_iter()
        .filter(|b| b.is_supported())
        .collect()
}

fn run(kernel: Kernel, threads: usize, w: &F32Panels, x: &[f32], n: usize) -> Vec<f32> {
    let mut y = vec![f32::NAN; n * w.rows()];
    run_kernel(kernel, threads, w, x, n, &mut y);
    y
}

fn random(rng: &mut StdRng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
}

/// The documented arithmetic on the row-major weights, written without panels, tiles or
/// threads: per output, `acc = fma(w[o, c], x[r, c], acc)` for c = 0..k in order, from 0.
fn reference(w: &[f32], m: usize, k: usize, x: &[f32], n: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; n * m];
    for r in 0..n {
        for o in 0..m {
            let mut acc = 0.0f32;
            for c in 0..k {
                acc = w[o * k + c].mul_add(x[r * k + c], acc);
            }
            y[r * m + o] = acc;
        }
    }
    y
}

const MS: [usize; 8] = [1, 5, 16, 17, 31, 32, 33, 100];
const KS: [usize; 6] = [1, 3, 16, 17, 64, 300];
const NS: [usize; 10] = [1, 2, 3, 5, 11, 12, 13, 25, 64, 65];

#[test]
fn packing_round_trips() {
    let mut rng = StdRng::seed_from_u64(1);
    for m in MS {
        for k in KS {
            let w = random(&mut rng, m * k);
            let p = F32Panels::pack(&w, m, k).unwrap();
            assert_eq!((p.rows(), p.cols()), (m, k));
            assert_eq!(p.bytes(), m.div_ceil(16) * 16 * k * 4);
            assert_eq!(bits(&p.unpack()), bits(&w), "m={m} k={k}");
            // The documented layout, aligned lines, zero padding.
            let data: &[f32] = unsafe {
                // SAFETY: `Line` is `repr(C)` over 16 f32, so the lines are contiguous f32s.
                std::slice::from_raw_parts(p.lines.as_ptr().cast(), p.lines.len() * 16)
            };
            assert_eq!(data.as_ptr().align_offset(64), 0);
            for (i, &v) in data.iter().enumerate() {
                let (pc, o) = (i / 16, i % 16);
                let (panel, c) = (pc / k, pc % k);
                let row = panel * 16 + o;
                let want = if row < m { w[row * k + c] } else { 0.0 };
                assert_eq!(v.to_bits(), want.to_bits(), "m={m} k={k} at {i}");
            }
        }
    }
}

#[test]
fn kernels_equal_the_reference_bit_for_bit() {
    let mut rng = StdRng::seed_from_u64(2);
    let nmax = *NS.iter().max().unwrap();
    for m in MS {
        for k in KS {
            let w = random(&mut rng, m * k);
            let p = F32Panels::pack(&w, m, k).unwrap();
            let x = random(&mut rng, nmax * k);
            for n in NS {
                let x = &x[..n * k];
                let want = bits(&reference(&w, m, k, x, n));
                for kernel in kernels() {
                    for threads in [1, 2] {
                        assert_eq!(
                            bits(&run(kernel, threads, &p, x, n)),
                            want,
                            "{kernel:?} m={m} k={k} n={n} threads={threads}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn backends_equal_the_reference_through_the_api() {
    // Large enough for the parallel path, with partial panels and tiles.
    let mut rng = StdRng::seed_from_u64(3);
    let (m, k) = (270, 1030);
    let w = random(&mut rng, m * k);
    let p = F32Panels::pack(&w, m, k).unwrap();
    for n in [1, 3, 4, 13, 64] {
        let x = random(&mut rng, n * k);
        assert!(n * m * k >= SERIAL_FMAS);
        let want = bits(&reference(&w, m, k, &x, n));
        for backend in backends() {
            for threads in [1, 2, 3] {
                let g = CpuGemm::new(threads).with_backend(backend).unwrap();
                let mut y = vec![f32::NAN; n * m];
                g.f32_panels(&p, &x, n, &mut y).unwrap();
                assert_eq!(bits(&y), want, "{backend:?} n={n} threads={threads}");
            }
        }
    }
}

#[test]
fn results_do_not_depend_on_threads_or_batch() {
    // Each output's arithmetic is fixed by its row and column alone: a row computed alone, or
    // at another position among other rows, or with any number of threads, gives the same
    // bits.
    let mut rng = StdRng::seed_from_u64(4);
    let (m, k, n) = (100, 300, 64);
    let w = random(&mut rng, m * k);
    let p = F32Panels::pack(&w, m, k).unwrap();
    let x = random(&mut rng, n * k);
    let rev: Vec<f32> = (0..n)
        .rev()
        .flat_map(|i| x[i * k..(i + 1) * k].to_vec())
        .collect();
    let mut per_kernel = Vec::new();
    for kernel in kernels() {
        let all = bits(&run(kernel, 1, &p, &x, n));
        for threads in [2, 3, 5] {
            assert_eq!(all, bits(&run(kernel, threads, &p, &x, n)), "{kernel:?}");
        }
        let reversed = bits(&run(kernel, 2, &p, &rev, n));
        for i in 0..n {
            let one = bits(&run(kernel, 2, &p, &x[i * k..(i + 1) * k], 1));
            assert_eq!(one, all[i * m..(i + 1) * m], "{kernel:?} row {i} alone");
            let j = n - 1 - i;
            assert_eq!(
                one,
                reversed[j * m..(j + 1) * m],
                "{kernel:?} row {i} moved"
            );
        }
        // The first few rows as a speculative verification pass of 2 to 5 rows sees them.
        for few in 2..=5 {
            let part = bits(&run(kernel, 2, &p, &x[..few * k], few));
            assert_eq!(part, all[..few * m], "{kernel:?} {few} rows");
        }
        per_kernel.push(all);
    }
    assert!(per_kernel.windows(2).all(|w| w[0] == w[1]));
}

#[test]
fn nested_calls_from_pool_tasks_finish() {
    // Called from tasks of the rayon pool (the engine runs experts in parallel), the calls'
    // own tasks queue behind busy workers; a thread waiting for tiles that an unstarted task
    // was to build would hang. Every call must finish with the same bits as alone.
    let mut rng = StdRng::seed_from_u64(5);
    let (m, k, n) = (200, 272, 37);
    let w = random(&mut rng, m * k);
    let p = F32Panels::pack(&w, m, k).unwrap();
    let x = random(&mut rng, n * k);
    let want = bits(&reference(&w, m, k, &x, n));
    let results = bits_from_pool_tasks(n * m, |task, y| {
        CpuGemm::new(1 + task % 5).f32_panels(&p, &x, n, y).unwrap();
    });
    for (task, got) in results.into_iter().enumerate() {
        assert_eq!(got, want, "task {task}");
    }
}

#[test]
fn simd_kernels_run_where_expected() {
    for backend in backends() {
        let g = CpuGemm::new(1).with_backend(backend).unwrap();
        assert_eq!(g.has_fast_f32_panels(), backend != Backend::Portable);
    }
    if cfg!(target_arch = "x86_64")
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
    {
        assert!(CpuGemm::new(1).has_fast_f32_panels());
    }
}

#[test]
fn rejects_bad_operands() {
    let names = |err: KernelError, operand: &str| {
        assert!(
            err.is_shape() && err.to_string().contains(&format!("`{operand}`")),
            "{err}"
        );
    };
    names(F32Panels::pack(&[], 0, 4).unwrap_err(), "w");
    names(F32Panels::pack(&[], 4, 0).unwrap_err(), "w");
    names(F32Panels::pack(&[0.0; 7], 2, 4).unwrap_err(), "w");
    names(F32Panels::pack(&[], usize::MAX, 2).unwrap_err(), "w");
    let p = F32Panels::pack(&[1.0; 8], 2, 4).unwrap();
    let g = CpuGemm::new(1);
    let mut y = vec![0.0; 2];
    // x not a multiple of k, or not n rows of it.
    names(g.f32_panels(&p, &[0.0; 6], 1, &mut y).unwrap_err(), "x");
    names(g.f32_panels(&p, &[0.0; 8], 1, &mut y).unwrap_err(), "x");
    names(g.f32_panels(&p, &[], usize::MAX, &mut y).unwrap_err(), "x");
    names(
        g.f32_panels(&p, &[0.0; 4], 1, &mut [0.0; 3]).unwrap_err(),
        "y",
    );
    names(g.f32_panels(&p, &[0.0; 8], 2, &mut y).unwrap_err(), "y");
    // Correct shapes, and an empty batch.
    let mut y4 = vec![f32::NAN; 4];
    g.f32_panels(&p, &[0.5; 8], 2, &mut y4).unwrap();
    assert_eq!(y4, [2.0; 4]);
    g.f32_panels(&p, &[], 0, &mut []).unwrap();
}
