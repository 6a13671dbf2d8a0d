// Runs the NVFP4 CUDA kernels under the CPU emulation (cuda_emu.h) on the cases written by
// `cargo run -p chorus-kernels --example nvfp4_emu_cases -- DIR` and compares them with the
// CPU results stored there: the quantizer byte for byte (and the first non-finite index),
// dequantization bit for bit, and every GEMM kernel (GEMV, tensor-core, SIMT; f32 and bf16
// activations) with the f64 product of the dequantized weights. Launch configurations are
// the ones kernels/src/cuda/mod.rs uses. See run.sh.

#include "cuda_emu.h"

#include "../nvfp4_common.cuh"
#include "../nvfp4_quant.cu"
#include "../nvfp4_gemm.cu"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>

#include <algorithm>
#include <string>

static std::vector<unsigned char> read_file(const std::string& path) {
    FILE* f = fopen(path.c_str(), "rb");
    if (!f) {
        perror(path.c_str());
        exit(2);
    }
    std::vector<unsigned char> data;
    unsigned char buf[65536];
    size_t got;
    while ((got = fread(buf, 1, sizeof buf, f)) > 0) data.insert(data.end(), buf, buf + got);
    fclose(f);
    return data;
}

struct Reader {
    const std::vector<unsigned char>& d;
    size_t pos = 0;
    template <typename T>
    T get() {
        T v;
        memcpy(&v, d.data() + pos, sizeof(T));
        pos += sizeof(T);
        return v;
    }
    template <typename T>
    std::vector<T> vec(size_t n) {
        std::vector<T> v(n);
        if (n) memcpy(v.data(), d.data() + pos, n * sizeof(T));
        pos += n * sizeof(T);
        return v;
    }
};

static int failures = 0;
#define CHECK(cond, ...)                      \
    do {                                      \
        if (!(cond)) {                        \
            fprintf(stderr, "FAIL: " __VA_ARGS__); \
            fprintf(stderr, "\n");            \
            ++failures;                       \
            return;                           \
        }                                     \
    } while (0)

static unsigned int blocks(size_t items, size_t per) { return (unsigned int)((items + per - 1) / per); }

static void quant_case(const std::string& path) {
    auto bytes = read_file(path);
    Reader r{bytes};
    unsigned int rows = r.get<uint32_t>(), cols = r.get<uint32_t>(), tile = r.get<uint32_t>();
    size_t len = (size_t)rows * cols;
    auto x = r.vec<float>(len);
    uint64_t want_bad = r.get<uint64_t>();

    // Same two launches as CudaNvfp4::quantize, except that the grid-stride amax reduction
    // gets at most 8 CTAs here (every CTA costs 256 OS threads in the emulation).
    unsigned int amax_bits = 0;
    unsigned long long first_bad = ~0ull;
    std::vector<unsigned char> packed(len / 2), scales(len / 16);
    float decode_scale = 0.0f;
    unsigned long long len64 = len;
    emu_launch({std::min(blocks(len, 256), 8u), 1, 1}, {256, 1, 1},
               [&] { nvfp4_amax(x.data(), len64, &amax_bits, &first_bad); });
    size_t groups = ((rows + tile - 1) / tile) * (size_t)(cols / 16);
    emu_launch({blocks(groups, 256), 1, 1}, {256, 1, 1}, [&] {
        nvfp4_quantize(x.data(), rows, cols, tile, &amax_bits, packed.data(), scales.data(),
                       &decode_scale);
    });
    CHECK(first_bad == want_bad, "%s: first non-finite %llu, want %llu", path.c_str(),
          first_bad, (unsigned long long)want_bad);
    if (want_bad != ~0ull) return;

    auto want_packed = r.vec<unsigned char>(len / 2);
    auto want_scales = r.vec<unsigned char>(len / 16);
    float want_scale = r.get<float>();
    auto want_deq = r.vec<float>(len);
    for (size_t i = 0; i < len / 16; ++i)
        CHECK(scales[i] == want_scales[i], "%s: scale %zu = %02x, want %02x", path.c_str(), i,
              scales[i], want_scales[i]);
    for (size_t i = 0; i < len / 2; ++i)
        CHECK(packed[i] == want_packed[i], "%s: packed %zu = %02x, want %02x", path.c_str(), i,
              packed[i], want_packed[i]);
    CHECK(__float_as_uint(decode_scale) == __float_as_uint(want_scale),
          "%s: global scale %g, want %g", path.c_str(), decode_scale, want_scale);

    std::vector<float> deq(len);
    unsigned long long g64 = len / 16;
    emu_launch({blocks(len / 16, 256), 1, 1}, {256, 1, 1}, [&] {
        nvfp4_dequantize(want_packed.data(), want_scales.data(), want_scale, g64, deq.data());
    });
    for (size_t i = 0; i < len; ++i)
        CHECK(__float_as_uint(deq[i]) == __float_as_uint(want_deq[i]),
              "%s: dequantized %zu = %g, want %g", path.c_str(), i, deq[i], want_deq[i]);
}

// The device codecs against the CPU ones on ties, near-ties and a wide sweep.
static void codec_case(const std::string& path) {
    auto bytes = read_file(path);
    Reader r{bytes};
    unsigned int count = r.get<uint32_t>();
    auto x = r.vec<float>(count);
    auto e4m3 = r.vec<unsigned char>(count);
    auto e2m1 = r.vec<unsigned char>(count);
    auto table = r.vec<float>(256);
    for (unsigned int i = 0; i < count; ++i) {
        CHECK(e4m3_encode(x[i]) == e4m3[i], "%s: e4m3_encode(%a) = %02x, want %02x",
              path.c_str(), x[i], e4m3_encode(x[i]), e4m3[i]);
        CHECK(e2m1_encode(x[i]) == e2m1[i], "%s: e2m1_encode(%a) = %x, want %x", path.c_str(),
              x[i], e2m1_encode(x[i]), e2m1[i]);
    }
    for (unsigned int b = 0; b < 256; ++b) {
        float v = e4m3_decode(b);
        bool same = (v != v && table[b] != table[b]) || __float_as_uint(v) == __float_as_uint(table[b]);
        CHECK(same, "%s: e4m3_decode(%02x) = %g, want %g", path.c_str(), b, v, table[b]);
    }
}

