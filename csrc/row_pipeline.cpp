#include "row_pipeline.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_kernels.h"

namespace flatlora {

void build_perturbed_rows(const RowPipeline& pipeline, int64_t row0, at::Tensor& chunk, const ChunkRowScales& scales,
                          bool fold_lora, const LoadBaseRows& load_rows) {
  const int64_t rows = chunk.size(0);
  const int64_t k = chunk.size(1);
  const int64_t rank = pipeline.rank;
  // A bf16 chunk (bf16 compute) is half the memory of an fp32 one: its rows are built in an fp32
  // scratch block, then stored rounded. Any other chunk is fp32 and rows are built in place.
  const bool bf16_chunk = chunk.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16_chunk == (pipeline.round_to == at::kBFloat16) && (bf16_chunk || chunk.scalar_type() == at::kFloat),
              "flatlora: a chunk is bf16 for bf16 compute, fp32 otherwise");
  const float* lora_B = pipeline.lora_B_scaled + row0 * rank;
  const float sqrt_k = static_cast<float>(std::sqrt(static_cast<double>(k)));
  float* chunk_f32 = bf16_chunk ? nullptr : chunk.data_ptr<float>();
  uint16_t* chunk_bf16 = bf16_chunk ? reinterpret_cast<uint16_t*>(chunk.data_ptr<c10::BFloat16>()) : nullptr;
  const CpuKernels& kernels = cpu_kernels();
  at::parallel_for(0, rows, pipeline.grain_rows, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(bf16_chunk ? kFoldRows * k : 0);
    for (int64_t group = begin; group < end; group += kFoldRows) {
      const int64_t count = std::min(kFoldRows, end - group);
      float* block = bf16_chunk ? scratch.data() : chunk_f32 + group * k;
      load_rows(group, count, block);
      if (fold_lora) kernels.add_low_rank_rows(lora_B + group * rank, pipeline.lora_A, rank, k, count, block);
      for (int64_t r = 0; r < count; ++r) {
        const int64_t i = group + r;
        float* row = block + r * k;
        float scale;
        if (scales.saved != nullptr) {
          scale = scales.saved[i];
        } else {
          scale = scales.sigma * static_cast<float>(std::sqrt(kernels.row_squared_norm(row, k))) / sqrt_k;
          scales.fresh[i] = scale;
        }
        // |z| <= 5.7 always, so a zero scale adds exactly nothing: skip the generator (sigma = 0).
        if (scale != 0.0f) kernels.add_scaled_normal_row(pipeline.seed, row0 + i, k, scale, row);
        if (pipeline.round_to == at::kHalf) {
          for (int64_t j = 0; j < k; ++j) row[j] = static_cast<float>(static_cast<c10::Half>(row[j]));
        }
        if (bf16_chunk) kernels.round_to_bfloat16(row, k, chunk_bf16 + i * k);
      }
    }
  });
}

}  // namespace flatlora
