// The AVX2 4-bit decoders. The target is set by pragma after the system headers, so only this
// file's own (internal-linkage) code uses AVX2 (as isa_avx2.cpp).
#include <cstdint>
#include <cstring>

#include "quantized_decode.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#pragma GCC target("avx2,fma")
#define FLATLORA_Q4_NS q4_avx2_isa
#define FLATLORA_Q4_TABLE decode_4bit_avx2
#define FLATLORA_Q4_NAME "avx2"
#define FLATLORA_Q4_HAS_AVX2 1
#define FLATLORA_Q4_HAS_AVX512 0
#include "quantized_decode_impl.h"
#else
namespace flatlora {
const Decode4bitKernels* decode_4bit_avx2() { return nullptr; }
}  // namespace flatlora
#endif
