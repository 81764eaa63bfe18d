// AVX-512 helpers shared by the *_avx512.cpp translation units. Include only from those files
// (they are compiled with AVX-512 flags); everything here has internal linkage.
#pragma once
// GCC 12 reports -W(maybe-)uninitialized inside its own intrinsic headers (the deliberately
// undefined _mm512_undefined_* pass-through operands of unmasked operations); the pragmas must
// precede the inclusion of those headers.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

#include "internal.h"

namespace binformer::cpu::detail {
namespace {

inline __mmask16 first_lanes16(int64_t count) {
  return count >= 16 ? __mmask16(0xffff) : count <= 0 ? __mmask16(0) : __mmask16((1u << count) - 1u);
}

// 16 elements (fp32/fp16/bf16) from `src` as fp32; lanes outside `lanes` read as 0.
inline __m512 load16_as_float(const void* src, DType dtype, __mmask16 lanes) {
  switch (dtype) {
    case DType::kFloat16:
      return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes, src));
    case DType::kBFloat16:
      return _mm512_castsi512_ps(
          _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, src)), 16));
    default:
      return _mm512_maskz_loadu_ps(lanes, src);
  }
}

// fp32 -> bf16, round to nearest even, NaN stays NaN (quiet). Works without AVX512_BF16.
inline __m256i float_to_bf16_rne(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(bits, _mm512_set1_epi32(0x400000)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

// Stores 16 fp32 values as dtype (fp32/fp16/bf16, round to nearest even) to the first `lanes`.
inline void store16_from_float(void* dst, DType dtype, __m512 x, __mmask16 lanes) {
  switch (dtype) {
    case DType::kFloat16:
      _mm256_mask_storeu_epi16(dst, lanes, _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      break;
    case DType::kBFloat16:
      _mm256_mask_storeu_epi16(dst, lanes, float_to_bf16_rne(x));
      break;
    default:
      _mm512_mask_storeu_ps(dst, lanes, x);
      break;
  }
}

// 2^x for x <= 0 (anything above stays accurate up to 2^127) and x not -inf (see exp2_ps):
// x = n + f with n = round(x), f in [-0.5, 0.5], 2^f from a polynomial, times 2^n by vscalefps
// (very negative x gives 0; results below 2^-126 may be subnormal; NaN stays NaN).
// Polynomials: relative-error least-squares fits of 2^f on [-0.5, 0.5], refined by reweighting
// towards minimax; max relative error with fp32 Horner evaluation:
//   degree 6: 7.9e-8 (fp32 results), degree 4: 2.7e-6 (P that is then rounded to 8 bits).
template <int kDegree = 6>
inline __m512 exp2_finite_ps(__m512 x) {
  static_assert(kDegree == 6 || kDegree == 4, "fitted degrees: 4, 6");
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);  // exact
  __m512 poly;
  if constexpr (kDegree == 6) {
    poly = _mm512_set1_ps(1.5345800e-04f);
    poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(1.3399932e-03f));
    poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(9.6184890e-03f));
    poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(5.5503288e-02f));
    poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(2.4022647e-01f));
    poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(6.9314721e-01f));
    poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(1.0f));
  } else {
    poly = _mm512_set1_ps(9.57009383e-03f);
    poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(5.59178628e-02f));
    poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(2.40247443e-01f));
    poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(6.93121791e-01f));
    poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(9.99999285e-01f));
  }
  return _mm512_scalef_ps(poly, n);
}

// 2^x with -inf -> exactly 0: -inf would make f = -inf - (-inf) = NaN, so x is first clamped to
// -160 (2^-160 * p rounds to 0). vmaxps returns its second operand when either is NaN: x comes
// second, so a NaN stays NaN.
template <int kDegree = 6>
inline __m512 exp2_ps(__m512 x) {
  return exp2_finite_ps<kDegree>(_mm512_max_ps(_mm512_set1_ps(-160.0f), x));
}

}  // namespace
}  // namespace binformer::cpu::detail
