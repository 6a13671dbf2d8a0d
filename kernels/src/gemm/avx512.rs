//! AVX-512F kernels (GEMV, small batches, weight-tile decode, 4x4 zmm GEMM micro-kernel),
//! selected at run time when the CPU has AVX-512F as well as AVX2/FMA; the bf16-activation
//! GEMV and small-batch kernels also need AVX-512 BW and BF16 (checked separately).
//!
//! Decode: `vpmovzxbd` spreads 16 packed bytes (two blocks) over 16 dwords; `vpermps` on a
//! zmm reads the low 4 bits of each index, so one permute against a register holding all 16
//! E2M1 values (signs included) decodes the low nibbles, and a second one after a 4-bit shift
//! decodes the high nibbles: four instructions for 32 elements.

use std::ops::Range;

use crate::quant::Nvfp4Tensor;

/// Whether this CPU has AVX-512F, AVX2 and FMA.
pub(super) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the bf16-activation GEMV ([`gemv_rows_bf16`]) can run for reduction length `k`:
/// it needs AVX-512 BW and BF16 as well, and `k` a multiple of 256.
pub(super) fn bf16_gemv_supported(k: usize) -> bool {
    k.is_multiple_of(256) && bf16_available()
}

/// Whether this CPU has AVX-512 BW and BF16 on top of [`available`].
pub(super) fn bf16_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        available()
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Decodes `W[row, k0..k0 + dst.len()]` to bf16 bits, each element times its E4M3 block scale
/// but not the global scale: E2M1 (2 significant bits) times E4M3 (4) is exact in bf16.
pub(super) fn decode_row_bf16(w: &Nvfp4Tensor, row: usize, k0: usize, dst: &mut [u16]) {
    let start = row * w.cols() + k0;
    assert!(bf16_available() && dst.len().is_multiple_of(16) && k0 + dst.len() <= w.cols());
    assert!(row < w.rows());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F/BW/BF16 checked; the blocks of W[row, k0..k0 + dst.len()] are in bounds.
    unsafe {
        imp::decode_bf16(
            w.packed().as_ptr().add(start / 2),
            w.scales().as_ptr().add(start / 16),
            dst.len() / 16,
            dst.as_mut_ptr(),
        );
    }
}

