// The argument checks of the C++ ops, one set for the dense and the 4-bit layer: each raises a
// c10::Error (a Python RuntimeError) that names the op and the argument, before any kernel runs.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace flatlora {

struct OperandChecks {
  const char* op;   // e.g. "flatlora cpp backend"
  bool allow_fp64;  // fp64 compute: the dense layer only

  // A CPU floating tensor of dim dimensions.
  void floating(const at::Tensor& t, const char* name, int64_t dim) const;
  // x [M, in_features], lora_A [r, in_features], lora_B [out_features, r].
  void input_and_factors(const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& lora_B,
                         int64_t out_features, int64_t in_features) const;
  // sigma (fp32), seed (int64), the chunk cap and the bias [out_features] of a forward.
  void forward_arguments(const at::Tensor& sigma, const at::Tensor& seed, const std::optional<at::Tensor>& bias,
                         int64_t out_features, int64_t chunk_bytes) const;
  // dy [M, out_features], the forward's fp32 row scales, seed and chunk cap of a backward.
  void backward_arguments(const at::Tensor& dy, const at::Tensor& row_scale, const at::Tensor& seed, int64_t tokens,
                          int64_t out_features, int64_t chunk_bytes) const;

 private:
  void scalar(const at::Tensor& t, const char* name, at::ScalarType dtype) const;
};

// The stream seed a one-element int64 tensor holds (its bits, as unsigned).
uint64_t seed_value(const at::Tensor& seed);

}  // namespace flatlora
