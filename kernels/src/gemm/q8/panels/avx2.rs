//! AVX2 micro-kernels of the panel GEMM (AVX2, FMA and F16C: Haswell and later, Zen): the
//! AVX-512 kernels' arithmetic in 8-lane registers. A panel's 16 output rows are two halves
//! of 8 dword lanes; each half runs on its own, against groups of up to [`GROUP`] activation
//! rows, so that its accumulators, its 4 registers of looked-up weights and the constants fit
//! in the 16 ymm registers.
//!
//! Per block, the half's nibbles (the 32-byte half of each of the panel block's two cache
//! lines) are looked up with `vpshufb` into 4 registers of unsigned weights (`2 * e2m1 + 12`;
//! lane `o` = 4 columns of output row `o`), and for each activation row the 4 registers are
//! multiplied with broadcast dwords of its stored values (the block's evens 0..4, 4..8, odds
//! 0..4, 4..8: the columns the 4 registers hold), starting from the row's negated offset so
//! that the unsigned weights' `+12` cancels. Then, as in the AVX-512 kernels, one conversion
//! and `fma(dot, w_scale * x_scale, acc)` add the block to the f32 accumulators; the block's
//! sums are exact integers in both, so the bits are the same.
//!
//! The variants ([`Variant`]) differ only in how the dwords are multiplied: `vpmaddubsw` on
//! each of the 4 registers, the four i16 results summed with `vpaddw` and widened once with
//! `vpmaddwd`, or 4 `vpdpbusd` where AVX-VNNI exists. Neither wraps or saturates: a pair of
//! products is at most `2 * 24 * 127 = 6096` in magnitude, the four summed pairs of a lane
//! `24384`, inside i16.

use super::TileArgs;

/// Activation rows per group: `GROUP` accumulators, 4 weight registers, the lookup table, the
/// nibble mask and the i16 ones, plus temporaries, in 16 ymm registers.
const GROUP: usize = 4;

// The dispatch instantiates groups of 1 to 4 rows.
const _: () = assert!(GROUP == 4);

/// The AVX2 kernel variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Variant {
    /// AVX2, FMA and F16C: `vpmaddubsw` + `vpaddw` + `vpmaddwd` dots.
    Avx2,
    /// With AVX-VNNI (Alder Lake, Sapphire Rapids, Zen 5): `vpdpbusd` dots on ymm.
    AvxVnni,
}

impl Variant {
    /// The fastest variant this CPU runs, if any. With `CHORUS_Q8_PANELS_NO_AVXVNNI` set
    /// (to anything, read once) it skips [`Variant::AvxVnni`], so that the plain AVX2 kernel
    /// (what AVX2 CPUs without AVX-VNNI, such as Zen 3, run) can be measured on any CPU; the
    /// results are the same bits either way.
    pub(super) fn detect() -> Option<Variant> {
        static NO_VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let no_vnni =
            *NO_VNNI.get_or_init(|| std::env::var_os("CHORUS_Q8_PANELS_NO_AVXVNNI").is_some());
        [Variant::AvxVnni, Variant::Avx2]
            .into_iter()
            .filter(|&v| !(no_vnni && v == Variant::AvxVnni))
            .find(|v| v.available())
    }

    /// Whether this CPU runs the variant (AVX2, FMA and F16C, and the variant's extension).
    pub(super) fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            has!("avx2")
                && has!("fma")
                && has!("f16c")
                && match self {
                    Variant::Avx2 => true,
                    Variant::AvxVnni => has!("avxvnni"),
                }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = self;
            false
        }
    }
}

