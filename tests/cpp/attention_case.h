// One attention problem for the tests: inputs in the kernels' dtypes/layouts, the params
// structs that point at them, and float64 references of the forward and backward.
#pragma once
#include <algorithm>
#include <sstream>

#include "test_util.h"

namespace bt {

enum class ScaleMode { kNone, kPerHead, kPerToken };
// Dense bias broadcast patterns (which dims of [B, H, Nq, Nk] have stride 0).
enum class BiasMode { kNone, kFull, kPerHead /* [1,H,Nq,Nk] */, kPerBatch /* [B,1,Nq,Nk] */, kKeyRow /* [B,H,1,Nk] */ };

struct CaseSpec {
  int64_t B = 1, H = 1, Nq = 8, Nk = 8;
  int d = 64, dv = 64;
  DType q_dtype = DType::kFloat32, k_dtype = DType::kFloat32;  // kBits: packed by the test
  DType v_dtype = DType::kFloat32;                             // also the out dtype
  Layout layout = Layout::kBHN;
  ScaleMode q_scale = ScaleMode::kNone, k_scale = ScaleMode::kNone;
  BiasMode bias = BiasMode::kNone;
  DType bias_dtype = DType::kFloat32;
  int rel_wh = 0, rel_ww = 0, num_prefix = 0;  // rel-pos table when rel_wh > 0
  bool causal = false;
  bool pv_int8 = false;
  float scale = 0;            // 0: 1/sqrt(d)
  double masked_row_fraction = 0;  // rows whose dense bias is all -inf
  double neg_inf_bias_fraction = 0;  // scattered -inf bias entries
  bool special_signs = false;  // q/k contain +-0 and NaN (sign rule: all give +1)
  uint64_t seed = 1;

  std::string str() const {
    std::ostringstream s;
    s << "B" << B << " H" << H << " Nq" << Nq << " Nk" << Nk << " d" << d << " dv" << dv << " q:" << dtype_name(q_dtype)
      << " k:" << dtype_name(k_dtype) << " v:" << dtype_name(v_dtype) << (layout == Layout::kBNH ? " BNH" : "")
      << " qs" << int(q_scale) << " ks" << int(k_scale) << " bias" << int(bias) << ":" << dtype_name(bias_dtype)
      << " rel" << rel_wh << "x" << rel_ww << "+" << num_prefix << (causal ? " causal" : "") << (pv_int8 ? " pv_int8" : "")
      << " masked" << masked_row_fraction << " seed" << seed;
    return s.str();
  }
};

struct AttentionCase {
  CaseSpec spec;
  float scale = 0;
  // Logical (double) inputs.
  Tensor4 q, k, v;                 // q/k float tensors (also when spec says kBits: the source)
  Tensor4 q_bits, k_bits;          // packed [B,H,N,W] when kBits
  std::vector<float> q_scale, k_scale;   // contiguous [B,H,N] (per-head: replicated)
  int64_t q_scale_stride[3] = {0, 0, 0}, k_scale_stride[3] = {0, 0, 0};
  Tensor4 bias;                    // with broadcast strides
  std::vector<float> rel_table;    // [H, T]
  int64_t rel_T = 0;
  std::vector<float> v_dequant;    // [B,H,Dv] (pv_int8)
  std::vector<double> v_real;      // [B,H,Nk,Dv] the V that the reference multiplies by

