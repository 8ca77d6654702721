// Forward and backward of the Flat-QLoRA linear: 4-bit rows decoded into chunks of the perturbed
// weight (QuantizedPerturbedWeight) that chunk_passes.h's loops feed to BLAS, as for a dense W, so
// results equal the dense path on deq(W).
#include "quantized_linear.h"

#include <c10/util/Exception.h>

#include "chunk_passes.h"

namespace flatlora {
namespace {

constexpr const char* kLayer = "flatlora 4-bit cpp backend";

void check_operand(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), kLayer, ": ", name, " must be a CPU tensor, got ", t.device());
  const at::ScalarType type = t.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kBFloat16 || type == at::kHalf, kLayer, ": ", name,
              " must be fp32/bf16/fp16, got ", type);
  TORCH_CHECK(t.dim() == dim, kLayer, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

void check_layer(const at::Tensor& x, const Packed4bit& weight, const at::Tensor& lora_A, const at::Tensor& lora_B) {
  weight.check();
  check_operand(x, "x", 2);
  check_operand(lora_A, "lora_A", 2);
  check_operand(lora_B, "lora_B", 2);
  const int64_t n = weight.out_features, k = weight.in_features, r = lora_A.size(0);
  TORCH_CHECK(r > 0 && lora_A.size(1) == k, kLayer, ": lora_A must be [r, ", k, "], got ", lora_A.sizes());
  TORCH_CHECK(lora_B.size(0) == n && lora_B.size(1) == r, kLayer, ": lora_B must be [", n, ", ", r, "], got ",
              lora_B.sizes());
  TORCH_CHECK(x.size(1) == k, kLayer, ": x must be [M, ", k, "], got ", x.sizes());
}

void check_scalar(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu() && t.numel() == 1 && t.scalar_type() == dtype, kLayer, ": ", name,
              " must be a one-element CPU ", dtype, " tensor");
}

uint64_t seed_value(const at::Tensor& seed) { return static_cast<uint64_t>(seed.item<int64_t>()); }

}  // namespace

void release_4bit_chunk_workspace() { release_chunk_workspace(); }  // one workspace serves both bases

std::tuple<at::Tensor, at::Tensor> forward_4bit_cpu(const at::Tensor& x, const Packed4bit& weight,
                                                    const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                    const std::optional<at::Tensor>& bias, double scaling,
                                                    const at::Tensor& sigma, const at::Tensor& seed,
                                                    int64_t chunk_bytes, int64_t parallel_grain,
                                                    int64_t workspace_bytes) {
  check_layer(x, weight, lora_A, lora_B);
  check_scalar(sigma, "sigma", at::kFloat);
  check_scalar(seed, "seed", at::kLong);
  TORCH_CHECK(chunk_bytes > 0, kLayer, ": chunk_bytes must be positive");
  const int64_t m = x.size(0), n = weight.out_features, k = weight.in_features;
  if (bias.has_value()) {
    check_operand(*bias, "bias", 1);
    TORCH_CHECK(bias->size(0) == n, kLayer, ": bias must be [", n, "], got ", bias->sizes());
  }
  const at::ScalarType compute = gemm_dtype(x);
  const at::Tensor x_gemm = x.to(compute);
  at::Tensor y = at::empty({m, n}, x.options().dtype(compute));
  at::Tensor row_scale = at::empty({n}, x.options().dtype(at::kFloat));
  const QuantizedPerturbedWeight perturbed(weight, lora_A, lora_B, scaling, seed_value(seed), x.scalar_type(),
                                           parallel_grain);
  const float sigma_value = sigma.item<float>();
  forward_over_chunks(perturbed, x_gemm, y, sigma_value, row_scale.data_ptr<float>(), chunk_bytes, workspace_bytes);
  if (bias.has_value()) y.add_(bias->to(compute));
  return {y.to(x.scalar_type()), row_scale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_4bit_cpu(
    const at::Tensor& dy, const at::Tensor& x, const Packed4bit& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& row_scale, double scaling, const at::Tensor& seed, bool compute_dx,
    bool fold_lora, int64_t chunk_bytes, int64_t parallel_grain, int64_t workspace_bytes) {
  check_layer(x, weight, lora_A, lora_B);
  check_operand(dy, "dy", 2);
  const int64_t m = x.size(0), n = weight.out_features;
  TORCH_CHECK(dy.size(0) == m && dy.size(1) == n, kLayer, ": dy must be [", m, ", ", n, "], got ", dy.sizes());
  TORCH_CHECK(row_scale.device().is_cpu() && row_scale.scalar_type() == at::kFloat && row_scale.dim() == 1 &&
                  row_scale.size(0) == n,
              kLayer, ": row_scale must be a CPU fp32 [", n, "] tensor");
  check_scalar(seed, "seed", at::kLong);
  TORCH_CHECK(chunk_bytes > 0, kLayer, ": chunk_bytes must be positive");
  const at::ScalarType compute = gemm_dtype(x);
  const at::Tensor dy_gemm = dy.to(compute);
  const at::Tensor x_gemm = x.to(compute);
  const at::Tensor lora_A_gemm = lora_A.to(compute);
  const at::Tensor dy_b = at::mm(dy_gemm, lora_B.to(compute)).mul_(scaling);  // s * dy @ B   [M, r]

  at::Tensor dx = at::empty({0}, x.options());
  if (compute_dx) {
    const QuantizedPerturbedWeight perturbed(weight, lora_A, lora_B, scaling, seed_value(seed), x.scalar_type(),
                                             parallel_grain);
    dx = input_grad_over_chunks(perturbed, dy_gemm, dy_b, lora_A_gemm, row_scale, x.scalar_type(), fold_lora,
                                chunk_bytes, parallel_grain, workspace_bytes);
  }
  auto [d_lora_A, d_lora_B] =
      lora_factor_grads(x_gemm, dy_gemm, dy_b, lora_A_gemm, scaling, lora_A.scalar_type(), lora_B.scalar_type());
  return {dx, d_lora_A, d_lora_B};
}

}  // namespace flatlora
