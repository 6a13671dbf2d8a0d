//! AVX2 + FMA kernels, selected at run time with `is_x86_feature_detected!`.
//!
//! Nibble decode: a `vpshufb` lookup maps each 4-bit code to `2 * e2m1(code)` as an int8
//! (all E2M1 values times two are integers in -12..=12); `vpmovsxbd` + `vcvtdq2ps` widen
//! eight of them to f32, and the factor 1/2 is folded into the per-tensor scale table.

use std::ops::Range;

use super::Tile;
use crate::quant::Nvfp4Tensor;

/// Whether this CPU has AVX2 and FMA.
pub(super) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Half the full decode scale (`e4m3 * global / 2`) of every scale byte: the lookup table
/// yields twice the E2M1 value.
pub(super) fn scale_table(w: &Nvfp4Tensor) -> [f32; 256] {
    std::array::from_fn(|i| crate::scalar::E4M3_TABLE[i] * w.global_decode_scale() * 0.5)
}

/// `y[i] = W[rows.start + i, :] . x` with `xp` the permuted activation row.
pub(super) fn gemv_rows(w: &Nvfp4Tensor, xp: &[f32], rows: Range<usize>, y: &mut [f32]) {
    assert!(available() && y.len() == rows.len() && xp.len() == w.cols());
    assert!(rows.end <= w.rows());
    #[cfg(target_arch = "x86_64")]
    {
        let table = scale_table(w);
        let k = w.cols();
        let blocks = k / 16;
        for (out, r) in y.iter_mut().zip(rows) {
            // SAFETY: AVX2/FMA checked above; row `r` lies within `packed` and `scales`,
            // and `xp` holds `k` elements (asserted).
            *out = unsafe {
                imp::gemv_row(
                    w.packed().as_ptr().add(r * k / 2),
                    w.scales().as_ptr().add(r * blocks),
                    blocks,
                    xp.as_ptr(),
                    &table,
                )
            };
        }
    }
}

