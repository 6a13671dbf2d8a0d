//! NVFP4 CPU GEMM benchmark: `Y[n, m] = X[n, k] . W^T` with m = 4096, k = 14336 and
//! n = 1, 8, 512; NVFP4 weights (f32 and bf16 activations) against the f32 GEMM on the same
//! shapes, and the NVFP4 effective weight bandwidth against this machine's read bandwidth
//! (measured in the same run with a big-array sum).
//!
//! With n = 1 among the sizes, a second table compares, in the same run, the f32-activation
//! GEMV (`CpuGemm::nvfp4`) with the int8-activation one (`CpuGemm::nvfp4_q8`, its activation
//! quantization included) on this shape and on the medium model's 1024-wide shapes, as the
//! ratio of their times: many calls per timing for the small shapes, the two paths timed
//! alternately, several repetitions. The other requested sizes up to 8 get the same rows.
//!
//! A third table times the tiled int8 GEMM (`CpuGemm::nvfp4_q8_panels`, on weights packed
//! once into `Nvfp4Q8Panels`) for every requested size, on the bench shape and the medium
//! model's, beside the f32-activation path (`CpuGemm::nvfp4`) and the row-wise int8 one
//! (`CpuGemm::nvfp4_q8`), timed alternately in the same repetitions, with the activation
//! quantization included and without it. `--panels-only` runs only this table.
//!
//! `cargo bench -p chorus-kernels --bench nvfp4_gemm [-- --threads N] [--n N]... [--backend B]
//! [--panels-only]` (default: 2 threads, n = 1, 8, 512, the fastest backend).
//!
//! With `--features cuda` and `-- --cuda`, a second table times the CUDA kernels on device 0
//! on the same shapes (weights and activations resident on the GPU; f32 and bf16
//! activations; the kernel `GemmPath::Auto` picks) beside the CPU times, and checks them
//! against the CPU result. Without a GPU it says so and stops there.

use std::hint::black_box;
use std::time::{Duration, Instant};

use chorus_kernels::{
    Backend, CpuGemm, Nvfp4Q8Panels, Nvfp4Tensor, Q8Activations, QuantizeOptions,
};
use half::bf16;

const M: usize = 4096;
const K: usize = 14336;

/// `--threads N` (default 2), `--n N` (repeatable; default 1, 8 and 512),
/// `--backend portable|avx2|avx512` (default: the fastest this CPU supports), `--cuda` and
/// `--panels-only` (only the panel table).
/// Other arguments (cargo passes `--bench`) are ignored.
fn parse_args() -> (usize, Vec<usize>, Option<Backend>, bool, bool) {
    let args: Vec<String> = std::env::args().collect();
    let mut cuda = false;
    let mut panels_only = false;
    let mut threads = 2;
    let mut sizes = Vec::new();
    let mut backend = None;
    let mut i = 1;
    while i < args.len() {
        let value = |name: &str| -> usize {
            args.get(i + 1)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} takes a number"))
        };
        match args[i].as_str() {
            "--threads" => {
                threads = value("--threads");
                i += 1;
            }
            "--n" => {
                sizes.push(value("--n"));
                i += 1;
            }
            "--cuda" => cuda = true,
            "--panels-only" => panels_only = true,
            "--backend" => {
                backend = Some(match args.get(i + 1).map(String::as_str) {
                    Some("portable") => Backend::Portable,
                    Some("avx2") => Backend::Avx2Fma,
                    Some("avx512") => Backend::Avx512,
                    other => panic!("--backend takes portable, avx2 or avx512, got {other:?}"),
                });
                i += 1;
            }
            _ => {}
        }
        i += 1;
    }
    if sizes.is_empty() {
        sizes = vec![1, 8, 512];
    }
    (threads.max(1), sizes, backend, cuda, panels_only)
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

/// Best time of `reps` runs after one warm-up run.
fn best_of(reps: usize, mut f: impl FnMut()) -> Duration {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap()
}

