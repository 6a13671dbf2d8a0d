//! Scalar codecs for the two NVFP4 sub-formats: E2M1 elements and E4M3 (`fn`) block scales.

/// The eight non-negative E2M1 magnitudes, indexed by the low three bits of a code.
pub const E2M1_MAGNITUDES: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// Largest finite E2M1 magnitude.
pub const E2M1_MAX: f32 = 6.0;

/// Largest finite E4M3 (`fn`) value.
pub const E4M3_MAX: f32 = 448.0;

/// E4M3 byte of +448, the saturation value.
pub(crate) const E4M3_MAX_BYTE: u8 = 0x7e;

/// E4M3 byte of NaN (positive sign).
pub(crate) const E4M3_NAN_BYTE: u8 = 0x7f;

/// Decodes a 4-bit E2M1 code (only the low nibble is read). Code 8 is -0.0.
#[inline]
pub fn e2m1_decode(code: u8) -> f32 {
    let magnitude = E2M1_MAGNITUDES[(code & 7) as usize];
    if code & 8 != 0 { -magnitude } else { magnitude }
}

/// Magnitude code (0..=7) of `a >= 0` under round-to-nearest-even, saturating at 6.
#[inline]
fn e2m1_magnitude_code(a: f32) -> u8 {
    // Midpoints between neighbours; at a tie the even code (mantissa bit 0) wins,
    // which is why the comparison alternates between `<=` and `<`.
    if a <= 0.25 {
        0
    } else if a < 0.75 {
        1
    } else if a <= 1.25 {
        2
    } else if a < 1.75 {
        3
    } else if a <= 2.5 {
        4
    } else if a < 3.5 {
        5
    } else if a <= 5.0 {
        6
    } else {
        7
    }
}

/// Encodes `x` as E2M1 with round-to-nearest-even, saturating at +-6.
///
/// Negative values that round to zero keep their sign (code 8), but `-0.0` itself
/// encodes as code 0, as TransformerEngine does. NaN encodes as code 0.
#[inline]
pub fn e2m1_encode(x: f32) -> u8 {
    if x.is_nan() {
        return 0;
    }
    let code = e2m1_magnitude_code(x.abs());
    if x < 0.0 { code | 8 } else { code }
}

/// Encodes `x` as E2M1 with stochastic rounding: `x` (clamped to +-6) rounds to the
/// magnitude above with probability equal to its distance from the magnitude below,
/// divided by the gap, so the decoded value is `x` in expectation. `uniform` is a
/// sample from `[0, 1)`. NaN encodes as code 0.
#[inline]
pub fn e2m1_encode_stochastic(x: f32, uniform: f32) -> u8 {
    if x.is_nan() {
        return 0;
    }
    let a = x.abs().min(E2M1_MAX);
    // Index of the largest magnitude <= a.
    let mut below = 0usize;
    while below < 7 && E2M1_MAGNITUDES[below + 1] <= a {
        below += 1;
    }
    let code = if below == 7 {
        7
    } else {
        let lo = E2M1_MAGNITUDES[below];
        let hi = E2M1_MAGNITUDES[below + 1];
        let p_up = (a - lo) / (hi - lo);
        if uniform < p_up { below + 1 } else { below }
    } as u8;
    if x < 0.0 { code | 8 } else { code }
}

/// Decodes an E4M3 (`fn` variant: bias 7, no infinities, 0x7f/0xff are NaN) byte.
#[inline]
pub fn e4m3_decode(byte: u8) -> f32 {
    E4M3_TABLE[byte as usize]
}

const fn e4m3_decode_const(byte: u8) -> f32 {
    let exponent = ((byte >> 3) & 0x0f) as i32;
    let mantissa = (byte & 7) as f32;
    let magnitude = if exponent == 0x0f && byte & 7 == 7 {
        f32::NAN
    } else if exponent == 0 {
        mantissa * (1.0 / 512.0)
    } else {
        // 2^(exponent - 7) built by repeated doubling/halving keeps this a `const fn`.
        let mut p = 1.0f32;
        let mut e = exponent - 7;
        while e > 0 {
            p *= 2.0;
            e -= 1;
        }
        while e < 0 {
            p *= 0.5;
            e += 1;
        }
        p * (1.0 + mantissa / 8.0)
    };
    if byte & 0x80 != 0 {
        -magnitude
    } else {
        magnitude
    }
}