/// Decodes `W[row, k0..k0 + dst.len()]` to f32; `table` is [`scale_table`].
pub(super) fn decode_row(
    w: &Nvfp4Tensor,
    table: &[f32; 256],
    row: usize,
    k0: usize,
    dst: &mut [f32],
) {
    let start = row * w.cols() + k0;
    assert!(available() && dst.len().is_multiple_of(16) && k0 + dst.len() <= w.cols());
    assert!(row < w.rows());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX2/FMA checked; the blocks of W[row, k0..k0 + dst.len()] are in bounds.
    unsafe {
        imp::decode(
            w.packed().as_ptr().add(start / 2),
            w.scales().as_ptr().add(start / 16),
            dst.len() / 16,
            table,
            dst.as_mut_ptr(),
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (table, start);
}

/// Adds the tile's products into the output.
///
/// # Safety
///
/// `t.y` must point to a row-major output (row stride `t.ys`) of which this thread may write
/// columns `0..t.mr` of rows `0..t.n`.
pub(super) unsafe fn tile(t: &Tile<'_, f32>) {
    assert!(available() && t.kw.is_multiple_of(8));
    assert!(t.x.len() >= t.n.saturating_sub(1) * t.xs + t.kw);
    assert!(t.w.len() >= t.mr.saturating_sub(1) * t.ws + t.kw);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX2/FMA checked; operand extents asserted; `y` per the contract.
    unsafe {
        imp::tile(t)
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod imp {
    use std::arch::x86_64::*;

    use super::super::{MR, NR};

    /// Prefetch distance of the GEMV weight stream, in bytes.
    const PREFETCH: usize = 2048;

    /// `2 * e2m1(code)` for codes 0..16.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn lut128() -> __m128i {
        _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)
    }

    /// Eight int8 lanes (the low 8 bytes of `v`) to f32.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn widen8(v: __m128i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::gemm) fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Horizontal sums of four vectors, as the four lanes of the result.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::gemm) fn hsum4(a: __m256, b: __m256, c: __m256, d: __m256) -> __m128 {
        let ab = _mm256_hadd_ps(a, b);
        let cd = _mm256_hadd_ps(c, d);
        let h = _mm256_hadd_ps(ab, cd);
        _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1))
    }

    /// One pair of blocks (16 packed bytes) of a GEMV row: returns the two blocks'
    /// unscaled partial products.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn gemv_pair(packed: *const u8, xp: *const f32, lut: __m256i) -> (__m256, __m256) {
        unsafe {
            let v = _mm256_broadcastsi128_si256(_mm_loadu_si128(packed as *const __m128i));
            let t = _mm256_srli_epi16(v, 4);
            // Low lane: low nibbles (even elements), high lane: high nibbles (odd elements).
            let codes = _mm256_and_si256(_mm256_blend_epi32(v, t, 0xf0), _mm256_set1_epi8(0x0f));
            let q = _mm256_shuffle_epi8(lut, codes);
            let lo = _mm256_castsi256_si128(q);
            let hi = _mm256_extracti128_si256(q, 1);
            let e0 = widen8(lo);
            let o0 = widen8(hi);
            let e1 = widen8(_mm_srli_si128(lo, 8));
            let o1 = widen8(_mm_srli_si128(hi, 8));
            let t0 = _mm256_fmadd_ps(
                o0,
                _mm256_loadu_ps(xp.add(8)),
                _mm256_mul_ps(e0, _mm256_loadu_ps(xp)),
            );
            let t1 = _mm256_fmadd_ps(
                o1,
                _mm256_loadu_ps(xp.add(24)),
                _mm256_mul_ps(e1, _mm256_loadu_ps(xp.add(16))),
            );
            (t0, t1)
        }
    }

    /// Dot product of one NVFP4 row (`blocks` blocks) with the permuted activation row.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gemv_row(
        packed: *const u8,
        scales: *const u8,
        blocks: usize,
        xp: *const f32,
        table: &[f32; 256],
    ) -> f32 {
        unsafe {
            let lut = _mm256_broadcastsi128_si256(lut128());
            let scale = |b: usize| _mm256_set1_ps(table[*scales.add(b) as usize]);
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut b = 0;
            while b + 4 <= blocks {
                // Software prefetch ahead of the weight stream (see the AVX-512 GEMV).
                _mm_prefetch::<_MM_HINT_T0>(packed.add(b * 8 + PREFETCH) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(scales.add(b + PREFETCH / 8) as *const i8);
                let (t0, t1) = gemv_pair(packed.add(b * 8), xp.add(b * 16), lut);
                let (t2, t3) = gemv_pair(packed.add(b * 8 + 16), xp.add(b * 16 + 32), lut);
                acc[0] = _mm256_fmadd_ps(t0, scale(b), acc[0]);
                acc[1] = _mm256_fmadd_ps(t1, scale(b + 1), acc[1]);
                acc[2] = _mm256_fmadd_ps(t2, scale(b + 2), acc[2]);
                acc[3] = _mm256_fmadd_ps(t3, scale(b + 3), acc[3]);
                b += 4;
            }
            if b + 2 <= blocks {
                let (t0, t1) = gemv_pair(packed.add(b * 8), xp.add(b * 16), lut);
                acc[0] = _mm256_fmadd_ps(t0, scale(b), acc[0]);
                acc[1] = _mm256_fmadd_ps(t1, scale(b + 1), acc[1]);
                b += 2;
            }
            if b < blocks {
                // A last single block: 8 bytes, low nibbles then high nibbles.
                let v = _mm_loadl_epi64(packed.add(b * 8) as *const __m128i);
                let m = _mm_set1_epi8(0x0f);
                let codes =
                    _mm_unpacklo_epi64(_mm_and_si128(v, m), _mm_and_si128(_mm_srli_epi16(v, 4), m));
                let q = _mm_shuffle_epi8(lut128(), codes);
                let t = _mm256_fmadd_ps(
                    widen8(_mm_srli_si128(q, 8)),
                    _mm256_loadu_ps(xp.add(b * 16 + 8)),
                    _mm256_mul_ps(widen8(q), _mm256_loadu_ps(xp.add(b * 16))),
                );
                acc[2] = _mm256_fmadd_ps(t, scale(b), acc[2]);
            }
            hsum(_mm256_add_ps(
                _mm256_add_ps(acc[0], acc[1]),
                _mm256_add_ps(acc[2], acc[3]),
            ))
        }
    }

    /// Prefetches the packed bytes that follow `blocks` blocks at `packed`: the same row's next
    /// slice in the tiled path, which is decoded next for small batches.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::gemm) unsafe fn prefetch_following(packed: *const u8, blocks: usize) {
        unsafe {
            let next = packed.add(blocks * 8);
            for line in 0..(blocks * 8).div_ceil(64).min(8) {
                // Prefetches never fault, so running past the tensor is harmless.
                _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(line * 64) as *const i8);
            }
        }
    }

    /// Decodes `blocks` consecutive blocks into `dst` in natural element order.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn decode(
        packed: *const u8,
        scales: *const u8,
        blocks: usize,
        table: &[f32; 256],
        dst: *mut f32,
    ) {
        unsafe {
            prefetch_following(packed, blocks);
            let lut = lut128();
            let m = _mm_set1_epi8(0x0f);
            let store = |q: __m128i, b: usize| {
                let s = _mm256_set1_ps(table[*scales.add(b) as usize]);
                _mm256_storeu_ps(dst.add(b * 16), _mm256_mul_ps(widen8(q), s));
                _mm256_storeu_ps(
                    dst.add(b * 16 + 8),
                    _mm256_mul_ps(widen8(_mm_srli_si128(q, 8)), s),
                );
            };
            let mut b = 0;
            while b + 2 <= blocks {
                let v = _mm_loadu_si128(packed.add(b * 8) as *const __m128i);
                let lo = _mm_and_si128(v, m);
                let hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
                store(_mm_shuffle_epi8(lut, _mm_unpacklo_epi8(lo, hi)), b);
                store(_mm_shuffle_epi8(lut, _mm_unpackhi_epi8(lo, hi)), b + 1);
                b += 2;
            }
            if b < blocks {
                let v = _mm_loadl_epi64(packed.add(b * 8) as *const __m128i);
                let lo = _mm_and_si128(v, m);
                let hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
                store(_mm_shuffle_epi8(lut, _mm_unpacklo_epi8(lo, hi)), b);
            }
        }
    }

    // Four activation rows by three weight rows keep 12 accumulators and 3 weight vectors in
    // AVX2's 16 registers.
    const _: () = assert!(NR == 4 && MR == 3);
    crate::gemm::micro::f32_tile_kernel! {
        features: "avx2,fma",
        zero: _mm256_setzero_ps(),
        load: _mm256_loadu_ps,
        fmadd: _mm256_fmadd_ps,
        lanes: 8,
        fold: |v| v,
        rows: NR => [4, 3, 2],
        cols: MR => [3, 2],
    }
}
