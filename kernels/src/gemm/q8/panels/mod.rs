//! The tiled int8-activation GEMM: NVFP4 weights repacked once into panels of 16 output rows
//! ([`Nvfp4Q8Panels`]), multiplied with [`Q8Activations`] by a register-tiled micro-kernel.
//!
//! The row-at-a-time kernels of the parent module put one weight row's block in the lanes of
//! a vector, so every block sum has to be gathered horizontally across lanes before its
//! scales apply; and they read all the weights again for every 8 activation rows. Here the
//! 16 lanes of a vector are 16 output rows instead: after the nibble lookup, 4 vectors hold a
//! block of 16 rows, 4 columns per lane, and `vpdpbusd` against a broadcast dword of one
//! activation row (4 of its stored int8 values) adds 4 products to each of the 16 rows' block
//! sums. Four of them finish the block for 16 outputs, with nothing to reduce: the block's
//! scales then apply lane-wise, one conversion and two f32 operations per 16 outputs: 256
//! multiply-accumulates per 7 arithmetic instructions, plus the lookups, shared by a tile of 8
//! activation rows. The activations are repacked per call (quantized on the way when they come
//! as f32) so that a tile's values for a block are adjacent: one pointer, fixed offsets.
//!
//! One parallel dispatch per call. Its threads first claim and build the activation tiles,
//! then take work items: a chunk of panel pairs against a pass of 16 tiles (128 rows), in
//! slices of 256 blocks (4096 columns), so that a pair's slice of weights is reused by the
//! tiles of the pass from cache and the pass's slice of activations by the pairs of the chunk
//! from L2. The weights are read from memory once per 128 activation rows (the row kernels read
//! them once per 8).
//!
//! The micro-kernels: AVX-512 ones (F and BW, with VNNI and VBMI where they exist) on
//! [`Backend::Avx512`]; AVX2 ones (AVX2, FMA and F16C, with AVX-VNNI where it exists: Haswell
//! and later, Zen) on [`Backend::Avx2Fma`] and on AVX-512 CPUs without BW, which run a panel
//! as two halves of 8 lanes (`vpmaddubsw` + `vpmaddwd`, or `vpdpbusd` on ymm) against groups of
//! 4 activation rows, to fit 16 registers; and a portable one everywhere else, many times
//! slower. All form the same exact block sums and then run the same f32 operations.
//!
//! Every output is computed as
//! `y = fl(fl(... fma(d_1, s_1, fma(d_0, s_0, 0)) ...) * (global / 2))`, blocks in order, with
//! `d_b` the block's exact integer dot product (as `f32`, exact) and `s_b = fl(w_scale_b *
//! x_scale_b)`: the same bits whatever the CPU, the thread count, or the other rows in the
//! call.

mod avx2;
mod avx512;

use std::ops::Range;

use half::f16;

use super::avx512::Variant;
use super::{GROUP, Q8Activations, ROW_ALIGN, group_base};
use crate::gemm::{Backend, OutPtr, build_then_run};
use crate::quant::{BLOCK, Nvfp4Tensor};
use crate::scalar::{e2m1_decode, e4m3_decode};

/// Output rows per panel: the 16 i32 (or f32) lanes of a zmm register.
const PANEL: usize = 16;
/// Panels per micro-kernel call (a last odd panel runs alone).
const PANELS: usize = 2;
/// Activation rows per micro-kernel call, and per tile of the repacked activations.
const TILE_ROWS: usize = 8;
/// Bytes of one block of one activation tile: `TILE_ROWS` rows of 16 int8 values, then their
/// `TILE_ROWS` f32 scales, then their `TILE_ROWS` negated i32 offsets.
const TILE_BLOCK: usize = TILE_ROWS * (BLOCK + 8);
/// Byte offset of the scales in a tile block.
const TILE_SCALES: usize = TILE_ROWS * BLOCK;
/// Byte offset of the negated offsets in a tile block.
const TILE_OFFSETS: usize = TILE_ROWS * (BLOCK + 4);

