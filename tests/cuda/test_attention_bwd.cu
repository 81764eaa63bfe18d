// GoogleTest of binformer::cuda::attention_bwd against a float64 host reference.
//
// Each case builds random q, k (kept as packed sign bits), v, per-token / broadcast scales,
// optional dense bias (with -inf entries and fully masked rows) and rel-pos table, runs the
// forward in float64 to get lse and O (rounded to fp32 / v's dtype: exactly the inputs the
// backward receives from the forward), draws dO, and compares all seven outputs with the float64
// backward of the same math. Outputs and workspace are poisoned (0xff bytes = NaN) first and 64
// guard floats after each output must stay poisoned. Each case runs twice and every output must
// match bit for bit (determinism); a run with only the "hamming" outputs (dv, dq_scale,
// dk_scale) must reproduce those outputs bit for bit as well.
//
// Tolerances (checked per element as |got - want| <= rtol * M + 1e-6 * max(M), where M is the
// float64 sum of the absolute values of the terms of that element, so cancellation cannot make a
// test pass or fail by luck):
//  * fp32 quantities (P, dP, D, dS and every sum of dS: dq_scale, dk_scale, dbias, drel): the
//    kernel's S has absolute error ~ |S| 2^-23 (dot is exact; the scale product, bias and lse
//    are fp32), ex2.approx adds 2^-22 relative, dP and D are fp32 sums of Dv exact products
//    (<= Dv 2^-24 relative to their magnitude), and the final sums add <= N 2^-24 relative:
//    rtol_f = 1e-4 + N * 6e-8 covers all of it with margin, yet a single wrong or missing
//    element of a row (about M / N for N <= 5000) exceeds it.
//  * tensor-core matmul operands rounded to the input type (P for dV, dS * scalar for the sign
//    gradients): one rounding of 2^-11 (fp16) or 2^-8 (bf16) relative per term, on top of rtol_f.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <sstream>

#include "binformer/cuda_kernels.h"
#include "cuda_test_helpers.h"

namespace binformer::test {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "fp32";
    case DType::kFloat16: return "fp16";
    case DType::kBFloat16: return "bf16";
    default: return "?";
  }
}

// Values stored in a dtype: host bits plus their exact double value.
struct TypedArray {
  DType dtype = DType::kFloat32;
  std::vector<uint8_t> bytes;
  std::vector<double> value;
  size_t elem() const { return dtype == DType::kFloat32 ? 4 : 2; }
  void resize(size_t n) {
    bytes.assign(n * elem(), 0);
    value.assign(n, 0.0);
  }
  // Rounds v to the dtype and stores it at index i.
  void set(size_t i, double v) {
    if (dtype == DType::kFloat32) {
      const float f = float(v);
      std::memcpy(&bytes[i * 4], &f, 4);
      value[i] = double(f);
    } else {
      const uint16_t h = dtype == DType::kFloat16 ? float_to_half_bits(float(v)) : float_to_bf16_bits(float(v));
      std::memcpy(&bytes[i * 2], &h, 2);
      value[i] = dtype == DType::kFloat16 ? half_bits_to_double(h) : bf16_bits_to_double(h);
    }
  }
};

enum class ScaleMode { kNone, kPerToken, kPerHead };  // kPerHead: one value per (b, h), stride 0 on n

struct BwdCase {
  int64_t B = 1, H = 1, Nq = 16, Nk = 16;
  int d = 64, dv = 64;
  DType v_dtype = DType::kFloat16;
  bool causal = false;
  double scale = 0;  // 0: 1/sqrt(d)
  ScaleMode q_scale = ScaleMode::kNone, k_scale = ScaleMode::kNone;
  bool dense_bias = false;
  DType bias_dtype = DType::kFloat32;
  bool bias_broadcast_batch = false;
  bool masked_rows = false;  // some query rows fully masked through -inf bias (needs dense_bias)
  int rel_wh = 0, rel_ww = 0, num_prefix = 0;  // rel-pos table when rel_wh > 0
  bool bnhd_layout = false;  // q/k/v/out/dout stored as [B, N, H, D] (non-contiguous heads)
  int v_offset = 0;          // elements: a non-zero offset breaks 16-byte alignment (CUDA-core path)
  bool check_reference = true;
};

std::string describe(const BwdCase& c) {
  std::ostringstream s;
  s << "B=" << c.B << " H=" << c.H << " Nq=" << c.Nq << " Nk=" << c.Nk << " d=" << c.d << " Dv=" << c.dv
    << " v=" << dtype_name(c.v_dtype) << (c.causal ? " causal" : "")
    << " q_scale=" << int(c.q_scale) << " k_scale=" << int(c.k_scale);
  if (c.dense_bias) {
    s << " bias=" << dtype_name(c.bias_dtype) << (c.bias_broadcast_batch ? "(bcast b)" : "")
      << (c.masked_rows ? " masked-rows" : "");
  }
  if (c.rel_wh) s << " relpos=" << c.rel_wh << "x" << c.rel_ww << "+" << c.num_prefix;
  if (c.bnhd_layout) s << " BNHD";
  if (c.v_offset) s << " v_offset=" << c.v_offset;
  return s.str();
}

