// AVX-512 pv_int8 V quantizer (see QuantizeVParams in cpu_kernels.h): one pass for the channel
// maxima, one for the quantized values, per (b, h), 16 channels per vector.
#include "avx512_common.h"

namespace binformer::cpu::detail {

void quantize_v_int8_avx512(const QuantizeVParams& p) {
  const int dv = p.dv;
  const size_t es = dtype_size(p.v_dtype);
  parallel_for(p.B * p.H, grain_for_work(p.B * p.H, 2.0 * double(p.B * p.H) * double(p.N) * dv),
               [&](int64_t bh_begin, int64_t bh_end) {
    alignas(64) float dq_pad[kMaxHeadDim];
    for (int64_t bh = bh_begin; bh < bh_end; ++bh) {
      const int64_t b = bh / p.H, h = bh % p.H;
      const char* head = static_cast<const char*>(p.v) + (b * p.v_stride[0] + h * p.v_stride[1]) * es;
      for (int c = 0; c < dv; c += 16) {
        const __mmask16 lanes = first_lanes16(dv - c);
        __m512 vmax = _mm512_setzero_ps();
        __mmask16 nan = 0;
        for (int64_t n = 0; n < p.N; ++n) {
          const __m512 a = _mm512_abs_ps(load16_as_float(head + (n * p.v_stride[2] + c) * es, p.v_dtype, lanes));
          nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
          vmax = _mm512_max_ps(vmax, a);
        }
        vmax = _mm512_mask_mov_ps(vmax, nan, _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN()));
        const __m512 dq = _mm512_div_ps(vmax, _mm512_set1_ps(127.0f));
        _mm512_store_ps(dq_pad + c, dq);
        _mm512_mask_storeu_ps(p.dequant + bh * dv + c, lanes, dq);
      }
      int8_t* out = p.v_q + bh * p.N * dv;
      for (int64_t n = 0; n < p.N; ++n)
        for (int c = 0; c < dv; c += 16) {
          const __mmask16 lanes = first_lanes16(dv - c);
          const __m512 x = load16_as_float(head + (n * p.v_stride[2] + c) * es, p.v_dtype, lanes);
          __m512 r = _mm512_roundscale_ps(_mm512_div_ps(x, _mm512_load_ps(dq_pad + c)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          r = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(r, r, _CMP_ORD_Q), r);  // NaN -> 0
          r = _mm512_min_ps(_mm512_max_ps(r, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(127.0f));
          _mm_mask_storeu_epi8(out + n * dv + c, lanes, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(r)));
        }
    }
  });
}

}  // namespace binformer::cpu::detail