  double qv(int64_t b, int64_t h, int64_t i, int c) const { return q.value(b, h, i, c); }
  double a(int64_t b, int64_t h, int64_t i) const {
    return q_scale.empty() ? 1.0 : q_scale[size_t(b * q_scale_stride[0] + h * q_scale_stride[1] + i * q_scale_stride[2])];
  }
  double bcol(int64_t b, int64_t h, int64_t j) const {
    return k_scale.empty() ? 1.0 : k_scale[size_t(b * k_scale_stride[0] + h * k_scale_stride[1] + j * k_scale_stride[2])];
  }
  int dot(int64_t b, int64_t h, int64_t i, int64_t j) const {
    int s = 0;
    for (int c = 0; c < spec.d; ++c) s += (sign_bit(q.value(b, h, i, c)) == sign_bit(k.value(b, h, j, c))) ? 1 : -1;
    return s;
  }
  double additive(int64_t b, int64_t h, int64_t i, int64_t j) const {
    double add = 0;
    if (spec.bias != BiasMode::kNone) add += bias.value(b, h, i, j);
    if (!rel_table.empty())
      add += rel_table[size_t(h * rel_T + binformer::rel_pos_index(i, j, spec.rel_wh, spec.rel_ww, spec.num_prefix))];
    return add;
  }
  bool masked(int64_t i, int64_t j) const { return spec.causal && j > i; }
  // Score (double), -inf when masked.
  double score(int64_t b, int64_t h, int64_t i, int64_t j) const {
    if (masked(i, j)) return -INFINITY;
    return double(scale) * a(b, h, i) * bcol(b, h, j) * dot(b, h, i, j) + additive(b, h, i, j);
  }
  double vreal(int64_t b, int64_t h, int64_t j, int c) const {
    return v_real[size_t(((b * spec.H + h) * spec.Nk + j) * spec.dv + c)];
  }
};

inline AttentionCase make_case(const CaseSpec& spec) {
  AttentionCase t;
  t.spec = spec;
  t.scale = spec.scale != 0 ? spec.scale : float(1.0 / std::sqrt(double(spec.d)));
  std::mt19937_64 rng(spec.seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uni(0.0f, 1.0f);
  const int64_t B = spec.B, H = spec.H, Nq = spec.Nq, Nk = spec.Nk;

  auto float_dtype = [](DType d) { return d == DType::kBits ? DType::kFloat32 : d; };
  t.q = make_tensor({B, H, Nq, spec.d}, float_dtype(spec.q_dtype), spec.layout);
  t.k = make_tensor({B, H, Nk, spec.d}, float_dtype(spec.k_dtype), spec.layout);
  auto sign_gen = [&](int64_t, int64_t, int64_t, int64_t) {
    if (spec.special_signs) {
      const float u = uni(rng);
      if (u < 0.1f) return 0.0f;
      if (u < 0.2f) return -0.0f;
      if (u < 0.3f) return std::numeric_limits<float>::quiet_NaN();
    }
    return normal(rng);
  };
  fill(t.q, sign_gen);
  fill(t.k, sign_gen);
  auto pack_into = [&](const Tensor4& src, Tensor4& dst, int64_t N) {
    const int W = (spec.d + 31) / 32;
    dst = make_tensor({B, H, N, W}, DType::kBits, spec.layout);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t n = 0; n < N; ++n) {
          std::vector<double> row(size_t(spec.d));
          for (int c = 0; c < spec.d; ++c) row[size_t(c)] = src.value(b, h, n, c);
          const auto words = pack_row(row);
          for (int w = 0; w < W; ++w)
            reinterpret_cast<uint32_t*>(dst.storage.data())[dst.offset(b, h, n, w)] = words[size_t(w)];
        }
  };
  if (spec.q_dtype == DType::kBits) pack_into(t.q, t.q_bits, Nq);
  if (spec.k_dtype == DType::kBits) pack_into(t.k, t.k_bits, Nk);

  // V: float, or int8 with a per-(b, h, channel) dequant scale as the binding computes it.
  const DType v_store = spec.pv_int8 ? DType::kInt8 : spec.v_dtype;
  t.v = make_tensor({B, H, Nk, spec.dv}, v_store, spec.layout);
  t.v_real.assign(size_t(B * H * Nk * spec.dv), 0.0);
  if (spec.pv_int8) {
    std::vector<float> vf(size_t(B * H * Nk * spec.dv));
    for (auto& x : vf) x = normal(rng);
    t.v_dequant.assign(size_t(B * H * spec.dv), 0.0f);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int c = 0; c < spec.dv; ++c) {
          float mx = 0;
          for (int64_t j = 0; j < Nk; ++j) mx = std::max(mx, std::fabs(vf[size_t(((b * H + h) * Nk + j) * spec.dv + c)]));
          if (c == 1) mx = 0;  // one all-zero channel (dq = 0)
          const float dq = mx / 127.0f;
          t.v_dequant[size_t((b * H + h) * spec.dv + c)] = dq;
          for (int64_t j = 0; j < Nk; ++j) {
            const float x = vf[size_t(((b * H + h) * Nk + j) * spec.dv + c)];
            const float qv = dq == 0 ? 0.0f : std::nearbyint(x / dq);
            t.v.set(b, h, j, c, qv);
            t.v_real[size_t(((b * H + h) * Nk + j) * spec.dv + c)] = double(qv) * dq;
          }
        }
  } else {
    fill(t.v, [&](int64_t, int64_t, int64_t, int64_t) { return normal(rng); });
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t j = 0; j < Nk; ++j)
          for (int c = 0; c < spec.dv; ++c) t.v_real[size_t(((b * H + h) * Nk + j) * spec.dv + c)] = t.v.value(b, h, j, c);
  }

  // Scales: positive factors around 1 (the Python layer rejects non-finite ones).
  auto make_scale = [&](ScaleMode mode, int64_t N, std::vector<float>& dst, int64_t* stride) {
    if (mode == ScaleMode::kNone) return;
    if (mode == ScaleMode::kPerHead) {
      dst.resize(size_t(B * H));
      for (auto& x : dst) x = 0.5f + 1.5f * uni(rng);
      stride[0] = H; stride[1] = 1; stride[2] = 0;
    } else {
      dst.resize(size_t(B * H * N));
      for (auto& x : dst) x = 0.5f + 1.5f * uni(rng);
      stride[0] = H * N; stride[1] = N; stride[2] = 1;
    }
  };
  make_scale(spec.q_scale, Nq, t.q_scale, t.q_scale_stride);
  make_scale(spec.k_scale, Nk, t.k_scale, t.k_scale_stride);

  if (spec.bias != BiasMode::kNone) {
    unsigned bmask = 0;
    if (spec.bias == BiasMode::kPerHead) bmask = 1u;
    if (spec.bias == BiasMode::kPerBatch) bmask = 2u;
    if (spec.bias == BiasMode::kKeyRow) bmask = 4u;
    t.bias = make_tensor({B, H, Nq, Nk}, spec.bias_dtype, Layout::kBHN, bmask);
    fill(t.bias, [&](int64_t, int64_t, int64_t, int64_t) {
      if (spec.neg_inf_bias_fraction > 0 && uni(rng) < spec.neg_inf_bias_fraction) return -INFINITY;
      return normal(rng);
    });
    if (spec.masked_row_fraction > 0) {
      const int64_t rows = spec.bias == BiasMode::kKeyRow ? 1 : Nq;
      for (int64_t a = 0; a < (spec.bias == BiasMode::kPerHead ? 1 : B); ++a)
        for (int64_t hh = 0; hh < (spec.bias == BiasMode::kPerBatch ? 1 : H); ++hh)
          for (int64_t i = 0; i < rows; ++i)
            if (uni(rng) < spec.masked_row_fraction)
              for (int64_t j = 0; j < Nk; ++j) t.bias.set(a, hh, i, j, -INFINITY);
    }
  }
  if (spec.rel_wh > 0) {
    t.rel_T = int64_t(2 * spec.rel_wh - 1) * (2 * spec.rel_ww - 1) + 3;
    t.rel_table.resize(size_t(H * t.rel_T));
    for (auto& x : t.rel_table) x = normal(rng);
  }
  return t;
}

