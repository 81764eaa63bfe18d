// Portable pv_int8 V quantizer (see QuantizeVParams in cpu_kernels.h).
#include <vector>

#include "internal.h"

namespace binformer::cpu::detail {

void quantize_v_int8_scalar(const QuantizeVParams& p) {
  const int dv = p.dv;
  parallel_for(p.B * p.H, grain_for_work(p.B * p.H, 2.0 * double(p.B * p.H) * double(p.N) * dv),
               [&](int64_t bh_begin, int64_t bh_end) {
    std::vector<float> amax(static_cast<size_t>(dv));
    for (int64_t bh = bh_begin; bh < bh_end; ++bh) {
      const int64_t b = bh / p.H, h = bh % p.H;
      const int64_t head = b * p.v_stride[0] + h * p.v_stride[1];
      std::fill(amax.begin(), amax.end(), 0.0f);
      for (int64_t n = 0; n < p.N; ++n)
        for (int c = 0; c < dv; ++c) {
          const float a = std::fabs(load_as_float(p.v, p.v_dtype, head + n * p.v_stride[2] + c));
          if (a > amax[c] || std::isnan(a)) amax[c] = a;  // NaN sticks (a > NaN is false)
        }
      float* dq = p.dequant + bh * dv;
      for (int c = 0; c < dv; ++c) dq[c] = amax[c] / 127.0f;
      int8_t* out = p.v_q + bh * p.N * dv;
      for (int64_t n = 0; n < p.N; ++n)
        for (int c = 0; c < dv; ++c) {
          float r = std::nearbyint(load_as_float(p.v, p.v_dtype, head + n * p.v_stride[2] + c) / dq[c]);
          if (std::isnan(r)) r = 0.0f;
          out[n * dv + c] = int8_t(std::min(127.0f, std::max(-127.0f, r)));
        }
    }
  });
}

}  // namespace binformer::cpu::detail
