//! AVX2 + FMA micro-kernels of the f32 panel GEMM: the AVX-512 kernels' arithmetic with each
//! panel's 16 output rows in two 8-lane halves (the two 32-byte halves of each of its cache
//! lines). One panel against up to 6 activation rows (12 accumulators, 2 weight registers
//! and a broadcast in the 16 ymm registers), or, for calls of 1 or 2 rows, 2 panels (8
//! accumulators, 4 weight registers) so that more FMA chains overlap.

use super::TileArgs;

/// Activation rows per call (and per tile of the repacked activations).
pub(super) const MAX_ROWS: usize = 6;

/// Calls of at most this many rows run 2 panels at a time.
const WIDE_MAX_ROWS: usize = 2;

/// Panels per group for a call of `n` rows.
pub(super) fn group(n: usize) -> usize {
    if n <= WIDE_MAX_ROWS { 2 } else { 1 }
}

/// Whether this CPU has AVX2 and FMA (the AVX2 backend's check).
pub(super) fn available() -> bool {
    crate::gemm::avx2::available()
}

/// Runs one micro-kernel call (see `Kernel::tile`).
///
/// # Safety
///
/// As for `Kernel::tile`.
pub(super) unsafe fn tile(panels: usize, rows: usize, a: &TileArgs) {
    assert!(available());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX2 and FMA are checked; the rest is the caller's contract.
    unsafe {
        let f = match (panels, rows) {
            (1, 1) => imp::tile::<1, 1>,
            (1, 2) => imp::tile::<1, 2>,
            (1, 3) => imp::tile::<1, 3>,
            (1, 4) => imp::tile::<1, 4>,
            (1, 5) => imp::tile::<1, 5>,
            (1, 6) => imp::tile::<1, 6>,
            // Only calls of 1 or 2 rows group 2 panels (see `group`).
            (2, 1) => imp::tile::<2, 1>,
            (2, 2) => imp::tile::<2, 2>,
            _ => unreachable!("{panels} panels x {rows} rows"),
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

    const _: () = assert!(PANEL == 16 && super::MAX_ROWS == 6 && super::WIDE_MAX_ROWS == 2);

    /// `P` panels against `R` rows of a tile (see `Kernel::tile`).
    // Indices, not iterators, over the accumulators: they are addressed in two dimensions
    // (panel, row) by every step, and must stay registers.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile<const P: usize, const R: usize>(a: &TileArgs) {
        // SAFETY (the whole body): per the contract, panel p's k lines start at
        // `a.w + p * a.wstride` (64-byte aligned: the packing's `Line`s), the tile holds
        // `R` values per column for `a.k` columns, and row i's outputs of panel p in the
        // mask are this thread's to write.
        unsafe {
            // acc[p][h][i]: half h (rows 8h..8h + 8) of panel p, activation row i.
            let mut acc = [[[_mm256_setzero_ps(); R]; 2]; P];
            let mut w = a.w;
            let mut x = a.x;
            for _ in 0..a.k {
                let mut wv = [[_mm256_setzero_ps(); 2]; P];
                for (p, v) in wv.iter_mut().enumerate() {
                    v[0] = _mm256_load_ps(w.add(p * a.wstride));
                    v[1] = _mm256_load_ps(w.add(p * a.wstride + 8));
                }
                for i in 0..R {
                    let b = _mm256_broadcast_ss(&*x.add(i));
                    for p in 0..P {
                        for h in 0..2 {
                            acc[p][h][i] = _mm256_fmadd_ps(wv[p][h], b, acc[p][h][i]);
                        }
                    }
                }
                w = w.add(PANEL);
                x = x.add(R);
            }
            for (p, halves) in acc.iter().enumerate() {
                let mask = a.masks[p];
                for (h, accs) in halves.iter().enumerate() {
                    let bits = (mask >> (8 * h)) as u8;
                    if bits == 0 {
                        continue;
                    }
                    // Lane j stored where bit j of the mask is set (`vmaskmovps` reads the
                    // sign bit of each lane).
                    let lanes = _mm256_set_epi32(128, 64, 32, 16, 8, 4, 2, 1);
                    let store = _mm256_cmpeq_epi32(
                        _mm256_and_si256(_mm256_set1_epi32(bits as i32), lanes),
                        lanes,
                    );
                    for (i, &v) in accs.iter().enumerate() {
                        let y = a.y.add(i * a.ys + p * PANEL + 8 * h);
                        if bits == u8::MAX {
                            _mm256_storeu_ps(y, v);
                        } else {
                            _mm256_maskstore_ps(y, store, v);
                        }
                    }
                }
            }
        }
    }
}
