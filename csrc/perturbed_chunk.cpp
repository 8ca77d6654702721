// Each chunk row is finished in one visit while it sits in L1: widen the W row, add the rank-r
// LoRA update, take its norm (forward), add the noise, round to the compute dtype. No separate
// copy / BLAS update / norm passes over the chunk, and no full B@A.
#include "perturbed_chunk.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu_kernels.h"
#include "normal_stream.h"

namespace flatlora {

int64_t rows_per_chunk(int64_t in_features, int64_t element_bytes, int64_t chunk_bytes) {
  const int64_t row_bytes = in_features * element_bytes;
  return std::max<int64_t>(1, chunk_bytes / std::max<int64_t>(1, row_bytes));
}

namespace {
at::ScalarType factor_dtype(at::ScalarType round_to) { return round_to == at::kDouble ? at::kDouble : at::kFloat; }
}  // namespace

PerturbedWeight::PerturbedWeight(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                 double scaling, uint64_t seed, at::ScalarType round_to)
    : weight_(weight),
      // fp64 compute keeps the factors in fp64 (the merged weight is then exact to fp64); otherwise fp32.
      lora_A_(lora_A.to(factor_dtype(round_to)).contiguous()),
      // s folded into B once: row i's update is then sum_k B_s[i, k] * A[k, :].
      lora_B_scaled_(lora_B.to(factor_dtype(round_to)).mul(scaling).contiguous()),
      seed_(seed),
      round_to_(round_to) {}

namespace {

template <typename T>
void widen_row(const T* src, float* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

// Round to nearest even bf16 and back, with integer ops so the loop vectorises; NaN stays NaN.
void round_row_to_bfloat16(float* row, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    uint32_t bits;
    std::memcpy(&bits, &row[j], sizeof bits);
    const bool is_nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
    bits = is_nan ? bits : rounded;
    std::memcpy(&row[j], &bits, sizeof bits);
  }
}

void round_row_to_half(float* row, int64_t n) {
  for (int64_t j = 0; j < n; ++j) row[j] = static_cast<float>(static_cast<c10::Half>(row[j]));
}

// out = row rounded to bf16 (row already rounded by round_row_to_bfloat16: keep the high halves).
void store_row_as_bfloat16(const float* row, c10::BFloat16* out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    uint32_t bits;
    std::memcpy(&bits, &row[j], sizeof bits);
    const uint16_t high = static_cast<uint16_t>(bits >> 16);
    std::memcpy(&out[j], &high, sizeof high);
  }
}

}  // namespace

