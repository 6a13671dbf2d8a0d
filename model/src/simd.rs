//! Inner loops of the inference engine (SSM update, causal conv, attention, small-batch
//! matrix-vector products) and of the fused training ops ([`crate::fused`]: the scan's and
//! attention's backward passes), written so the compiler vectorises them, and compiled twice:
//! for AVX2/FMA, chosen at run time, and for the baseline target. The SSM update and the
//! scan's backward step also have AVX-512 kernels of their own (see [`ssm_head`]).

/// Runs `$body` compiled with AVX2+FMA when the CPU has them, otherwise the portable build.
macro_rules! dispatch {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn portable($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { portable($($arg),*) }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports the features `avx2` is compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            portable($($arg),*)
        }
    };
}

#[inline(always)]
fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// One Mamba-2 head for one token: `state[p, n] = state[p, n] * da + dt * x[p] * b[n]`,
/// `y[p] = sum_n state[p, n] c[n] + d * x[p]`. At batch 64 the states of all sequences no longer
/// fit in cache and this update streams them from memory once per token, so it is written to
/// touch each state element once: on AVX-512, with `b` and `c` held in registers.
#[allow(clippy::too_many_arguments)]
pub fn ssm_head(
    state: &mut [f32],
    da: f32,
    dt: f32,
    d: f32,
    x: &[f32],
    b: &[f32],
    c: &[f32],
    y: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if ssm_avx512_takes(b.len()) {
            // SAFETY: the CPU has AVX-512F; the shapes were checked just above and by the
            // asserts inside.
            unsafe { ssm_head_avx512(state, da, dt, d, x, b, c, y) };
            return;
        }
    }
    ssm_head_portable(state, da, dt, d, x, b, c, y)
}

/// The widest state (in 16-lane vectors) whose `b` and `c` fit in AVX-512 registers.
#[cfg(target_arch = "x86_64")]
const SSM_AVX512_MAX_VECTORS: usize = 8;

/// Whether the AVX-512 kernels of the SSM step ([`ssm_head`], [`ssm_head_backward`]) take a
/// state of width `ns`.
#[cfg(target_arch = "x86_64")]
fn ssm_avx512_takes(ns: usize) -> bool {
    ns.is_multiple_of(16) && ns <= 16 * SSM_AVX512_MAX_VECTORS && avx512_available()
}

/// `v` (16 to `16 * SSM_AVX512_MAX_VECTORS` values, a multiple of 16) as AVX-512 registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn ssm_vectors(v: &[f32]) -> [std::arch::x86_64::__m512; SSM_AVX512_MAX_VECTORS] {
    use std::arch::x86_64::*;
    assert!(v.len().is_multiple_of(16) && v.len() <= 16 * SSM_AVX512_MAX_VECTORS);
    let mut out = [_mm512_setzero_ps(); SSM_AVX512_MAX_VECTORS];
    for (j, o) in out.iter_mut().enumerate().take(v.len() / 16) {
        // SAFETY: j * 16 + 16 <= v.len().
        *o = unsafe { _mm512_loadu_ps(v.as_ptr().add(16 * j)) };
    }
    out
}