/// `2 * e2m1(code)` for the 16 codes: the portable kernel's signed integer weights.
const TWICE: [i32; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// The nibbles of one 16-column block of one panel: two aligned cache lines.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C, align(64))]
struct PanelBlock {
    /// Bytes 4o..4o + 4: packed bytes 0..4 of the block of the panel's output row `o`
    /// (columns 0..8, low nibble the even column), so that dword lane `o` holds row `o`.
    head: [u8; 64],
    /// Likewise packed bytes 4..8 (columns 8..16).
    tail: [u8; 64],
}

/// The 16 block scales of one block of one panel, as f16 bits: every E4M3 value is exact in
/// f16 (3 mantissa bits, exponents -9..=8), and one conversion instruction widens them to f32,
/// in half the bytes of f32.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C, align(32))]
struct PanelScales([u16; 16]);

impl PanelScales {
    /// The scale of row `o` as f32.
    fn get(&self, o: usize) -> f32 {
        f16::from_bits(self.0[o]).to_f32()
    }
}

impl PanelBlock {
    const ZERO: PanelBlock = PanelBlock {
        head: [0; 64],
        tail: [0; 64],
    };

    /// The E2M1 code of row `o`, column `c` (both below 16).
    fn code(&self, o: usize, c: usize) -> u8 {
        let t = c / 2;
        let byte = if t < 4 {
            self.head[4 * o + t]
        } else {
            self.tail[4 * o + t - 4]
        };
        if c.is_multiple_of(2) {
            byte & 0x0f
        } else {
            byte >> 4
        }
    }
}

/// NVFP4 weights repacked for [`CpuGemm::nvfp4_q8_panels`](crate::CpuGemm::nvfp4_q8_panels):
/// output rows in panels of 16 (the last one padded with zero rows), each panel's blocks in
/// order, and per panel and 16-column block the 16 rows' packed nibbles arranged so that one
/// vector lookup decodes 4 columns of each of the 16 rows into the 16 lanes of a register,
/// plus the 16 block scales as f16 (exact for every E4M3 value).
///
/// Build it once per weight (at load time): packing reads the whole tensor. It takes 160
/// bytes per 16 rows and 16 columns, 10/9 of the [`Nvfp4Tensor`]'s 144 (the scales are stored
/// as f16, which the kernel widens with one instruction), plus the padding of the last panel.
///
/// ```
/// use chorus_kernels::{CpuGemm, Nvfp4Q8Panels, Nvfp4Tensor, QuantizeOptions};
/// let (m, k, n) = (20, 64, 3);
/// let w: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 - 6.0).collect();
/// let w = Nvfp4Tensor::quantize("w", &w, m, k, &QuantizeOptions::default())?;
/// let panels = Nvfp4Q8Panels::pack(&w);
/// assert_eq!((panels.rows(), panels.cols()), (m, k));
/// assert_eq!(panels.dequantize(), w.dequantize());
/// let x: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.1).sin()).collect();
/// let mut y = vec![0.0; n * m];
/// CpuGemm::new(2).nvfp4_q8_panels(&panels, &x, n, &mut y)?;
/// # Ok::<(), chorus_kernels::KernelError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Nvfp4Q8Panels {
    rows: usize,
    cols: usize,
    /// `rows.div_ceil(16)` panels of `cols / 16` blocks, panel-major.
    blocks: Vec<PanelBlock>,
    /// Their scales, laid out alike.
    scales: Vec<PanelScales>,
    global_decode_scale: f32,
}

