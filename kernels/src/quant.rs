//! NVFP4 quantization of 2-D f32 tensors with the TransformerEngine rule.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::KernelError;
use crate::scalar::{
    E2M1_MAX, E4M3_MAX, e2m1_decode, e2m1_encode, e2m1_encode_stochastic, e4m3_decode, e4m3_encode,
};

/// Number of elements sharing one E4M3 scale along the last axis.
pub const BLOCK: usize = 16;

/// `6 * 448`: the largest value an NVFP4 element can reach before the global scale.
const FP4_TIMES_FP8_MAX: f32 = E2M1_MAX * E4M3_MAX;

/// Which elements share a block scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BlockLayout {
    /// One scale per 16 consecutive elements of a row (activations, gradients, inference weights).
    #[default]
    Row1x16,
    /// One scale per 16x16 tile (training weights), so `W` and `W^T` quantize alike. The tile's
    /// scale is stored once per row of the tile, so the storage layout stays `[rows, cols/16]`.
    /// A last tile with fewer than 16 rows covers the rows that exist.
    Tile16x16,
}

/// How elements are rounded to E2M1. Block scales always round to nearest even.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Rounding {
    /// Round to nearest, ties to even (the inference and forward-pass rule).
    #[default]
    NearestEven,
    /// Stochastic rounding from a seeded RNG: unbiased in expectation (for gradients).
    Stochastic {
        /// Seed of the RNG; the same seed reproduces the same codes.
        seed: u64,
    },
}

/// Options of [`Nvfp4Tensor::quantize`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QuantizeOptions {
    /// Block shape of the E4M3 scales.
    pub layout: BlockLayout,
    /// Element rounding.
    pub rounding: Rounding,
}

/// A 2-D tensor in NVFP4: E2M1 codes packed two per byte, one E4M3 scale per 16 elements
/// along the last axis, one FP32 global decode scale.
///
/// Invariants (checked by every constructor): `cols % 16 == 0`, no NaN scale,
/// `packed.len() == rows * cols / 2` (element `2i` in the low nibble of byte `i`, row-major),
/// `scales.len() == rows * cols / 16` (row-major `[rows, cols/16]`), and the global decode
/// scale is finite and positive. This is the ModelOpt checkpoint layout: `weight`,
/// `weight_scale`, `weight_scale_2`.
#[derive(Debug, Clone, PartialEq)]
pub struct Nvfp4Tensor {
    rows: usize,
    cols: usize,
    packed: Vec<u8>,
    scales: Vec<u8>,
    global_decode_scale: f32,
}

fn check_shape(name: &str, rows: usize, cols: usize) -> Result<(), KernelError> {
    if !cols.is_multiple_of(BLOCK) {
        return Err(KernelError::shape(
            name,
            format!("shape [{rows}, {cols}]: the last dimension must be a multiple of {BLOCK}"),
        ));
    }
    if rows.checked_mul(cols).is_none() {
        return Err(KernelError::shape(
            name,
            format!("shape [{rows}, {cols}] overflows"),
        ));
    }
    Ok(())
}

impl Nvfp4Tensor {
    /// Quantizes a row-major `[rows, cols]` f32 tensor named `name` (the name appears in errors).
    ///
    /// The rule is TransformerEngine's: `S_enc = 6*448 / amax` (1 when the tensor is all zeros),
    /// block scale `e4m3(min(block_amax * S_enc / 6, 448))`, element
    /// `e2m1(clamp(x / (scale * S_dec), -6, 6))`. An all-zero block gets scale 0 and zero codes.
    pub fn quantize(
        name: &str,
        data: &[f32],
        rows: usize,
        cols: usize,
        options: &QuantizeOptions,
    ) -> Result<Self, KernelError> {
        check_shape(name, rows, cols)?;
        if data.len() != rows * cols {
            return Err(KernelError::shape(
                name,
                format!(
                    "shape [{rows}, {cols}] needs {} elements, got {}",
                    rows * cols,
                    data.len()
                ),
            ));
        }
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(KernelError::NonFinite {
                tensor: name.to_string(),
                row: i / cols,
                col: i % cols,
                value: data[i],
            });
        }

