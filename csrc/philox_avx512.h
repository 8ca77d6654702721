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
  static Vec shift_right_64(Vec a, int bits) { return _mm512_srli_epi64(a, bits); }
  static Vec blend_odd(Vec even, Vec odd) { return _mm512_mask_blend_epi32(0xAAAA, even, odd); }
  static Vec mul_lo(Vec a, Vec b) { return _mm512_mullo_epi32(a, b); }
  static Vec bit_xor(Vec a, Vec b) { return _mm512_xor_si512(a, b); }
};

}  // namespace
}  // namespace flatlora

#endif  // FLATLORA_ISA_HAS_AVX512
