// attention_bwd against a float64 reference of the formulas in params.h, under every ISA, and
// its bitwise determinism across parallel_for chunkings.
//
// Tolerances. Every output is a sum of terms built from P_ij and dS_ij = P_ij (dP_ij - D_i).
// The kernel's P carries the forward's relative exponent error (see test_attention_fwd.cpp:
// eps_i = 4e-6 + 1e-6 max_j |S_ij|), dP_ij = dO_i . V_j and D_i are fp32 dot products over Dv
// terms, and the outputs are fp32 sums over up to 300 terms. So with the magnitude
//   A_ij = P_ij (sum_c |dO_ic V_jc| + |D_i|)      (a bound on |dS_ij| and its error scale)
// each output is checked against  tol = (eps_i + 2e-5) * (the same sum with |terms| and A_ij
// in place of dS_ij)  + 1e-6: the 2e-5 covers fp32 rounding of dP, D and the output sums
// (worst-case n u for n <= 300 terms is 1.8e-5). Sign gradients are accumulated as 2T - U
// (T: the sum over set bits), whose rounding is bounded by the same |terms| sum times 3 u n.
// A wrong formula (a missing factor, sign, mask or index) is off by O(|value|), far above this.
#include <algorithm>
#include <cstring>

#include "attention_case.h"

