// Branch-free float log / sin / cos for the Box-Muller transform, written so loops that call them
// auto-vectorise (glibc's vector libm is only used under -ffast-math, which we do not want).
//
// Accuracy is ~1-2 ulp on the ranges Box-Muller feeds them (log on [1e-7, 1], sincos on [0, 2pi]),
// which keeps the normals within ~1e-6 of the torch reference.
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

// a * b + c through double: the double product of two floats is exact, so this is a fused
// multiply-add up to a rare double rounding. It is the generator's definition in every ISA and every
// build (an FMA instruction where -march enables it would move a normal by an ulp now and then).
static inline float multiply_add(float a, float b, float c) {
  return static_cast<float>(static_cast<double>(a) * b + c);
}

// kFused: one FMA instruction (single rounding) instead. The generator uses it (kFused =
// FLATLORA_ISA_HAS_FMA, set by the isa_*.cpp files; the double form's conversions were most of the
// Box-Muller loop) only where it returns the same float as multiply_add on every input the generator
// can produce: proved below where the exact result fits 53 bits (both forms then round once), and
// checked exhaustively for the square root's correction (box_muller_mismatches in cpu_kernels.h,
// run by tests/test_cpp_backend.py over all 2^31 uniforms). kFused = false is the definition.
template <bool kFused>
static inline float multiply_add_as(float a, float b, float c) {
  if constexpr (kFused) {
    return __builtin_fmaf(a, b, c);
  } else {
    return multiply_add(a, b, c);
  }
}

// sqrt(v) for v >= 0, without std::sqrt: GCC wraps that in an errno branch (to libm's sqrtf) that
// blocks vectorisation unless -fno-math-errno is on the command line (a pragma does not reach it).
// An rsqrt guess from the exponent bits, two Newton steps (rel. error < 5e-6), then one residual
// correction with FMA, which squares that error: within 1 ulp of the correctly rounded root on every
// float checked in [1e-30, 32] (exact on almost all), and 0 at 0.
template <bool kFused>
static inline float sqrt_nonnegative(float v) {
  const float safe = v > 1e-30f ? v : 1e-30f;  // v = 0 would make the rsqrt guess infinite
  float y = bits_float(0x5F3759DFu - (float_bits(safe) >> 1));
  y = y * (1.5f - 0.5f * safe * y * y);
  y = y * (1.5f - 0.5f * safe * y * y);
  const float root = v * y;
  // The residual v - root^2 is exact in double (v: 24 bits, root^2: 48 bits, same binade to one
  // bit). The correction's sum spans ~64 bits and could round twice in general; on the radii
  // -2 log u1 of the generator's 2^31 uniforms it does not (the exhaustive check).
  return multiply_add_as<kFused>(0.5f * y, multiply_add_as<kFused>(-root, root, v), root);
}

// Natural log of a positive, normal, finite x.
static inline float log_positive(float x) {
  const uint32_t bits = float_bits(x);
  // x = m * 2^e with m in [sqrt(1/2), sqrt(2)), found with integer ops only: subtracting the bits of
  // sqrt(1/2) makes the exponent field count from there. (An FP select here would make GCC compute
  // both sides, division included.)
  const int32_t e = static_cast<int32_t>(bits - 0x3F3504F3u) >> 23;
  const float m = bits_float(bits - static_cast<uint32_t>(e) * (1u << 23));
  // log m = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172: the odd series to s^9 is exact to 1e-9.
  const float s = (m - 1.0f) / (m + 1.0f);
  const float s2 = s * s;
  const float series = 1.0f / 3 + s2 * (1.0f / 5 + s2 * (1.0f / 7 + s2 * (1.0f / 9)));
  const float log_m = 2.0f * s + 2.0f * s * s2 * series;
  // ln 2 split in two so that e * ln2_hi is exact.
  const float ef = static_cast<float>(e);
  return ef * 0.693145751953125f + (ef * 1.428606765330187e-06f + log_m);
}

// (cos t, sin t) for t in [0, 2pi] (any moderate t works; accuracy degrades for huge |t|).
template <bool kFused>
static inline void sincos_small(float t, float* cos_out, float* sin_out) {
  // Quadrant q = round(t / (pi/2)); y = t - q*pi/2 in [-pi/4, pi/4], pi/2 split in three parts (FMA).
  // Adding and subtracting 1.5 * 2^23 rounds to nearest in any SIMD width (nearbyint needs SSE4.1).
  const float q = (t * 0.63661977f + 12582912.0f) - 12582912.0f;
  // Each step's exact result fits 53 bits (q = 0 leaves y alone): (1) t and q*pi/2_hi are multiples
  // of 2^-24 and |y| < 1, so y fits even a float; (2) y is a multiple of 2^-24, q*pi/2_mid one of
  // 2^-48, |sum| < 1; (3) y's lowest bit is at least 2^-51 (|y| > 2^-28 whenever q > 0), q*pi/2_lo's
  // 2^-73: exact in double when |y| < 2^-20, and above that the term is < 1/16 ulp of y, so both
  // forms return y. So a fused multiply-add gives multiply_add's float.
  float y = multiply_add_as<kFused>(-q, 1.5707963705062866f, t);
  y = multiply_add_as<kFused>(-q, -4.371138828673793e-08f, y);
  y = multiply_add_as<kFused>(-q, -1.7151245100058819e-15f, y);
  const float y2 = y * y;
  // Taylor series; on |y| <= pi/4 the first omitted terms are below 2e-9.
  const float sin_y =
      y + y * y2 * (-1.0f / 6 + y2 * (1.0f / 120 + y2 * (-1.0f / 5040 + y2 * (1.0f / 362880))));
  const float cos_y =
      1.0f + y2 * (-0.5f + y2 * (1.0f / 24 + y2 * (-1.0f / 720 + y2 * (1.0f / 40320 + y2 * (-1.0f / 3628800)))));
  // Rotate by quadrant * pi/2: swap for odd quadrants, then signs (written as arithmetic, not
  // branches, so the caller's loop stays vectorisable).
  const int quadrant = static_cast<int>(q) & 3;
  const bool swap = (quadrant & 1) != 0;
  const float cos_sign = 1.0f - static_cast<float>((quadrant + 1) & 2);  // -1 in quadrants 1, 2
  const float sin_sign = 1.0f - static_cast<float>(quadrant & 2);        // -1 in quadrants 2, 3
  *cos_out = cos_sign * (swap ? sin_y : cos_y);
  *sin_out = sin_sign * (swap ? cos_y : sin_y);
}

}  // namespace flatlora
