// Regenerates row chunks of the perturbed weight W + s*B@A + eps without ever holding it whole.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace flatlora {

// The chunk byte cap is tuning: it comes from Python (flatlora_kernels/backends/cpu_tuning.py).

// Rows per chunk of element_bytes-wide elements under a byte cap (at least one row).
int64_t rows_per_chunk(int64_t in_features, int64_t element_bytes, int64_t chunk_bytes);

class PerturbedWeight {
 public:
  // round_to: the compute dtype; chunk rows are rounded to it, as the reference rounds W_eff.
  PerturbedWeight(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                  uint64_t seed, at::ScalarType round_to);

  // chunk[i] = W' row (row0 + i) + eps, W' = W + s*B@A (built in fp32, or fp64 when round_to is
  // fp64); chunk: contiguous [rows, K], fp32, bf16 when round_to is bf16, fp64 when it is fp64.
  // Forward: also writes row_scale[i] = sigma * ||W' row|| / sqrt(K), from the same pass.
  void build_with_new_scale(int64_t row0, at::Tensor& chunk, float sigma, float* row_scale) const;
  // Backward: uses the row scales saved by forward, so eps is identical.
  void build_with_saved_scale(int64_t row0, at::Tensor& chunk, const float* row_scale) const;

 private:
  // With saved_scale null, the scales come from the rows' norms and are written to new_scale.
  void build_rows(int64_t row0, at::Tensor& chunk, float sigma, const float* saved_scale, float* new_scale) const;
  void build_rows_fp64(int64_t row0, at::Tensor& chunk, float sigma, const float* saved_scale,
                       float* new_scale) const;

  at::Tensor weight_;
  at::Tensor lora_A_;         // fp32 (fp64 for fp64 compute)
  at::Tensor lora_B_scaled_;  // s * B, same dtype
  uint64_t seed_;
  at::ScalarType round_to_;
};

}  // namespace flatlora
