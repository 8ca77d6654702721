// The ISA-specific 4-bit decoders of the quantized chunk builder (quantized_chunk.cpp), behind one
// table chosen to match the noise generator's ISA (cpu_kernels().isa, so FLATLORA_CPU_ISA forces both).
// Bodies: quantized_decode_impl.h, compiled once per ISA by the quantized_isa_*.cpp files.
#pragma once

#include <cstdint>

namespace flatlora {

struct Decode4bitKernels {
  const char* isa;
  // dst[t] = table[code(first + t)] * scale for t < count, an fp32 product (one rounding). code(e) is
  // the high nibble of byte e / 2 when e is even, the low nibble when odd (bitsandbytes' packing).
  void (*decode_run)(const uint8_t* codes, int64_t first, int64_t count, const float* table, float scale,
                     float* dst);
  // row[j] = float(bfloat16(row[j])), round to nearest even (the dequantized weight's own dtype).
  void (*round_through_bfloat16)(float* row, int64_t n);
};

// The table of the ISA the noise generator runs (cpu_kernels.h), chosen once.
const Decode4bitKernels& decode_4bit_kernels();

// One table per ISA; null where the compiler cannot target it.
const Decode4bitKernels* decode_4bit_scalar();
const Decode4bitKernels* decode_4bit_avx2();
const Decode4bitKernels* decode_4bit_avx512();

}  // namespace flatlora
