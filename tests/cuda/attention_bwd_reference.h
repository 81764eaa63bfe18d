// float64 reference of attention_bwd for the GoogleTest (test_attention_bwd.cu) and the host
// emulator (emulation/emulate_attention_bwd.cpp): random problems, the forward in float64 (lse and
// O rounded to what the forward hands the backward), the backward of the same math, per-element
// magnitudes for the tolerances, the AttentionBwdParams of a problem, and the comparison.
// Host-only: no CUDA or GoogleTest headers.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "binformer/params.h"
#include "host_float_bits.h"

namespace binformer::test {

inline constexpr double kInf = std::numeric_limits<double>::infinity();

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

inline std::string describe(const BwdCase& c) {
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

inline void fill_scale(ScaleMode mode, int64_t B, int64_t H, int64_t N, std::vector<float>& v, int64_t (&s)[3],
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

inline Problem build_problem(const BwdCase& c, std::mt19937_64& rng) {
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

// |got - want| <= rtol * mag + 1e-6 * max(mag) for every element; NaN fails. Returns "" when all
// elements pass, else a report (count, max error, worst err/tol, first bad index and values).
inline std::string compare_outputs(const char* name, const std::vector<float>& got, const std::vector<double>& want,
                                   const std::vector<double>& mag, double rtol, const std::vector<int64_t>& dims) {
  if (got.size() != want.size()) return std::string(name) + ": size mismatch";
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
    if (std::isnan(err)) max_err = kInf;
    else max_err = std::max(max_err, err);
    if (tol > 0) worst_ratio = std::max(worst_ratio, err / tol);
  }
  if (!bad) return "";
  std::ostringstream idx;
  size_t rest = first;
  std::vector<int64_t> coord(dims.size());
  for (size_t k = dims.size(); k-- > 0;) {
    coord[k] = int64_t(rest % size_t(dims[k]));
    rest /= size_t(dims[k]);
  }
  for (size_t k = 0; k < coord.size(); ++k) idx << (k ? "," : "") << coord[k];
  std::ostringstream msg;
  msg << name << ": " << bad << " of " << got.size() << " elements out of tolerance; max |err| " << max_err
      << ", worst err/tol " << worst_ratio << "; first at [" << idx.str() << "]: got " << got[first] << " want "
      << want[first] << " tol " << rtol * mag[first] + floor;
  return msg.str();
}

// The seven outputs in AttentionBwdParams order.
struct Outputs {
  std::vector<float> dv, dq_scale, dk_scale, dq_sign, dk_sign, dbias, drel;
  std::vector<float>& at(int k) {
    std::vector<float>* all[7] = {&dv, &dq_scale, &dk_scale, &dq_sign, &dk_sign, &dbias, &drel};
    return *all[k];
  }
};
inline const char* const kOutputNames[7] = {"dv", "dq_scale", "dk_scale", "dq_sign", "dk_sign", "dbias",
                                            "drel_pos_table"};

// Element counts of the seven outputs.
inline void output_sizes(const Problem& p, size_t (&sizes)[7]) {
  const BwdCase& c = p.c;
  const int64_t BH = c.B * c.H;
  sizes[0] = size_t(BH * c.Nk * c.dv);
  sizes[1] = size_t(BH * c.Nq);
  sizes[2] = size_t(BH * c.Nk);
  sizes[3] = size_t(BH * c.Nq * c.d);
  sizes[4] = size_t(BH * c.Nk * c.d);
  sizes[5] = size_t(BH * c.Nq * c.Nk);
  sizes[6] = size_t(c.H * p.table_size);
}

// Where the inputs live (device memory for the GoogleTest, host memory for the emulator).
struct InputPointers {
  const uint32_t* q_bits; const uint32_t* k_bits;
  const uint8_t* v; const uint8_t* out; const uint8_t* dout;  // v without its v_offset
  const float* lse; const float* q_scale; const float* k_scale; const float* table;
  const uint8_t* bias;
};

inline AttentionBwdParams make_params(const Problem& p, const InputPointers& in, float* const (&outs)[7]) {
  const BwdCase& c = p.c;
  AttentionBwdParams prm{};
  prm.B = c.B; prm.H = c.H; prm.Nq = c.Nq; prm.Nk = c.Nk;
  prm.head_dim = c.d; prm.v_dim = c.dv;
  prm.q_bits = in.q_bits; prm.k_bits = in.k_bits;
  prm.v = in.v + c.v_offset * p.v.elem(); prm.v_dtype = c.v_dtype;
  prm.out = in.out; prm.dout = in.dout;
  for (int k = 0; k < 3; ++k) {
    prm.q_stride[k] = p.qs[k]; prm.k_stride[k] = p.ks[k]; prm.v_stride[k] = p.vs[k];
    prm.out_stride[k] = p.os[k]; prm.dout_stride[k] = p.os[k];
    prm.q_scale_stride[k] = p.q_scale_s[k]; prm.k_scale_stride[k] = p.k_scale_s[k];
  }
  prm.lse = in.lse;
  prm.q_scale = c.q_scale == ScaleMode::kNone ? nullptr : in.q_scale;
  prm.k_scale = c.k_scale == ScaleMode::kNone ? nullptr : in.k_scale;
  prm.bias = c.dense_bias ? in.bias : nullptr;
  prm.bias_dtype = c.bias_dtype;
  for (int k = 0; k < 4; ++k) prm.bias_stride[k] = p.bias_s[k];
  prm.rel_pos_table = c.rel_wh > 0 ? in.table : nullptr;
  prm.rel_pos_table_stride_h = p.table_stride;
  prm.rel_pos_wh = c.rel_wh; prm.rel_pos_ww = c.rel_ww; prm.num_prefix_tokens = c.num_prefix;
  prm.scale = float(p.scale);
  prm.causal = c.causal;
  prm.dv = outs[0]; prm.dq_scale = outs[1]; prm.dk_scale = outs[2]; prm.dq_sign = outs[3];
  prm.dk_sign = outs[4]; prm.dbias = outs[5]; prm.drel_pos_table = outs[6];
  return prm;
}

// Compares every wanted output with the reference (tolerances: see test_attention_bwd.cu).
// Returns one report line per failing output.
inline std::vector<std::string> check_against_reference(const Problem& p, const Outputs& o) {
  const BwdCase& c = p.c;
  const bool has_rel = c.rel_wh > 0;
  const double n_max = double(std::max(c.Nq, c.Nk));
  const double rtol_f = 1e-4 + n_max * 6e-8;
  const double u_t = c.v_dtype == DType::kFloat16 ? std::ldexp(1.0, -11)
                     : c.v_dtype == DType::kBFloat16 ? std::ldexp(1.0, -8) : 0.0;
  const double rtol_t = rtol_f + u_t;
  const int64_t B = c.B, H = c.H;
  std::vector<std::string> fails;
  auto add = [&](std::string m) { if (!m.empty()) fails.push_back(std::move(m)); };
  if (!o.dv.empty()) add(compare_outputs("dv", o.dv, p.dv, p.m_dv, rtol_t, {B, H, c.Nk, c.dv}));
  if (!o.dq_scale.empty()) add(compare_outputs("dq_scale", o.dq_scale, p.dq_scale, p.m_dq_scale, rtol_f, {B, H, c.Nq}));
  if (!o.dk_scale.empty()) add(compare_outputs("dk_scale", o.dk_scale, p.dk_scale, p.m_dk_scale, rtol_f, {B, H, c.Nk}));
  if (!o.dq_sign.empty()) add(compare_outputs("dq_sign", o.dq_sign, p.dq_sign, p.m_dq_sign, rtol_t, {B, H, c.Nq, c.d}));
  if (!o.dk_sign.empty()) add(compare_outputs("dk_sign", o.dk_sign, p.dk_sign, p.m_dk_sign, rtol_t, {B, H, c.Nk, c.d}));
  if (!o.dbias.empty()) add(compare_outputs("dbias", o.dbias, p.dbias, p.m_dbias, rtol_f, {B, H, c.Nq, c.Nk}));
  if (!o.drel.empty() && has_rel) {
    add(compare_outputs("drel_pos_table", o.drel, p.drel, p.m_drel, rtol_f, {H, p.table_size}));
  }
  return fails;
}

}  // namespace binformer::test