/// Runs one micro-kernel call (see `Kernel::tile`).
///
/// # Safety
///
/// As for `Kernel::tile`.
pub(super) unsafe fn tile(variant: Variant, panels: usize, rows: usize, a: &TileArgs) {
    assert!(variant.available());
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! pick {
            ($f:ident) => {
                [imp::$f::<1>, imp::$f::<2>, imp::$f::<3>, imp::$f::<4>]
            };
        }
        let fs = match variant {
            Variant::Avx2 => pick!(half_avx2),
            Variant::AvxVnni => pick!(half_vnni),
        };
        for p in 0..panels {
            for h in 0..2 {
                if a.masks[p] >> (8 * h) & 0xff == 0 {
                    // No output of this half exists (the last panel's padding).
                    continue;
                }
                for i0 in (0..rows).step_by(GROUP) {
                    let r = GROUP.min(rows - i0);
                    // SAFETY: the variant's features are checked; panel p, half h and rows
                    // i0..i0 + r are inside the call's, which the caller's contract covers.
                    unsafe { fs[r - 1](a, p, h, i0) };
                }
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (panels, rows, a);
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use std::arch::x86_64::*;

    use super::super::super::LUT;
    use super::super::{BLOCK, PANEL, TILE_BLOCK, TILE_OFFSETS, TILE_SCALES, TileArgs};

    /// Expands to a micro-kernel with the given features; `dot(start, w, x)` returns `start`
    /// plus the 4 products of each dword lane of the 4 pairs `w[j]`, `x[j]`.
    macro_rules! half_kernel {
        (
            $name:ident, $features:literal,
            dot: |$start:ident, $w:ident, $x:ident| $dot:expr $(,)?
        ) => {
            /// Half `h` of panel `p` against rows `i0..i0 + R` of the tile.
            ///
            /// # Safety
            ///
            /// The features; and as for `Kernel::tile`, with the panel and rows inside the
            /// call's.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name<const R: usize>(
                a: &TileArgs,
                p: usize,
                h: usize,
                i0: usize,
            ) {
                // SAFETY: the pointers stay inside the panel blocks, scales, tile blocks and
                // outputs of the call (per the contract); the aligned loads are at 32-byte
                // (nibbles) and 16-byte (scales) offsets of 64- and 32-byte aligned structs.
                unsafe {
                    let dot =
                        |$start: __m256i, $w: &[__m256i; 4], $x: &[__m256i; 4]| -> __m256i { $dot };
                    // Lane o of the half is output 8h + o: all ones where it exists.
                    let bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
                    let have = _mm256_set1_epi32((a.masks[p] >> (8 * h)) as i32 & 0xff);
                    let mask = _mm256_cmpeq_epi32(_mm256_and_si256(have, bits), bits);
                    let y = a.y.add(i0 * a.ys + p * PANEL + 8 * h);
                    let mut acc = [_mm256_setzero_ps(); R];
                    if !a.first {
                        for (i, v) in acc.iter_mut().enumerate() {
                            *v = _mm256_maskload_ps(y.add(i * a.ys), mask);
                        }
                    }
                    let table = _mm256_broadcastsi128_si256(_mm_loadu_si128(
                        LUT.as_ptr() as *const __m128i
                    ));
                    let nib = _mm256_set1_epi8(0x0f);
                    // Plain loops over arrays, so that everything inlines into this function's
                    // features.
                    for b in 0..a.blocks {
                        let wb = (a.w.add(p * a.wstride + b) as *const u8).add(32 * h);
                        let head = _mm256_load_si256(wb as *const __m256i);
                        let tail = _mm256_load_si256(wb.add(64) as *const __m256i);
                        let lo = |v: __m256i| _mm256_shuffle_epi8(table, _mm256_and_si256(v, nib));
                        let hi = |v: __m256i| {
                            _mm256_shuffle_epi8(
                                table,
                                _mm256_and_si256(_mm256_srli_epi16::<4>(v), nib),
                            )
                        };
                        // Columns 0,2,4,6 | 8,10,12,14 | 1,3,5,7 | 9,11,13,15: the order of the
                        // stored dwords.
                        let wv = [lo(head), lo(tail), hi(head), hi(tail)];
                        let sb = (a.ws.add(p * a.wstride + b) as *const u16).add(8 * h);
                        let ws = _mm256_cvtph_ps(_mm_load_si128(sb as *const __m128i));
                        let xb = a.x.add(b * TILE_BLOCK);
                        for (i, acc) in acc.iter_mut().enumerate() {
                            let r = i0 + i;
                            let q = xb.add(r * BLOCK) as *const i32;
                            let xq = [
                                _mm256_set1_epi32(q.read()),
                                _mm256_set1_epi32(q.add(1).read()),
                                _mm256_set1_epi32(q.add(2).read()),
                                _mm256_set1_epi32(q.add(3).read()),
                            ];
                            let xs =
                                _mm256_set1_ps((xb.add(TILE_SCALES) as *const f32).add(r).read());
                            let start = _mm256_set1_epi32(
                                (xb.add(TILE_OFFSETS) as *const i32).add(r).read(),
                            );
                            let d = dot(start, &wv, &xq);
                            let s = _mm256_mul_ps(ws, xs);
                            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), s, *acc);
                        }
                    }
                    let half_global = _mm256_set1_ps(a.half_global);
                    for (i, &v) in acc.iter().enumerate() {
                        let v = if a.last {
                            _mm256_mul_ps(v, half_global)
                        } else {
                            v
                        };
                        _mm256_maskstore_ps(y.add(i * a.ys), mask, v);
                    }
                }
            }
        };
    }

    // AVX2 (Haswell and later, Zen 1-4). The four i16 sums of pairs add up exactly in i16 (at
    // most 4 * 6096 in magnitude), so one `vpmaddwd` widens them.
    half_kernel!(
        half_avx2, "avx2,fma,f16c",
        dot: |start, w, x| {
            let m = |j: usize| _mm256_maddubs_epi16(w[j], x[j]);
            let sum = _mm256_add_epi16(_mm256_add_epi16(m(0), m(1)), _mm256_add_epi16(m(2), m(3)));
            _mm256_add_epi32(start, _mm256_madd_epi16(sum, _mm256_set1_epi16(1)))
        },
    );

    // AVX-VNNI (Alder Lake, Sapphire Rapids, Zen 5).
    half_kernel!(
        half_vnni, "avx2,fma,f16c,avxvnni",
        dot: |start, w, x| {
            let mut d = start;
            for j in 0..4 {
                d = _mm256_dpbusd_avx_epi32(d, w[j], x[j]);
            }
            d
        },
    );
}
