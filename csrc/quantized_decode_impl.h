// Body of the 4-bit decoders, compiled once per ISA (quantized_isa_scalar.cpp, quantized_isa_avx2.cpp,
// quantized_isa_avx512.cpp set the target and FLATLORA_Q4_NS / FLATLORA_Q4_TABLE / FLATLORA_Q4_NAME /
// FLATLORA_Q4_HAS_AVX2 / FLATLORA_Q4_HAS_AVX512). Internal linkage throughout, as cpu_kernels_impl.h.
//
// A 16-entry code table fits one zmm register (AVX-512: one vpermps per 16 codes) or two ymm ones
// (AVX2: two vpermps and a blend on the code's top bit). Every path computes table[c] * scale with
// one IEEE multiply, so all ISAs produce the same floats.
#include <cstring>

#include "quantized_decode.h"

namespace flatlora {
namespace {
namespace FLATLORA_Q4_NS {

inline uint8_t code_at(const uint8_t* codes, int64_t e) {
  const uint8_t byte = codes[e >> 1];
  return (e & 1) ? (byte & 15) : (byte >> 4);
}

void decode_run(const uint8_t* codes, int64_t first, int64_t count, const float* table, float scale, float* dst) {
  int64_t t = 0;
  if (count > 0 && (first & 1)) {  // an odd start: one element, then whole bytes
    dst[0] = table[code_at(codes, first)] * scale;
    t = 1;
  }
  const uint8_t* bytes = codes + ((first + t) >> 1);
#if FLATLORA_Q4_HAS_AVX512
  {
    const __m512 lut = _mm512_loadu_ps(table);
    const __m512 scales = _mm512_set1_ps(scale);
    const __m512i low_nibble = _mm512_set1_epi32(15);
    // Element 2u of a 16-byte group is byte u's high nibble, element 2u + 1 its low one.
    const __m512i first_half = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second_half = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (; t + 32 <= count; t += 32, bytes += 16) {
      const __m512i words = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
      const __m512i high = _mm512_srli_epi32(words, 4), low = _mm512_and_si512(words, low_nibble);
      const __m512i codes0 = _mm512_permutex2var_epi32(high, first_half, low);
      const __m512i codes1 = _mm512_permutex2var_epi32(high, second_half, low);
      _mm512_storeu_ps(dst + t, _mm512_mul_ps(_mm512_permutexvar_ps(codes0, lut), scales));
      _mm512_storeu_ps(dst + t + 16, _mm512_mul_ps(_mm512_permutexvar_ps(codes1, lut), scales));
    }
  }
#elif FLATLORA_Q4_HAS_AVX2
  {
    const __m256 lut_low = _mm256_loadu_ps(table), lut_high = _mm256_loadu_ps(table + 8);
    const __m256 scales = _mm256_set1_ps(scale);
    const __m256i low_nibble = _mm256_set1_epi32(15);
    for (; t + 16 <= count; t += 16, bytes += 8) {
      const __m256i words = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
      const __m256i high = _mm256_srli_epi32(words, 4), low = _mm256_and_si256(words, low_nibble);
      // unpack works per 128-bit half: [h0 l0 h1 l1 | h4 l4 h5 l5] and [h2 l2 h3 l3 | h6 l6 h7 l7].
      const __m256i mixed0 = _mm256_unpacklo_epi32(high, low), mixed1 = _mm256_unpackhi_epi32(high, low);
      const __m256i codes0 = _mm256_permute2x128_si256(mixed0, mixed1, 0x20);
      const __m256i codes1 = _mm256_permute2x128_si256(mixed0, mixed1, 0x31);
      for (int half = 0; half < 2; ++half) {
        const __m256i c = half == 0 ? codes0 : codes1;
        const __m256 from_low = _mm256_permutevar8x32_ps(lut_low, c), from_high = _mm256_permutevar8x32_ps(lut_high, c);
        // bit 3 of the code picks the table half: moved to the sign bit for blendv.
        const __m256 value = _mm256_blendv_ps(from_low, from_high, _mm256_castsi256_ps(_mm256_slli_epi32(c, 28)));
        _mm256_storeu_ps(dst + t + 8 * half, _mm256_mul_ps(value, scales));
      }
    }
  }
#endif
  for (; t + 2 <= count; t += 2, ++bytes) {
    dst[t] = table[*bytes >> 4] * scale;
    dst[t + 1] = table[*bytes & 15] * scale;
  }
  if (t < count) dst[t] = table[*bytes >> 4] * scale;
}

// Integer round-to-nearest-even so the loop vectorises; NaN stays NaN (quiet), as torch's cast.
void round_through_bfloat16(float* row, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    uint32_t bits;
    std::memcpy(&bits, &row[j], sizeof bits);
    const bool is_nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
    const uint32_t rounded = ((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16) << 16;
    const uint32_t out = is_nan ? 0x7FC00000u : rounded;
    std::memcpy(&row[j], &out, sizeof out);
  }
}

const Decode4bitKernels kTable = {FLATLORA_Q4_NAME, decode_run, round_through_bfloat16};

}  // namespace FLATLORA_Q4_NS
}  // namespace

const Decode4bitKernels* FLATLORA_Q4_TABLE() { return &FLATLORA_Q4_NS::kTable; }

}  // namespace flatlora
