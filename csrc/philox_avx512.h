// The AVX-512 operations of philox_simd.h: sixteen counters per register, a mask blend. Included
// only by a file compiled for AVX-512 (isa_avx512.cpp defines FLATLORA_ISA_HAS_AVX512).
#pragma once

#if FLATLORA_ISA_HAS_AVX512
#include <immintrin.h>

#include <cstdint>

#include "philox_simd.h"

namespace flatlora {
// Internal linkage: the same struct is compiled for another target in another file.
namespace {

struct Avx512Philox {
  using Vec = __m512i;
  static constexpr int kLanes = 16;
  static Vec set1(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }
  static Vec iota() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
  static Vec add(Vec a, Vec b) { return _mm512_add_epi32(a, b); }
  static Vec mul_even(Vec a, Vec b) { return _mm512_mul_epu32(a, b); }
  static Vec swap_pairs(Vec a) { return _mm512_shuffle_epi32(a, _MM_PERM_CDAB); }
  // 64-bit products of the even (`even`) and odd (`odd`) lanes -> their upper / lower 32-bit halves
  // in lane order, one two-source permute each (one shuffle-port uop, vs a swap plus a blend).
  static Vec high_halves(Vec even, Vec odd) {
    return _mm512_permutex2var_epi32(even, _mm512_setr_epi32(1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31), odd);
  }
  static Vec low_halves(Vec even, Vec odd) {
    return _mm512_permutex2var_epi32(even, _mm512_setr_epi32(0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30), odd);
  }
  static Vec bit_xor(Vec a, Vec b) { return _mm512_xor_si512(a, b); }
};

}  // namespace
}  // namespace flatlora

#endif  // FLATLORA_ISA_HAS_AVX512
