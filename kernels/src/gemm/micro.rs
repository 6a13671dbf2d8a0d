//! The f32 micro-kernel and tile loop that the AVX2 and AVX-512 backends share, written once
//! as a macro that each backend expands inside its own `imp` module with its vector type,
//! lane count, intrinsics and tile shape.
//!
//! A macro rather than a trait over the vector width: every generated function carries its
//! backend's `#[target_feature]`, so the intrinsics inline into it exactly as in hand-written
//! code. Generic functions without those features would depend on the inliner to flatten
//! trait methods first, which nothing guarantees, and a missed inline in the inner loop costs
//! a call per FMA.
//!
//! The arithmetic is the same in both expansions: per output, `R x C` accumulators of
//! `x * w` FMAs over `k`, each accumulator folded to 8 lanes (`fold`, the identity for AVX2),
//! then four horizontal sums at once with [`hsum4`](super::avx2::imp::hsum4) (absent columns
//! summed as zeros), added into `y`.

/// Expands to `micro`, `micro_rows` and `pub(super) tile` in the calling module.
///
/// - `features`: the backend's `target_feature` list;
/// - `zero`, `load`, `fmadd`: the vector type's zero, unaligned load and fused multiply-add;
/// - `lanes`: f32 lanes of the vector (the `kw` step; `kw` is a multiple of it);
/// - `fold |v| expr`: one accumulator to an `__m256` whose lanes sum to the same total;
/// - `rows`/`cols`: activation rows and weight rows per micro-kernel call (`cols <= 4`), with
///   every count above 1 that a partial tile can leave, largest first.
macro_rules! f32_tile_kernel {
    (
        features: $features:literal,
        zero: $zero:expr,
        load: $load:path,
        fmadd: $fmadd:path,
        lanes: $lanes:literal,
        fold: |$v:ident| $fold:expr,
        rows: $tr:expr => [$($r:literal),+],
        cols: $tc:expr => [$($c:literal),+] $(,)?
    ) => {
        /// `R x C` register-blocked dot products over `kw`, added into `y`.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn micro<const R: usize, const C: usize>(
            x: *const f32,
            xs: usize,
            w: *const f32,
            ws: usize,
            kw: usize,
            y: *mut f32,
            ys: usize,
        ) {
            const { assert!(C <= 4) };
            unsafe {
                let mut acc = [[$zero; C]; R];
                let mut kk = 0;
                while kk < kw {
                    let mut wv = [$zero; C];
                    for (j, v) in wv.iter_mut().enumerate() {
                        *v = $load(w.add(j * ws + kk));
                    }
                    for (i, row) in acc.iter_mut().enumerate() {
                        let xv = $load(x.add(i * xs + kk));
                        for (a, &wj) in row.iter_mut().zip(&wv) {
                            *a = $fmadd(xv, wj, *a);
                        }
                    }
                    kk += $lanes;
                }
                let z = ::std::arch::x86_64::_mm256_setzero_ps();
                for (i, row) in acc.iter().enumerate() {
                    let part = |j: usize| {
                        if j < C {
                            let $v = row[j];
                            $fold
                        } else {
                            z
                        }
                    };
                    let mut lanes = [0.0f32; 4];
                    ::std::arch::x86_64::_mm_storeu_ps(
                        lanes.as_mut_ptr(),
                        $crate::gemm::avx2::imp::hsum4(part(0), part(1), part(2), part(3)),
                    );
                    for (j, &s) in lanes.iter().take(C).enumerate() {
                        *y.add(i * ys + j) += s;
                    }
                }
            }
        }

        /// `micro::<R, c>` for a run-time column count `c`.
        #[inline]
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = $features)]
        unsafe fn micro_rows<const R: usize>(
            c: usize,
            x: *const f32,
            xs: usize,
            w: *const f32,
            ws: usize,
            kw: usize,
            y: *mut f32,
            ys: usize,
        ) {
            unsafe {
                match c {
                    $($c => micro::<R, $c>(x, xs, w, ws, kw, y, ys),)+
                    _ => micro::<R, 1>(x, xs, w, ws, kw, y, ys),
                }
            }
        }

        /// The tile's products, `rows x cols` outputs at a time.
        #[target_feature(enable = $features)]
        pub(super) unsafe fn tile(t: &$crate::gemm::Tile<'_, f32>) {
            unsafe {
                for i0 in (0..t.n).step_by($tr) {
                    let r = usize::min($tr, t.n - i0);
                    let x = t.x.as_ptr().add(i0 * t.xs);
                    for j0 in (0..t.mr).step_by($tc) {
                        let c = usize::min($tc, t.mr - j0);
                        let w = t.w.as_ptr().add(j0 * t.ws);
                        let y = t.y.add(i0 * t.ys + j0);
                        match r {
                            $($r => micro_rows::<$r>(c, x, t.xs, w, t.ws, t.kw, y, t.ys),)+
                            _ => micro_rows::<1>(c, x, t.xs, w, t.ws, t.kw, y, t.ys),
                        }
                    }
                }
            }
        }
    };
}

pub(super) use f32_tile_kernel;
