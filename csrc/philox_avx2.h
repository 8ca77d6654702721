// Philox4x32-10 on eight counters at once with AVX2 (same bits as philox.h, which stays the
// definition). GCC auto-vectorises the scalar version, but widens every 32x32->64 product through
// lane-crossing shuffles (~50 instructions per counter); here each product is two vpmuludq (even and
// odd lanes) plus shifts and blends.
#pragma once

#if defined(__AVX2__)
#include <immintrin.h>

#include <cstdint>

#include "philox.h"

namespace flatlora {

// hi / lo 32-bit halves of multiplier * x, lane by lane.
static inline void mulhilo_avx2(__m256i x, __m256i multiplier, __m256i* hi, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(x, multiplier);                         // lanes 0, 2, 4, 6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), multiplier);  // lanes 1, 3, 5, 7
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  *lo = _mm256_mullo_epi32(x, multiplier);  // measured faster than rebuilding it from even / odd
}

// kVectors groups of eight counters, (ctr_lo + 0 .. 8*kVectors - 1, ctr_hi, 0, 0), under key
// (key_lo, key_hi); out[v][lane] holds output c_lane of counters ctr_lo + 8v .. 8v + 7. The groups
// are independent, so interleaving them hides the multiply latency of each round.
template <int kVectors>
static inline void philox4x32_10_avx2(uint32_t ctr_lo, uint32_t ctr_hi, uint32_t key_lo, uint32_t key_hi,
                                      __m256i (*out)[4]) {
  const __m256i round_a = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundA));
  const __m256i round_b = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundB));
  const __m256i first = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(ctr_lo)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i c0[kVectors], c1[kVectors], c2[kVectors], c3[kVectors];
  for (int v = 0; v < kVectors; ++v) {
    c0[v] = _mm256_add_epi32(first, _mm256_set1_epi32(8 * v));
    c1[v] = _mm256_set1_epi32(static_cast<int>(ctr_hi));
    c2[v] = _mm256_setzero_si256();
    c3[v] = _mm256_setzero_si256();
  }
  uint32_t k0 = key_lo, k1 = key_hi;
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0));
    const __m256i key1 = _mm256_set1_epi32(static_cast<int>(k1));
    for (int v = 0; v < kVectors; ++v) {
      __m256i hi_b, lo_b, hi_a, lo_a;
      mulhilo_avx2(c2[v], round_b, &hi_b, &lo_b);
      mulhilo_avx2(c0[v], round_a, &hi_a, &lo_a);
      c0[v] = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1[v]), key0);
      c2[v] = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3[v]), key1);
      c1[v] = lo_b;
      c3[v] = lo_a;
    }
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  for (int v = 0; v < kVectors; ++v) {
    out[v][0] = c0[v];
    out[v][1] = c1[v];
    out[v][2] = c2[v];
    out[v][3] = c3[v];
  }
}

}  // namespace flatlora

#endif  // __AVX2__
