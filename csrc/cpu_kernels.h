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
  // rows[i] += sum_k coef[i * rank + k] * A[k, :] for i < count (rows: [count, n] contiguous fp32,
  // A: [rank, n] contiguous fp32). Each element gets the same FMAs in the same order at any count.
  void (*add_low_rank_rows)(const float* coef, const float* lora_A, int64_t rank, int64_t n, int64_t count,
                            float* rows);
  // ||row||^2 in one fixed summation order (8-lane strips of 64 in fp32, fp64 across): the row scale's.
  double (*row_squared_norm)(const float* row, int64_t n);
  // bf16 <-> fp32 as bit patterns: widening is exact; narrowing rounds to
  // nearest even, as torch's conversion does (NaN: 0x7FC0).
  void (*widen_bfloat16)(const uint16_t* src, int64_t n, float* dst);
  void (*round_to_bfloat16)(const float* src, int64_t n, uint16_t* dst);
  // Debug: this generator's Box-Muller of Philox words (z_cos[i], z_sin[i] from bits1[i], bits2[i]);
  // tests compare it with the definition in flatlora_kernels/noise.py.
  void (*box_muller_words)(const uint32_t* bits1, const uint32_t* bits2, int64_t count, float* z_cos,
                           float* z_sin);
};

// Rows that add_low_rank_rows keeps in registers at once (each load of A feeds this many FMAs): a
// property of the kernels' register blocking, not tuning. Callers hand it groups of this many rows.
constexpr int64_t kFoldRows = 4;

// The selected table (selected on first use; throws if FLATLORA_CPU_ISA names an unknown or
// unsupported level).
const CpuKernels& cpu_kernels();

// One table per ISA; the x86 ones are null where the compiler cannot target them (e.g. aarch64).
const CpuKernels* scalar_kernels();
const CpuKernels* avx2_kernels();
const CpuKernels* avx512_kernels();

}  // namespace flatlora
