// Python bindings of the 4-bit backend, registered into flatlora_kernels._C by bindings.cpp.
#include <torch/extension.h>

#include "quantized_decode.h"
#include "quantized_linear.h"

namespace flatlora {
namespace {

Packed4bit packed(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& code_table,
                  const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                  int64_t blocksize, int64_t nested_blocksize, double nested_offset, at::ScalarType weight_dtype,
                  int64_t out_features, int64_t in_features) {
  return Packed4bit{codes, absmax, code_table, nested_absmax, nested_code, blocksize, nested_blocksize,
                    nested_offset, weight_dtype, out_features, in_features};
}

}  // namespace

void register_quantized(pybind11::module& m) {
  namespace py = pybind11;
  m.def(
      "forward_4bit",
      [](const at::Tensor& x, const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& code_table,
         const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
         int64_t blocksize, int64_t nested_blocksize, double nested_offset, at::ScalarType weight_dtype,
         int64_t out_features, int64_t in_features, const at::Tensor& lora_A, const at::Tensor& lora_B,
         const std::optional<at::Tensor>& bias, double scaling, const at::Tensor& sigma, const at::Tensor& seed,
         int64_t chunk_bytes, int64_t parallel_grain, int64_t workspace_bytes) {
        const Packed4bit weight = packed(codes, absmax, code_table, nested_absmax, nested_code, blocksize,
                                         nested_blocksize, nested_offset, weight_dtype, out_features, in_features);
        return forward_4bit_cpu(x, weight, lora_A, lora_B, bias, scaling, sigma, seed, chunk_bytes, parallel_grain,
                                workspace_bytes);
      },
      "y, row_scale = forward_4bit(x, *Packed4bit.op_args(), A, B, bias, s, sigma, seed, chunk_bytes, "
      "parallel_grain, workspace_bytes)");
  m.def(
      "backward_4bit",
      [](const at::Tensor& dy, const at::Tensor& x, const at::Tensor& codes, const at::Tensor& absmax,
         const at::Tensor& code_table, const std::optional<at::Tensor>& nested_absmax,
         const std::optional<at::Tensor>& nested_code, int64_t blocksize, int64_t nested_blocksize,
         double nested_offset, at::ScalarType weight_dtype, int64_t out_features, int64_t in_features,
         const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& row_scale, double scaling,
         const at::Tensor& seed, bool compute_dx, bool fold_lora, int64_t chunk_bytes, int64_t parallel_grain,
         int64_t workspace_bytes) {
        const Packed4bit weight = packed(codes, absmax, code_table, nested_absmax, nested_code, blocksize,
                                         nested_blocksize, nested_offset, weight_dtype, out_features, in_features);
        return backward_4bit_cpu(dy, x, weight, lora_A, lora_B, row_scale, scaling, seed, compute_dx, fold_lora,
                                 chunk_bytes, parallel_grain, workspace_bytes);
      },
      "dx, dA, dB = backward_4bit(dy, x, *Packed4bit.op_args(), A, B, row_scale, s, seed, compute_dx, fold_lora, "
      "chunk_bytes, parallel_grain, workspace_bytes)");
  m.def("release_4bit_chunk_workspace", &release_4bit_chunk_workspace,
        "frees the calling thread's reused 4-bit chunk buffer (memory measurements count its next allocation)");
  m.def(
      "dequantize_4bit_rows",
      [](const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& code_table,
         const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
         int64_t blocksize, int64_t nested_blocksize, double nested_offset, at::ScalarType weight_dtype,
         int64_t out_features, int64_t in_features) {
        // Debug: deq(W) in fp32 through the chunk builder at sigma 0 and B = 0 (tests compare it).
        const Packed4bit weight = packed(codes, absmax, code_table, nested_absmax, nested_code, blocksize,
                                         nested_blocksize, nested_offset, weight_dtype, out_features, in_features);
        weight.check();
        const at::Tensor zeros_a = at::zeros({1, in_features}), zeros_b = at::zeros({out_features, 1});
        const QuantizedPerturbedWeight rows(weight, zeros_a, zeros_b, 0.0, 0, at::kFloat, 16384);
        at::Tensor out = at::empty({out_features, in_features});
        at::Tensor scale = at::empty({out_features});
        rows.build_with_new_scale(0, out, 0.0f, scale.data_ptr<float>());
        return out;
      },
      "debug: deq(W) [N, K] fp32 (rounded through weight_dtype) as the 4-bit chunk builder decodes it");
  m.def("decode_4bit_isa", [] { return std::string(decode_4bit_kernels().isa); },
        "the ISA of the 4-bit decoders (the noise generator's)");
}

}  // namespace flatlora
