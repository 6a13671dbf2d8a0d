// NVFP4-weight GEMM: Y[n, m] = X[n, k] . W[m, k]^T, W in NVFP4 (packed E2M1 codes
// [m, k/2], E4M3 scales [m, k/16], one FP32 global decode scale), X in f32 or bf16
// (row-major, bf16 passed as raw 16-bit patterns), Y in f32. Same contract as the CPU
// `CpuGemm::nvfp4` / `nvfp4_bf16` (kernels/src/gemm/mod.rs).
//
// Three kernels, chosen by the host:
//   - nvfp4_gemv_*      n <= 8, any GPU. A warp per weight row streams the row once and
//                        multiplies it into all n activation rows: at small n the GEMM is a
//                        read of the weights, so the kernel's job is to read them at full
//                        bandwidth and do nothing else.
//   - nvfp4_gemm_mma_*  n > 8 on sm_80 and newer (Ampere, Hopper, Blackwell). Weight tiles are
//                        dequantized in the prologue of each k-step into BF16 in shared memory
//                        and multiplied on the tensor cores with mma.sync m16n8k16 (f32
//                        accumulate). Hopper has no FP4 tensor cores, so this is its path.
//   - nvfp4_gemm_simt_* n > 8 on older GPUs (and a cross-check elsewhere): the same tiling
//                        idea with f32 FMAs on the CUDA cores.
//
// Exactness of the prologue: an E2M1 value times an E4M3 block scale has at most 2 + 4
// significant bits, so it is exact in bf16 (8 bits) and in f32. The kernels multiply it out
// per element and apply the FP32 global decode scale once to the final sums. With bf16
// activations the products are therefore exact and only the f32 summation order differs from
// the CPU; with f32 activations the tensor-core path first rounds X to bf16 (relative error
// <= 2^-9 per element), the GEMV and SIMT paths keep it in f32.
//
// Not done: the Blackwell block-scaled FP4 MMA (tcgen05 `kind::mxf4nvf4`, scales in the
// 128x4 tensor-memory layout). It multiplies FP4 by FP4, so it would also need the
// activations quantized to NVFP4, a different numeric contract from this one; Blackwell runs
// the mma.sync BF16 path above.

#ifndef CHORUS_NVFP4_COMMON
#include "nvfp4_common.cuh"
#endif

// ---------------------------------------------------------------------------------------
// Activation loaders: 16 consecutive activations as f32, from f32 or bf16 storage. The
// pointer is 16-element aligned (k is a multiple of 16 and rows start at multiples of k).

struct ActF32 {
    typedef float Elem;
    static __device__ __forceinline__ void load16(const float* __restrict__ p, float out[16]) {
        const float4* q = (const float4*)p;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            float4 v = q[i];
            out[4 * i + 0] = v.x;
            out[4 * i + 1] = v.y;
            out[4 * i + 2] = v.z;
            out[4 * i + 3] = v.w;
        }
    }
};

struct ActBf16 {
    typedef unsigned short Elem;
    static __device__ __forceinline__ void load16(const unsigned short* __restrict__ p,
                                                  float out[16]) {
        const uint4* q = (const uint4*)p;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            uint4 v = q[i];
            unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                out[8 * i + 2 * j + 0] = bf16_bits_to_f32(w[j] & 0xffffu);
                out[8 * i + 2 * j + 1] = bf16_bits_to_f32(w[j] >> 16);
            }
        }
    }
};

// ---------------------------------------------------------------------------------------
// GEMV / small batch (n <= GEMV_MAX_N).

#define GEMV_MAX_N 8
#define GEMV_WARPS 8

