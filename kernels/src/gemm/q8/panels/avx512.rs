//! AVX-512 micro-kernels of the panel GEMM: per block, the nibbles of each panel are looked
//! up into 4 registers of unsigned weights (`2 * e2m1 + 12`; lane `o` = 4 columns of output
//! row `o`), and for each activation row 4 `vpdpbusd` against broadcast dwords of its stored
//! values (the block's evens 0..4, 4..8, odds 0..4, 4..8: the columns the 4 registers hold)
//! form the block's dot products of 16 outputs, starting from the row's negated offset so that
//! the unsigned weights' `+12` cancels. One conversion and `fma(dot, w_scale * x_scale, acc)`
//! then add the block to the f32 accumulators of the tile (up to 2 panels x 8 rows).
//!
//! The variants ([`Variant`]) differ only in the lookup (`vpermb` or `vpshufb`) and in how the
//! dwords are multiplied (`vpdpbusd` or `vpmaddubsw` + `vpmaddwd`); they form the same integers
//! and run the same f32 code, so they give the same bits.

use super::super::avx512::Variant;
use super::TileArgs;

/// Runs one micro-kernel call (see `Kernel::tile`).
///
/// # Safety
///
/// As for `Kernel::tile`.
pub(super) unsafe fn tile(variant: Variant, panels: usize, rows: usize, a: &TileArgs) {
    assert!(variant.available());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the variant's features are checked; the rest is the caller's contract.
    unsafe {
        macro_rules! pick_rows {
            ($f:ident, $p:literal) => {
                match rows {
                    1 => imp::$f::<$p, 1>,
                    2 => imp::$f::<$p, 2>,
                    3 => imp::$f::<$p, 3>,
                    4 => imp::$f::<$p, 4>,
                    5 => imp::$f::<$p, 5>,
                    6 => imp::$f::<$p, 6>,
                    7 => imp::$f::<$p, 7>,
                    _ => imp::$f::<$p, 8>,
                }
            };
        }
        macro_rules! pick {
            ($f:ident) => {
                if panels == 1 {
                    pick_rows!($f, 1)
                } else {
                    pick_rows!($f, 2)
                }
            };
        }
        let f = match variant {
            Variant::Bw => pick!(tile_bw),
            Variant::Vnni => pick!(tile_vnni),
            Variant::VnniVbmi => pick!(tile_vbmi),
        };
        f(a);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (panels, rows, a);
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use std::arch::x86_64::*;

    // The nibble lookups are the row kernels'.
    use super::super::super::avx512::imp::{LUT64, lut_lanes, nibbles_shuffle};
    use super::super::{BLOCK, PANEL, TILE_BLOCK, TILE_OFFSETS, TILE_ROWS, TILE_SCALES, TileArgs};

    // The dispatch instantiates 1 or 2 panels and 1 to 8 rows.
    const _: () = assert!(super::super::PANELS == 2 && TILE_ROWS == 8 && PANEL == 16);

    /// Expands to a micro-kernel with the given features; `lookup(table, v)` returns the
    /// weights of the low and the high nibbles of `v`, `dot(acc, w, x)` adds the 4 products of
    /// each dword lane to `acc`.
    macro_rules! panel_kernel {
        (
            $name:ident, $features:literal,
            table: $table:expr,
            lookup: |$t:ident, $v:ident| $lookup:expr,
            dot: |$acc:ident, $w:ident, $x:ident| $dot:expr $(,)?
        ) => {
            /// `P` panels against `R` rows of the tile (see `Kernel::tile`).
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name<const P: usize, const R: usize>(a: &TileArgs) {
                unsafe {
                    let table = $table;
                    let lookup = |$t: __m512i, $v: __m512i| -> (__m512i, __m512i) { $lookup };
                    let dot = |$acc: __m512i, $w: __m512i, $x: __m512i| -> __m512i { $dot };
                    let mut acc = [[_mm512_setzero_ps(); R]; P];
                    if !a.first {
                        for (p, accs) in acc.iter_mut().enumerate() {
                            for (i, v) in accs.iter_mut().enumerate() {
                                let y = a.y.add(i * a.ys + p * PANEL);
                                *v = _mm512_maskz_loadu_ps(a.masks[p], y);
                            }
                        }
                    }
                    // Plain loops over arrays, not closures over `array::map`, so that
                    // everything inlines into this function's features.
                    for b in 0..a.blocks {
                        let mut wv = [[_mm512_setzero_si512(); 4]; P];
                        let mut ws = [_mm512_setzero_ps(); P];
                        for p in 0..P {
                            let wb = a.w.add(p * a.wstride + b) as *const u8;
                            let head = _mm512_load_si512(wb as *const __m512i);
                            let tail = _mm512_load_si512(wb.add(64) as *const __m512i);
                            let (head_lo, head_hi) = lookup(table, head);
                            let (tail_lo, tail_hi) = lookup(table, tail);
                            // Columns 0,2,4,6 | 8,10,12,14 | 1,3,5,7 | 9,11,13,15: the order of
                            // the stored dwords.
                            wv[p] = [head_lo, tail_lo, head_hi, tail_hi];
                            let sb = a.ws.add(p * a.wstride + b) as *const __m256i;
                            ws[p] = _mm512_cvtph_ps(_mm256_load_si256(sb));
                        }
                        let xb = a.x.add(b * TILE_BLOCK);
                        for i in 0..R {
                            let q = xb.add(i * BLOCK) as *const i32;
                            let xq = [
                                _mm512_set1_epi32(q.read()),
                                _mm512_set1_epi32(q.add(1).read()),
                                _mm512_set1_epi32(q.add(2).read()),
                                _mm512_set1_epi32(q.add(3).read()),
                            ];
                            let xs =
                                _mm512_set1_ps((xb.add(TILE_SCALES) as *const f32).add(i).read());
                            let start = _mm512_set1_epi32(
                                (xb.add(TILE_OFFSETS) as *const i32).add(i).read(),
                            );
                            for p in 0..P {
                                let mut d = start;
                                for (&w, &x) in wv[p].iter().zip(&xq) {
                                    d = dot(d, w, x);
                                }
                                let s = _mm512_mul_ps(ws[p], xs);
                                acc[p][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc[p][i]);
                            }
                        }
                    }
                    let half_global = _mm512_set1_ps(a.half_global);
                    for (p, accs) in acc.iter().enumerate() {
                        for (i, &v) in accs.iter().enumerate() {
                            let v = if a.last {
                                _mm512_mul_ps(v, half_global)
                            } else {
                                v
                            };
                            _mm512_mask_storeu_ps(a.y.add(i * a.ys + p * PANEL), a.masks[p], v);
                        }
                    }
                }
            }
        };
    }

    // AVX-512 VNNI and VBMI (Ice Lake and later, Zen 4).
    panel_kernel!(
        tile_vbmi, "avx512f,avx512bw,avx512vnni,avx512vbmi,avx2,fma",
        table: _mm512_loadu_si512(LUT64.as_ptr() as *const __m512i),
        lookup: |t, v| (
            _mm512_permutexvar_epi8(v, t),
            _mm512_permutexvar_epi8(_mm512_srli_epi16::<4>(v), t)
        ),
        dot: |acc, w, x| _mm512_dpbusd_epi32(acc, w, x),
    );

    // AVX-512 VNNI without VBMI (Cascade Lake).
    panel_kernel!(
        tile_vnni, "avx512f,avx512bw,avx512vnni,avx2,fma",
        table: lut_lanes(),
        lookup: |t, v| nibbles_shuffle(t, v),
        dot: |acc, w, x| _mm512_dpbusd_epi32(acc, w, x),
    );

    // AVX-512 BW only (Skylake-SP). A pair of products is at most 2 * 24 * 127 in magnitude,
    // well inside i16: `vpmaddubsw` never saturates here.
    panel_kernel!(
        tile_bw, "avx512f,avx512bw,avx2,fma",
        table: lut_lanes(),
        lookup: |t, v| nibbles_shuffle(t, v),
        dot: |acc, w, x| _mm512_add_epi32(
            acc,
            _mm512_madd_epi16(_mm512_maddubs_epi16(w, x), _mm512_set1_epi16(1))
        ),
    );
}
