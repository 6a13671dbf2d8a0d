//! The tiled f32 GEMM for dense f32 projections at 1 to a few hundred activation rows: f32
//! weights repacked once into panels of 16 output rows ([`F32Panels`]), multiplied by a
//! register-tiled micro-kernel in the GotoBLAS style.
//!
//! A dot-product kernel (a weight row and an activation row in the lanes of two vectors) has
//! to reduce its 16 lane sums horizontally at the end, and reads a weight vector for every
//! activation row it multiplies. Here the 16 lanes of a vector are 16 output rows instead:
//! one aligned load brings column `c` of a panel's 16 rows (one cache line, since the packing
//! interleaves them), a broadcast brings `x[r, c]`, and one FMA advances 16 outputs of row
//! `r` by one step of their sums. A register tile of 2 panels x 12 rows (24 accumulators)
//! uses each loaded weight vector 12 times and each broadcast twice; nothing is reduced and
//! each output is stored once, in place, row-major.
//!
//! The activations are repacked per call into tiles of up to 12 rows, `[c][row]` within a
//! tile, so that the micro-kernel reads one sequential stream for all its rows (12 rows of a
//! 4 KiB stride would all fall into one L1 set). A single row is used in place.
//!
//! One parallel dispatch per call, over chunks of panels (outputs); every thread runs all
//! rows of its chunks: for each group of panels, for each activation tile, the whole reduction
//! axis. The group's weights (`k * 128` bytes for a pair) stay in L2 while the tiles reuse
//! them. Calls below [`SERIAL_FMAS`] multiply-adds run on the caller's thread.
//!
//! The micro-kernels: AVX-512F on [`Backend::Avx512`] (2 panels x up to 12 rows, or 4 panels
//! x up to 4 rows for the small batches, where two panels would leave each FMA chain waiting
//! on the previous step); AVX2 + FMA on [`Backend::Avx2Fma`] (a panel as two 8-lane halves,
//! 1 panel x up to 6 rows in 16 registers, 2 panels for 1 or 2 rows); and a portable one with
//! `f32::mul_add` everywhere else.
//!
//! Every output is one sequential chain of fused multiply-adds over the reduction axis in
//! order, `y[r, o] = fma(w[o, k-1], x[r, k-1], ... fma(w[o, 0], x[r, 0], 0.0))`: the same bits
//! whatever the CPU, the kernel, the thread count or the other rows in the call (NaN payloads
//! aside).

mod avx2;
mod avx512;

use rayon::prelude::*;

use crate::error::KernelError;
use crate::gemm::{Backend, OutPtr, build_then_run};

/// Output rows per panel: the 16 f32 lanes of a zmm register (two ymm halves).
const PANEL: usize = 16;
/// Most panels one micro-kernel call covers (the AVX-512 small-batch kernel's).
const MAX_PANELS: usize = 4;
/// Below this many multiply-adds per call (`n * m * k`) the call stays on the caller's
/// thread: starting pool tasks costs some microseconds. Low, because a one-row call is bound by
/// memory, not by FMAs: at 1 << 17 the small-d512 model's experts and latent projections ran on
/// one core and its f32 batch-1 decoding was about 10% slower (generation bench, alternating
/// runs on a 2-core Xeon).
const SERIAL_FMAS: usize = 1 << 13;

/// Column `c` of a panel's 16 output rows: one cache line.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C, align(64))]
struct Line([f32; PANEL]);

/// f32 weights (row-major `[m, k]`, the HF layout) repacked for
/// [`CpuGemm::f32_panels`](crate::CpuGemm::f32_panels): output rows in panels of 16, each
/// panel's `k` columns in order, column `c` of a panel holding its 16 rows' weights
/// contiguously (one 64-byte aligned cache line): element `(p * k + c) * 16 + o` is
/// `w[p * 16 + o, c]`. The last panel is padded with zero rows; an odd number of panels is
/// fine (the kernels have 1-panel variants), so no panel is added beyond that.
///
/// Build it once per weight (at load time): packing reads the whole tensor. It takes the
/// bytes of the weights, plus the padding of the last panel.
///
/// ```
/// use chorus_kernels::{CpuGemm, F32Panels};
/// let (m, k, n) = (20, 64, 3);
/// let w: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 - 6.0).collect();
/// let panels = F32Panels::pack(&w, m, k)?;
/// assert_eq!((panels.rows(), panels.cols()), (m, k));
/// assert_eq!(panels.unpack(), w);
/// let x: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.1).sin()).collect();
/// let mut y = vec![0.0; n * m];
/// CpuGemm::new(2).f32_panels(&panels, &x, n, &mut y)?;
/// let want: f32 = (0..k).fold(0.0, |acc, c| w[c].mul_add(x[c], acc));
/// assert_eq!(y[0], want);
/// # Ok::<(), chorus_kernels::KernelError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct F32Panels {
    rows: usize,
    cols: usize,
    /// `rows.div_ceil(16)` panels of `cols` lines, panel-major.
    lines: Vec<Line>,
}