// ------------------------------------------------------------------ params
inline binformer::AttentionFwdParams fwd_params(const AttentionCase& t, void* out, float* lse) {
  binformer::AttentionFwdParams p{};
  const CaseSpec& s = t.spec;
  p.B = s.B; p.H = s.H; p.Nq = s.Nq; p.Nk = s.Nk; p.head_dim = s.d; p.v_dim = s.dv;
  const Tensor4& qsrc = s.q_dtype == DType::kBits ? t.q_bits : t.q;
  const Tensor4& ksrc = s.k_dtype == DType::kBits ? t.k_bits : t.k;
  p.q = qsrc.data(); p.q_dtype = s.q_dtype == DType::kBits ? DType::kBits : qsrc.dtype;
  p.k = ksrc.data(); p.k_dtype = s.k_dtype == DType::kBits ? DType::kBits : ksrc.dtype;
  for (int i = 0; i < 3; ++i) { p.q_stride[i] = qsrc.strides[i]; p.k_stride[i] = ksrc.strides[i]; p.v_stride[i] = t.v.strides[i]; }
  p.v = t.v.data(); p.v_dtype = t.v.dtype;
  p.out = out; p.out_dtype = s.v_dtype;
  p.out_stride[0] = s.H * s.Nq * s.dv; p.out_stride[1] = s.Nq * s.dv; p.out_stride[2] = s.dv;
  p.lse = lse;
  p.q_scale = t.q_scale.empty() ? nullptr : t.q_scale.data();
  p.k_scale = t.k_scale.empty() ? nullptr : t.k_scale.data();
  for (int i = 0; i < 3; ++i) { p.q_scale_stride[i] = t.q_scale_stride[i]; p.k_scale_stride[i] = t.k_scale_stride[i]; }
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
  p.pv_int8 = s.pv_int8;
  p.v_dequant = s.pv_int8 ? t.v_dequant.data() : nullptr;
  return p;
}

