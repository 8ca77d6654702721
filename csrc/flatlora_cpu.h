// The fused Flat-LoRA linear on the CPU: the "cpp" backend's forward and backward
// (protocol: flatlora_kernels/backends/__init__.py).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace flatlora {

// Tuning arguments (values and provenance: flatlora_kernels/backends/cpu_tuning.py): chunk_bytes caps
// one regenerated chunk; parallel_grain is about how many chunk elements one build task gets; a chunk
// of at most workspace_bytes lives in a per-thread buffer reused across calls (0: none).

// (y [M, N] in x's dtype, row_scale fp32 [N]).
std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                               const at::Tensor& lora_A, const at::Tensor& lora_B,
                                               const std::optional<at::Tensor>& bias, double scaling,
                                               const at::Tensor& sigma, const at::Tensor& seed, int64_t chunk_bytes,
                                               int64_t parallel_grain, int64_t workspace_bytes);

// (dx [M, K] or empty, dA in lora_A's dtype, dB in lora_B's dtype). fold_lora: dx's chunks hold
// W + s*B@A + eps; otherwise W + eps, and dx adds (s * dy @ B) @ A (cheaper when M < N).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                            const at::Tensor& weight, const at::Tensor& lora_A,
                                                            const at::Tensor& lora_B, const at::Tensor& row_scale,
                                                            double scaling, const at::Tensor& seed, bool compute_dx,
                                                            bool fold_lora, int64_t chunk_bytes, int64_t parallel_grain,
                                                            int64_t workspace_bytes);

// Frees this thread's reused chunk buffer (the next pass allocates it again): for memory
// measurements that should count it (flatlora_kernels/memory.py).
void release_chunk_workspace();

}  // namespace flatlora