impl Nvfp4Q8Panels {
    /// Repacks `w` (any shape; its invariants make every shape valid).
    pub fn pack(w: &Nvfp4Tensor) -> Self {
        let (rows, cols) = (w.rows(), w.cols());
        let nb = cols / BLOCK;
        let mut blocks = vec![PanelBlock::ZERO; rows.div_ceil(PANEL) * nb];
        let mut scales = vec![PanelScales([0; 16]); blocks.len()];
        for r in 0..rows {
            let (p, o) = (r / PANEL, r % PANEL);
            let packed = &w.packed()[r * cols / 2..(r + 1) * cols / 2];
            let src_scales = &w.scales()[r * nb..(r + 1) * nb];
            let dst = blocks[p * nb..(p + 1) * nb]
                .iter_mut()
                .zip(&mut scales[p * nb..(p + 1) * nb]);
            for ((d, ds), (src, &s)) in dst.zip(packed.chunks_exact(8).zip(src_scales)) {
                d.head[4 * o..4 * o + 4].copy_from_slice(&src[..4]);
                d.tail[4 * o..4 * o + 4].copy_from_slice(&src[4..]);
                let h = f16::from_f32(e4m3_decode(s));
                debug_assert_eq!(h.to_f32().to_bits(), e4m3_decode(s).to_bits());
                ds.0[o] = h.to_bits();
            }
        }
        Nvfp4Q8Panels {
            rows,
            cols,
            blocks,
            scales,
            global_decode_scale: w.global_decode_scale(),
        }
    }

    /// Number of rows (output features, `m`).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns (input features, `k`, a multiple of 16).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of the packed panels (nibbles and scales, padding included).
    pub fn bytes(&self) -> usize {
        std::mem::size_of_val(self.blocks.as_slice())
            + std::mem::size_of_val(self.scales.as_slice())
    }

    /// The tensor's FP32 global decode scale.
    pub fn global_decode_scale(&self) -> f32 {
        self.global_decode_scale
    }

    /// The E2M1 code of element `(row, col)`.
    pub fn code(&self, row: usize, col: usize) -> u8 {
        assert!(
            row < self.rows && col < self.cols,
            "({row}, {col}) out of range"
        );
        self.block(row, col / BLOCK).code(row % PANEL, col % BLOCK)
    }

    /// The decoded block scale (without the global scale) of block `block` of row `row`.
    pub fn scale(&self, row: usize, block: usize) -> f32 {
        assert!(
            row < self.rows && block < self.cols / BLOCK,
            "({row}, {block}) out of range"
        );
        self.scales[self.index(row, block)].get(row % PANEL)
    }

    /// Dequantizes to a row-major `[rows, cols]` f32 tensor, with the same arithmetic as
    /// [`Nvfp4Tensor::dequantize`] (so the same bits).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            for c in 0..self.cols {
                let s = self.scale(r, c / BLOCK) * self.global_decode_scale;
                out.push(e2m1_decode(self.code(r, c)) * s);
            }
        }
        out
    }

    fn panels(&self) -> usize {
        self.rows.div_ceil(PANEL)
    }

    /// Index of the panel block holding block `block` of row `row`.
    fn index(&self, row: usize, block: usize) -> usize {
        row / PANEL * (self.cols / BLOCK) + block
    }

    fn block(&self, row: usize, block: usize) -> &PanelBlock {
        &self.blocks[self.index(row, block)]
    }
}

/// The activations of a call.
#[derive(Clone, Copy)]
pub(in crate::gemm) enum Source<'a> {
    /// Already quantized.
    Quantized(&'a Q8Activations),
    /// Row-major `[n, k]` f32 rows (`k` a multiple of 16, every element finite), quantized
    /// tile by tile with the functions [`Q8Activations::quantize`] uses, so to the same bits.
    F32 { x: &'a [f32], n: usize, k: usize },
}

impl Source<'_> {
    fn rows(&self) -> usize {
        match self {
            Source::Quantized(x) => x.rows(),
            Source::F32 { n, .. } => *n,
        }
    }

    fn cols(&self) -> usize {
        match self {
            Source::Quantized(x) => x.cols(),
            Source::F32 { k, .. } => *k,
        }
    }
}

/// Activations repacked for the micro-kernel: tiles of `TILE_ROWS` rows, each tile's blocks in
/// order, each block `TILE_BLOCK` bytes: the tile's rows' 16 stored values (the block's evens,
/// then its odds, as [`Q8Activations`] orders them), then their scales, then their negated
/// offsets. A kernel call then follows one pointer through the tile, at fixed offsets. The
/// kernels read it in 4-byte units, hence `u32` words. The rows missing from a last partial
/// tile hold whatever the buffer held: no kernel reads them.
struct Tiles {
    words: Vec<u32>,
}

