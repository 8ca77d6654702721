// Row generator for the noise stream: Philox + Box-Muller over blocks of consecutive counters.
//
// In the row-quarter layout, counter c of row i feeds columns c, c+Kq, c+2Kq, c+3Kq, so a block
// of consecutive counters yields four contiguous column strips, with no lane shuffles. Per block:
// Philox into four uint32 arrays (AVX2 intrinsics, scalar fallback), then Box-Muller as a plain
// element-wise loop that GCC vectorises (fast_math.h), then the strips are emitted.
//
// The generator's loop must vectorise: under the default -ftrapping-math GCC will not if-convert
// float selects (they "might trap"). Nothing here reads FP exception flags, so drop it for this file
// only (setup.py's flags stay as they are for everything else).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include "normal_stream.h"

#include <algorithm>

#include "fast_math.h"
#include "philox.h"
#include "philox_avx2.h"

namespace flatlora {
namespace {

// Counters per block: four strips of this many floats stay in L1.
constexpr int64_t kBlock = 256;

constexpr float kUniformScale = 4.6566127342e-10f;
constexpr float kTwoPi = 6.283185307179586f;

// Triton's uint_to_uniform_float: fold negative int32 to -x - 1, then scale into [0, 1).
static inline float uniform_from_bits(uint32_t bits) {
  const int32_t signed_bits = static_cast<int32_t>(bits);
  const int32_t folded = signed_bits < 0 ? ~signed_bits : signed_bits;  // ~x == -x - 1
  return static_cast<float>(folded) * kUniformScale;
}

static inline void box_muller(uint32_t bits1, uint32_t bits2, float* z_cos, float* z_sin) {
  const float u1 = std::max(1.0e-7f, uniform_from_bits(bits1));
  const float radius = sqrt_nonnegative(-2.0f * log_positive(u1));
  float c, s;
  sincos_small(kTwoPi * uniform_from_bits(bits2), &c, &s);
  *z_cos = radius * c;
  *z_sin = radius * s;
}

// bits[lane][t] = Philox output `lane` for counter (ctr_lo + t, ctr_hi); ctr_lo + count must not wrap.
void philox_block(uint32_t key_lo, uint32_t key_hi, uint32_t ctr_lo, uint32_t ctr_hi, int64_t count,
                  uint32_t (*bits)[kBlock]) {
  int64_t t = 0;
#if defined(__AVX2__)
  for (; t + 16 <= count; t += 16) {  // two groups of eight, interleaved
    __m256i groups[2][4];
    philox4x32_10_avx2<2>(ctr_lo + static_cast<uint32_t>(t), ctr_hi, key_lo, key_hi, groups);
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
  // A plain element-wise loop: GCC vectorises it, log/sqrt/sincos included (fast_math.h).
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

}  // namespace

void normal_row(uint64_t seed, int64_t row, int64_t in_features, float* out) {
  for_each_row_strip(seed, row, in_features, [out](int64_t column, const float* z, int64_t width) {
    std::copy(z, z + width, out + column);
  });
}

void add_scaled_normal_row(uint64_t seed, int64_t row, int64_t in_features, float scale, float* out) {
  for_each_row_strip(seed, row, in_features, [out, scale](int64_t column, const float* z, int64_t width) {
    float* __restrict dst = out + column;
    for (int64_t t = 0; t < width; ++t) dst[t] += scale * z[t];
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

}  // namespace flatlora