        let amax = data.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let s_enc = global_encode_scale(amax);
        let s_dec = 1.0 / s_enc;
        let block_factor = s_enc * (1.0 / E2M1_MAX);

        let blocks_per_row = cols / BLOCK;
        let mut scales = vec![0u8; rows * blocks_per_row];
        match options.layout {
            BlockLayout::Row1x16 => {
                for (s, block) in scales.iter_mut().zip(data.chunks_exact(BLOCK)) {
                    let block_amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    *s = block_scale(block_amax, block_factor);
                }
            }
            BlockLayout::Tile16x16 => {
                for r0 in (0..rows).step_by(BLOCK) {
                    let r1 = (r0 + BLOCK).min(rows);
                    for b in 0..blocks_per_row {
                        let mut tile_amax = 0.0f32;
                        for r in r0..r1 {
                            let start = r * cols + b * BLOCK;
                            for v in &data[start..start + BLOCK] {
                                tile_amax = tile_amax.max(v.abs());
                            }
                        }
                        let s = block_scale(tile_amax, block_factor);
                        for r in r0..r1 {
                            scales[r * blocks_per_row + b] = s;
                        }
                    }
                }
            }
        }

        let mut packed = vec![0u8; rows * cols / 2];
        let mut rng = match options.rounding {
            Rounding::NearestEven => None,
            Rounding::Stochastic { seed } => Some(StdRng::seed_from_u64(seed)),
        };
        for (bi, (block, out)) in data
            .chunks_exact(BLOCK)
            .zip(packed.chunks_exact_mut(BLOCK / 2))
            .enumerate()
        {
            let enc = block_encode_scale(scales[bi], s_dec);
            let mut codes = [0u8; BLOCK];
            match rng.as_mut() {
                None => {
                    for (c, &x) in codes.iter_mut().zip(block) {
                        *c = e2m1_encode((x * enc).clamp(-E2M1_MAX, E2M1_MAX));
                    }
                }
                Some(rng) => {
                    for (c, &x) in codes.iter_mut().zip(block) {
                        let u: f32 = rng.random();
                        *c = e2m1_encode_stochastic((x * enc).clamp(-E2M1_MAX, E2M1_MAX), u);
                    }
                }
            }
            for (byte, pair) in out.iter_mut().zip(codes.chunks_exact(2)) {
                *byte = pair[0] | (pair[1] << 4);
            }
        }

