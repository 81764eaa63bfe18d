// 2^x on the FMA pipes (pure fp32 arithmetic; shared by the kernels and the host emulator).
#pragma once

namespace binformer::cuda::fwd {

// 2^x on the FMA pipes (FlashAttention-4's trick to take exp work off the MUFU unit): split x
// into round(x) + f with f in [-0.5, 0.5], evaluate the degree-5 Taylor polynomial of 2^f
// (relative error < 3e-6 on that interval) and add round(x) to the exponent field.
// x <= -127 (and -inf) gives exactly 0 like ex2.approx.ftz; about 14 FMA-pipe instructions.
__device__ __forceinline__ float ex2_poly(float x) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: x + kMagic rounds x to an integer
  const float xc = fmaxf(x, -127.0f);
  const float shifted = xc + kMagic;
  const float f = xc - (shifted - kMagic);
  float p = fmaf(1.3333558146e-3f, f, 9.6181291076e-3f);  // ln2^5/120, ln2^4/24
  p = fmaf(p, f, 5.5504108664e-2f);                         // ln2^3/6
  p = fmaf(p, f, 2.4022650695e-1f);                         // ln2^2/2
  p = fmaf(p, f, 6.9314718056e-1f);                         // ln2
  p = fmaf(p, f, 1.0f);
  // __float_as_int(shifted) = 0x4B400000 + round(x); move that integer into the exponent field.
  const int bits = __float_as_int(p) + ((__float_as_int(shifted) - 0x4B400000) << 23);
  return x <= -127.0f ? 0.0f : __int_as_float(bits);
}

}  // namespace binformer::cuda::fwd