// Warp w of block b owns weight row b * GEMV_WARPS + w. Lane l walks the row's 16-element
// groups l, l + 32, ...: per step the warp reads 32 consecutive 8-byte code runs (256
// contiguous bytes) and 32 consecutive scale bytes, so the weight stream is fully coalesced.
// Each group's E2M1 values are dotted with the activations first and scaled once, which
// saves 15 multiplies per group and keeps the exact part (the code values) separate from
// the rounding part (the scale).
template <typename Act>
__device__ __forceinline__ void gemv_body(const unsigned char* __restrict__ packed,
                                          const unsigned char* __restrict__ scales,
                                          float global_decode_scale,
                                          const typename Act::Elem* __restrict__ x,
                                          float* __restrict__ y, unsigned int m, unsigned int k,
                                          unsigned int n) {
    unsigned int lane = threadIdx.x & 31u;
    unsigned int row = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (row >= m) {
        return;  // whole warp leaves together: row depends only on the warp index
    }
    unsigned int groups = k / NVFP4_BLOCK;
    const uint2* row_codes = (const uint2*)(packed + (unsigned long long)row * (k / 2));
    const unsigned char* row_scales = scales + (unsigned long long)row * groups;

    float acc[GEMV_MAX_N];
#pragma unroll
    for (int j = 0; j < GEMV_MAX_N; ++j) {
        acc[j] = 0.0f;
    }

    for (unsigned int g = lane; g < groups; g += 32u) {
        uint2 codes = row_codes[g];
        float scale = e4m3_decode(row_scales[g]);
        float w[16];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            w[i] = e2m1_decode(codes.x >> (4 * i));
            w[8 + i] = e2m1_decode(codes.y >> (4 * i));
        }
#pragma unroll
        for (int j = 0; j < GEMV_MAX_N; ++j) {
            if (j < (int)n) {
                float a[16];
                Act::load16(x + (unsigned long long)j * k + g * NVFP4_BLOCK, a);
                float dot = 0.0f;
#pragma unroll
                for (int i = 0; i < 16; ++i) {
                    dot = fmaf(w[i], a[i], dot);
                }
                acc[j] = fmaf(dot, scale, acc[j]);
            }
        }
    }

    // Butterfly reduction across the warp; every lane ends with the full sums.
