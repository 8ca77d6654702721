// The AVX2 operations of philox_simd.h: eight counters per register. Included only by a file
// compiled for AVX2 (isa_avx2.cpp, isa_avx512.cpp define FLATLORA_ISA_HAS_AVX2).
#pragma once

#if FLATLORA_ISA_HAS_AVX2
#include <immintrin.h>

#include <cstdint>

#include "philox_simd.h"

namespace flatlora {
// Internal linkage: the same struct is compiled for another target in another file.
namespace {

struct Avx2Philox {
  using Vec = __m256i;
  static constexpr int kLanes = 8;
  static Vec set1(uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }
  static Vec iota() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
  static Vec add(Vec a, Vec b) { return _mm256_add_epi32(a, b); }
  static Vec mul_even(Vec a, Vec b) { return _mm256_mul_epu32(a, b); }
  static Vec swap_pairs(Vec a) { return _mm256_shuffle_epi32(a, 0xB1); }
  // 64-bit products of the even (`even`) and odd (`odd`) lanes -> their upper / lower 32-bit halves
  // in lane order: a swap within each lane pair and a blend.
  static Vec high_halves(Vec even, Vec odd) { return _mm256_blend_epi32(swap_pairs(even), odd, 0xAA); }
  static Vec low_halves(Vec even, Vec odd) { return _mm256_blend_epi32(even, swap_pairs(odd), 0xAA); }
  static Vec bit_xor(Vec a, Vec b) { return _mm256_xor_si256(a, b); }
};

}  // namespace
}  // namespace flatlora

#endif  // FLATLORA_ISA_HAS_AVX2
