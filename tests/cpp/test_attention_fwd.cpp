// attention_fwd against the float64 reference (attention_case.h), under every ISA route.
//
// Tolerance of out[i, c] (all terms are bounds on the kernel's deviation from exact math on the
// stored inputs; E_i = sum_j P_ij |V_jc| is the natural scale of out[i, c]):
//  * fp32 arithmetic: scores are d - 2 popcount (exact) times 3-4 fp32 factors and plus the
//    bias, so each carries a relative error of a few 2^-24 of |S|, which the subtraction of the
//    row maximum turns into an absolute error of about 1e-7 (|S_ij| + |m_i|) in the exponent,
//    i.e. a relative error of P_ij; the exp polynomial adds 8e-8; fp32 sums over <= 300 keys add
//    a random-walk error well below 1e-6 E_i. Bound used: (4e-6 + 1e-6 max_j |S_ij|) E_i.
//  * out rounded to its dtype: 2^-11 |out| (fp16), 2^-8 |out| (bf16).
//  * bf16 V: the AVX-512 route rounds P to bf16 before VDPBF16PS: 2^-8 E_i.
//  * pv_int8: P quantized to steps of 1/255 of the running maximum, which is at most the final
//    maximum, so each P_ij is off by at most 0.5/255 in units of exp(S - m_final) / l_i:
//    (0.5/255) sum_j |V_jc| / l_i (V here is the dequantized int8 V, exact in the reference).
//  * plus 1e-6 absolute for values near zero.
// lse: the same exponent error: 4e-6 + 1e-6 max_j |S_ij| (absolute, natural log).
// An error in the math (a wrong bias entry, scale, mask, rounding mode or channel) gives
// deviations of order 1e-2 .. 1, far above these bounds.
#include <algorithm>

#include "attention_case.h"

