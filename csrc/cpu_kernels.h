// The ISA-specific CPU kernels (noise generator, low-rank row update) behind one table, chosen once
// at load time: AVX-512, AVX2+FMA or portable scalar code (cpu_kernels_impl.h, compiled once per ISA
// by the isa_*.cpp files). FLATLORA_CPU_ISA=scalar|avx2|avx512 forces a level the CPU supports.
#pragma once

#include <cstdint>

namespace flatlora {

struct CpuKernels {
  const char* isa;
  void (*normal_row)(uint64_t seed, int64_t row, int64_t in_features, float* out);
  void (*add_scaled_normal_row)(uint64_t seed, int64_t row, int64_t in_features, float scale, float* out);
  void (*philox_at)(uint64_t seed, const int64_t* offsets, int64_t count, uint32_t* out);
  // row += sum_k coef[k] * A[k, :] (A: [rank, n] fp32 contiguous); returns ||row||^2 after the update.
  double (*add_low_rank_row)(const float* coef, const float* lora_A, int64_t rank, int64_t n, float* row);
};

// The selected table (selected on first use; throws if FLATLORA_CPU_ISA names an unknown or
// unsupported level).
const CpuKernels& cpu_kernels();

// One table per ISA; the x86 ones are null where the compiler cannot target them (e.g. aarch64).
const CpuKernels* scalar_kernels();
const CpuKernels* avx2_kernels();
const CpuKernels* avx512_kernels();

}  // namespace flatlora
