//! AVX-512 int8-activation kernels: per step of 16 blocks (128 packed bytes, two groups), one
//! zmm lookup turns 64 low nibbles (the evens of 8 blocks) and another 64 high nibbles (their
//! odds) into unsigned weights, and the products with the activations land in two i32 lanes
//! per block. Two `vpermt2d` then add the lane pairs of both groups into the step's 16 block
//! sums, in order, next to its 16 scales. Two weight rows go together, sharing the activation
//! loads.
//!
//! Three variants, by instruction set ([`Variant`]); they form the same integers and then run
//! the same f32 code, so they give the same bits.

use std::ops::Range;

use super::Q8Rows;
use crate::quant::Nvfp4Tensor;

/// The AVX-512 kernel variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Variant {
    /// AVX-512 BW (Skylake-SP): `vpshufb` lookups, `vpmaddubsw` + `vpmaddwd` dots.
    Bw,
    /// With AVX-512 VNNI (Cascade Lake): `vpdpbusd` dots.
    Vnni,
    /// With AVX-512 VNNI and VBMI (Ice Lake and later, Zen 4): `vpermb` lookups, which need
    /// no nibble masks, and `vpdpbusd` dots.
    VnniVbmi,
}

impl Variant {
    /// The fastest variant this CPU runs, if any.
    pub(super) fn detect() -> Option<Variant> {
        [Variant::VnniVbmi, Variant::Vnni, Variant::Bw]
            .into_iter()
            .find(|v| v.available())
    }

    /// Whether this CPU runs the variant (AVX-512 F and BW, AVX2 and FMA, and the variant's
    /// extensions).
    pub(super) fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            crate::gemm::avx512::available()
                && has!("avx512bw")
                && match self {
                    Variant::Bw => true,
                    Variant::Vnni => has!("avx512vnni"),
                    Variant::VnniVbmi => has!("avx512vnni") && has!("avx512vbmi"),
                }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = self;
            false
        }
    }
}