        Ok(Nvfp4Tensor {
            rows,
            cols,
            packed,
            scales,
            global_decode_scale: s_dec,
        })
    }

    /// Builds a tensor from its stored parts (e.g. a ModelOpt checkpoint's `weight`,
    /// `weight_scale` and `weight_scale_2`), checking every invariant: buffer sizes, no NaN
    /// scale byte (0x7f / 0xff), a finite positive global decode scale.
    pub fn from_parts(
        name: &str,
        rows: usize,
        cols: usize,
        packed: Vec<u8>,
        scales: Vec<u8>,
        global_decode_scale: f32,
    ) -> Result<Self, KernelError> {
        check_shape(name, rows, cols)?;
        if packed.len() != rows * cols / 2 {
            return Err(KernelError::shape(
                name,
                format!(
                    "shape [{rows}, {cols}] needs {} packed bytes, got {}",
                    rows * cols / 2,
                    packed.len()
                ),
            ));
        }
        if scales.len() != rows * cols / BLOCK {
            return Err(KernelError::shape(
                name,
                format!(
                    "shape [{rows}, {cols}] needs {} scale bytes, got {}",
                    rows * cols / BLOCK,
                    scales.len()
                ),
            ));
        }
        if let Some(i) = scales.iter().position(|&b| b & 0x7f == 0x7f) {
            let blocks_per_row = cols / BLOCK;
            return Err(KernelError::NonFinite {
                tensor: format!("{name} (block scales)"),
                row: i / blocks_per_row,
                col: i % blocks_per_row * BLOCK,
                value: f32::NAN,
            });
        }
        if !(global_decode_scale.is_finite() && global_decode_scale > 0.0) {
            return Err(KernelError::NonFinite {
                tensor: format!("{name} (global decode scale)"),
                row: 0,
                col: 0,
                value: global_decode_scale,
            });
        }
        Ok(Nvfp4Tensor {
            rows,
            cols,
            packed,
            scales,
            global_decode_scale,
        })
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns (a multiple of 16).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Packed E2M1 codes, row-major `[rows, cols/2]`.
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }

    /// E4M3 block scale bytes, row-major `[rows, cols/16]`.
    pub fn scales(&self) -> &[u8] {
        &self.scales
    }

    /// FP32 global decode scale (`amax / (6*448)`; the checkpoint's `weight_scale_2`).
    pub fn global_decode_scale(&self) -> f32 {
        self.global_decode_scale
    }

    /// The E2M1 code of element `(row, col)`.
    pub fn code(&self, row: usize, col: usize) -> u8 {
        let i = row * self.cols + col;
        (self.packed[i / 2] >> ((i % 2) * 4)) & 0x0f
    }

    /// Consumes the tensor, returning `(rows, cols, packed, scales, global_decode_scale)`.
    pub fn into_parts(self) -> (usize, usize, Vec<u8>, Vec<u8>, f32) {
        (
            self.rows,
            self.cols,
            self.packed,
            self.scales,
            self.global_decode_scale,
        )
    }

    /// Dequantizes to a row-major `[rows, cols]` f32 tensor:
    /// `e2m1(code) * (e4m3(scale) * global_decode_scale)`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.rows * self.cols];
        for ((dst, bytes), &scale) in out
            .chunks_exact_mut(BLOCK)
            .zip(self.packed.chunks_exact(BLOCK / 2))
            .zip(&self.scales)
        {
            // The block's full decode scale first, then the element (as TE's reference does:
            // the golden vectors depend on this order to the last bit).
            let s = e4m3_decode(scale) * self.global_decode_scale;
            for (pair, &byte) in dst.chunks_exact_mut(2).zip(bytes) {
                pair[0] = e2m1_decode(byte & 0x0f) * s;
                pair[1] = e2m1_decode(byte >> 4) * s;
            }
        }
        out
    }
}

/// TE's global encode scale: `6*448 / amax`, capped at `f32::MAX`, and 1 for an all-zero tensor.
fn global_encode_scale(amax: f32) -> f32 {
    let s = (FP4_TIMES_FP8_MAX / amax).min(f32::MAX);
    if amax == 0.0 || s == 0.0 { 1.0 } else { s }
}

/// E4M3 block scale of a block whose absolute maximum is `block_amax`.
fn block_scale(block_amax: f32, block_factor: f32) -> u8 {
    e4m3_encode((block_amax * block_factor).min(E4M3_MAX))
}

