// Philox4x32-10 exactly as Triton's tl.randint4x computes it (see flatlora_kernels/noise.py).
//
// Written as straight-line uint32 code with uint64 products so that a loop calling it over
// consecutive counters auto-vectorises (vpmuludq on AVX2); keep it branch-free.
#pragma once

#include <cstdint>

namespace flatlora {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;  // multiplies c0
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;  // multiplies c2
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

struct PhiloxOut {
  uint32_t c0, c1, c2, c3;
};

// Counter (ctr_lo, ctr_hi, 0, 0), key (key_lo, key_hi).
static inline PhiloxOut philox4x32_10(uint32_t ctr_lo, uint32_t ctr_hi, uint32_t key_lo, uint32_t key_hi) {
  uint32_t c0 = ctr_lo, c1 = ctr_hi, c2 = 0, c3 = 0;
  uint32_t k0 = key_lo, k1 = key_hi;
#pragma GCC unroll 10
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint64_t prod_b = static_cast<uint64_t>(kPhiloxRoundB) * c2;
    const uint64_t prod_a = static_cast<uint64_t>(kPhiloxRoundA) * c0;
    const uint32_t n0 = static_cast<uint32_t>(prod_b >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(prod_a >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(prod_b);
    c3 = static_cast<uint32_t>(prod_a);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return {c0, c1, c2, c3};
}

}  // namespace flatlora
