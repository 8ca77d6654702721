// Forward and backward of the Flat-QLoRA linear: 4-bit rows decoded into chunks of the perturbed
// weight (QuantizedPerturbedWeight) that chunk_passes.h's loops feed to BLAS, as for a dense W, so
// results equal the dense path on deq(W).
#include "quantized_linear.h"

#include <c10/util/Exception.h>

#include "chunk_passes.h"
#include "operand_checks.h"

namespace flatlora {
namespace {

constexpr OperandChecks kChecks{"flatlora 4-bit cpp backend", /*allow_fp64=*/false};

void check_layer(const at::Tensor& x, const Packed4bit& weight, const at::Tensor& lora_A, const at::Tensor& lora_B) {
  weight.check();
  kChecks.input_and_factors(x, lora_A, lora_B, weight.out_features, weight.in_features);
}

}  // namespace

void release_4bit_chunk_workspace() { release_chunk_workspace(); }  // one workspace serves both bases

std::tuple<at::Tensor, at::Tensor> forward_4bit_cpu(const at::Tensor& x, const Packed4bit& weight,
                                                    const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                    const std::optional<at::Tensor>& bias, double scaling,
                                                    const at::Tensor& sigma, const at::Tensor& seed,
                                                    int64_t chunk_bytes, int64_t parallel_grain,
                                                    int64_t workspace_bytes) {
  check_layer(x, weight, lora_A, lora_B);
  kChecks.forward_arguments(sigma, seed, bias, weight.out_features, chunk_bytes);
  const QuantizedPerturbedWeight perturbed(weight, lora_A, lora_B, scaling, seed_value(seed), x.scalar_type(),
                                           parallel_grain);
  return forward_pass(perturbed, x, weight.out_features, bias, sigma, chunk_bytes, workspace_bytes);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_4bit_cpu(
    const at::Tensor& dy, const at::Tensor& x, const Packed4bit& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& row_scale, double scaling, const at::Tensor& seed, bool compute_dx,
    bool fold_lora, int64_t chunk_bytes, int64_t parallel_grain, int64_t workspace_bytes) {
  check_layer(x, weight, lora_A, lora_B);
  kChecks.backward_arguments(dy, row_scale, seed, x.size(0), weight.out_features, chunk_bytes);
  auto make_perturbed = [&] {
    return QuantizedPerturbedWeight(weight, lora_A, lora_B, scaling, seed_value(seed), x.scalar_type(),
                                    parallel_grain);
  };
  return backward_pass(make_perturbed, dy, x, lora_A, lora_B, row_scale, scaling, compute_dx, fold_lora, chunk_bytes,
                       workspace_bytes);
}

}  // namespace flatlora
