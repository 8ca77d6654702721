// The 4-bit chunk builder: per group of kFoldRows rows, while they sit in L1, decode the codes into
// fp32 rows (rounded through the dequantized dtype), add the rank-r update, take the norms, add the
// noise, round to the compute dtype. The steps after the decode are the dense builder's, through the
// same ISA kernels (cpu_kernels.h), so a chunk equals PerturbedWeight's chunk of deq(W) bit for bit.
#include "quantized_chunk.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "cpu_kernels.h"
#include "normal_stream.h"
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

void QuantizedPerturbedWeight::build_rows(int64_t row0, at::Tensor& chunk, float sigma, const float* saved_scale,
                                          float* new_scale, bool fold_lora) const {
  const int64_t rows = chunk.size(0);
  const int64_t k = chunk.size(1);
  const int64_t rank = lora_A_.size(0);
  const bool bf16_chunk = chunk.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16_chunk == (round_to_ == at::kBFloat16) && (bf16_chunk || chunk.scalar_type() == at::kFloat),
              "flatlora 4-bit: a chunk is bf16 for bf16 compute, fp32 otherwise");
  const float* lora_A = lora_A_.data_ptr<float>();
  const float* lora_B = lora_B_scaled_.data_ptr<float>() + row0 * rank;
  const float sqrt_k = static_cast<float>(std::sqrt(static_cast<double>(k)));
  float* chunk_f32 = bf16_chunk ? nullptr : chunk.data_ptr<float>();
  uint16_t* chunk_bf16 = bf16_chunk ? reinterpret_cast<uint16_t*>(chunk.data_ptr<c10::BFloat16>()) : nullptr;
  const CpuKernels& kernels = cpu_kernels();
  const int64_t grain = std::max<int64_t>(1, grain_elements_ / k);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(bf16_chunk ? kFoldRows * k : 0);
    for (int64_t group = begin; group < end; group += kFoldRows) {
      const int64_t count = std::min(kFoldRows, end - group);
      float* block = bf16_chunk ? scratch.data() : chunk_f32 + group * k;
      for (int64_t r = 0; r < count; ++r) decode_row(row0 + group + r, block + r * k);
      if (fold_lora) kernels.add_low_rank_rows(lora_B + group * rank, lora_A, rank, k, count, block);
      for (int64_t r = 0; r < count; ++r) {
        const int64_t i = group + r;
        float* row = block + r * k;
        float scale;
        if (saved_scale != nullptr) {
          scale = saved_scale[i];
        } else {
          scale = sigma * static_cast<float>(std::sqrt(kernels.row_squared_norm(row, k))) / sqrt_k;
          new_scale[i] = scale;
        }
        if (scale != 0.0f) add_scaled_normal_row(seed_, row0 + i, k, scale, row);  // sigma = 0: exactly LoRA
        if (round_to_ == at::kHalf) {
          for (int64_t j = 0; j < k; ++j) row[j] = static_cast<float>(static_cast<c10::Half>(row[j]));
        }
        if (bf16_chunk) kernels.round_to_bfloat16(row, k, chunk_bf16 + i * k);
      }
    }
  });
}

void QuantizedPerturbedWeight::build_with_new_scale(int64_t row0, at::Tensor& chunk, float sigma,
                                                    float* row_scale) const {
  build_rows(row0, chunk, sigma, /*saved_scale=*/nullptr, row_scale, /*fold_lora=*/true);
}

void QuantizedPerturbedWeight::build_with_saved_scale(int64_t row0, at::Tensor& chunk, const float* row_scale,
                                                      bool fold_lora) const {
  build_rows(row0, chunk, 0.0f, row_scale, /*new_scale=*/nullptr, fold_lora);
}

}  // namespace flatlora
