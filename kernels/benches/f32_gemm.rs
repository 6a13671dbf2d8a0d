//! f32 GEMM benchmark for the engine's dense projections: `Y[n, m] = X[n, k] . W^T` with f32
//! weights (row-major `[m, k]`) at 1 to 64 activation rows, on the shapes of a 1024-wide
//! model (m x k = 1024x1024, 5152x1024, 1024x2048, 2048x1024, 270x1024, 4096x1024).
//!
//! Columns, timed alternately in the same repetitions (best of several, in GFLOP/s):
//! - `rows`: the baseline, a copy of the engine's previous kernel (`model/src/simd.rs`'s
//!   `gemm_rows`: 4 weight rows x up to 4 activation rows per tile, 16-lane partial sums
//!   reduced horizontally, the output written out-major and transposed, split over the pool
//!   as `model/src/engine/linear.rs` does); AVX-512 only;
//! - `panels512`, `panels2`: `CpuGemm::f32_panels` on weights packed once into `F32Panels`,
//!   with the AVX-512 and the AVX2 backend where the CPU has them;
//! - `tiled`: the crate's f32 GEMM (`CpuGemm::f32`, which copies weight tiles per call).
//!
//! Ratios are of the panel kernels' GFLOP/s to the baseline's, from the same run. Each
//! configuration also checks that the AVX-512 and AVX2 panel kernels give the same bits and
//! agree with the baseline to rounding.
//!
//! `cargo bench -p chorus-kernels --bench f32_gemm -- [--threads N] [--n N]... [--shape MxK]...
//! [--reps N] [--ms T]` (default: 2 threads, n = 1, 4, 8, 16, 64, the shapes above, 7
//! repetitions of at least 20 ms each); `--help` prints this.

use std::hint::black_box;
use std::time::{Duration, Instant};

use chorus_kernels::{Backend, CpuGemm, F32Panels, cpu_description};

const SHAPES: [(usize, usize); 6] = [
    (1024, 1024),
    (5152, 1024),
    (1024, 2048),
    (2048, 1024),
    (270, 1024),
    (4096, 1024),
];

struct Args {
    threads: usize,
    sizes: Vec<usize>,
    shapes: Vec<(usize, usize)>,
    reps: usize,
    min_time: Duration,
}

const HELP: &str =
    "f32_gemm: f32 GEMM for dense projections, the engine's previous row-tiled kernel vs \
the f32 panel GEMM (CpuGemm::f32_panels)

usage: cargo bench -p chorus-kernels --bench f32_gemm -- [options]
  --threads N   worker threads (default 2)
  --n N         activation rows, repeatable (default 1 4 8 16 64)
  --shape MxK   weight shape, repeatable (default 1024x1024 5152x1024 1024x2048 2048x1024
                270x1024 4096x1024)
  --reps N      repetitions per configuration, best taken (default 7)
  --ms T        least milliseconds per timed repetition (default 20)
  --help        this text";

