//! CUDA kernels for NVFP4 (feature `cuda`): quantize, dequantize and an NVFP4-weight GEMM.
//!
//! The kernel sources live in `kernels/cuda/*.cu` and are built into the binary with
//! `include_str!`; [`CudaNvfp4::new`] compiles them at run time with NVRTC for the device it
//! opens, so neither building nor running needs a CUDA toolkit: running needs the NVIDIA
//! driver (`libcuda`) and the NVRTC library (`libnvrtc.so` or `libnvrtc.so.12`), both
//! loaded dynamically. Without them every entry point returns [`KernelError::Cuda`] instead of
//! panicking.
//!
//! - [`CudaNvfp4::quantize`] / [`CudaNvfp4::dequantize`] are bit-identical to
//!   [`Nvfp4Tensor::quantize`] / [`Nvfp4Tensor::dequantize`] (TransformerEngine rule, 1x16 and
//!   16x16 block scales, nearest-even rounding; stochastic rounding stays on the CPU).
//! - [`CudaNvfp4::gemm`] computes `Y[n, m] = X[n, k] . W[m, k]^T` like
//!   [`CpuGemm::nvfp4`](crate::CpuGemm::nvfp4), with one of three kernels ([`GemmPath`]): a
//!   warp-per-row GEMV for `n <= 8`, a tensor-core kernel (BF16 `mma.sync`, weights
//!   dequantized to BF16 in shared memory in each k-step's prologue) for larger `n` on sm_80
//!   and newer (Hopper's path: it has no FP4 tensor cores), and a SIMT fallback for older
//!   GPUs. The Blackwell block-scaled FP4 MMA is not implemented (see `nvfp4_gemm.cu`).
//!
//! Status: these kernels compile (NVRTC to machine code for sm_75 up to sm_120, checked by
//! `tests/cuda.rs` wherever the NVRTC library is present) and match the CPU kernels under the
//! CPU emulation of CUDA in `kernels/cuda/emu/` (also run by `tests/cuda.rs`, where `g++`
//! exists), but have not yet run on a GPU. `cargo test -p chorus-kernels --features cuda` on
//! a machine with a GPU and driver runs the comparisons with the CPU kernels on the device.

use std::ffi::{CString, c_char};
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DriverError, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{Ptx, result as nvrtc_result, sys as nvrtc_sys};
use half::bf16;

use crate::error::KernelError;
use crate::quant::{BLOCK, BlockLayout, Nvfp4Tensor, QuantizeOptions, Rounding};

/// Device codecs shared by both modules; prepended to each source.
const COMMON_SRC: &str = include_str!("../../cuda/nvfp4_common.cuh");
/// Quantize and dequantize kernels.
const QUANT_SRC: &str = include_str!("../../cuda/nvfp4_quant.cu");
/// GEMV / tensor-core GEMM / SIMT GEMM kernels.
const GEMM_SRC: &str = include_str!("../../cuda/nvfp4_gemm.cu");

/// NVRTC options of the quantizer: IEEE division and no FMA contraction or flush-to-zero,
/// because its results must match the CPU bit for bit. (The source also spells its
/// arithmetic with `__fmul_rn` / `__fdiv_rn`; the flags make the intent hold everywhere.)
const QUANT_OPTIONS: &[&str] = &[
    "--ftz=false",
    "--prec-div=true",
    "--prec-sqrt=true",
    "--fmad=false",
];
/// NVRTC options of the GEMM: FMAs allowed (sums are compared with a tolerance).
const GEMM_OPTIONS: &[&str] = &["--fmad=true"];

/// The kernel sources: (name, source, NVRTC options).
const SOURCES: [(&str, &str, &[&str]); 2] = [
    ("nvfp4_quant.cu", QUANT_SRC, QUANT_OPTIONS),
    ("nvfp4_gemm.cu", GEMM_SRC, GEMM_OPTIONS),
];

/// Threads per block of the element-wise kernels and the amax reduction (`AMAX_THREADS`).
const THREADS: u32 = 256;
/// Activation rows the GEMV kernel handles in one launch (`GEMV_MAX_N`).
const GEMV_MAX_N: usize = 8;
/// Warps (weight rows) per GEMV block (`GEMV_WARPS`).
const GEMV_WARPS: u32 = 8;
/// Tile of the tensor-core kernel (`MMA_BM` x `MMA_BN`, `MMA_THREADS`).
const MMA_TILE: (u32, u32, u32) = (128, 128, 256);
/// Tile of the SIMT kernel (`SIMT_BM` x `SIMT_BN`, `SIMT_THREADS`).
const SIMT_TILE: (u32, u32, u32) = (64, 64, 256);
/// Largest grid `y` dimension CUDA allows.
const MAX_GRID_Y: u32 = 65_535;

