// NVFP4 quantization and dequantization with TransformerEngine's rule, bit-identical to the
// CPU `Nvfp4Tensor::quantize` / `dequantize` (kernels/src/quant.rs).
//
// Quantizing takes two launches on one stream:
//   1. nvfp4_amax: the tensor's absolute maximum (and the first non-finite element, which the
//      host turns into an error naming the tensor);
//   2. nvfp4_quantize: one thread per scale group (16 elements of a row, or a 16x16 tile)
//      derives the global scale from that maximum, rounds the group's E4M3 scale and encodes
//      its E2M1 codes.
// Max is exact and order-independent, and every other step is a fixed sequence of correctly
// rounded float operations per element, so thread scheduling cannot change a single bit.

#ifndef CHORUS_NVFP4_COMMON
#include "nvfp4_common.cuh"
#endif

#define AMAX_THREADS 256

// Grid-stride pass over `x`: block-wide maximum of |x| merged into `*amax_bits` with an
// integer atomicMax (for non-negative floats the bit patterns sort like the values), and the
// lowest index of a NaN or infinity merged into `*first_bad` with atomicMin. The host zeroes
// `*amax_bits` and sets `*first_bad` to all ones before the launch.
extern "C" __global__ void nvfp4_amax(const float* __restrict__ x, unsigned long long len,
                                      unsigned int* __restrict__ amax_bits,
                                      unsigned long long* __restrict__ first_bad) {
    __shared__ float block_max[AMAX_THREADS];
    __shared__ unsigned long long block_bad[AMAX_THREADS];

    float local_max = 0.0f;
    unsigned long long local_bad = ~0ull;
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
         i < len; i += stride) {
        float a = fabsf(x[i]);
        if (a <= CHORUS_FLT_MAX) {
            local_max = fmaxf(local_max, a);
        } else if (i < local_bad) {
            // Infinity or NaN (a NaN fails every comparison, so it lands here too).
            local_bad = i;
        }
    }

    // Tree reduction in shared memory: plain and obviously correct; this kernel reads the
    // tensor once and is bound by memory bandwidth, not by the reduction.
    block_max[threadIdx.x] = local_max;
    block_bad[threadIdx.x] = local_bad;
    __syncthreads();
    for (unsigned int half = AMAX_THREADS / 2; half > 0; half >>= 1) {
        if (threadIdx.x < half) {
            block_max[threadIdx.x] = fmaxf(block_max[threadIdx.x], block_max[threadIdx.x + half]);
            unsigned long long other = block_bad[threadIdx.x + half];
            if (other < block_bad[threadIdx.x]) {
                block_bad[threadIdx.x] = other;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        atomicMax(amax_bits, __float_as_uint(block_max[0]));
        if (block_bad[0] != ~0ull) {
            atomicMin(first_bad, block_bad[0]);
        }
    }
}

// One thread per scale group. With `tile_rows == 1` a group is 16 consecutive elements of a
// row (the 1x16 layout); with `tile_rows == 16` it is a 16x16 tile whose single scale is
// written on each of its rows (the 16x16 layout; the last tile may have fewer rows). Groups
// are numbered row-group-major so that neighbouring threads read neighbouring 64-byte runs.
//
// Outputs are the ModelOpt layout: `packed` [rows, cols/2] with element 2i in the low nibble
// of byte i, `scales` [rows, cols/16], and the global decode scale in `*global_decode_scale`.
extern "C" __global__ void nvfp4_quantize(const float* __restrict__ x, unsigned int rows,
                                          unsigned int cols, unsigned int tile_rows,
                                          const unsigned int* __restrict__ amax_bits,
                                          unsigned char* __restrict__ packed,
                                          unsigned char* __restrict__ scales,
                                          float* __restrict__ global_decode_scale) {
    unsigned int blocks_per_row = cols / NVFP4_BLOCK;
    unsigned int row_groups = (rows + tile_rows - 1) / tile_rows;
    unsigned long long group = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (group >= (unsigned long long)row_groups * blocks_per_row) {
        return;
    }
    unsigned int b = (unsigned int)(group % blocks_per_row);
    unsigned int r0 = (unsigned int)(group / blocks_per_row) * tile_rows;
    unsigned int r1 = min(r0 + tile_rows, rows);

    // Every thread derives the same scales from the same amax, exactly as the CPU does:
    // S_enc = 2688 / amax, S_dec = 1 / S_enc, block factor S_enc * (1/6), where 1/6 is the
    // float nearest to it (the CPU's `1.0 / E2M1_MAX` constant).
    float amax = __uint_as_float(*amax_bits);
    float s_enc = nvfp4_global_encode_scale(amax);
    float s_dec = __fdiv_rn(1.0f, s_enc);
    float block_factor = __fmul_rn(s_enc, __fdiv_rn(1.0f, E2M1_MAX));
    if (group == 0) {
        *global_decode_scale = s_dec;
    }

    // The group's absolute maximum (rows r0..r1 of the 16 columns).
    float group_amax = 0.0f;
    for (unsigned int r = r0; r < r1; ++r) {
        const float4* src = (const float4*)(x + (unsigned long long)r * cols + b * NVFP4_BLOCK);
#pragma unroll
        for (int q = 0; q < NVFP4_BLOCK / 4; ++q) {
            float4 v = src[q];
            group_amax = fmaxf(group_amax, fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)),
                                                 fmaxf(fabsf(v.z), fabsf(v.w))));
        }
    }

    // E4M3 block scale, then the factor that takes the group to the E2M1 range. An all-zero
    // group gets scale 0 and TE's guard: 1 / 0 = inf, capped at FLT_MAX (0 * FLT_MAX = 0, so
    // its codes stay 0).
    unsigned int scale = e4m3_encode(fminf(__fmul_rn(group_amax, block_factor), E4M3_MAX));
    float enc = fminf(__fdiv_rn(1.0f, __fmul_rn(e4m3_decode(scale), s_dec)), CHORUS_FLT_MAX);

    for (unsigned int r = r0; r < r1; ++r) {
        unsigned long long first = (unsigned long long)r * cols + b * NVFP4_BLOCK;
        const float4* src = (const float4*)(x + first);
        // 16 codes -> 8 bytes, assembled in two 32-bit words and stored at once.
        unsigned int word[2] = {0u, 0u};
#pragma unroll
        for (int q = 0; q < NVFP4_BLOCK / 4; ++q) {
            float4 v = src[q];
            float e[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                float scaled = fminf(fmaxf(__fmul_rn(e[j], enc), -E2M1_MAX), E2M1_MAX);
                unsigned int element = q * 4 + j;  // 0..15 within the group
                word[element / 8] |= e2m1_encode(scaled) << ((element % 8) * 4);
            }
        }
        // `first` is a multiple of 16, so the 8 bytes start on an 8-byte boundary.
        *(uint2*)(packed + first / 2) = make_uint2(word[0], word[1]);
        scales[(unsigned long long)r * blocks_per_row + b] = (unsigned char)scale;
    }
}

// One thread per 16-element group: x_hat = e2m1(code) * (e4m3(scale) * S_dec), the block's
// full decode scale first, then the element, the same two roundings as the CPU.
extern "C" __global__ void nvfp4_dequantize(const unsigned char* __restrict__ packed,
                                            const unsigned char* __restrict__ scales,
                                            float global_decode_scale,
                                            unsigned long long groups,
                                            float* __restrict__ out) {
    unsigned long long g = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= groups) {
        return;
    }
    float s = __fmul_rn(e4m3_decode(scales[g]), global_decode_scale);
    uint2 codes = *(const uint2*)(packed + g * (NVFP4_BLOCK / 2));
    unsigned int word[2] = {codes.x, codes.y};
    float4* dst = (float4*)(out + g * NVFP4_BLOCK);
#pragma unroll
    for (int q = 0; q < NVFP4_BLOCK / 4; ++q) {
        unsigned int w = word[q / 2] >> ((q % 2) * 16);
        dst[q] = make_float4(__fmul_rn(e2m1_decode(w), s), __fmul_rn(e2m1_decode(w >> 4), s),
                             __fmul_rn(e2m1_decode(w >> 8), s),
                             __fmul_rn(e2m1_decode(w >> 12), s));
    }
}