namespace bt {
namespace {

struct BwdCase {
  AttentionCase t;
  Tensor4 dout, out;           // in v's dtype
  std::vector<float> lse;      // [B,H,Nq] what the forward returned (float of the reference)
  FwdReference fwd;
};

BwdCase make_bwd_case(CaseSpec spec) {
  spec.q_dtype = spec.k_dtype = DType::kBits;  // the backward takes packed bits
  spec.pv_int8 = false;                        // differentiated as exact P.V: float V
  BwdCase c;
  c.t = make_case(spec);
  c.fwd = reference_forward(c.t);
  const CaseSpec& s = c.t.spec;
  std::mt19937_64 rng(spec.seed * 7919 + 1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  c.dout = make_tensor({s.B, s.H, s.Nq, s.dv}, s.v_dtype, s.layout);
  fill(c.dout, [&](int64_t, int64_t, int64_t, int64_t) { return normal(rng); });
  c.out = make_tensor({s.B, s.H, s.Nq, s.dv}, s.v_dtype, s.layout);
  fill(c.out, [&](int64_t b, int64_t h, int64_t i, int64_t ch) {
    return float(c.fwd.out[size_t(((b * s.H + h) * s.Nq + i) * s.dv + ch)]);
  });
  c.lse.resize(c.fwd.lse.size());
  for (size_t i = 0; i < c.lse.size(); ++i) c.lse[i] = float(c.fwd.lse[i]);
  return c;
}

struct BwdOutputs {
  std::vector<float> dv, dq_scale, dk_scale, dq_sign, dk_sign, dbias, drel;
};

// mask bits: 0 dv, 1 dq_scale, 2 dk_scale, 3 dq_sign, 4 dk_sign, 5 dbias, 6 drel_pos_table
BwdOutputs run_backward(const BwdCase& c, unsigned mask) {
  const CaseSpec& s = c.t.spec;
  const AttentionCase& t = c.t;
  BwdOutputs o;
  const float kGarbage = 777.0f;  // every wanted element must be overwritten
  auto want = [&](int bit, std::vector<float>& v, size_t n) -> float* {
    if (!((mask >> bit) & 1u)) return nullptr;
    v.assign(n, kGarbage);
    return v.data();
  };
  binformer::AttentionBwdParams p{};
  p.B = s.B; p.H = s.H; p.Nq = s.Nq; p.Nk = s.Nk; p.head_dim = s.d; p.v_dim = s.dv;
  p.q_bits = reinterpret_cast<const uint32_t*>(t.q_bits.data());
  p.k_bits = reinterpret_cast<const uint32_t*>(t.k_bits.data());
  for (int i = 0; i < 3; ++i) {
    p.q_stride[i] = t.q_bits.strides[i]; p.k_stride[i] = t.k_bits.strides[i]; p.v_stride[i] = t.v.strides[i];
    p.out_stride[i] = c.out.strides[i]; p.dout_stride[i] = c.dout.strides[i];
    p.q_scale_stride[i] = t.q_scale_stride[i]; p.k_scale_stride[i] = t.k_scale_stride[i];
  }
  p.v = t.v.data(); p.v_dtype = t.v.dtype; p.out = c.out.data(); p.dout = c.dout.data();
  p.lse = c.lse.data();
  p.q_scale = t.q_scale.empty() ? nullptr : t.q_scale.data();
  p.k_scale = t.k_scale.empty() ? nullptr : t.k_scale.data();
  if (s.bias != BiasMode::kNone) {
    p.bias = t.bias.data(); p.bias_dtype = t.bias.dtype;
    for (int i = 0; i < 4; ++i) p.bias_stride[i] = t.bias.strides[i];
  }
  if (!t.rel_table.empty()) {
    p.rel_pos_table = t.rel_table.data(); p.rel_pos_table_stride_h = t.rel_T;
    p.rel_pos_wh = s.rel_wh; p.rel_pos_ww = s.rel_ww; p.num_prefix_tokens = s.num_prefix;
  }
  p.scale = t.scale;
  p.causal = s.causal;
  const size_t BH = size_t(s.B * s.H);
  p.dv = want(0, o.dv, BH * s.Nk * s.dv);
  p.dq_scale = want(1, o.dq_scale, BH * s.Nq);
  p.dk_scale = want(2, o.dk_scale, BH * s.Nk);
  p.dq_sign = want(3, o.dq_sign, BH * s.Nq * s.d);
  p.dk_sign = want(4, o.dk_sign, BH * s.Nk * s.d);
  p.dbias = want(5, o.dbias, BH * s.Nq * s.Nk);
  const int64_t T = s.rel_wh > 0 ? t.rel_T : int64_t(2 * s.rel_wh - 1) * (2 * s.rel_ww - 1) + 3;
  p.drel_pos_table = want(6, o.drel, size_t(s.H * T));
  binformer::cpu::attention_bwd(p);
  return o;
}

// Reference value and error magnitude of each output element.
struct RefOut {
  std::vector<double> val, mag;
  void init(size_t n) { val.assign(n, 0); mag.assign(n, 0); }
};
struct BwdReference {
  RefOut dv, dq_scale, dk_scale, dq_sign, dk_sign, dbias, drel;
  std::vector<double> row_eps;  // eps_i per (b, h, i)
};

BwdReference reference_backward(const BwdCase& c) {
  const AttentionCase& t = c.t;
  const CaseSpec& s = t.spec;
  const int64_t B = s.B, H = s.H, Nq = s.Nq, Nk = s.Nk;
  const int d = s.d, dv = s.dv;
  BwdReference r;
  const size_t BH = size_t(B * H);
  r.dv.init(BH * Nk * dv); r.dq_scale.init(BH * Nq); r.dk_scale.init(BH * Nk);
  r.dq_sign.init(BH * Nq * d); r.dk_sign.init(BH * Nk * d); r.dbias.init(BH * Nq * Nk);
  const int64_t T = s.rel_wh > 0 ? t.rel_T : 1;
  r.drel.init(size_t(H * T));
  r.row_eps.assign(BH * Nq, 0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const size_t bh = size_t(b * H + h);
      for (int64_t i = 0; i < Nq; ++i) {
        const size_t row = bh * Nq + size_t(i);
        const double lse = c.lse[row];  // the kernel normalizes with the lse it is given
        r.row_eps[row] = 4e-6 + 1e-6 * c.fwd.max_abs_s[row] + 2e-5;
        double D = 0;
        for (int ch = 0; ch < dv; ++ch) D += c.dout.value(b, h, i, ch) * c.out.value(b, h, i, ch);
        for (int64_t j = 0; j < Nk; ++j) {
          const double sc = t.score(b, h, i, j);
          if (lse == -INFINITY || sc == -INFINITY) continue;  // P = 0, dS = 0
          const double P = std::exp(sc - lse);
          double dP = 0, dP_abs = 0;
          for (int ch = 0; ch < dv; ++ch) {
            const double g = c.dout.value(b, h, i, ch), v = t.vreal(b, h, j, ch);
            dP += g * v;
            dP_abs += std::fabs(g * v);
          }
          const double dS = P * (dP - D), A = P * (dP_abs + std::fabs(D));
          const double ai = t.a(b, h, i), bj = t.bcol(b, h, j), dot = t.dot(b, h, i, j);
          for (int ch = 0; ch < dv; ++ch) {
            const double g = c.dout.value(b, h, i, ch);
            r.dv.val[(bh * Nk + j) * dv + ch] += P * g;
            r.dv.mag[(bh * Nk + j) * dv + ch] += P * std::fabs(g);
          }
          r.dq_scale.val[row] += dS * t.scale * bj * dot;
          r.dq_scale.mag[row] += A * std::fabs(t.scale * bj * dot);
          r.dk_scale.val[bh * Nk + j] += dS * t.scale * ai * dot;
          r.dk_scale.mag[bh * Nk + j] += A * std::fabs(t.scale * ai * dot);
          const double w = dS * t.scale * ai * bj, wm = A * std::fabs(t.scale * ai * bj);
          for (int ch = 0; ch < d; ++ch) {
            const double sk = sign_bit(t.k.value(b, h, j, ch)) ? 1 : -1, sq = sign_bit(t.q.value(b, h, i, ch)) ? 1 : -1;
            r.dq_sign.val[row * d + ch] += w * sk;
            r.dq_sign.mag[row * d + ch] += wm;
            r.dk_sign.val[(bh * Nk + j) * d + ch] += w * sq;
            r.dk_sign.mag[(bh * Nk + j) * d + ch] += wm;
          }
          r.dbias.val[row * Nk + j] = dS;
          r.dbias.mag[row * Nk + j] = A;
          if (s.rel_wh > 0) {
            const size_t idx = size_t(h * T + binformer::rel_pos_index(i, j, s.rel_wh, s.rel_ww, s.num_prefix));
            r.drel.val[idx] += dS;
            r.drel.mag[idx] += A;
          }
        }
      }
    }
  return r;
}

// eps for output element `e` of an output whose rows are `rows_of(e)`; the largest row eps is
// used for reductions over rows (dv, dk_*, drel).
double check_output(const char* name, const std::vector<float>& got, const RefOut& ref, double eps,
                    const std::string& ctx) {
  double worst = 0;
  int failures = 0;
  EXPECT_EQ(got.size(), ref.val.size()) << name;
  for (size_t e = 0; e < got.size() && e < ref.val.size(); ++e) {
    const double tol = eps * ref.mag[e] + 1e-6;
    const double err = std::fabs(double(got[e]) - ref.val[e]);
    worst = std::max(worst, err / tol);
    if (!(err <= tol) && failures++ < 5)
      ADD_FAILURE() << ctx << " " << name << "[" << e << "] = " << got[e] << " vs " << ref.val[e] << " (tol " << tol << ")";
  }
  return worst;
}

double check_backward(const CaseSpec& spec, const std::string& isa, unsigned mask = 0x7f) {
  IsaScope scope(isa);
  const BwdCase c = make_bwd_case(spec);
  const BwdReference ref = reference_backward(c);
  const BwdOutputs got = run_backward(c, mask);
  const double eps = *std::max_element(ref.row_eps.begin(), ref.row_eps.end());
  const std::string ctx = c.t.spec.str() + " [" + isa + "]";
  double worst = 0;
  if (mask & 1u) worst = std::max(worst, check_output("dv", got.dv, ref.dv, eps, ctx));
  if (mask & 2u) worst = std::max(worst, check_output("dq_scale", got.dq_scale, ref.dq_scale, eps, ctx));
  if (mask & 4u) worst = std::max(worst, check_output("dk_scale", got.dk_scale, ref.dk_scale, eps, ctx));
  if (mask & 8u) worst = std::max(worst, check_output("dq_sign", got.dq_sign, ref.dq_sign, eps, ctx));
  if (mask & 16u) worst = std::max(worst, check_output("dk_sign", got.dk_sign, ref.dk_sign, eps, ctx));
  if (mask & 32u) worst = std::max(worst, check_output("dbias", got.dbias, ref.dbias, eps, ctx));
  if (mask & 64u) {
    if (spec.rel_wh > 0) {
      worst = std::max(worst, check_output("drel_pos_table", got.drel, ref.drel, eps, ctx));
    } else {
      for (float x : got.drel) EXPECT_EQ(x, 0.0f) << ctx << " drel_pos_table without a table must be 0";
    }
  }
  return worst;
}

class Bwd : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override { BT_SKIP_IF_NO_ISA(GetParam()); }
  void check(const CaseSpec& s, unsigned mask = 0x7f) { worst_ = std::max(worst_, check_backward(s, GetParam(), mask)); }
  void TearDown() override {
    if (worst_ > 0) std::printf("[%s] worst error/tolerance %.3g\n", GetParam().c_str(), worst_);
  }
  double worst_ = 0;
};

TEST_P(Bwd, HeadDimsAndLengths) {
  uint64_t seed = 2000;
  const int dims[][2] = {{8, 8}, {32, 16}, {64, 64}, {72, 40}, {128, 24}, {256, 72}};
  const int64_t lengths[][2] = {{1, 1}, {7, 70}, {70, 7}, {65, 129}, {130, 64}};
  for (auto& dd : dims)
    for (auto& nn : lengths) {
      CaseSpec s;
      s.B = 1; s.H = 2; s.d = dd[0]; s.dv = dd[1]; s.Nq = nn[0]; s.Nk = nn[1]; s.seed = seed++;
      s.causal = seed % 2 == 0;
      check(s);
    }
}

TEST_P(Bwd, ScalesBiasDtypes) {
  uint64_t seed = 2100;
  const DType floats[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  for (ScaleMode qs : {ScaleMode::kNone, ScaleMode::kPerHead, ScaleMode::kPerToken})
    for (ScaleMode ks : {ScaleMode::kNone, ScaleMode::kPerHead, ScaleMode::kPerToken})
      for (BiasMode bm : {BiasMode::kNone, BiasMode::kFull, BiasMode::kPerHead, BiasMode::kKeyRow}) {
        CaseSpec s;
        s.B = 2; s.H = 2; s.Nq = 37; s.Nk = 83; s.d = 64; s.dv = 32; s.seed = seed++;
        s.q_scale = qs; s.k_scale = ks; s.bias = bm;
        s.bias_dtype = floats[seed % 3]; s.v_dtype = floats[(seed / 3) % 3];
        s.layout = seed % 2 ? Layout::kBNH : Layout::kBHN;
        s.causal = seed % 4 == 0;
        check(s);
      }
}

TEST_P(Bwd, RelativePositionBias) {
  uint64_t seed = 2200;
  const int grids[][2] = {{1, 1}, {3, 4}, {7, 7}, {5, 9}};
  for (auto& g : grids)
    for (int prefix : {0, 1})
      for (bool dense : {false, true}) {
        CaseSpec s;
        s.rel_wh = g[0]; s.rel_ww = g[1]; s.num_prefix = prefix; s.Nq = s.Nk = prefix + g[0] * g[1];
        s.B = 2; s.H = 2; s.d = 32; s.dv = 16; s.seed = seed++;
        s.q_scale = s.k_scale = ScaleMode::kPerHead;
        if (dense) s.bias = BiasMode::kPerBatch;
        s.causal = seed % 3 == 0;
        check(s);
      }
}

TEST_P(Bwd, FullyMaskedRowsAndOutputSubsets) {
  uint64_t seed = 2300;
  for (unsigned mask : {0x01u, 0x06u, 0x18u, 0x20u, 0x40u, 0x55u, 0x2au, 0x7fu}) {
    CaseSpec s;
    s.B = 1; s.H = 2; s.Nq = 45; s.Nk = 90; s.d = 40; s.dv = 24; s.seed = seed++;
    s.bias = BiasMode::kFull; s.masked_row_fraction = 0.25; s.neg_inf_bias_fraction = 0.3;
    s.rel_wh = 0; s.causal = seed % 2 == 0; s.k_scale = ScaleMode::kPerToken;
    check(s, mask);
  }
  CaseSpec s;  // rel-pos only, masked rows through the dense bias
  s.rel_wh = 6; s.rel_ww = 5; s.num_prefix = 1; s.Nq = s.Nk = 31; s.d = 64; s.dv = 32; s.seed = 2399;
  s.bias = BiasMode::kFull; s.masked_row_fraction = 0.2;
  check(s, 0x40u);
}

TEST_P(Bwd, RandomSweep) {
  std::mt19937_64 rng(2500);
  auto pick = [&](int n) { return int(rng() % uint64_t(n)); };
  const int dims[] = {8, 16, 32, 40, 64, 72, 96, 128, 256};
  const DType floats[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  for (int iter = 0; iter < 16; ++iter) {
    CaseSpec s;
    s.seed = 2600 + iter;
    s.B = 1 + pick(2); s.H = 1 + pick(2);
    s.d = dims[pick(9)]; s.dv = dims[pick(9)];
    if (pick(3) == 0) {
      s.rel_wh = 1 + pick(8); s.rel_ww = 1 + pick(8); s.num_prefix = pick(2);
      s.Nq = s.Nk = s.num_prefix + s.rel_wh * s.rel_ww;
    } else {
      s.Nq = 1 + pick(200); s.Nk = 1 + pick(200);
    }
    s.v_dtype = floats[pick(3)];
    s.layout = pick(2) ? Layout::kBNH : Layout::kBHN;
    s.q_scale = ScaleMode(pick(3)); s.k_scale = ScaleMode(pick(3));
    s.bias = BiasMode(pick(5)); s.bias_dtype = floats[pick(3)];
    s.causal = pick(2);
    check(s);
  }
}

INSTANTIATE_TEST_SUITE_P(Isa, Bwd, ::testing::ValuesIn(isa_names()));

// Same inputs, different parallel_for chunkings (serial, 2 and 3 uneven threads): the same bits.
TEST(BwdThreads, BitwiseDeterministicAcrossChunking) {
  for (const std::string isa : {"scalar", "avx512"}) {
    if (isa != "scalar" && !cpu_has_avx512()) continue;
    IsaScope scope(isa);
    CaseSpec s;
    s.B = 2; s.H = 2; s.Nq = 150; s.Nk = 170; s.d = 64; s.dv = 48; s.seed = 77;
    s.rel_wh = 0; s.bias = BiasMode::kPerHead; s.k_scale = ScaleMode::kPerToken; s.q_scale = ScaleMode::kPerToken;
    s.causal = true;
    CaseSpec r = s;  // and a rel-pos problem (partial tables reduced per head)
    r.rel_wh = 9; r.rel_ww = 10; r.num_prefix = 1; r.Nq = r.Nk = 91; r.bias = BiasMode::kNone; r.causal = false;
    CaseSpec f = r;  // keys in one block: pass A also produces the query-side outputs (fused)
    f.rel_wh = 7; f.rel_ww = 8; f.Nq = f.Nk = 57; f.B = 3; f.bias = BiasMode::kPerHead; f.causal = true;
    for (const CaseSpec& spec : {s, r, f}) {
      const BwdCase c = make_bwd_case(spec);
      install_serial_parallel_for();
      const BwdOutputs a = run_backward(c, 0x7f);
      install_thread_parallel_for(2);
      const BwdOutputs b2 = run_backward(c, 0x7f);
      install_thread_parallel_for(3);
      const BwdOutputs b3 = run_backward(c, 0x7f);
      install_serial_parallel_for();
      for (const BwdOutputs* b : {&b2, &b3}) {
        auto same = [](const std::vector<float>& x, const std::vector<float>& y) {
          return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size() * sizeof(float)) == 0;
        };
        EXPECT_TRUE(same(a.dv, b->dv)) << isa << " dv";
        EXPECT_TRUE(same(a.dq_scale, b->dq_scale)) << isa << " dq_scale";
        EXPECT_TRUE(same(a.dk_scale, b->dk_scale)) << isa << " dk_scale";
        EXPECT_TRUE(same(a.dq_sign, b->dq_sign)) << isa << " dq_sign";
        EXPECT_TRUE(same(a.dk_sign, b->dk_sign)) << isa << " dk_sign";
        EXPECT_TRUE(same(a.dbias, b->dbias)) << isa << " dbias";
        EXPECT_TRUE(same(a.drel, b->drel)) << isa << " drel_pos_table";
      }
    }
  }
}

}  // namespace
}  // namespace bt
