// Forward and backward of y = x (W + s*B@A + eps)^T + bias, regenerating W + s*B@A + eps in
// row chunks that go straight into BLAS: nothing weight-sized outlives one chunk.
#include "flatlora_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include "cpu_kernels.h"
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

// The big GEMMs run in x's dtype for fp32, fp64 and bf16: oneDNN's bf16 GEMM accumulates in fp32 and
// runs at ~2.6x the fp32 rate on CPUs with bf16 dot products (measured 10 vs 26 ms at 2048x1024x1024),
// and rounding the perturbed block to bf16 is what a bf16 nn.Linear does to its weight anyway. fp16
// is widened to fp32: CPU fp16 GEMMs measured 4x slower than fp32.
at::ScalarType gemm_dtype(const at::Tensor& x) {
  const at::ScalarType dtype = x.scalar_type();
  return dtype == at::kDouble || dtype == at::kBFloat16 ? dtype : at::kFloat;
}

// The regenerated chunk's dtype is the GEMM's: bf16 chunks are built in fp32 and stored rounded (half
// the memory), fp64 chunks are built in fp64 (float64 is exact to float64), fp16 runs fp32.
at::ScalarType chunk_dtype(at::ScalarType compute) { return compute; }

// This thread's reusable chunk buffer (bytes, from c10's CPU allocator, so memory profilers see it).
thread_local at::Tensor chunk_workspace_bytes;

// The chunk buffer of one pass, [rows, k] of dtype. Up to workspace_bytes it is this thread's reused
// workspace (held for the thread's lifetime, never returned to the caller, one pass at a time):
// a fresh multi-MB buffer per pass made the kernel fault in and zero every page again, because glibc
// hands a freed heap top back to the OS. Measured (Intel Xeon, 2 threads, 1024x1024 bf16, M=512,
// perf): about a third of the fused step's kernel time, which fell from 29.5% to 18.2% of its CPU
// time (benchmarks/RESULTS.md). Larger chunks (grown to the output's size) are allocated per pass,
// as before: holding those would raise every later layer's peak.
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

uint64_t seed_value(const at::Tensor& seed) { return static_cast<uint64_t>(seed.item<int64_t>()); }

// bf16 dx from several chunks: one bf16 GEMM per chunk (oneDNN, fp32 accumulation), the products
// summed in fp32 and rounded once at the end, so dx is rounded once per chunk product, not once per
// running sum. The widen / add / round passes are the ISA kernels, split over threads: torch's
// mixed-dtype add_ and copy_ measured 2.1 and 0.7 ms per [512, 3072] on one core. Without the fold,
// the low-rank branch (s * dy @ B) @ A is the first product.
at::Tensor bfloat16_dx_over_chunks(const PerturbedWeight& perturbed, const at::Tensor& dy, const at::Tensor& dy_b,
                                   const at::Tensor& lora_A, const at::Tensor& saved_scale, at::Tensor& chunk_buffer,
                                   bool fold_lora, int64_t parallel_grain) {
  const int64_t m = dy.size(0), n = dy.size(1), k = chunk_buffer.size(1), chunk_rows = chunk_buffer.size(0);
  at::Tensor product = at::empty({m, k}, dy.options());
  at::Tensor dx_sum = at::empty({m, k}, dy.options().dtype(at::kFloat));
  float* sum = dx_sum.data_ptr<float>();
  uint16_t* product_bits = reinterpret_cast<uint16_t*>(product.data_ptr<c10::BFloat16>());
  const CpuKernels& kernels = cpu_kernels();
  const int64_t total = m * k;
  auto over_elements = [&](auto body) {
    at::parallel_for(0, total, parallel_grain, [&](int64_t begin, int64_t end) { body(begin, end - begin); });
  };
  bool first = true;
  auto accumulate = [&] {
    if (first) {
      over_elements([&](int64_t at, int64_t count) { kernels.widen_bfloat16(product_bits + at, count, sum + at); });
    } else {
      over_elements([&](int64_t at, int64_t count) { kernels.add_bfloat16(product_bits + at, count, sum + at); });
    }
    first = false;
  };
  if (!fold_lora) {
    at::mm_out(product, dy_b, lora_A);
    accumulate();
  }
  for (int64_t row0 = 0; row0 < n; row0 += chunk_rows) {
    const int64_t rows = std::min(chunk_rows, n - row0);
    at::Tensor chunk = chunk_buffer.narrow(0, 0, rows);
    perturbed.build_with_saved_scale(row0, chunk, saved_scale.data_ptr<float>() + row0, fold_lora);
    at::mm_out(product, dy.narrow(1, row0, rows), chunk);
    accumulate();
  }
  // The product buffer receives the rounded sum (peak: the fp32 sum plus one bf16 dx).
  over_elements([&](int64_t at, int64_t count) { kernels.round_to_bfloat16(sum + at, count, product_bits + at); });
  return product;
}

}  // namespace

