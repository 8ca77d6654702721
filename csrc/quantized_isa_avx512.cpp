// The AVX-512 (F, BW, VL) 4-bit decoders, 512-bit vectors. The target is set by pragma after the
// system headers, so only this file's own (internal-linkage) code uses AVX-512 (as isa_avx512.cpp).
#include <cstdint>
#include <cstring>

#include "quantized_decode.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#pragma GCC target("avx2,fma,avx512f,avx512dq,avx512bw,avx512vl,prefer-vector-width=512")
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define FLATLORA_Q4_NS q4_avx512_isa
#define FLATLORA_Q4_TABLE decode_4bit_avx512
#define FLATLORA_Q4_NAME "avx512"
#define FLATLORA_Q4_HAS_AVX2 1
#define FLATLORA_Q4_HAS_AVX512 1
#include "quantized_decode_impl.h"
#else
namespace flatlora {
const Decode4bitKernels* decode_4bit_avx512() { return nullptr; }
}  // namespace flatlora
#endif
