// The portable 4-bit decoders: the compiler's baseline ISA only.
#define FLATLORA_Q4_NS q4_scalar_isa
#define FLATLORA_Q4_TABLE decode_4bit_scalar
#define FLATLORA_Q4_NAME "scalar"
#define FLATLORA_Q4_HAS_AVX2 0
#define FLATLORA_Q4_HAS_AVX512 0
#include "quantized_decode_impl.h"
