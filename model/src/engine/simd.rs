//! The engine's per-sequence inner loops (SSM update, causal conv, attention), written so the
//! compiler vectorises them, and compiled twice: for AVX2/FMA, chosen at run time, and for the
//! baseline target.

/// Runs `$body` compiled with AVX2+FMA when the CPU has them, otherwise the portable build.
macro_rules! dispatch {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        pub fn $name($($arg: $ty),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn portable($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) { portable($($arg),*) }
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

dispatch! {
    /// One Mamba-2 head for one token: `state[p, n] = state[p, n] * da + dt * x[p] * b[n]`,
    /// `y[p] = sum_n state[p, n] c[n] + d * x[p]`.
    fn ssm_head(state: &mut [f32], da: f32, dt: f32, d: f32, x: &[f32], b: &[f32], c: &[f32], y: &mut [f32]) {
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

dispatch! {
    /// `acc += w * x`.
    fn axpy(acc: &mut [f32], w: f32, x: &[f32]) {
        for (a, &v) in acc.iter_mut().zip(x) {
            *a += w * v;
        }
    }
}
