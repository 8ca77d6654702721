// Body of the ISA-specific kernels, compiled once per ISA (isa_scalar.cpp, isa_avx2.cpp,
// isa_avx512.cpp set the target and FLATLORA_ISA_NS / FLATLORA_ISA_TABLE / FLATLORA_ISA_NAME /
// FLATLORA_ISA_HAS_AVX2 / FLATLORA_ISA_HAS_AVX512).
// Everything here has internal linkage, so no AVX-512 code can leak into another ISA's symbols.
//
// Noise rows, in the row-quarter layout: counter c of row i feeds columns c, c+Kq, c+2Kq, c+3Kq, so a
// block of consecutive counters yields four contiguous column strips, with no lane shuffles. Per
// block: Philox into four uint32 arrays (intrinsics where available), then Box-Muller as a plain
// element-wise loop that GCC vectorises at the target's width (fast_math.h), then the strips are
// emitted.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu_kernels.h"
#include "fast_math.h"
#include "normal_stream.h"
#include "philox.h"
#include "philox_avx2.h"
#include "philox_avx512.h"

namespace flatlora {
namespace {
namespace FLATLORA_ISA_NS {

// Counters per block: four strips of this many floats stay in L1.
constexpr int64_t kBlock = 256;

constexpr float kUniformScale = 4.6566127342e-10f;
constexpr float kTwoPi = 6.283185307179586f;

// Triton's uint_to_uniform_float: fold negative int32 to -x - 1, then scale into [0, 1). (The scale is
// the float just below 2^-31, not a power of two, so it cannot be folded into later constants.)
inline float uniform_from_bits(uint32_t bits) {
  const int32_t signed_bits = static_cast<int32_t>(bits);
  const int32_t folded = signed_bits < 0 ? ~signed_bits : signed_bits;  // ~x == -x - 1
  return static_cast<float>(folded) * kUniformScale;
}

// Box-Muller's radius and angle from uniform bits. Only IEEE operations (+ - * /, sqrt, FMA,
// conversions), so every ISA build returns the same floats (fast_math.h).
inline float radius_from_bits(uint32_t bits) {
  const float u1 = std::max(1.0e-7f, uniform_from_bits(bits));
  return std::sqrt(minus_two_log_positive(u1));  // vsqrtps: setup.py builds with -fno-math-errno
}

inline void angle_from_bits(uint32_t bits, float* c, float* s) {
  sincos_small(kTwoPi * uniform_from_bits(bits), c, s);
}

inline void box_muller(uint32_t bits1, uint32_t bits2, float* z_cos, float* z_sin) {
  const float radius = radius_from_bits(bits1);
  float c, s;
  angle_from_bits(bits2, &c, &s);
  *z_cos = radius * c;
  *z_sin = radius * s;
}

// bits[lane][t] = Philox output `lane` for counter (ctr_lo + t, ctr_hi); ctr_lo + count must not wrap.
void philox_block(uint32_t key_lo, uint32_t key_hi, uint32_t ctr_lo, uint32_t ctr_hi, int64_t count,
                  uint32_t (*bits)[kBlock]) {
  int64_t t = 0;
#if FLATLORA_ISA_HAS_AVX512
  // Four groups of sixteen, interleaved to hide multiply latency (16 of the 32 zmm registers hold the
  // state): measured 0.25 -> 0.17 ns per normal for Philox alone vs two groups (one Zen 5 core).
  for (; t + 64 <= count; t += 64) {
    __m512i groups[4][4];
    philox4x32_10_simd<Avx512Philox, 4>(ctr_lo + static_cast<uint32_t>(t), ctr_hi, key_lo, key_hi, groups);
    for (int v = 0; v < 4; ++v)
      for (int lane = 0; lane < 4; ++lane) _mm512_storeu_si512(bits[lane] + t + 16 * v, groups[v][lane]);
  }
#endif
#if FLATLORA_ISA_HAS_AVX2
  for (; t + 16 <= count; t += 16) {  // two groups of eight, interleaved
    __m256i groups[2][4];
    philox4x32_10_simd<Avx2Philox, 2>(ctr_lo + static_cast<uint32_t>(t), ctr_hi, key_lo, key_hi, groups);
    for (int v = 0; v < 2; ++v)
      for (int lane = 0; lane < 4; ++lane)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(bits[lane] + t + 8 * v), groups[v][lane]);
  }
#endif
  for (; t < count; ++t) {
    const PhiloxOut r = philox4x32_10(ctr_lo + static_cast<uint32_t>(t), ctr_hi, key_lo, key_hi);
    bits[0][t] = r.c0;
    bits[1][t] = r.c1;
    bits[2][t] = r.c2;
    bits[3][t] = r.c3;
  }
}

// z[lane][t] for counters (ctr_lo + t, ctr_hi), t < count; ctr_lo + count must not wrap.
void normal_block(uint32_t key_lo, uint32_t key_hi, uint32_t ctr_lo, uint32_t ctr_hi, int64_t count,
                  float (*z)[kBlock]) {
  alignas(64) uint32_t bits[4][kBlock];
  philox_block(key_lo, key_hi, ctr_lo, ctr_hi, count, bits);
  for (int64_t t = 0; t < count; ++t) {
    box_muller(bits[0][t], bits[1][t], &z[0][t], &z[1][t]);
    box_muller(bits[2][t], bits[3][t], &z[2][t], &z[3][t]);
  }
}

// Calls emit(column, z values, count) for every strip of the row, block by block.
template <typename Emit>
void for_each_row_strip(uint64_t seed, int64_t row, int64_t in_features, Emit emit) {
  const int64_t kq = counters_per_row(in_features);
  const uint32_t key_lo = static_cast<uint32_t>(seed);
  const uint32_t key_hi = static_cast<uint32_t>(seed >> 32);
  alignas(64) float z[4][kBlock];
  for (int64_t c = 0; c < kq;) {
    const uint64_t offset = static_cast<uint64_t>(row) * static_cast<uint64_t>(kq) + static_cast<uint64_t>(c);
    const uint32_t ctr_lo = static_cast<uint32_t>(offset);
    // A block never crosses a multiple of 2^32, so the counter's high word is constant in it.
    const int64_t until_wrap = static_cast<int64_t>((uint64_t{1} << 32) - ctr_lo);
    const int64_t count = std::min({kBlock, kq - c, until_wrap});
    normal_block(key_lo, key_hi, ctr_lo, static_cast<uint32_t>(offset >> 32), count, z);
    for (int lane = 0; lane < 4; ++lane) {
      const int64_t column = lane * kq + c;
      const int64_t width = std::min(count, in_features - column);  // the last lane may run past K
      if (width > 0) emit(column, z[lane], width);
    }
    c += count;
  }
}

void normal_row(uint64_t seed, int64_t row, int64_t in_features, float* out) {
  for_each_row_strip(seed, row, in_features, [out](int64_t column, const float* z, int64_t width) {
    std::copy(z, z + width, out + column);
  });
}

void add_scaled_normal_row(uint64_t seed, int64_t row, int64_t in_features, float scale, float* out) {
  for_each_row_strip(seed, row, in_features, [out, scale](int64_t column, const float* z, int64_t width) {
    float* __restrict dst = out + column;
    for (int64_t t = 0; t < width; ++t) dst[t] = fused_multiply_add(scale, z[t], dst[t]);  // same bits on every ISA
  });
}

void philox_at(uint64_t seed, const int64_t* offsets, int64_t count, uint32_t* out) {
  const uint32_t key_lo = static_cast<uint32_t>(seed);
  const uint32_t key_hi = static_cast<uint32_t>(seed >> 32);
  alignas(64) uint32_t bits[4][kBlock];
  // Runs of consecutive offsets go through philox_block, the generator's own path.
  for (int64_t n = 0; n < count;) {
    const uint64_t first = static_cast<uint64_t>(offsets[n]);
    int64_t run = 1;
    while (n + run < count && run < kBlock && static_cast<uint64_t>(offsets[n + run]) == first + run &&
           static_cast<uint32_t>(first + run) != 0)
      ++run;
    philox_block(key_lo, key_hi, static_cast<uint32_t>(first), static_cast<uint32_t>(first >> 32), run, bits);
    for (int64_t t = 0; t < run; ++t)
      for (int lane = 0; lane < 4; ++lane) out[4 * (n + t) + lane] = bits[lane][t];
    n += run;
  }
}

// Eight floats as a GCC vector in every ISA (one AVX2 register, two SSE ones in the scalar build).
// Not a tuning knob: the row norm's summation order follows these lanes, and the norm sets the row
// scale, so a different width would move eps by an ulp.
constexpr int kLanes = 8;
typedef float FloatVec __attribute__((vector_size(4 * kLanes)));
constexpr int kStripVectors = 8;  // the norm sums 8 vectors (64 floats) per strip in fp32
constexpr int64_t kStrip = kLanes * kStripVectors;

// The fold's own vectors: the widest float register (the result is element-wise, so any width gives
// the same bits). kFoldRows rows x kFoldVectors vectors of accumulators: 16 of the 32 zmm registers,
// or 8 of the 16 ymm ones, leaving room for the A vectors; register counts, not tuning.
#if FLATLORA_ISA_HAS_AVX512
constexpr int kFoldLanes = 16;
constexpr int kFoldVectors = 4;
#else
constexpr int kFoldLanes = 8;
constexpr int kFoldVectors = 2;
#endif
typedef float FoldVec __attribute__((vector_size(4 * kFoldLanes)));

template <typename Vec>
inline Vec load_vec(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename Vec>
inline void store_vec(float* p, Vec v) {
  std::memcpy(p, &v, sizeof v);
}

// acc + a * b lane by lane with one rounding each (fast_math.h's fused_multiply_add): the FMA
// instruction on AVX2 / AVX-512, libm's fmaf in the scalar build, so the fold and the row norms have
// the same bits on every ISA (the build has -ffp-contract=off: GCC fuses nothing on its own).
template <typename Vec>
inline Vec multiply_add_lanes(Vec a, Vec b, Vec acc) {
#if FLATLORA_ISA_HAS_AVX512
  if constexpr (sizeof(Vec) == 64)
    return reinterpret_cast<Vec>(_mm512_fmadd_ps(reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b),
                                                 reinterpret_cast<__m512>(acc)));
#endif
#if FLATLORA_ISA_HAS_AVX2
  if constexpr (sizeof(Vec) == 32)
    return reinterpret_cast<Vec>(_mm256_fmadd_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b),
                                                 reinterpret_cast<__m256>(acc)));
#endif
  for (size_t l = 0; l < sizeof(Vec) / sizeof(float); ++l) acc[l] = fused_multiply_add(a[l], b[l], acc[l]);
  return acc;
}

