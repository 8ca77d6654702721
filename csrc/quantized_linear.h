// The fused Flat-QLoRA linear on the CPU: y = x (deq(W) + s*B@A + eps)^T + bias and its backward for a
// bitsandbytes 4-bit W (the quantized "cpp" backend, flatlora_kernels/quantized/cpp_backend.py).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "quantized_chunk.h"

namespace flatlora {

// Tuning arguments as forward_cpu's (flatlora_cpu.h): chunk byte cap, parallel grain, per-thread
// workspace cap. (y [M, N] in x's dtype, row_scale fp32 [N]).
std::tuple<at::Tensor, at::Tensor> forward_4bit_cpu(const at::Tensor& x, const Packed4bit& weight,
                                                    const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                    const std::optional<at::Tensor>& bias, double scaling,
                                                    const at::Tensor& sigma, const at::Tensor& seed,
                                                    int64_t chunk_bytes, int64_t parallel_grain,
                                                    int64_t workspace_bytes);

// (dx [M, K] or empty, dA, dB); fold_lora as backward_cpu's.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_4bit_cpu(
    const at::Tensor& dy, const at::Tensor& x, const Packed4bit& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& row_scale, double scaling, const at::Tensor& seed, bool compute_dx,
    bool fold_lora, int64_t chunk_bytes, int64_t parallel_grain, int64_t workspace_bytes);

// Frees the calling thread's reused 4-bit chunk buffer (memory measurements count its next allocation).
void release_4bit_chunk_workspace();

}  // namespace flatlora
