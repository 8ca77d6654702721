// The noise stream's entry points, forwarded to the kernels of the ISA chosen at load time
// (cpu_kernels.h), plus that choice itself.
#include "normal_stream.h"

#include <cstdlib>
#include <stdexcept>
#include <string>

#include "cpu_kernels.h"

namespace flatlora {
namespace {

bool cpu_has(const char* level) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (std::string(level) == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (std::string(level) == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") && cpu_has("avx2");
#endif
  return std::string(level) == "scalar";
}

const CpuKernels* table_for(const std::string& level) {
  if (level == "avx512") return avx512_kernels();
  if (level == "avx2") return avx2_kernels();
  return scalar_kernels();
}

const CpuKernels& select_kernels() {
  const char* forced = std::getenv("FLATLORA_CPU_ISA");
  if (forced != nullptr && *forced != '\0') {
    const std::string level(forced);
    if (level != "scalar" && level != "avx2" && level != "avx512")
      throw std::invalid_argument("flatlora: FLATLORA_CPU_ISA must be scalar, avx2 or avx512, got '" + level + "'");
    const CpuKernels* table = table_for(level);
    if (table == nullptr || !cpu_has(level.c_str()))
      throw std::invalid_argument("flatlora: FLATLORA_CPU_ISA=" + level +
                                  " is not supported by this CPU or build; use a lower level or unset it");
    return *table;
  }
  for (const char* level : {"avx512", "avx2"}) {
    const CpuKernels* table = table_for(level);
    if (table != nullptr && cpu_has(level)) return *table;
  }
  return *scalar_kernels();
}

}  // namespace

const CpuKernels& cpu_kernels() {
  static const CpuKernels& chosen = select_kernels();  // once; a throw leaves it to retry
  return chosen;
}

void normal_row(uint64_t seed, int64_t row, int64_t in_features, float* out) {
  cpu_kernels().normal_row(seed, row, in_features, out);
}

void add_scaled_normal_row(uint64_t seed, int64_t row, int64_t in_features, float scale, float* out) {
  cpu_kernels().add_scaled_normal_row(seed, row, in_features, scale, out);
}

void philox_at(uint64_t seed, const int64_t* offsets, int64_t count, uint32_t* out) {
  cpu_kernels().philox_at(seed, offsets, count, out);
}

}  // namespace flatlora
