// Exact host conversions between fp16 / bf16 / fp32 bit patterns and doubles, written out by
// hand so that test references share no code with the kernels. Host-only, no CUDA headers (also
// used by the host emulator in tests/cuda/emulation).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace binformer::test {

// Exact value of an IEEE binary16 pattern.
inline double half_bits_to_double(uint16_t h) {
  const int sign = h >> 15, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  double v;
  if (exponent == 0x1f) {
    v = mantissa ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  } else if (exponent == 0) {
    v = std::ldexp(double(mantissa), -24);
  } else {
    v = std::ldexp(double(mantissa + 1024), exponent - 25);
  }
  return sign ? -v : v;
}

// Exact value of a bfloat16 pattern (the upper half of an fp32).
inline double bf16_bits_to_double(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return double(f);
}

inline double fp32_bits_to_double(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return double(f);
}

// Round-to-nearest-even conversions used to build fp16 / bf16 inputs on the host.
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline uint16_t float_to_half_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return uint16_t(sign | 0x7e00u);
  if (abs >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {                                  // below 2^-14: subnormal or zero
    // value = abs_float; subnormal step is 2^-24.
    float af;
    std::memcpy(&af, &abs, 4);
    const float scaled = af * 16777216.0f;  // exact multiply by 2^24
    const uint32_t m = uint32_t(std::nearbyint(scaled));  // ties to even (default rounding)
    return uint16_t(sign | m);
  }
  const uint32_t mantissa = abs & 0x7fffffu;
  const int exponent = int(abs >> 23) - 127 + 15;
  uint32_t h = (uint32_t(exponent) << 10) | (mantissa >> 13);
  const uint32_t rest = mantissa & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return uint16_t(sign | h);
}

}  // namespace binformer::test
