// Philox4x32-10 on sixteen counters at once with AVX-512 (same bits as philox.h, the definition):
// the AVX2 version's scheme (philox_avx2.h) at twice the width, with a mask blend.
#pragma once

#if defined(__AVX512F__)
#include <immintrin.h>

#include <cstdint>

#include "philox.h"

namespace flatlora {

static inline void mulhilo_avx512(__m512i x, __m512i multiplier, __m512i* hi, __m512i* lo) {
  const __m512i even = _mm512_mul_epu32(x, multiplier);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), multiplier);
  *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  *lo = _mm512_mullo_epi32(x, multiplier);
}

// kVectors groups of sixteen counters (ctr_lo + 16v + lane, ctr_hi, 0, 0); out[v][c] = output c.
template <int kVectors>
static inline void philox4x32_10_avx512(uint32_t ctr_lo, uint32_t ctr_hi, uint32_t key_lo, uint32_t key_hi,
                                        __m512i (*out)[4]) {
  const __m512i round_a = _mm512_set1_epi32(static_cast<int>(kPhiloxRoundA));
  const __m512i round_b = _mm512_set1_epi32(static_cast<int>(kPhiloxRoundB));
  const __m512i first = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(ctr_lo)),
                                         _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  __m512i c0[kVectors], c1[kVectors], c2[kVectors], c3[kVectors];
  for (int v = 0; v < kVectors; ++v) {
    c0[v] = _mm512_add_epi32(first, _mm512_set1_epi32(16 * v));
    c1[v] = _mm512_set1_epi32(static_cast<int>(ctr_hi));
    c2[v] = _mm512_setzero_si512();
    c3[v] = _mm512_setzero_si512();
  }
  uint32_t k0 = key_lo, k1 = key_hi;
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const __m512i key0 = _mm512_set1_epi32(static_cast<int>(k0));
    const __m512i key1 = _mm512_set1_epi32(static_cast<int>(k1));
    for (int v = 0; v < kVectors; ++v) {
      __m512i hi_b, lo_b, hi_a, lo_a;
      mulhilo_avx512(c2[v], round_b, &hi_b, &lo_b);
      mulhilo_avx512(c0[v], round_a, &hi_a, &lo_a);
      c0[v] = _mm512_xor_si512(_mm512_xor_si512(hi_b, c1[v]), key0);
      c2[v] = _mm512_xor_si512(_mm512_xor_si512(hi_a, c3[v]), key1);
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

#endif  // __AVX512F__