/// Adds `scale` times the tile's bf16 products into the output (4x4 `vdpbf16ps` micro-kernel);
/// `kw` must be a multiple of 32.
///
/// # Safety
///
/// `t.y` must point to a row-major output (row stride `t.ys`) of which this thread may write
/// columns `0..t.mr` of rows `0..t.n`.
pub(super) unsafe fn tile_bf16(t: &super::Tile<'_, u16>, scale: f32) {
    assert!(bf16_available() && t.kw.is_multiple_of(32));
    assert!(t.x.len() >= t.n.saturating_sub(1) * t.xs + t.kw);
    assert!(t.w.len() >= t.mr.saturating_sub(1) * t.ws + t.kw);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F/BW/BF16 checked; operand extents asserted; `y` per the contract.
    unsafe {
        imp::tile_bf16(t, scale)
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = scale;
}

/// `y[i] = W[rows.start + i, :] . x` for a bf16 activation row `xp` (raw bits, permuted by
/// `permute_bf16_row`). E2M1 values are exact in bf16, so `vdpbf16ps` forms exact products
/// and accumulates them in f32 (flushing subnormal activations, as the instruction does).
pub(super) fn gemv_rows_bf16(w: &Nvfp4Tensor, xp: &[u16], rows: Range<usize>, y: &mut [f32]) {
    assert!(bf16_gemv_supported(w.cols()) && y.len() == rows.len() && xp.len() == w.cols());
    assert!(rows.end <= w.rows());
    #[cfg(target_arch = "x86_64")]
    {
        let k = w.cols();
        let blocks = k / 16;
        for (out, r) in y.iter_mut().zip(rows) {
            // SAFETY: AVX-512F/BW/BF16 checked above; row `r` lies within `packed` and
            // `scales`, and `xp` holds `k` elements (asserted).
            let dot = unsafe {
                imp::gemv_row_bf16(
                    w.packed().as_ptr().add(r * k / 2),
                    w.scales().as_ptr().add(r * blocks),
                    blocks,
                    xp.as_ptr(),
                )
            };
            *out = dot * w.global_decode_scale();
        }
    }
}

/// Full decode scale (`e4m3 * global`) of every scale byte, for [`decode_row`].
pub(super) fn scale_table(w: &Nvfp4Tensor) -> [f32; 256] {
    std::array::from_fn(|i| crate::scalar::E4M3_TABLE[i] * w.global_decode_scale())
}

/// `y[i] = W[rows.start + i, :] . x` with `xp` the activation row permuted per block pair
/// (see `permute_activation_rows` with `paired = true`).
pub(super) fn gemv_rows(w: &Nvfp4Tensor, xp: &[f32], rows: Range<usize>, y: &mut [f32]) {
    assert!(available() && y.len() == rows.len() && xp.len() == w.cols());
    assert!(rows.end <= w.rows());
    #[cfg(target_arch = "x86_64")]
    {
        let k = w.cols();
        let blocks = k / 16;
        for (out, r) in y.iter_mut().zip(rows) {
            // SAFETY: AVX-512F/AVX2/FMA checked above; row `r` lies within `packed` and
            // `scales`, and `xp` holds `k` elements (asserted).
            let dot = unsafe {
                imp::gemv_row(
                    w.packed().as_ptr().add(r * k / 2),
                    w.scales().as_ptr().add(r * blocks),
                    blocks,
                    xp.as_ptr(),
                )
            };
            *out = dot * w.global_decode_scale();
        }
    }
}

/// Adds the tile's products into the output (AVX-512 4x4 micro-kernel).
///
/// # Safety
///
/// `t.y` must point to a row-major output (row stride `t.ys`) of which this thread may write
/// columns `0..t.mr` of rows `0..t.n`.
pub(super) unsafe fn tile(t: &super::Tile<'_, f32>) {
    assert!(available() && t.kw.is_multiple_of(16));
    assert!(t.x.len() >= t.n.saturating_sub(1) * t.xs + t.kw);
    assert!(t.w.len() >= t.mr.saturating_sub(1) * t.ws + t.kw);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F/AVX2/FMA checked; operand extents asserted; `y` per the contract.
    unsafe {
        imp::tile(t)
    }
}

/// Largest batch handled by [`batch_rows`].
pub(super) const MAX_BATCH: usize = 8;

/// `Y[i, r] = W[r, :] . x_i` for the weight rows `r` in `rows` and `n <= MAX_BATCH` activation
/// rows, decoding each weight pair once in registers and applying it to all `n` rows. `xp`
/// holds the `n` rows permuted as for the GEMV (`paired = true`), row stride `xs`.
///
/// # Safety
///
/// `y` must point to a row-major `[n, ys]` f32 output of which the caller may write columns
/// `rows` of every row, with no other thread touching them.
pub(super) unsafe fn batch_rows(
    w: &Nvfp4Tensor,
    xp: &[f32],
    xs: usize,
    n: usize,
    rows: Range<usize>,
    y: *mut f32,
    ys: usize,
) {
    assert!(available() && (1..=MAX_BATCH).contains(&n) && xs >= w.cols());
    assert!(xp.len() >= (n - 1) * xs + w.cols());
    assert!(rows.end <= w.rows() && rows.end <= ys);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F/AVX2/FMA checked; operand extents asserted; `y` per the contract.
    unsafe {
        let f = match n {
            1 => imp::batch::<1>,
            2 => imp::batch::<2>,
            3 => imp::batch::<3>,
            4 => imp::batch::<4>,
            5 => imp::batch::<5>,
            6 => imp::batch::<6>,
            7 => imp::batch::<7>,
            _ => imp::batch::<8>,
        };
        f(w, xp.as_ptr(), xs, rows, y, ys);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (y, ys);
}

/// As [`batch_rows`] for bf16 activations (raw bits, each row permuted by `permute_bf16_row`,
/// row stride `xs`), with `vdpbf16ps`; requires [`bf16_gemv_supported`].
///
/// # Safety
///
/// As for [`batch_rows`].
pub(super) unsafe fn batch_rows_bf16(
    w: &Nvfp4Tensor,
    xp: &[u16],
    xs: usize,
    n: usize,
    rows: Range<usize>,
    y: *mut f32,
    ys: usize,
) {
    assert!(bf16_gemv_supported(w.cols()) && (1..=MAX_BATCH).contains(&n) && xs >= w.cols());
    assert!(xp.len() >= (n - 1) * xs + w.cols());
    assert!(rows.end <= w.rows() && rows.end <= ys);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F/BW/BF16 checked; operand extents asserted; `y` per the contract.
    unsafe {
        let f = match n {
            1 => imp::batch_bf16::<1>,
            2 => imp::batch_bf16::<2>,
            3 => imp::batch_bf16::<3>,
            4 => imp::batch_bf16::<4>,
            5 => imp::batch_bf16::<5>,
            6 => imp::batch_bf16::<6>,
            7 => imp::batch_bf16::<7>,
            _ => imp::batch_bf16::<8>,
        };
        f(w, xp.as_ptr(), xs, rows, y, ys);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (y, ys);
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
    // SAFETY: AVX-512F checked; the blocks of W[row, k0..k0 + dst.len()] are in bounds.
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

#[cfg(target_arch = "x86_64")]
mod imp {
    use std::arch::x86_64::*;

    use crate::scalar::E4M3_TABLE;

    /// Prefetch distance of the GEMV weight stream, in bytes.
    const PREFETCH: usize = 2048;

    /// All 16 E2M1 values, indexed by code.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn lut() -> __m512 {
        _mm512_setr_ps(
            0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
        )
    }

    /// Decodes 16 packed bytes (blocks A and B): `(low nibbles, high nibbles)`, each as
    /// `[A's 8 values, B's 8 values]` (low nibbles are the even elements).
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn decode_pair(packed: *const u8, lut: __m512) -> (__m512, __m512) {
        unsafe {
            let d = _mm512_cvtepu8_epi32(_mm_loadu_si128(packed as *const __m128i));
            (
                _mm512_permutexvar_ps(d, lut),
                _mm512_permutexvar_ps(_mm512_srli_epi32(d, 4), lut),
            )
        }
    }

    /// Decodes 8 packed bytes (one block) into the low halves of `(low nibbles, high nibbles)`;
    /// the high halves are zero.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn decode_single(packed: *const u8, lut: __m512) -> (__m512, __m512) {
        unsafe {
            let d = _mm512_cvtepu8_epi32(_mm_loadl_epi64(packed as *const __m128i));
            (
                _mm512_permutexvar_ps(d, lut),
                _mm512_permutexvar_ps(_mm512_srli_epi32(d, 4), lut),
            )
        }
    }

    /// Sixteen E4M3 scale bytes to f32 (NaN bytes excepted, which tensors never hold): the
    /// exponent and mantissa move to f32's bit positions and `2^(127-7)` rebiases; subnormal
    /// scales become f32 subnormals, which the multiplication scales exactly.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn scales16(scales: *const u8) -> __m512 {
        unsafe {
            let d = _mm512_cvtepu8_epi32(_mm_loadu_si128(scales as *const __m128i));
            let magnitude = _mm512_slli_epi32(_mm512_and_si512(d, _mm512_set1_epi32(0x7f)), 20);
            let sign = _mm512_slli_epi32(_mm512_and_si512(d, _mm512_set1_epi32(0x80)), 24);
            let bits = _mm512_or_si512(magnitude, sign);
            _mm512_mul_ps(
                _mm512_castsi512_ps(bits),
                _mm512_set1_ps(f32::from_bits((127 + 120) << 23)),
            )
        }
    }

    /// Unscaled dot product of one NVFP4 row with the pair-permuted activation row.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn gemv_row(
        packed: *const u8,
        scales: *const u8,
        blocks: usize,
        xp: *const f32,
    ) -> f32 {
        unsafe {
            let lut = lut();
            let mut acc = [_mm512_setzero_ps(); 4];
            // Lane pattern selecting scale 2p for lanes 0..8 and 2p + 1 for lanes 8..16.
            let pattern = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
            let mut b = 0;
            while b + 16 <= blocks {
                // Software prefetch well ahead of both streams (rows are contiguous, so this
                // runs into the next row): the hardware prefetcher alone leaves the loads
                // exposed to DRAM latency.
                _mm_prefetch::<_MM_HINT_T0>(packed.add(b * 8 + PREFETCH) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(packed.add(b * 8 + PREFETCH + 64) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(scales.add(b + PREFETCH / 8) as *const i8);
                let sv = scales16(scales.add(b));
                for p in 0..8 {
                    let bb = b + 2 * p;
                    let (lo, hi) = decode_pair(packed.add(bb * 8), lut);
                    let x = xp.add(bb * 16);
                    let t = _mm512_fmadd_ps(
                        hi,
                        _mm512_loadu_ps(x.add(16)),
                        _mm512_mul_ps(lo, _mm512_loadu_ps(x)),
                    );
                    let idx = _mm512_add_epi32(pattern, _mm512_set1_epi32(2 * p as i32));
                    let s = _mm512_permutexvar_ps(idx, sv);
                    acc[p % 4] = _mm512_fmadd_ps(t, s, acc[p % 4]);
                }
                b += 16;
            }
            while b + 2 <= blocks {
                let (lo, hi) = decode_pair(packed.add(b * 8), lut);
                let x = xp.add(b * 16);
                let t = _mm512_fmadd_ps(
                    hi,
                    _mm512_loadu_ps(x.add(16)),
                    _mm512_mul_ps(lo, _mm512_loadu_ps(x)),
                );
                let s = _mm512_mask_blend_ps(
                    0xff00,
                    _mm512_set1_ps(E4M3_TABLE[*scales.add(b) as usize]),
                    _mm512_set1_ps(E4M3_TABLE[*scales.add(b + 1) as usize]),
                );
                acc[0] = _mm512_fmadd_ps(t, s, acc[0]);
                b += 2;
            }
            if b < blocks {
                // A last single block, laid out as [evens, odds].
                let (lo, hi) = decode_single(packed.add(b * 8), lut);
                let x = xp.add(b * 16);
                let t = _mm512_fmadd_ps(
                    hi,
                    _mm512_maskz_loadu_ps(0x00ff, x.add(8)),
                    _mm512_mul_ps(lo, _mm512_maskz_loadu_ps(0x00ff, x)),
                );
                let s = _mm512_set1_ps(E4M3_TABLE[*scales.add(b) as usize]);
                acc[1] = _mm512_fmadd_ps(t, s, acc[1]);
            }
            _mm512_reduce_add_ps(_mm512_add_ps(
                _mm512_add_ps(acc[0], acc[1]),
                _mm512_add_ps(acc[2], acc[3]),
            ))
        }
    }

    /// Activation rows per micro-kernel call.
    const TR: usize = 4;
    /// Weight rows per micro-kernel call.
    const TC: usize = 4;

    crate::gemm::micro::f32_tile_kernel! {
        features: "avx512f,avx2,fma",
        zero: _mm512_setzero_ps(),
        load: _mm512_loadu_ps,
        fmadd: _mm512_fmadd_ps,
        lanes: 16,
        // The upper eight lanes onto the lower eight.
        fold: |a| _mm256_add_ps(
            _mm512_castps512_ps256(a),
            _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1))
        ),
        rows: TR => [4, 3, 2],
        cols: TC => [4, 3, 2],
    }

    /// `R x C` (`C <= 4`) register-blocked bf16 dot products over `kw` (a multiple of 32),
    /// added into `y` times `scale`.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")]
    unsafe fn micro_bf16<const R: usize, const C: usize>(
        x: *const u16,
        xs: usize,
        w: *const u16,
        ws: usize,
        kw: usize,
        y: *mut f32,
        ys: usize,
        scale: f32,
    ) {
        unsafe {
            let bh = |p: *const u16| {
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p as *const __m512i))
            };
            let mut acc = [[_mm512_setzero_ps(); C]; R];
            let mut kk = 0;
            while kk < kw {
                let mut wv = [std::mem::transmute::<__m512i, __m512bh>(_mm512_setzero_si512()); C];
                for (j, v) in wv.iter_mut().enumerate() {
                    *v = bh(w.add(j * ws + kk));
                }
                for (i, row) in acc.iter_mut().enumerate() {
                    let xv = bh(x.add(i * xs + kk));
                    for (a, &wj) in row.iter_mut().zip(&wv) {
                        *a = _mm512_dpbf16_ps(*a, xv, wj);
                    }
                }
                kk += 32;
            }
            let z = _mm256_setzero_ps();
            for (i, row) in acc.iter().enumerate() {
                let half = |j: usize| {
                    if j < C {
                        let a = row[j];
                        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1));
                        _mm256_add_ps(_mm512_castps512_ps256(a), hi)
                    } else {
                        z
                    }
                };
                let mut lanes = [0.0f32; 4];
                let hsum4 = crate::gemm::avx2::imp::hsum4;
                _mm_storeu_ps(
                    lanes.as_mut_ptr(),
                    hsum4(half(0), half(1), half(2), half(3)),
                );
                for (j, &v) in lanes.iter().take(C).enumerate() {
                    *y.add(i * ys + j) += v * scale;
                }
            }
        }
    }

    /// `micro_bf16::<R, c>` for a run-time column count `c` (1..=4).
    #[inline]
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")]
    unsafe fn micro_bf16_rows<const R: usize>(
        c: usize,
        x: *const u16,
        xs: usize,
        w: *const u16,
        ws: usize,
        kw: usize,
        y: *mut f32,
        ys: usize,
        scale: f32,
    ) {
        unsafe {
            match c {
                4 => micro_bf16::<R, 4>(x, xs, w, ws, kw, y, ys, scale),
                3 => micro_bf16::<R, 3>(x, xs, w, ws, kw, y, ys, scale),
                2 => micro_bf16::<R, 2>(x, xs, w, ws, kw, y, ys, scale),
                _ => micro_bf16::<R, 1>(x, xs, w, ws, kw, y, ys, scale),
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")]
    pub(super) unsafe fn tile_bf16(t: &crate::gemm::Tile<'_, u16>, scale: f32) {
        unsafe {
            for i0 in (0..t.n).step_by(TR) {
                let r = TR.min(t.n - i0);
                let x = t.x.as_ptr().add(i0 * t.xs);
                for j0 in (0..t.mr).step_by(TC) {
                    let c = TC.min(t.mr - j0);
                    let w = t.w.as_ptr().add(j0 * t.ws);
                    let y = t.y.add(i0 * t.ys + j0);
                    let (xs, ws, kw, ys) = (t.xs, t.ws, t.kw, t.ys);
                    match r {
                        4 => micro_bf16_rows::<4>(c, x, xs, w, ws, kw, y, ys, scale),
                        3 => micro_bf16_rows::<3>(c, x, xs, w, ws, kw, y, ys, scale),
                        2 => micro_bf16_rows::<2>(c, x, xs, w, ws, kw, y, ys, scale),
                        _ => micro_bf16_rows::<1>(c, x, xs, w, ws, kw, y, ys, scale),
                    }
                }
            }
        }
    }

    /// Decodes `blocks` consecutive blocks to bf16 bits (scaled by the block scales only) in
    /// natural element order.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")]
    pub(super) unsafe fn decode_bf16(
        packed: *const u8,
        scales: *const u8,
        blocks: usize,
        dst: *mut u16,
    ) {
        unsafe {
            crate::gemm::avx2::imp::prefetch_following(packed, blocks);
            let lut = lut();
            let order_a = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
            let order_b = _mm512_add_epi32(order_a, _mm512_set1_epi32(8));
            let scale = |b: usize| _mm512_set1_ps(E4M3_TABLE[*scales.add(b) as usize]);
            let bits = |v: __m512bh| std::mem::transmute::<__m512bh, __m512i>(v);
            let mut b = 0;
            while b + 2 <= blocks {
                let (lo, hi) = decode_pair(packed.add(b * 8), lut);
                let a = _mm512_mul_ps(_mm512_permutex2var_ps(lo, order_a, hi), scale(b));
                let c = _mm512_mul_ps(_mm512_permutex2var_ps(lo, order_b, hi), scale(b + 1));
                // The second operand fills the low half: block A, then block B.
                let v = _mm512_cvtne2ps_pbh(c, a);
                _mm512_storeu_si512(dst.add(b * 16) as *mut __m512i, bits(v));
                b += 2;
            }
            if b < blocks {
                let (lo, hi) = decode_single(packed.add(b * 8), lut);
                let a = _mm512_mul_ps(_mm512_permutex2var_ps(lo, order_a, hi), scale(b));
                let v = _mm512_cvtneps_pbh(a);
                let v = std::mem::transmute::<__m256bh, __m256i>(v);
                _mm256_storeu_si256(dst.add(b * 16) as *mut __m256i, v);
            }
        }
    }

    /// Weight rows swept together per reduction slice in [`batch`].
    const GROUP: usize = 12;
    /// Blocks per reduction slice in [`batch`] (a multiple of 16, so block pairs and scale
    /// groups never straddle slices): the activation slices, `R * 512` elements, stay in L1
    /// while the group's rows sweep them.
    const SLICE_BLOCKS: usize = 32;

    /// One reduction slice (`blocks` blocks) of two weight rows (`packed`/`scales` pairs)
    /// against `R` activation rows (row stride `xs`), accumulating into `acc[row][i]`. Two
    /// weight rows share every activation load.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn batch_slice<const R: usize>(
        packed: [*const u8; 2],
        scales: [*const u8; 2],
        blocks: usize,
        x: *const f32,
        xs: usize,
        acc: &mut [[__m512; R]; 2],
    ) {
        unsafe {
            let lut = lut();
            let [mut a0, mut a1] = *acc;
            let table = |row: usize, b: usize| E4M3_TABLE[*scales[row].add(b) as usize];
            // Scaled low/high nibble values of a block pair of weight row `row`.
            let pair = |row: usize, b: usize| {
                let (lo, hi) = decode_pair(packed[row].add(b * 8), lut);
                let s = _mm512_mask_blend_ps(
                    0xff00,
                    _mm512_set1_ps(table(row, b)),
                    _mm512_set1_ps(table(row, b + 1)),
                );
                (_mm512_mul_ps(lo, s), _mm512_mul_ps(hi, s))
            };
            let mut b = 0;
            while b + 2 <= blocks {
                let (lo0, hi0) = pair(0, b);
                let (lo1, hi1) = pair(1, b);
                for i in 0..R {
                    let xi = x.add(i * xs + b * 16);
                    let (xe, xo) = (_mm512_loadu_ps(xi), _mm512_loadu_ps(xi.add(16)));
                    a0[i] = _mm512_fmadd_ps(hi0, xo, _mm512_fmadd_ps(lo0, xe, a0[i]));
                    a1[i] = _mm512_fmadd_ps(hi1, xo, _mm512_fmadd_ps(lo1, xe, a1[i]));
                }
                b += 2;
            }
            if b < blocks {
                // A last single block, laid out as [evens, odds].
                let single = |row: usize| {
                    let (lo, hi) = decode_single(packed[row].add(b * 8), lut);
                    let s = _mm512_set1_ps(table(row, b));
                    (_mm512_mul_ps(lo, s), _mm512_mul_ps(hi, s))
                };
                let (lo0, hi0) = single(0);
                let (lo1, hi1) = single(1);
                for i in 0..R {
                    let xi = x.add(i * xs + b * 16);
                    let xe = _mm512_maskz_loadu_ps(0x00ff, xi);
                    let xo = _mm512_maskz_loadu_ps(0x00ff, xi.add(8));
                    a0[i] = _mm512_fmadd_ps(hi0, xo, _mm512_fmadd_ps(lo0, xe, a0[i]));
                    a1[i] = _mm512_fmadd_ps(hi1, xo, _mm512_fmadd_ps(lo1, xe, a1[i]));
                }
            }
            *acc = [a0, a1];
        }
    }

    /// See `batch_rows`: groups of [`GROUP`] weight rows sweep the reduction axis in slices of
    /// [`SLICE_BLOCKS`] blocks, two rows at a time, so the activation slice is reused from L1
    /// by every row of the group and each weight row is read as a prefetched sequential stream.
    /// `slice(packed, scales, first_block, blocks, acc)` accumulates one slice of two rows.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn sweep<const R: usize>(
        w: &crate::quant::Nvfp4Tensor,
        rows: std::ops::Range<usize>,
        y: *mut f32,
        ys: usize,
        mut slice: impl FnMut([*const u8; 2], [*const u8; 2], usize, usize, &mut [[__m512; R]; 2]),
    ) {
        unsafe {
            let k = w.cols();
            let blocks = k / 16;
            let packed = w.packed().as_ptr();
            let scales = w.scales().as_ptr();
            for g0 in rows.clone().step_by(GROUP) {
                let rg = GROUP.min(rows.end - g0);
                let mut part = [[[_mm512_setzero_ps(); R]; 2]; GROUP / 2];
                for c0 in (0..blocks).step_by(SLICE_BLOCKS) {
                    let cb = SLICE_BLOCKS.min(blocks - c0);
                    for (pr, acc) in part.iter_mut().enumerate().take(rg.div_ceil(2)) {
                        // An odd last row is paired with itself; its duplicate is dropped.
                        let r = [g0 + 2 * pr, (g0 + 2 * pr + 1).min(g0 + rg - 1)];
                        let p = r.map(|row| packed.add(row * k / 2 + c0 * 8));
                        // Each row's next slice is needed after the rest of the group.
                        crate::gemm::avx2::imp::prefetch_following(p[0], cb);
                        crate::gemm::avx2::imp::prefetch_following(p[1], cb);
                        let sc = r.map(|row| scales.add(row * blocks + c0));
                        slice(p, sc, c0, cb, acc);
                    }
                }
                for r in 0..rg {
                    for (i, &sum) in part[r / 2][r % 2].iter().enumerate() {
                        let dot = _mm512_reduce_add_ps(sum);
                        *y.add(i * ys + g0 + r) = dot * w.global_decode_scale();
                    }
                }
            }
        }
    }

    /// `batch_rows` for `R` f32 activation rows.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn batch<const R: usize>(
        w: &crate::quant::Nvfp4Tensor,
        xp: *const f32,
        xs: usize,
        rows: std::ops::Range<usize>,
        y: *mut f32,
        ys: usize,
    ) {
        unsafe {
            sweep::<R>(w, rows, y, ys, |p, sc, c0, cb, acc| {
                batch_slice::<R>(p, sc, cb, xp.add(c0 * 16), xs, acc)
            });
        }
    }

    /// One reduction slice (`blocks`, a multiple of 16) of two weight rows against `R` bf16
    /// activation rows (raw bits, permuted as for [`gemv_row_bf16`], row stride `xs`).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")]
    unsafe fn batch_slice_bf16<const R: usize>(
        packed: [*const u8; 2],
        scales: [*const u8; 2],
        blocks: usize,
        x: *const u16,
        xs: usize,
        acc: &mut [[__m512; R]; 2],
    ) {
        unsafe {
            let bh = |v: __m512i| std::mem::transmute::<__m512i, __m512bh>(v);
            let lut = _mm512_loadu_si512(BF16_LUT.as_ptr() as *const __m512i);
            let pattern = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
            let [mut a0, mut a1] = *acc;
            let mut b = 0;
            while b + 16 <= blocks {
                let sv = [scales16(scales[0].add(b)), scales16(scales[1].add(b))];
                for g in 0..4 {
                    let bb = b + 4 * g;
                    let idx = _mm512_add_epi32(pattern, _mm512_set1_epi32(4 * g as i32));
                    let s = sv.map(|v| _mm512_permutexvar_ps(idx, v));
                    let nibbles = packed.map(|p| {
                        let d = _mm512_cvtepu8_epi16(_mm256_loadu_si256(
                            p.add(bb * 8) as *const __m256i
                        ));
                        (
                            bh(_mm512_permutexvar_epi16(d, lut)),
                            bh(_mm512_permutexvar_epi16(_mm512_srli_epi16(d, 4), lut)),
                        )
                    });
                    for i in 0..R {
                        let xi = x.add(i * xs + bb * 16);
                        let xe = bh(_mm512_loadu_si512(xi as *const __m512i));
                        let xo = bh(_mm512_loadu_si512(xi.add(32) as *const __m512i));
                        let (lo, hi) = nibbles[0];
                        let t =
                            _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), lo, xe), hi, xo);
                        a0[i] = _mm512_fmadd_ps(t, s[0], a0[i]);
                        let (lo, hi) = nibbles[1];
                        let t =
                            _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), lo, xe), hi, xo);
                        a1[i] = _mm512_fmadd_ps(t, s[1], a1[i]);
                    }
                }
                b += 16;
            }
            *acc = [a0, a1];
        }
    }

    /// `batch_rows_bf16` for `R` bf16 activation rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")]
    pub(super) unsafe fn batch_bf16<const R: usize>(
        w: &crate::quant::Nvfp4Tensor,
        xp: *const u16,
        xs: usize,
        rows: std::ops::Range<usize>,
        y: *mut f32,
        ys: usize,
    ) {
        unsafe {
            sweep::<R>(w, rows, y, ys, |p, sc, c0, cb, acc| {
                batch_slice_bf16::<R>(p, sc, cb, xp.add(c0 * 16), xs, acc)
            });
        }
    }

    /// bf16 bit patterns of the 16 E2M1 values, twice: `vpermw` reads 5 index bits, and bit
    /// 4 of an unshifted byte is a high-nibble bit.
    static BF16_LUT: [u16; 32] = {
        let half = [
            0x0000, 0x3f00, 0x3f80, 0x3fc0, 0x4000, 0x4040, 0x4080, 0x40c0, 0x8000, 0xbf00, 0xbf80,
            0xbfc0, 0xc000, 0xc040, 0xc080, 0xc0c0,
        ];
        let mut lut = [0u16; 32];
        let mut i = 0;
        while i < 32 {
            lut[i] = half[i % 16];
            i += 1;
        }
        lut
    };

    /// Unscaled-by-global dot product of one NVFP4 row (`blocks`, a multiple of 16) with a
    /// permuted bf16 activation row. Per 4 blocks (32 bytes, 64 elements): `vpmovzxbw` puts
    /// each byte in a word, two `vpermw` look up the bf16 values of its low and high nibble,
    /// and two `vdpbf16ps` multiply them into 16 f32 lanes (4 per block) before the block
    /// scales are applied.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")]
    pub(super) unsafe fn gemv_row_bf16(
        packed: *const u8,
        scales: *const u8,
        blocks: usize,
        xp: *const u16,
    ) -> f32 {
        unsafe {
            let bh = |v: __m512i| std::mem::transmute::<__m512i, __m512bh>(v);
            let lut = _mm512_loadu_si512(BF16_LUT.as_ptr() as *const __m512i);
            let mut acc = [_mm512_setzero_ps(); 4];
            // Lane i of group g takes the scale of block 4g + i / 4.
            let pattern = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
            let mut b = 0;
            while b + 16 <= blocks {
                _mm_prefetch::<_MM_HINT_T0>(packed.add(b * 8 + PREFETCH) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(packed.add(b * 8 + PREFETCH + 64) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(scales.add(b + PREFETCH / 8) as *const i8);
                let sv = scales16(scales.add(b));
                for (g, a) in acc.iter_mut().enumerate() {
                    let bb = b + 4 * g;
                    let d = _mm512_cvtepu8_epi16(_mm256_loadu_si256(
                        packed.add(bb * 8) as *const __m256i
                    ));
                    let lo = _mm512_permutexvar_epi16(d, lut);
                    let hi = _mm512_permutexvar_epi16(_mm512_srli_epi16(d, 4), lut);
                    let x = xp.add(bb * 16);
                    let xe = _mm512_loadu_si512(x as *const __m512i);
                    let xo = _mm512_loadu_si512(x.add(32) as *const __m512i);
                    let t = _mm512_dpbf16_ps(_mm512_setzero_ps(), bh(lo), bh(xe));
                    let t = _mm512_dpbf16_ps(t, bh(hi), bh(xo));
                    let idx = _mm512_add_epi32(pattern, _mm512_set1_epi32(4 * g as i32));
                    *a = _mm512_fmadd_ps(t, _mm512_permutexvar_ps(idx, sv), *a);
                }
                b += 16;
            }
            _mm512_reduce_add_ps(_mm512_add_ps(
                _mm512_add_ps(acc[0], acc[1]),
                _mm512_add_ps(acc[2], acc[3]),
            ))
        }
    }

    /// Decodes `blocks` consecutive blocks into `dst` in natural element order.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn decode(
        packed: *const u8,
        scales: *const u8,
        blocks: usize,
        table: &[f32; 256],
        dst: *mut f32,
    ) {
        unsafe {
            crate::gemm::avx2::imp::prefetch_following(packed, blocks);
            let lut = lut();
            // Interleave low (index i) and high (index 16 + i) nibble values back into
            // element order, for block A (lanes 0..8) and block B (lanes 8..16).
            let order_a = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
            let order_b = _mm512_add_epi32(order_a, _mm512_set1_epi32(8));
            let scale = |b: usize| _mm512_set1_ps(table[*scales.add(b) as usize]);
            let mut b = 0;
            while b + 2 <= blocks {
                let (lo, hi) = decode_pair(packed.add(b * 8), lut);
                let a = _mm512_permutex2var_ps(lo, order_a, hi);
                let c = _mm512_permutex2var_ps(lo, order_b, hi);
                _mm512_storeu_ps(dst.add(b * 16), _mm512_mul_ps(a, scale(b)));
                _mm512_storeu_ps(dst.add(b * 16 + 16), _mm512_mul_ps(c, scale(b + 1)));
                b += 2;
            }
            if b < blocks {
                let (lo, hi) = decode_single(packed.add(b * 8), lut);
                let a = _mm512_permutex2var_ps(lo, order_a, hi);
                _mm512_storeu_ps(dst.add(b * 16), _mm512_mul_ps(a, scale(b)));
            }
        }
    }
}