// Device copies of the inputs plus the host reference.
struct Problem {
  BwdCase c;
  int words = 0;
  double scale = 0;
  int table_size = 0;
  // host inputs
  std::vector<uint32_t> q_bits, k_bits;  // in the chosen layout
  std::vector<int8_t> q_sign, k_sign;    // [B,H,N,d] as +-1 (reference)
  TypedArray v, out, dout;               // in the chosen layout (v_offset leading elements)
  std::vector<float> lse;                // [B,H,Nq]
  std::vector<float> q_scale, k_scale;   // minimal arrays for the broadcast mode
  TypedArray bias;
  std::vector<float> table;              // [H, table_stride]
  int64_t table_stride = 0;
  // strides
  int64_t qs[3], ks[3], vs[3], os[3];
  int64_t q_scale_s[3] = {0, 0, 0}, k_scale_s[3] = {0, 0, 0}, bias_s[4] = {0, 0, 0, 0};
  // reference outputs and their magnitudes
  std::vector<double> dv, dq_scale, dk_scale, dq_sign, dk_sign, dbias, drel;
  std::vector<double> m_dv, m_dq_scale, m_dk_scale, m_dq_sign, m_dk_sign, m_dbias, m_drel;

  size_t idx_q(int64_t b, int64_t h, int64_t n) const { return size_t(b * qs[0] + h * qs[1] + n * qs[2]); }
  size_t idx_k(int64_t b, int64_t h, int64_t n) const { return size_t(b * ks[0] + h * ks[1] + n * ks[2]); }
  size_t idx_v(int64_t b, int64_t h, int64_t n) const {
    return size_t(c.v_offset + b * vs[0] + h * vs[1] + n * vs[2]);
  }
  size_t idx_o(int64_t b, int64_t h, int64_t n) const { return size_t(b * os[0] + h * os[1] + n * os[2]); }
  double qa(int64_t b, int64_t h, int64_t i) const {
    return c.q_scale == ScaleMode::kNone ? 1.0 : q_scale[size_t(b * q_scale_s[0] + h * q_scale_s[1] + i * q_scale_s[2])];
  }
  double kb(int64_t b, int64_t h, int64_t j) const {
    return c.k_scale == ScaleMode::kNone ? 1.0 : k_scale[size_t(b * k_scale_s[0] + h * k_scale_s[1] + j * k_scale_s[2])];
  }
  int64_t rel_index(int64_t i, int64_t j) const {
    return rel_pos_index(i, j, c.rel_wh, c.rel_ww, c.num_prefix);
  }
};

void fill_scale(ScaleMode mode, int64_t B, int64_t H, int64_t N, std::vector<float>& v, int64_t (&s)[3],
                std::mt19937_64& rng) {
  std::uniform_real_distribution<float> mag(0.3f, 1.5f);
  std::bernoulli_distribution negative(0.2);
  auto draw = [&] { return negative(rng) ? -mag(rng) : mag(rng); };
  if (mode == ScaleMode::kPerToken) {
    v.resize(size_t(B * H * N));
    for (auto& x : v) x = draw();
    s[0] = H * N; s[1] = N; s[2] = 1;
  } else if (mode == ScaleMode::kPerHead) {
    v.resize(size_t(B * H));
    for (auto& x : v) x = draw();
    s[0] = H; s[1] = 1; s[2] = 0;
  }
}