#[cfg(target_arch = "x86_64")]
fn avx512_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| std::is_x86_feature_detected!("avx512f"))
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn ssm_head_avx512(
    state: &mut [f32],
    da: f32,
    dt: f32,
    d: f32,
    x: &[f32],
    b: &[f32],
    c: &[f32],
    y: &mut [f32],
) {
    use std::arch::x86_64::*;
    let ns = b.len();
    let vectors = ns / 16;
    assert!(ns.is_multiple_of(16) && vectors <= SSM_AVX512_MAX_VECTORS && c.len() == ns);
    assert!(state.len() == x.len() * ns && y.len() == x.len());
    let (bv, cv) = (ssm_vectors(b), ssm_vectors(c));
    let decay = _mm512_set1_ps(da);
    // The new state of row `p` (written back), and its products with `c` still in 16 lanes.
    let row_update = |row: &mut [f32], xv: f32| {
        let dx = _mm512_set1_ps(dt * xv);
        let mut acc = _mm512_setzero_ps();
        for j in 0..vectors {
            // SAFETY: j * 16 + 16 <= ns = row.len().
            unsafe {
                let at = row.as_mut_ptr().add(16 * j);
                let s = _mm512_fmadd_ps(_mm512_loadu_ps(at), decay, _mm512_mul_ps(dx, bv[j]));
                _mm512_storeu_ps(at, s);
                acc = _mm512_fmadd_ps(s, cv[j], acc);
            }
        }
        acc
    };
    // Rows in groups of 16, whose 16 sums are reduced together: one tree of shuffles for 16
    // outputs instead of a horizontal reduction per row (which cost about as many instructions
    // as the row's update).
    let groups = x.len() / 16;
    let (state_grouped, state_rest) = state.split_at_mut(groups * 16 * ns);
    for (g, rows) in state_grouped.chunks_exact_mut(16 * ns).enumerate() {
        let xs = &x[g * 16..g * 16 + 16];
        let mut acc = [_mm512_setzero_ps(); 16];
        for ((a, row), &xv) in acc.iter_mut().zip(rows.chunks_exact_mut(ns)).zip(xs) {
            *a = row_update(row, xv);
        }
        // SAFETY: xs and y[g * 16..] hold 16 elements each.
        unsafe {
            let xv = _mm512_loadu_ps(xs.as_ptr());
            let out = _mm512_add_ps(sum_lanes16(&acc), _mm512_mul_ps(_mm512_set1_ps(d), xv));
            _mm512_storeu_ps(y.as_mut_ptr().add(g * 16), out);
        }
    }
    let tail = groups * 16..x.len();
    for ((row, &xv), yv) in state_rest
        .chunks_exact_mut(ns)
        .zip(&x[tail.clone()])
        .zip(&mut y[tail])
    {
        *yv = _mm512_reduce_add_ps(row_update(row, xv)) + d * xv;
    }
}

/// Lane `i` of the result is the sum of the 16 lanes of `v[i]`: pairs of vectors are
/// interleaved and added, halving the vectors and the lanes each holds, four times.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn sum_lanes16(v: &[std::arch::x86_64::__m512; 16]) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // Each 128-bit lane of t[k]: partial sums of v[2k], v[2k + 1], v[2k], v[2k + 1].
    let t: [__m512; 8] = std::array::from_fn(|k| {
        let (a, b) = (v[2 * k], v[2 * k + 1]);
        _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b))
    });
    // Each 128-bit lane of u[k]: partial sums of v[4k..4k + 4], in order.
    let u: [__m512; 4] = std::array::from_fn(|k| {
        let (a, b) = (_mm512_castps_pd(t[2 * k]), _mm512_castps_pd(t[2 * k + 1]));
        _mm512_add_ps(
            _mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
            _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)),
        )
    });
    // Then the four 128-bit lanes: [L0, L2] + [L1, L3] of two vectors, twice.
    let halve = |a: __m512, b: __m512| {
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
        )
    };
    halve(halve(u[0], u[1]), halve(u[2], u[3]))
}

dispatch! {
    /// [`ssm_head`] for any state width, vectorised by the compiler.
    fn ssm_head_portable(state: &mut [f32], da: f32, dt: f32, d: f32, x: &[f32], b: &[f32], c: &[f32], y: &mut [f32]) {
        let ns = b.len();
        for ((row, &xv), yv) in state.chunks_exact_mut(ns).zip(x).zip(y.iter_mut()) {
            let dx = dt * xv;
            for (s, &bv) in row.iter_mut().zip(b) {
                *s = *s * da + dx * bv;
            }
            *yv = dot8(row, c) + d * xv;
        }
    }
}

dispatch! {
    /// The state update of [`ssm_head`] alone, from `prev` into `next`:
    /// `next[p, n] = prev[p, n] * da + dt * x[p] * b[n]` (the training scan's backward pass
    /// recomputes a segment's states with it).
    fn ssm_state_step(prev: &[f32], next: &mut [f32], da: f32, dt: f32, x: &[f32], b: &[f32]) {
        let ns = b.len();
        for ((src, dst), &xv) in prev.chunks_exact(ns).zip(next.chunks_exact_mut(ns)).zip(x) {
            let dx = dt * xv;
            for ((d, &s), &bv) in dst.iter_mut().zip(src).zip(b) {
                *d = s * da + dx * bv;
            }
        }
    }
}