void PerturbedWeight::build_rows(int64_t row0, at::Tensor& chunk, float sigma, const float* saved_scale,
                                 float* new_scale) const {
  if (round_to_ == at::kDouble) return build_rows_fp64(row0, chunk, sigma, saved_scale, new_scale);
  const int64_t rows = chunk.size(0);
  const int64_t in_features = chunk.size(1);
  const int64_t rank = lora_A_.size(0);
  // A bf16 chunk (bf16 compute) is half the memory of an fp32 one: each row is built in an fp32
  // scratch row, then stored rounded. Any other chunk is fp32 and rows are built in place.
  const bool bf16_chunk = chunk.scalar_type() == at::kBFloat16;
  TORCH_CHECK(chunk.scalar_type() == at::kFloat || (bf16_chunk && round_to_ == at::kBFloat16),
              "flatlora: a chunk is fp32, or bf16 for bf16 compute");
  const float* lora_A = lora_A_.data_ptr<float>();
  const float* lora_B = lora_B_scaled_.data_ptr<float>() + row0 * rank;
  const float sqrt_k = static_cast<float>(std::sqrt(static_cast<double>(in_features)));
  // Rows must be contiguous to be read in place; otherwise gather this chunk's rows first (rare).
  const bool read_in_place = weight_.stride(1) == 1;
  const at::Tensor gathered =
      read_in_place ? at::Tensor() : weight_.narrow(0, row0, rows).to(at::kFloat).contiguous();
  const float* gathered_data = read_in_place ? nullptr : gathered.data_ptr<float>();
  float* chunk_f32 = bf16_chunk ? nullptr : chunk.data_ptr<float>();
  c10::BFloat16* chunk_bf16 = bf16_chunk ? chunk.data_ptr<c10::BFloat16>() : nullptr;
  // ~16K elements per task: enough work to amortise a thread hand-off.
  const int64_t grain = std::max<int64_t>(1, 16384 / in_features);

  const CpuKernels& kernels = cpu_kernels();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight_.scalar_type(), "flatlora_build_rows", [&] {
    const scalar_t* weight = weight_.data_ptr<scalar_t>() + row0 * weight_.stride(0);
    const int64_t weight_row_stride = weight_.stride(0);
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(bf16_chunk ? in_features : 0);
      for (int64_t i = begin; i < end; ++i) {
        float* row = bf16_chunk ? scratch.data() : chunk_f32 + i * in_features;
        if (read_in_place) {
          widen_row(weight + i * weight_row_stride, row, in_features);
        } else {
          std::copy_n(gathered_data + i * in_features, in_features, row);
        }
        const double squared_norm = kernels.add_low_rank_row(lora_B + i * rank, lora_A, rank, in_features, row);
        float scale;
        if (saved_scale != nullptr) {
          scale = saved_scale[i];
        } else {
          scale = sigma * static_cast<float>(std::sqrt(squared_norm)) / sqrt_k;
          new_scale[i] = scale;
        }
        // |z| <= 5.7 always, so a zero scale adds exactly nothing: skip the generator (sigma = 0).
        if (scale != 0.0f) add_scaled_normal_row(seed_, row0 + i, in_features, scale, row);
        if (round_to_ == at::kBFloat16) round_row_to_bfloat16(row, in_features);
        if (round_to_ == at::kHalf) round_row_to_half(row, in_features);
        if (bf16_chunk) store_row_as_bfloat16(row, chunk_bf16 + i * in_features, in_features);
      }
    });
  });
}

void PerturbedWeight::build_rows_fp64(int64_t row0, at::Tensor& chunk, float sigma, const float* saved_scale,
                                      float* new_scale) const {
  TORCH_CHECK(chunk.scalar_type() == at::kDouble, "flatlora: an fp64 build needs an fp64 chunk");
  const int64_t rows = chunk.size(0);
  const int64_t in_features = chunk.size(1);
  // W' = W + (s*B) A in fp64 by BLAS (rank-r update of the chunk), then per row: norm and fp32 noise.
  chunk.copy_(weight_.narrow(0, row0, rows));
  chunk.addmm_(lora_B_scaled_.narrow(0, row0, rows), lora_A_);
  double* data = chunk.data_ptr<double>();
  const float sqrt_k = static_cast<float>(std::sqrt(static_cast<double>(in_features)));
  const int64_t grain = std::max<int64_t>(1, 16384 / in_features);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> z(in_features);
    for (int64_t i = begin; i < end; ++i) {
      double* row = data + i * in_features;
      float scale;
      if (saved_scale != nullptr) {
        scale = saved_scale[i];
      } else {
        double squared_norm = 0.0;
        for (int64_t j = 0; j < in_features; ++j) squared_norm += row[j] * row[j];
        scale = sigma * static_cast<float>(std::sqrt(squared_norm)) / sqrt_k;
        new_scale[i] = scale;
      }
      if (scale == 0.0f) continue;
      normal_row(seed_, row0 + i, in_features, z.data());
      // eps = scale * z is an fp32 product by definition; it is added to W' in fp64.
      for (int64_t j = 0; j < in_features; ++j) row[j] += static_cast<double>(scale * z[j]);
    }
  });
}

void PerturbedWeight::build_with_new_scale(int64_t row0, at::Tensor& chunk, float sigma, float* row_scale) const {
  build_rows(row0, chunk, sigma, /*saved_scale=*/nullptr, row_scale);
}

void PerturbedWeight::build_with_saved_scale(int64_t row0, at::Tensor& chunk, const float* row_scale) const {
  build_rows(row0, chunk, /*sigma=*/0.0f, row_scale, /*new_scale=*/nullptr);
}

}  // namespace flatlora