Problem build_problem(const BwdCase& c, std::mt19937_64& rng) {
  Problem p;
  p.c = c;
  p.words = words_for(c.d);
  p.scale = c.scale != 0 ? c.scale : 1.0 / std::sqrt(double(c.d));
  const int64_t B = c.B, H = c.H, Nq = c.Nq, Nk = c.Nk;
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_int_distribution<int> coin(0, 9);

  // Layout strides.
  auto set_strides = [&](int64_t (&s)[3], int64_t N, int64_t D) {
    if (c.bnhd_layout) { s[0] = N * H * D; s[1] = D; s[2] = H * D; }
    else { s[0] = H * N * D; s[1] = N * D; s[2] = D; }
  };
  set_strides(p.qs, Nq, p.words);
  set_strides(p.ks, Nk, p.words);
  set_strides(p.vs, Nk, c.dv);
  set_strides(p.os, Nq, c.dv);

  // Signs (some exact zeros map to +1 like everywhere else) and their packed bits.
  auto make_signs = [&](int64_t N, std::vector<int8_t>& sign, std::vector<uint32_t>& bits, const int64_t (&s)[3]) {
    sign.assign(size_t(B * H * N * c.d), 0);
    bits.assign(size_t(B * H * N * p.words), 0u);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t n = 0; n < N; ++n)
          for (int e = 0; e < c.d; ++e) {
            const double x = coin(rng) == 0 ? 0.0 : normal(rng);
            const bool plus = !(x < 0);
            sign[size_t(((b * H + h) * N + n) * c.d + e)] = plus ? 1 : -1;
            if (plus) bits[size_t(b * s[0] + h * s[1] + n * s[2] + e / 32)] |= 1u << (e % 32);
          }
  };
  make_signs(Nq, p.q_sign, p.q_bits, p.qs);
  make_signs(Nk, p.k_sign, p.k_bits, p.ks);

  p.v.dtype = p.out.dtype = p.dout.dtype = c.v_dtype;
  p.v.resize(size_t(c.v_offset + B * H * Nk * c.dv));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t j = 0; j < Nk; ++j)
        for (int e = 0; e < c.dv; ++e) p.v.set(p.idx_v(b, h, j) + e, normal(rng));

  fill_scale(c.q_scale, B, H, Nq, p.q_scale, p.q_scale_s, rng);
  fill_scale(c.k_scale, B, H, Nk, p.k_scale, p.k_scale_s, rng);

  if (c.dense_bias) {
    const int64_t Bb = c.bias_broadcast_batch ? 1 : B;
    p.bias.dtype = c.bias_dtype;
    p.bias.resize(size_t(Bb * H * Nq * Nk));
    p.bias_s[0] = c.bias_broadcast_batch ? 0 : H * Nq * Nk;
    p.bias_s[1] = Nq * Nk; p.bias_s[2] = Nk; p.bias_s[3] = 1;
    std::uniform_int_distribution<int> hundred(0, 99);
    for (size_t e = 0; e < p.bias.value.size(); ++e) {
      const int64_t i = int64_t(e / Nk) % Nq;
      const bool row_masked = c.masked_rows && i % 7 == 3;
      p.bias.set(e, row_masked || hundred(rng) < 5 ? -kInf : 0.5 * normal(rng));
    }
  }
  if (c.rel_wh > 0) {
    p.table_size = (2 * c.rel_wh - 1) * (2 * c.rel_ww - 1) + 3;
    p.table_stride = p.table_size + 5;  // a padded head stride
    p.table.assign(size_t(H * p.table_stride), 0.f);
    for (auto& x : p.table) x = float(0.5 * normal(rng));
  }

  // ---- forward in float64: S, lse, O (rounded to the forward's output types)
  p.lse.assign(size_t(B * H * Nq), 0.f);
  p.out.resize(size_t(B * H * Nq * c.dv));
  std::vector<double> s(static_cast<size_t>(Nk));
  auto score_row = [&](int64_t b, int64_t h, int64_t i, std::vector<double>& row, std::vector<double>* dots) {
    for (int64_t j = 0; j < Nk; ++j) {
      int dot = 0;
      const int8_t* qi = &p.q_sign[size_t(((b * H + h) * Nq + i) * c.d)];
      const int8_t* kj = &p.k_sign[size_t(((b * H + h) * Nk + j) * c.d)];
      for (int e = 0; e < c.d; ++e) dot += qi[e] * kj[e];
      if (dots) (*dots)[size_t(j)] = dot;
      double v = p.scale * p.qa(b, h, i) * p.kb(b, h, j) * dot;
      if (c.dense_bias) v += p.bias.value[size_t(b * p.bias_s[0] + h * p.bias_s[1] + i * p.bias_s[2] + j)];
      if (c.rel_wh > 0) v += p.table[size_t(h * p.table_stride + p.rel_index(i, j))];
      if (c.causal && j > i) v = -kInf;
      row[size_t(j)] = v;
    }
  };
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < Nq; ++i) {
        score_row(b, h, i, s, nullptr);
        double m = -kInf;
        for (double x : s) m = std::max(m, x);
        double l = 0;
        if (m != -kInf) for (double x : s) l += std::exp(x - m);
        const double lse = m == -kInf ? -kInf : m + std::log(l);
        p.lse[size_t((b * H + h) * Nq + i)] = float(lse);
        for (int e = 0; e < c.dv; ++e) {
          double o = 0;
          if (m != -kInf)
            for (int64_t j = 0; j < Nk; ++j) o += std::exp(s[size_t(j)] - lse) * p.v.value[p.idx_v(b, h, j) + e];
          p.out.set(p.idx_o(b, h, i) + e, o);
        }
      }
  p.dout.resize(size_t(B * H * Nq * c.dv));
  for (size_t e = 0; e < p.dout.value.size(); ++e) p.dout.set(e, normal(rng));

  if (!c.check_reference) return p;

  // ---- backward in float64 from the rounded forward outputs
  p.dv.assign(size_t(B * H * Nk * c.dv), 0.0); p.m_dv = p.dv;
  p.dq_scale.assign(size_t(B * H * Nq), 0.0); p.m_dq_scale = p.dq_scale;
  p.dk_scale.assign(size_t(B * H * Nk), 0.0); p.m_dk_scale = p.dk_scale;
  p.dq_sign.assign(size_t(B * H * Nq * c.d), 0.0); p.m_dq_sign = p.dq_sign;
  p.dk_sign.assign(size_t(B * H * Nk * c.d), 0.0); p.m_dk_sign = p.dk_sign;
  p.dbias.assign(size_t(B * H * Nq * Nk), 0.0); p.m_dbias = p.dbias;
  p.drel.assign(size_t(H * p.table_size), 0.0); p.m_drel = p.drel;
  std::vector<double> dots(static_cast<size_t>(Nk));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < Nq; ++i) {
        score_row(b, h, i, s, &dots);
        const double lse = p.lse[size_t((b * H + h) * Nq + i)];
        const size_t oi = p.idx_o(b, h, i);
        double D = 0, D_abs = 0;
        for (int e = 0; e < c.dv; ++e) {
          D += p.dout.value[oi + e] * p.out.value[oi + e];
          D_abs += std::fabs(p.dout.value[oi + e] * p.out.value[oi + e]);
        }
        const double ai = p.qa(b, h, i);
        for (int64_t j = 0; j < Nk; ++j) {
          const double P = (lse == -kInf || s[size_t(j)] == -kInf) ? 0.0 : std::exp(s[size_t(j)] - lse);
          const size_t vj = p.idx_v(b, h, j);
          double dP = 0, dP_abs = 0;
          for (int e = 0; e < c.dv; ++e) {
            dP += p.dout.value[oi + e] * p.v.value[vj + e];
            dP_abs += std::fabs(p.dout.value[oi + e] * p.v.value[vj + e]);
          }
          const double dS = P * (dP - D);
          const double m = P * (dP_abs + D_abs);  // magnitude of dS's computation
          const double bj = p.kb(b, h, j), dot = dots[size_t(j)];
          for (int e = 0; e < c.dv; ++e) {
            const size_t k = size_t(((b * H + h) * Nk + j) * c.dv + e);
            p.dv[k] += P * p.dout.value[oi + e];
            p.m_dv[k] += P * std::fabs(p.dout.value[oi + e]);
          }
          const size_t qi = size_t((b * H + h) * Nq + i), kj = size_t((b * H + h) * Nk + j);
          p.dq_scale[qi] += dS * p.scale * bj * dot;
          p.m_dq_scale[qi] += m * std::fabs(p.scale * bj * dot);
          p.dk_scale[kj] += dS * p.scale * ai * dot;
          p.m_dk_scale[kj] += m * std::fabs(p.scale * ai * dot);
          const double f = p.scale * ai * bj;
          for (int e = 0; e < c.d; ++e) {
            p.dq_sign[qi * c.d + e] += f * dS * p.k_sign[kj * c.d + e];
            p.m_dq_sign[qi * c.d + e] += std::fabs(f) * m;
            p.dk_sign[kj * c.d + e] += f * dS * p.q_sign[qi * c.d + e];
            p.m_dk_sign[kj * c.d + e] += std::fabs(f) * m;
          }
          p.dbias[qi * Nk + j] = dS;
          p.m_dbias[qi * Nk + j] = m;
          if (c.rel_wh > 0) {
            const size_t r = size_t(h * p.table_size + p.rel_index(i, j));
            p.drel[r] += dS;
            p.m_drel[r] += m;
          }
        }
      }
  return p;
}

