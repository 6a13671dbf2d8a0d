// A small CPU emulation of the CUDA features the NVFP4 kernels use, so that the .cu sources
// can be compiled with a host C++ compiler and *run* on a machine without a GPU.
//
// Each CTA runs as blockDim.x OS threads (CTAs one after another), `__shared__` variables
// become function-local statics (one CTA at a time, so that is exactly CTA scope),
// `__syncthreads` is a std::barrier over the CTA, warp shuffles and the tensor-core MMA are
// warp-collective exchanges through per-warp scratch with a 32-thread barrier, atomics take
// a mutex, and the rounding intrinsics are the host's IEEE float operations (build with
// -ffp-contract=off so that nothing is fused that the GPU would not fuse).
//
// What this does not model: the real fragment layout of the hardware MMA (the emulation
// implements the PTX ISA's documented m16n8k16 layout, the same reading the kernel's
// indexing is built on), memory coalescing, timing, and register or shared-memory limits.
// It checks the kernels' arithmetic and indexing, not their performance.

#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <array>
#include <barrier>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define CHORUS_CUDA_EMULATION 1
// The tensor-core kernels compile their bodies for sm_80 and newer.
#define __CUDA_ARCH__ 800

#define __global__
#define __device__
#define __forceinline__ inline
#define __constant__
#define __shared__ static
#define __restrict__ __restrict
#define __launch_bounds__(x)
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};
struct __attribute__((aligned(8))) uint2 {
    unsigned int x, y;
};
struct __attribute__((aligned(16))) uint4 {
    unsigned int x, y, z, w;
};
struct __attribute__((aligned(16))) float4 {
    float x, y, z, w;
};
inline uint2 make_uint2(unsigned int x, unsigned int y) { return {x, y}; }
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) {
    return {x, y, z, w};
}
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

inline thread_local dim3 threadIdx;
inline dim3 blockIdx, blockDim, gridDim;

inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    memcpy(&u, &f, 4);
    return u;
}
inline float __uint_as_float(unsigned int u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

inline std::mutex emu_atomic_mutex;
inline unsigned int atomicMax(unsigned int* p, unsigned int v) {
    std::lock_guard<std::mutex> lock(emu_atomic_mutex);
    unsigned int old = *p;
    if (v > old) *p = v;
    return old;
}
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
    std::lock_guard<std::mutex> lock(emu_atomic_mutex);
    unsigned long long old = *p;
    if (v < old) *p = v;
    return old;
}

// Per-CTA synchronisation state.
struct EmuCta {
    explicit EmuCta(unsigned int threads) : block((std::ptrdiff_t)threads) {
        for (unsigned int w = 0; w < (threads + 31) / 32; ++w) {
            warps.emplace_back(std::make_unique<std::barrier<>>(32));
        }
        scratch.resize(warps.size());
    }
    std::barrier<> block;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    // Per warp and lane: room for one MMA's fragments (4 + 2 words) or a shuffle value.
    std::vector<std::array<std::array<unsigned int, 6>, 32>> scratch;
};
inline EmuCta* emu_cta = nullptr;

inline void __syncthreads() { emu_cta->block.arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned int /*mask*/, float v, int offset) {
    unsigned int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    auto& s = emu_cta->scratch[warp];
    s[lane][0] = __float_as_uint(v);
    emu_cta->warps[warp]->arrive_and_wait();
    float r = __uint_as_float(s[lane ^ (unsigned int)offset][0]);
    emu_cta->warps[warp]->arrive_and_wait();
    return r;
}

// D += A . B for m16n8k16, bf16 inputs, f32 accumulation, with the PTX ISA fragment layout
// (g = lane / 4, t = lane % 4; the lower-indexed element of each pair in the low half):
//   A (16 x 16): a[0] = (g, 2t..2t+1), a[1] = (g+8, 2t..), a[2] = (g, 2t+8..), a[3] = (g+8, 2t+8..)
//   B (16 x 8):  b[0] = (k 2t..2t+1, n g), b[1] = (k 2t+8..2t+9, n g)
//   D (16 x 8):  d[0..1] = (g, 2t..2t+1), d[2..3] = (g+8, 2t..2t+1)
inline void chorus_emulate_mma_bf16_16816(float d[4], const unsigned int a[4],
                                          const unsigned int b[2]) {
    unsigned int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    auto& s = emu_cta->scratch[warp];
    for (int i = 0; i < 4; ++i) s[lane][i] = a[i];
    s[lane][4] = b[0];
    s[lane][5] = b[1];
    emu_cta->warps[warp]->arrive_and_wait();

    auto bf16 = [](unsigned int bits) { return __uint_as_float(bits << 16); };
    float A[16][16], B[16][8];
    for (unsigned int l = 0; l < 32; ++l) {
        unsigned int g = l / 4, t = l % 4;
        for (int h = 0; h < 2; ++h) {
            A[g][2 * t + h] = bf16((s[l][0] >> (16 * h)) & 0xffffu);
            A[g + 8][2 * t + h] = bf16((s[l][1] >> (16 * h)) & 0xffffu);
            A[g][2 * t + 8 + h] = bf16((s[l][2] >> (16 * h)) & 0xffffu);
            A[g + 8][2 * t + 8 + h] = bf16((s[l][3] >> (16 * h)) & 0xffffu);
            B[2 * t + h][g] = bf16((s[l][4] >> (16 * h)) & 0xffffu);
            B[2 * t + 8 + h][g] = bf16((s[l][5] >> (16 * h)) & 0xffffu);
        }
    }
    emu_cta->warps[warp]->arrive_and_wait();

    unsigned int g = lane / 4, t = lane % 4;
    for (int c = 0; c < 4; ++c) {
        unsigned int row = g + (c >= 2 ? 8 : 0);
        unsigned int col = 2 * t + (c & 1);
        // bf16 x bf16 products are exact in f32; sum them in f32 like the hardware.
        float sum = d[c];
        for (int kk = 0; kk < 16; ++kk) sum += A[row][kk] * B[kk][col];
        d[c] = sum;
    }
}

// Runs `kernel()` over the grid, one CTA at a time, blockDim.x threads per CTA.
template <typename F>
void emu_launch(dim3 grid, dim3 block, F kernel) {
    gridDim = grid;
    blockDim = block;
    for (unsigned int z = 0; z < grid.z; ++z) {
        for (unsigned int y = 0; y < grid.y; ++y) {
            for (unsigned int x = 0; x < grid.x; ++x) {
                blockIdx = dim3{x, y, z};
                EmuCta cta(block.x);
                emu_cta = &cta;
                std::vector<std::thread> threads;
                threads.reserve(block.x);
                for (unsigned int t = 0; t < block.x; ++t) {
                    threads.emplace_back([t, &kernel] {
                        threadIdx = dim3{t, 0, 0};
                        kernel();
                    });
                }
                for (auto& th : threads) th.join();
                emu_cta = nullptr;
            }
        }
    }
}