/// `TILE_BLOCK` in words.
const TILE_WORDS: usize = TILE_BLOCK / 4;

/// Largest repacked activations (in words, 32 MiB) kept for the next call on the same thread.
const KEEP_WORDS: usize = 8 << 20;

thread_local! {
    /// The buffer of the last call on this thread: a new one of some megabytes costs more in
    /// page faults than filling it.
    static SPARE: std::cell::Cell<Vec<u32>> = const { std::cell::Cell::new(Vec::new()) };
}

impl Tiles {
    /// Room for `tiles` tiles of `blocks` blocks.
    fn new(tiles: usize, blocks: usize) -> Self {
        // Taken, not borrowed: a call nested in this one (a pool task run while this thread
        // waits for its own) finds none and allocates.
        let mut words = SPARE.take();
        words.resize(tiles * blocks * TILE_WORDS, 0);
        Tiles { words }
    }

    /// Keeps the buffer for the next call on this thread, if it is not too large.
    fn recycle(self) {
        if self.words.capacity() <= KEEP_WORDS {
            SPARE.set(self.words);
        }
    }
}

/// The tiles' words, shared by the threads of a call: each writes the tiles it claims, then
/// all read every tile once all are written.
#[derive(Clone, Copy)]
struct TilesPtr {
    words: *mut u32,
    blocks: usize,
}

// SAFETY: threads write disjoint tiles (each claims its own), and read them only after all
// are written (`build_then_run` orders the builds before the items that read them).
unsafe impl Send for TilesPtr {}
unsafe impl Sync for TilesPtr {}

impl TilesPtr {
    /// Pointer to block `b` of tile `t` (in bounds for the tiles `Tiles::new` made room for).
    fn at(self, t: usize, b: usize) -> *const u8 {
        self.words
            .wrapping_add((t * self.blocks + b) * TILE_WORDS)
            .cast_const()
            .cast()
    }

    /// Tile `t`'s words.
    ///
    /// # Safety
    ///
    /// The tile must exist, and no other thread may touch it while the slice lives.
    unsafe fn tile_mut<'a>(self, t: usize) -> &'a mut [u32] {
        let len = self.blocks * TILE_WORDS;
        // SAFETY: per the contract.
        unsafe { std::slice::from_raw_parts_mut(self.words.add(t * len), len) }
    }
}

/// One thread's buffers for quantizing a tile's f32 rows: `TILE_ROWS` rows as
/// [`Q8Activations`] stores them.
struct Scratch {
    qs: Vec<i8>,
    scales: Vec<f32>,
    offsets: Vec<i32>,
}