// kRows rows at once: a strip of each stays in registers across all k, and each load of A serves
// every row. Per element: acc = fma(coef[k], A[k, j], acc) for k = 0 .. rank - 1, as in a one-row loop.
template <int kRows>
void add_low_rank_row_block(const float* coef, const float* lora_A, int64_t rank, int64_t n, float* rows) {
  constexpr int64_t kWidth = kFoldLanes * kFoldVectors;
  int64_t j0 = 0;
  for (; j0 + kWidth <= n; j0 += kWidth) {
    FoldVec acc[kRows][kFoldVectors];
    for (int r = 0; r < kRows; ++r)
      for (int v = 0; v < kFoldVectors; ++v) acc[r][v] = load_vec<FoldVec>(rows + r * n + j0 + kFoldLanes * v);
    for (int64_t k = 0; k < rank; ++k) {
      FoldVec a[kFoldVectors];
      for (int v = 0; v < kFoldVectors; ++v) a[v] = load_vec<FoldVec>(lora_A + k * n + j0 + kFoldLanes * v);
      for (int r = 0; r < kRows; ++r) {
        const float c = coef[r * rank + k];
        const FoldVec c_lanes = FoldVec{} + c;
        for (int v = 0; v < kFoldVectors; ++v) acc[r][v] = multiply_add_lanes(c_lanes, a[v], acc[r][v]);
      }
    }
    for (int r = 0; r < kRows; ++r)
      for (int v = 0; v < kFoldVectors; ++v) store_vec(rows + r * n + j0 + kFoldLanes * v, acc[r][v]);
  }
  for (int r = 0; r < kRows && j0 < n; ++r) {  // the last, partial strip
    for (int64_t k = 0; k < rank; ++k) {
      const float c = coef[r * rank + k];
      const float* a = lora_A + k * n;
      float* row = rows + r * n;
      for (int64_t j = j0; j < n; ++j) row[j] = fused_multiply_add(c, a[j], row[j]);
    }
  }
}