namespace bt {
namespace {

struct FwdResult {
  std::vector<uint8_t> out;
  std::vector<float> lse;
};

FwdResult run_forward(const AttentionCase& t) {
  const CaseSpec& s = t.spec;
  const size_t out_elems = size_t(s.B * s.H * s.Nq * s.dv);
  const size_t esize = s.v_dtype == DType::kFloat32 ? 4 : 2;
  FwdResult r;
  r.out.assign(out_elems * esize, 0xAB);  // garbage: every element must be written
  r.lse.assign(size_t(s.B * s.H * s.Nq), 12345.0f);
  const auto p = fwd_params(t, r.out.data(), r.lse.data());
  binformer::cpu::attention_fwd(p);
  return r;
}

double out_value(const FwdResult& r, DType dtype, size_t index) {
  if (dtype == DType::kFloat16) return from_half(reinterpret_cast<const uint16_t*>(r.out.data())[index]);
  if (dtype == DType::kBFloat16) return from_bf16(reinterpret_cast<const uint16_t*>(r.out.data())[index]);
  return reinterpret_cast<const float*>(r.out.data())[index];
}

// Checks one case; returns the largest error / tolerance ratio seen (for the report).
double check_forward_case(const AttentionCase& t, const std::string& isa) {
  IsaScope scope(isa);
  const CaseSpec& spec = t.spec;
  const FwdReference ref = reference_forward(t);
  const FwdResult got = run_forward(t);
  const double u_out = spec.v_dtype == DType::kFloat16 ? std::ldexp(1.0, -11)
                       : spec.v_dtype == DType::kBFloat16 ? std::ldexp(1.0, -8) : 0.0;
  const double p_round = (!spec.pv_int8 && spec.v_dtype == DType::kBFloat16) ? std::ldexp(1.0, -8) : 0.0;
  double worst = 0;
  int failures = 0;
  for (int64_t row = 0; row < spec.B * spec.H * spec.Nq; ++row) {
    const double eps = 4e-6 + 1e-6 * ref.max_abs_s[size_t(row)];
    const bool empty = ref.lse[size_t(row)] == -INFINITY;
    const float lse = got.lse[size_t(row)];
    if (empty) {
      EXPECT_EQ(lse, -INFINITY) << spec.str() << " [" << isa << "] fully masked row " << row;
    } else {
      const double err = std::fabs(double(lse) - ref.lse[size_t(row)]);
      worst = std::max(worst, err / eps);
      if (!(err <= eps) && failures++ < 5)
        ADD_FAILURE() << spec.str() << " [" << isa << "] lse row " << row << ": " << lse << " vs " << ref.lse[size_t(row)];
    }
    for (int c = 0; c < spec.dv; ++c) {
      const size_t idx = size_t(row * spec.dv + c);
      const double o = out_value(got, spec.v_dtype, idx);
      if (empty) {
        if (o != 0.0 && failures++ < 5)
          ADD_FAILURE() << spec.str() << " [" << isa << "] fully masked row " << row << " out " << o << " != 0";
        continue;
      }
      double tol = (eps + p_round) * ref.abs_pv[idx] + u_out * std::fabs(ref.out[idx]) + 1e-6;
      if (spec.pv_int8) tol += (0.5 / 255.0) * ref.abs_vq[idx];
      const double err = std::fabs(o - ref.out[idx]);
      worst = std::max(worst, err / tol);
      if (!(err <= tol) && failures++ < 5)
        ADD_FAILURE() << spec.str() << " [" << isa << "] out[" << row << ", " << c << "] = " << o << " vs "
                      << ref.out[idx] << " (tol " << tol << ")";
    }
  }
  return worst;
}

double check_forward(const CaseSpec& spec, const std::string& isa) { return check_forward_case(make_case(spec), isa); }

class Fwd : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override { BT_SKIP_IF_NO_ISA(GetParam()); }
  void check(const CaseSpec& s) {
    const double worst = check_forward(s, GetParam());
    worst_ = std::max(worst_, worst);
  }
  void TearDown() override {
    if (worst_ > 0) std::printf("[%s] worst error/tolerance %.3g\n", GetParam().c_str(), worst_);
  }
  double worst_ = 0;
};

TEST_P(Fwd, HeadDims) {
  uint64_t seed = 100;
  for (int d : {8, 32, 64, 72, 128, 256})
    for (int dv : {8, 24, 64, 80, 256}) {
      CaseSpec s;
      s.B = 1; s.H = 2; s.Nq = 37; s.Nk = 45; s.d = d; s.dv = dv; s.seed = seed++;
      check(s);
    }
}

TEST_P(Fwd, SequenceLengths) {
  uint64_t seed = 200;
  const int64_t lengths[][2] = {{1, 1}, {1, 7}, {7, 1}, {2, 300}, {300, 2}, {129, 127}, {128, 128}, {255, 257}, {300, 300}, {17, 129}};
  for (auto& nn : lengths)
    for (bool causal : {false, true}) {
      CaseSpec s;
      s.B = 2; s.H = 1; s.Nq = nn[0]; s.Nk = nn[1]; s.d = 64; s.dv = 40; s.causal = causal; s.seed = seed++;
      check(s);
    }
}

TEST_P(Fwd, ScalesAndBias) {
  uint64_t seed = 300;
  for (ScaleMode qs : {ScaleMode::kNone, ScaleMode::kPerHead, ScaleMode::kPerToken})
    for (ScaleMode ks : {ScaleMode::kNone, ScaleMode::kPerHead, ScaleMode::kPerToken})
      for (BiasMode bm : {BiasMode::kNone, BiasMode::kFull, BiasMode::kPerHead, BiasMode::kPerBatch, BiasMode::kKeyRow}) {
        CaseSpec s;
        s.B = 2; s.H = 3; s.Nq = 33; s.Nk = 70; s.d = 32; s.dv = 16;
        s.q_scale = qs; s.k_scale = ks; s.bias = bm; s.seed = seed++;
        s.bias_dtype = bm == BiasMode::kNone ? DType::kFloat32 : (seed % 3 == 0 ? DType::kFloat16 : seed % 3 == 1 ? DType::kBFloat16 : DType::kFloat32);
        s.causal = seed % 2 == 0;
        s.scale = seed % 4 == 0 ? 0.37f : 0.0f;
        check(s);
      }
}

TEST_P(Fwd, Dtypes) {
  uint64_t seed = 400;
  const DType floats[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  for (DType qd : {DType::kFloat32, DType::kFloat16, DType::kBFloat16, DType::kBits})
    for (DType kd : {DType::kFloat32, DType::kFloat16, DType::kBFloat16, DType::kBits})
      for (DType vd : floats) {
        CaseSpec s;
        s.B = 1; s.H = 2; s.Nq = 50; s.Nk = 61; s.d = 72; s.dv = 48;
        s.q_dtype = qd; s.k_dtype = kd; s.v_dtype = vd; s.seed = seed++;
        s.layout = seed % 2 ? Layout::kBNH : Layout::kBHN;
        check(s);
      }
}

TEST_P(Fwd, RelativePositionBias) {
  uint64_t seed = 500;
  const int grids[][2] = {{1, 1}, {2, 3}, {4, 4}, {7, 5}, {14, 14}, {3, 11}};
  for (auto& g : grids)
    for (int prefix : {0, 1})
      for (bool with_dense : {false, true}) {
        CaseSpec s;
        s.rel_wh = g[0]; s.rel_ww = g[1]; s.num_prefix = prefix;
        s.Nq = s.Nk = prefix + g[0] * g[1];
        s.B = 2; s.H = 2; s.d = 64; s.dv = 32; s.seed = seed++;
        s.q_scale = ScaleMode::kPerHead; s.k_scale = ScaleMode::kPerHead;
        if (with_dense) { s.bias = BiasMode::kPerHead; s.bias_dtype = DType::kBFloat16; }
        s.causal = seed % 3 == 0;
        check(s);
      }
}

TEST_P(Fwd, PvInt8) {
  uint64_t seed = 600;
  const int64_t lengths[][2] = {{1, 1}, {5, 3}, {64, 64}, {97, 131}, {300, 255}};
  for (auto& nn : lengths)
    for (int dv : {8, 64, 72}) {
      CaseSpec s;
      s.B = 1; s.H = 2; s.Nq = nn[0]; s.Nk = nn[1]; s.d = 64; s.dv = dv; s.pv_int8 = true; s.seed = seed++;
      s.v_dtype = seed % 3 == 0 ? DType::kFloat16 : seed % 3 == 1 ? DType::kBFloat16 : DType::kFloat32;
      s.causal = seed % 2 == 0;
      s.k_scale = ScaleMode::kPerToken;
      check(s);
    }
  CaseSpec s;  // with rel-pos and cls
  s.rel_wh = 5; s.rel_ww = 6; s.num_prefix = 1; s.Nq = s.Nk = 31; s.d = 32; s.dv = 24; s.pv_int8 = true; s.seed = 699;
  check(s);
}

TEST_P(Fwd, FullyMaskedRows) {
  uint64_t seed = 700;
  for (bool int8 : {false, true})
    for (BiasMode bm : {BiasMode::kFull, BiasMode::kKeyRow}) {
      CaseSpec s;
      s.B = 2; s.H = 2; s.Nq = 40; s.Nk = 150; s.d = 64; s.dv = 32; s.seed = seed++;
      s.bias = bm; s.masked_row_fraction = bm == BiasMode::kKeyRow ? 1.0 : 0.3; s.neg_inf_bias_fraction = 0.5;
      s.pv_int8 = int8; s.causal = seed % 2 == 0;
      check(s);
    }
}

TEST_P(Fwd, SignRuleSpecialValues) {
  for (DType dt : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    CaseSpec s;
    s.B = 1; s.H = 2; s.Nq = 20; s.Nk = 33; s.d = 40; s.dv = 16; s.special_signs = true; s.seed = 800 + int(dt);
    s.q_dtype = dt; s.k_dtype = dt;
    check(s);
  }
}

// Many random problems mixing every option.
TEST_P(Fwd, RandomSweep) {
  std::mt19937_64 rng(900);
  auto pick = [&](int n) { return int(rng() % uint64_t(n)); };
  const int dims[] = {8, 16, 32, 40, 64, 72, 96, 128, 256};
  const DType floats[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  for (int iter = 0; iter < 40; ++iter) {
    CaseSpec s;
    s.seed = 1000 + iter;
    s.B = 1 + pick(2); s.H = 1 + pick(3);
    s.d = dims[pick(9)]; s.dv = dims[pick(9)];
    if (pick(4) == 0) {
      s.rel_wh = 1 + pick(9); s.rel_ww = 1 + pick(9); s.num_prefix = pick(2);
      s.Nq = s.Nk = s.num_prefix + s.rel_wh * s.rel_ww;
    } else {
      s.Nq = 1 + pick(300); s.Nk = 1 + pick(300);
    }
    s.q_dtype = pick(4) == 0 ? DType::kBits : floats[pick(3)];
    s.k_dtype = pick(4) == 0 ? DType::kBits : floats[pick(3)];
    s.v_dtype = floats[pick(3)];
    s.layout = pick(2) ? Layout::kBNH : Layout::kBHN;
    s.q_scale = ScaleMode(pick(3)); s.k_scale = ScaleMode(pick(3));
    s.bias = BiasMode(pick(5)); s.bias_dtype = floats[pick(3)];
    s.causal = pick(2);
    s.pv_int8 = pick(4) == 0;
    if (s.bias != BiasMode::kNone && pick(3) == 0) { s.masked_row_fraction = 0.2; s.neg_inf_bias_fraction = 0.3; }
    check(s);
  }
}

// Long key ranges (several online-softmax blocks of every implementation) with scores that
// rise along the keys by up to 40 (natural log units), so that later blocks raise the running
// maximum far beyond the lazy-reference slack (forcing the recompute and rescale paths), and
// with scores that fall (the reference never moves after the first block).
TEST_P(Fwd, ManyBlocksAndRescaling) {
  uint64_t seed = 980;
  for (double ramp : {40.0, -40.0, 6.0})
    for (bool int8 : {false, true}) {
      CaseSpec s;
      s.B = 1; s.H = 1; s.Nq = 19; s.Nk = 1100; s.d = 64; s.dv = 32; s.seed = seed++;
      s.bias = BiasMode::kFull; s.pv_int8 = int8; s.causal = seed % 2 == 0;
      s.v_dtype = seed % 3 == 0 ? DType::kBFloat16 : DType::kFloat32;
      AttentionCase t = make_case(s);
      std::mt19937_64 rng(s.seed);
      std::normal_distribution<float> normal(0.0f, 1.0f);
      for (int64_t i = 0; i < s.Nq; ++i)
        for (int64_t j = 0; j < s.Nk; ++j) t.bias.set(0, 0, i, j, float(ramp * double(j) / double(s.Nk)) + normal(rng));
      worst_ = std::max(worst_, check_forward_case(t, GetParam()));
    }
}

// IEEE propagation (CONTRACT.md): a NaN in v[j, c] reaches channel c of every row attending to
// key j and nothing else; a NaN bias entry (i, j) turns row i (out and lse) NaN and nothing else.
TEST_P(Fwd, NonFiniteValuesPropagate) {
  for (DType vd : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    CaseSpec s;
    s.B = 1; s.H = 2; s.Nq = 21; s.Nk = 37; s.d = 64; s.dv = 32; s.v_dtype = vd; s.bias = BiasMode::kFull;
    s.seed = 950 + int(vd);
    AttentionCase t = make_case(s);
    t.v.set(0, 1, 7, 3, std::numeric_limits<float>::quiet_NaN());
    t.bias.set(0, 0, 4, 9, std::numeric_limits<float>::quiet_NaN());
    t.bias.set(0, 0, 6, 2, -INFINITY);  // -inf only masks its key
    IsaScope scope(GetParam());
    const FwdResult r = run_forward(t);
    for (int64_t h = 0; h < 2; ++h)
      for (int64_t i = 0; i < s.Nq; ++i) {
        const bool nan_row = h == 0 && i == 4;
        EXPECT_EQ(std::isnan(r.lse[size_t(h * s.Nq + i)]), nan_row) << dtype_name(vd) << " lse h" << h << " i" << i;
        for (int c = 0; c < s.dv; ++c) {
          const bool expect_nan = nan_row || (h == 1 && c == 3);
          const double o = out_value(r, vd, size_t((h * s.Nq + i) * s.dv + c));
          EXPECT_EQ(std::isnan(o), expect_nan) << dtype_name(vd) << " out h" << h << " i" << i << " c" << c;
        }
      }
  }
}

// A NaN per-head scale makes every score of its head NaN: those rows are NaN (out and lse), not
// fully masked (a maximum that skips NaN saw only -inf there and returned out = 0).
TEST_P(Fwd, NaNScaleRowsPropagate) {
  CaseSpec s;
  s.B = 2; s.H = 2; s.Nq = 19; s.Nk = 70; s.d = 64; s.dv = 32; s.q_scale = ScaleMode::kPerHead;
  s.seed = 970;
  AttentionCase t = make_case(s);
  t.q_scale[size_t(1 * t.q_scale_stride[0])] = std::numeric_limits<float>::quiet_NaN();  // (b 1, h 0)
  IsaScope scope(GetParam());
  const FwdResult r = run_forward(t);
  for (int64_t bh = 0; bh < 4; ++bh)
    for (int64_t i = 0; i < s.Nq; ++i) {
      const bool nan_row = bh == 2;  // (b 1, h 0)
      EXPECT_EQ(std::isnan(r.lse[size_t(bh * s.Nq + i)]), nan_row) << "lse bh" << bh << " i" << i;
      for (int c = 0; c < s.dv; ++c) {
        const double o = out_value(r, s.v_dtype, size_t((bh * s.Nq + i) * s.dv + c));
        EXPECT_EQ(std::isnan(o), nan_row) << "out bh" << bh << " i" << i << " c" << c;
      }
    }
}

INSTANTIATE_TEST_SUITE_P(Isa, Fwd, ::testing::ValuesIn(isa_names()));

// The forward gives the same bits whatever the parallel_for chunking (each row is owned by one
// task with a fixed key blocking).
TEST(FwdThreads, BitwiseIndependentOfChunking) {
  for (const std::string isa : {"scalar", "avx512"}) {
    if (isa != "scalar" && !cpu_has_avx512()) continue;
    IsaScope scope(isa);
    CaseSpec s;
    s.B = 2; s.H = 3; s.Nq = 200; s.Nk = 190; s.d = 64; s.dv = 64; s.bias = BiasMode::kPerHead;
    s.rel_wh = 0; s.k_scale = ScaleMode::kPerToken; s.causal = true; s.seed = 5;
    const AttentionCase t = make_case(s);
    install_serial_parallel_for();
    const FwdResult serial = run_forward(t);
    install_thread_parallel_for(3);
    const FwdResult threaded = run_forward(t);
    install_serial_parallel_for();
    EXPECT_EQ(serial.out, threaded.out) << isa;
    EXPECT_EQ(0, std::memcmp(serial.lse.data(), threaded.lse.data(), serial.lse.size() * 4)) << isa;
  }
}

}  // namespace
}  // namespace bt