/// One step of the SSM scan's backward pass, for one head, walking time backwards.
///
/// The step was `s_t = da * s_prev + (dt x) bᵀ`, `y = s_t c`. On entry `ds` holds the gradient
/// reaching `s_t` from later steps; `dy` is the gradient of `y`. Adds this step's gradients of
/// `c` and `b` into `dc` and `db`, writes the gradient of `dt * x` into `du`, leaves in `ds`
/// the gradient reaching `s_prev` (`da` times that of `s_t`), and returns the gradient of `da`.
/// On AVX-512 (state widths of 16 to 128 in steps of 16) `db` and `dc` stay in registers over
/// all rows and the rows' sums for `du` are reduced 16 at a time, as [`ssm_head`] does; the
/// compiler's 8-lane loop summed each row's 8 lanes one after another, which took about half
/// its time.
#[allow(clippy::too_many_arguments)]
pub fn ssm_head_backward(
    ds: &mut [f32],
    da: f32,
    dt: f32,
    x: &[f32],
    b: &[f32],
    c: &[f32],
    dy: &[f32],
    state: &[f32],
    prev: &[f32],
    db: &mut [f32],
    dc: &mut [f32],
    du: &mut [f32],
) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if ssm_avx512_takes(b.len()) {
            // SAFETY: the CPU has AVX-512F; the shapes were checked just above and by the
            // asserts inside.
            return unsafe {
                ssm_head_backward_avx512(ds, da, dt, x, b, c, dy, state, prev, db, dc, du)
            };
        }
    }
    ssm_head_backward_portable(ds, da, dt, x, b, c, dy, state, prev, db, dc, du)
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn ssm_head_backward_avx512(
    ds: &mut [f32],
    da: f32,
    dt: f32,
    x: &[f32],
    b: &[f32],
    c: &[f32],
    dy: &[f32],
    state: &[f32],
    prev: &[f32],
    db: &mut [f32],
    dc: &mut [f32],
    du: &mut [f32],
) -> f32 {
    use std::arch::x86_64::*;
    let ns = b.len();
    let vectors = ns / 16;
    let rows = x.len();
    assert!(ns.is_multiple_of(16) && vectors <= SSM_AVX512_MAX_VECTORS);
    assert!(c.len() == ns && db.len() == ns && dc.len() == ns);
    assert!(dy.len() == rows && du.len() == rows);
    assert!(ds.len() == rows * ns && state.len() == rows * ns && prev.len() == rows * ns);
    let zero = _mm512_setzero_ps();
    let (bv, cv) = (ssm_vectors(b), ssm_vectors(c));
    let (mut dbv, mut dcv) = (ssm_vectors(db), ssm_vectors(dc));
    let decay = _mm512_set1_ps(da);
    let mut dda = zero;
    // Row `p`: its `ds` updated in place, `db`, `dc` and `dda` accumulated; returns the row's
    // products for `du` still in 16 lanes.
    let mut row = |p: usize| {
        let (gy, u) = (_mm512_set1_ps(dy[p]), _mm512_set1_ps(dt * x[p]));
        let mut acc = zero;
        for j in 0..vectors {
            let at = p * ns + 16 * j;
            // SAFETY: at + 16 <= rows * ns, the length of ds, state and prev.
            unsafe {
                let g = _mm512_fmadd_ps(gy, cv[j], _mm512_loadu_ps(ds.as_ptr().add(at)));
                dcv[j] = _mm512_fmadd_ps(gy, _mm512_loadu_ps(state.as_ptr().add(at)), dcv[j]);
                acc = _mm512_fmadd_ps(g, bv[j], acc);
                dda = _mm512_fmadd_ps(g, _mm512_loadu_ps(prev.as_ptr().add(at)), dda);
                dbv[j] = _mm512_fmadd_ps(u, g, dbv[j]);
                _mm512_storeu_ps(ds.as_mut_ptr().add(at), _mm512_mul_ps(g, decay));
            }
        }
        acc
    };
    let groups = rows / 16;
    for g in 0..groups {
        let mut acc = [zero; 16];
        for (i, a) in acc.iter_mut().enumerate() {
            *a = row(g * 16 + i);
        }
        // SAFETY: du holds rows >= g * 16 + 16 values.
        unsafe { _mm512_storeu_ps(du.as_mut_ptr().add(g * 16), sum_lanes16(&acc)) };
    }
    for (p, out) in du.iter_mut().enumerate().skip(groups * 16) {
        *out = _mm512_reduce_add_ps(row(p));
    }
    for j in 0..vectors {
        // SAFETY: j * 16 + 16 <= ns, the length of db and dc.
        unsafe {
            _mm512_storeu_ps(db.as_mut_ptr().add(16 * j), dbv[j]);
            _mm512_storeu_ps(dc.as_mut_ptr().add(16 * j), dcv[j]);
        }
    }
    _mm512_reduce_add_ps(dda)
}

