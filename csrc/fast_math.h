// Branch-free float log / sin / cos for the Box-Muller transform, written so loops that call them
// auto-vectorise (glibc's vector libm is only used under -ffast-math, which we do not want). Only
// IEEE operations with one rounding each (+ - * /, sqrt, FMA, conversions; no reciprocal estimates,
// whose bits differ between AVX2 and AVX-512), so every ISA build computes the same floats.
//
// Accuracy is ~1 ulp on the ranges Box-Muller feeds them (log on [1e-7, 1], sincos on [0, 2pi]),
// which keeps the normals within 1e-6 of the double-precision definition (tests/test_cpp_backend.py).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace flatlora {

static inline uint32_t float_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}

static inline float bits_float(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

// a * b + c rounded once: an FMA instruction where the target has one, libm's correctly rounded fmaf
// where it has not (the scalar x86-64 build). Either way the IEEE result, so every ISA build computes
// the same floats; GCC vectorises it. (setup.py's -ffp-contract=off keeps GCC from fusing a plain
// a * b + c itself, which it otherwise does wherever the target has FMA: floats would depend on it.)
static inline float fused_multiply_add(float a, float b, float c) { return __builtin_fmaf(a, b, c); }

// -2 log x for a positive, normal, finite x: Box-Muller's squared radius. (The factor -2 is folded
// into the constants, an exact power-of-two scaling, so it costs no multiply.)
static inline float minus_two_log_positive(float x) {
  const uint32_t bits = float_bits(x);
  // x = m * 2^e with m in [sqrt(1/2), sqrt(2)), found with integer ops only: subtracting the bits of
  // sqrt(1/2) makes the exponent field count from there. (An FP select here would make GCC compute
  // both sides, division included.)
  const int32_t e = static_cast<int32_t>(bits - 0x3F3504F3u) >> 23;
  const float m = bits_float(bits - static_cast<uint32_t>(e) * (1u << 23));
  // log m = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172: the odd series to s^9 is exact to 1e-9.
  // (One division: the divider is a separate unit, beside the FMA pipes the rest of the loop fills.)
  const float s = (m - 1.0f) / (m + 1.0f);
  const float s2 = s * s;
  const float series = fused_multiply_add(
      s2, fused_multiply_add(s2, fused_multiply_add(s2, -4.0f / 9, -4.0f / 7), -4.0f / 5), -4.0f / 3);
  const float minus_two_log_m = fused_multiply_add(s * s2, series, -4.0f * s);  // -4 (s + s^3/3 + ...)
  // ln 2 split in two so that e * ln2_hi is exact.
  const float ef = static_cast<float>(e);
  return fused_multiply_add(ef, -2.0f * 0.693145751953125f,
                            fused_multiply_add(ef, -2.0f * 1.428606765330187e-06f, minus_two_log_m));
}

// (cos t, sin t) for t in [0, 2pi] (any moderate t works; accuracy degrades for huge |t|).
static inline void sincos_small(float t, float* cos_out, float* sin_out) {
  // Quadrant q = round(t / (pi/2)); y = t - q*pi/2 in [-pi/4, pi/4] by Cody-Waite with pi/2 in three
  // parts (each step one FMA). Adding 1.5 * 2^23 rounds to nearest in any SIMD width and leaves q in
  // the low mantissa bits, where the quadrant is read.
  const float q_shifted = fused_multiply_add(t, 0.63661977f, 12582912.0f);
  const float q = q_shifted - 12582912.0f;
  float y = fused_multiply_add(-q, 1.5707963705062866f, t);
  y = fused_multiply_add(-q, -4.371138828673793e-08f, y);
  y = fused_multiply_add(-q, -1.7151245100058819e-15f, y);
  const float y2 = y * y;
  // Taylor series in Horner form; on |y| <= pi/4 the first omitted terms are below 2e-9.
  const float sin_tail = fused_multiply_add(
      y2, fused_multiply_add(y2, fused_multiply_add(y2, 1.0f / 362880, -1.0f / 5040), 1.0f / 120), -1.0f / 6);
  const float sin_y = fused_multiply_add(y * y2, sin_tail, y);
  const float cos_tail = fused_multiply_add(
      y2,
      fused_multiply_add(y2, fused_multiply_add(y2, fused_multiply_add(y2, -1.0f / 3628800, 1.0f / 40320), -1.0f / 720),
                         1.0f / 24),
      -0.5f);
  const float cos_y = fused_multiply_add(y2, cos_tail, 1.0f);
  // Rotate by quadrant * pi/2: swap for odd quadrants, then flip sign bits (cos is negative in
  // quadrants 1, 2, sin in 2, 3), as integer ops so the caller's loop stays vectorisable.
  const uint32_t quadrant = float_bits(q_shifted) & 3u;
  const bool swap = (quadrant & 1u) != 0;
  const uint32_t cos_sign = ((quadrant + 1u) & 2u) << 30;
  const uint32_t sin_sign = (quadrant & 2u) << 30;
  *cos_out = bits_float(float_bits(swap ? sin_y : cos_y) ^ cos_sign);
  *sin_out = bits_float(float_bits(swap ? cos_y : sin_y) ^ sin_sign);
}

}  // namespace flatlora