impl F32Panels {
    /// Packs the row-major `[m, k]` weights `w`. Fails (naming `w`) if `m` or `k` is zero,
    /// or `w` does not hold `m * k` elements.
    pub fn pack(w: &[f32], m: usize, k: usize) -> Result<Self, KernelError> {
        if m == 0 || k == 0 {
            return Err(KernelError::shape(
                "w",
                format!("shape [{m}, {k}]: rows and columns must be positive"),
            ));
        }
        let need = super::elements("w", m, k)?;
        if w.len() != need {
            return Err(KernelError::shape(
                "w",
                format!("shape [{m}, {k}] needs {need} elements, got {}", w.len()),
            ));
        }
        let panels = m.div_ceil(PANEL);
        // A worker packs every dense weight of a new policy version before it can sample from
        // it, so this is on the path of weight sync: each line is written once (no zeroing
        // pass first), from the 16 rows' cache lines read together (16 consecutive columns of
        // each row per line read), one panel per task over the pool.
        let mut lines: Vec<Line> = Vec::with_capacity(panels * k);
        lines.spare_capacity_mut()[..panels * k]
            .par_chunks_mut(k)
            .enumerate()
            .for_each(|(p, panel)| {
                let rows = &w[p * PANEL * k..((p + 1) * PANEL).min(m) * k];
                for (c, line) in panel.iter_mut().enumerate() {
                    let mut v = [0.0; PANEL];
                    for (lane, row) in v.iter_mut().zip(rows.chunks_exact(k)) {
                        *lane = row[c];
                    }
                    line.write(Line(v));
                }
            });
        // SAFETY: the loop above wrote every one of the panels * k lines (the chunks cover
        // them all, and each chunk's loop every element of it).
        unsafe { lines.set_len(panels * k) };
        Ok(F32Panels {
            rows: m,
            cols: k,
            lines,
        })
    }

    /// Rows (outputs) of the weights, `m`.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (the reduction axis) of the weights, `k`.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of the packed weights (padding included).
    pub fn bytes(&self) -> usize {
        std::mem::size_of_val(self.lines.as_slice())
    }

    /// The weights back in row-major `[m, k]` order, exactly as packed.
    pub fn unpack(&self) -> Vec<f32> {
        let (m, k) = (self.rows, self.cols);
        let mut w = vec![0.0; m * k];
        for (o, row) in w.chunks_exact_mut(k).enumerate() {
            let (p, lane) = (o / PANEL, o % PANEL);
            for (v, line) in row.iter_mut().zip(&self.lines[p * k..(p + 1) * k]) {
                *v = line.0[lane];
            }
        }
        w
    }

    fn panels(&self) -> usize {
        self.rows.div_ceil(PANEL)
    }
}

/// One micro-kernel call: `panels` consecutive panels against the `rows` rows of an
/// activation tile, over the whole reduction axis.
struct TileArgs {
    /// The first panel's first column; panel `p`'s is `wstride` floats further.
    w: *const f32,
    wstride: usize,
    /// The tile: for each of the `k` columns, its rows' values (`rows` floats).
    x: *const f32,
    k: usize,
    /// The output of the tile's first row and the first panel's first row; row stride `ys`.
    y: *mut f32,
    ys: usize,
    /// Which of each panel's 16 outputs exist (bit `o` for row `p * 16 + o`).
    masks: [u16; MAX_PANELS],
}

/// Which micro-kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Portable,
    Avx2,
    Avx512,
}

impl Kernel {
    /// The kernel for `backend` (each backend's check covers its kernel's features).
    fn for_backend(backend: Backend) -> Kernel {
        match backend {
            Backend::Avx512 => Kernel::Avx512,
            Backend::Avx2Fma => Kernel::Avx2,
            Backend::Portable => Kernel::Portable,
        }
    }

    /// Whether this CPU runs the kernel.
    fn available(self) -> bool {
        match self {
            Kernel::Portable => true,
            Kernel::Avx2 => avx2::available(),
            Kernel::Avx512 => avx512::available(),
        }
    }

