// Forward and backward of y = x (W + s*B@A + eps)^T + bias, regenerating W + s*B@A + eps in
// row chunks that go straight into BLAS (chunk_passes.h): nothing weight-sized outlives one chunk.
#include "flatlora_cpu.h"

#include <c10/util/Exception.h>

#include "chunk_passes.h"
#include "operand_checks.h"
#include "perturbed_chunk.h"

namespace flatlora {
namespace {

constexpr OperandChecks kChecks{"flatlora cpp backend", /*allow_fp64=*/true};

void check_layer(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B) {
  kChecks.floating(weight, "weight", 2);
  TORCH_CHECK(weight.size(0) > 0 && weight.size(1) > 0, kChecks.op, ": weight must be non-empty, got ",
              weight.sizes());
  kChecks.input_and_factors(x, lora_A, lora_B, weight.size(0), weight.size(1));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                               const at::Tensor& lora_A, const at::Tensor& lora_B,
                                               const std::optional<at::Tensor>& bias, double scaling,
                                               const at::Tensor& sigma, const at::Tensor& seed, int64_t chunk_bytes,
                                               int64_t parallel_grain, int64_t workspace_bytes) {
  check_layer(x, weight, lora_A, lora_B);
  kChecks.forward_arguments(sigma, seed, bias, weight.size(0), chunk_bytes);
  const PerturbedWeight perturbed(weight, lora_A, lora_B, scaling, seed_value(seed), x.scalar_type(), parallel_grain);
  return forward_pass(perturbed, x, weight.size(0), bias, sigma, chunk_bytes, workspace_bytes);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                            const at::Tensor& weight, const at::Tensor& lora_A,
                                                            const at::Tensor& lora_B, const at::Tensor& row_scale,
                                                            double scaling, const at::Tensor& seed, bool compute_dx,
                                                            bool fold_lora, int64_t chunk_bytes, int64_t parallel_grain,
                                                            int64_t workspace_bytes) {
  check_layer(x, weight, lora_A, lora_B);
  kChecks.backward_arguments(dy, row_scale, seed, x.size(0), weight.size(0), chunk_bytes);
  auto make_perturbed = [&] {
    return PerturbedWeight(weight, lora_A, lora_B, scaling, seed_value(seed), x.scalar_type(), parallel_grain);
  };
  return backward_pass(make_perturbed, dy, x, lora_A, lora_B, row_scale, scaling, compute_dx, fold_lora, chunk_bytes,
                       workspace_bytes);
}

}  // namespace flatlora