void add_low_rank_rows(const float* coef, const float* lora_A, int64_t rank, int64_t n, int64_t count,
                       float* rows) {
  int64_t i = 0;
  for (; i + kFoldRows <= count; i += kFoldRows)
    add_low_rank_row_block<kFoldRows>(coef + i * rank, lora_A, rank, n, rows + i * n);
  for (; i < count; ++i) add_low_rank_row_block<1>(coef + i * rank, lora_A, rank, n, rows + i * n);
}

double row_squared_norm(const float* row, int64_t n) {
  double lane_sums[kLanes] = {};
  int64_t j0 = 0;
  for (; j0 + kStrip <= n; j0 += kStrip) {
    FloatVec strip_squares = {};
#pragma GCC unroll 8
    for (int v = 0; v < kStripVectors; ++v) {
      const FloatVec x = load_vec<FloatVec>(row + j0 + kLanes * v);
      strip_squares = multiply_add_lanes(x, x, strip_squares);
    }
    for (int l = 0; l < kLanes; ++l) lane_sums[l] += strip_squares[l];  // fp32 within a strip, fp64 across
  }
  double total = 0.0;
  // (The double product of two floats is exact, so fused or not this rounds once.)
  for (int64_t j = j0; j < n; ++j) total += static_cast<double>(row[j]) * row[j];
  for (int l = 0; l < kLanes; ++l) total += lane_sums[l];
  return total;
}