    /// Activation rows per tile: the most one call multiplies.
    fn tile_rows(self) -> usize {
        match self {
            Kernel::Avx2 => avx2::MAX_ROWS,
            Kernel::Avx512 | Kernel::Portable => avx512::MAX_ROWS,
        }
    }

    /// Panels per group, for a call of `n` activation rows.
    fn group(self, n: usize) -> usize {
        match self {
            Kernel::Avx512 => avx512::group(n),
            Kernel::Avx2 => avx2::group(n),
            Kernel::Portable => 2,
        }
    }

    /// Runs one call.
    ///
    /// # Safety
    ///
    /// `a` must describe `panels` panels (at most `self.group(n)` of the call) and a tile of
    /// `rows` rows (at most `self.tile_rows()`) that exist, and outputs (`masks` of each of
    /// the `rows` rows) this thread alone may write.
    unsafe fn tile(self, panels: usize, rows: usize, a: &TileArgs) {
        assert!((1..=MAX_PANELS).contains(&panels) && (1..=self.tile_rows()).contains(&rows));
        // SAFETY: forwarded contract.
        unsafe {
            match self {
                Kernel::Portable => portable(panels, rows, a),
                Kernel::Avx2 => avx2::tile(panels, rows, a),
                Kernel::Avx512 => avx512::tile(panels, rows, a),
            }
        }
    }
}

/// Whether `backend` runs a SIMD micro-kernel here.
pub(in crate::gemm) fn is_fast(backend: Backend) -> bool {
    let kernel = Kernel::for_backend(backend);
    kernel != Kernel::Portable && kernel.available()
}

/// `y = x . W^T` (`x` row-major `[n, w.cols()]`, `y` `[n, w.rows()]`), the operands already
/// checked.
pub(in crate::gemm) fn run(
    threads: usize,
    backend: Backend,
    w: &F32Panels,
    x: &[f32],
    n: usize,
    y: &mut [f32],
) {
    run_kernel(Kernel::for_backend(backend), threads, w, x, n, y);
}

/// Largest repacked activations (floats, 16 MiB) kept for the next call on the same thread.
const KEEP_FLOATS: usize = 4 << 20;

