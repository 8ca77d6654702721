// The fp32 row pipeline both chunk builders run (perturbed_chunk.cpp for a dense W, quantized_chunk.cpp
// for a 4-bit W). A builder only loads its base's rows as fp32; every step after that is here, so the
// two bases build W' = W + s*B@A + eps from the same base values with the same operations, bit for bit.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>

namespace flatlora {

// What every row of one layer's W' needs besides its base row.
struct RowPipeline {
  const float* lora_A;         // [rank, in_features] fp32
  const float* lora_B_scaled;  // s * B, [out_features, rank] fp32, indexed by weight row
  int64_t rank;
  uint64_t seed;
  at::ScalarType round_to;     // the compute dtype (fp32, bf16, fp16) rows are rounded to
  int64_t grain_rows;          // rows per parallel task
};

// The noise scales of one chunk's rows (chunk-relative pointers): the forward takes them from the
// rows' norms and writes them to `fresh`; the backward reuses the forward's (`saved`), so eps is the
// same in both passes.
struct ChunkRowScales {
  float sigma;
  const float* saved;  // null in the forward
  float* fresh;        // null in the backward
};

// load_rows(chunk_row, count, block): writes the base rows row0 + chunk_row .. + count - 1 as fp32
// rows of in_features into block. Called once per group of kFoldRows rows (cpu_kernels.h).
using LoadBaseRows = std::function<void(int64_t chunk_row, int64_t count, float* block)>;

// chunk = rows [row0, row0 + chunk.size(0)) of W' (s*B@A left out unless fold_lora); chunk is
// contiguous [rows, in_features], bf16 for bf16 compute and fp32 otherwise. Each group of rows is
// finished while it sits in L1: load, add the rank-r update (kFoldRows rows per load of A), take the
// norms (forward), add the noise, round. No copy, BLAS update or norm pass over the whole chunk.
void build_perturbed_rows(const RowPipeline& pipeline, int64_t row0, at::Tensor& chunk, const ChunkRowScales& scales,
                          bool fold_lora, const LoadBaseRows& load_rows);

}  // namespace flatlora