void widen_bfloat16(const uint16_t* src, int64_t n, float* dst) {
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t bits = static_cast<uint32_t>(src[j]) << 16;
    std::memcpy(&dst[j], &bits, sizeof bits);
  }
}

// Round to nearest even with integer ops so the loop vectorises; NaN becomes 0x7FC0, as torch's
// float -> bfloat16 conversion does (so a rounded dx equals torch's .to(bfloat16) bit for bit).
void round_to_bfloat16(const float* src, int64_t n, uint16_t* dst) {
  for (int64_t j = 0; j < n; ++j) {
    uint32_t bits;
    std::memcpy(&bits, &src[j], sizeof bits);
    const bool is_nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    dst[j] = static_cast<uint16_t>(is_nan ? 0x7FC0u : rounded);
  }
}

void box_muller_words(const uint32_t* bits1, const uint32_t* bits2, int64_t count, float* z_cos, float* z_sin) {
  for (int64_t i = 0; i < count; ++i) box_muller(bits1[i], bits2[i], &z_cos[i], &z_sin[i]);
}

const CpuKernels kTable = {FLATLORA_ISA_NAME, normal_row,     add_scaled_normal_row, philox_at,
                           add_low_rank_rows, row_squared_norm, widen_bfloat16,
                           round_to_bfloat16, box_muller_words};

}  // namespace FLATLORA_ISA_NS
}  // namespace

const CpuKernels* FLATLORA_ISA_TABLE() { return &FLATLORA_ISA_NS::kTable; }

}  // namespace flatlora