dispatch! {
    /// [`ssm_head_backward`] for any state width, vectorised by the compiler.
    ///
    /// The step was `s_t = da * s_prev + (dt x) bᵀ`, `y = s_t c`. On entry `ds` holds the
    /// gradient reaching `s_t` from later steps; `dy` is the gradient of `y`. Adds this step's
    /// gradients of `c` and `b` into `dc` and `db`, writes the gradient of `dt * x` into `du`,
    /// leaves in `ds` the gradient reaching `s_prev` (`da` times that of `s_t`), and returns the
    /// gradient of `da`.
    fn ssm_head_backward_portable(ds: &mut [f32], da: f32, dt: f32, x: &[f32], b: &[f32], c: &[f32], dy: &[f32], state: &[f32], prev: &[f32], db: &mut [f32], dc: &mut [f32], du: &mut [f32]) -> f32 {
        let ns = b.len();
        let mut dda = [0f32; 8];
        let rows = ds.chunks_exact_mut(ns).zip(state.chunks_exact(ns)).zip(prev.chunks_exact(ns));
        for ((((g, s), sp), (&gy, &xv)), dup) in rows.zip(dy.iter().zip(x)).zip(du.iter_mut()) {
            let u = dt * xv;
            let mut acc_u = [0f32; 8];
            let chunks = g.chunks_exact_mut(8).zip(s.chunks_exact(8)).zip(sp.chunks_exact(8));
            let vecs = b.chunks_exact(8).zip(c.chunks_exact(8)).zip(db.chunks_exact_mut(8).zip(dc.chunks_exact_mut(8)));
            for (((g8, s8), sp8), ((b8, c8), (db8, dc8))) in chunks.zip(vecs) {
                for i in 0..8 {
                    let gi = g8[i] + gy * c8[i];
                    dc8[i] += gy * s8[i];
                    acc_u[i] += gi * b8[i];
                    dda[i] += gi * sp8[i];
                    db8[i] += u * gi;
                    g8[i] = gi * da;
                }
            }
            let mut sum_u = acc_u.iter().sum::<f32>();
            for i in ns - ns % 8..ns {
                let gi = g[i] + gy * c[i];
                dc[i] += gy * s[i];
                sum_u += gi * b[i];
                dda[i % 8] += gi * sp[i];
                db[i] += u * gi;
                g[i] = gi * da;
            }
            *dup = sum_u;
        }
        dda.iter().sum()
    }
}

dispatch! {
    /// The training attention's forward pass for one query row: `out = softmax(scale * q ·
    /// keys[..visible]) values[..visible]`, keys and values rows `stride` apart from `offset`.
    /// Writes `out`, returns the log-sum-exp of the scaled scores (what the backward pass needs
    /// to recompute the probabilities).
    fn attention_row(q: &[f32], keys: &[f32], values: &[f32], stride: usize, offset: usize, visible: usize, scale: f32, scores: &mut Vec<f32>, out: &mut [f32]) -> f32 {
        let hd = q.len();
        scores.clear();
        scores.extend((0..visible).map(|t| dot8(q, &keys[t * stride + offset..][..hd]) * scale));
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        out.fill(0.0);
        let inv = 1.0 / sum;
        for (t, &p) in scores.iter().enumerate() {
            let p = p * inv;
            for (o, &v) in out.iter_mut().zip(&values[t * stride + offset..][..hd]) {
                *o += p * v;
            }
        }
        max + sum.ln()
    }
}