/// Read bandwidth in GB/s: `threads` threads summing disjoint parts of a 512 MiB array.
fn read_bandwidth(threads: usize) -> f64 {
    let data = fill(128 << 20, 99);
    let bytes = (data.len() * 4) as f64;
    let chunk = data.len().div_ceil(threads);
    let t = best_of(5, || {
        std::thread::scope(|s| {
            let handles: Vec<_> = data
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || {
                        let mut lanes = [0.0f32; 16];
                        for c in part.chunks_exact(16) {
                            for (l, v) in lanes.iter_mut().zip(c) {
                                *l += v;
                            }
                        }
                        lanes.iter().sum::<f32>()
                    })
                })
                .collect();
            let total: f32 = handles.into_iter().map(|h| h.join().unwrap()).sum();
            black_box(total);
        })
    });
    bytes / t.as_secs_f64() / 1e9
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let (threads, sizes, backend, cuda, panels_only) = parse_args();
    let mut gemm = CpuGemm::new(threads);
    if let Some(backend) = backend {
        gemm = gemm
            .with_backend(backend)
            .expect("backend not supported by this CPU");
    }
    println!(
        "nvfp4_gemm: m={M} k={K} threads={threads} backend={:?}",
        gemm.backend()
    );

    if panels_only {
        let w = fill(M * K, 1);
        let wq = Nvfp4Tensor::quantize("bench.w", &w, M, K, &QuantizeOptions::default()).unwrap();
        panel_comparison(&gemm, &wq, &sizes);
        return;
    }

    let bw = read_bandwidth(threads);
    println!("measured read bandwidth ({threads} threads, 512 MiB sum): {bw:.1} GB/s");

    let w = fill(M * K, 1);
    let t = Instant::now();
    let wq = Nvfp4Tensor::quantize("bench.w", &w, M, K, &QuantizeOptions::default()).unwrap();
    let t_quant = t.elapsed();
    drop(w);
    let t = Instant::now();
    let wf = wq.dequantize();
    println!(
        "quantize [{M}, {K}]: {:.1} ms, dequantize: {:.1} ms (single thread)",
        ms(t_quant),
        ms(t.elapsed())
    );
    // The f32 GEMM runs on the dequantized weights, so both products should agree.
    let weight_bytes = (wq.packed().len() + wq.scales().len()) as f64;

    println!();
    println!(
        "{:>4} | {:>10} | {:>10} | {:>10} | {:>9} | {:>9} | {:>9} | {:>9} | {:>8} | {:>9}",
        "n",
        "nvfp4 ms",
        "nvfp4 bf16",
        "f32 ms",
        "f32/nvfp4",
        "GB/s",
        "bf16 GB/s",
        "% of read",
        "GFLOP/s",
        "max |dy|"
    );
    println!("{}", "-".repeat(113));
    // (n, activations, CPU NVFP4 result, CPU NVFP4 time) for the CUDA table.
    let mut cpu_runs: Vec<(usize, Vec<f32>, Vec<f32>, Duration)> = Vec::new();
    let int8_sizes: Vec<usize> = sizes.iter().copied().filter(|&n| n <= 8).collect();
    let all_sizes = sizes.clone();
    for n in sizes {
        let reps = if n <= 8 { 30 } else { 5 };
        let x = fill(n * K, 7 + n as u64);
        let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let mut y = vec![0.0f32; n * M];
        let mut yb = vec![0.0f32; n * M];
        let mut yf = vec![0.0f32; n * M];
        let t_q = best_of(reps, || gemm.nvfp4(&wq, &x, n, &mut y).unwrap());
        let t_b = best_of(reps, || gemm.nvfp4_bf16(&wq, &xb, n, &mut yb).unwrap());
        let t_f = best_of(reps.min(5), || gemm.f32(&wf, M, K, &x, n, &mut yf).unwrap());
        let max_diff = y
            .iter()
            .zip(&yf)
            .fold(0.0f32, |a, (p, q)| a.max((p - q).abs()));
        let gbs = weight_bytes / t_q.as_secs_f64() / 1e9;
        let gbs_bf16 = weight_bytes / t_b.as_secs_f64() / 1e9;
        let gflops = 2.0 * (n * M * K) as f64 / t_q.as_secs_f64() / 1e9;
        println!(
            "{:>4} | {:>10.3} | {:>10.3} | {:>10.3} | {:>8.2}x | {:>9.1} | {:>9.1} | {:>8.0}% | {:>8.1} | {:>9.2e}",
            n,
            ms(t_q),
            ms(t_b),
            ms(t_f),
            t_f.as_secs_f64() / t_q.as_secs_f64(),
            gbs,
            gbs_bf16,
            100.0 * gbs / bw,
            gflops,
            max_diff
        );
        if cuda {
            cpu_runs.push((n, x, y, t_q));
        }
    }
    println!();
    println!(
        "nvfp4 = NVFP4 weights x f32 activations; nvfp4 bf16 = bf16 activations; f32 = f32 GEMM on the \
         dequantized weights (max |dy| compares it with nvfp4)"
    );
    println!(
        "GB/s = NVFP4 weight bytes ({:.1} MB, 4.5 bits/elem) / time; % of read = GB/s / measured read \
         bandwidth; GFLOP/s for nvfp4; times are the best of several runs",
        weight_bytes / 1e6
    );
    println!(
        "reference (ggml NVFP4 CPU kernel, this machine): n=1 ~3.3 ms, n=8 23-28 ms, n=512 1.4-1.5 s"
    );

    if int8_sizes.contains(&1) {
        int8_comparison(&gemm, &wq, &int8_sizes);
    }
    panel_comparison(&gemm, &wq, &all_sizes);

    if cuda {
        #[cfg(feature = "cuda")]
        cuda_bench::run(&wq, &cpu_runs);
        #[cfg(not(feature = "cuda"))]
        println!("\n--cuda: this bench was built without the `cuda` feature");
    }
    drop(cpu_runs);
}

