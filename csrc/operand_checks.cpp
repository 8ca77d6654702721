#include "operand_checks.h"

#include <c10/util/Exception.h>

namespace flatlora {

void OperandChecks::floating(const at::Tensor& t, const char* name, int64_t dim) const {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  const at::ScalarType type = t.scalar_type();
  const bool supported = type == at::kFloat || type == at::kBFloat16 || type == at::kHalf ||
                         (allow_fp64 && type == at::kDouble);
  TORCH_CHECK(supported, op, ": ", name, " must be ", allow_fp64 ? "fp32/bf16/fp16/fp64" : "fp32/bf16/fp16", ", got ",
              type);
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

void OperandChecks::input_and_factors(const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                      int64_t out_features, int64_t in_features) const {
  floating(x, "x", 2);
  floating(lora_A, "lora_A", 2);
  floating(lora_B, "lora_B", 2);
  const int64_t r = lora_A.size(0);
  TORCH_CHECK(r > 0 && lora_A.size(1) == in_features, op, ": lora_A must be [r, ", in_features, "], got ",
              lora_A.sizes());
  TORCH_CHECK(lora_B.size(0) == out_features && lora_B.size(1) == r, op, ": lora_B must be [", out_features, ", ", r,
              "], got ", lora_B.sizes());
  TORCH_CHECK(x.size(1) == in_features, op, ": x must be [M, ", in_features, "], got ", x.sizes());
}

void OperandChecks::scalar(const at::Tensor& t, const char* name, at::ScalarType dtype) const {
  TORCH_CHECK(t.device().is_cpu() && t.numel() == 1 && t.scalar_type() == dtype, op, ": ", name,
              " must be a one-element CPU ", dtype, " tensor, got ", t.numel(), " x ", t.scalar_type(), " on ",
              t.device());
}

void OperandChecks::forward_arguments(const at::Tensor& sigma, const at::Tensor& seed,
                                      const std::optional<at::Tensor>& bias, int64_t out_features,
                                      int64_t chunk_bytes) const {
  scalar(sigma, "sigma", at::kFloat);
  scalar(seed, "seed", at::kLong);
  TORCH_CHECK(chunk_bytes > 0, op, ": chunk_bytes must be positive");
  if (bias.has_value()) {
    floating(*bias, "bias", 1);
    TORCH_CHECK(bias->size(0) == out_features, op, ": bias must be [", out_features, "], got ", bias->sizes());
  }
}

void OperandChecks::backward_arguments(const at::Tensor& dy, const at::Tensor& row_scale, const at::Tensor& seed,
                                       int64_t tokens, int64_t out_features, int64_t chunk_bytes) const {
  floating(dy, "dy", 2);
  TORCH_CHECK(dy.size(0) == tokens && dy.size(1) == out_features, op, ": dy must be [", tokens, ", ", out_features,
              "], got ", dy.sizes());
  TORCH_CHECK(row_scale.device().is_cpu() && row_scale.scalar_type() == at::kFloat && row_scale.dim() == 1 &&
                  row_scale.size(0) == out_features,
              op, ": row_scale must be a CPU fp32 [", out_features, "] tensor, got ", row_scale.scalar_type(), " ",
              row_scale.sizes());
  scalar(seed, "seed", at::kLong);
  TORCH_CHECK(chunk_bytes > 0, op, ": chunk_bytes must be positive");
}

uint64_t seed_value(const at::Tensor& seed) { return static_cast<uint64_t>(seed.item<int64_t>()); }

}  // namespace flatlora
