// The 4-bit builder: decodes the codes into fp32 rows (rounded through the dequantized dtype) for
// row_pipeline.h's pipeline, the dense builder's, so a chunk equals PerturbedWeight's chunk of deq(W)
// bit for bit.
#include "quantized_chunk.h"

#include <c10/util/Half.h>

#include <algorithm>
#include <string>

#include "cpu_kernels.h"
#include "quantized_decode.h"

namespace flatlora {

const Decode4bitKernels& decode_4bit_kernels() {
  // The generator's ISA (already checked against the CPU and FLATLORA_CPU_ISA).
  static const Decode4bitKernels& chosen = [] () -> const Decode4bitKernels& {
    const std::string isa = cpu_kernels().isa;
    const Decode4bitKernels* table = isa == "avx512" ? decode_4bit_avx512()
                                     : isa == "avx2" ? decode_4bit_avx2()
                                                     : decode_4bit_scalar();
    return table != nullptr ? *table : *decode_4bit_scalar();
  }();
  return chosen;
}

void Packed4bit::check() const {
  const char* layer = "flatlora 4-bit cpp backend";
  TORCH_CHECK(out_features > 0 && in_features > 0, layer, ": the weight must be non-empty, got ", out_features, "x",
              in_features);
  const int64_t numel = out_features * in_features;
  TORCH_CHECK(blocksize > 0, layer, ": blocksize must be positive, got ", blocksize);
  TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == at::kByte && codes.is_contiguous() &&
                  codes.numel() == (numel + 1) / 2,
              layer, ": codes must be ", (numel + 1) / 2, " contiguous CPU uint8 values, got ", codes.numel(), " ",
              codes.scalar_type());
  const int64_t blocks = (numel + blocksize - 1) / blocksize;
  TORCH_CHECK(absmax.device().is_cpu() && absmax.is_contiguous() && absmax.numel() == blocks, layer,
              ": absmax must hold ", blocks, " contiguous CPU values, got ", absmax.numel());
  TORCH_CHECK(code_table.device().is_cpu() && code_table.scalar_type() == at::kFloat && code_table.numel() == 16,
              layer, ": the code table must be 16 CPU fp32 values");
  TORCH_CHECK(weight_dtype == at::kFloat || weight_dtype == at::kBFloat16 || weight_dtype == at::kHalf, layer,
              ": the dequantized dtype must be fp32/bf16/fp16, got ", weight_dtype);
  if (nested_absmax.has_value()) {
    TORCH_CHECK(absmax.scalar_type() == at::kByte && nested_code.has_value() && nested_blocksize > 0, layer,
                ": double-quantized absmax must be uint8 codes with a nested code table and blocksize");
    TORCH_CHECK(nested_code->scalar_type() == at::kFloat && nested_code->numel() == 256 && nested_code->is_contiguous(),
                layer, ": the nested code table must be 256 contiguous fp32 values");
    const int64_t nested_blocks = (blocks + nested_blocksize - 1) / nested_blocksize;
    TORCH_CHECK(nested_absmax->scalar_type() == at::kFloat && nested_absmax->is_contiguous() &&
                    nested_absmax->numel() == nested_blocks,
                layer, ": nested absmax must be ", nested_blocks, " contiguous fp32 values, got ", nested_absmax->numel());
  } else {
    TORCH_CHECK(absmax.scalar_type() == at::kFloat, layer, ": absmax must be fp32 (or uint8 when double-quantized), got ",
                absmax.scalar_type());
  }
}