dispatch! {
    /// The backward pass of [`attention_row`] for one query row, given its output `out`, the
    /// output's gradient `d_out` and the row's log-sum-exp `lse`: writes the query's gradient
    /// into `dq` and adds the keys' and values' into `dk` and `dv` (laid out like `keys`).
    fn attention_row_backward(q: &[f32], keys: &[f32], values: &[f32], stride: usize, offset: usize, visible: usize, scale: f32, lse: f32, out: &[f32], d_out: &[f32], dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]) {
        let hd = q.len();
        let delta = dot8(d_out, out);
        dq.fill(0.0);
        for t in 0..visible {
            let at = t * stride + offset;
            let k = &keys[at..][..hd];
            let p = (dot8(q, k) * scale - lse).exp();
            let dp = dot8(d_out, &values[at..][..hd]);
            let ds = p * (dp - delta) * scale;
            for (g, &kv) in dq.iter_mut().zip(k) {
                *g += ds * kv;
            }
            for (g, &dov) in dv[at..][..hd].iter_mut().zip(d_out) {
                *g += p * dov;
            }
            for (g, &qv) in dk[at..][..hd].iter_mut().zip(q) {
                *g += ds * qv;
            }
        }
    }
}

dispatch! {
    /// Causal depthwise conv for one token: `out[c] = bias[c] + sum_j w_t[j][c] * window[j][c]`
    /// over the `K-1` cached inputs followed by `current`, then SiLU. `w_t` is `[K, C]`.
    fn conv_step(w_t: &[f32], bias: &[f32], history: &[f32], current: &[f32], out: &mut [f32]) {
        let cd = bias.len();
        out.copy_from_slice(bias);
        let k = w_t.len() / cd;
        for (j, wj) in w_t.chunks_exact(cd).enumerate() {
            let src = if j + 1 == k { current } else { &history[j * cd..(j + 1) * cd] };
            for ((o, &w), &s) in out.iter_mut().zip(wj).zip(src) {
                *o += w * s;
            }
        }
        for o in out.iter_mut() {
            *o /= 1.0 + (-*o).exp();
        }
    }
}

dispatch! {
    /// One query head attending over `visible` cached positions of its KV head:
    /// keys/values rows are `stride` apart starting at `offset`. Adds the result to `out`.
    fn attend_head(q: &[f32], keys: &[f32], values: &[f32], stride: usize, offset: usize, visible: usize, scale: f32, scores: &mut Vec<f32>, out: &mut [f32]) {
        let hd = q.len();
        scores.clear();
        scores.extend((0..visible).map(|t| dot8(q, &keys[t * stride + offset..t * stride + offset + hd]) * scale));
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        for (t, &p) in scores.iter().enumerate() {
            let p = p * inv;
            let v = &values[t * stride + offset..t * stride + offset + hd];
            for (o, &vv) in out.iter_mut().zip(v) {
                *o += p * vv;
            }
        }
    }
}

/// `y[o, r] = w[o, :] . x[r, :]` for the weight rows `w` (`[m, k]`) and activation rows `x`
/// (`[rows, k]`), output-major: each weight row is read once, for every activation row while
/// it sits in L1. Every output is one [`dot_stream`] of the same two rows, whatever `rows` is.
pub fn gemv_rows(w: &[f32], k: usize, x: &[f32], y: &mut [f32]) {
    let rows = x.len() / k;
    for (wr, yo) in w.chunks_exact(k).zip(y.chunks_exact_mut(rows)) {
        for (xr, v) in x.chunks_exact(k).zip(yo.iter_mut()) {
            *v = dot_stream(wr, xr);
        }
    }
}

/// A dot product for rows streamed from memory: four independent vector accumulators with
/// fused multiply-adds (AVX-512 or AVX2, chosen at run time), so a 512-wide weight row is bound
/// by its loads rather than by the latency of one chain of additions.
#[inline]
pub fn dot_stream(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    {
        if avx512_available() {
            // SAFETY: the CPU has AVX-512F; the lengths are equal.
            return unsafe { dot_stream_avx512(a, b) };
        }
        if avx2_fma_available() {
            // SAFETY: the CPU has AVX2 and FMA; the lengths are equal.
            return unsafe { dot_stream_avx2(a, b) };
        }
    }
    dot8(a, b)
}