#pragma unroll
    for (int j = 0; j < GEMV_MAX_N; ++j) {
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) {
            acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], offset);
        }
    }
    if (lane == 0) {
#pragma unroll
        for (int j = 0; j < GEMV_MAX_N; ++j) {
            if (j < (int)n) {
                y[(unsigned long long)j * m + row] = acc[j] * global_decode_scale;
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)
    nvfp4_gemv_f32(const unsigned char* __restrict__ packed,
                   const unsigned char* __restrict__ scales, float global_decode_scale,
                   const float* __restrict__ x, float* __restrict__ y, unsigned int m,
                   unsigned int k, unsigned int n) {
    gemv_body<ActF32>(packed, scales, global_decode_scale, x, y, m, k, n);
}

extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)
    nvfp4_gemv_bf16(const unsigned char* __restrict__ packed,
                    const unsigned char* __restrict__ scales, float global_decode_scale,
                    const unsigned short* __restrict__ x, float* __restrict__ y, unsigned int m,
                    unsigned int k, unsigned int n) {
    gemv_body<ActBf16>(packed, scales, global_decode_scale, x, y, m, k, n);
}

// ---------------------------------------------------------------------------------------
// Tensor-core GEMM (sm_80+): BF16 mma.sync with the NVFP4 weights dequantized in the
// prologue.
//
// CTA tile: MMA_BM weight rows x MMA_BN activation rows, stepping MMA_BK along k. 8 warps in
// a 2 (m) x 4 (n) grid, each computing a 64 x 32 sub-tile as 4 x 4 m16n8k16 MMAs per 16-wide
// k-slice. In MMA terms A = W (m x k, row-major) and B = X^T (k x n, "col" layout = X
// row-major), so both shared-memory tiles are k-contiguous rows and every fragment register
// is one aligned 32-bit load of two neighbouring bf16 values.
//
// Pipeline: the next k-step's raw data (packed codes, scale bytes, activations) is loaded
// into registers while the tensor cores work on the current shared-memory tile; it is
// decoded and stored after the barrier. One shared buffer, two barriers per k-step.

#define MMA_BM 128
#define MMA_BN 128
#define MMA_BK 64
#define MMA_THREADS 256
// Row stride of the shared tiles in bf16 elements: 64 + 8 of padding = 36 words, so the 8
// rows read by one fragment load fall in 8 distinct groups of 4 banks (no conflicts), and
// each row still starts on a 16-byte boundary for the vector stores.
#define MMA_LDS (MMA_BK + 8)
// Per thread and k-step: 2 of the tile's 128 x 4 weight groups ...
#define MMA_W_GROUPS (MMA_BM * (MMA_BK / NVFP4_BLOCK) / MMA_THREADS)
// ... and 8 float4 (f32) or 4 uint4 (bf16) of the 128 x 64 activation tile.
#define MMA_X_F32_VECS (MMA_BN * MMA_BK / 4 / MMA_THREADS)
#define MMA_X_BF16_VECS (MMA_BN * MMA_BK / 8 / MMA_THREADS)

// D = A . B + D for one m16n8k16 tile, bf16 inputs, f32 accumulators (PTX ISA fragment
// layouts; g = lane / 4, t = lane % 4):
//   a[0] = A[g][2t..2t+1]    a[1] = A[g+8][2t..2t+1]
//   a[2] = A[g][2t+8..2t+9]  a[3] = A[g+8][2t+8..2t+9]
//   b[0] = B[2t..2t+1][g]    b[1] = B[2t+8..2t+9][g]
//   d[0..1] = D[g][2t..2t+1] d[2..3] = D[g+8][2t..2t+1]
// (the lower-indexed element of each pair in the low 16 bits).
__device__ __forceinline__ void mma_bf16_16816(float d[4], const unsigned int a[4],
                                               const unsigned int b[2]) {
#if defined(CHORUS_CUDA_EMULATION)
    // CPU emulation of the kernels (kernels/cuda/emu/): a warp-collective software MMA that
    // rebuilds A and B from the 32 lanes' fragments with the layouts above.
    chorus_emulate_mma_bf16_16816(d, a, b);
#elif __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// Raw global data of one k-step, held in registers between the load and the store.
struct MmaStageF32 {
    uint2 codes[MMA_W_GROUPS];
    unsigned int scale[MMA_W_GROUPS];
    float4 x[MMA_X_F32_VECS];
};
struct MmaStageBf16 {
    uint2 codes[MMA_W_GROUPS];
    unsigned int scale[MMA_W_GROUPS];
    uint4 x[MMA_X_BF16_VECS];
};

// Weight groups of the tile: index i = it * 256 + tid -> row i / 4, group i % 4, so the 4
// threads of a row read its 32 contiguous code bytes (one sector). Groups past m or k read
// as zero (code 0 decodes to 0 whatever the scale).
__device__ __forceinline__ void mma_load_w(const unsigned char* __restrict__ packed,
                                           const unsigned char* __restrict__ scales,
                                           unsigned int m, unsigned int k, unsigned int m0,
                                           unsigned int k0, uint2 codes[MMA_W_GROUPS],
                                           unsigned int scale[MMA_W_GROUPS]) {
    unsigned int groups = k / NVFP4_BLOCK;
#pragma unroll
    for (int it = 0; it < MMA_W_GROUPS; ++it) {
        unsigned int i = it * MMA_THREADS + threadIdx.x;
        unsigned int row = m0 + i / (MMA_BK / NVFP4_BLOCK);
        unsigned int g = k0 / NVFP4_BLOCK + i % (MMA_BK / NVFP4_BLOCK);
        if (row < m && g < groups) {
            codes[it] = *(const uint2*)(packed + (unsigned long long)row * (k / 2) + g * 8);
            scale[it] = scales[(unsigned long long)row * groups + g];
        } else {
            codes[it] = make_uint2(0u, 0u);
            scale[it] = 0u;
        }
    }
}

// Decodes the weight groups into the shared tile: value = e2m1 * e4m3 scale (exact in bf16).
__device__ __forceinline__ void mma_store_w(unsigned short (*ws)[MMA_LDS],
                                            const uint2 codes[MMA_W_GROUPS],
                                            const unsigned int scale[MMA_W_GROUPS]) {
#pragma unroll
    for (int it = 0; it < MMA_W_GROUPS; ++it) {
        unsigned int i = it * MMA_THREADS + threadIdx.x;
        unsigned int row = i / (MMA_BK / NVFP4_BLOCK);
        unsigned int col = (i % (MMA_BK / NVFP4_BLOCK)) * NVFP4_BLOCK;
        float s = e4m3_decode(scale[it]);
        unsigned int word[2] = {codes[it].x, codes[it].y};
        unsigned int out[8];
#pragma unroll
        for (int p = 0; p < 8; ++p) {
            // Elements 2p and 2p+1 are the low and high nibble of byte p.
            unsigned int byte = word[p / 4] >> ((p % 4) * 8);
            unsigned int lo = f32_to_bf16_bits(e2m1_decode(byte) * s);
            unsigned int hi = f32_to_bf16_bits(e2m1_decode(byte >> 4) * s);
            out[p] = lo | (hi << 16);
        }
        uint4* dst = (uint4*)&ws[row][col];
        dst[0] = make_uint4(out[0], out[1], out[2], out[3]);
        dst[1] = make_uint4(out[4], out[5], out[6], out[7]);
    }
}

// Activation tile, f32: index i = it * 256 + tid -> row i / 16, float4 column i % 16, so a
// warp reads two rows' 256 contiguous bytes. Rows past n and columns past k read as zero.
__device__ __forceinline__ void mma_load_x(const float* __restrict__ x, unsigned int n,
                                           unsigned int k, unsigned int n0, unsigned int k0,
                                           float4 v[MMA_X_F32_VECS]) {
#pragma unroll
    for (int it = 0; it < MMA_X_F32_VECS; ++it) {
        unsigned int i = it * MMA_THREADS + threadIdx.x;
        unsigned int row = n0 + i / (MMA_BK / 4);
        unsigned int col = k0 + (i % (MMA_BK / 4)) * 4;
        if (row < n && col < k) {
            v[it] = *(const float4*)(x + (unsigned long long)row * k + col);
        } else {
            v[it] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
    }
}

__device__ __forceinline__ void mma_store_x(unsigned short (*xs)[MMA_LDS],
                                            const float4 v[MMA_X_F32_VECS]) {
#pragma unroll
    for (int it = 0; it < MMA_X_F32_VECS; ++it) {
        unsigned int i = it * MMA_THREADS + threadIdx.x;
        unsigned int row = i / (MMA_BK / 4);
        unsigned int col = (i % (MMA_BK / 4)) * 4;
        unsigned int lo = f32_to_bf16_bits(v[it].x) | (f32_to_bf16_bits(v[it].y) << 16);
        unsigned int hi = f32_to_bf16_bits(v[it].z) | (f32_to_bf16_bits(v[it].w) << 16);
        *(uint2*)&xs[row][col] = make_uint2(lo, hi);
    }
}

// Activation tile, bf16: index i -> row i / 8, 8-element column i % 8 (128 bytes per row).
__device__ __forceinline__ void mma_load_x(const unsigned short* __restrict__ x, unsigned int n,
                                           unsigned int k, unsigned int n0, unsigned int k0,
                                           uint4 v[MMA_X_BF16_VECS]) {
#pragma unroll
    for (int it = 0; it < MMA_X_BF16_VECS; ++it) {
        unsigned int i = it * MMA_THREADS + threadIdx.x;
        unsigned int row = n0 + i / (MMA_BK / 8);
        unsigned int col = k0 + (i % (MMA_BK / 8)) * 8;
        if (row < n && col < k) {
            v[it] = *(const uint4*)(x + (unsigned long long)row * k + col);
        } else {
            v[it] = make_uint4(0u, 0u, 0u, 0u);
        }
    }
}

__device__ __forceinline__ void mma_store_x(unsigned short (*xs)[MMA_LDS],
                                            const uint4 v[MMA_X_BF16_VECS]) {
#pragma unroll
    for (int it = 0; it < MMA_X_BF16_VECS; ++it) {
        unsigned int i = it * MMA_THREADS + threadIdx.x;
        unsigned int row = i / (MMA_BK / 8);
        unsigned int col = (i % (MMA_BK / 8)) * 8;
        *(uint4*)&xs[row][col] = v[it];
    }
}

__device__ __forceinline__ unsigned int lds32(const unsigned short* p) {
    return *(const unsigned int*)p;
}

template <typename Act, typename Stage>
__device__ __forceinline__ void gemm_mma_body(const unsigned char* __restrict__ packed,
                                              const unsigned char* __restrict__ scales,
                                              float global_decode_scale,
                                              const typename Act::Elem* __restrict__ x,
                                              float* __restrict__ y, unsigned int m,
                                              unsigned int k, unsigned int n) {
    __shared__ __align__(16) unsigned short ws[MMA_BM][MMA_LDS];
    __shared__ __align__(16) unsigned short xs[MMA_BN][MMA_LDS];

    unsigned int m0 = blockIdx.x * MMA_BM;
    unsigned int n0 = blockIdx.y * MMA_BN;
    unsigned int warp = threadIdx.x >> 5;
    unsigned int lane = threadIdx.x & 31u;
    unsigned int g = lane >> 2;  // fragment row group
    unsigned int t = lane & 3u;  // thread in group
    unsigned int warp_m = (warp >> 2) * 64;  // 2 warps along m
    unsigned int warp_n = (warp & 3u) * 32;  // 4 warps along n

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                acc[i][j][c] = 0.0f;
            }
        }
    }

    Stage stage;
    mma_load_w(packed, scales, m, k, m0, 0, stage.codes, stage.scale);
    mma_load_x(x, n, k, n0, 0, stage.x);

    for (unsigned int k0 = 0; k0 < k; k0 += MMA_BK) {
        // Prologue of this k-step: dequantize the weights and convert the activations into
        // the shared tiles (the previous step's barrier guarantees nobody still reads them).
        mma_store_w(ws, stage.codes, stage.scale);
        mma_store_x(xs, stage.x);
        __syncthreads();

        // Issue the next step's global loads now so that they are in flight during the MMAs.
        if (k0 + MMA_BK < k) {
            mma_load_w(packed, scales, m, k, m0, k0 + MMA_BK, stage.codes, stage.scale);
            mma_load_x(x, n, k, n0, k0 + MMA_BK, stage.x);
        }

#pragma unroll
        for (int ks = 0; ks < MMA_BK; ks += 16) {
            unsigned int a[4][4];
            unsigned int b[4][2];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                unsigned int r = warp_m + i * 16 + g;
                a[i][0] = lds32(&ws[r][ks + 2 * t]);
                a[i][1] = lds32(&ws[r + 8][ks + 2 * t]);
                a[i][2] = lds32(&ws[r][ks + 2 * t + 8]);
                a[i][3] = lds32(&ws[r + 8][ks + 2 * t + 8]);
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                unsigned int c = warp_n + j * 8 + g;
                b[j][0] = lds32(&xs[c][ks + 2 * t]);
                b[j][1] = lds32(&xs[c][ks + 2 * t + 8]);
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    mma_bf16_16816(acc[i][j], a[i], b[j]);
                }
            }
        }
        __syncthreads();
    }

    // acc[i][j][c]: weight row warp_m + 16i + g (+8 for c >= 2), activation row
    // warp_n + 8j + 2t (+1 for odd c). Y is [n, m], so this is a scattered store; the
    // output is n*m floats against the n*k + m*k/2 bytes read, small beside the MMA work.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                unsigned int row = m0 + warp_m + i * 16 + g + (c >= 2 ? 8u : 0u);
                unsigned int col = n0 + warp_n + j * 8 + 2 * t + (c & 1u);
                if (row < m && col < n) {
                    y[(unsigned long long)col * m + row] = acc[i][j][c] * global_decode_scale;
                }
            }
        }
    }
}

