// quantize_v_int8 (pv_int8's V quantizer) against the formula it must repeat bit for bit:
// dequant = amax|V| / 127 (NaN if any V is NaN), v_q = clamp(round_half_even(V / dequant),
// -127, 127), NaN -> 0; fp16 / bf16 inputs widened exactly; strided heads.
#include <cmath>

#include "test_util.h"

namespace bt {
namespace {

class QuantizeV : public ::testing::TestWithParam<std::string> {};

TEST_P(QuantizeV, MatchesFormulaWithSpecialValues) {
  BT_SKIP_IF_NO_ISA(GetParam());
  IsaScope scope(GetParam());
  std::mt19937_64 rng(31);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  for (DType dtype : {DType::kFloat32, DType::kFloat16, DType::kBFloat16})
    for (int dv : {1, 16, 40, 64, 256}) {
      const int64_t B = 2, H = 3, N = 37, pad = 5;  // rows of dv + pad elements: strided heads
      const int64_t row = dv + pad;
      std::vector<uint16_t> v16(size_t(B * H * N * row));
      std::vector<float> v32(v16.size()), widened(v16.size());
      for (size_t i = 0; i < v32.size(); ++i) {
        float x = normal(rng);
        const int64_t c = int64_t(i % size_t(row)), bh = int64_t(i / size_t(row * N));
        if (c == 3 % dv && bh == 1) x = 0.0f;                                       // an all-zero channel
        if (c == 0 && bh == 2 && i % 7 == 0) x = std::numeric_limits<float>::quiet_NaN();  // NaN channel
        if (c == dv - 1 && bh == 3 && i % 11 == 0) x = -INFINITY;                  // inf channel
        if (c == 1 % dv && bh == 4) x *= 1e-39f;                                  // subnormal channel
        v32[i] = x;
        v16[i] = dtype == DType::kFloat16 ? to_half(x) : to_bf16(x);
        widened[i] = dtype == DType::kFloat32 ? x
                     : dtype == DType::kFloat16 ? from_half(v16[i])
                                                : from_bf16(v16[i]);
      }
      binformer::cpu::QuantizeVParams p;
      p.B = B; p.H = H; p.N = N; p.dv = dv;
      p.v = dtype == DType::kFloat32 ? static_cast<const void*>(v32.data()) : static_cast<const void*>(v16.data());
      p.v_dtype = dtype;
      p.v_stride[0] = H * N * row; p.v_stride[1] = N * row; p.v_stride[2] = row;
      std::vector<int8_t> q(size_t(B * H * N * dv), 99);
      std::vector<float> dq(size_t(B * H * dv));
      p.v_q = q.data(); p.dequant = dq.data();
      binformer::cpu::quantize_v_int8(p);
      for (int64_t bh = 0; bh < B * H; ++bh)
        for (int c = 0; c < dv; ++c) {
          float amax = 0.0f;
          bool nan = false;
          for (int64_t n = 0; n < N; ++n) {
            const float a = std::fabs(widened[size_t((bh * N + n) * row + c)]);
            nan |= std::isnan(a);
            amax = std::max(amax, a);
          }
          const float want_dq = nan ? std::numeric_limits<float>::quiet_NaN() : amax / 127.0f;
          const float got_dq = dq[size_t(bh * dv + c)];
          ASSERT_TRUE(std::isnan(want_dq) ? std::isnan(got_dq) : got_dq == want_dq) << bh << " " << c;
          for (int64_t n = 0; n < N; ++n) {
            float r = std::nearbyint(widened[size_t((bh * N + n) * row + c)] / want_dq);
            if (std::isnan(r)) r = 0.0f;
            const int8_t want = int8_t(std::min(127.0f, std::max(-127.0f, r)));
            ASSERT_EQ(q[size_t((bh * N + n) * dv + c)], want) << GetParam() << " dtype " << int(dtype) << " dv " << dv;
          }
        }
    }
}

INSTANTIATE_TEST_SUITE_P(Isa, QuantizeV, ::testing::Values("scalar", "avx512"));

}  // namespace
}  // namespace bt
