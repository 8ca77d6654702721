// Forward and backward of y = x (W + s*B@A + eps)^T + bias, regenerating W + s*B@A + eps in
// row chunks that go straight into BLAS: nothing weight-sized outlives one chunk.
#include "flatlora_cpu.h"

#include <c10/util/Exception.h>

#include "chunk_passes.h"
#include "perturbed_chunk.h"

namespace flatlora {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

void check_float_cpu(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), "flatlora cpp backend: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(is_supported_float(t.scalar_type()), "flatlora cpp backend: ", name,
              " must be fp32/bf16/fp16/fp64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, "flatlora cpp backend: ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

void check_layer(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B) {
  check_float_cpu(x, "x", 2);
  check_float_cpu(weight, "weight", 2);
  check_float_cpu(lora_A, "lora_A", 2);
  check_float_cpu(lora_B, "lora_B", 2);
  const int64_t n = weight.size(0), k = weight.size(1), r = lora_A.size(0);
  TORCH_CHECK(n > 0 && k > 0, "flatlora cpp backend: weight must be non-empty, got ", weight.sizes());
  TORCH_CHECK(r > 0 && lora_A.size(1) == k, "flatlora cpp backend: lora_A must be [r, ", k, "], got ", lora_A.sizes());
  TORCH_CHECK(lora_B.size(0) == n && lora_B.size(1) == r, "flatlora cpp backend: lora_B must be [", n, ", ", r,
              "], got ", lora_B.sizes());
  TORCH_CHECK(x.size(1) == k, "flatlora cpp backend: x must be [M, ", k, "], got ", x.sizes());
}

void check_scalar(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu() && t.numel() == 1 && t.scalar_type() == dtype, "flatlora cpp backend: ", name,
              " must be a one-element CPU ", dtype, " tensor, got ", t.numel(), " x ", t.scalar_type(), " on ",
              t.device());
}

uint64_t seed_value(const at::Tensor& seed) { return static_cast<uint64_t>(seed.item<int64_t>()); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                               const at::Tensor& lora_A, const at::Tensor& lora_B,
                                               const std::optional<at::Tensor>& bias, double scaling,
                                               const at::Tensor& sigma, const at::Tensor& seed, int64_t chunk_bytes,
                                               int64_t parallel_grain, int64_t workspace_bytes) {
  check_layer(x, weight, lora_A, lora_B);
  check_scalar(sigma, "sigma", at::kFloat);
  check_scalar(seed, "seed", at::kLong);
  TORCH_CHECK(chunk_bytes > 0, "flatlora cpp backend: chunk_bytes must be positive");
  const int64_t m = x.size(0), n = weight.size(0), k = weight.size(1);
  if (bias.has_value()) {
    check_float_cpu(*bias, "bias", 1);
    TORCH_CHECK(bias->size(0) == n, "flatlora cpp backend: bias must be [", n, "], got ", bias->sizes());
  }
  const at::ScalarType compute = gemm_dtype(x);
  const at::Tensor x_gemm = x.to(compute);
  at::Tensor y = at::empty({m, n}, x.options().dtype(compute));
  at::Tensor row_scale = at::empty({n}, x.options().dtype(at::kFloat));
  const PerturbedWeight perturbed(weight, lora_A, lora_B, scaling, seed_value(seed), x.scalar_type(),
                                  parallel_grain);
  const float sigma_value = sigma.item<float>();

  forward_over_chunks(perturbed, x_gemm, y, sigma_value, row_scale.data_ptr<float>(), chunk_bytes, workspace_bytes);
  if (bias.has_value()) y.add_(bias->to(compute));
  return {y.to(x.scalar_type()), row_scale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                            const at::Tensor& weight, const at::Tensor& lora_A,
                                                            const at::Tensor& lora_B, const at::Tensor& row_scale,
                                                            double scaling, const at::Tensor& seed, bool compute_dx,
                                                            bool fold_lora, int64_t chunk_bytes, int64_t parallel_grain,
                                                            int64_t workspace_bytes) {
  check_layer(x, weight, lora_A, lora_B);
  check_float_cpu(dy, "dy", 2);
  const int64_t m = x.size(0), n = weight.size(0);
  TORCH_CHECK(dy.size(0) == m && dy.size(1) == n, "flatlora cpp backend: dy must be [", m, ", ", n, "], got ",
              dy.sizes());
  TORCH_CHECK(row_scale.device().is_cpu() && row_scale.scalar_type() == at::kFloat && row_scale.dim() == 1 &&
                  row_scale.size(0) == n,
              "flatlora cpp backend: row_scale must be a CPU fp32 [", n, "] tensor, got ", row_scale.scalar_type(),
              " ", row_scale.sizes());
  check_scalar(seed, "seed", at::kLong);
  TORCH_CHECK(chunk_bytes > 0, "flatlora cpp backend: chunk_bytes must be positive");
  const at::ScalarType compute = gemm_dtype(x);
  const at::Tensor dy_gemm = dy.to(compute);
  const at::Tensor x_gemm = x.to(compute);
  const at::Tensor lora_A_gemm = lora_A.to(compute);
  const at::Tensor dy_b = at::mm(dy_gemm, lora_B.to(compute)).mul_(scaling);  // s * dy @ B   [M, r]

  at::Tensor dx = at::empty({0}, x.options());
  if (compute_dx) {
    const PerturbedWeight perturbed(weight, lora_A, lora_B, scaling, seed_value(seed), x.scalar_type(),
                                    parallel_grain);
    dx = input_grad_over_chunks(perturbed, dy_gemm, dy_b, lora_A_gemm, row_scale, x.scalar_type(), fold_lora,
                                chunk_bytes, parallel_grain, workspace_bytes);
  }
  auto [d_lora_A, d_lora_B] =
      lora_factor_grads(x_gemm, dy_gemm, dy_b, lora_A_gemm, scaling, lora_A.scalar_type(), lora_B.scalar_type());
  return {dx, d_lora_A, d_lora_B};
}

}  // namespace flatlora