/// Fills tile `t` (`dst`) from `src`: quantizes its rows first if they are f32.
fn build_tile(src: Source<'_>, t: usize, dst: &mut [u32], scratch: &mut Option<Scratch>) {
    let rows = t * TILE_ROWS..src.rows().min((t + 1) * TILE_ROWS);
    let k = src.cols();
    let blocks = k / BLOCK;
    // The tile's rows in the layout of `Q8Activations`: values, scales, offsets, row stride.
    let (qs, scales, offsets, stride): (&[i8], &[f32], &[i32], usize) = match src {
        Source::Quantized(x) => {
            let ss = x.stride / BLOCK;
            (
                &x.qs[rows.start * x.stride..rows.end * x.stride],
                &x.scales[rows.start * ss..rows.end * ss],
                &x.offsets[rows.start * ss..rows.end * ss],
                x.stride,
            )
        }
        Source::F32 { x, .. } => {
            let stride = k.div_ceil(ROW_ALIGN) * ROW_ALIGN;
            let ss = stride / BLOCK;
            let sc = scratch.get_or_insert_with(|| Scratch {
                qs: vec![0; TILE_ROWS * stride],
                scales: vec![0.0; TILE_ROWS * ss],
                offsets: vec![0; TILE_ROWS * ss],
            });
            let simd = crate::gemm::avx2::available();
            for (i, r) in rows.clone().enumerate() {
                let row = &x[r * k..(r + 1) * k];
                let qs = &mut sc.qs[i * stride..(i + 1) * stride];
                let scales = &mut sc.scales[i * ss..(i + 1) * ss];
                let offsets = &mut sc.offsets[i * ss..(i + 1) * ss];
                // As `Q8Activations::requantize` chooses, so that the bits are the same.
                if simd {
                    super::avx2::quantize_row(row, qs, scales, offsets);
                } else {
                    super::quantize_row(row, qs, scales, offsets);
                }
            }
            let used = rows.len();
            (
                &sc.qs[..used * stride],
                &sc.scales[..used * ss],
                &sc.offsets[..used * ss],
                stride,
            )
        }
    };
    // SAFETY: i8 and u8 have the same size and alignment, and every bit pattern is valid.
    let qs: &[u8] = unsafe { std::slice::from_raw_parts(qs.as_ptr().cast(), qs.len()) };
    let word = |at: usize| u32::from_ne_bytes(qs[at..at + 4].try_into().unwrap());
    let ss = stride / BLOCK;
    // Block by block, so that the writes are sequential.
    for (b, dst) in dst.chunks_exact_mut(TILE_WORDS).take(blocks).enumerate() {
        let even = group_base(b);
        let odd = even + GROUP * BLOCK / 2;
        for i in 0..rows.len() {
            let row = i * stride;
            dst[4 * i] = word(row + even);
            dst[4 * i + 1] = word(row + even + 4);
            dst[4 * i + 2] = word(row + odd);
            dst[4 * i + 3] = word(row + odd + 4);
            dst[TILE_SCALES / 4 + i] = scales[i * ss + b].to_bits();
            dst[TILE_OFFSETS / 4 + i] = offsets[i * ss + b].wrapping_neg() as u32;
        }
    }
}

/// One micro-kernel call: `panels` (1 or 2) consecutive panels against `rows` (1 to
/// `TILE_ROWS`) rows of an activation tile, over a range of blocks.
struct TileArgs {
    /// The first panel's first block of the range, and its scales; the second panel's are
    /// `wstride` further.
    w: *const PanelBlock,
    ws: *const PanelScales,
    wstride: usize,
    /// The tile's first block of the range.
    x: *const u8,
    blocks: usize,
    /// The output of the tile's first row and the first panel's first row; row stride `ys`.
    y: *mut f32,
    ys: usize,
    /// Which of each panel's 16 outputs exist.
    masks: [u16; PANELS],
    /// Whether the accumulators start from zero (the range starts at block 0) instead of
    /// from the partial sums in `y`.
    first: bool,
    /// Whether the range ends at the last block: the sums are then multiplied by
    /// `half_global` before they are stored.
    last: bool,
    half_global: f32,
}

/// Which micro-kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Portable,
    Avx2(avx2::Variant),
    Avx512(Variant),
}

impl Kernel {
    /// The kernel for `backend`: the AVX-512 ones need AVX-512 BW besides the backend's F,
    /// the AVX2 ones (for [`Backend::Avx2Fma`], and for [`Backend::Avx512`] without BW) F16C
    /// besides the backend's AVX2 and FMA; every other case runs the portable kernel.
    fn for_backend(backend: Backend) -> Kernel {
        let avx2 = || avx2::Variant::detect().map_or(Kernel::Portable, Kernel::Avx2);
        match backend {
            Backend::Avx512 => Variant::detect().map_or_else(avx2, Kernel::Avx512),
            Backend::Avx2Fma => avx2(),
            Backend::Portable => Kernel::Portable,
        }
    }

    /// Runs one call.
    ///
    /// # Safety
    ///
    /// `a` must describe `panels` panels and `rows` tile rows that exist, a block range inside
    /// both, and outputs (`masks` of each of the `rows` rows) this thread alone may read and
    /// write.
    unsafe fn tile(self, panels: usize, rows: usize, a: &TileArgs) {
        assert!((1..=PANELS).contains(&panels) && (1..=TILE_ROWS).contains(&rows));
        // SAFETY: forwarded contract.
        unsafe {
            match self {
                Kernel::Portable => portable(panels, rows, a),
                Kernel::Avx2(variant) => avx2::tile(variant, panels, rows, a),
                Kernel::Avx512(variant) => avx512::tile(variant, panels, rows, a),
            }
        }
    }
}