// ---------------------------------------------------------------- device run
struct Outputs {
  std::vector<float> dv, dq_scale, dk_scale, dq_sign, dk_sign, dbias, drel;
};

constexpr size_t kGuard = 64;

struct DeviceOutputs {
  DeviceBuffer<float> dv, dq_scale, dk_scale, dq_sign, dk_sign, dbias, drel;
};

// Runs attention_bwd with the outputs of `mask` (dv, dq_scale, dk_scale, dq_sign, dk_sign, dbias,
// drel) and returns them (empty when not wanted). Checks the guard floats.
void run_device(const Problem& p, const bool (&mask)[7], Outputs& o) {
  const BwdCase& c = p.c;
  const int64_t BH = c.B * c.H;
  DeviceBuffer<uint32_t> q_bits(p.q_bits.size()), k_bits(p.k_bits.size());
  BF_ASSERT_CUDA(q_bits.upload(p.q_bits));
  BF_ASSERT_CUDA(k_bits.upload(p.k_bits));
  DeviceBuffer<uint8_t> v(p.v.bytes.size()), out(p.out.bytes.size()), dout(p.dout.bytes.size());
  BF_ASSERT_CUDA(v.upload(p.v.bytes));
  BF_ASSERT_CUDA(out.upload(p.out.bytes));
  BF_ASSERT_CUDA(dout.upload(p.dout.bytes));
  DeviceBuffer<float> lse(p.lse.size()), q_scale(p.q_scale.size()), k_scale(p.k_scale.size()), table(p.table.size());
  BF_ASSERT_CUDA(lse.upload(p.lse));
  if (!p.q_scale.empty()) BF_ASSERT_CUDA(q_scale.upload(p.q_scale));
  if (!p.k_scale.empty()) BF_ASSERT_CUDA(k_scale.upload(p.k_scale));
  if (!p.table.empty()) BF_ASSERT_CUDA(table.upload(p.table));
  DeviceBuffer<uint8_t> bias(p.bias.bytes.size());
  if (c.dense_bias) BF_ASSERT_CUDA(bias.upload(p.bias.bytes));

  const size_t sizes[7] = {size_t(BH * c.Nk * c.dv), size_t(BH * c.Nq), size_t(BH * c.Nk),
                           size_t(BH * c.Nq * c.d), size_t(BH * c.Nk * c.d), size_t(BH * c.Nq * c.Nk),
                           size_t(c.H * p.table_size)};
  DeviceBuffer<float> outs[7];
  for (int k = 0; k < 7; ++k) {
    if (mask[k]) {
      BF_ASSERT_CUDA(outs[k].reset(sizes[k] + kGuard));
      BF_ASSERT_CUDA(outs[k].poison(0xff));
    }
  }

  AttentionBwdParams prm{};
  prm.B = c.B; prm.H = c.H; prm.Nq = c.Nq; prm.Nk = c.Nk;
  prm.head_dim = c.d; prm.v_dim = c.dv;
  prm.q_bits = q_bits.get(); prm.k_bits = k_bits.get();
  const size_t es = p.v.elem();
  prm.v = v.get() + c.v_offset * es; prm.v_dtype = c.v_dtype;
  prm.out = out.get(); prm.dout = dout.get();
  for (int k = 0; k < 3; ++k) {
    prm.q_stride[k] = p.qs[k]; prm.k_stride[k] = p.ks[k]; prm.v_stride[k] = p.vs[k];
    prm.out_stride[k] = p.os[k]; prm.dout_stride[k] = p.os[k];
    prm.q_scale_stride[k] = p.q_scale_s[k]; prm.k_scale_stride[k] = p.k_scale_s[k];
  }
  prm.lse = lse.get();
  prm.q_scale = c.q_scale == ScaleMode::kNone ? nullptr : q_scale.get();
  prm.k_scale = c.k_scale == ScaleMode::kNone ? nullptr : k_scale.get();
  prm.bias = c.dense_bias ? bias.get() : nullptr;
  prm.bias_dtype = c.bias_dtype;
  for (int k = 0; k < 4; ++k) prm.bias_stride[k] = p.bias_s[k];
  prm.rel_pos_table = c.rel_wh > 0 ? table.get() : nullptr;
  prm.rel_pos_table_stride_h = p.table_stride;
  prm.rel_pos_wh = c.rel_wh; prm.rel_pos_ww = c.rel_ww; prm.num_prefix_tokens = c.num_prefix;
  prm.scale = float(p.scale);
  prm.causal = c.causal;
  prm.dv = mask[0] ? outs[0].get() : nullptr;
  prm.dq_scale = mask[1] ? outs[1].get() : nullptr;
  prm.dk_scale = mask[2] ? outs[2].get() : nullptr;
  prm.dq_sign = mask[3] ? outs[3].get() : nullptr;
  prm.dk_sign = mask[4] ? outs[4].get() : nullptr;
  prm.dbias = mask[5] ? outs[5].get() : nullptr;
  prm.drel_pos_table = mask[6] ? outs[6].get() : nullptr;

  const size_t ws_bytes = cuda::attention_bwd_workspace_bytes(prm);
  DeviceBuffer<uint8_t> ws(ws_bytes);
  BF_ASSERT_CUDA(ws.poison(0xff));
  prm.workspace = ws_bytes ? ws.get() : nullptr;
  BF_ASSERT_CUDA(cuda::attention_bwd(prm, nullptr));
  BF_ASSERT_CUDA(cudaDeviceSynchronize());

  std::vector<float>* dst[7] = {&o.dv, &o.dq_scale, &o.dk_scale, &o.dq_sign, &o.dk_sign, &o.dbias, &o.drel};
  const char* names[7] = {"dv", "dq_scale", "dk_scale", "dq_sign", "dk_sign", "dbias", "drel_pos_table"};
  for (int k = 0; k < 7; ++k) {
    dst[k]->clear();
    if (!mask[k]) continue;
    std::vector<float> all;
    BF_ASSERT_CUDA(outs[k].download(all));
    size_t guard_bad = 0;
    for (size_t e = sizes[k]; e < sizes[k] + kGuard; ++e) {
      uint32_t u;
      std::memcpy(&u, &all[e], 4);
      guard_bad += u != 0xffffffffu;
    }
    EXPECT_EQ(guard_bad, 0u) << names[k] << ": writes past the end of the output";
    all.resize(sizes[k]);
    *dst[k] = std::move(all);
  }
}

