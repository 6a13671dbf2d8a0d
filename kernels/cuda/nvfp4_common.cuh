// Device-side NVFP4 codecs shared by the quantizer and the GEMM kernels.
//
// The Rust side prepends this file to every .cu source before handing it to NVRTC (NVRTC is
// given no include path, so it never needs a CUDA toolkit on disk); the `#include` guard in
// the .cu files is only for tools that read them from this folder.
//
// Everything here must agree bit for bit with the CPU codecs in kernels/src/scalar.rs and
// the rule in kernels/src/quant.rs. That is why the arithmetic is spelled with the explicit
// `__fmul_rn` / `__fdiv_rn` intrinsics: they are IEEE round-to-nearest whatever the compile
// flags, can never be contracted into an FMA, and never flush subnormals (the Rust module
// also compiles the quantizer with --ftz=false --prec-div=true --fmad=false).
//
// No headers are included: NVRTC provides the built-in types and intrinsics used here.

#ifndef CHORUS_NVFP4_COMMON
#define CHORUS_NVFP4_COMMON

#define NVFP4_BLOCK 16
#define E2M1_MAX 6.0f
#define E4M3_MAX 448.0f
#define E4M3_MAX_BYTE 0x7eu
#define E4M3_NAN_BYTE 0x7fu
// Largest finite float; NVRTC has no <cfloat>.
#define CHORUS_FLT_MAX 3.40282346638528859812e+38f

// The eight non-negative E2M1 magnitudes, indexed by the low three bits of a code.
__constant__ float kE2m1Magnitudes[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};

// E2M1 code (low nibble) to float. Code 8 is -0.0, as on the CPU.
__device__ __forceinline__ float e2m1_decode(unsigned int code) {
    float magnitude = kE2m1Magnitudes[code & 7u];
    return (code & 8u) ? -magnitude : magnitude;
}

// Round-to-nearest-even onto the E2M1 grid, saturating at 6. The thresholds are the
// midpoints between neighbours; `<=` versus `<` alternates so that a tie lands on the code
// whose mantissa bit is 0. Negative inputs that round to zero keep their sign (code 8);
// -0.0 itself gives code 0 because `x < 0` is false for it (TransformerEngine does the same).
// NaN gives code 0 (the callers reject non-finite input before it matters).
__device__ __forceinline__ unsigned int e2m1_encode(float x) {
    float a = fabsf(x);
    unsigned int code;
    if (!(a == a)) {
        return 0u;
    } else if (a <= 0.25f) {
        code = 0u;
    } else if (a < 0.75f) {
        code = 1u;
    } else if (a <= 1.25f) {
        code = 2u;
    } else if (a < 1.75f) {
        code = 3u;
    } else if (a <= 2.5f) {
        code = 4u;
    } else if (a < 3.5f) {
        code = 5u;
    } else if (a <= 5.0f) {
        code = 6u;
    } else {
        code = 7u;
    }
    return x < 0.0f ? (code | 8u) : code;
}

// E4M3 (`fn`: bias 7, no infinities, 0x7f/0xff are NaN) byte to float. Built from the bit
// pattern so that it is exact without a table: a normal byte's exponent is rebiased from 7
// to 127 and its 3 mantissa bits become the top of f32's 23.
__device__ __forceinline__ float e4m3_decode(unsigned int byte) {
    unsigned int exponent = (byte >> 3) & 0xfu;
    unsigned int mantissa = byte & 7u;
    float magnitude;
    if (exponent == 0xfu && mantissa == 7u) {
        magnitude = __uint_as_float(0x7fc00000u);
    } else if (exponent == 0u) {
        // Subnormal: mantissa * 2^-9, exact.
        magnitude = __fmul_rn((float)mantissa, 0.001953125f);
    } else {
        magnitude = __uint_as_float(((exponent + 120u) << 23) | (mantissa << 20));
    }
    return (byte & 0x80u) ? -magnitude : magnitude;
}

// Float to E4M3 with round-to-nearest-even, saturating at +-448 (infinities too); NaN gives
// 0x7f. The normal range rounds on f32's raw bits: adding 0x7ffff plus the kept LSB and
// shifting out 20 bits is round-half-to-even, and a carry into the exponent field is
// exactly the right result. (A hardware `cvt.rn.satfinite.e4m3x2.f32` exists from sm_89 on;
// the software version keeps older GPUs and the CPU bit-identical.)
__device__ __forceinline__ unsigned int e4m3_encode(float x) {
    if (!(x == x)) {
        return E4M3_NAN_BYTE;
    }
    unsigned int sign = (__float_as_uint(x) >> 24) & 0x80u;
    float a = fabsf(x);
    unsigned int magnitude;
    if (a >= E4M3_MAX) {
        magnitude = E4M3_MAX_BYTE;
    } else if (a < 0.015625f) {
        // Subnormal range: multiples of 2^-9. a * 512 is exact; rintf rounds half to even.
        // A result of 8 is the smallest normal, which the encoding represents contiguously.
        magnitude = (unsigned int)rintf(__fmul_rn(a, 512.0f));
    } else {
        unsigned int bits = __float_as_uint(a);
        unsigned int lsb = (bits >> 20) & 1u;
        unsigned int rounded = (bits + 0x7ffffu + lsb) >> 20;
        magnitude = min(rounded - (120u << 3), E4M3_MAX_BYTE);
    }
    return sign | magnitude;
}

// TransformerEngine's global encode scale: 6*448 / amax, capped at FLT_MAX, and 1 for an
// all-zero tensor (or when the division underflows to 0).
__device__ __forceinline__ float nvfp4_global_encode_scale(float amax) {
    float s = fminf(__fdiv_rn(E2M1_MAX * E4M3_MAX, amax), CHORUS_FLT_MAX);
    return (amax == 0.0f || s == 0.0f) ? 1.0f : s;
}

// Float to bf16 bits, round-to-nearest-even; NaN stays a (quiet) NaN instead of rounding
// into an infinity.
__device__ __forceinline__ unsigned int f32_to_bf16_bits(float x) {
    unsigned int bits = __float_as_uint(x);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        return ((bits >> 16) & 0x8000u) | 0x7fc0u;
    }
    return (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
}

// bf16 bits to float (exact).
__device__ __forceinline__ float bf16_bits_to_f32(unsigned int bits) {
    return __uint_as_float(bits << 16);
}

#endif  // CHORUS_NVFP4_COMMON
