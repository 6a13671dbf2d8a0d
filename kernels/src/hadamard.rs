//! The 16x16 random Hadamard transform of the NVFP4 training recipe.
//!
//! `H = diag(s) * H16 / 4`, where `H16` is the Sylvester Hadamard matrix
//! (`H16[i][j] = (-1)^popcount(i & j)`) and `s` is [`HADAMARD_SIGNS`]. `H` is orthonormal,
//! so `H^T` is its inverse. The forward transform maps every contiguous 16-element chunk `x`
//! of a row to `H x`; applying it to both operands along the reduction axis leaves a GEMM's
//! result unchanged (`(H x) . (H w) = x . w`) while spreading outliers across the block.

use crate::error::KernelError;

/// The sign vector `s` of the transform (from the design note).
pub const HADAMARD_SIGNS: [f32; 16] = [
    1.0, 1.0, 1.0, -1.0, 1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, 1.0, -1.0, 1.0, -1.0, -1.0,
];

/// The transform matrix `H = diag(s) * H16 / 4`, row-major.
pub fn hadamard16_matrix() -> [[f32; 16]; 16] {
    let mut h = [[0.0f32; 16]; 16];
    for (i, row) in h.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            let sylvester = if (i & j).count_ones() % 2 == 0 {
                1.0
            } else {
                -1.0
            };
            *v = HADAMARD_SIGNS[i] * sylvester * 0.25;
        }
    }
    h
}

/// In-place fast Walsh-Hadamard transform of 16 values (unnormalised `H16 x`).
#[inline]
fn walsh_hadamard16(x: &mut [f32]) {
    let mut len = 1;
    while len < 16 {
        for start in (0..16).step_by(2 * len) {
            for i in start..start + len {
                let (a, b) = (x[i], x[i + len]);
                x[i] = a + b;
                x[i + len] = a - b;
            }
        }
        len *= 2;
    }
}

fn check_len(name: &str, data: &[f32]) -> Result<(), KernelError> {
    if !data.len().is_multiple_of(16) {
        return Err(KernelError::shape(
            name,
            format!(
                "Hadamard transform needs a multiple of 16 elements, got {}",
                data.len()
            ),
        ));
    }
    Ok(())
}

/// Applies `x -> H x` to every contiguous 16-element chunk of `data` (rows whose length is a
/// multiple of 16, laid out row-major). `name` appears in errors.
pub fn hadamard16_forward(name: &str, data: &mut [f32]) -> Result<(), KernelError> {
    check_len(name, data)?;
    for chunk in data.chunks_exact_mut(16) {
        walsh_hadamard16(chunk);
        for (v, s) in chunk.iter_mut().zip(HADAMARD_SIGNS) {
            *v *= s * 0.25;
        }
    }
    Ok(())
}

/// Applies the inverse `y -> H^T y` to every contiguous 16-element chunk of `data`.
pub fn hadamard16_inverse(name: &str, data: &mut [f32]) -> Result<(), KernelError> {
    check_len(name, data)?;
    for chunk in data.chunks_exact_mut(16) {
        for (v, s) in chunk.iter_mut().zip(HADAMARD_SIGNS) {
            *v *= s * 0.25;
        }
        walsh_hadamard16(chunk);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
            })
            .collect()
    }

    #[test]
    fn matrix_is_orthonormal() {
        let h = hadamard16_matrix();
        for i in 0..16 {
            for j in 0..16 {
                let dot: f32 = (0..16).map(|k| h[i][k] * h[j][k]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((dot - want).abs() < 1e-6, "rows {i},{j}: {dot}");
                let dot_t: f32 = (0..16).map(|k| h[k][i] * h[k][j]).sum();
                assert!((dot_t - want).abs() < 1e-6, "cols {i},{j}: {dot_t}");
            }
        }
        // With the sign vector it is no longer symmetric, so it is not its own inverse:
        // the inverse is the transpose.
        assert!((0..16).any(|i| (0..16).any(|j| h[i][j] != h[j][i])));
    }

    #[test]
    fn fast_transform_matches_matrix() {
        let h = hadamard16_matrix();
        let x = sample(64, 1);
        let mut y = x.clone();
        hadamard16_forward("x", &mut y).unwrap();
        for (xc, yc) in x.chunks_exact(16).zip(y.chunks_exact(16)) {
            for i in 0..16 {
                let want: f32 = (0..16).map(|j| h[i][j] * xc[j]).sum();
                assert!((yc[i] - want).abs() < 1e-5, "{} vs {want}", yc[i]);
            }
        }
    }

    #[test]
    fn inverse_undoes_forward_and_dots_are_preserved() {
        let x = sample(160, 2);
        let w = sample(160, 3);
        let mut y = x.clone();
        hadamard16_forward("x", &mut y).unwrap();
        assert_ne!(x, y);
        let mut back = y.clone();
        hadamard16_inverse("x", &mut back).unwrap();
        for (a, b) in x.iter().zip(&back) {
            assert!((a - b).abs() < 1e-5);
        }
        let mut v = w.clone();
        hadamard16_forward("w", &mut v).unwrap();
        let d0: f32 = x.iter().zip(&w).map(|(a, b)| a * b).sum();
        let d1: f32 = y.iter().zip(&v).map(|(a, b)| a * b).sum();
        assert!((d0 - d1).abs() < 1e-3 * d0.abs().max(1.0), "{d0} vs {d1}");
        let n0: f32 = x.iter().map(|a| a * a).sum();
        let n1: f32 = y.iter().map(|a| a * a).sum();
        assert!((n0 - n1).abs() < 1e-3 * n0);
    }

    #[test]
    fn rejects_ragged_length() {
        let err = hadamard16_forward("grad", &mut [0.0; 20]).unwrap_err();
        assert!(err.is_shape() && err.to_string().contains("grad"));
        assert!(hadamard16_inverse("grad", &mut [0.0; 17]).is_err());
    }
}
