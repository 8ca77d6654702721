// Regenerates row chunks of the perturbed weight W + s*B@A + eps without ever holding it whole.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "row_pipeline.h"

namespace flatlora {

// The chunk byte cap and the parallel grain are tuning: they come from Python
// (flatlora_kernels/backends/cpu_tuning.py), as arguments of every call.

// Rows per chunk of element_bytes-wide elements under a byte cap (at least one row, at most
// out_features), the same for every chunk but the last.
int64_t rows_per_chunk(int64_t out_features, int64_t in_features, int64_t element_bytes, int64_t chunk_bytes);

class PerturbedWeight {
 public:
  // round_to: the compute dtype; chunk rows are rounded to it, as the reference rounds W_eff.
  // grain_elements: about this many chunk elements per parallel task (at least one row).
  PerturbedWeight(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                  uint64_t seed, at::ScalarType round_to, int64_t grain_elements);

  // chunk[i] = W' row (row0 + i) + eps, W' = W + s*B@A (built in fp32, or fp64 when round_to is
  // fp64); chunk: contiguous [rows, K], fp32, bf16 when round_to is bf16, fp64 when it is fp64.
  // Forward: also writes row_scale[i] = sigma * ||W' row|| / sqrt(K), from the same pass.
  void build_with_new_scale(int64_t row0, at::Tensor& chunk, float sigma, float* row_scale) const;
  // Backward: uses the row scales saved by forward, so eps is identical. With fold_lora false the
  // chunk is W + eps only (the caller adds the low-rank branch itself).
  void build_with_saved_scale(int64_t row0, at::Tensor& chunk, const float* row_scale, bool fold_lora) const;

 private:
  void build_rows(int64_t row0, at::Tensor& chunk, const ChunkRowScales& scales, bool fold_lora) const;
  void build_rows_fp64(int64_t row0, at::Tensor& chunk, const ChunkRowScales& scales, bool fold_lora) const;
  int64_t grain_rows(int64_t in_features) const;

  at::Tensor weight_;
  at::Tensor lora_A_;         // fp32 (fp64 for fp64 compute)
  at::Tensor lora_B_scaled_;  // s * B, same dtype
  uint64_t seed_;
  at::ScalarType round_to_;
  int64_t grain_elements_;
};

}  // namespace flatlora
