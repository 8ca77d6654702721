// The AVX-512 (F, DQ, BW, VL) kernels, 512-bit vectors. The target is set by pragma after the system
// headers, so only this file's own (internal-linkage) code uses AVX-512: no inline library function
// is emitted with it. GCC's C++ front end does not define __AVX512F__ for a pragma target, so the
// level is our own macro.
// Before any include: functions with differing optimize options cannot be inlined into each other,
// so the generator's helpers (std::max, ...) must share it (it lets GCC if-convert float selects).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#pragma GCC target("avx2,fma,avx512f,avx512dq,avx512bw,avx512vl,prefer-vector-width=512")
// GCC 12 warns "may be used uninitialized" on the _mm512_undefined_* placeholders inside its own
// intrinsics (the unused merge operand of a masked builtin): a false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define FLATLORA_ISA_NS avx512_isa
#define FLATLORA_ISA_TABLE avx512_kernels
#define FLATLORA_ISA_NAME "avx512"
#define FLATLORA_ISA_HAS_AVX2 1
#define FLATLORA_ISA_HAS_FMA 1
#define FLATLORA_ISA_HAS_AVX512 1
#include "cpu_kernels_impl.h"
#else
namespace flatlora {
const CpuKernels* avx512_kernels() { return nullptr; }
}  // namespace flatlora
#endif