// ------------------------------------------------------------------ float64 forward reference
struct FwdReference {
  std::vector<double> out;        // [B,H,Nq,Dv]
  std::vector<double> lse;        // [B,H,Nq]
  std::vector<double> abs_pv;     // [B,H,Nq,Dv]: sum_j P_ij |V_jc|      (error scale of out)
  std::vector<double> abs_vq;     // [B,H,Nq,Dv]: sum_j |V_jc| / l_i with l_i = sum_j exp(S_ij - max_i)
  std::vector<double> max_abs_s;  // [B,H,Nq]: max_j |S_ij| over unmasked finite scores
  std::vector<double> prob;       // [B,H,Nq,Nk]
};

inline FwdReference reference_forward(const AttentionCase& t) {
  const CaseSpec& s = t.spec;
  FwdReference r;
  const int64_t B = s.B, H = s.H, Nq = s.Nq, Nk = s.Nk;
  const int dv = s.dv;
  r.out.assign(size_t(B * H * Nq * dv), 0);
  r.abs_pv.assign(r.out.size(), 0);
  r.abs_vq.assign(r.out.size(), 0);
  r.lse.assign(size_t(B * H * Nq), -INFINITY);
  r.max_abs_s.assign(r.lse.size(), 0);
  r.prob.assign(size_t(B * H * Nq * Nk), 0);
  std::vector<double> sc(static_cast<size_t>(Nk));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < Nq; ++i) {
        const size_t row = size_t((b * H + h) * Nq + i);
        double mx = -INFINITY, max_abs = 0;
        for (int64_t j = 0; j < Nk; ++j) {
          sc[size_t(j)] = t.score(b, h, i, j);
          mx = std::max(mx, sc[size_t(j)]);
          if (std::isfinite(sc[size_t(j)])) max_abs = std::max(max_abs, std::fabs(sc[size_t(j)]));
        }
        r.max_abs_s[row] = max_abs;
        if (mx == -INFINITY) continue;  // fully masked: out 0, lse -inf
        double l = 0;
        for (int64_t j = 0; j < Nk; ++j) l += std::exp(sc[size_t(j)] - mx);
        r.lse[row] = mx + std::log(l);
        for (int64_t j = 0; j < Nk; ++j) {
          const double pj = std::exp(sc[size_t(j)] - mx) / l;
          r.prob[row * size_t(Nk) + size_t(j)] = pj;
          for (int c = 0; c < dv; ++c) {
            const double vv = t.vreal(b, h, j, c);
            r.out[row * dv + c] += pj * vv;
            r.abs_pv[row * dv + c] += pj * std::fabs(vv);
            if (std::isfinite(sc[size_t(j)]))
              r.abs_vq[row * dv + c] += std::fabs(vv) / l;
          }
        }
      }
  return r;
}

}  // namespace bt
