//! Plain-Rust kernels: the fallback for CPUs without AVX2/FMA and the cross-check for it.

use std::ops::Range;

use super::Tile;
use crate::quant::{BLOCK, Nvfp4Tensor};
use crate::scalar::{E4M3_TABLE, e2m1_decode};

/// Decoded E2M1 values of both nibbles of every byte: `[low, high]`.
fn byte_pair(byte: u8) -> [f32; 2] {
    [e2m1_decode(byte & 0x0f), e2m1_decode(byte >> 4)]
}

/// `y[i] = W[rows.start + i, :] . x` with `xp` the permuted activation row.
pub(super) fn gemv_rows(w: &Nvfp4Tensor, xp: &[f32], rows: Range<usize>, y: &mut [f32]) {
    let k = w.cols();
    let blocks = k / BLOCK;
    for (out, r) in y.iter_mut().zip(rows) {
        let packed = &w.packed()[r * k / 2..(r + 1) * k / 2];
        let scales = &w.scales()[r * blocks..(r + 1) * blocks];
        let mut acc = 0.0f32;
        for ((bytes, &scale), xb) in packed
            .chunks_exact(BLOCK / 2)
            .zip(scales)
            .zip(xp.chunks_exact(BLOCK))
        {
            let mut lanes = [0.0f32; BLOCK / 2];
            for (j, &byte) in bytes.iter().enumerate() {
                let [lo, hi] = byte_pair(byte);
                lanes[j] = lo * xb[j] + hi * xb[BLOCK / 2 + j];
            }
            acc += E4M3_TABLE[scale as usize] * lanes.iter().sum::<f32>();
        }
        *out = acc * w.global_decode_scale();
    }
}

/// Full decode scale (`e4m3 * global`) of every scale byte, for [`decode_row`].
pub(super) fn scale_table(w: &Nvfp4Tensor) -> [f32; 256] {
    std::array::from_fn(|i| E4M3_TABLE[i] * w.global_decode_scale())
}

/// Decodes `W[row, k0..k0 + dst.len()]` to f32; `table` is [`scale_table`].
pub(super) fn decode_row(
    w: &Nvfp4Tensor,
    table: &[f32; 256],
    row: usize,
    k0: usize,
    dst: &mut [f32],
) {
    let k = w.cols();
    let start = row * k + k0;
    let packed = &w.packed()[start / 2..(start + dst.len()) / 2];
    let scales = &w.scales()[start / BLOCK..(start + dst.len()) / BLOCK];
    for ((d, bytes), &scale) in dst
        .chunks_exact_mut(BLOCK)
        .zip(packed.chunks_exact(BLOCK / 2))
        .zip(scales)
    {
        let s = table[scale as usize];
        for (pair, &byte) in d.chunks_exact_mut(2).zip(bytes) {
            let [lo, hi] = byte_pair(byte);
            pair[0] = lo * s;
            pair[1] = hi * s;
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    for (ca, cb) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += ca[l] * cb[l];
        }
    }
    acc.iter().sum()
}

/// Adds the tile's products into the output.
///
/// # Safety
///
/// As for the AVX2 `tile`: `t.y` must point to a row-major output (row stride `t.ys`) of
/// which this thread may write columns `0..t.mr` of rows `0..t.n`.
pub(super) unsafe fn tile(t: &Tile<'_, f32>) {
    for i in 0..t.n {
        let x = &t.x[i * t.xs..i * t.xs + t.kw];
        for j in 0..t.mr {
            let w = &t.w[j * t.ws..j * t.ws + t.kw];
            // SAFETY: per the contract, columns [0, mr) of rows [0, n) at `y` are ours.
            unsafe { *t.y.add(i * t.ys + j) += dot(x, w) };
        }
    }
}
