// The portable kernels: the compiler's baseline ISA only (SSE2 on x86-64, NEON on aarch64).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")  // lets GCC if-convert the generator's float selects
#endif
#define FLATLORA_ISA_NS scalar_isa
#define FLATLORA_ISA_TABLE scalar_kernels
#define FLATLORA_ISA_NAME "scalar"
#define FLATLORA_ISA_HAS_AVX2 0
#define FLATLORA_ISA_HAS_FMA 0
#define FLATLORA_ISA_HAS_AVX512 0
#include "cpu_kernels_impl.h"
