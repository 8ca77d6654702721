// The chunked passes shared by the dense and the 4-bit base. `Perturbed` (PerturbedWeight,
// QuantizedPerturbedWeight) builds rows [row0, row0 + rows) of W' = W + s*B@A + eps into a chunk;
// these loops feed each chunk straight into BLAS, so nothing weight-sized outlives one chunk, and both
// bases get the same chunking, dtypes and summation (the 4-bit path equals the dense one on deq(W)).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "perturbed_chunk.h"

namespace flatlora {

// The big GEMMs run in x's dtype for fp32, fp64 and bf16: oneDNN's bf16 GEMM accumulates in fp32 and
// runs at ~2.6x the fp32 rate on CPUs with bf16 dot products (measured 10 vs 26 ms at 2048x1024x1024),
// and rounding the perturbed block to bf16 is what a bf16 nn.Linear does to its weight anyway. fp16
// is widened to fp32: CPU fp16 GEMMs measured 4x slower than fp32. Chunks are built in this dtype too.
inline at::ScalarType gemm_dtype(const at::Tensor& x) {
  const at::ScalarType dtype = x.scalar_type();
  return dtype == at::kDouble || dtype == at::kBFloat16 ? dtype : at::kFloat;
}

// The chunk buffer of one pass, [rows, k] of dtype (chunk_passes.cpp: this thread's reused workspace
// up to workspace_bytes, a fresh allocation above).
at::Tensor chunk_workspace(int64_t rows, int64_t k, at::ScalarType dtype, int64_t workspace_bytes,
                           const at::TensorOptions& options);

// Frees this thread's reused chunk buffer (both bases share it).
void release_chunk_workspace();

// y[:, rows] = x @ chunk^T for each row chunk of W' (new row scales written as the chunks are built);
// y is [M, N] in x_gemm's dtype.
template <class Perturbed>
void forward_over_chunks(const Perturbed& perturbed, const at::Tensor& x_gemm, at::Tensor& y, float sigma,
                         float* row_scale, int64_t chunk_bytes, int64_t workspace_bytes) {
  const int64_t n = y.size(1), k = x_gemm.size(1);
  const at::ScalarType compute = x_gemm.scalar_type();
  const int64_t chunk_rows = rows_per_chunk(n, k, c10::elementSize(compute), chunk_bytes);
  at::Tensor buffer = chunk_workspace(chunk_rows, k, compute, workspace_bytes, x_gemm.options());
  for (int64_t row0 = 0; row0 < n; row0 += chunk_rows) {
    const int64_t rows = std::min(chunk_rows, n - row0);
    at::Tensor chunk = buffer.narrow(0, 0, rows);
    perturbed.build_with_new_scale(row0, chunk, sigma, row_scale + row0);
    // y[:, rows] is a strided column block (row stride N): BLAS writes it in place via ldc.
    at::Tensor y_block = y.narrow(1, row0, rows);
    at::mm_out(y_block, x_gemm, chunk.t());
  }
}

// dx = dy @ W' (its low-rank part folded into the chunks, or added as (s * dy @ B) @ A), in x_dtype.
// dy_gemm, dy_b = s * dy @ B and lora_A_gemm are in the GEMM dtype; row_scale is the forward's.
template <class Perturbed>
at::Tensor input_grad_over_chunks(const Perturbed& perturbed, const at::Tensor& dy_gemm, const at::Tensor& dy_b,
                                  const at::Tensor& lora_A_gemm, const at::Tensor& row_scale, at::ScalarType x_dtype,
                                  bool fold_lora, int64_t chunk_bytes, int64_t workspace_bytes) {
  const int64_t m = dy_gemm.size(0), n = dy_gemm.size(1), k = lora_A_gemm.size(1);
  const at::ScalarType compute = dy_gemm.scalar_type();
  const at::Tensor saved_scale = row_scale.contiguous();
  const float* scale = saved_scale.data_ptr<float>();
  const int64_t chunk_rows = rows_per_chunk(n, k, c10::elementSize(compute), chunk_bytes);
  at::Tensor buffer = chunk_workspace(chunk_rows, k, compute, workspace_bytes, dy_gemm.options());
  // dx += dy[:, rows] @ chunk in the GEMM dtype; the first chunk overwrites, so dx needs no zero fill.
  // In bf16, oneDNN accumulates dx + dy[:, rows] @ chunk in fp32 and rounds once per chunk, so dx is
  // the only dx-sized buffer: an fp32 running sum (plus a bf16 product) measured 3 dx-sized buffers
  // beside the chunk, above the two a LoRA backward holds (benchmarks/RESULTS.md, memory section).
  at::Tensor dx_sum = at::empty({m, k}, dy_gemm.options());
  for (int64_t row0 = 0; row0 < n; row0 += chunk_rows) {
    const int64_t rows = std::min(chunk_rows, n - row0);
    at::Tensor chunk = buffer.narrow(0, 0, rows);
    perturbed.build_with_saved_scale(row0, chunk, scale + row0, fold_lora);
    const at::Tensor dy_block = dy_gemm.narrow(1, row0, rows);
    row0 == 0 ? at::mm_out(dx_sum, dy_block, chunk) : dx_sum.addmm_(dy_block, chunk);
  }
  if (!fold_lora) dx_sum.addmm_(dy_b, lora_A_gemm);  // the unfolded branch: (s * dy @ B) @ A
  return dx_sum.to(x_dtype);
}

// The LoRA gradients through rank-r products only: dA = (s * dy @ B)^T @ x, dB = dy^T @ (s * x @ A^T),
// returned in the factors' dtypes.
std::tuple<at::Tensor, at::Tensor> lora_factor_grads(const at::Tensor& x_gemm, const at::Tensor& dy_gemm,
                                                     const at::Tensor& dy_b, const at::Tensor& lora_A_gemm,
                                                     double scaling, at::ScalarType lora_A_dtype,
                                                     at::ScalarType lora_B_dtype);

// The forward of either base once its arguments are checked: (y = x @ W'^T + bias in x's dtype,
// the fp32 row scales [N] the backward reuses).
template <class Perturbed>
std::tuple<at::Tensor, at::Tensor> forward_pass(const Perturbed& perturbed, const at::Tensor& x, int64_t out_features,
                                                const std::optional<at::Tensor>& bias, const at::Tensor& sigma,
                                                int64_t chunk_bytes, int64_t workspace_bytes) {
  const at::ScalarType compute = gemm_dtype(x);
  const at::Tensor x_gemm = x.to(compute);
  at::Tensor y = at::empty({x.size(0), out_features}, x.options().dtype(compute));
  at::Tensor row_scale = at::empty({out_features}, x.options().dtype(at::kFloat));
  forward_over_chunks(perturbed, x_gemm, y, sigma.item<float>(), row_scale.data_ptr<float>(), chunk_bytes,
                      workspace_bytes);
  if (bias.has_value()) y.add_(bias->to(compute));
  return {y.to(x.scalar_type()), row_scale};
}

// The backward of either base once its arguments are checked: (dx or an empty tensor, dA, dB).
// make_perturbed() builds the Perturbed for dx, only when dx is wanted.
template <class MakePerturbed>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_pass(const MakePerturbed& make_perturbed, const at::Tensor& dy,
                                                             const at::Tensor& x, const at::Tensor& lora_A,
                                                             const at::Tensor& lora_B, const at::Tensor& row_scale,
                                                             double scaling, bool compute_dx, bool fold_lora,
                                                             int64_t chunk_bytes,
                                                             int64_t workspace_bytes) {
  const at::ScalarType compute = gemm_dtype(x);
  const at::Tensor dy_gemm = dy.to(compute);
  const at::Tensor x_gemm = x.to(compute);
  const at::Tensor lora_A_gemm = lora_A.to(compute);
  const at::Tensor dy_b = at::mm(dy_gemm, lora_B.to(compute)).mul_(scaling);  // s * dy @ B   [M, r]
  at::Tensor dx = at::empty({0}, x.options());
  if (compute_dx) {
    dx = input_grad_over_chunks(make_perturbed(), dy_gemm, dy_b, lora_A_gemm, row_scale, x.scalar_type(), fold_lora,
                                chunk_bytes, workspace_bytes);
  }
  auto [d_lora_A, d_lora_B] =
      lora_factor_grads(x_gemm, dy_gemm, dy_b, lora_A_gemm, scaling, lora_A.scalar_type(), lora_B.scalar_type());
  return {dx, d_lora_A, d_lora_B};
}

}  // namespace flatlora