QuantizedPerturbedWeight::QuantizedPerturbedWeight(const Packed4bit& weight, const at::Tensor& lora_A,
                                                   const at::Tensor& lora_B, double scaling, uint64_t seed,
                                                   at::ScalarType round_to, int64_t grain_elements)
    : weight_(weight),
      codes_(weight.codes.data_ptr<uint8_t>()),
      absmax_f32_(weight.nested_absmax.has_value() ? nullptr : weight.absmax.data_ptr<float>()),
      absmax_u8_(weight.nested_absmax.has_value() ? weight.absmax.data_ptr<uint8_t>() : nullptr),
      nested_absmax_(weight.nested_absmax.has_value() ? weight.nested_absmax->data_ptr<float>() : nullptr),
      nested_code_(weight.nested_code.has_value() ? weight.nested_code->data_ptr<float>() : nullptr),
      nested_offset_(static_cast<float>(weight.nested_offset)),
      lora_A_(lora_A.to(at::kFloat).contiguous()),
      lora_B_scaled_(lora_B.to(at::kFloat).mul(scaling).contiguous()),
      seed_(seed),
      round_to_(round_to),
      grain_elements_(grain_elements) {
  TORCH_CHECK(grain_elements > 0, "flatlora 4-bit cpp backend: parallel_grain must be positive");
  TORCH_CHECK(round_to == at::kFloat || round_to == at::kBFloat16 || round_to == at::kHalf,
              "flatlora 4-bit cpp backend: the compute dtype must be fp32, bf16 or fp16, got ", round_to);
  std::copy_n(weight.code_table.data_ptr<float>(), 16, table_);
}

float QuantizedPerturbedWeight::block_scale(int64_t block) const {
  if (absmax_f32_ != nullptr) return absmax_f32_[block];
  // bitsandbytes: an fp32 product, then the fp32 offset added (no FMA: the build has -ffp-contract=off).
  const float scale = nested_code_[absmax_u8_[block]] * nested_absmax_[block / weight_.nested_blocksize];
  return scale + nested_offset_;
}

void QuantizedPerturbedWeight::decode_row(int64_t row, float* dst) const {
  const Decode4bitKernels& decode = decode_4bit_kernels();
  const int64_t k = weight_.in_features, blocksize = weight_.blocksize;
  const int64_t first = row * k, last = first + k;
  for (int64_t e = first; e < last;) {  // one run per absmax block (blocks may straddle rows)
    const int64_t block = e / blocksize;
    const int64_t end = std::min(last, (block + 1) * blocksize);
    decode.decode_run(codes_, e, end - e, table_, block_scale(block), dst + (e - first));
    e = end;
  }
  if (weight_.weight_dtype == at::kBFloat16) {
    decode.round_through_bfloat16(dst, k);
  } else if (weight_.weight_dtype == at::kHalf) {
    for (int64_t j = 0; j < k; ++j) dst[j] = static_cast<float>(static_cast<c10::Half>(dst[j]));
  }
}

void QuantizedPerturbedWeight::build_rows(int64_t row0, at::Tensor& chunk, const ChunkRowScales& scales,
                                          bool fold_lora) const {
  const int64_t k = chunk.size(1);
  const RowPipeline pipeline{lora_A_.data_ptr<float>(), lora_B_scaled_.data_ptr<float>(), lora_A_.size(0), seed_,
                             round_to_, std::max<int64_t>(1, grain_elements_ / k)};
  build_perturbed_rows(pipeline, row0, chunk, scales, fold_lora, [&](int64_t first, int64_t count, float* block) {
    for (int64_t r = 0; r < count; ++r) decode_row(row0 + first + r, block + r * k);
  });
}

void QuantizedPerturbedWeight::build_with_new_scale(int64_t row0, at::Tensor& chunk, float sigma,
                                                    float* row_scale) const {
  build_rows(row0, chunk, ChunkRowScales{sigma, /*saved=*/nullptr, /*fresh=*/row_scale}, /*fold_lora=*/true);
}

void QuantizedPerturbedWeight::build_with_saved_scale(int64_t row0, at::Tensor& chunk, const float* row_scale,
                                                      bool fold_lora) const {
  build_rows(row0, chunk, ChunkRowScales{/*sigma=*/0.0f, /*saved=*/row_scale, /*fresh=*/nullptr}, fold_lora);
}

}  // namespace flatlora