/// Whether `backend` runs a SIMD micro-kernel here.
pub(in crate::gemm) fn is_fast(backend: Backend) -> bool {
    Kernel::for_backend(backend) != Kernel::Portable
}

/// `y = x . W^T` (`y` row-major `[x.rows(), w.rows()]`), the operands already checked.
pub(in crate::gemm) fn run(
    threads: usize,
    backend: Backend,
    w: &Nvfp4Q8Panels,
    x: Source<'_>,
    y: &mut [f32],
) {
    run_kernel(Kernel::for_backend(backend), threads, w, x, y);
}

/// Blocks per slice of the reduction axis: a pair's slice of weights (80 KiB) is reused by all
/// the tiles of a pass from L1 and L2.
const SLICE_BLOCKS: usize = 256;
/// Activation tiles per pass: the pass's slice of activations (768 KiB) is reused by every
/// panel pair of a chunk from L2.
const PASS_TILES: usize = 16;

fn run_kernel(kernel: Kernel, threads: usize, w: &Nvfp4Q8Panels, src: Source<'_>, y: &mut [f32]) {
    let (n, m, blocks) = (src.rows(), w.rows(), w.cols() / BLOCK);
    assert!(src.cols() == w.cols() && y.len() == n * m);
    if let Source::F32 { x, .. } = src {
        assert!(x.len() == n * w.cols());
    }
    if n == 0 || m == 0 {
        return;
    }
    if blocks == 0 {
        y.fill(0.0);
        return;
    }
    let ntiles = n.div_ceil(TILE_ROWS);
    let mut tiles = Tiles::new(ntiles, blocks);
    let tp = TilesPtr {
        words: tiles.words.as_mut_ptr(),
        blocks,
    };
    let passes = ntiles.div_ceil(PASS_TILES);
    let pairs = w.panels().div_ceil(PANELS);
    // About 4 chunks of pairs per thread (fewer with several passes), so that a slow thread
    // delays the call by a fraction of its share at most.
    let chunk = pairs.div_ceil(threads.div_ceil(passes) * 4).max(1);
    let chunks = pairs.div_ceil(chunk);
    // Work items: (pass, chunk), pass-major, so that the threads share a pass of activations.
    let items = passes * chunks;
    let out = OutPtr(y.as_mut_ptr());
    let half_global = w.global_decode_scale * 0.5;
    build_then_run::<Option<Scratch>>(
        threads,
        ntiles,
        items,
        // SAFETY: tile t exists and this thread alone claimed it.
        &|t, scratch| build_tile(src, t, unsafe { tp.tile_mut(t) }, scratch),
        &|item| {
            let (pass, c) = (item / chunks, item % chunks);
            let pass_tiles = pass * PASS_TILES..((pass + 1) * PASS_TILES).min(ntiles);
            let chunk_pairs = c * chunk..((c + 1) * chunk).min(pairs);
            for b0 in (0..blocks).step_by(SLICE_BLOCKS) {
                let range = b0..(b0 + SLICE_BLOCKS).min(blocks);
                for pair in chunk_pairs.clone() {
                    for t in pass_tiles.clone() {
                        let job = Job {
                            pair,
                            tile: t,
                            range: range.clone(),
                        };
                        run_tile(kernel, w, tp, &job, n, out, half_global);
                    }
                }
            }
        },
    );
    tiles.recycle();
}

/// One micro-kernel call of the driver: a panel pair against a tile over a range of blocks.
struct Job {
    pair: usize,
    tile: usize,
    range: Range<usize>,
}