/// Parses the options above; other arguments (cargo passes `--bench`) are ignored.
fn parse_args() -> Args {
    let args: Vec<String> = std::env::args().collect();
    let mut out = Args {
        threads: 2,
        sizes: Vec::new(),
        shapes: Vec::new(),
        reps: 7,
        min_time: Duration::from_millis(20),
    };
    let mut i = 1;
    while i < args.len() {
        let value = |name: &str| -> &str {
            args.get(i + 1)
                .map(String::as_str)
                .unwrap_or_else(|| panic!("{name} takes a value"))
        };
        let number = |name: &str| -> usize {
            value(name)
                .parse()
                .unwrap_or_else(|_| panic!("{name} takes a number"))
        };
        match args[i].as_str() {
            "--help" | "-h" => {
                println!("{HELP}");
                std::process::exit(0);
            }
            "--threads" => out.threads = number("--threads"),
            "--n" => out.sizes.push(number("--n")),
            "--reps" => out.reps = number("--reps"),
            "--ms" => out.min_time = Duration::from_millis(number("--ms") as u64),
            "--shape" => {
                let v = value("--shape");
                let (m, k) = v
                    .split_once('x')
                    .and_then(|(m, k)| Some((m.parse().ok()?, k.parse().ok()?)))
                    .unwrap_or_else(|| panic!("--shape takes MxK, got {v}"));
                out.shapes.push((m, k));
            }
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    if out.sizes.is_empty() {
        out.sizes = vec![1, 4, 8, 16, 64];
    }
    if out.shapes.is_empty() {
        out.shapes = SHAPES.to_vec();
    }
    out.threads = out.threads.max(1);
    out.reps = out.reps.max(1);
    out
}

/// Deterministic pseudo-random values in [-1, 1).
fn fill(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// The engine's previous f32 projection (`model/src/simd.rs::gemm_rows` driven by
/// `model/src/engine/linear.rs::out_major_rows`), copied so that it can be timed here.
mod baseline {
    /// Below this many weights the product stays on one thread (the engine's constant).
    const PARALLEL_GEMV_MIN: usize = 1 << 12;

    pub fn supported() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// `y[rows, m] = x . w^T`, as the engine runs it: the kernel writes out-major
    /// (`[m, rows]`, chunks of weight rows over the pool), then the result is transposed.
    pub fn forward(w: &[f32], m: usize, k: usize, x: &[f32], rows: usize, y: &mut [f32]) {
        use rayon::prelude::*;
        assert!(supported());
        let mut transposed = vec![];
        let out_major: &mut [f32] = if rows == 1 {
            &mut *y
        } else {
            transposed.resize(m * rows, 0.0);
            &mut transposed
        };
        if m * k >= PARALLEL_GEMV_MIN && rayon::current_num_threads() > 1 {
            let chunk = m
                .div_ceil(rayon::current_num_threads() * 4)
                .max(8)
                .next_multiple_of(4);
            out_major
                .par_chunks_mut(chunk * rows)
                .zip(w.par_chunks(chunk * k))
                .for_each(|(yc, wc)| gemm_rows(wc, k, x, yc));
        } else {
            gemm_rows(w, k, x, out_major);
        }
        if rows > 1 {
            for (o, outs) in transposed.chunks_exact(rows).enumerate() {
                for (r, &v) in outs.iter().enumerate() {
                    y[r * m + o] = v;
                }
            }
        }
    }

    fn gemm_rows(w: &[f32], k: usize, x: &[f32], y: &mut [f32]) {
        assert!(k > 0 && w.len().is_multiple_of(k) && x.len().is_multiple_of(k));
        assert_eq!(y.len(), w.len() / k * (x.len() / k));
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `forward` checked AVX-512F; the shapes were checked just above.
        unsafe {
            imp::gemm_rows(w, k, x, y)
        };
    }

    #[cfg(target_arch = "x86_64")]
    mod imp {
        use std::arch::x86_64::*;

        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn gemm_rows(w: &[f32], k: usize, x: &[f32], y: &mut [f32]) {
            let (m, rows) = (w.len() / k, x.len() / k);
            for o in (0..m).step_by(4) {
                let mut r = 0;
                while r + 4 <= rows {
                    // SAFETY (all four): AVX-512F is enabled here; o < m and r + R <= rows.
                    unsafe { tile::<4>(w, k, x, y, o, r) };
                    r += 4;
                }
                match rows - r {
                    0 => {}
                    1 => unsafe { tile::<1>(w, k, x, y, o, r) },
                    2 => unsafe { tile::<2>(w, k, x, y, o, r) },
                    _ => unsafe { tile::<3>(w, k, x, y, o, r) },
                }
            }
        }

        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn tile<const R: usize>(
            w: &[f32],
            k: usize,
            x: &[f32],
            y: &mut [f32],
            o: usize,
            r: usize,
        ) {
            let (m, rows) = (w.len() / k, x.len() / k);
            let full = k / 16 * 16;
            let tail_mask: __mmask16 = ((1u32 << (k - full)) - 1) as u16;
            let wr: [*const f32; 4] = std::array::from_fn(|a| w[(o + a).min(m - 1) * k..].as_ptr());
            let xr: [*const f32; R] = std::array::from_fn(|b| x[(r + b) * k..].as_ptr());
            let mut acc = [[_mm512_setzero_ps(); R]; 4];
            let mut step = |wv: [__m512; 4], xv: [__m512; R]| {
                for a in 0..4 {
                    for b in 0..R {
                        acc[a][b] = _mm512_fmadd_ps(wv[a], xv[b], acc[a][b]);
                    }
                }
            };
            let mut i = 0;
            while i < full {
                // SAFETY: i + 16 <= full <= k, and every pointer starts a row of k elements.
                let (wv, xv) = unsafe {
                    (
                        wr.map(|p| _mm512_loadu_ps(p.add(i))),
                        xr.map(|p| _mm512_loadu_ps(p.add(i))),
                    )
                };
                step(wv, xv);
                i += 16;
            }
            if full < k {
                // SAFETY: the mask covers the k - full elements left in each row.
                let (wv, xv) = unsafe {
                    (
                        wr.map(|p| _mm512_maskz_loadu_ps(tail_mask, p.add(full))),
                        xr.map(|p| _mm512_maskz_loadu_ps(tail_mask, p.add(full))),
                    )
                };
                step(wv, xv);
            }
            for (a, row) in acc.iter().enumerate().take(m - o) {
                for (b, v) in row.iter().enumerate() {
                    y[(o + a) * rows + r + b] = _mm512_reduce_add_ps(*v);
                }
            }
        }
    }
}

/// One timed variant of a configuration.
struct Variant<'a> {
    name: &'static str,
    run: Box<dyn FnMut() + 'a>,
    best: Duration,
}

/// Times every variant `reps` times, alternately, each repetition at least `min_time` of
/// back-to-back calls; keeps each variant's best time per call.
fn time_alternately(variants: &mut [Variant<'_>], reps: usize, min_time: Duration) {
    // Calls per repetition, from one warm-up call each.
    let calls: Vec<usize> = variants
        .iter_mut()
        .map(|v| {
            let t = Instant::now();
            (v.run)();
            let once = t.elapsed().max(Duration::from_nanos(100));
            (min_time.as_secs_f64() / once.as_secs_f64())
                .ceil()
                .max(1.0) as usize
        })
        .collect();
    for _ in 0..reps {
        for (v, &calls) in variants.iter_mut().zip(&calls) {
            let t = Instant::now();
            for _ in 0..calls {
                (v.run)();
            }
            v.best = v.best.min(t.elapsed() / calls as u32);
        }
    }
}

fn main() {
    let args = parse_args();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build()
        .unwrap();
    println!("f32_gemm: {}", cpu_description());
    println!(
        "threads={} reps={} (best of, alternating), >= {} ms per repetition",
        args.threads,
        args.reps,
        args.min_time.as_millis()
    );
    let avx512 = CpuGemm::new(args.threads)
        .with_backend(Backend::Avx512)
        .ok();
    let avx2 = CpuGemm::new(args.threads)
        .with_backend(Backend::Avx2Fma)
        .ok();
    let tiled = CpuGemm::new(args.threads);
    let has_rows = baseline::supported();
    if !has_rows {
        println!("no AVX-512F: the `rows` baseline cannot run, ratios are omitted");
    }
    println!();
    println!(
        "{:>10} | {:>3} | {:>8} | {:>9} | {:>8} | {:>8} | {:>9} | {:>8} | {:>9}",
        "m x k", "n", "rows", "panels512", "ratio", "panels2", "ratio", "tiled", "max |dy|"
    );
    println!("{}", "-".repeat(96));
    pool.install(|| {
        for &(m, k) in &args.shapes {
            let w = fill(m * k, 1 + m as u64 * 7 + k as u64);
            let panels = F32Panels::pack(&w, m, k).unwrap();
            for &n in &args.sizes {
                let x = fill(n * k, 3 + n as u64);
                let mut y_rows = vec![0.0f32; n * m];
                let mut y_512 = vec![0.0f32; n * m];
                let mut y_2 = vec![0.0f32; n * m];
                let mut y_tiled = vec![0.0f32; n * m];
                let mut variants = Vec::new();
                if has_rows {
                    variants.push(Variant {
                        name: "rows",
                        run: Box::new(|| {
                            baseline::forward(&w, m, k, &x, n, &mut y_rows);
                            black_box(&y_rows);
                        }),
                        best: Duration::MAX,
                    });
                }
                if let Some(g) = avx512 {
                    let (panels, x, y) = (&panels, &x, &mut y_512);
                    variants.push(Variant {
                        name: "panels512",
                        run: Box::new(move || {
                            g.f32_panels(panels, x, n, y).unwrap();
                            black_box(&y);
                        }),
                        best: Duration::MAX,
                    });
                }
                if let Some(g) = avx2 {
                    let (panels, x, y) = (&panels, &x, &mut y_2);
                    variants.push(Variant {
                        name: "panels2",
                        run: Box::new(move || {
                            g.f32_panels(panels, x, n, y).unwrap();
                            black_box(&y);
                        }),
                        best: Duration::MAX,
                    });
                }
                variants.push(Variant {
                    name: "tiled",
                    run: Box::new(|| {
                        tiled.f32(&w, m, k, &x, n, &mut y_tiled).unwrap();
                        black_box(&y_tiled);
                    }),
                    best: Duration::MAX,
                });
                time_alternately(&mut variants, args.reps, args.min_time);
                let flops = 2.0 * (n * m * k) as f64;
                let gflops = |name: &str| {
                    variants
                        .iter()
                        .find(|v| v.name == name)
                        .map(|v| flops / v.best.as_secs_f64() / 1e9)
                };
                let rows = gflops("rows");
                let cell = |g: Option<f64>| g.map_or("-".to_string(), |g| format!("{g:.1}"));
                let ratio = |g: Option<f64>| match (g, rows) {
                    (Some(g), Some(r)) => format!("{:.2}x", g / r),
                    _ => "-".to_string(),
                };
                let (p512, p2) = (gflops("panels512"), gflops("panels2"));
                let tiled_g = gflops("tiled");
                drop(variants);
                if avx512.is_some() && avx2.is_some() {
                    assert!(
                        y_512
                            .iter()
                            .zip(&y_2)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "AVX-512 and AVX2 panel kernels differ at {m}x{k} n={n}"
                    );
                }
                let y_panels = if avx512.is_some() { &y_512 } else { &y_2 };
                let max_dy = if has_rows {
                    y_rows
                        .iter()
                        .zip(y_panels)
                        .fold(0.0f32, |a, (p, q)| a.max((p - q).abs()))
                } else {
                    0.0
                };
                assert!(max_dy <= 1e-6 * k as f32, "{m}x{k} n={n}: |dy| = {max_dy}");
                println!(
                    "{:>10} | {:>3} | {:>8} | {:>9} | {:>8} | {:>8} | {:>9} | {:>8} | {:>9.1e}",
                    format!("{m}x{k}"),
                    n,
                    cell(rows),
                    cell(p512),
                    ratio(p512),
                    cell(p2),
                    ratio(p2),
                    cell(tiled_g),
                    max_dy
                );
            }
        }
    });
    println!();
    println!(
        "GFLOP/s = 2 n m k / best time per call; ratio = panels GFLOP/s / rows GFLOP/s (same run); \
         max |dy| = largest difference between rows and panels outputs (summation order)"
    );
}