static unsigned short to_bf16(float v) { return (unsigned short)f32_to_bf16_bits(v); }

enum Path { GEMV, MMA, SIMT };

static void gemm_case(const std::string& path) {
    auto bytes = read_file(path);
    Reader r{bytes};
    unsigned int m = r.get<uint32_t>(), k = r.get<uint32_t>(), n = r.get<uint32_t>();
    auto packed = r.vec<unsigned char>((size_t)m * k / 2);
    auto scales = r.vec<unsigned char>((size_t)m * k / 16);
    float s_dec = r.get<float>();
    auto x = r.vec<float>((size_t)n * k);
    auto want_f32 = r.vec<double>((size_t)n * m);
    auto mag_f32 = r.vec<double>((size_t)n * m);
    auto want_bf16 = r.vec<double>((size_t)n * m);
    auto mag_bf16 = r.vec<double>((size_t)n * m);
    std::vector<unsigned short> xb(x.size());
    for (size_t i = 0; i < x.size(); ++i) xb[i] = to_bf16(x[i]);

    for (Path p : {GEMV, MMA, SIMT}) {
        // The GEMV kernel is for small n (launched per 8 rows); past 24 rows the emulation
        // only repeats the same launches at a high cost in OS threads.
        if (p == GEMV && n > 24) continue;
        for (int use_bf16 = 0; use_bf16 < 2; ++use_bf16) {
            std::vector<float> y((size_t)n * m, nanf(""));
            if (p == GEMV) {
                // One launch per 8 activation rows, as the host does.
                for (unsigned int row0 = 0; row0 < n; row0 += 8) {
                    unsigned int rows = std::min(n - row0, 8u);
                    float* yv = y.data() + (size_t)row0 * m;
                    emu_launch({blocks(m, 8), 1, 1}, {256, 1, 1}, [&] {
                        if (use_bf16)
                            nvfp4_gemv_bf16(packed.data(), scales.data(), s_dec,
                                            xb.data() + (size_t)row0 * k, yv, m, k, rows);
                        else
                            nvfp4_gemv_f32(packed.data(), scales.data(), s_dec,
                                           x.data() + (size_t)row0 * k, yv, m, k, rows);
                    });
                }
            } else if (p == MMA) {
                emu_launch({blocks(m, 128), blocks(n, 128), 1}, {256, 1, 1}, [&] {
                    if (use_bf16)
                        nvfp4_gemm_mma_bf16(packed.data(), scales.data(), s_dec, xb.data(),
                                            y.data(), m, k, n);
                    else
                        nvfp4_gemm_mma_f32(packed.data(), scales.data(), s_dec, x.data(),
                                           y.data(), m, k, n);
                });
            } else {
                emu_launch({blocks(m, 64), blocks(n, 64), 1}, {256, 1, 1}, [&] {
                    if (use_bf16)
                        nvfp4_gemm_simt_bf16(packed.data(), scales.data(), s_dec, xb.data(),
                                             y.data(), m, k, n);
                    else
                        nvfp4_gemm_simt_f32(packed.data(), scales.data(), s_dec, x.data(),
                                            y.data(), m, k, n);
                });
            }
            bool rounded = use_bf16 || p == MMA;
            const auto& want = rounded ? want_bf16 : want_f32;
            const auto& mag = rounded ? mag_bf16 : mag_f32;
            const char* names[] = {"gemv", "mma", "simt"};
            for (size_t i = 0; i < y.size(); ++i) {
                double tol = 2e-5 * mag[i] + 1e-30;
                double err = fabs((double)y[i] - want[i]);
                CHECK(err <= tol, "%s %s bf16=%d [m=%u k=%u n=%u] y[%zu, %zu] = %.9g, want %.9g",
                      path.c_str(), names[p], use_bf16, m, k, n, i / m, i % m, y[i], want[i]);
            }
        }
    }
}

int main(int argc, char** argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s CASE_DIR\n", argv[0]);
        return 2;
    }
    std::string dir = argv[1];
    std::vector<std::string> names;
    DIR* d = opendir(dir.c_str());
    if (!d) {
        perror(dir.c_str());
        return 2;
    }
    while (dirent* e = readdir(d)) {
        std::string name = e->d_name;
        if (name.size() > 4 && name.substr(name.size() - 4) == ".bin") names.push_back(name);
    }
    closedir(d);
    std::sort(names.begin(), names.end());
    int quant = 0, gemm = 0, codec = 0;
    for (const auto& name : names) {
        if (name[0] == 'c') {
            codec_case(dir + "/" + name);
            ++codec;
        } else if (name[0] == 'q') {
            quant_case(dir + "/" + name);
            ++quant;
        } else if (name[0] == 'g') {
            gemm_case(dir + "/" + name);
            ++gemm;
        }
    }
    printf("emulated: %d codec sweeps, %d quantize cases, %d GEMM cases (x 3 kernels x 2 "
           "activation types)\n",
           codec, quant, gemm);
    int total = codec + quant + gemm;
    printf("%d passed, %d failed\n", total - failures, failures);
    return failures == 0 && total > 0 ? 0 : 1;
}
