//! CUDA kernels against the CPU ones (feature `cuda`).
//!
//! Where there is no driver or GPU, the GPU tests print "skipped: no CUDA driver/GPU" and
//! return; set `CHORUS_REQUIRE_GPU=1` to make that a failure instead (on a GPU machine, so
//! that a broken driver setup cannot pass as a skip). The NVRTC compile test needs only the
//! NVRTC library and skips without it (`CHORUS_REQUIRE_NVRTC=1` makes that a failure).
//!
//! Run: `cargo test -p chorus-kernels --features cuda`.

#![cfg(feature = "cuda")]

use chorus_kernels::cuda::{self, CudaNvfp4, GemmPath};
use chorus_kernels::{BlockLayout, CpuGemm, Nvfp4Tensor, QuantizeOptions, Rounding};
use half::bf16;
// The emulation-case generator brings the shared test data (tests/support) with it.
use emu_cases::support::{golden_cases, reference, test_tensor};

fn required(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

/// The GPU, or `None` (after saying so) where there is no driver or no device.
fn gpu() -> Option<CudaNvfp4> {
    match cuda::device_count() {
        Ok(count) if count > 0 => {
            // A driver and a device: from here on every failure is a real one.
            let gpu = CudaNvfp4::new(0).expect("CUDA device 0 is present but did not open");
            eprintln!(
                "running on {} (sm_{}{}, kernels compiled for {})",
                gpu.device_name(),
                gpu.compute_capability().0,
                gpu.compute_capability().1,
                gpu.compiled_arch()
            );
            Some(gpu)
        }
        other => {
            assert!(
                !required("CHORUS_REQUIRE_GPU"),
                "CHORUS_REQUIRE_GPU=1 but no GPU: {other:?}"
            );
            println!("skipped: no CUDA driver/GPU ({other:?})");
            None
        }
    }
}

#[test]
fn new_without_a_driver_or_device_is_an_error_not_a_panic() {
    // An ordinal no machine has: an error whether or not there is a driver.
    let err = CudaNvfp4::new(1000).unwrap_err();
    assert!(err.is_cuda(), "{err}");

    if !cuda::driver_available() {
        let err = CudaNvfp4::new(0).unwrap_err();
        assert!(err.is_cuda(), "{err}");
        assert!(
            err.to_string().contains("no CUDA driver library found"),
            "{err}"
        );
        assert!(cuda::device_count().is_err());
        println!("no driver: CudaNvfp4::new(0) -> {err}");
    }
}

#[test]
fn kernel_sources_compile_with_nvrtc() {
    if !cuda::nvrtc_available() {
        assert!(
            !required("CHORUS_REQUIRE_NVRTC"),
            "CHORUS_REQUIRE_NVRTC=1 but libnvrtc cannot be loaded"
        );
        println!("skipped: no NVRTC library");
        return;
    }
    let (major, minor) = cuda::nvrtc_version().unwrap();
    let supported = cuda::nvrtc_architectures().unwrap();
    // Turing (SIMT fallback only), Ampere, Hopper, and Blackwell where this NVRTC knows it.
    // A real architecture compiles down to machine code, so NVIDIA's assembler checks the
    // inline PTX (the tensor-core MMAs) too.
    let mut checked = Vec::new();
    for arch in [75, 80, 89, 90, 100, 120] {
        if !supported.contains(&arch) {
            continue;
        }
        let name = format!("sm_{arch}");
        let outputs =
            cuda::compile_check(&name).unwrap_or_else(|e| panic!("NVRTC {major}.{minor}: {e}"));
        assert_eq!(outputs.len(), 2);
        for (source, bytes) in outputs {
            assert!(bytes > 1000, "{source} for {name}: {bytes} bytes");
        }
        checked.push(name);
    }
    // PTX for the virtual architecture, the form loaded on devices newer than NVRTC.
    let outputs = cuda::compile_check("compute_80").unwrap();
    assert!(outputs.iter().all(|&(_, bytes)| bytes > 1000));
    assert!(checked.contains(&"sm_80".to_string()), "{supported:?}");
    assert!(checked.contains(&"sm_90".to_string()), "{supported:?}");
    println!("NVRTC {major}.{minor} compiled the kernels for {checked:?} and compute_80");
}

#[allow(dead_code)]
#[path = "../examples/nvfp4_emu_cases.rs"]
mod emu_cases;

/// Runs the .cu sources on the CPU under emulation (`kernels/cuda/emu/`): every kernel the
/// GPU tests below run, against the CPU results, with no GPU. Needs `g++` (C++20); skips
/// without it (`CHORUS_REQUIRE_GXX=1` makes that a failure).
#[test]
fn kernels_match_the_cpu_under_emulation() {
    let gxx = std::process::Command::new("g++").arg("--version").output();
    if !gxx.is_ok_and(|o| o.status.success()) {
        assert!(
            !required("CHORUS_REQUIRE_GXX"),
            "CHORUS_REQUIRE_GXX=1 but no g++"
        );
        println!("skipped: no g++ for the CPU emulation of the CUDA kernels");
        return;
    }
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let work = std::env::temp_dir().join(format!("chorus-cuda-emu-{}", std::process::id()));
    let cases = work.join("cases");
    emu_cases::write_cases(&cases);
    let binary = work.join("emu");
    let build = std::process::Command::new("g++")
        .args([
            "-std=c++20",
            "-O2",
            "-ffp-contract=off",
            "-fno-strict-aliasing",
            "-pthread",
            "-o",
        ])
        .arg(&binary)
        .arg(here.join("cuda/emu/emu_main.cpp"))
        .output()
        .unwrap();
    assert!(
        build.status.success(),
        "g++ failed:\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let run = std::process::Command::new(&binary)
        .arg(&cases)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    let _ = std::fs::remove_dir_all(&work);
    assert!(run.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains(" 0 failed"), "{stdout}");
    println!("{stdout}");
}

#[test]
fn quantize_matches_golden_vectors_byte_for_byte() {
    let Some(gpu) = gpu() else { return };
    let cases = golden_cases();
    assert_eq!(cases.len(), 7);
    for case in cases {
        let name = case.name.as_str();
        let q = gpu
            .quantize(
                name,
                &case.input,
                case.rows,
                case.cols,
                &QuantizeOptions::default(),
            )
            .unwrap();
        assert_eq!(q.packed(), &case.packed[..], "{name}: packed");
        assert_eq!(q.scales(), &case.scales[..], "{name}: scales");
        assert_eq!(
            q.global_decode_scale(),
            case.global_decode_scale,
            "{name}: global scale"
        );
        let got = gpu.dequantize(&q).unwrap();
        assert_eq!(got.len(), case.dequantized.len());
        for (i, (g, w)) in got.iter().zip(&case.dequantized).enumerate() {
            assert_eq!(g, w, "{name}: dequantized[{i}]");
        }
    }
}

#[test]
fn quantize_and_dequantize_match_the_cpu_bit_for_bit() {
    let Some(gpu) = gpu() else { return };
    let shapes = [
        (1, 16),
        (3, 32),
        (17, 48),
        (33, 160),
        (16, 256),
        (100, 1024),
        (257, 96),
    ];
    let mut cases = 0;
    for (si, &(rows, cols)) in shapes.iter().enumerate() {
        for kind in 0..5 {
            for layout in [BlockLayout::Row1x16, BlockLayout::Tile16x16] {
                let data = test_tensor(rows, cols, kind, (si * 10 + kind) as u64);
                let options = QuantizeOptions {
                    layout,
                    rounding: Rounding::NearestEven,
                };
                let cpu = Nvfp4Tensor::quantize("t", &data, rows, cols, &options).unwrap();
                let got = gpu.quantize("t", &data, rows, cols, &options).unwrap();
                let what = format!("[{rows}, {cols}] kind {kind} {layout:?}");
                assert_eq!(got.scales(), cpu.scales(), "{what}: scales");
                assert_eq!(got.packed(), cpu.packed(), "{what}: packed");
                assert_eq!(
                    got.global_decode_scale().to_bits(),
                    cpu.global_decode_scale().to_bits(),
                    "{what}: global scale"
                );
                let deq = gpu.dequantize(&cpu).unwrap();
                let want = cpu.dequantize();
                for (i, (g, w)) in deq.iter().zip(&want).enumerate() {
                    assert_eq!(g.to_bits(), w.to_bits(), "{what}: dequantized[{i}]");
                }
                cases += 1;
            }
        }
    }
    // The zero tensor: global decode scale 1, zero scales and codes.
    let zero = gpu
        .quantize("z", &[0.0; 64], 2, 32, &QuantizeOptions::default())
        .unwrap();
    assert_eq!(zero.global_decode_scale(), 1.0);
    assert!(zero.scales().iter().all(|&s| s == 0));
    assert!(zero.packed().iter().all(|&b| b == 0));
    println!("{cases} tensors identical to the CPU quantizer");
}

#[test]
fn quantize_errors_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut data = test_tensor(4, 64, 0, 3);
    data[150] = f32::NAN;
    data[200] = f32::INFINITY;
    let options = QuantizeOptions::default();
    let cpu = Nvfp4Tensor::quantize("layers.1.w", &data, 4, 64, &options).unwrap_err();
    let got = gpu
        .quantize("layers.1.w", &data, 4, 64, &options)
        .unwrap_err();
    assert!(got.is_non_finite(), "{got}");
    assert_eq!(got.to_string(), cpu.to_string());

    let err = gpu
        .quantize("bad", &[0.0; 24], 2, 12, &options)
        .unwrap_err();
    assert!(err.is_shape() && err.to_string().contains("bad"), "{err}");

    let stochastic = QuantizeOptions {
        layout: BlockLayout::Row1x16,
        rounding: Rounding::Stochastic { seed: 1 },
    };
    let err = gpu
        .quantize("g", &[1.0; 32], 2, 16, &stochastic)
        .unwrap_err();
    assert!(
        err.is_cuda() && err.to_string().contains("stochastic"),
        "{err}"
    );
}

#[test]
fn gemm_matches_the_dequantized_product() {
    let Some(gpu) = gpu() else { return };
    let mut paths = vec![GemmPath::Gemv, GemmPath::Simt];
    if gpu.has_tensor_core_path() {
        paths.push(GemmPath::TensorCore);
    }
    // (m, k, n): single rows and columns, k not a multiple of the 32/64-wide k-steps, m and n
    // not multiples of the tiles, and several tiles in each direction.
    let shapes = [
        (1, 16, 1),
        (5, 32, 3),
        (37, 48, 8),
        (130, 80, 9),
        (257, 272, 130),
        (64, 1040, 17),
        (300, 4096, 8),
        (129, 512, 200),
    ];
    for (si, &(m, k, n)) in shapes.iter().enumerate() {
        let w = test_tensor(m, k, si % 3, 100 + si as u64);
        let w = Nvfp4Tensor::quantize("w", &w, m, k, &QuantizeOptions::default()).unwrap();
        let deq = w.dequantize();
        let dw = gpu.upload_weight(&w).unwrap();
        let x = test_tensor(n, k, 0, 200 + si as u64);
        let x_bf16: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let x_rounded: Vec<f32> = x_bf16.iter().map(|v| v.to_f32()).collect();
        let (want_f32, mag_f32) = reference(&deq, &x, m, k, n);
        let (want_bf16, mag_bf16) = reference(&deq, &x_rounded, m, k, n);

        // The CPU kernel agrees with the same reference (a sanity check of the reference).
        let mut cpu = vec![0.0f32; n * m];
        CpuGemm::new(2).nvfp4(&w, &x, n, &mut cpu).unwrap();

        let dx_f32 = gpu.upload_f32(&x, n, k).unwrap();
        let dx_bf16 = gpu.upload_bf16(&x_bf16, n, k).unwrap();
        for &path in &paths {
            for bf16_input in [false, true] {
                let mut y = vec![f32::NAN; n * m];
                let dx = if bf16_input { &dx_bf16 } else { &dx_f32 };
                gpu.gemm_host(&dw, dx, &mut y, path).unwrap();
                // The tensor-core path rounds f32 activations to bf16 before multiplying.
                let rounded = bf16_input || path == GemmPath::TensorCore;
                let (want, mag) = if rounded {
                    (&want_bf16, &mag_bf16)
                } else {
                    (&want_f32, &mag_f32)
                };
                for i in 0..n * m {
                    // f32 accumulation in any order: |error| <= ~k * 2^-24 * sum |w x|; the
                    // bound below is far tighter than any indexing mistake could meet.
                    let tol = 2e-5 * mag[i] + 1e-30;
                    let err = (y[i] as f64 - want[i]).abs();
                    assert!(
                        err <= tol,
                        "{path:?} bf16={bf16_input} [m={m}, k={k}, n={n}] y[{}, {}] = {} vs {} \
                         (tol {tol:e})",
                        i / m,
                        i % m,
                        y[i],
                        want[i]
                    );
                }
                if !rounded {
                    for i in 0..n * m {
                        assert!((y[i] - cpu[i]).abs() as f64 <= 4e-5 * mag_f32[i] + 1e-30);
                    }
                }
            }
        }
        // The host convenience calls pick a kernel themselves.
        let mut y = vec![0.0f32; n * m];
        gpu.gemm(&dw, &x, n, &mut y).unwrap();
        let mut y16 = vec![0.0f32; n * m];
        gpu.gemm_bf16(&dw, &x_bf16, n, &mut y16).unwrap();
        for i in 0..n * m {
            assert!((y16[i] as f64 - want_bf16[i]).abs() <= 2e-5 * mag_bf16[i] + 1e-30);
            let tol = 2e-5 * mag_f32[i] + 4e-3 * mag_f32[i] * (n > 8) as u8 as f64 + 1e-30;
            assert!((y[i] as f64 - want_f32[i]).abs() <= tol);
        }
    }
}

#[test]
fn gemm_picks_its_kernel_and_checks_shapes() {
    let Some(gpu) = gpu() else { return };
    let (m, k) = (48, 64);
    let w = test_tensor(m, k, 0, 1);
    let w = Nvfp4Tensor::quantize("w", &w, m, k, &QuantizeOptions::default()).unwrap();
    let dw = gpu.upload_weight(&w).unwrap();
    let large = if gpu.has_tensor_core_path() {
        GemmPath::TensorCore
    } else {
        GemmPath::Simt
    };
    for (n, want) in [(1, GemmPath::Gemv), (8, GemmPath::Gemv), (9, large)] {
        let x = gpu.upload_f32(&vec![1.0; n * k], n, k).unwrap();
        let mut y = gpu.alloc_output(n, m).unwrap();
        assert_eq!(
            gpu.gemm_device(&dw, &x, &mut y, GemmPath::Auto).unwrap(),
            want
        );
    }
    let x = gpu.upload_f32(&vec![1.0; 2 * 32], 2, 32).unwrap();
    let mut y = gpu.alloc_output(2, m).unwrap();
    let err = gpu
        .gemm_device(&dw, &x, &mut y, GemmPath::Auto)
        .unwrap_err();
    assert!(err.is_shape(), "{err}");
    let x = gpu.upload_f32(&vec![1.0; 2 * k], 2, k).unwrap();
    let mut y = gpu.alloc_output(3, m).unwrap();
    let err = gpu
        .gemm_device(&dw, &x, &mut y, GemmPath::Auto)
        .unwrap_err();
    assert!(err.is_shape(), "{err}");
}