/// Factor taking a block's elements to the E2M1 range: `1 / (scale * S_dec)`,
/// with TE's guard capping it at `f32::MAX` when the scale is 0.
fn block_encode_scale(scale: u8, s_dec: f32) -> f32 {
    (1.0 / (e4m3_decode(scale) * s_dec)).min(f32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scalar::E2M1_MAGNITUDES;
    use rand::distr::{Distribution, Uniform};

    /// Independent reference: same TE rule, but element rounding by brute-force search
    /// for the nearest E2M1 value (ties to even code) and E4M3 by brute-force search over
    /// all finite bytes. Returns (codes row-major, scales, s_dec).
    fn reference_quantize(
        data: &[f32],
        rows: usize,
        cols: usize,
        tile: bool,
    ) -> (Vec<u8>, Vec<u8>, f32) {
        fn nearest_e4m3(v: f32) -> u8 {
            let mut best = 0u8;
            for b in 0u8..=0x7e {
                let d = (v as f64 - e4m3_decode(b) as f64).abs();
                let db = (v as f64 - e4m3_decode(best) as f64).abs();
                if d < db || (d == db && b % 2 == 0) {
                    best = b;
                }
            }
            best
        }
        fn nearest_e2m1(v: f32) -> u8 {
            let a = v.abs();
            let mut best = 0usize;
            for (i, &v) in E2M1_MAGNITUDES.iter().enumerate() {
                let d = (a - v).abs();
                let db = (a - E2M1_MAGNITUDES[best]).abs();
                if d < db || (d == db && i % 2 == 0) {
                    best = i;
                }
            }
            if v < 0.0 { best as u8 | 8 } else { best as u8 }
        }
        let mut amax = 0.0f32;
        for v in data {
            amax = amax.max(v.abs());
        }
        let s_enc = if amax == 0.0 { 1.0 } else { 2688.0 / amax };
        let s_dec = 1.0 / s_enc;
        let nb = cols / 16;
        let mut scales = vec![0u8; rows * nb];
        for r in 0..rows {
            for b in 0..nb {
                let (r0, r1) = if tile {
                    (r / 16 * 16, (r / 16 * 16 + 16).min(rows))
                } else {
                    (r, r + 1)
                };
                let mut bm = 0.0f32;
                for rr in r0..r1 {
                    for c in b * 16..b * 16 + 16 {
                        bm = bm.max(data[rr * cols + c].abs());
                    }
                }
                scales[r * nb + b] = nearest_e4m3((bm * (s_enc * (1.0 / 6.0))).min(448.0));
            }
        }
        let mut codes = vec![0u8; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                let sf = e4m3_decode(scales[r * nb + c / 16]);
                let enc = (1.0 / (sf * s_dec)).min(f32::MAX);
                codes[r * cols + c] = nearest_e2m1((data[r * cols + c] * enc).clamp(-6.0, 6.0));
            }
        }
        (codes, scales, s_dec)
    }

    fn random_tensor(rng: &mut StdRng, rows: usize, cols: usize, dist: usize) -> Vec<f32> {
        let u = Uniform::new(-1.0f32, 1.0).unwrap();
        (0..rows * cols)
            .map(|i| {
                let x = u.sample(rng);
                match dist {
                    // Uniform.
                    0 => x * 3.0,
                    // Heavy tail: ratio of uniforms.
                    1 => x / (u.sample(rng).abs() + 1e-3),
                    // Rows with wildly different magnitudes, plus exact zeros.
                    2 => {
                        if i % 7 == 0 {
                            0.0
                        } else {
                            x * 10f32.powi((i / cols % 9) as i32 - 4)
                        }
                    }
                    // Values on the E2M1 grid times a power of two (exact ties).
                    _ => {
                        let k = (u.sample(rng).abs() * 8.0) as usize % 8;
                        let s = if x < 0.0 { -1.0 } else { 1.0 };
                        s * E2M1_MAGNITUDES[k] * 0.25
                    }
                }
            })
            .collect()
    }

    #[test]
    fn matches_brute_force_reference_on_random_tensors() {
        let mut rng = StdRng::seed_from_u64(7);
        for trial in 0..120 {
            let rows = 1 + (trial * 7) % 37;
            let cols = 16 * (1 + (trial * 5) % 9);
            let dist = trial % 4;
            let tile = trial % 3 == 0;
            let data = random_tensor(&mut rng, rows, cols, dist);
            let options = QuantizeOptions {
                layout: if tile {
                    BlockLayout::Tile16x16
                } else {
                    BlockLayout::Row1x16
                },
                rounding: Rounding::NearestEven,
            };
            let q = Nvfp4Tensor::quantize("w", &data, rows, cols, &options).unwrap();
            let (codes, scales, s_dec) = reference_quantize(&data, rows, cols, tile);
            assert_eq!(q.scales(), &scales[..], "trial {trial}");
            assert_eq!(q.global_decode_scale(), s_dec);
            for r in 0..rows {
                for c in 0..cols {
                    let (got, want) = (q.code(r, c), codes[r * cols + c]);
                    // Zeros compare by value (-0 may be either code).
                    assert_eq!(
                        e2m1_decode(got),
                        e2m1_decode(want),
                        "trial {trial} at [{r}, {c}]"
                    );
                }
            }
            // Dequantization is within half an E2M1 step (at most 1 unit of scale) of the
            // input, plus what saturation loses to the block scale's rounding (relative 1/16
            // for normal scales, 6 * 2^-10 * S_dec for subnormal or zero scales).
            let deq = q.dequantize();
            for (i, (&x, &y)) in data.iter().zip(&deq).enumerate() {
                let sf = e4m3_decode(q.scales()[i / 16]) * s_dec;
                assert!(
                    (x - y).abs() <= sf * 1.0 + 0.07 * x.abs() + 0.006 * s_dec,
                    "trial {trial} i {i}: {x} vs {y}"
                );
            }
        }
    }

    #[test]
    fn gaussian_error_matches_design_figure() {
        // Box-Muller normals; the design note quotes relative MSE ~0.0091 (20.4 dB).
        let mut rng = StdRng::seed_from_u64(11);
        let (rows, cols) = (256, 256);
        let data: Vec<f32> = (0..rows * cols)
            .map(|_| {
                let u1: f32 = rng.random::<f32>().max(1e-7);
                let u2: f32 = rng.random();
                (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
            })
            .collect();
        let q = Nvfp4Tensor::quantize("g", &data, rows, cols, &QuantizeOptions::default()).unwrap();
        let deq = q.dequantize();
        let num: f64 = data
            .iter()
            .zip(&deq)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        let den: f64 = data.iter().map(|a| (*a as f64).powi(2)).sum();
        let rel = num / den;
        assert!((0.0075..0.011).contains(&rel), "relative MSE {rel}");
    }

    #[test]
    fn tile_layout_is_transpose_invariant() {
        let mut rng = StdRng::seed_from_u64(3);
        let (rows, cols) = (48, 64);
        let data = random_tensor(&mut rng, rows, cols, 1);
        let mut t = vec![0.0f32; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                t[c * rows + r] = data[r * cols + c];
            }
        }
        let options = QuantizeOptions {
            layout: BlockLayout::Tile16x16,
            rounding: Rounding::NearestEven,
        };
        let a = Nvfp4Tensor::quantize("w", &data, rows, cols, &options)
            .unwrap()
            .dequantize();
        let b = Nvfp4Tensor::quantize("wt", &t, cols, rows, &options)
            .unwrap()
            .dequantize();
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(a[r * cols + c], b[c * rows + r], "[{r}, {c}]");
            }
        }
        // The row layout generally differs under transposition; make sure the test data
        // is able to tell the layouts apart.
        let row = QuantizeOptions::default();
        let a1 = Nvfp4Tensor::quantize("w", &data, rows, cols, &row)
            .unwrap()
            .dequantize();
        assert_ne!(a, a1);
    }

    #[test]
    fn stochastic_rounding_is_unbiased_and_seeded() {
        // Every block holds +-amax so each block scale is exactly 448 and no element saturates:
        // then E[dequantized] equals the input exactly.
        let (rows, cols) = (2, 32);
        let mut rng = StdRng::seed_from_u64(5);
        let u = Uniform::new(-1.0f32, 1.0).unwrap();
        let mut data: Vec<f32> = (0..rows * cols).map(|_| u.sample(&mut rng) * 3.0).collect();
        for b in 0..rows * cols / 16 {
            data[b * 16 + 3] = if b % 2 == 0 { 3.0 } else { -3.0 };
        }
        let trials = 4000;
        let mut mean = vec![0.0f64; rows * cols];
        let mut rne_err = 0.0f64;
        for t in 0..trials {
            let options = QuantizeOptions {
                layout: BlockLayout::Row1x16,
                rounding: Rounding::Stochastic { seed: t },
            };
            let q = Nvfp4Tensor::quantize("g", &data, rows, cols, &options).unwrap();
            for (m, v) in mean.iter_mut().zip(q.dequantize()) {
                *m += v as f64 / trials as f64;
            }
        }
        let rne = Nvfp4Tensor::quantize("g", &data, rows, cols, &QuantizeOptions::default())
            .unwrap()
            .dequantize();
        let mut sr_err = 0.0f64;
        for i in 0..rows * cols {
            // Step size at this magnitude is at most 2 * (3/6) = 1; the std of the mean of
            // `trials` draws is below 0.5 / sqrt(trials) ~ 0.008.
            let e = (mean[i] - data[i] as f64).abs();
            assert!(e < 0.04, "element {i}: mean {} vs {}", mean[i], data[i]);
            sr_err += e;
            rne_err += (rne[i] - data[i]).abs() as f64;
        }
        assert!(sr_err * 5.0 < rne_err, "SR {sr_err} vs RNE {rne_err}");

        // Same seed, same codes; different seed, different codes.
        let o = |seed| QuantizeOptions {
            layout: BlockLayout::Row1x16,
            rounding: Rounding::Stochastic { seed },
        };
        let a = Nvfp4Tensor::quantize("g", &data, rows, cols, &o(1)).unwrap();
        let b = Nvfp4Tensor::quantize("g", &data, rows, cols, &o(1)).unwrap();
        let c = Nvfp4Tensor::quantize("g", &data, rows, cols, &o(2)).unwrap();
        assert_eq!(a, b);
        assert_ne!(a.packed(), c.packed());
    }

    #[test]
    fn zero_tensor_and_zero_blocks_follow_te() {
        let q = Nvfp4Tensor::quantize("z", &[0.0; 64], 2, 32, &QuantizeOptions::default()).unwrap();
        assert_eq!(q.global_decode_scale(), 1.0);
        assert!(q.scales().iter().all(|&s| s == 0));
        assert!(q.packed().iter().all(|&b| b == 0));
        assert!(q.dequantize().iter().all(|&v| v == 0.0));

        let mut data = vec![0.0f32; 32];
        data[20] = 1.5;
        let q = Nvfp4Tensor::quantize("z", &data, 1, 32, &QuantizeOptions::default()).unwrap();
        assert_eq!(q.scales()[0], 0);
        assert_eq!(q.scales()[1], 0x7e);
        for (got, want) in q.dequantize().iter().zip(&data) {
            assert!((got - want).abs() <= 1e-6 * want.abs(), "{got} vs {want}");
        }
    }

    #[test]
    fn errors_name_the_tensor() {
        let mut data = vec![1.0f32; 32];
        data[17] = f32::NAN;
        let err =
            Nvfp4Tensor::quantize("layers.3.mlp.w1", &data, 2, 16, &QuantizeOptions::default())
                .unwrap_err();
        assert!(err.is_non_finite());
        assert!(matches!(err, KernelError::NonFinite { row: 1, col: 1, .. }));
        assert!(err.to_string().contains("layers.3.mlp.w1"), "{err}");

        data[17] = f32::NEG_INFINITY;
        let err =
            Nvfp4Tensor::quantize("x", &data, 2, 16, &QuantizeOptions::default()).unwrap_err();
        assert!(err.is_non_finite());

        let err = Nvfp4Tensor::quantize("bad", &[0.0; 24], 2, 12, &QuantizeOptions::default())
            .unwrap_err();
        assert!(err.is_shape() && err.to_string().contains("bad"), "{err}");
        let err = Nvfp4Tensor::quantize("short", &[0.0; 24], 2, 16, &QuantizeOptions::default())
            .unwrap_err();
        assert!(err.is_shape() && err.to_string().contains("short"), "{err}");
        let err = Nvfp4Tensor::from_parts("p", 2, 16, vec![0; 15], vec![0; 2], 1.0).unwrap_err();
        assert!(err.is_shape() && err.to_string().contains("p"), "{err}");
        assert!(Nvfp4Tensor::from_parts("p", 2, 16, vec![0; 16], vec![0; 2], 1.0).is_ok());
        assert!(Nvfp4Tensor::from_parts("p", 2, 16, vec![0; 16], vec![0; 2], f32::NAN).is_err());
        let err =
            Nvfp4Tensor::from_parts("p", 2, 16, vec![0; 16], vec![0x38, 0x7f], 1.0).unwrap_err();
        assert!(
            matches!(err, KernelError::NonFinite { row: 1, .. }),
            "{err}"
        );
    }
}
