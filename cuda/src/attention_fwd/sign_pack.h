// Sign packing shared by the K pre-pass and the in-kernel Q packing.
// Layout (SPEC.md section 2): bit = !(x < 0) (+0, -0 and NaN give 1), element c of a row goes to
// bit c % 32 of word c / 32, pad bits are 0.
#pragma once
#include <cstdint>

#include "binformer/params.h"

namespace binformer::cuda::fwd {

// x < 0 on the raw bits, without a float conversion: the negative non-NaN encodings are exactly
// the range (sign bit, +0 magnitude] .. -inf, i.e. 0x8001..0xFC00 for fp16, 0x8001..0xFF80 for
// bf16 and 0x80000001..0xFF800000 for fp32 (-0 and negative NaNs excluded).
__device__ __forceinline__ uint32_t sign_bit_f16(uint32_t h) {
  return ((h - 0x8001u) & 0xFFFFu) > 0x7BFFu ? 1u : 0u;
}
__device__ __forceinline__ uint32_t sign_bit_bf16(uint32_t h) {
  return ((h - 0x8001u) & 0xFFFFu) > 0x7F7Fu ? 1u : 0u;
}
__device__ __forceinline__ uint32_t sign_bit_f32(uint32_t u) {
  return (u - 0x80000001u) > 0x7F7FFFFFu ? 1u : 0u;
}

// Bits 15 and 31 of a word of two 16-bit elements: set where that element is < 0, i.e. sign set,
// magnitude nonzero (-0 is not negative) and not NaN (magnitude above the infinity encoding), on
// both halves at once: magnitudes are < 0x8000, so the adds never carry into the other half.
template <bool kBF16>
__device__ __forceinline__ uint32_t negative_pair_bits(uint32_t w) {
  constexpr uint32_t kNanAdd = kBF16 ? 0x007F007Fu : 0x03FF03FFu;  // mag + this >= 0x8000 <=> NaN
  const uint32_t mag = w & 0x7FFF7FFFu;
  return w & (mag + 0x7FFF7FFFu) & ~(mag + kNanAdd) & 0x80008000u;
}

// Signs of 8 consecutive 16-bit elements held in a uint4 (element e in bits 16*(e%2) of word e/2):
// ~5 instructions per pair instead of ~5 per element (the per-element test of sign_bit_f16).
template <bool kBF16>
__device__ __forceinline__ uint32_t signs_of_8x16(uint4 v) {
  // element 2i at bit 2i, element 2i + 1 at bit 16 + 2i
  const uint32_t n = (negative_pair_bits<kBF16>(v.x) >> 15) | (negative_pair_bits<kBF16>(v.y) >> 13) |
                     (negative_pair_bits<kBF16>(v.z) >> 11) | (negative_pair_bits<kBF16>(v.w) >> 9);
  return ~(n | (n >> 15)) & 0xFFu;
}

__device__ __forceinline__ uint32_t signs_of_4x32(uint4 v) {
  return sign_bit_f32(v.x) | (sign_bit_f32(v.y) << 1) | (sign_bit_f32(v.z) << 2) |
         (sign_bit_f32(v.w) << 3);
}

// Signs of elements [8c, 8c + 8) of one row (8c < d; d is a multiple of 8, so the 8 bits never
// reach past the row): the byte c of the packed row. One 16-byte load for 16-bit rows (two for
// fp32) when vec_ok, so that the packing loops issue all of their loads back to back.
__device__ __forceinline__ uint32_t load_sign_byte(const void* row, DType dtype, int c,
                                                   bool vec_ok) {
  if (dtype == DType::kBits) {
    return (__ldg(static_cast<const uint32_t*>(row) + c / 4) >> (8 * (c % 4))) & 0xFFu;
  }
  if (dtype == DType::kFloat32) {
    const uint32_t* p = static_cast<const uint32_t*>(row) + 8 * c;
    if (vec_ok) {
      const uint4 lo = __ldg(reinterpret_cast<const uint4*>(p));
      const uint4 hi = __ldg(reinterpret_cast<const uint4*>(p) + 1);
      return signs_of_4x32(lo) | (signs_of_4x32(hi) << 4);
    }
    uint32_t bits = 0;
#pragma unroll
    for (int e = 0; e < 8; ++e) bits |= sign_bit_f32(__ldg(p + e)) << e;
    return bits;
  }
  const bool bf16 = dtype == DType::kBFloat16;
  const uint16_t* p = static_cast<const uint16_t*>(row) + 8 * c;
  if (vec_ok) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    return bf16 ? signs_of_8x16<true>(v) : signs_of_8x16<false>(v);
  }
  uint32_t bits = 0;
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const uint32_t h = __ldg(p + e);
    bits |= (bf16 ? sign_bit_bf16(h) : sign_bit_f16(h)) << e;
  }
  return bits;
}

}  // namespace binformer::cuda::fwd
