// The Flat-LoRA noise stream z(seed, i, j) on the CPU (definition: flatlora_kernels/noise.py).
#pragma once

#include <cstdint>

namespace flatlora {

// Philox calls per weight row: ceil(K / 4).
inline int64_t counters_per_row(int64_t in_features) { return (in_features + 3) / 4; }

// out[j] = z(seed, row, j) for j in [0, in_features).
void normal_row(uint64_t seed, int64_t row, int64_t in_features, float* out);

// out[j] += scale * z(seed, row, j) for j in [0, in_features).
void add_scaled_normal_row(uint64_t seed, int64_t row, int64_t in_features, float scale, float* out);

// Raw Philox outputs for arbitrary counters (debug/tests): out[4*n + lane].
void philox_at(uint64_t seed, const int64_t* offsets, int64_t count, uint32_t* out);

}  // namespace flatlora