#[cfg(target_arch = "x86_64")]
fn avx2_fma_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_stream_avx512(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY (all loads): i + 16 * (j + 1) <= n = a.len() = b.len().
    while i + 64 <= n {
        for (j, s) in acc.iter_mut().enumerate() {
            let at = i + 16 * j;
            *s = unsafe {
                _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(at)), _mm512_loadu_ps(pb.add(at)), *s)
            };
        }
        i += 64;
    }
    while i + 16 <= n {
        acc[0] = unsafe {
            _mm512_fmadd_ps(
                _mm512_loadu_ps(pa.add(i)),
                _mm512_loadu_ps(pb.add(i)),
                acc[0],
            )
        };
        i += 16;
    }
    let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    _mm512_reduce_add_ps(sum) + dot8(&a[i..], &b[i..])
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_stream_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY (all loads): i + 8 * (j + 1) <= n = a.len() = b.len().
    while i + 32 <= n {
        for (j, s) in acc.iter_mut().enumerate() {
            let at = i + 8 * j;
            *s = unsafe {
                _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(at)), _mm256_loadu_ps(pb.add(at)), *s)
            };
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = unsafe {
            _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i)),
                _mm256_loadu_ps(pb.add(i)),
                acc[0],
            )
        };
        i += 8;
    }
    let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let half = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
    let mut lanes = [0f32; 4];
    // SAFETY: `lanes` holds four f32.
    unsafe { _mm_storeu_ps(lanes.as_mut_ptr(), half) };
    lanes.iter().sum::<f32>() + dot8(&a[i..], &b[i..])
}

