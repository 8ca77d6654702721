// Row chunks of deq(W) + s*B@A + eps for a bitsandbytes 4-bit W, decoded straight from the packed
// codes into the chunk: neither deq(W) nor eps exists beyond one chunk. The same rows, bit for bit,
// as PerturbedWeight (perturbed_chunk.h) builds from the dequantized weight.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

#include "row_pipeline.h"

namespace flatlora {

// A 4-bit weight [n, k] in bitsandbytes' layout (flatlora_kernels/quantized/layout.py): flat codes, two
// per byte (even element in the high nibble), a 16-entry fp32 table, one scale per blocksize flat
// elements: fp32 absmax, or uint8 codes decoded as nested_code[u] * nested_absmax[b / nested_blocksize]
// + nested_offset (double quantization). Decoded values are rounded to weight_dtype, the dtype
// bitsandbytes dequantizes to.
struct Packed4bit {
  at::Tensor codes, absmax, code_table;
  std::optional<at::Tensor> nested_absmax, nested_code;
  int64_t blocksize, nested_blocksize;
  double nested_offset;
  at::ScalarType weight_dtype;
  int64_t out_features, in_features;

  // Raises (naming the argument) on a layout that does not match the shape.
  void check() const;
};

class QuantizedPerturbedWeight {
 public:
  // As PerturbedWeight: round_to is the compute dtype (fp32, bf16 or fp16); grain_elements about this
  // many chunk elements per parallel task.
  QuantizedPerturbedWeight(const Packed4bit& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                           double scaling, uint64_t seed, at::ScalarType round_to, int64_t grain_elements);

  // chunk[i] = deq(W) row (row0 + i) + s*B@A + eps; row_scale[i] from the same pass (forward).
  void build_with_new_scale(int64_t row0, at::Tensor& chunk, float sigma, float* row_scale) const;
  // With the forward's row scales (backward); fold_lora false leaves s*B@A out.
  void build_with_saved_scale(int64_t row0, at::Tensor& chunk, const float* row_scale, bool fold_lora) const;

 private:
  void build_rows(int64_t row0, at::Tensor& chunk, const ChunkRowScales& scales, bool fold_lora) const;
  // dst = deq(W) row `row` in fp32 (rounded through weight_dtype).
  void decode_row(int64_t row, float* dst) const;
  float block_scale(int64_t block) const;

  Packed4bit weight_;
  const uint8_t* codes_;
  const float* absmax_f32_;    // null when double-quantized
  const uint8_t* absmax_u8_;   // the absmax codes when double-quantized
  const float* nested_absmax_;
  const float* nested_code_;
  float nested_offset_;
  float table_[16];
  at::Tensor lora_A_;          // fp32
  at::Tensor lora_B_scaled_;   // s * B, fp32
  uint64_t seed_;
  at::ScalarType round_to_;
  int64_t grain_elements_;
};

}  // namespace flatlora
