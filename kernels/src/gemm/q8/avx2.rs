//! AVX2 int8-activation kernel: per group of 8 blocks (64 packed bytes), `vpshufb` turns the
//! low and high nibbles into unsigned weights (`2 * e2m1 + 12`), `vpmaddubsw` multiplies them
//! with the activations' evens and odds (pairs at most `2 * 24 * 127`, far from i16
//! saturation), and `vpmaddwd` with ones widens to i32 lanes two per block; one `vphaddd`
//! and a quad permute leave the eight block sums in order.

use std::ops::Range;

use super::Q8Rows;
use crate::quant::Nvfp4Tensor;

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
) {
    assert!(crate::gemm::avx2::available() && x.cols == w.cols());
    assert!((1..=super::MAX_ROWS).contains(&x.rows) && rows.end <= w.rows() && rows.end <= ys);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX2/FMA checked; shapes asserted (the activation rows are padded to whole
    // 256-element steps); `y` per the contract.
    unsafe {
        let f = match x.rows {
            1 => imp::rows::<1>,
            2 => imp::rows::<2>,
            3 => imp::rows::<3>,
            4 => imp::rows::<4>,
            5 => imp::rows::<5>,
            6 => imp::rows::<6>,
            7 => imp::rows::<7>,
            _ => imp::rows::<8>,
        };
        f(w, x, rows, y, ys);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (y, ys);
}

/// Quantizes one row as `super::quantize_row` does, to the same bits: the same IEEE
/// operations (maximum, division, clamp, rounding to nearest even) on eight lanes at a time.
pub(super) fn quantize_row(x: &[f32], qs: &mut [i8], scales: &mut [f32], offsets: &mut [i32]) {
    let blocks = x.len() / 16;
    assert!(crate::gemm::avx2::available() && x.len().is_multiple_of(16));
    assert!(qs.len() >= blocks.div_ceil(super::GROUP) * super::GROUP * 16);
    assert!(scales.len() >= blocks && offsets.len() >= blocks);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX2 checked; every block's writes lie within its group, inside `qs` (asserted).
    unsafe {
        imp::quantize_row(
            x.as_ptr(),
            blocks,
            qs.as_mut_ptr(),
            scales.as_mut_ptr(),
            offsets.as_mut_ptr(),
        );
    }
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::super::{GROUP, LUT, OFFSET, Q8Rows, group_base};
    use crate::gemm::avx2::imp::hsum;
    use crate::quant::Nvfp4Tensor;

    /// Prefetch distance of the weight stream, in bytes (as the f32 GEMV's).
    const PREFETCH: usize = 2048;

    /// One activation row's values, scales and block offsets.
    type Row = (*const i8, *const f32, *const i32);

    /// Eight E4M3 scale bytes to f32: exponent and mantissa move to f32's bit positions and
    /// `2^(127-7)` rebiases (subnormal scales become f32 subnormals, scaled exactly). Sign
    /// extension puts the sign bit at bit 31 after the shift, so one mask keeps both.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn scales8(scales: *const u8) -> __m256 {
        unsafe {
            let d = _mm256_cvtepi8_epi32(_mm_loadl_epi64(scales as *const __m128i));
            let bits = _mm256_and_si256(
                _mm256_slli_epi32::<20>(d),
                _mm256_set1_epi32(0x87f0_0000u32 as i32),
            );
            _mm256_mul_ps(
                _mm256_castsi256_ps(bits),
                _mm256_set1_ps(f32::from_bits((127 + 120) << 23)),
            )
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn quantize_row(
        x: *const f32,
        blocks: usize,
        qs: *mut i8,
        scales: *mut f32,
        offsets: *mut i32,
    ) {
        unsafe {
            let magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
            let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
            let evens_odds = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
            for b in 0..blocks {
                let a = _mm256_loadu_ps(x.add(b * 16));
                let c = _mm256_loadu_ps(x.add(b * 16 + 8));
                let m = _mm256_max_ps(_mm256_and_ps(a, magnitude), _mm256_and_ps(c, magnitude));
                let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
                let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
                let m = _mm_max_ss(m, _mm_movehdup_ps(m));
                let scale = _mm_cvtss_f32(m) / 127.0;
                let base = group_base(b);
                let (split, sum) = if scale > 0.0 {
                    let s = _mm256_set1_ps(scale);
                    let q = |v: __m256| {
                        let t = _mm256_min_ps(_mm256_max_ps(_mm256_div_ps(v, s), lo), hi);
                        _mm256_cvtps_epi32(_mm256_round_ps::<
                            { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
                        >(t))
                    };
                    let (qa, qc) = (q(a), q(c));
                    // i16 in element order, then bytes, then evens before odds.
                    let w = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(qa, qc));
                    let bytes = _mm_packs_epi16(
                        _mm256_castsi256_si128(w),
                        _mm256_extracti128_si256::<1>(w),
                    );
                    let t = _mm256_add_epi32(qa, qc);
                    let t =
                        _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256::<1>(t));
                    let t = _mm_add_epi32(t, _mm_shuffle_epi32::<0b01_00_11_10>(t));
                    let t = _mm_add_epi32(t, _mm_shuffle_epi32::<0b10_11_00_01>(t));
                    (_mm_shuffle_epi8(bytes, evens_odds), _mm_cvtsi128_si32(t))
                } else {
                    (_mm_setzero_si128(), 0)
                };
                _mm_storel_epi64(qs.add(base) as *mut __m128i, split);
                _mm_storel_epi64(
                    qs.add(base + 64) as *mut __m128i,
                    _mm_unpackhi_epi64(split, split),
                );
                *scales.add(b) = scale;
                *offsets.add(b) = OFFSET * sum;
            }
        }
    }

    /// Group `g` (8 blocks: `packed` 64 bytes, `scales` 8 bytes) against every activation row,
    /// accumulating `block sum * w_scale * x_scale` into `acc`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn group<const R: usize>(
        packed: *const u8,
        scales: *const u8,
        xr: &[Row; R],
        g: usize,
        acc: &mut [__m256; R],
    ) {
        unsafe {
            let lut = _mm256_broadcastsi128_si256(_mm_loadu_si128(LUT.as_ptr() as *const __m128i));
            let m = _mm256_set1_epi8(0x0f);
            let nibbles = |v: __m256i| {
                (
                    _mm256_shuffle_epi8(lut, _mm256_and_si256(v, m)),
                    _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16::<4>(v), m)),
                )
            };
            // Blocks 0..4, then 4..8: low nibbles are the evens, 8 per block in block order.
            let (lo0, hi0) = nibbles(_mm256_loadu_si256(packed as *const __m256i));
            let (lo1, hi1) = nibbles(_mm256_loadu_si256(packed.add(32) as *const __m256i));
            let ws = scales8(scales);
            let ones = _mm256_set1_epi16(1);
            for (a, &(q, xs, offsets)) in acc.iter_mut().zip(xr) {
                let q = q.add(g * GROUP * 16);
                let ld = |o: usize| _mm256_loadu_si256(q.add(o) as *const __m256i);
                let p0 = _mm256_add_epi16(
                    _mm256_maddubs_epi16(lo0, ld(0)),
                    _mm256_maddubs_epi16(hi0, ld(64)),
                );
                let p1 = _mm256_add_epi16(
                    _mm256_maddubs_epi16(lo1, ld(32)),
                    _mm256_maddubs_epi16(hi1, ld(96)),
                );
                // Lanes [b0 b0 b1 b1 | b2 b2 b3 b3] and [b4 .. | .. b7]; the pairwise sums
                // come out as [b0 b1 b4 b5 | b2 b3 b6 b7].
                let h = _mm256_hadd_epi32(_mm256_madd_epi16(p0, ones), _mm256_madd_epi16(p1, ones));
                let sums = _mm256_sub_epi32(
                    _mm256_permute4x64_epi64::<0b11_01_10_00>(h),
                    _mm256_loadu_si256(offsets.add(g * GROUP) as *const __m256i),
                );
                let s = _mm256_mul_ps(ws, _mm256_loadu_ps(xs.add(g * GROUP)));
                *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), s, *a);
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn rows<const R: usize>(
        w: &Nvfp4Tensor,
        x: Q8Rows<'_>,
        rows: Range<usize>,
        y: *mut f32,
        ys: usize,
    ) {
        unsafe {
            let k = w.cols();
            let blocks = k / 16;
            let (full, rem) = (blocks / GROUP, blocks % GROUP);
            let half_global = w.global_decode_scale() * 0.5;
            let xr: [Row; R] = std::array::from_fn(|i| x.row(i));
            for r in rows {
                let packed = w.packed().as_ptr().add(r * k / 2);
                let scales = w.scales().as_ptr().add(r * blocks);
                let mut acc = [_mm256_setzero_ps(); R];
                for g in 0..full {
                    _mm_prefetch::<_MM_HINT_T0>(packed.wrapping_add(g * 64 + PREFETCH) as *const i8);
                    _mm_prefetch::<_MM_HINT_T0>(
                        scales.wrapping_add(g * GROUP + PREFETCH / 8) as *const i8
                    );
                    group::<R>(packed.add(g * 64), scales.add(g * GROUP), &xr, g, &mut acc);
                }
                if rem > 0 {
                    // The last, partial group from zero-padded copies: zero scales (and zero
                    // activations past `k`) make the padding contribute nothing.
                    let mut p = [0u8; 64];
                    let mut s = [0u8; GROUP];
                    std::ptr::copy_nonoverlapping(packed.add(full * 64), p.as_mut_ptr(), rem * 8);
                    std::ptr::copy_nonoverlapping(scales.add(full * GROUP), s.as_mut_ptr(), rem);
                    group::<R>(p.as_ptr(), s.as_ptr(), &xr, full, &mut acc);
                }
                for (i, &a) in acc.iter().enumerate() {
                    *y.add(i * ys + r) = hsum(a) * half_global;
                }
            }
        }
    }
}