/// Fails with a clear error unless the NVIDIA driver library can be loaded. Every CUDA call
/// goes through cudarc's dynamic loader, which panics on a missing library; this check
/// comes first so that a machine without a driver gets an error instead.
fn require_driver() -> Result<(), KernelError> {
    // SAFETY: only tries to `dlopen` the driver library under its usual names.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(KernelError::cuda(
            "no CUDA driver library found: could not load libcuda (the NVIDIA driver) from the \
             library search path; the CUDA kernels need an NVIDIA GPU with its driver installed",
        ))
    }
}

/// Like [`require_driver`], for the NVRTC library that compiles the kernels at run time.
fn require_nvrtc() -> Result<(), KernelError> {
    // SAFETY: only tries to `dlopen` the NVRTC library under its usual names.
    if unsafe { nvrtc_sys::is_culib_present() } {
        Ok(())
    } else {
        Err(KernelError::cuda(
            "no NVRTC library found: could not load libnvrtc.so or libnvrtc.so.12 (from a CUDA \
             12 toolkit or the nvidia-cuda-nvrtc-cu12 Python wheel, on the library search \
             path); it compiles the CUDA kernels at run time",
        ))
    }
}

/// Whether the NVRTC library can be loaded (so [`compile_check`] can run).
pub fn nvrtc_available() -> bool {
    require_nvrtc().is_ok()
}

/// Whether the NVIDIA driver library can be loaded (a GPU may still be missing).
pub fn driver_available() -> bool {
    require_driver().is_ok()
}

fn driver_error(what: &str) -> impl Fn(DriverError) -> KernelError + '_ {
    move |e| KernelError::cuda(format!("{what}: {e}"))
}

/// Number of CUDA devices the driver sees; an error when there is no driver library (or
/// the driver fails to initialise, as it does on a machine without a GPU).
pub fn device_count() -> Result<usize, KernelError> {
    require_driver()?;
    let count = CudaContext::device_count().map_err(driver_error("counting CUDA devices"))?;
    Ok(count.max(0) as usize)
}

/// NVRTC's version, `(major, minor)`.
pub fn nvrtc_version() -> Result<(i32, i32), KernelError> {
    require_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is loaded (checked above); the pointers are valid for the call.
    unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| KernelError::cuda(format!("nvrtcVersion: {e:?}")))?;
    Ok((major, minor))
}

/// The architectures this NVRTC can compile for, as `10 * major + minor` (e.g. 90).
pub fn nvrtc_architectures() -> Result<Vec<i32>, KernelError> {
    require_nvrtc()?;
    let mut count = 0;
    // SAFETY: NVRTC is loaded; `count` is valid for the call.
    unsafe { nvrtc_sys::nvrtcGetNumSupportedArchs(&mut count) }
        .result()
        .map_err(|e| KernelError::cuda(format!("nvrtcGetNumSupportedArchs: {e:?}")))?;
    let mut archs = vec![0i32; count.max(0) as usize];
    // SAFETY: `archs` holds the `count` entries NVRTC writes.
    unsafe { nvrtc_sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }
        .result()
        .map_err(|e| KernelError::cuda(format!("nvrtcGetSupportedArchs: {e:?}")))?;
    Ok(archs)
}

/// Text of a NUL-terminated buffer NVRTC filled.
fn c_text(buffer: &[c_char]) -> String {
    let bytes: Vec<u8> = buffer
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Compiles one kernel source for `arch` with NVRTC: machine code (CUBIN) for a real
/// architecture (`sm_90`), PTX for a virtual one (`compute_90`).
fn nvrtc_compile(
    name: &str,
    src: &str,
    options: &[&str],
    arch: &str,
) -> Result<Vec<u8>, KernelError> {
    require_nvrtc()?;
    let fail = |what: &str, detail: String| {
        KernelError::cuda(format!("NVRTC, {name} for {arch}: {what}: {detail}"))
    };
    let text =
        CString::new(format!("{COMMON_SRC}\n{src}")).map_err(|e| fail("source", e.to_string()))?;
    let c_name = CString::new(name).map_err(|e| fail("name", e.to_string()))?;
    let prog = nvrtc_result::create_program(&text, Some(&c_name))
        .map_err(|e| fail("create program", format!("{e:?}")))?;
    let mut opts: Vec<String> = vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()];
    opts.extend(options.iter().map(|o| o.to_string()));

    // SAFETY: `prog` was created above and is destroyed once, below; `text` and `c_name`
    // outlive it.
    let result = unsafe {
        match nvrtc_result::compile_program(prog, &opts) {
            Ok(()) if arch.starts_with("sm_") => {
                let mut size = 0usize;
                nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size)
                    .result()
                    .and_then(|()| {
                        let mut cubin = vec![0u8; size];
                        nvrtc_sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut c_char)
                            .result()
                            .map(|()| cubin)
                    })
                    .map_err(|e| fail("get CUBIN", format!("{e:?}")))
            }
            Ok(()) => nvrtc_result::get_ptx(prog)
                .map(|ptx| c_text(&ptx).into_bytes())
                .map_err(|e| fail("get PTX", format!("{e:?}"))),
            Err(e) => {
                let log = nvrtc_result::get_program_log(prog)
                    .map(|log| c_text(&log))
                    .unwrap_or_default();
                Err(fail("compile", format!("{e:?} (options {opts:?})\n{log}")))
            }
        }
    };
    // SAFETY: `prog` is live and not used again.
    let _ = unsafe { nvrtc_result::destroy_program(prog) };
    result
}