dispatch! {
    /// `acc += w * x`.
    fn axpy(acc: &mut [f32], w: f32, x: &[f32]) {
        for (a, &v) in acc.iter_mut().zip(x) {
            *a += w * v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values uniform in [-0.5, 0.5) from a linear congruential generator seeded with `seed`.
    fn uniform(mut seed: u32) -> impl FnMut() -> f32 {
        move || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        }
    }

    /// `(state width, head width)` pairs for the SSM step's tests: widths the AVX-512 kernels
    /// take (multiples of 16 up to 128) and ones they leave to the portable loop (not a multiple
    /// of 16, wider than its registers hold); head widths below 16 (every row reduced alone), of
    /// whole groups of 16 rows, and with a rest.
    fn ssm_shapes() -> impl Iterator<Item = (usize, usize)> {
        [8, 16, 24, 64, 128, 144]
            .into_iter()
            .flat_map(|ns| [(ns, 5), (ns, 32), (ns, 37)])
    }

    /// The update in f64, as the definition reads.
    fn ssm_reference(
        state: &mut [f64],
        da: f64,
        dt: f64,
        d: f64,
        x: &[f64],
        b: &[f64],
        c: &[f64],
    ) -> Vec<f64> {
        let ns = b.len();
        x.iter()
            .enumerate()
            .map(|(p, &xv)| {
                let row = &mut state[p * ns..(p + 1) * ns];
                for (s, &bv) in row.iter_mut().zip(b) {
                    *s = *s * da + dt * xv * bv;
                }
                row.iter().zip(c).map(|(s, cv)| s * cv).sum::<f64>() + d * xv
            })
            .collect()
    }

    #[test]
    fn every_dot_product_path_matches_the_definition_at_every_tail_length() {
        let mut next = uniform(11);
        for n in [0, 1, 7, 8, 15, 16, 31, 33, 63, 64, 65, 100, 130, 512, 1030] {
            let a: Vec<f32> = (0..n).map(|_| next()).collect();
            let b: Vec<f32> = (0..n).map(|_| next()).collect();
            let exact: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            let tolerance = 1e-5 * (n as f64).sqrt().max(1.0);
            let mut paths: Vec<(&str, f32)> = vec![
                ("dispatched", dot_stream(&a, &b)),
                ("portable", dot8(&a, &b)),
            ];
            #[cfg(target_arch = "x86_64")]
            {
                if avx2_fma_available() {
                    // SAFETY: the CPU has AVX2 and FMA; the lengths are equal.
                    paths.push(("avx2", unsafe { dot_stream_avx2(&a, &b) }));
                }
                if avx512_available() {
                    // SAFETY: the CPU has AVX-512F; the lengths are equal.
                    paths.push(("avx512", unsafe { dot_stream_avx512(&a, &b) }));
                }
            }
            for (path, got) in paths {
                assert!(
                    (got as f64 - exact).abs() <= tolerance,
                    "{path} at length {n}: {got} against {exact}"
                );
            }
        }
    }

    #[test]
    fn ssm_head_matches_the_definition_for_every_state_width() {
        let mut next = uniform(3);
        for (ns, hd) in ssm_shapes() {
            let mut state: Vec<f32> = (0..hd * ns).map(|_| next()).collect();
            let mut exact: Vec<f64> = state.iter().map(|&v| v as f64).collect();
            let (x, b, c): (Vec<f32>, Vec<f32>, Vec<f32>) = (
                (0..hd).map(|_| next()).collect(),
                (0..ns).map(|_| next()).collect(),
                (0..ns).map(|_| next()).collect(),
            );
            let f = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<_>>();
            // Three tokens in a row, so the state carries over.
            for _ in 0..3 {
                let mut y = vec![f32::NAN; hd];
                ssm_head(&mut state, 0.9, 0.05, 0.7, &x, &b, &c, &mut y);
                let want = ssm_reference(
                    &mut exact,
                    0.9f32 as f64,
                    0.05f32 as f64,
                    0.7f32 as f64,
                    &f(&x),
                    &f(&b),
                    &f(&c),
                );
                for (got, want) in y.iter().zip(&want) {
                    assert!(
                        (*got as f64 - want).abs() < 1e-5,
                        "ns {ns}, hd {hd}: y {got} vs {want}"
                    );
                }
                for (got, want) in state.iter().zip(&exact) {
                    assert!(
                        (*got as f64 - want).abs() < 1e-5,
                        "ns {ns}, hd {hd}: state {got} vs {want}"
                    );
                }
            }
        }
    }

    /// The backward step in f64, as [`ssm_head_backward`]'s definition reads; returns `dda`.
    #[allow(clippy::too_many_arguments)]
    fn ssm_backward_reference(
        ds: &mut [f64],
        da: f64,
        dt: f64,
        x: &[f64],
        b: &[f64],
        c: &[f64],
        dy: &[f64],
        state: &[f64],
        prev: &[f64],
        db: &mut [f64],
        dc: &mut [f64],
        du: &mut [f64],
    ) -> f64 {
        let ns = b.len();
        let mut dda = 0.0;
        for p in 0..x.len() {
            du[p] = 0.0;
            for n in 0..ns {
                let at = p * ns + n;
                let g = ds[at] + dy[p] * c[n];
                dc[n] += dy[p] * state[at];
                du[p] += g * b[n];
                dda += g * prev[at];
                db[n] += dt * x[p] * g;
                ds[at] = g * da;
            }
        }
        dda
    }

    #[test]
    fn ssm_head_backward_matches_the_definition_for_every_state_width() {
        let mut next = uniform(5);
        for (ns, hd) in ssm_shapes() {
            let mut draw = |n: usize| (0..n).map(|_| next()).collect::<Vec<f32>>();
            let (x, b, c, dy) = (draw(hd), draw(ns), draw(ns), draw(hd));
            let (state, prev) = (draw(hd * ns), draw(hd * ns));
            let (mut ds, mut db, mut dc) = (draw(hd * ns), draw(ns), draw(ns));
            let f = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<_>>();
            let (mut ds_want, mut db_want, mut dc_want) = (f(&ds), f(&db), f(&dc));
            let mut du_want = vec![0f64; hd];
            // Two steps in a row, so what the first leaves in ds, db and dc carries over.
            for _ in 0..2 {
                let mut du = vec![f32::NAN; hd];
                let dda = ssm_head_backward(
                    &mut ds, 0.9, 0.05, &x, &b, &c, &dy, &state, &prev, &mut db, &mut dc, &mut du,
                );
                let dda_want = ssm_backward_reference(
                    &mut ds_want,
                    0.9f32 as f64,
                    0.05f32 as f64,
                    &f(&x),
                    &f(&b),
                    &f(&c),
                    &f(&dy),
                    &f(&state),
                    &f(&prev),
                    &mut db_want,
                    &mut dc_want,
                    &mut du_want,
                );
                let close = |what: &str, got: &[f32], want: &[f64]| {
                    for (g, w) in got.iter().zip(want) {
                        assert!(
                            (*g as f64 - w).abs() < 1e-4,
                            "ns {ns}, hd {hd}: {what} {g} vs {w}"
                        );
                    }
                };
                close("dda", &[dda], &[dda_want]);
                close("du", &du, &du_want);
                close("ds", &ds, &ds_want);
                close("db", &db, &db_want);
                close("dc", &dc, &dc_want);
            }
        }
    }
}