/// `Y[i, r] = W[r, :] . x_i` for the weight rows `r` in `rows` (see `Kernel::rows`).
///
/// # Safety
///
/// `y` must point to a row-major `[x.rows, ys]` output of which the caller may write columns
/// `rows` of every row, with no other thread touching them.
pub(super) unsafe fn rows(
    w: &Nvfp4Tensor,
    x: Q8Rows<'_>,
    rows: Range<usize>,
    y: *mut f32,
    ys: usize,
    variant: Variant,
) {
    assert!(variant.available());
    assert!(x.cols == w.cols() && (1..=super::MAX_ROWS).contains(&x.rows));
    assert!(rows.end <= w.rows() && rows.end <= ys);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the features checked; shapes asserted (the activation rows are padded to whole
    // 256-element steps); `y` per the contract.
    unsafe {
        macro_rules! pick {
            ($f:ident) => {
                match x.rows {
                    1 => imp::$f::<1>,
                    2 => imp::$f::<2>,
                    3 => imp::$f::<3>,
                    4 => imp::$f::<4>,
                    5 => imp::$f::<5>,
                    6 => imp::$f::<6>,
                    7 => imp::$f::<7>,
                    _ => imp::$f::<8>,
                }
            };
        }
        let f = match variant {
            Variant::Bw => pick!(rows_bw),
            Variant::Vnni => pick!(rows_vnni),
            Variant::VnniVbmi => pick!(rows_vbmi),
        };
        f(w, x, rows, y, ys);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (y, ys);
}

#[cfg(target_arch = "x86_64")]
pub(super) mod imp {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::super::{GROUP, LUT, Q8Rows};
    use crate::quant::Nvfp4Tensor;

    /// Prefetch distance of the weight stream, in bytes (as the f32 GEMV's).
    const PREFETCH: usize = 2048;
    /// Blocks per step.
    const STEP: usize = 2 * GROUP;

    /// One activation row's values, scales and block offsets.
    type Row = (*const i8, *const f32, *const i32);

    /// Sixteen E4M3 scale bytes to f32, as the AVX2 kernel's `scales8`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    fn scales16(bytes: __m128i) -> __m512 {
        let bits = _mm512_and_si512(
            _mm512_slli_epi32::<20>(_mm512_cvtepi8_epi32(bytes)),
            _mm512_set1_epi32(0x87f0_0000u32 as i32),
        );
        _mm512_mul_ps(
            _mm512_castsi512_ps(bits),
            _mm512_set1_ps(f32::from_bits((127 + 120) << 23)),
        )
    }

    /// Expands to a step function, a function running `C` weight rows and the row loop, with
    /// the given features; `pair(lo, evens, hi, odds)` returns the i32 lanes (two per block)
    /// of one group's products.
    macro_rules! q8_kernel {
        (
            $step:ident, $weight_rows:ident, $rows:ident, $features:literal,
            table: $table:expr,
            nibbles: |$t:ident, $v:ident| $nibbles:expr,
            pair: |$lo:ident, $xe:ident, $hi:ident, $xo:ident| $pair:expr $(,)?
        ) => {
            /// Step `c` of `C` weight rows (packed bytes `v`, scale bytes `sb`) against every
            /// activation row, accumulating `block sum * w_scale * x_scale` into `acc`. Each
            /// output's arithmetic is the same whatever `C` and `R`.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn $step<const C: usize, const R: usize>(
                v: [[__m512i; 2]; C],
                sb: [__m128i; C],
                xr: &[Row; R],
                c: usize,
                acc: &mut [[__m512; R]; C],
            ) {
                unsafe {
                    let table = $table;
                    let nibbles = |$t: __m512i, $v: __m512i| -> (__m512i, __m512i) { $nibbles };
                    // Plain loops, not `array::map`: its closure might not inline into this
                    // function's features, and a call per vector would cost more than the work.
                    let mut wv = [[_mm512_setzero_si512(); 4]; C];
                    let mut ws = [_mm512_setzero_ps(); C];
                    for j in 0..C {
                        let (lo0, hi0) = nibbles(table, v[j][0]);
                        let (lo1, hi1) = nibbles(table, v[j][1]);
                        wv[j] = [lo0, hi0, lo1, hi1];
                        ws[j] = scales16(sb[j]);
                    }
                    let even = _mm512_setr_epi32(
                        0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30,
                    );
                    let odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
                    let pair = |$lo: __m512i, $xe: __m512i, $hi: __m512i, $xo: __m512i| $pair;
                    for (i, &(q, xs, offsets)) in xr.iter().enumerate() {
                        let q = q.add(c * STEP * 16);
                        let ld = |o: usize| _mm512_loadu_si512(q.add(o) as *const __m512i);
                        let x = [ld(0), ld(64), ld(128), ld(192)];
                        let off = _mm512_loadu_si512(offsets.add(c * STEP) as *const __m512i);
                        let xs = _mm512_loadu_ps(xs.add(c * STEP));
                        for j in 0..C {
                            let [lo0, hi0, lo1, hi1] = wv[j];
                            let q0 = pair(lo0, x[0], hi0, x[1]);
                            let q1 = pair(lo1, x[2], hi1, x[3]);
                            let sums = _mm512_add_epi32(
                                _mm512_permutex2var_epi32(q0, even, q1),
                                _mm512_permutex2var_epi32(q0, odd, q1),
                            );
                            let sums = _mm512_sub_epi32(sums, off);
                            let s = _mm512_mul_ps(ws[j], xs);
                            acc[j][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), s, acc[j][i]);
                        }
                    }
                }
            }

            /// Weight rows `r0..r0 + C` against every activation row.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn $weight_rows<const C: usize, const R: usize>(
                w: &Nvfp4Tensor,
                xr: &[Row; R],
                r0: usize,
                y: *mut f32,
                ys: usize,
            ) {
                unsafe {
                    let k = w.cols();
                    let blocks = k / 16;
                    let (full, rem) = (blocks / STEP, blocks % STEP);
                    let packed: [*const u8; C] =
                        std::array::from_fn(|j| w.packed().as_ptr().add((r0 + j) * k / 2));
                    let scales: [*const u8; C] =
                        std::array::from_fn(|j| w.scales().as_ptr().add((r0 + j) * blocks));
                    let mut acc = [[_mm512_setzero_ps(); R]; C];
                    for c in 0..full {
                        // Past the end of its row, each stream prefetches the row it will read
                        // next, `C` rows on. Prefetches never fault, so running past the
                        // tensor is harmless.
                        let ahead = c * 128 + PREFETCH;
                        let skip = if ahead >= k / 2 { C - 1 } else { 0 };
                        for (&p, &s) in packed.iter().zip(&scales) {
                            let p = p.wrapping_add(ahead + skip * k / 2);
                            _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
                            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64) as *const i8);
                            let s = s.wrapping_add(c * STEP + PREFETCH / 8 + skip * blocks);
                            _mm_prefetch::<_MM_HINT_T0>(s as *const i8);
                        }
                        let mut v = [[_mm512_setzero_si512(); 2]; C];
                        let mut sb = [_mm_setzero_si128(); C];
                        for j in 0..C {
                            let p = packed[j].add(c * 128);
                            v[j] = [
                                _mm512_loadu_si512(p as *const __m512i),
                                _mm512_loadu_si512(p.add(64) as *const __m512i),
                            ];
                            sb[j] = _mm_loadu_si128(scales[j].add(c * STEP) as *const __m128i);
                        }
                        $step::<C, R>(v, sb, xr, c, &mut acc);
                    }
                    if rem > 0 {
                        // The last, partial step with masked loads (masked-off bytes are not
                        // read): zero scales (and zero activations past `k`) make the padding
                        // contribute nothing.
                        let bytes = rem * 8;
                        let m0 = if bytes >= 64 {
                            u64::MAX
                        } else {
                            (1u64 << bytes) - 1
                        };
                        let m1 = if bytes > 64 {
                            (1u64 << (bytes - 64)) - 1
                        } else {
                            0
                        };
                        let mut v = [[_mm512_setzero_si512(); 2]; C];
                        let mut sb = [_mm_setzero_si128(); C];
                        for j in 0..C {
                            let p = packed[j].add(full * 128);
                            v[j] = [
                                _mm512_maskz_loadu_epi8(m0, p as *const i8),
                                _mm512_maskz_loadu_epi8(m1, p.wrapping_add(64) as *const i8),
                            ];
                            let s = scales[j].add(full * STEP) as *const i8;
                            sb[j] = _mm512_castsi512_si128(_mm512_maskz_loadu_epi8(
                                (1u64 << rem) - 1,
                                s,
                            ));
                        }
                        $step::<C, R>(v, sb, xr, full, &mut acc);
                    }
                    let half_global = w.global_decode_scale() * 0.5;
                    for (j, row) in acc.iter().enumerate() {
                        for (i, &a) in row.iter().enumerate() {
                            *y.add(i * ys + r0 + j) = _mm512_reduce_add_ps(a) * half_global;
                        }
                    }
                }
            }

            /// Weight rows two at a time (sharing the activation loads), an odd last one alone.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $rows<const R: usize>(
                w: &Nvfp4Tensor,
                x: Q8Rows<'_>,
                rows: Range<usize>,
                y: *mut f32,
                ys: usize,
            ) {
                unsafe {
                    let xr: [Row; R] = std::array::from_fn(|i| x.row(i));
                    let mut r = rows.start;
                    while r + 2 <= rows.end {
                        $weight_rows::<2, R>(w, &xr, r, y, ys);
                        r += 2;
                    }
                    if r < rows.end {
                        $weight_rows::<1, R>(w, &xr, r, y, ys);
                    }
                }
            }
        };
    }

    /// The lookup table in each 128-bit lane, for `vpshufb`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    pub(in crate::gemm::q8) fn lut_lanes() -> __m512i {
        // SAFETY: LUT holds 16 bytes.
        _mm512_broadcast_i32x4(unsafe { _mm_loadu_si128(LUT.as_ptr() as *const __m128i) })
    }

    /// `vpshufb` reads the low 4 bits of each index (and zeroes bytes whose bit 7 is set), so
    /// both nibbles are masked.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    pub(in crate::gemm::q8) fn nibbles_shuffle(table: __m512i, v: __m512i) -> (__m512i, __m512i) {
        let m = _mm512_set1_epi8(0x0f);
        (
            _mm512_shuffle_epi8(table, _mm512_and_si512(v, m)),
            _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16::<4>(v), m)),
        )
    }

    /// The lookup table four times over, for `vpermb`, which reads the low 6 bits of each
    /// index: bits 4 and 5 (the other nibble, or the next byte's after the shift) select
    /// equal copies, so no masking is needed.
    pub(in crate::gemm::q8) static LUT64: [u8; 64] = {
        let mut t = [0u8; 64];
        let mut i = 0;
        while i < 64 {
            t[i] = LUT[i % 16];
            i += 1;
        }
        t
    };

    // AVX-512 VNNI and VBMI (Ice Lake and later, Zen 4): `vpermb` lookups, `vpdpbusd` dots.
    q8_kernel!(
        step_vbmi, weight_rows_vbmi, rows_vbmi, "avx512f,avx512bw,avx512vnni,avx512vbmi,avx2,fma",
        table: _mm512_loadu_si512(LUT64.as_ptr() as *const __m512i),
        nibbles: |t, v| (
            _mm512_permutexvar_epi8(v, t),
            _mm512_permutexvar_epi8(_mm512_srli_epi16::<4>(v), t)
        ),
        pair: |lo, xe, hi, xo| _mm512_dpbusd_epi32(
            _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xe), hi, xo
        ),
    );

    // AVX-512 VNNI without VBMI (Cascade Lake).
    q8_kernel!(
        step_vnni, weight_rows_vnni, rows_vnni, "avx512f,avx512bw,avx512vnni,avx2,fma",
        table: lut_lanes(),
        nibbles: |t, v| nibbles_shuffle(t, v),
        pair: |lo, xe, hi, xo| _mm512_dpbusd_epi32(
            _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xe), hi, xo
        ),
    );

    // AVX-512 BW only (Skylake-SP). Pairs are at most 2 * 24 * 127 and the sum of the even and
    // odd pairs twice that, well inside i16: `vpmaddubsw` never saturates here.
    q8_kernel!(
        step_bw, weight_rows_bw, rows_bw, "avx512f,avx512bw,avx2,fma",
        table: lut_lanes(),
        nibbles: |t, v| nibbles_shuffle(t, v),
        pair: |lo, xe, hi, xo| _mm512_madd_epi16(
            _mm512_add_epi16(_mm512_maddubs_epi16(lo, xe), _mm512_maddubs_epi16(hi, xo)),
            _mm512_set1_epi16(1)
        ),
    );
}
