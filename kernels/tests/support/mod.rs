//! Test data and references shared by the kernel tests and the emulation-case generator
//! (`examples/nvfp4_emu_cases.rs` includes this file by path).
#![allow(dead_code)]

use serde_json::Value;

/// Deterministic test data: several distributions, including exact zeros, all-zero blocks,
/// values on the E2M1 grid (ties) and a huge dynamic range (subnormal block scales).
pub fn test_tensor(rows: usize, cols: usize, kind: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut uniform = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    (0..rows * cols)
        .map(|i| {
            let u = uniform();
            match kind {
                0 => u * 3.0,
                1 => u / (uniform().abs() + 1e-3),
                2 => {
                    if (i / 16) % 5 == 0 {
                        0.0
                    } else {
                        u * 10f32.powi((i / cols % 13) as i32 - 6)
                    }
                }
                3 => {
                    let grid = [
                        0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.25, 0.75, 1.25, 5.0,
                    ];
                    let v = grid[((uniform().abs() * 12.0) as usize).min(11)] * 0.125;
                    if u < 0.0 { -v } else { v }
                }
                _ => u * 1e-30 + if i == 7 { 1e30 } else { 0.0 },
            }
        })
        .collect()
}

/// `y[j, r] = sum_c deq(W)[r, c] * x[j, c]` in f64, and `sum |w x|` for the tolerance.
pub fn reference(deq: &[f32], x: &[f32], m: usize, k: usize, n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut y = vec![0.0f64; n * m];
    let mut mag = vec![0.0f64; n * m];
    for j in 0..n {
        for r in 0..m {
            let (mut s, mut a) = (0.0f64, 0.0f64);
            for c in 0..k {
                let p = deq[r * k + c] as f64 * x[j * k + c] as f64;
                s += p;
                a += p.abs();
            }
            y[j * m + r] = s;
            mag[j * m + r] = a;
        }
    }
    (y, mag)
}

/// One golden NVFP4 vector of `tests/fixtures/nvfp4_vectors.json`.
pub struct GoldenCase {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub input: Vec<f32>,
    pub packed: Vec<u8>,
    pub scales: Vec<u8>,
    pub global_decode_scale: f32,
    pub dequantized: Vec<f32>,
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// The golden vectors (from the TransformerEngine reference, via the design fixtures).
pub fn golden_cases() -> Vec<GoldenCase> {
    let root: Value = serde_json::from_str(include_str!("../fixtures/nvfp4_vectors.json")).unwrap();
    root["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|case| {
            let shape: Vec<usize> = case["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect();
            GoldenCase {
                name: case["name"].as_str().unwrap().to_string(),
                rows: shape[0],
                cols: shape[1],
                input: f32s(&case["input"]),
                packed: hex(case["packed_hex"].as_str().unwrap()),
                scales: hex(case["scales_e4m3_hex"].as_str().unwrap()),
                global_decode_scale: case["global_decode_scale"].as_f64().unwrap() as f32,
                dequantized: f32s(&case["dequantized"]),
            }
        })
        .collect()
}