// The tensor-core kernels exist in every compiled module; below sm_80 their body is empty
// and the host never launches them there.
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
    nvfp4_gemm_mma_f32(const unsigned char* __restrict__ packed,
                       const unsigned char* __restrict__ scales, float global_decode_scale,
                       const float* __restrict__ x, float* __restrict__ y, unsigned int m,
                       unsigned int k, unsigned int n) {
#if __CUDA_ARCH__ >= 800
    gemm_mma_body<ActF32, MmaStageF32>(packed, scales, global_decode_scale, x, y, m, k, n);
#endif
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS)
    nvfp4_gemm_mma_bf16(const unsigned char* __restrict__ packed,
                        const unsigned char* __restrict__ scales, float global_decode_scale,
                        const unsigned short* __restrict__ x, float* __restrict__ y,
                        unsigned int m, unsigned int k, unsigned int n) {
#if __CUDA_ARCH__ >= 800
    gemm_mma_body<ActBf16, MmaStageBf16>(packed, scales, global_decode_scale, x, y, m, k, n);
#endif
}

// ---------------------------------------------------------------------------------------
// SIMT fallback GEMM: any GPU, any n. CTA tile SIMT_BM weight rows x SIMT_BN activation rows,
// 32 along k per step (two NVFP4 groups), 256 threads each computing a 4 x 4 block of
// outputs with f32 FMAs. Both shared tiles are stored k-major so that the inner loop reads
// one weight column and one activation column per k: the weight reads are 16 consecutive
// floats per warp (conflict-free) and the activation reads are 2 broadcast values.