thread_local! {
    /// The tile buffer of the last call on this thread: a decode step makes hundreds of calls.
    static SPARE: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The repacked activations, shared by the threads of a call: each writes the tiles it
/// claims, then all read every tile once all are written.
#[derive(Clone, Copy)]
struct TilesPtr(*mut f32);

// SAFETY: threads write disjoint tiles (each claims its own), and read them only after all
// are written (`build_then_run` orders the builds before the items that read them).
unsafe impl Send for TilesPtr {}
unsafe impl Sync for TilesPtr {}

impl TilesPtr {
    /// The float `offset` floats into the tiles (a method, so that closures capture the
    /// `Sync` wrapper rather than its pointer field).
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// Writes tile `t` of `x` (`[n, k]`, tiles of `tile_rows` rows) into `dst`, `[c][row]`.
fn build_tile(x: &[f32], n: usize, k: usize, tile_rows: usize, t: usize, dst: &mut [f32]) {
    let r0 = t * tile_rows;
    let rows = tile_rows.min(n - r0);
    let src = &x[r0 * k..(r0 + rows) * k];
    // A cache line of each row at a time: the rows are read as whole lines, the writes stay
    // within a few lines.
    for c0 in (0..k).step_by(PANEL) {
        let c1 = (c0 + PANEL).min(k);
        for (i, row) in src.chunks_exact(k).enumerate() {
            for (c, &v) in row[c0..c1].iter().enumerate() {
                dst[(c0 + c) * rows + i] = v;
            }
        }
    }
}

/// `y = x . W^T` with `kernel`: one parallel dispatch whose threads first build the
/// activation tiles they claim, then run chunks of panel groups against every tile.
fn run_kernel(kernel: Kernel, threads: usize, w: &F32Panels, x: &[f32], n: usize, y: &mut [f32]) {
    let (m, k) = (w.rows, w.cols);
    assert!(kernel.available() && x.len() == n * k && y.len() == n * m);
    if n == 0 {
        return;
    }
    let tile_rows = kernel.tile_rows();
    let ntiles = n.div_ceil(tile_rows);
    // A single row is its own tile; otherwise tile t starts at t * tile_rows * k.
    let mut store = if n > 1 {
        // Taken, not borrowed: a call nested in this one (a pool task run while this thread
        // waits for its own) finds none and allocates.
        let mut v = SPARE.take();
        v.resize(n * k, 0.0);
        v
    } else {
        Vec::new()
    };
    let tiles = TilesPtr(if n > 1 {
        store.as_mut_ptr()
    } else {
        x.as_ptr().cast_mut()
    });
    let group = kernel.group(n);
    let groups = w.panels().div_ceil(group);
    let work = n.saturating_mul(m).saturating_mul(k);
    let threads = if work < SERIAL_FMAS { 1 } else { threads };
    // About 4 chunks of groups per thread, so that a slow thread delays the call by a
    // fraction of its share at most.
    let chunk = groups.div_ceil(threads * 4).max(1);
    let chunks = groups.div_ceil(chunk);
    let out = OutPtr(y.as_mut_ptr());
    // A single row is used in place: nothing to build.
    let build_tiles = if n > 1 { ntiles } else { 0 };
    build_then_run::<()>(
        threads,
        build_tiles,
        chunks,
        &|t, _| {
            let len = tile_rows.min(n - t * tile_rows) * k;
            // SAFETY: tile t lies inside the n * k floats of the store, and this thread alone
            // claimed it.
            let dst = unsafe { std::slice::from_raw_parts_mut(tiles.at(t * tile_rows * k), len) };
            build_tile(x, n, k, tile_rows, t, dst);
        },
        &|item| {
            for g in item * chunk..((item + 1) * chunk).min(groups) {
                run_group(kernel, w, tiles, n, g * group, group, out);
            }
        },
    );
    if n > 1 && store.capacity() <= KEEP_FLOATS {
        SPARE.set(store);
    }
}

/// Runs the panels `p0..p0 + group` that exist against every tile (all built), writing
/// their columns of the output at `out` (`[n, w.rows()]`).
fn run_group(
    kernel: Kernel,
    w: &F32Panels,
    tiles: TilesPtr,
    n: usize,
    p0: usize,
    group: usize,
    out: OutPtr,
) {
    let (m, k) = (w.rows, w.cols);
    let tile_rows = kernel.tile_rows();
    let mut p = p0;
    let end = (p0 + group).min(w.panels());
    while p < end {
        // The widest call that fits what is left of the group: with 2 or 4 panels per group,
        // a last group of 1 to 3 panels runs as calls of 2 and 1.
        let panels = [4, 2, 1]
            .into_iter()
            .find(|&c| c <= group && c <= end - p)
            .unwrap();
        let masks = std::array::from_fn(|i| {
            let valid = m.saturating_sub((p + i) * PANEL).min(PANEL);
            ((1u32 << valid) - 1) as u16
        });
        for t in 0..n.div_ceil(tile_rows) {
            let r0 = t * tile_rows;
            let rows = tile_rows.min(n - r0);
            let args = TileArgs {
                w: w.lines[p * k..].as_ptr().cast(),
                wstride: k * PANEL,
                x: tiles.0.wrapping_add(r0 * k).cast_const(),
                k,
                // SAFETY: row r0 < n and column p * 16 < m, so this is inside `y`.
                y: unsafe { out.get().add(r0 * m + p * PANEL) },
                ys: m,
                masks,
            };
            // SAFETY: the panels p..p + panels exist (p + panels <= end), the tile of `rows`
            // rows is built, and this thread owns these panels' columns of every row (each
            // group goes to one thread).
            unsafe { kernel.tile(panels, rows, &args) };
        }
        p += panels;
    }
}

/// The portable micro-kernel: the SIMD kernels' arithmetic with `f32::mul_add` (a fused
/// multiply-add on every target), so it gives the same bits.
///
/// # Safety
///
/// As for [`Kernel::tile`].
unsafe fn portable(panels: usize, rows: usize, a: &TileArgs) {
    for p in 0..panels {
        let mut acc = vec![[0.0f32; PANEL]; rows];
        for c in 0..a.k {
            // SAFETY: panel p has k lines from `a.w + p * wstride`, and the tile `rows`
            // values per column, per the contract.
            let (wc, xc) = unsafe {
                (
                    &*a.w.add(p * a.wstride + c * PANEL).cast::<[f32; PANEL]>(),
                    std::slice::from_raw_parts(a.x.add(c * rows), rows),
                )
            };
            for (acc, &xv) in acc.iter_mut().zip(xc) {
                for (acc, &wv) in acc.iter_mut().zip(wc) {
                    *acc = wv.mul_add(xv, *acc);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            for (o, &v) in acc.iter().enumerate() {
                if a.masks[p] >> o & 1 == 1 {
                    // SAFETY: output (i, o) of panel p (i < rows, o in the mask) is this
                    // thread's to write, per the contract.
                    unsafe { *a.y.add(i * a.ys + p * PANEL + o) = v };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