/// Compiles every kernel source for `arch` (`sm_90`: down to machine code, which also runs
/// NVIDIA's assembler over the inline PTX; `compute_90`: to PTX) and returns each source's
/// name and output size. Needs only the NVRTC library, no driver or GPU, so it checks the
/// sources on any machine that has NVRTC.
pub fn compile_check(arch: &str) -> Result<Vec<(&'static str, usize)>, KernelError> {
    SOURCES
        .iter()
        .map(|&(name, src, options)| {
            nvrtc_compile(name, src, options, arch).map(|out| (name, out.len()))
        })
        .collect()
}

/// Which GEMM kernel [`CudaNvfp4::gemm_device`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GemmPath {
    /// [`GemmPath::Gemv`] for `n <= 8`, else [`GemmPath::TensorCore`] on sm_80 and newer,
    /// else [`GemmPath::Simt`].
    #[default]
    Auto,
    /// A warp per weight row, all `n <= 8` activation rows at once (launched once per 8 rows
    /// for larger `n`).
    Gemv,
    /// Weights dequantized to BF16 in shared memory, BF16 `mma.sync` with f32 accumulation
    /// (sm_80+). f32 activations are rounded to BF16.
    TensorCore,
    /// Shared-memory tiles and f32 FMAs on the CUDA cores (any GPU).
    Simt,
}

/// The compiled kernels of one device.
#[derive(Debug)]
struct Kernels {
    amax: CudaFunction,
    quantize: CudaFunction,
    dequantize: CudaFunction,
    gemv_f32: CudaFunction,
    gemv_bf16: CudaFunction,
    mma_f32: CudaFunction,
    mma_bf16: CudaFunction,
    simt_f32: CudaFunction,
    simt_bf16: CudaFunction,
}

/// NVFP4 kernels on one CUDA device: a context, a stream and the compiled modules.
///
/// Work is queued on the instance's stream; the host-slice methods ([`CudaNvfp4::quantize`],
/// [`CudaNvfp4::dequantize`], [`CudaNvfp4::gemm`], ...) wait for their results, the
/// device-resident ones ([`CudaNvfp4::gemm_device`]) do not (see
/// [`CudaNvfp4::synchronize`]).
#[derive(Debug)]
pub struct CudaNvfp4 {
    stream: Arc<CudaStream>,
    kernels: Kernels,
    name: String,
    compute_capability: (i32, i32),
    arch: String,
}

/// An NVFP4 weight matrix `[rows, cols]` in device memory (see [`CudaNvfp4::upload_weight`]).
#[derive(Debug)]
pub struct CudaNvfp4Weight {
    rows: usize,
    cols: usize,
    packed: CudaSlice<u8>,
    scales: CudaSlice<u8>,
    global_decode_scale: f32,
}

impl CudaNvfp4Weight {
    /// Number of rows (`m` of the GEMM).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns (`k` of the GEMM).
    pub fn cols(&self) -> usize {
        self.cols
    }
}

#[derive(Debug)]
enum ActivationData {
    F32(CudaSlice<f32>),
    /// Raw bf16 bit patterns.
    Bf16(CudaSlice<u16>),
}

/// An activation matrix `[rows, cols]` (f32 or bf16) in device memory.
#[derive(Debug)]
pub struct CudaActivations {
    rows: usize,
    cols: usize,
    data: ActivationData,
}

impl CudaActivations {
    /// Number of rows (`n` of the GEMM).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns (`k` of the GEMM).
    pub fn cols(&self) -> usize {
        self.cols
    }
}