// |got - want| <= rtol * mag + 1e-6 * max(mag); NaN fails.
void compare(const char* name, const std::vector<float>& got, const std::vector<double>& want,
             const std::vector<double>& mag, double rtol, const std::vector<int64_t>& dims) {
  ASSERT_EQ(got.size(), want.size()) << name;
  double max_mag = 0;
  for (double m : mag) max_mag = std::max(max_mag, m);
  const double floor = 1e-6 * max_mag;
  size_t bad = 0, first = 0;
  double max_err = 0, worst_ratio = 0;
  for (size_t e = 0; e < got.size(); ++e) {
    const double err = std::fabs(double(got[e]) - want[e]);
    const double tol = rtol * mag[e] + floor;
    if (!(err <= tol)) {
      if (bad++ == 0) first = e;
    }
    if (err > max_err || std::isnan(err)) max_err = std::isnan(err) ? kInf : err;
    if (tol > 0) worst_ratio = std::max(worst_ratio, err / tol);
  }
  if (bad) {
    std::ostringstream idx;
    size_t rest = first;
    std::vector<int64_t> coord(dims.size());
    for (size_t k = dims.size(); k-- > 0;) {
      coord[k] = int64_t(rest % size_t(dims[k]));
      rest /= size_t(dims[k]);
    }
    for (size_t k = 0; k < coord.size(); ++k) idx << (k ? "," : "") << coord[k];
    ADD_FAILURE() << name << ": " << bad << " of " << got.size() << " elements out of tolerance; max |err| "
                  << max_err << ", worst err/tol " << worst_ratio << "; first at [" << idx.str() << "]: got "
                  << got[first] << " want " << want[first] << " tol " << rtol * mag[first] + floor;
  }
}

void expect_bitwise_equal(const char* name, const std::vector<float>& a, const std::vector<float>& b) {
  ASSERT_EQ(a.size(), b.size()) << name;
  if (a.empty()) return;
  size_t first = a.size();
  for (size_t e = 0; e < a.size(); ++e) {
    if (std::memcmp(&a[e], &b[e], 4) != 0) { first = e; break; }
  }
  EXPECT_EQ(first, a.size()) << name << ": runs differ first at element " << first << ": " << a[first]
                             << " vs " << b[first];
}