#define SIMT_BM 64
#define SIMT_BN 64
#define SIMT_BK 32
#define SIMT_THREADS 256

template <typename Act>
__device__ __forceinline__ void gemm_simt_body(const unsigned char* __restrict__ packed,
                                               const unsigned char* __restrict__ scales,
                                               float global_decode_scale,
                                               const typename Act::Elem* __restrict__ x,
                                               float* __restrict__ y, unsigned int m,
                                               unsigned int k, unsigned int n) {
    // k-major: ws[kk][r] is the dequantized weight (row m0 + r, column k0 + kk) without the
    // global scale, xs[kk][c] the activation (row n0 + c, column k0 + kk). The transposed
    // stores are conflict-free because neighbouring threads own neighbouring rows.
    __shared__ float ws[SIMT_BK][SIMT_BM];
    __shared__ float xs[SIMT_BK][SIMT_BN];

    unsigned int m0 = blockIdx.x * SIMT_BM;
    unsigned int n0 = blockIdx.y * SIMT_BN;
    unsigned int tx = threadIdx.x & 15u;  // weight rows tx, tx + 16, tx + 32, tx + 48
    unsigned int ty = threadIdx.x >> 4;   // activation rows ty, ty + 16, ...
    unsigned int groups = k / NVFP4_BLOCK;

    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            acc[i][j] = 0.0f;
        }
    }

    for (unsigned int k0 = 0; k0 < k; k0 += SIMT_BK) {
        // Weights: threads 0..127 each decode one 16-element group (row tid % 64, group
        // tid / 64 of this step); e2m1 * e4m3 is exact in f32, the global scale comes last.
        if (threadIdx.x < SIMT_BM * (SIMT_BK / NVFP4_BLOCK)) {
            unsigned int r = threadIdx.x % SIMT_BM;
            unsigned int half = threadIdx.x / SIMT_BM;
            unsigned int grp = k0 / NVFP4_BLOCK + half;
            float w[16];
            if (m0 + r < m && grp < groups) {
                unsigned long long row = m0 + r;
                uint2 codes = *(const uint2*)(packed + row * (k / 2) + grp * 8);
                float s = e4m3_decode(scales[row * groups + grp]);
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    w[i] = e2m1_decode(codes.x >> (4 * i)) * s;
                    w[8 + i] = e2m1_decode(codes.y >> (4 * i)) * s;
                }
            } else {
#pragma unroll
                for (int i = 0; i < 16; ++i) {
                    w[i] = 0.0f;
                }
            }
#pragma unroll
            for (int i = 0; i < 16; ++i) {
                ws[half * NVFP4_BLOCK + i][r] = w[i];
            }
        }
        // Activations: threads 128..255 each load 16 consecutive values (row i % 64, the
        // step's first or second 16 columns), converting bf16 to f32 on the way.
        else {
            unsigned int i = threadIdx.x - SIMT_BM * (SIMT_BK / NVFP4_BLOCK);
            unsigned int r = i % SIMT_BN;
            unsigned int half = i / SIMT_BN;
            unsigned int col = k0 + half * NVFP4_BLOCK;
            float a[16];
            if (n0 + r < n && col < k) {
                Act::load16(x + (unsigned long long)(n0 + r) * k + col, a);
            } else {
#pragma unroll
                for (int e = 0; e < 16; ++e) {
                    a[e] = 0.0f;
                }
            }
#pragma unroll
            for (int e = 0; e < 16; ++e) {
                xs[half * NVFP4_BLOCK + e][r] = a[e];
            }
        }
        __syncthreads();