/// An f32 output matrix `[rows, cols]` in device memory.
#[derive(Debug)]
pub struct CudaOutput {
    rows: usize,
    cols: usize,
    data: CudaSlice<f32>,
}

impl CudaOutput {
    /// Number of rows (`n` of the GEMM).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns (`m` of the GEMM).
    pub fn cols(&self) -> usize {
        self.cols
    }
}

/// Grid of `ceil(items / per_block)` blocks, failing past what one launch can address.
fn blocks_for(items: usize, per_block: usize, what: &str) -> Result<u32, KernelError> {
    u32::try_from(items.div_ceil(per_block))
        .ok()
        .filter(|&b| b <= i32::MAX as u32)
        .ok_or_else(|| {
            KernelError::cuda(format!("{what}: {items} items is too many for one launch"))
        })
}

/// `value` as the kernels' `unsigned int`, failing when it does not fit (the kernels index
/// rows and columns with 32 bits, and offsets with 64).
fn dim(value: usize, tensor: &str, what: &str) -> Result<u32, KernelError> {
    u32::try_from(value)
        .ok()
        .filter(|&v| v < (1 << 31))
        .ok_or_else(|| KernelError::shape(tensor, format!("{what} = {value} exceeds 2^31 - 1")))
}

impl CudaNvfp4 {
    /// Opens CUDA device `device_ordinal` and compiles the kernels for it with NVRTC.
    ///
    /// Fails with [`KernelError::Cuda`] (never a panic) when the driver or NVRTC library is
    /// missing, the device does not exist, or the kernels do not compile or load.
    pub fn new(device_ordinal: usize) -> Result<Self, KernelError> {
        require_driver()?;
        require_nvrtc()?;
        let ctx = CudaContext::new(device_ordinal).map_err(driver_error(&format!(
            "opening CUDA device {device_ordinal}"
        )))?;
        let name = ctx.name().map_err(driver_error("device name"))?;
        let compute_capability = ctx
            .compute_capability()
            .map_err(driver_error("compute capability"))?;
        let stream = ctx.default_stream();

        // Machine code for the device's own architecture when this NVRTC knows it (no PTX
        // JIT, and no dependence on the driver accepting this NVRTC's PTX version);
        // otherwise PTX for the newest architecture NVRTC knows below it, which the driver
        // compiles for the device.
        let device_arch = compute_capability.0 * 10 + compute_capability.1;
        let archs = nvrtc_architectures()?;
        let arch = if archs.contains(&device_arch) {
            format!("sm_{device_arch}")
        } else if let Some(best) = archs.iter().copied().filter(|&a| a <= device_arch).max() {
            format!("compute_{best}")
        } else {
            let (major, minor) = nvrtc_version()?;
            return Err(KernelError::cuda(format!(
                "NVRTC {major}.{minor} cannot compile for {name} (sm_{device_arch}); it supports \
                 {archs:?}"
            )));
        };

        let mut modules = Vec::with_capacity(SOURCES.len());
        for &(source, src, options) in &SOURCES {
            let image = nvrtc_compile(source, src, options, &arch)?;
            let ptx = if arch.starts_with("sm_") {
                Ptx::from_binary(image)
            } else {
                Ptx::from_src(String::from_utf8_lossy(&image).into_owned())
            };
            let module = ctx.load_module(ptx).map_err(driver_error(&format!(
                "loading {source} ({arch}) on {name}"
            )))?;
            modules.push(module);
        }
        let function = |module: usize, kernel: &str| {
            modules[module]
                .load_function(kernel)
                .map_err(driver_error(&format!("kernel {kernel}")))
        };
        let kernels = Kernels {
            amax: function(0, "nvfp4_amax")?,
            quantize: function(0, "nvfp4_quantize")?,
            dequantize: function(0, "nvfp4_dequantize")?,
            gemv_f32: function(1, "nvfp4_gemv_f32")?,
            gemv_bf16: function(1, "nvfp4_gemv_bf16")?,
            mma_f32: function(1, "nvfp4_gemm_mma_f32")?,
            mma_bf16: function(1, "nvfp4_gemm_mma_bf16")?,
            simt_f32: function(1, "nvfp4_gemm_simt_f32")?,
            simt_bf16: function(1, "nvfp4_gemm_simt_bf16")?,
        };
        Ok(CudaNvfp4 {
            stream,
            kernels,
            name,
            compute_capability,
            arch,
        })
    }

    /// The device's name (e.g. "NVIDIA H200").
    pub fn device_name(&self) -> &str {
        &self.name
    }

