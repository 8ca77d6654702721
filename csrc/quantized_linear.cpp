// Forward and backward of the Flat-QLoRA linear: 4-bit rows decoded into chunks of the perturbed
// weight that go straight into BLAS, as flatlora_cpu.cpp does for a dense W (same chunking, same
// dtypes, same summation of bf16 dx over chunks), so results equal the dense path on deq(W).
#include "quantized_linear.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include "cpu_kernels.h"
#include "perturbed_chunk.h"

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

// bf16 GEMMs for bf16 compute, fp32 otherwise (fp16 widened: CPU fp16 GEMMs are slow), as the dense path.
at::ScalarType gemm_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kBFloat16 ? at::kBFloat16 : at::kFloat;
}

thread_local at::Tensor workspace_bytes_buffer;

// The chunk buffer of one pass: this thread's reused workspace up to workspace_bytes (see
// flatlora_cpu.cpp's chunk_workspace for why), a fresh allocation above.
at::Tensor chunk_buffer(int64_t rows, int64_t k, at::ScalarType dtype, int64_t workspace_bytes,
                        const at::TensorOptions& options) {
  const int64_t bytes = rows * k * static_cast<int64_t>(c10::elementSize(dtype));
  if (bytes > workspace_bytes) return at::empty({rows, k}, options.dtype(dtype));
  at::Tensor& workspace = workspace_bytes_buffer;
  if (!workspace.defined() || workspace.numel() < bytes) {
    workspace = at::Tensor();
    workspace = at::empty({bytes}, options.dtype(at::kByte));
  }
  return at::from_blob(workspace.data_ptr(), {rows, k}, options.dtype(dtype));
}

uint64_t seed_value(const at::Tensor& seed) { return static_cast<uint64_t>(seed.item<int64_t>()); }

// bf16 dx over several chunks: bf16 GEMM per chunk, products summed in fp32, rounded once (as the
// dense backend's bfloat16_dx_over_chunks).
at::Tensor bfloat16_dx_over_chunks(const QuantizedPerturbedWeight& perturbed, const at::Tensor& dy,
                                   const at::Tensor& dy_b, const at::Tensor& lora_A, const at::Tensor& saved_scale,
                                   at::Tensor& buffer, bool fold_lora, int64_t parallel_grain) {
  const int64_t m = dy.size(0), n = dy.size(1), k = buffer.size(1), chunk_rows = buffer.size(0);
  at::Tensor product = at::empty({m, k}, dy.options());
  at::Tensor dx_sum = at::empty({m, k}, dy.options().dtype(at::kFloat));
  float* sum = dx_sum.data_ptr<float>();
  uint16_t* product_bits = reinterpret_cast<uint16_t*>(product.data_ptr<c10::BFloat16>());
  const CpuKernels& kernels = cpu_kernels();
  auto over_elements = [&](auto body) {
    at::parallel_for(0, m * k, parallel_grain, [&](int64_t begin, int64_t end) { body(begin, end - begin); });
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
    at::Tensor chunk = buffer.narrow(0, 0, rows);
    perturbed.build_with_saved_scale(row0, chunk, saved_scale.data_ptr<float>() + row0, fold_lora);
    at::mm_out(product, dy.narrow(1, row0, rows), chunk);
    accumulate();
  }
  over_elements([&](int64_t at, int64_t count) { kernels.round_to_bfloat16(sum + at, count, product_bits + at); });
  return product;
}

}  // namespace

void release_4bit_chunk_workspace() { workspace_bytes_buffer = at::Tensor(); }

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
  const int64_t chunk_rows = rows_per_chunk(n, k, c10::elementSize(compute), chunk_bytes);
  at::Tensor buffer = chunk_buffer(chunk_rows, k, compute, workspace_bytes, x.options());
  for (int64_t row0 = 0; row0 < n; row0 += chunk_rows) {
    const int64_t rows = std::min(chunk_rows, n - row0);
    at::Tensor chunk = buffer.narrow(0, 0, rows);
    perturbed.build_with_new_scale(row0, chunk, sigma_value, row_scale.data_ptr<float>() + row0);
    at::Tensor y_block = y.narrow(1, row0, rows);
    at::mm_out(y_block, x_gemm, chunk.t());
  }
  if (bias.has_value()) y.add_(bias->to(compute));
  return {y.to(x.scalar_type()), row_scale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_4bit_cpu(
    const at::Tensor& dy, const at::Tensor& x, const Packed4bit& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& row_scale, double scaling, const at::Tensor& seed, bool compute_dx,
    bool fold_lora, int64_t chunk_bytes, int64_t parallel_grain, int64_t workspace_bytes) {
  check_layer(x, weight, lora_A, lora_B);
  check_operand(dy, "dy", 2);
  const int64_t m = x.size(0), n = weight.out_features, k = weight.in_features;
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
    const at::Tensor saved_scale = row_scale.contiguous();
    const QuantizedPerturbedWeight perturbed(weight, lora_A, lora_B, scaling, seed_value(seed), x.scalar_type(),
                                             parallel_grain);
    const int64_t chunk_rows = rows_per_chunk(n, k, c10::elementSize(compute), chunk_bytes);
    at::Tensor buffer = chunk_buffer(chunk_rows, k, compute, workspace_bytes, x.options());
    if (compute == at::kBFloat16 && chunk_rows < n) {
      dx = bfloat16_dx_over_chunks(perturbed, dy_gemm, dy_b, lora_A_gemm, saved_scale, buffer, fold_lora,
                                   parallel_grain);
    } else {
      at::Tensor dx_sum = at::empty({m, k}, x.options().dtype(compute));
      for (int64_t row0 = 0; row0 < n; row0 += chunk_rows) {
        const int64_t rows = std::min(chunk_rows, n - row0);
        at::Tensor chunk = buffer.narrow(0, 0, rows);
        perturbed.build_with_saved_scale(row0, chunk, saved_scale.data_ptr<float>() + row0, fold_lora);
        const at::Tensor dy_block = dy_gemm.narrow(1, row0, rows);
        row0 == 0 ? at::mm_out(dx_sum, dy_block, chunk) : dx_sum.addmm_(dy_block, chunk);
      }
      if (!fold_lora) dx_sum.addmm_(dy_b, lora_A_gemm);
      dx = dx_sum.to(x.scalar_type());
    }
  }
  const at::Tensor x_a = at::mm(x_gemm, lora_A_gemm.t()).mul_(scaling);  // s * x @ A^T  [M, r]
  at::Tensor d_lora_A = at::mm(dy_b.t(), x_gemm).to(lora_A.scalar_type());
  at::Tensor d_lora_B = compute == at::kFloat ? at::mm(x_a.t(), dy_gemm).t().contiguous() : at::mm(dy_gemm.t(), x_a);
  d_lora_B = d_lora_B.to(lora_B.scalar_type());
  return {dx, d_lora_A, d_lora_B};
}

}  // namespace flatlora