void run_case(const BwdCase& c, std::mt19937_64& rng) {
  SCOPED_TRACE(describe(c));
  const Problem p = build_problem(c, rng);
  const bool has_rel = c.rel_wh > 0;
  const bool all[7] = {true, true, true, true, true, c.dense_bias || has_rel, has_rel};
  Outputs first, second, hamming;
  run_device(p, all, first);
  if (::testing::Test::HasFatalFailure()) return;
  run_device(p, all, second);
  if (::testing::Test::HasFatalFailure()) return;
  const bool hamming_mask[7] = {true, true, true, false, false, false, false};
  run_device(p, hamming_mask, hamming);
  if (::testing::Test::HasFatalFailure()) return;

  // Determinism: the same inputs give the same bits; the hamming-only run shares its pass.
  expect_bitwise_equal("dv (run 2)", first.dv, second.dv);
  expect_bitwise_equal("dq_scale (run 2)", first.dq_scale, second.dq_scale);
  expect_bitwise_equal("dk_scale (run 2)", first.dk_scale, second.dk_scale);
  expect_bitwise_equal("dq_sign (run 2)", first.dq_sign, second.dq_sign);
  expect_bitwise_equal("dk_sign (run 2)", first.dk_sign, second.dk_sign);
  expect_bitwise_equal("dbias (run 2)", first.dbias, second.dbias);
  expect_bitwise_equal("drel (run 2)", first.drel, second.drel);
  expect_bitwise_equal("dv (hamming-only run)", first.dv, hamming.dv);
  expect_bitwise_equal("dq_scale (hamming-only run)", first.dq_scale, hamming.dq_scale);
  expect_bitwise_equal("dk_scale (hamming-only run)", first.dk_scale, hamming.dk_scale);

  if (!c.check_reference) return;
  const double n_max = double(std::max(c.Nq, c.Nk));
  const double rtol_f = 1e-4 + n_max * 6e-8;
  const double u_t = c.v_dtype == DType::kFloat16 ? std::ldexp(1.0, -11)
                     : c.v_dtype == DType::kBFloat16 ? std::ldexp(1.0, -8) : 0.0;
  // Only the tensor-core path rounds matmul operands to v's dtype; the CUDA-core path (fp32 v,
  // misaligned fp16/bf16) stays in fp32, but the bound is the same either way.
  const double rtol_t = rtol_f + u_t;
  const int64_t B = c.B, H = c.H;
  compare("dv", first.dv, p.dv, p.m_dv, rtol_t, {B, H, c.Nk, c.dv});
  compare("dq_scale", first.dq_scale, p.dq_scale, p.m_dq_scale, rtol_f, {B, H, c.Nq});
  compare("dk_scale", first.dk_scale, p.dk_scale, p.m_dk_scale, rtol_f, {B, H, c.Nk});
  compare("dq_sign", first.dq_sign, p.dq_sign, p.m_dq_sign, rtol_t, {B, H, c.Nq, c.d});
  compare("dk_sign", first.dk_sign, p.dk_sign, p.m_dk_sign, rtol_t, {B, H, c.Nk, c.d});
  if (c.dense_bias || has_rel) compare("dbias", first.dbias, p.dbias, p.m_dbias, rtol_f, {B, H, c.Nq, c.Nk});
  if (has_rel) compare("drel_pos_table", first.drel, p.drel, p.m_drel, rtol_f, {H, p.table_size});
}

// ---------------------------------------------------------------- the cases
TEST(AttentionBwd, TensorCoreHeadDims) {
  BF_REQUIRE_GPU();
  std::mt19937_64 rng(11);
  for (DType t : {DType::kFloat16, DType::kBFloat16}) {
    BwdCase c;
    c.v_dtype = t;
    c.B = 2; c.H = 3; c.Nq = 37; c.Nk = 53; c.d = 64; c.dv = 64;
    c.q_scale = ScaleMode::kPerToken; c.k_scale = ScaleMode::kPerToken;
    run_case(c, rng);
    c.B = 1; c.H = 2; c.Nq = 130; c.Nk = 129; c.d = 128; c.dv = 128;
    c.q_scale = ScaleMode::kPerHead; c.k_scale = ScaleMode::kNone;
    run_case(c, rng);
    c.Nq = 65; c.Nk = 70; c.d = 72; c.dv = 40;  // hdim128 bucket, Dv not a multiple of 16
    run_case(c, rng);
    c.Nq = 70; c.Nk = 90; c.d = 24; c.dv = 16;  // small dims: one word, one k-step
    c.k_scale = ScaleMode::kPerToken;
    run_case(c, rng);
    c.Nq = 33; c.Nk = 47; c.d = 256; c.dv = 256;  // generic bucket
    run_case(c, rng);
    c.Nq = 40; c.Nk = 41; c.d = 160; c.dv = 200;
    run_case(c, rng);
    if (HasFailure()) return;
  }
}

TEST(AttentionBwd, CausalAndUnequalLengths) {
  BF_REQUIRE_GPU();
  std::mt19937_64 rng(12);
  for (DType t : {DType::kFloat16, DType::kBFloat16}) {
    BwdCase c;
    c.v_dtype = t;
    c.causal = true;
    c.B = 1; c.H = 2; c.Nq = 300; c.Nk = 300; c.d = 64; c.dv = 64;
    c.q_scale = ScaleMode::kPerToken; c.k_scale = ScaleMode::kPerToken;
    run_case(c, rng);
    c.Nq = 100; c.Nk = 260;  // keys past the last query: fully masked key blocks
    run_case(c, rng);
    c.Nq = 260; c.Nk = 100;
    c.d = 128; c.dv = 64;
    run_case(c, rng);
    c.causal = false;
    c.Nq = 1; c.Nk = 200;
    run_case(c, rng);
    c.Nq = 200; c.Nk = 1;
    run_case(c, rng);
    if (HasFailure()) return;
  }
}