    /// The device's compute capability, `(major, minor)`.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// The NVRTC target the kernels were compiled for (`sm_90`, or `compute_NN` when the
    /// driver compiles PTX for a device newer than NVRTC).
    pub fn compiled_arch(&self) -> &str {
        &self.arch
    }

    /// Whether the tensor-core GEMM can run here (sm_80 and newer).
    pub fn has_tensor_core_path(&self) -> bool {
        self.compute_capability.0 >= 8
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<(), KernelError> {
        self.stream
            .synchronize()
            .map_err(driver_error("synchronize"))
    }

    /// Quantizes a row-major `[rows, cols]` f32 tensor on the GPU; the result is
    /// bit-identical to [`Nvfp4Tensor::quantize`] with the same options. Stochastic rounding
    /// is not available here (it returns [`KernelError::Cuda`]); non-finite input is an error
    /// naming the tensor and the first bad element, as on the CPU.
    pub fn quantize(
        &self,
        name: &str,
        data: &[f32],
        rows: usize,
        cols: usize,
        options: &QuantizeOptions,
    ) -> Result<Nvfp4Tensor, KernelError> {
        if let Rounding::Stochastic { .. } = options.rounding {
            return Err(KernelError::cuda(format!(
                "tensor `{name}`: stochastic rounding is not implemented in the CUDA quantizer \
                 (use Nvfp4Tensor::quantize)"
            )));
        }
        if !cols.is_multiple_of(BLOCK) {
            return Err(KernelError::shape(
                name,
                format!("shape [{rows}, {cols}]: the last dimension must be a multiple of {BLOCK}"),
            ));
        }
        let len = rows
            .checked_mul(cols)
            .ok_or_else(|| KernelError::shape(name, format!("shape [{rows}, {cols}] overflows")))?;
        if data.len() != len {
            return Err(KernelError::shape(
                name,
                format!(
                    "shape [{rows}, {cols}] needs {len} elements, got {}",
                    data.len()
                ),
            ));
        }
        let rows32 = dim(rows, name, "rows")?;
        let cols32 = dim(cols, name, "cols")?;
        if len == 0 {
            // As on the CPU: amax 0, so the global decode scale is 1.
            return Nvfp4Tensor::from_parts(name, rows, cols, Vec::new(), Vec::new(), 1.0);
        }
        let tile_rows: u32 = match options.layout {
            BlockLayout::Row1x16 => 1,
            BlockLayout::Tile16x16 => BLOCK as u32,
        };
        let err = |what: &'static str| driver_error(what);
        let s = &self.stream;

        let x = s.clone_htod(data).map_err(err("upload"))?;
        let mut amax_bits = s.clone_htod(&[0u32][..]).map_err(err("upload"))?;
        let mut first_bad = s.clone_htod(&[u64::MAX][..]).map_err(err("upload"))?;
        let mut packed = s.alloc_zeros::<u8>(len / 2).map_err(err("alloc"))?;
        let mut scales = s.alloc_zeros::<u8>(len / BLOCK).map_err(err("alloc"))?;
        let mut decode_scale = s.alloc_zeros::<f32>(1).map_err(err("alloc"))?;

        // The reduction needs no more blocks than it takes to keep the GPU busy; each thread
        // strides over the rest.
        let amax_blocks = blocks_for(len, THREADS as usize, name)?.min(4096);
        let len64 = len as u64;
        let mut launch = s.launch_builder(&self.kernels.amax);
        launch
            .arg(&x)
            .arg(&len64)
            .arg(&mut amax_bits)
            .arg(&mut first_bad);
        // SAFETY: the arguments match `nvfp4_amax(const float*, unsigned long long,
        // unsigned int*, unsigned long long*)` and the buffers hold `len`, 1 and 1 elements.
        unsafe {
            launch.launch(LaunchConfig {
                grid_dim: (amax_blocks, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(err("launch nvfp4_amax"))?;

        let groups = (rows / tile_rows as usize
            + usize::from(!rows.is_multiple_of(tile_rows as usize)))
            * (cols / BLOCK);
        let mut launch = s.launch_builder(&self.kernels.quantize);
        launch
            .arg(&x)
            .arg(&rows32)
            .arg(&cols32)
            .arg(&tile_rows)
            .arg(&amax_bits)
            .arg(&mut packed)
            .arg(&mut scales)
            .arg(&mut decode_scale);
        // SAFETY: the arguments match `nvfp4_quantize(const float*, unsigned int,
        // unsigned int, unsigned int, const unsigned int*, unsigned char*, unsigned char*,
        // float*)`; `packed` holds len/2 bytes, `scales` len/16, and the grid covers exactly
        // the `groups` scale groups (the kernel ignores threads past them).
        unsafe {
            launch.launch(LaunchConfig {
                grid_dim: (blocks_for(groups, THREADS as usize, name)?, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(err("launch nvfp4_quantize"))?;

        let first_bad = s.clone_dtoh(&first_bad).map_err(err("download"))?[0];
        let packed = s.clone_dtoh(&packed).map_err(err("download"))?;
        let scales = s.clone_dtoh(&scales).map_err(err("download"))?;
        let decode_scale = s.clone_dtoh(&decode_scale).map_err(err("download"))?[0];
        s.synchronize().map_err(err("nvfp4_quantize"))?;

        if first_bad != u64::MAX {
            let i = first_bad as usize;
            return Err(KernelError::NonFinite {
                tensor: name.to_string(),
                row: i / cols,
                col: i % cols,
                value: data[i],
            });
        }
        Nvfp4Tensor::from_parts(name, rows, cols, packed, scales, decode_scale)
    }

    /// Dequantizes on the GPU; bit-identical to [`Nvfp4Tensor::dequantize`].
    pub fn dequantize(&self, tensor: &Nvfp4Tensor) -> Result<Vec<f32>, KernelError> {
        let len = tensor.rows() * tensor.cols();
        if len == 0 {
            return Ok(Vec::new());
        }
        let err = |what: &'static str| driver_error(what);
        let s = &self.stream;
        let packed = s.clone_htod(tensor.packed()).map_err(err("upload"))?;
        let scales = s.clone_htod(tensor.scales()).map_err(err("upload"))?;
        let mut out = s.alloc_zeros::<f32>(len).map_err(err("alloc"))?;
        let groups = (len / BLOCK) as u64;
        let decode_scale = tensor.global_decode_scale();
        let mut launch = s.launch_builder(&self.kernels.dequantize);
        launch
            .arg(&packed)
            .arg(&scales)
            .arg(&decode_scale)
            .arg(&groups)
            .arg(&mut out);
        // SAFETY: the arguments match `nvfp4_dequantize(const unsigned char*, const unsigned
        // char*, float, unsigned long long, float*)`; the buffers hold groups * 8, groups and
        // groups * 16 elements.
        unsafe {
            launch.launch(LaunchConfig {
                grid_dim: (
                    blocks_for(len / BLOCK, THREADS as usize, "dequantize")?,
                    1,
                    1,
                ),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(err("launch nvfp4_dequantize"))?;
        let host = s.clone_dtoh(&out).map_err(err("download"))?;
        s.synchronize().map_err(err("nvfp4_dequantize"))?;
        Ok(host)
    }

    /// Copies an NVFP4 weight matrix to the device.
    pub fn upload_weight(&self, weight: &Nvfp4Tensor) -> Result<CudaNvfp4Weight, KernelError> {
        let err = |what: &'static str| driver_error(what);
        Ok(CudaNvfp4Weight {
            rows: weight.rows(),
            cols: weight.cols(),
            packed: self
                .upload_bytes(weight.packed())
                .map_err(err("upload weight"))?,
            scales: self
                .upload_bytes(weight.scales())
                .map_err(err("upload weight"))?,
            global_decode_scale: weight.global_decode_scale(),
        })
    }

    /// `clone_htod`, allowing empty buffers (a 1-byte allocation stands in).
    fn upload_bytes(&self, bytes: &[u8]) -> Result<CudaSlice<u8>, DriverError> {
        if bytes.is_empty() {
            self.stream.alloc_zeros::<u8>(1)
        } else {
            self.stream.clone_htod(bytes)
        }
    }

    /// Copies a row-major `[rows, cols]` f32 activation matrix to the device.
    pub fn upload_f32(
        &self,
        x: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<CudaActivations, KernelError> {
        check_len("x", x.len(), rows, cols)?;
        let data = if x.is_empty() {
            self.stream.alloc_zeros::<f32>(1)
        } else {
            self.stream.clone_htod(x)
        }
        .map_err(driver_error("upload activations"))?;
        Ok(CudaActivations {
            rows,
            cols,
            data: ActivationData::F32(data),
        })
    }

    /// Copies a row-major `[rows, cols]` bf16 activation matrix to the device.
    pub fn upload_bf16(
        &self,
        x: &[bf16],
        rows: usize,
        cols: usize,
    ) -> Result<CudaActivations, KernelError> {
        check_len("x", x.len(), rows, cols)?;
        let bits: Vec<u16> = x.iter().map(|v| v.to_bits()).collect();
        let data = if bits.is_empty() {
            self.stream.alloc_zeros::<u16>(1)
        } else {
            self.stream.clone_htod(&bits)
        }
        .map_err(driver_error("upload activations"))?;
        Ok(CudaActivations {
            rows,
            cols,
            data: ActivationData::Bf16(data),
        })
    }

    /// Allocates a zeroed `[rows, cols]` f32 output matrix on the device.
    pub fn alloc_output(&self, rows: usize, cols: usize) -> Result<CudaOutput, KernelError> {
        let len = rows
            .checked_mul(cols)
            .ok_or_else(|| KernelError::shape("y", format!("shape [{rows}, {cols}] overflows")))?;
        let data = self
            .stream
            .alloc_zeros::<f32>(len.max(1))
            .map_err(driver_error("alloc output"))?;
        Ok(CudaOutput { rows, cols, data })
    }

    /// Copies an output matrix back to the host (waits for the queued work).
    pub fn download(&self, y: &CudaOutput) -> Result<Vec<f32>, KernelError> {
        let mut host = self
            .stream
            .clone_dtoh(&y.data)
            .map_err(driver_error("download output"))?;
        self.synchronize()?;
        host.truncate(y.rows * y.cols);
        Ok(host)
    }

    /// Queues `Y[n, m] = X[n, k] . W[m, k]^T` on the device without waiting, and returns the
    /// kernel it chose. `y` must be `[n, m]` for `w` `[m, k]` and `x` `[n, k]`.
    pub fn gemm_device(
        &self,
        w: &CudaNvfp4Weight,
        x: &CudaActivations,
        y: &mut CudaOutput,
        path: GemmPath,
    ) -> Result<GemmPath, KernelError> {
        let (m, k, n) = (w.rows, w.cols, x.rows);
        if x.cols != k {
            return Err(KernelError::shape(
                "x",
                format!(
                    "activations [{n}, {}] do not match weights [{m}, {k}]",
                    x.cols
                ),
            ));
        }
        if y.rows != n || y.cols != m {
            return Err(KernelError::shape(
                "y",
                format!("output is [{}, {}], expected [{n}, {m}]", y.rows, y.cols),
            ));
        }
        let path = match path {
            GemmPath::Auto if n <= GEMV_MAX_N => GemmPath::Gemv,
            GemmPath::Auto if self.has_tensor_core_path() => GemmPath::TensorCore,
            GemmPath::Auto => GemmPath::Simt,
            GemmPath::TensorCore if !self.has_tensor_core_path() => {
                return Err(KernelError::cuda(format!(
                    "the tensor-core GEMM needs sm_80 or newer; {} is sm_{}{}",
                    self.name, self.compute_capability.0, self.compute_capability.1
                )));
            }
            other => other,
        };
        if m == 0 || n == 0 {
            return Ok(path);
        }
        if k == 0 {
            self.stream
                .memset_zeros(&mut y.data)
                .map_err(driver_error("zero output"))?;
            return Ok(path);
        }
        let m32 = dim(m, "w", "rows")?;
        let k32 = dim(k, "w", "cols")?;
        dim(n, "x", "rows")?;
        let scale = w.global_decode_scale;

        match path {
            GemmPath::Gemv => {
                let function = match x.data {
                    ActivationData::F32(_) => &self.kernels.gemv_f32,
                    ActivationData::Bf16(_) => &self.kernels.gemv_bf16,
                };
                let config = LaunchConfig {
                    grid_dim: (blocks_for(m, GEMV_WARPS as usize, "gemv")?, 1, 1),
                    block_dim: (GEMV_WARPS * 32, 1, 1),
                    shared_mem_bytes: 0,
                };
                // One launch per 8 activation rows: offset views of X and Y.
                for row0 in (0..n).step_by(GEMV_MAX_N) {
                    let rows = (n - row0).min(GEMV_MAX_N) as u32;
                    let mut y_view = y.data.slice_mut(row0 * m..(row0 + rows as usize) * m);
                    let (x_f32, x_bf16) = match &x.data {
                        ActivationData::F32(data) => (Some(data.slice(row0 * k..)), None),
                        ActivationData::Bf16(data) => (None, Some(data.slice(row0 * k..))),
                    };
                    let mut launch = self.stream.launch_builder(function);
                    launch.arg(&w.packed).arg(&w.scales).arg(&scale);
                    if let Some(view) = &x_f32 {
                        launch.arg(view);
                    }
                    if let Some(view) = &x_bf16 {
                        launch.arg(view);
                    }
                    launch.arg(&mut y_view).arg(&m32).arg(&k32).arg(&rows);
                    // SAFETY: the arguments match `nvfp4_gemv_*(const unsigned char*, const
                    // unsigned char*, float, const X*, float*, unsigned int m, unsigned int k,
                    // unsigned int n)`; W holds m*k/2 code bytes and m*k/16 scales, the X view
                    // holds `rows` rows of k from row0 on, the Y view `rows` rows of m.
                    unsafe { launch.launch(config) }.map_err(driver_error("launch nvfp4_gemv"))?;
                }
            }
            GemmPath::TensorCore | GemmPath::Simt => {
                let (bm, bn, threads) = if path == GemmPath::TensorCore {
                    MMA_TILE
                } else {
                    SIMT_TILE
                };
                let grid_y = blocks_for(n, bn as usize, "gemm")?;
                if grid_y > MAX_GRID_Y {
                    return Err(KernelError::shape(
                        "x",
                        format!("n = {n} needs {grid_y} row tiles; at most {MAX_GRID_Y}"),
                    ));
                }
                let function = match (&x.data, path) {
                    (ActivationData::F32(_), GemmPath::TensorCore) => &self.kernels.mma_f32,
                    (ActivationData::Bf16(_), GemmPath::TensorCore) => &self.kernels.mma_bf16,
                    (ActivationData::F32(_), _) => &self.kernels.simt_f32,
                    (ActivationData::Bf16(_), _) => &self.kernels.simt_bf16,
                };
                let n32 = n as u32;
                let mut launch = self.stream.launch_builder(function);
                launch.arg(&w.packed).arg(&w.scales).arg(&scale);
                match &x.data {
                    ActivationData::F32(data) => launch.arg(data),
                    ActivationData::Bf16(data) => launch.arg(data),
                };
                launch.arg(&mut y.data).arg(&m32).arg(&k32).arg(&n32);
                // SAFETY: the arguments match `nvfp4_gemm_{mma,simt}_*(const unsigned char*,
                // const unsigned char*, float, const X*, float*, unsigned int m, unsigned int
                // k, unsigned int n)`; the buffers hold W [m, k], X [n, k] and Y [n, m], and
                // the kernels bounds-check every row and column of their tiles.
                unsafe {
                    launch.launch(LaunchConfig {
                        grid_dim: (blocks_for(m, bm as usize, "gemm")?, grid_y, 1),
                        block_dim: (threads, 1, 1),
                        shared_mem_bytes: 0,
                    })
                }
                .map_err(driver_error("launch nvfp4_gemm"))?;
            }
            GemmPath::Auto => unreachable!("resolved above"),
        }
        Ok(path)
    }

    /// `Y[n, m] = X[n, k] . W^T` with f32 activations, host in and out (like
    /// [`CpuGemm::nvfp4`](crate::CpuGemm::nvfp4)), on the kernel [`GemmPath::Auto`] picks.
    pub fn gemm(
        &self,
        w: &CudaNvfp4Weight,
        x: &[f32],
        n: usize,
        y: &mut [f32],
    ) -> Result<(), KernelError> {
        let x = self.upload_f32(x, n, w.cols)?;
        self.gemm_host(w, &x, y, GemmPath::Auto)
    }

    /// As [`CudaNvfp4::gemm`], with bf16 activations.
    pub fn gemm_bf16(
        &self,
        w: &CudaNvfp4Weight,
        x: &[bf16],
        n: usize,
        y: &mut [f32],
    ) -> Result<(), KernelError> {
        let x = self.upload_bf16(x, n, w.cols)?;
        self.gemm_host(w, &x, y, GemmPath::Auto)
    }

    /// Runs the GEMM on device-resident activations with a chosen kernel and copies the
    /// result into `y` (`[n, m]`).
    pub fn gemm_host(
        &self,
        w: &CudaNvfp4Weight,
        x: &CudaActivations,
        y: &mut [f32],
        path: GemmPath,
    ) -> Result<(), KernelError> {
        check_len("y", y.len(), x.rows, w.rows)?;
        let mut out = self.alloc_output(x.rows, w.rows)?;
        self.gemm_device(w, x, &mut out, path)?;
        y.copy_from_slice(&self.download(&out)?);
        Ok(())
    }
}

fn check_len(tensor: &str, len: usize, rows: usize, cols: usize) -> Result<(), KernelError> {
    if rows.checked_mul(cols) == Some(len) {
        Ok(())
    } else {
        Err(KernelError::shape(
            tensor,
            format!("shape [{rows}, {cols}] does not match {len} elements"),
        ))
    }
}