/// Mean time of one call of `f` over `calls` consecutive calls.
fn timed(calls: usize, f: &mut dyn FnMut()) -> Duration {
    let t = Instant::now();
    for _ in 0..calls {
        f();
    }
    t.elapsed() / calls as u32
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The int8 table: f32 against int8 activations for each batch size in `sizes` (at most 8,
/// n = 1 among them) on `[m, k]` weights, the bench shape (`wq`) first, then the medium
/// model's (hidden size 1024: square projections, up and down).
fn int8_comparison(gemm: &CpuGemm, wq: &Nvfp4Tensor, sizes: &[usize]) {
    const REPS: usize = 15;
    println!();
    println!(
        "f32 vs int8 activations: best of {REPS} repetitions, each timing the paths alternately \
         over the same number of calls"
    );
    println!(
        "{:>3} | {:>12} | {:>6} | {:>10} | {:>10} | {:>10} | {:>10} | {:>9} | {:>9} | {:>10}",
        "n",
        "m x k",
        "calls",
        "f32 us",
        "int8 us",
        "quant us",
        "kernel us",
        "f32/int8",
        "median",
        "rel |dy|"
    );
    println!("{}", "-".repeat(119));
    let medium: Vec<Nvfp4Tensor> = [(1024, 1024), (1024, 4096), (4096, 1024)]
        .iter()
        .map(|&(m, k)| {
            let w = fill(m * k, 3 + m as u64 + k as u64);
            Nvfp4Tensor::quantize("bench.w", &w, m, k, &QuantizeOptions::default()).unwrap()
        })
        .collect();
    let runs = sizes
        .iter()
        .flat_map(|&n| std::iter::once(wq).chain(&medium).map(move |w| (n, w)));
    for (n, w) in runs {
        let (m, k) = (w.rows(), w.cols());
        let x = fill(n * k, 11);
        let mut yf = vec![0.0f32; n * m];
        let mut yq = vec![0.0f32; n * m];
        let mut yk = vec![0.0f32; n * m];
        let mut xq = Q8Activations::default();
        let mut f32_path = || gemm.nvfp4(w, &x, n, &mut yf).unwrap();
        let mut int8_path = || gemm.nvfp4_q8(w, &x, n, &mut yq).unwrap();
        f32_path();
        int8_path();
        // About 20 ms of calls per timing.
        let once = timed(1, &mut f32_path).as_secs_f64();
        let calls = ((0.02 / once) as usize).clamp(1, 20_000);
        let (mut tf, mut tq, mut tquant, mut tkernel, mut ratios) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..REPS {
            let f = timed(calls, &mut f32_path);
            let q = timed(calls, &mut int8_path);
            ratios.push(f.as_secs_f64() / q.as_secs_f64());
            tf.push(f);
            tq.push(q);
            tquant.push(timed(calls, &mut || {
                xq.requantize(&x, n, k).unwrap();
            }));
            tkernel.push(timed(calls, &mut || {
                gemm.nvfp4_q8_quantized(w, &xq, &mut yk).unwrap()
            }));
        }
        let best = |v: &[Duration]| v.iter().min().unwrap().as_secs_f64();
        gemm.nvfp4(w, &x, n, &mut yf).unwrap();
        gemm.nvfp4_q8(w, &x, n, &mut yq).unwrap();
        let scale = yf.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let diff = yq
            .iter()
            .zip(&yf)
            .fold(0.0f32, |a, (p, q)| a.max((p - q).abs()));
        println!(
            "{:>3} | {:>12} | {:>6} | {:>10.2} | {:>10.2} | {:>10.2} | {:>10.2} | {:>8.2}x | {:>8.2}x | {:>10.2e}",
            n,
            format!("{m}x{k}"),
            calls,
            best(&tf) * 1e6,
            best(&tq) * 1e6,
            best(&tquant) * 1e6,
            best(&tkernel) * 1e6,
            best(&tf) / best(&tq),
            median(ratios),
            diff / scale
        );
    }
    println!();
    println!(
        "f32 = nvfp4 (f32 activations); int8 = nvfp4_q8, quantizing the activations in every call; \
         quant = Q8Activations::requantize alone; kernel = nvfp4_q8_quantized alone; f32/int8 = \
         ratio of the best times (above 1: int8 is faster); median = median of the per-repetition \
         ratios; rel |dy| = max |int8 - f32| / max |f32|"
    );
}

/// The panel table: for every batch size in `sizes`, on the bench shape (`wq`) and the medium
/// model's three, the tiled int8 GEMM (`CpuGemm::nvfp4_q8_panels`) against the f32-activation
/// path (`CpuGemm::nvfp4`) and the row-wise int8 one (`CpuGemm::nvfp4_q8`), all timed
/// alternately in the same repetitions.
fn panel_comparison(gemm: &CpuGemm, wq: &Nvfp4Tensor, sizes: &[usize]) {
    println!();
    println!(
        "tiled int8 GEMM (nvfp4_q8_panels, SIMD micro-kernel: {}): best of several repetitions, \
         each timing the paths alternately over the same number of calls",
        gemm.has_fast_q8_panels()
    );
    println!(
        "{:>5} | {:>11} | {:>5} | {:>11} | {:>11} | {:>11} | {:>11} | {:>9} | {:>9} | {:>9} | {:>7} | {:>9}",
        "n",
        "m x k",
        "calls",
        "f32 us",
        "int8 us",
        "panels us",
        "kernel us",
        "f32/pan",
        "int8/pan",
        "median",
        "GMAC/s",
        "rel |dy|"
    );
    println!("{}", "-".repeat(137));
    let medium: Vec<Nvfp4Tensor> = [(1024, 1024), (1024, 4096), (4096, 1024)]
        .iter()
        .map(|&(m, k)| {
            let w = fill(m * k, 3 + m as u64 + k as u64);
            Nvfp4Tensor::quantize("bench.w", &w, m, k, &QuantizeOptions::default()).unwrap()
        })
        .collect();
    let packed: Vec<(&Nvfp4Tensor, Nvfp4Q8Panels)> = std::iter::once(wq)
        .chain(&medium)
        .map(|w| (w, Nvfp4Q8Panels::pack(w)))
        .collect();
    for &n in sizes {
        for (w, panels) in &packed {
            let (m, k) = (w.rows(), w.cols());
            let x = fill(n * k, 13 + n as u64);
            let xq = Q8Activations::quantize(&x, n, k).unwrap();
            let mut yf = vec![0.0f32; n * m];
            let mut yq = vec![0.0f32; n * m];
            let mut yp = vec![0.0f32; n * m];
            let mut yk = vec![0.0f32; n * m];
            let mut f32_path = || gemm.nvfp4(w, &x, n, &mut yf).unwrap();
            let mut int8_path = || gemm.nvfp4_q8(w, &x, n, &mut yq).unwrap();
            let mut panel_path = || gemm.nvfp4_q8_panels(panels, &x, n, &mut yp).unwrap();
            let mut kernel = || {
                gemm.nvfp4_q8_panels_quantized(panels, &xq, &mut yk)
                    .unwrap()
            };
            panel_path();
            // About 20 ms of calls per timing, and fewer repetitions for slow calls, so that
            // the table takes a minute or two.
            let once = timed(1, &mut f32_path).as_secs_f64();
            let calls = ((0.02 / once) as usize).clamp(1, 20_000);
            let reps = if once > 0.1 { 3 } else { 9 };
            let (mut tf, mut tq, mut tp, mut tk, mut ratios) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for _ in 0..reps {
                let f = timed(calls, &mut f32_path);
                let q = timed(calls, &mut int8_path);
                let p = timed(calls, &mut panel_path);
                ratios.push(q.as_secs_f64() / p.as_secs_f64());
                tf.push(f);
                tq.push(q);
                tp.push(p);
                tk.push(timed(calls, &mut kernel));
            }
            let best = |v: &[Duration]| v.iter().min().unwrap().as_secs_f64();
            let scale = yf.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let diff = yp
                .iter()
                .zip(&yf)
                .fold(0.0f32, |a, (p, q)| a.max((p - q).abs()));
            println!(
                "{:>5} | {:>11} | {:>5} | {:>11.1} | {:>11.1} | {:>11.1} | {:>11.1} | {:>8.2}x | {:>8.2}x | {:>8.2}x | {:>7.1} | {:>9.2e}",
                n,
                format!("{m}x{k}"),
                calls,
                best(&tf) * 1e6,
                best(&tq) * 1e6,
                best(&tp) * 1e6,
                best(&tk) * 1e6,
                best(&tf) / best(&tp),
                best(&tq) / best(&tp),
                median(ratios),
                (n * m * k) as f64 / best(&tk) / 1e9,
                diff / scale
            );
        }
    }
    println!();
    println!(
        "f32 = nvfp4 (f32 activations); int8 = nvfp4_q8 (row kernels, quantizing in every call); \
         panels = nvfp4_q8_panels (quantizing in every call); kernel = nvfp4_q8_panels_quantized \
         alone; f32/pan, int8/pan = ratios of the best times (above 1: the panels are faster); \
         median = median of the per-repetition int8/pan ratios; GMAC/s = n m k / kernel time; \
         rel |dy| = max |panels - f32| / max |f32|"
    );
}

#[cfg(feature = "cuda")]
mod cuda_bench {
    use std::hint::black_box;
    use std::time::{Duration, Instant};

    use chorus_kernels::cuda::{CudaNvfp4, GemmPath};
    use chorus_kernels::{Nvfp4Tensor, QuantizeOptions};
    use half::bf16;

    use super::{K, M, fill, ms};

    /// Best time of `reps` runs of `f` after one warm-up, each ended by a device sync.
    fn best_of_gpu(gpu: &CudaNvfp4, reps: usize, mut f: impl FnMut()) -> Duration {
        f();
        gpu.synchronize().unwrap();
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                gpu.synchronize().unwrap();
                t.elapsed()
            })
            .min()
            .unwrap()
    }

    pub fn run(wq: &Nvfp4Tensor, cpu_runs: &[(usize, Vec<f32>, Vec<f32>, Duration)]) {
        println!();
        let gpu = match CudaNvfp4::new(0) {
            Ok(gpu) => gpu,
            Err(e) => {
                println!("CUDA: skipped: no CUDA driver/GPU ({e})");
                return;
            }
        };
        let (major, minor) = gpu.compute_capability();
        println!(
            "CUDA: {} (sm_{major}{minor}), kernels compiled for {}",
            gpu.device_name(),
            gpu.compiled_arch()
        );

        // Quantization of the same weights on the GPU, checked against the CPU result.
        let w = fill(M * K, 1);
        let options = QuantizeOptions::default();
        let t = Instant::now();
        let gq = gpu.quantize("bench.w", &w, M, K, &options).unwrap();
        let first = t.elapsed();
        let t_quant = best_of_gpu(&gpu, 3, || {
            black_box(gpu.quantize("bench.w", &w, M, K, &options).unwrap());
        });
        println!(
            "CUDA quantize [{M}, {K}] incl. transfers: {:.1} ms (first call {:.1} ms); identical \
             to the CPU quantizer: {}",
            ms(t_quant),
            ms(first),
            gq == *wq
        );
        drop(w);

        let dw = gpu.upload_weight(wq).unwrap();
        let weight_bytes = (wq.packed().len() + wq.scales().len()) as f64;
        println!();
        println!(
            "{:>4} | {:>10} | {:>10} | {:>10} | {:>10} | {:>9} | {:>9} | {:>10} | {:>10}",
            "n",
            "path",
            "cuda ms",
            "cuda bf16",
            "cpu ms",
            "cpu/cuda",
            "GB/s",
            "TFLOP/s",
            "max |dy|"
        );
        println!("{}", "-".repeat(106));
        for (n, x, y_cpu, t_cpu) in cpu_runs {
            let n = *n;
            let reps = if n <= 8 { 100 } else { 20 };
            let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            let dx = gpu.upload_f32(x, n, K).unwrap();
            let dxb = gpu.upload_bf16(&xb, n, K).unwrap();
            let mut dy = gpu.alloc_output(n, M).unwrap();
            let mut path = GemmPath::Auto;
            let t_f = best_of_gpu(&gpu, reps, || {
                path = gpu.gemm_device(&dw, &dx, &mut dy, GemmPath::Auto).unwrap();
            });
            let y = gpu.download(&dy).unwrap();
            let t_b = best_of_gpu(&gpu, reps, || {
                gpu.gemm_device(&dw, &dxb, &mut dy, GemmPath::Auto).unwrap();
            });
            let max_diff = y
                .iter()
                .zip(y_cpu)
                .fold(0.0f32, |a, (p, q)| a.max((p - q).abs()));
            println!(
                "{:>4} | {:>10} | {:>10.4} | {:>10.4} | {:>10.3} | {:>8.0}x | {:>9.1} | {:>10.2} | {:>10.2e}",
                n,
                format!("{path:?}"),
                ms(t_f),
                ms(t_b),
                ms(*t_cpu),
                t_cpu.as_secs_f64() / t_f.as_secs_f64(),
                weight_bytes / t_f.as_secs_f64() / 1e9,
                2.0 * (n * M * K) as f64 / t_f.as_secs_f64() / 1e12,
                max_diff
            );
        }
        println!();
        println!(
            "cuda ms = f32 activations, cuda bf16 = bf16 activations, data resident on the GPU, \
             timed with a device sync after each call (launch overhead included); cpu ms = the \
             CPU NVFP4 kernel above; GB/s = NVFP4 weight bytes / cuda time; max |dy| = CUDA vs \
             CPU with f32 activations (the tensor-core path rounds them to bf16)"
        );
    }
}