TEST(AttentionBwd, DenseBiasMaskedRowsAndLayouts) {
  BF_REQUIRE_GPU();
  std::mt19937_64 rng(13);
  for (DType bt : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    BwdCase c;
    c.v_dtype = bt == DType::kBFloat16 ? DType::kBFloat16 : DType::kFloat16;
    c.B = 2; c.H = 2; c.Nq = 77; c.Nk = 93; c.d = 64; c.dv = 32;
    c.dense_bias = true; c.bias_dtype = bt; c.masked_rows = true;
    c.q_scale = ScaleMode::kPerToken;
    run_case(c, rng);
    c.bias_broadcast_batch = true;
    c.bnhd_layout = true;
    c.causal = true;
    run_case(c, rng);
    if (HasFailure()) return;
  }
}

TEST(AttentionBwd, RelativePositionTable) {
  BF_REQUIRE_GPU();
  std::mt19937_64 rng(14);
  for (DType t : {DType::kFloat16, DType::kBFloat16}) {
    BwdCase c;
    c.v_dtype = t;
    c.B = 2; c.H = 3; c.d = 64; c.dv = 64;
    c.q_scale = ScaleMode::kPerHead; c.k_scale = ScaleMode::kPerHead;  // BinaryAttention's alphas
    c.rel_wh = 5; c.rel_ww = 7; c.num_prefix = 1;
    c.Nq = c.Nk = 1 + 35;
    run_case(c, rng);
    c.rel_wh = 14; c.rel_ww = 14;  // ViT-S/16 at 224: 197 tokens, several key blocks
    c.Nq = c.Nk = 197;
    c.B = 1;
    run_case(c, rng);
    c.rel_wh = 8; c.rel_ww = 9; c.num_prefix = 0;  // no cls token
    c.Nq = c.Nk = 72;
    c.dense_bias = true;  // both biases at once
    c.d = 128; c.dv = 96;
    run_case(c, rng);
    if (HasFailure()) return;
  }
}

TEST(AttentionBwd, CudaCorePath) {
  BF_REQUIRE_GPU();
  std::mt19937_64 rng(15);
  BwdCase c;
  c.v_dtype = DType::kFloat32;
  c.B = 2; c.H = 2; c.Nq = 45; c.Nk = 70; c.d = 64; c.dv = 48;
  c.q_scale = ScaleMode::kPerToken; c.k_scale = ScaleMode::kPerToken;
  run_case(c, rng);
  c.causal = true; c.Nq = 70; c.Nk = 45; c.d = 256; c.dv = 256;
  run_case(c, rng);
  c.causal = false;
  c.rel_wh = 6; c.rel_ww = 5; c.num_prefix = 1; c.Nq = c.Nk = 31;
  c.d = 40; c.dv = 24;
  c.dense_bias = true; c.masked_rows = true;
  run_case(c, rng);
  // fp16 / bf16 whose v pointer breaks 16-byte alignment: the CUDA-core path too.
  for (DType t : {DType::kFloat16, DType::kBFloat16}) {
    BwdCase m;
    m.v_dtype = t;
    m.v_offset = 3;
    m.B = 1; m.H = 3; m.Nq = 50; m.Nk = 66; m.d = 96; m.dv = 64; m.causal = true;
    m.k_scale = ScaleMode::kPerToken;
    run_case(m, rng);
  }
}

TEST(AttentionBwd, LongerSequences) {
  BF_REQUIRE_GPU();
  std::mt19937_64 rng(16);
  BwdCase c;
  c.B = 1; c.H = 2; c.Nq = 640; c.Nk = 700; c.d = 64; c.dv = 64;
  c.q_scale = ScaleMode::kPerToken; c.k_scale = ScaleMode::kPerToken;
  run_case(c, rng);
  c.v_dtype = DType::kBFloat16; c.causal = true; c.d = 128; c.dv = 128; c.Nq = c.Nk = 513;
  run_case(c, rng);
  // Determinism only (no float64 reference) at a size where many CTAs run concurrently.
  BwdCase big;
  big.B = 2; big.H = 4; big.Nq = big.Nk = 2048; big.d = 64; big.dv = 64;
  big.q_scale = ScaleMode::kPerToken; big.k_scale = ScaleMode::kPerToken;
  big.check_reference = false;
  run_case(big, rng);
}

TEST(AttentionBwd, RejectsBadArguments) {
  AttentionBwdParams p{};
  p.B = 1; p.H = 1; p.Nq = 4; p.Nk = 4; p.head_dim = 12; p.v_dim = 8;  // d not a multiple of 8
  EXPECT_EQ(cuda::attention_bwd(p, nullptr), cudaErrorInvalidValue);
  p.head_dim = 64; p.v_dim = 264;
  EXPECT_EQ(cuda::attention_bwd(p, nullptr), cudaErrorInvalidValue);
  p.v_dim = 64; p.v_dtype = DType::kInt8;
  EXPECT_EQ(cuda::attention_bwd(p, nullptr), cudaErrorInvalidValue);
}

