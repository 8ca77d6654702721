// The dense builder: widens W's rows into row_pipeline.h's pipeline (fp32, bf16, fp16 compute), or
// builds fp64 rows itself (fp64 compute keeps W + s*B@A exact to fp64).
#include "perturbed_chunk.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_kernels.h"
#include "normal_stream.h"

namespace flatlora {

int64_t rows_per_chunk(int64_t out_features, int64_t in_features, int64_t element_bytes, int64_t chunk_bytes) {
  const int64_t row_bytes = std::max<int64_t>(1, in_features * element_bytes);
  const int64_t max_rows = std::min(out_features, std::max<int64_t>(1, chunk_bytes / row_bytes));
  // Equal chunks: 768 rows under a 682-row cap become 2 x 384, not 682 + a slow 86-row GEMM.
  const int64_t chunks = (out_features + max_rows - 1) / max_rows;
  return (out_features + chunks - 1) / chunks;
}

namespace {
at::ScalarType factor_dtype(at::ScalarType round_to) { return round_to == at::kDouble ? at::kDouble : at::kFloat; }
}  // namespace

PerturbedWeight::PerturbedWeight(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                 double scaling, uint64_t seed, at::ScalarType round_to, int64_t grain_elements)
    : weight_(weight),
      // fp64 compute keeps the factors in fp64 (the merged weight is then exact to fp64); otherwise fp32.
      lora_A_(lora_A.to(factor_dtype(round_to)).contiguous()),
      // s folded into B once: row i's update is then sum_k B_s[i, k] * A[k, :].
      lora_B_scaled_(lora_B.to(factor_dtype(round_to)).mul(scaling).contiguous()),
      seed_(seed),
      round_to_(round_to),
      grain_elements_(grain_elements) {
  TORCH_CHECK(grain_elements > 0, "flatlora cpp backend: parallel_grain must be positive");
}

int64_t PerturbedWeight::grain_rows(int64_t in_features) const {
  return std::max<int64_t>(1, grain_elements_ / in_features);
}

namespace {

// dst = src widened to fp32 (bf16 rows through the ISA kernel, the common case).
template <typename T>
void widen_row(const CpuKernels& kernels, const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    kernels.widen_bfloat16(reinterpret_cast<const uint16_t*>(src), n, dst);
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
  }
}

}  // namespace

void PerturbedWeight::build_rows(int64_t row0, at::Tensor& chunk, const ChunkRowScales& scales, bool fold_lora) const {
  if (round_to_ == at::kDouble) return build_rows_fp64(row0, chunk, scales, fold_lora);
  const int64_t rows = chunk.size(0);
  const int64_t in_features = chunk.size(1);
  const RowPipeline pipeline{lora_A_.data_ptr<float>(), lora_B_scaled_.data_ptr<float>(), lora_A_.size(0), seed_,
                             round_to_, grain_rows(in_features)};
  if (weight_.stride(1) != 1) {  // rows are read in place when contiguous; otherwise gathered first (rare)
    const at::Tensor gathered = weight_.narrow(0, row0, rows).to(at::kFloat).contiguous();
    const float* gathered_rows = gathered.data_ptr<float>();
    build_perturbed_rows(pipeline, row0, chunk, scales, fold_lora, [&](int64_t first, int64_t count, float* block) {
      std::copy_n(gathered_rows + first * in_features, count * in_features, block);
    });
    return;
  }
  const CpuKernels& kernels = cpu_kernels();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight_.scalar_type(), "flatlora_build_rows", [&] {
    const scalar_t* weight = weight_.data_ptr<scalar_t>() + row0 * weight_.stride(0);
    const int64_t weight_row_stride = weight_.stride(0);
    build_perturbed_rows(pipeline, row0, chunk, scales, fold_lora, [&](int64_t first, int64_t count, float* block) {
      for (int64_t r = 0; r < count; ++r) {
        widen_row(kernels, weight + (first + r) * weight_row_stride, block + r * in_features, in_features);
      }
    });
  });
}

void PerturbedWeight::build_rows_fp64(int64_t row0, at::Tensor& chunk, const ChunkRowScales& scales,
                                      bool fold_lora) const {
  TORCH_CHECK(chunk.scalar_type() == at::kDouble, "flatlora: an fp64 build needs an fp64 chunk");
  const int64_t rows = chunk.size(0);
  const int64_t in_features = chunk.size(1);
  // Per row: W' = W + (s*B) A in fp64, norm, fp32 noise. The rank-r update is a fixed-order loop
  // (k ascending per element), not BLAS: MKL's addmm_ on an Intel Xeon rounded a 1-row and a 2-row
  // chunk differently (an ulp), and W' must not depend on the chunk size or thread count.
  chunk.copy_(weight_.narrow(0, row0, rows));
  double* data = chunk.data_ptr<double>();
  const int64_t rank = lora_A_.size(0);
  const double* lora_A = lora_A_.data_ptr<double>();
  const double* lora_B = lora_B_scaled_.data_ptr<double>() + row0 * rank;
  const float sqrt_k = static_cast<float>(std::sqrt(static_cast<double>(in_features)));
  at::parallel_for(0, rows, grain_rows(in_features), [&](int64_t begin, int64_t end) {
    std::vector<float> z(in_features);
    for (int64_t i = begin; i < end; ++i) {
      double* row = data + i * in_features;
      if (fold_lora) {
        for (int64_t k = 0; k < rank; ++k) {
          const double coef = lora_B[i * rank + k];
          const double* a = lora_A + k * in_features;
          for (int64_t j = 0; j < in_features; ++j) row[j] += coef * a[j];
        }
      }
      float scale;
      if (scales.saved != nullptr) {
        scale = scales.saved[i];
      } else {
        double squared_norm = 0.0;
        for (int64_t j = 0; j < in_features; ++j) squared_norm += row[j] * row[j];
        scale = scales.sigma * static_cast<float>(std::sqrt(squared_norm)) / sqrt_k;
        scales.fresh[i] = scale;
      }
      if (scale == 0.0f) continue;
      normal_row(seed_, row0 + i, in_features, z.data());
      // eps = scale * z is an fp32 product by definition; it is added to W' in fp64.
      for (int64_t j = 0; j < in_features; ++j) row[j] += static_cast<double>(scale * z[j]);
    }
  });
}

void PerturbedWeight::build_with_new_scale(int64_t row0, at::Tensor& chunk, float sigma, float* row_scale) const {
  build_rows(row0, chunk, ChunkRowScales{sigma, /*saved=*/nullptr, /*fresh=*/row_scale}, /*fold_lora=*/true);
}

void PerturbedWeight::build_with_saved_scale(int64_t row0, at::Tensor& chunk, const float* row_scale,
                                             bool fold_lora) const {
  build_rows(row0, chunk, ChunkRowScales{/*sigma=*/0.0f, /*saved=*/row_scale, /*fresh=*/nullptr}, fold_lora);
}

}  // namespace flatlora