const fn build_e4m3_table() -> [f32; 256] {
    let mut table = [0.0f32; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = e4m3_decode_const(i as u8);
        i += 1;
    }
    table
}

/// All 256 E4M3 bytes decoded to f32.
pub(crate) static E4M3_TABLE: [f32; 256] = build_e4m3_table();

/// Encodes `x` as E4M3 (`fn`) with round-to-nearest-even, saturating at +-448
/// (infinities saturate too). NaN encodes as 0x7f.
#[inline]
pub fn e4m3_encode(x: f32) -> u8 {
    if x.is_nan() {
        return E4M3_NAN_BYTE;
    }
    let sign: u8 = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    let magnitude = if a >= E4M3_MAX {
        E4M3_MAX_BYTE
    } else if a < 1.0 / 64.0 {
        // Subnormal range: multiples of 2^-9. `a * 512` is exact; a result of 8 is the
        // smallest normal (byte 0x08), which the encoding represents contiguously.
        (a * 512.0).round_ties_even() as u8
    } else {
        // Normal range: keep 3 of f32's 23 mantissa bits, rounding to nearest even on
        // the raw bits (a carry into the exponent is the correct result), then rebias
        // the exponent from 127 to 7.
        let bits = a.to_bits();
        let lsb = (bits >> 20) & 1;
        let rounded = (bits + 0x7ffff + lsb) >> 20;
        let byte = rounded - ((127 - 7) << 3);
        // Values just below 448 cannot round past it: 448 is 0x7e and the next
        // midpoint (464) is above E4M3_MAX, which was handled above.
        byte.min(E4M3_MAX_BYTE as u32) as u8
    };
    sign | magnitude
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Brute-force reference: nearest E2M1 magnitude, ties to the even code.
    fn e2m1_reference(x: f32) -> f32 {
        let a = x.abs() as f64;
        let mut best = 0usize;
        for (i, &v) in E2M1_MAGNITUDES.iter().enumerate() {
            let d = (a - v as f64).abs();
            let db = (a - E2M1_MAGNITUDES[best] as f64).abs();
            if d < db || (d == db && i % 2 == 0 && best % 2 == 1) {
                best = i;
            }
        }
        let v = E2M1_MAGNITUDES[best];
        if x < 0.0 { -v } else { v }
    }

    /// Brute-force reference: nearest finite E4M3 value, ties to the even byte,
    /// anything beyond 448 saturating.
    fn e4m3_reference(x: f32) -> f32 {
        let a = x.abs() as f64;
        let mut best = 0u8;
        for byte in 0u8..=0x7e {
            let v = e4m3_decode(byte) as f64;
            let vb = e4m3_decode(best) as f64;
            let d = (a - v).abs();
            let db = (a - vb).abs();
            if d < db || (d == db && byte % 2 == 0) {
                best = byte;
            }
        }
        let v = e4m3_decode(best);
        if x.is_sign_negative() { -v } else { v }
    }

    #[test]
    fn e2m1_table_roundtrips() {
        for code in 0u8..16 {
            let v = e2m1_decode(code);
            if code == 8 {
                assert!(v == 0.0 && v.is_sign_negative());
                continue;
            }
            assert_eq!(e2m1_encode(v), code, "code {code} value {v}");
        }
    }

    #[test]
    fn e2m1_ties_go_to_even() {
        let cases = [
            (0.25, 0.0),
            (0.75, 1.0),
            (1.25, 1.0),
            (1.75, 2.0),
            (2.5, 2.0),
            (3.5, 4.0),
            (5.0, 4.0),
            (5.01, 6.0),
            (100.0, 6.0),
            (f32::INFINITY, 6.0),
            (-0.75, -1.0),
            (-5.0, -4.0),
        ];
        for (x, want) in cases {
            assert_eq!(e2m1_decode(e2m1_encode(x)), want, "x = {x}");
        }
        assert_eq!(e2m1_encode(-0.0), 0);
        assert_eq!(e2m1_encode(-0.1), 8);
    }

    #[test]
    fn e2m1_matches_brute_force() {
        let mut state = 0x1234_5678_9abc_def0u64;
        for i in 0..200_000u32 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let x = if i < 1000 {
                // Dense sweep over quarter steps, hitting every midpoint exactly.
                (i as f32 - 500.0) * 0.0625
            } else {
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 16.0
            };
            let got = e2m1_decode(e2m1_encode(x));
            let want = e2m1_reference(x);
            assert_eq!(got, want, "x = {x}");
        }
    }

    #[test]
    fn e4m3_known_bytes() {
        assert_eq!(e4m3_encode(1.0), 0x38);
        assert_eq!(e4m3_encode(448.0), 0x7e);
        assert_eq!(e4m3_encode(1e9), 0x7e);
        assert_eq!(e4m3_encode(f32::INFINITY), 0x7e);
        assert_eq!(e4m3_encode(-448.0), 0xfe);
        assert_eq!(e4m3_encode(f32::NAN), 0x7f);
        assert_eq!(e4m3_encode(0.0), 0x00);
        assert_eq!(e4m3_encode(2f32.powi(-9)), 0x01);
        // Half of the smallest subnormal is a tie with zero: even wins.
        assert_eq!(e4m3_encode(2f32.powi(-10)), 0x00);
        assert_eq!(e4m3_encode(3.0 * 2f32.powi(-10)), 0x02);
        assert!(e4m3_decode(0x7f).is_nan());
        assert!(e4m3_decode(0xff).is_nan());
        assert_eq!(e4m3_decode(0x7e), 448.0);
        assert_eq!(e4m3_decode(0x08), 2f32.powi(-6));
        assert_eq!(e4m3_decode(0x07), 7.0 * 2f32.powi(-9));
    }

    #[test]
    fn e4m3_roundtrips_every_finite_byte() {
        for byte in 0u8..=255 {
            let v = e4m3_decode(byte);
            if v.is_nan() {
                continue;
            }
            if byte == 0x80 {
                assert_eq!(e4m3_encode(v), 0x80);
                continue;
            }
            assert_eq!(e4m3_encode(v), byte, "byte {byte:#04x} value {v}");
        }
    }

    #[test]
    fn e4m3_matches_brute_force() {
        let mut state = 0x0fed_cba9_8765_4321u64;
        for i in 0..100_000u32 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let x = if i < 4000 {
                // Every midpoint between consecutive finite values, plus the values.
                let b = (i / 2 % 0x7e) as u8;
                let lo = e4m3_decode(b);
                let hi = e4m3_decode(b + 1);
                if i % 2 == 0 { lo } else { 0.5 * (lo + hi) }
            } else {
                // Log-uniform magnitudes from 2^-12 to 2^10 with random sign.
                let e = (state >> 33) as f32 / (1u64 << 31) as f32 * 22.0 - 12.0;
                let s = if state & 1 == 0 { 1.0 } else { -1.0 };
                s * 2f32.powf(e)
            };
            let got = e4m3_decode(e4m3_encode(x));
            let want = e4m3_reference(x);
            assert_eq!(got.to_bits(), want.to_bits(), "x = {x:e}");
        }
    }

    #[test]
    fn stochastic_rounding_picks_neighbours() {
        // 0.8 lies between 0.5 and 1.0, 60% of the way up.
        assert_eq!(e2m1_decode(e2m1_encode_stochastic(0.8, 0.59)), 1.0);
        assert_eq!(e2m1_decode(e2m1_encode_stochastic(0.8, 0.61)), 0.5);
        assert_eq!(e2m1_decode(e2m1_encode_stochastic(-0.8, 0.0)), -1.0);
        // Representable values never move, whatever the draw.
        for &v in &E2M1_MAGNITUDES {
            assert_eq!(e2m1_decode(e2m1_encode_stochastic(v, 0.0)), v);
            assert_eq!(e2m1_decode(e2m1_encode_stochastic(v, 0.999_999)), v);
        }
        assert_eq!(e2m1_decode(e2m1_encode_stochastic(9.0, 0.0)), 6.0);
    }
}