// Timing of the backward at the SPEC's reference shape. Not a pass/fail test: run with
// --gtest_also_run_disabled_tests --gtest_filter='*AttentionBwdBench*' and compare "hamming"
// with FlashAttention-2's backward at the same shape (SPEC target: >= 1.5x faster at N >= 1024).
TEST(AttentionBwdBench, DISABLED_B4H16N4096) {
  BF_REQUIRE_GPU();
  for (int d : {64, 128}) {
    BwdCase c;
    c.B = 4; c.H = 16; c.Nq = c.Nk = 4096; c.d = d; c.dv = d;
    c.q_scale = ScaleMode::kPerToken; c.k_scale = ScaleMode::kPerToken;
    c.check_reference = false;
    const int64_t BH = c.B * c.H;
    // Synthetic inputs on the device (timing does not depend on the values beyond masking).
    DeviceBuffer<uint32_t> q_bits(size_t(BH * c.Nq * words_for(d))), k_bits(size_t(BH * c.Nk * words_for(d)));
    DeviceBuffer<uint16_t> v(size_t(BH * c.Nk * d)), out(size_t(BH * c.Nq * d)), dout(size_t(BH * c.Nq * d));
    DeviceBuffer<float> lse(size_t(BH * c.Nq)), qs(size_t(BH * c.Nq)), ks(size_t(BH * c.Nk));
    BF_ASSERT_CUDA(q_bits.poison(0x5a)); BF_ASSERT_CUDA(k_bits.poison(0x3c));
    BF_ASSERT_CUDA(v.poison(0x30)); BF_ASSERT_CUDA(out.poison(0x30)); BF_ASSERT_CUDA(dout.poison(0x31));
    BF_ASSERT_CUDA(lse.poison(0x41)); BF_ASSERT_CUDA(qs.poison(0x3f)); BF_ASSERT_CUDA(ks.poison(0x3f));
    DeviceBuffer<float> dv(size_t(BH * c.Nk * d)), dq_scale(size_t(BH * c.Nq)), dk_scale(size_t(BH * c.Nk));
    DeviceBuffer<float> dq_sign(size_t(BH * c.Nq * d)), dk_sign(size_t(BH * c.Nk * d));
    for (bool causal : {false, true}) {
      for (int mode = 0; mode < 2; ++mode) {  // 0: hamming (dv, dq_scale, dk_scale); 1: + signs
        AttentionBwdParams p{};
        p.B = c.B; p.H = c.H; p.Nq = c.Nq; p.Nk = c.Nk; p.head_dim = d; p.v_dim = d;
        const int w = words_for(d);
        p.q_bits = q_bits.get(); p.k_bits = k_bits.get();
        p.q_stride[0] = c.H * c.Nq * w; p.q_stride[1] = c.Nq * w; p.q_stride[2] = w;
        p.k_stride[0] = c.H * c.Nk * w; p.k_stride[1] = c.Nk * w; p.k_stride[2] = w;
        p.v = v.get(); p.out = out.get(); p.dout = dout.get(); p.v_dtype = DType::kFloat16;
        for (auto* s : {p.v_stride, p.out_stride, p.dout_stride}) { s[0] = c.H * c.Nq * d; s[1] = c.Nq * d; s[2] = d; }
        p.lse = lse.get();
        p.q_scale = qs.get(); p.q_scale_stride[0] = c.H * c.Nq; p.q_scale_stride[1] = c.Nq; p.q_scale_stride[2] = 1;
        p.k_scale = ks.get(); p.k_scale_stride[0] = c.H * c.Nk; p.k_scale_stride[1] = c.Nk; p.k_scale_stride[2] = 1;
        p.scale = 0.125f; p.causal = causal;
        p.dv = dv.get(); p.dq_scale = dq_scale.get(); p.dk_scale = dk_scale.get();
        if (mode == 1) { p.dq_sign = dq_sign.get(); p.dk_sign = dk_sign.get(); }
        DeviceBuffer<uint8_t> ws(cuda::attention_bwd_workspace_bytes(p));
        p.workspace = ws.get();
        cudaEvent_t start, stop;
        BF_ASSERT_CUDA(cudaEventCreate(&start));
        BF_ASSERT_CUDA(cudaEventCreate(&stop));
        for (int i = 0; i < 3; ++i) BF_ASSERT_CUDA(cuda::attention_bwd(p, nullptr));
        const int iters = 10;
        BF_ASSERT_CUDA(cudaEventRecord(start));
        for (int i = 0; i < iters; ++i) BF_ASSERT_CUDA(cuda::attention_bwd(p, nullptr));
        BF_ASSERT_CUDA(cudaEventRecord(stop));
        BF_ASSERT_CUDA(cudaEventSynchronize(stop));
        float ms = 0;
        BF_ASSERT_CUDA(cudaEventElapsedTime(&ms, start, stop));
        std::printf("attention_bwd B=4 H=16 N=4096 d=Dv=%d fp16 %s %s: %.3f ms\n", d,
                    causal ? "causal" : "full", mode == 0 ? "hamming (dv, dq_scale, dk_scale)" : "all (+ dq_sign, dk_sign)",
                    ms / iters);
        cudaEventDestroy(start);
        cudaEventDestroy(stop);
      }
    }
  }
}

}  // namespace
}  // namespace binformer::test
