// pack_sign and sign_matmul against exact references (integer results: tolerance 0).
#include <algorithm>

#include "test_util.h"

namespace bt {
namespace {

class IsaTest : public ::testing::TestWithParam<std::string> {};

TEST(Isa, NamesAndOverride) {
  EXPECT_STREQ(binformer::cpu::isa_name(binformer::cpu::Isa::kScalar), "scalar");
  EXPECT_STREQ(binformer::cpu::isa_name(binformer::cpu::Isa::kAvx512), "avx512");
  {
    IsaScope scope("scalar");
    EXPECT_EQ(binformer::cpu::active_isa(), binformer::cpu::Isa::kScalar);
  }
  // This machine (Zen 4) has AVX-512 with VPOPCNTDQ; elsewhere the default may be scalar.
  std::printf("default ISA: %s\n", binformer::cpu::isa_name(binformer::cpu::active_isa()));
}

// Values that exercise the sign rule: +-0 and NaN give 1, -inf and negative subnormals 0.
float special_value(std::mt19937_64& rng) {
  std::uniform_int_distribution<int> pick(0, 15);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  switch (pick(rng)) {
    case 0: return 0.0f;
    case 1: return -0.0f;
    case 2: return std::numeric_limits<float>::quiet_NaN();
    case 3: return -std::numeric_limits<float>::quiet_NaN();  // NaN with the sign bit set: still 1
    case 4: return INFINITY;
    case 5: return -INFINITY;
    case 6: return -1e-40f;  // negative fp32 subnormal (fp16/bf16: rounds to -0 -> bit 1)
    case 7: return 1e-40f;
    default: return normal(rng);
  }
}

TEST_P(IsaTest, PackSignMatchesRule) {
  BT_SKIP_IF_NO_ISA(GetParam());
  IsaScope scope(GetParam());
  std::mt19937_64 rng(7);
  for (DType dtype : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    for (int d : {1, 7, 8, 16, 31, 32, 33, 64, 72, 100, 128, 255, 256, 300}) {
      const int64_t rows = 37;
      Tensor4 x = make_tensor({1, 1, rows, d}, dtype);
      fill(x, [&](int64_t, int64_t, int64_t, int64_t) { return special_value(rng); });
      const int W = (d + 31) / 32;
      std::vector<uint32_t> out(size_t(rows * W), 0xdeadbeefu);
      binformer::PackSignParams p{x.data(), dtype, rows, d, out.data()};
      binformer::cpu::pack_sign(p);
      for (int64_t r = 0; r < rows; ++r) {
        std::vector<double> row(static_cast<size_t>(d));
        for (int c = 0; c < d; ++c) row[size_t(c)] = x.value(0, 0, r, c);
        const auto expect = pack_row(row);  // pad bits are 0 in the reference
        for (int w = 0; w < W; ++w)
          ASSERT_EQ(out[size_t(r * W + w)], expect[size_t(w)])
              << dtype_name(dtype) << " d=" << d << " row " << r << " word " << w;
      }
    }
  }
}

TEST_P(IsaTest, SignMatmulExact) {
  BT_SKIP_IF_NO_ISA(GetParam());
  IsaScope scope(GetParam());
  std::mt19937_64 rng(11);
  struct Shape { int64_t batch, M, N; int d; bool a_bcast, b_bcast; };
  const Shape shapes[] = {{1, 1, 1, 8, false, false},   {3, 5, 7, 64, false, false},  {2, 17, 65, 72, false, false},
                          {4, 9, 130, 256, false, true}, {4, 33, 3, 40, true, false},  {1, 64, 64, 128, false, false},
                          {2, 70, 129, 32, false, false}, {5, 4, 200, 200, false, true}, {1, 3, 300, 24, false, false}};
  for (const Shape& s : shapes) {
    const int W = (s.d + 31) / 32;
    auto make_bits = [&](int64_t slices, int64_t rows) {
      std::vector<uint32_t> bits(size_t(slices * rows * W));
      std::normal_distribution<double> normal;
      for (int64_t r = 0; r < slices * rows; ++r) {
        std::vector<double> row(size_t(s.d));
        for (auto& x : row) x = normal(rng);
        const auto w = pack_row(row);
        std::copy(w.begin(), w.end(), bits.begin() + r * W);
      }
      return bits;
    };
    const auto a = make_bits(s.a_bcast ? 1 : s.batch, s.M);
    const auto b = make_bits(s.b_bcast ? 1 : s.batch, s.N);
    std::vector<int32_t> out(size_t(s.batch * s.M * s.N), -12345);
    binformer::SignMatmulParams p{a.data(), b.data(), out.data(), s.batch, s.M, s.N, s.d,
                                  s.a_bcast ? 0 : s.M * W, s.b_bcast ? 0 : s.N * W};
    binformer::cpu::sign_matmul(p);
    for (int64_t bt = 0; bt < s.batch; ++bt)
      for (int64_t m = 0; m < s.M; ++m)
        for (int64_t n = 0; n < s.N; ++n) {
          const uint32_t* ar = a.data() + (s.a_bcast ? 0 : bt * s.M * W) + m * W;
          const uint32_t* br = b.data() + (s.b_bcast ? 0 : bt * s.N * W) + n * W;
          int dot = 0;  // +1 per agreeing sign, -1 per differing one
          for (int c = 0; c < s.d; ++c) dot += (((ar[c / 32] >> (c % 32)) & 1u) == ((br[c / 32] >> (c % 32)) & 1u)) ? 1 : -1;
          ASSERT_EQ(out[size_t((bt * s.M + m) * s.N + n)], dot) << "batch " << bt << " m " << m << " n " << n << " d " << s.d;
        }
  }
}

TEST_P(IsaTest, SignMatmulThreadIndependent) {
  BT_SKIP_IF_NO_ISA(GetParam());
  IsaScope scope(GetParam());
  std::mt19937_64 rng(3);
  const int64_t batch = 3, M = 45, N = 77;
  const int d = 96, W = 3;
  std::vector<uint32_t> a(size_t(batch * M * W)), b(size_t(batch * N * W));
  for (auto& x : a) x = uint32_t(rng());
  for (auto& x : b) x = uint32_t(rng());
  std::vector<int32_t> serial(size_t(batch * M * N)), threaded(serial.size());
  binformer::SignMatmulParams p{a.data(), b.data(), serial.data(), batch, M, N, d, M * W, N * W};
  binformer::cpu::sign_matmul(p);
  install_thread_parallel_for(3);
  p.out = threaded.data();
  binformer::cpu::sign_matmul(p);
  install_serial_parallel_for();
  EXPECT_EQ(serial, threaded);
}

INSTANTIATE_TEST_SUITE_P(Isa, IsaTest, ::testing::Values("scalar", "avx512"));

}  // namespace
}  // namespace bt