#pragma unroll 8
        for (int kk = 0; kk < SIMT_BK; ++kk) {
            float wv[4];
            float xv[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                wv[i] = ws[kk][tx + 16 * i];
                xv[i] = xs[kk][ty + 16 * i];
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    acc[i][j] = fmaf(wv[i], xv[j], acc[i][j]);
                }
            }
        }
        __syncthreads();
    }

    // Neighbouring threads own neighbouring weight rows = neighbouring columns of Y.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            unsigned int row = m0 + tx + 16 * i;
            unsigned int col = n0 + ty + 16 * j;
            if (row < m && col < n) {
                y[(unsigned long long)col * m + row] = acc[i][j] * global_decode_scale;
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(SIMT_THREADS)
    nvfp4_gemm_simt_f32(const unsigned char* __restrict__ packed,
                        const unsigned char* __restrict__ scales, float global_decode_scale,
                        const float* __restrict__ x, float* __restrict__ y, unsigned int m,
                        unsigned int k, unsigned int n) {
    gemm_simt_body<ActF32>(packed, scales, global_decode_scale, x, y, m, k, n);
}

extern "C" __global__ void __launch_bounds__(SIMT_THREADS)
    nvfp4_gemm_simt_bf16(const unsigned char* __restrict__ packed,
                         const unsigned char* __restrict__ scales, float global_decode_scale,
                         const unsigned short* __restrict__ x, float* __restrict__ y,
                         unsigned int m, unsigned int k, unsigned int n) {
    gemm_simt_body<ActBf16>(packed, scales, global_decode_scale, x, y, m, k, n);
}
