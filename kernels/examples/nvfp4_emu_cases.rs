//! Writes test cases for the CPU emulation of the CUDA kernels (`kernels/cuda/emu/`): inputs
//! and the CPU results (quantizer bytes, dequantized values, the f64 product of the
//! dequantized weights) in a small binary format the C++ harness reads.
//!
//! `cargo run -p chorus-kernels --example nvfp4_emu_cases -- OUT_DIR`
//!
//! Format (little endian): a quantize case is `q_*.bin`: u32 rows, cols, tile_rows; f32
//! input[rows*cols]; u64 first non-finite index (u64::MAX if none); then, when finite, u8
//! packed[rows*cols/2], u8 scales[rows*cols/16], f32 global decode scale, f32
//! dequantized[rows*cols]. A GEMM case is `g_*.bin`: u32 m, k, n; u8 packed[m*k/2], u8
//! scales[m*k/16], f32 global decode scale; f32 x[n*k]; then for x as given and x rounded to
//! bf16: f64 y[n*m] and f64 sum|w x|[n*m]. The codec case `c_codecs.bin`: u32 count; f32
//! x[count]; u8 e4m3_encode(x)[count]; u8 e2m1_encode(x)[count]; f32 e4m3_decode(b) for
//! every byte b.

use std::fs;
use std::io::Write;
use std::path::Path;

use chorus_kernels::{
    BlockLayout, Nvfp4Tensor, QuantizeOptions, Rounding, e2m1_encode, e4m3_decode, e4m3_encode,
};
use half::bf16;

#[path = "../tests/support/mod.rs"]
pub mod support;
use support::{reference, test_tensor};

fn put_u32(out: &mut Vec<u8>, v: usize) {
    out.extend_from_slice(&(v as u32).to_le_bytes());
}

fn put_f32s(out: &mut Vec<u8>, v: &[f32]) {
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

fn put_f64s(out: &mut Vec<u8>, v: &[f64]) {
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

fn quant_case(dir: &Path, id: usize, data: &[f32], rows: usize, cols: usize, tile: bool) {
    let mut out = Vec::new();
    put_u32(&mut out, rows);
    put_u32(&mut out, cols);
    put_u32(&mut out, if tile { 16 } else { 1 });
    put_f32s(&mut out, data);
    let options = QuantizeOptions {
        layout: if tile {
            BlockLayout::Tile16x16
        } else {
            BlockLayout::Row1x16
        },
        rounding: Rounding::NearestEven,
    };
    match Nvfp4Tensor::quantize("t", data, rows, cols, &options) {
        Ok(q) => {
            out.extend_from_slice(&u64::MAX.to_le_bytes());
            out.extend_from_slice(q.packed());
            out.extend_from_slice(q.scales());
            put_f32s(&mut out, &[q.global_decode_scale()]);
            put_f32s(&mut out, &q.dequantize());
        }
        Err(_) => {
            let bad = data.iter().position(|v| !v.is_finite()).unwrap() as u64;
            out.extend_from_slice(&bad.to_le_bytes());
        }
    }
    fs::File::create(dir.join(format!("q_{id:03}.bin")))
        .unwrap()
        .write_all(&out)
        .unwrap();
}

fn gemm_case(dir: &Path, id: usize, m: usize, k: usize, n: usize, kind: usize) {
    let w = test_tensor(m, k, kind, 100 + id as u64);
    let w = Nvfp4Tensor::quantize("w", &w, m, k, &QuantizeOptions::default()).unwrap();
    let x = test_tensor(n, k, 0, 200 + id as u64);
    let xr: Vec<f32> = x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
    let deq = w.dequantize();
    let mut out = Vec::new();
    put_u32(&mut out, m);
    put_u32(&mut out, k);
    put_u32(&mut out, n);
    out.extend_from_slice(w.packed());
    out.extend_from_slice(w.scales());
    put_f32s(&mut out, &[w.global_decode_scale()]);
    put_f32s(&mut out, &x);
    for xs in [&x, &xr] {
        let (y, mag) = reference(&deq, xs, m, k, n);
        put_f64s(&mut out, &y);
        put_f64s(&mut out, &mag);
    }
    fs::File::create(dir.join(format!("g_{id:03}.bin")))
        .unwrap()
        .write_all(&out)
        .unwrap();
}

/// The scalar codecs on every E4M3 value and midpoint (ties), E2M1 midpoints, and a
/// log-uniform sweep.
fn codec_case(dir: &Path) {
    let mut xs = Vec::new();
    for b in 0u8..0x7e {
        let (lo, hi) = (e4m3_decode(b), e4m3_decode(b + 1));
        xs.extend([lo, 0.5 * (lo + hi), hi, -0.5 * (lo + hi)]);
        // Just off the midpoint on both sides.
        let mid = 0.5 * (lo + hi);
        xs.extend([
            f32::from_bits(mid.to_bits() + 1),
            f32::from_bits(mid.to_bits() - 1),
        ]);
    }
    for q in 0..200 {
        xs.push(q as f32 * 0.03125 - 3.0);
    }
    xs.extend([
        448.0,
        464.0,
        1e9,
        0.0,
        -0.0,
        2f32.powi(-10),
        3.0 * 2f32.powi(-10),
    ]);
    let mut state = 0x5eed_u64;
    for _ in 0..20_000 {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let e = (state >> 33) as f32 / (1u64 << 31) as f32 * 24.0 - 13.0;
        xs.push(if state & 1 == 0 { 1.0 } else { -1.0 } * 2f32.powf(e));
    }
    let mut out = Vec::new();
    put_u32(&mut out, xs.len());
    put_f32s(&mut out, &xs);
    out.extend(xs.iter().map(|&x| e4m3_encode(x)));
    out.extend(xs.iter().map(|&x| e2m1_encode(x)));
    let table: Vec<f32> = (0..=255u8).map(e4m3_decode).collect();
    put_f32s(&mut out, &table);
    fs::File::create(dir.join("c_codecs.bin"))
        .unwrap()
        .write_all(&out)
        .unwrap();
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .expect("usage: nvfp4_emu_cases OUT_DIR");
    write_cases(Path::new(&dir));
    println!("cases written to {dir}");
}

/// Writes every case into `dir` (created if missing). Also used by `tests/cuda.rs`.
pub fn write_cases(dir: &Path) {
    fs::create_dir_all(dir).unwrap();

    codec_case(dir);
    let mut id = 0;
    for &(rows, cols) in &[
        (1, 16),
        (3, 32),
        (17, 48),
        (33, 160),
        (16, 256),
        (100, 1024),
    ] {
        for kind in 0..5 {
            for tile in [false, true] {
                let data = test_tensor(rows, cols, kind, (id * 7 + kind) as u64);
                quant_case(dir, id, &data, rows, cols, tile);
                id += 1;
            }
        }
    }
    // All zeros, and non-finite values (the first one's index must be found).
    quant_case(dir, id, &[0.0; 64], 2, 32, false);
    id += 1;
    let mut data = test_tensor(4, 64, 0, 3);
    data[200] = f32::INFINITY;
    data[150] = f32::NAN;
    quant_case(dir, id, &data, 4, 64, false);

    let shapes = [
        (1, 16, 1),
        (5, 32, 3),
        (37, 48, 8),
        (130, 80, 9),
        (257, 272, 130),
        (64, 1040, 17),
        (129, 512, 200),
    ];
    for (i, &(m, k, n)) in shapes.iter().enumerate() {
        gemm_case(dir, i, m, k, n, i % 3);
    }
}