void release_chunk_workspace() { chunk_workspace_bytes = at::Tensor(); }

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

  const at::ScalarType chunk_type = chunk_dtype(compute);
  const int64_t chunk_rows = rows_per_chunk(n, k, c10::elementSize(chunk_type), chunk_bytes);
  at::Tensor chunk_buffer = chunk_workspace(chunk_rows, k, chunk_type, workspace_bytes, x.options());
  for (int64_t row0 = 0; row0 < n; row0 += chunk_rows) {
    const int64_t rows = std::min(chunk_rows, n - row0);
    at::Tensor chunk = chunk_buffer.narrow(0, 0, rows);
    perturbed.build_with_new_scale(row0, chunk, sigma_value, row_scale.data_ptr<float>() + row0);
    // y[:, rows] is a strided column block (row stride N): BLAS writes it in place via ldc.
    at::Tensor y_block = y.narrow(1, row0, rows);
    at::mm_out(y_block, x_gemm, chunk.t());
  }
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
  const int64_t m = x.size(0), n = weight.size(0), k = weight.size(1);
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
    const at::Tensor saved_scale = row_scale.contiguous();
    const PerturbedWeight perturbed(weight, lora_A, lora_B, scaling, seed_value(seed), x.scalar_type(),
                                    parallel_grain);
    const at::ScalarType chunk_type = chunk_dtype(compute);
    const int64_t chunk_rows = rows_per_chunk(n, k, c10::elementSize(chunk_type), chunk_bytes);
    at::Tensor chunk_buffer = chunk_workspace(chunk_rows, k, chunk_type, workspace_bytes, x.options());
    if (compute == at::kBFloat16 && chunk_rows < n) {
      dx = bfloat16_dx_over_chunks(perturbed, dy_gemm, dy_b, lora_A_gemm, saved_scale, chunk_buffer, fold_lora,
                                   parallel_grain);
    } else {
      // One chunk in bf16, or fp32 / fp64 partial sums: dx += dy[:, rows] @ chunk; the first chunk
      // overwrites, so dx needs no zero fill.
      at::Tensor dx_sum = at::empty({m, k}, x.options().dtype(compute));
      for (int64_t row0 = 0; row0 < n; row0 += chunk_rows) {
        const int64_t rows = std::min(chunk_rows, n - row0);
        at::Tensor chunk = chunk_buffer.narrow(0, 0, rows);
        perturbed.build_with_saved_scale(row0, chunk, saved_scale.data_ptr<float>() + row0, fold_lora);
        const at::Tensor dy_block = dy_gemm.narrow(1, row0, rows);
        row0 == 0 ? at::mm_out(dx_sum, dy_block, chunk) : dx_sum.addmm_(dy_block, chunk);
      }
      if (!fold_lora) dx_sum.addmm_(dy_b, lora_A_gemm);  // the unfolded branch: (s * dy @ B) @ A
      dx = dx_sum.to(x.scalar_type());
    }
  }
  // LoRA gradients through small rank-r products only.
  const at::Tensor x_a = at::mm(x_gemm, lora_A_gemm.t()).mul_(scaling);          // s * x @ A^T  [M, r]
  at::Tensor d_lora_A = at::mm(dy_b.t(), x_gemm).to(lora_A.scalar_type());        // [r, K]
  // dB = dy^T @ x_a [N, r]; fp32 as (x_a^T @ dy)^T, an r-row product: measured 0.47 -> 0.25 ms at
  // M = 512, N = 1024, r = 16 on one core (MKL); bf16 is as fast either way (0.09 ms) and stays direct.
  at::Tensor d_lora_B = compute == at::kFloat ? at::mm(x_a.t(), dy_gemm).t().contiguous()
                                              : at::mm(dy_gemm.t(), x_a);
  d_lora_B = d_lora_B.to(lora_B.scalar_type());
  return {dx, d_lora_A, d_lora_B};
}

}  // namespace flatlora
