//! AVX-512F micro-kernels of the f32 panel GEMM: per column `c`, one aligned load per panel
//! (its 16 rows' weights, one cache line), one `vbroadcastss` per activation row, and one
//! `vfmadd231ps` per panel and row into that row's accumulator of the panel's 16 outputs.
//!
//! Up to 12 rows with 2 panels (24 accumulators, 2 weight registers and a broadcast in the 32
//! zmm registers), or, for calls of 1 to 4 rows, 4 panels: there are then only 2 to 8
//! accumulators per panel pair, each FMA waits for the previous one of its chain (4 cycles),
//! and more panels give the core more independent chains to overlap.
//!
//! Each panel's stream is prefetched 16 lines ahead: measured on a 2-core Xeon (Sapphire
//! Rapids class) with 21 MB of weights, that took 1 to 6 rows from 0.8-0.93x the speed of the
//! AVX2 kernel (which loads each line in two halves) to about 1x, and 64 rows from about 120 to
//! 134 GFLOP/s on one core; prefetching the next group's weights into L2 instead made it
//! slower.

use super::TileArgs;

/// Activation rows per call (and per tile of the repacked activations).
pub(super) const MAX_ROWS: usize = 12;

/// Calls of at most this many rows run 4 panels at a time.
const WIDE_MAX_ROWS: usize = 4;

/// Panels per group for a call of `n` rows.
pub(super) fn group(n: usize) -> usize {
    if n <= WIDE_MAX_ROWS { 4 } else { 2 }
}

/// Whether this CPU has AVX-512F (the AVX-512 backend's check, which also asks for AVX2 and
/// FMA, as every AVX-512 CPU has them).
pub(super) fn available() -> bool {
    crate::gemm::avx512::available()
}

/// Runs one micro-kernel call (see `Kernel::tile`).
///
/// # Safety
///
/// As for `Kernel::tile`.
pub(super) unsafe fn tile(panels: usize, rows: usize, a: &TileArgs) {
    assert!(available());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F is checked; the rest is the caller's contract.
    unsafe {
        macro_rules! pick_rows {
            ($p:literal; $($r:literal)*) => {
                match rows {
                    $($r => imp::tile::<$p, $r>,)*
                    _ => unreachable!("{rows} rows"),
                }
            };
        }
        let f = match panels {
            1 => pick_rows!(1; 1 2 3 4 5 6 7 8 9 10 11 12),
            2 => pick_rows!(2; 1 2 3 4 5 6 7 8 9 10 11 12),
            // Only small calls group 4 panels (see `group`).
            4 => pick_rows!(4; 1 2 3 4),
            _ => unreachable!("{panels} panels"),
        };
        f(a);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (panels, rows, a);
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use std::arch::x86_64::*;

    use super::super::{PANEL, TileArgs};

    /// Floats ahead of the loads to prefetch (16 lines).
    const AHEAD: usize = 16 * PANEL;

    const _: () = assert!(PANEL == 16 && super::MAX_ROWS == 12 && super::WIDE_MAX_ROWS == 4);

    /// `P` panels against `R` rows of a tile (see `Kernel::tile`).
    // Indices, not iterators, over the accumulators: they are addressed in two dimensions
    // (panel, row) by every step, and must stay registers.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile<const P: usize, const R: usize>(a: &TileArgs) {
        // SAFETY (the whole body): per the contract, panel p's k lines start at
        // `a.w + p * a.wstride` (64-byte aligned: the packing's `Line`s), the tile holds
        // `R` values per column for `a.k` columns, and row i's outputs of panel p in the
        // mask are this thread's to write.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); R]; P];
            let mut w = a.w;
            let mut x = a.x;
            // Plain loops over arrays, not closures, so that everything inlines into this
            // function's features and the arrays live in registers.
            for _ in 0..a.k {
                let mut wv = [_mm512_setzero_ps(); P];
                for (p, v) in wv.iter_mut().enumerate() {
                    *v = _mm512_load_ps(w.add(p * a.wstride));
                    _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(p * a.wstride + AHEAD) as *const i8);
                }
                for i in 0..R {
                    let b = _mm512_set1_ps(*x.add(i));
                    for p in 0..P {
                        acc[p][i] = _mm512_fmadd_ps(wv[p], b, acc[p][i]);
                    }
                }
                w = w.add(PANEL);
                x = x.add(R);
            }
            for (p, accs) in acc.iter().enumerate() {
                let mask = a.masks[p];
                for (i, &v) in accs.iter().enumerate() {
                    let y = a.y.add(i * a.ys + p * PANEL);
                    if mask == u16::MAX {
                        _mm512_storeu_ps(y, v);
                    } else {
                        _mm512_mask_storeu_ps(y, mask, v);
                    }
                }
            }
        }
    }
}
