// Philox4x32-10 on a register of counters at once (same bits as philox.h, which stays the
// definition). GCC auto-vectorises the scalar version, but widens every 32x32->64 product through
// lane-crossing shuffles; here each product is two unsigned 32x32->64 multiplies (even and odd
// lanes) plus lane swaps and gathers. One template for every width: an ISA supplies its vector type
// and eight operations as a `Simd` struct (philox_avx2.h, philox_avx512.h).
#pragma once

#include <cstdint>

#include "philox.h"

namespace flatlora {

// kVectors groups of Simd::kLanes counters, (ctr_lo + 0 .. kLanes*kVectors - 1, ctr_hi, 0, 0), under
// key (key_lo, key_hi); out[v][c] holds output c of counters ctr_lo + kLanes*v .. + kLanes - 1. The
// groups are independent, so interleaving them hides the multiply latency of each round.
template <typename Simd, int kVectors>
static inline void philox4x32_10_simd(uint32_t ctr_lo, uint32_t ctr_hi, uint32_t key_lo, uint32_t key_hi,
                                      typename Simd::Vec (*out)[4]) {
  using Vec = typename Simd::Vec;
  const Vec round_a = Simd::set1(kPhiloxRoundA);
  const Vec round_b = Simd::set1(kPhiloxRoundB);
  const Vec first = Simd::add(Simd::set1(ctr_lo), Simd::iota());
  Vec c0[kVectors], c1[kVectors], c2[kVectors], c3[kVectors];
  for (int v = 0; v < kVectors; ++v) {
    c0[v] = Simd::add(first, Simd::set1(static_cast<uint32_t>(Simd::kLanes * v)));
    c1[v] = Simd::set1(ctr_hi);
    c2[v] = Simd::set1(0);
    c3[v] = Simd::set1(0);
  }
  uint32_t k0 = key_lo, k1 = key_hi;
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const Vec key0 = Simd::set1(k0);
    const Vec key1 = Simd::set1(k1);
    for (int v = 0; v < kVectors; ++v) {
      // hi / lo halves of multiplier * x from two unsigned 32x32->64 multiplies: even lanes directly,
      // odd lanes after swapping each pair of 32-bit lanes (a shuffle, not a shift: on Intel the
      // 512-bit multiplies and shifts share one port); the halves are then gathered per lane
      // (Simd::high_halves / low_halves). No 32-bit mullo: on Intel it is two multiply uops.
      const Vec prod_b_even = Simd::mul_even(c2[v], round_b);
      const Vec prod_b_odd = Simd::mul_even(Simd::swap_pairs(c2[v]), round_b);
      const Vec prod_a_even = Simd::mul_even(c0[v], round_a);
      const Vec prod_a_odd = Simd::mul_even(Simd::swap_pairs(c0[v]), round_a);
      const Vec hi_b = Simd::high_halves(prod_b_even, prod_b_odd);
      const Vec hi_a = Simd::high_halves(prod_a_even, prod_a_odd);
      const Vec lo_b = Simd::low_halves(prod_b_even, prod_b_odd);
      const Vec lo_a = Simd::low_halves(prod_a_even, prod_a_odd);
      c0[v] = Simd::bit_xor(Simd::bit_xor(hi_b, c1[v]), key0);
      c2[v] = Simd::bit_xor(Simd::bit_xor(hi_a, c3[v]), key1);
      c1[v] = lo_b;
      c3[v] = lo_a;
    }
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  for (int v = 0; v < kVectors; ++v) {
    out[v][0] = c0[v];
    out[v][1] = c1[v];
    out[v][2] = c2[v];
    out[v][3] = c3[v];
  }
}

}  // namespace flatlora