/// Runs `job` (the tiles built), writing its part of the output at `out` (`[n, w.rows()]`).
fn run_tile(
    kernel: Kernel,
    w: &Nvfp4Q8Panels,
    tiles: TilesPtr,
    job: &Job,
    n: usize,
    out: OutPtr,
    half_global: f32,
) {
    let (pair, t, range) = (job.pair, job.tile, job.range.clone());
    let (m, blocks) = (w.rows, w.cols / BLOCK);
    let p0 = pair * PANELS;
    let panels = PANELS.min(w.panels() - p0);
    let rows = TILE_ROWS.min(n - t * TILE_ROWS);
    let masks = std::array::from_fn(|p| {
        let valid = m.saturating_sub((p0 + p) * PANEL).min(PANEL);
        ((1u32 << valid) - 1) as u16
    });
    let args = TileArgs {
        w: w.blocks[p0 * blocks + range.start..].as_ptr(),
        ws: w.scales[p0 * blocks + range.start..].as_ptr(),
        wstride: blocks,
        x: tiles.at(t, range.start),
        blocks: range.len(),
        // SAFETY: row t * TILE_ROWS < n and column p0 * 16 < m, so this is inside `y`.
        y: unsafe { out.get().add(t * TILE_ROWS * m + p0 * PANEL) },
        ys: m,
        masks,
        first: range.start == 0,
        last: range.end == blocks,
        half_global,
    };
    // SAFETY: the panels, rows and blocks exist (computed above) and the tile is built; this
    // thread owns the pair's columns of the pass's rows (each work item goes to one thread).
    unsafe { kernel.tile(panels, rows, &args) };
}

/// The portable micro-kernel, with the SIMD kernels' arithmetic (`f32::mul_add` is a fused
/// multiply-add on every target), so it gives the same bits.
///
/// # Safety
///
/// As for [`Kernel::tile`].
unsafe fn portable(panels: usize, rows: usize, a: &TileArgs) {
    let hits = |p: usize| (0..PANEL).filter(move |o| a.masks[p] >> o & 1 == 1);
    for p in 0..panels {
        let y = |i: usize, o: usize| a.y.wrapping_add(i * a.ys + p * PANEL + o);
        let mut acc = [[0.0f32; PANEL]; TILE_ROWS];
        if !a.first {
            for (i, acc) in acc.iter_mut().enumerate().take(rows) {
                for o in hits(p) {
                    // SAFETY: output (i, o) of panel p (i < rows, o in the mask) is this
                    // thread's to read, per the contract.
                    acc[o] = unsafe { *y(i, o) };
                }
            }
        }
        for b in 0..a.blocks {
            // SAFETY: panel p and block b of the range exist per the contract, and block b of
            // the tile holds TILE_BLOCK bytes.
            let (wb, ws, xb) = unsafe {
                (
                    &*a.w.add(p * a.wstride + b),
                    &*a.ws.add(p * a.wstride + b),
                    std::slice::from_raw_parts(a.x.add(b * TILE_BLOCK), TILE_BLOCK),
                )
            };
            // The weights in the order of the stored values: value j is column 2j of the
            // block (j < 8), or column 2(j - 8) + 1.
            let w: [[i32; BLOCK]; PANEL] = std::array::from_fn(|o| {
                std::array::from_fn(|j| {
                    let c = if j < 8 { 2 * j } else { 2 * (j - 8) + 1 };
                    TWICE[wb.code(o, c) as usize]
                })
            });
            for (i, acc) in acc.iter_mut().enumerate().take(rows) {
                let q = &xb[i * BLOCK..(i + 1) * BLOCK];
                let xs = f32::from_ne_bytes(xb[TILE_SCALES + 4 * i..][..4].try_into().unwrap());
                for (o, acc) in acc.iter_mut().enumerate() {
                    let dot: i32 = w[o].iter().zip(q).map(|(&w, &v)| w * v as i8 as i32).sum();
                    *acc = (dot as f32).mul_add(ws.get(o) * xs, *acc);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate().take(rows) {
            for o in hits(p) {
                let v = if a.last {
                    acc[o] * a.half_global
                } else {
                    acc[o]
                };
                // SAFETY: likewise to write.
                unsafe { *y(i, o) = v };
            }
        }
    }
}

#[cfg(test)]
mod tests;
