// The non-template parts of chunk_passes.h: the per-thread chunk workspace and the LoRA gradients.
#include "chunk_passes.h"

namespace flatlora {
namespace {

// This thread's reusable chunk buffer (bytes, from c10's CPU allocator, so memory profilers see it).
thread_local at::Tensor chunk_workspace_bytes;

}  // namespace

// Up to workspace_bytes the chunk buffer is this thread's reused workspace (held for the thread's
// lifetime, never returned to the caller, one pass at a time): a fresh multi-MB buffer per pass made
// the kernel fault in and zero every page again, because glibc hands a freed heap top back to the OS
// (its measured cost: flatlora_kernels/backends/cpu_tuning.py, WORKSPACE_BYTES). Larger chunks (grown to the output's size)
// are allocated per pass: holding those would raise every later layer's peak.
at::Tensor chunk_workspace(int64_t rows, int64_t k, at::ScalarType dtype, int64_t workspace_bytes,
                           const at::TensorOptions& options) {
  const int64_t bytes = rows * k * static_cast<int64_t>(c10::elementSize(dtype));
  if (bytes > workspace_bytes) return at::empty({rows, k}, options.dtype(dtype));
  at::Tensor& workspace = chunk_workspace_bytes;
  if (!workspace.defined() || workspace.numel() < bytes) {
    workspace = at::Tensor();  // free the smaller one first
    workspace = at::empty({bytes}, options.dtype(at::kByte));
  }
  return at::from_blob(workspace.data_ptr(), {rows, k}, options.dtype(dtype));
}

void release_chunk_workspace() { chunk_workspace_bytes = at::Tensor(); }

std::tuple<at::Tensor, at::Tensor> lora_factor_grads(const at::Tensor& x_gemm, const at::Tensor& dy_gemm,
                                                     const at::Tensor& dy_b, const at::Tensor& lora_A_gemm,
                                                     double scaling, at::ScalarType lora_A_dtype,
                                                     at::ScalarType lora_B_dtype) {
  const at::Tensor x_a = at::mm(x_gemm, lora_A_gemm.t()).mul_(scaling);  // s * x @ A^T  [M, r]
  at::Tensor d_lora_A = at::mm(dy_b.t(), x_gemm).to(lora_A_dtype);      // [r, K]
  // dB = dy^T @ x_a [N, r]; fp32 as (x_a^T @ dy)^T, an r-row product: measured 0.47 -> 0.25 ms at
  // M = 512, N = 1024, r = 16 on one core (MKL); bf16 is as fast either way (0.09 ms) and stays direct.
  at::Tensor d_lora_B = dy_gemm.scalar_type() == at::kFloat ? at::mm(x_a.t(), dy_gemm).t().contiguous()
                                                            : at::mm(dy_gemm.t(), x_a);
  return {d_lora_A, d_lora_B.to(lora_B_dtype)};
}

}  // namespace flatlora
