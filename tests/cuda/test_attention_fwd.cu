// GoogleTest driver of binformer::cuda::attention_fwd against the float64 reference of the same
// binary math (attention_fwd_reference.h), on fresh random inputs over many shapes and options.
//
// Every output buffer is poisoned first (0xFF bytes: NaN in fp16/bf16/fp32) and laid out with
// padding between rows; the test checks that every element the kernel owns was written with a
// value inside its error bound and that the padding still holds the poison.
//
// Tolerances (per output element, from attention_reference):
//   fp16 V: (2^-11 [P rounded to fp16] + 2^-11 [output rounding] + 1e-4 [fp32 accumulation over
//           up to ~700 keys, exp2 approximation]) * 1.25 * sum_j P_ij |V_jc|, plus the fp16
//           subnormal resolution of P (2^-25 absolute per key);
//   bf16 V: the same with 2^-8 (bf16 P and output);
//   fp32 V: 3xTF32 keeps P and V to ~2^-21: (2^-21 + 2^-24 + 3e-5) * 1.25 * sum_j P |V|;
//   pv_int8: the reference emulates the quantization against the running max (key tile by key
//           tile, as the kernel does) and allows one step of P_q for every element within 2e-3 of
//           a rounding boundary, 0.5 accumulator units per move of the max, and one extra step;
//   lse:    1e-4 + 1e-6 |lse| (fp32 row sum of up to ~2000 terms, lg2.approx).
// A layout or indexing bug gives errors of the order of |V| on most elements, far above these.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "../../cuda/src/attention_fwd/tile_config.h"
#include "../../cuda/src/attention_fwd/workspace_layout.h"
#include "../../cuda/src/sm90_support.h"
#include "attention_fwd_reference.h"
#include "cuda_test_helpers.h"
#include "host_float_bits.h"
#include "binformer/cuda_kernels.h"

namespace {

using binformer::AttentionFwdParams;
using binformer::DType;
namespace bt = binformer::test::attention_fwd_ref;
namespace fwd = binformer::cuda::fwd;

int esize(DType t) {
  return t == DType::kFloat16 || t == DType::kBFloat16 ? 2 : t == DType::kInt8 ? 1 : 4;
}

// Rounds x to dtype t and writes its encoding at dst.
double encode(DType t, double x, uint8_t* dst) {
  if (t == DType::kFloat16) {
    const __half v = __float2half_rn(float(x));
    std::memcpy(dst, &v, 2);
    return __half2float(v);
  }
  if (t == DType::kBFloat16) {
    const __nv_bfloat16 v = __float2bfloat16_rn(float(x));
    std::memcpy(dst, &v, 2);
    return __bfloat162float(v);
  }
  if (t == DType::kInt8) {
    const int8_t v = int8_t(x);
    std::memcpy(dst, &v, 1);
    return v;
  }
  const float v = float(x);
  std::memcpy(dst, &v, 4);
  return v;
}

struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  explicit DeviceBuffer(size_t n) : bytes(n) {
    if (n > 0) EXPECT_EQ(cudaMalloc(&ptr, n), cudaSuccess);
  }
  ~DeviceBuffer() {
    if (ptr) cudaFree(ptr);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void upload(const std::vector<uint8_t>& host) {
    if (host.empty()) return;
    ASSERT_EQ(cudaMemcpy(ptr, host.data(), host.size(), cudaMemcpyHostToDevice), cudaSuccess);
  }
  std::vector<uint8_t> download() const {
    std::vector<uint8_t> host(bytes);
    if (bytes == 0) return host;
    EXPECT_EQ(cudaMemcpy(host.data(), ptr, bytes, cudaMemcpyDeviceToHost), cudaSuccess);
    return host;
  }
};

// A host tensor [B,H,N,C] with row pitch C + pad (elements), head/batch strides following, and
// a leading offset of `offset` elements (to test unaligned pointers).
struct HostTensor {
  DType dtype;
  int64_t stride[3];
  int64_t offset;
  std::vector<uint8_t> raw;
  HostTensor(DType t, int64_t B, int64_t H, int64_t N, int64_t C, int64_t pad, int64_t offset_)
      : dtype(t), offset(offset_) {
    stride[2] = C + pad;
    stride[1] = N * stride[2];
    stride[0] = H * stride[1];
    raw.assign(size_t(offset + B * stride[0]) * esize(t), 0);
  }
  uint8_t* at(int64_t b, int64_t h, int64_t n, int64_t c) {
    return raw.data() + (offset + b * stride[0] + h * stride[1] + n * stride[2] + c) * esize(dtype);
  }
};

enum class Scale { kNone, kPerHead, kPerToken };
enum class Bias { kNone, kFull, kHeadBroadcast, kBatchAndQueryBroadcast, kKeyBroadcast, kMaskRows };

struct Case {
  std::string name;
  int B = 1, H = 2, Nq = 64, Nk = 64, d = 64, dv = 64;
  DType q_dtype = DType::kFloat16, k_dtype = DType::kFloat16;
  DType v_dtype = DType::kFloat16;  // the user's V dtype (= out dtype)
  bool pv_int8 = false;
  Scale q_scale = Scale::kNone, k_scale = Scale::kNone;
  bool negative_scales = false;
  double scale_mult = 1.0;  // scale = scale_mult / sqrt(d)
  bool causal = false;
  Bias bias = Bias::kNone;
  DType bias_dtype = DType::kFloat32;
  bool relpos = false;
  int wh = 0, ww = 0, prefix = 0;
  int pad = 8;        // row padding (elements) of q, k, v, out
  int offset = 0;     // leading offset (elements) of q, k, v, out: 1 makes them unaligned
  // > 0: key j gets query j's signs for j % copy_q_every == 0 (<q_j, k_j> = d, the largest
  // possible score: the bounded kernels' P reaches 2^kTop there).
  int copy_q_every = 0;
  double scale_lo = 0.2, scale_hi = 2.0;  // |a_i|, |b_j| range of q_scale / k_scale
  double table_sigma = 2.0;               // rel-pos table entries ~ N(0, table_sigma^2)
  uint32_t seed = 1;
};

std::string describe(const Case& c) {
  std::ostringstream s;
  s << c.name << ": B=" << c.B << " H=" << c.H << " Nq=" << c.Nq << " Nk=" << c.Nk << " d=" << c.d
    << " dv=" << c.dv << " q=" << dtype_name(c.q_dtype) << " k=" << dtype_name(c.k_dtype)
    << " v=" << dtype_name(c.v_dtype) << (c.pv_int8 ? " pv_int8" : "") << (c.causal ? " causal" : "")
    << " bias=" << int(c.bias) << "/" << dtype_name(c.bias_dtype) << " relpos=" << c.relpos << "("
    << c.wh << "x" << c.ww << "+" << c.prefix << ") qs=" << int(c.q_scale) << " ks=" << int(c.k_scale)
    << " pad=" << c.pad << " offset=" << c.offset << " seed=" << c.seed;
  return s.str();
}

// gtest prints parameters with this (instead of a byte dump).
void PrintTo(const Case& c, std::ostream* os) { *os << describe(c); }

bool minimal_build() {
#if defined(BINFORMER_CUDA_MINIMAL)
  return true;
#else
  return false;
#endif
}

// Runs one case on the device. Returns false (after recording failures) when the kernel
// reported an error; `skipped` is set when a minimal build lacks the configuration.
struct RunOutput {
  std::vector<uint8_t> out, lse;
  std::vector<uint8_t> workspace;  // the K pre-pass output, checked separately
  AttentionFwdParams params{};     // as passed (device pointers)
  cudaError_t status = cudaSuccess;
};

class AttentionFwdCase {
 public:
  explicit AttentionFwdCase(const Case& c) : c_(c), rng_(c.seed) { build(); }

  RunOutput run() {
    RunOutput r;
    DeviceBuffer dq(q_->raw.size()), dk(k_->raw.size()), dv(v_->raw.size()), dout(out_bytes_),
        dlse(lse_bytes_);
    dq.upload(q_->raw);
    dk.upload(k_->raw);
    dv.upload(v_->raw);
    std::vector<uint8_t> poison_out(out_bytes_, 0xFF), poison_lse(lse_bytes_, 0xFF);
    dout.upload(poison_out);
    dlse.upload(poison_lse);
    DeviceBuffer dqs(qs_raw_.size() * 4), dks(ks_raw_.size() * 4), dbias(bias_raw_.size()),
        dtab(table_.size() * 4), ddq(dequant_f_.size() * 4);
    if (!qs_raw_.empty()) ASSERT_OK(cudaMemcpy(dqs.ptr, qs_raw_.data(), qs_raw_.size() * 4, cudaMemcpyHostToDevice));
    if (!ks_raw_.empty()) ASSERT_OK(cudaMemcpy(dks.ptr, ks_raw_.data(), ks_raw_.size() * 4, cudaMemcpyHostToDevice));
    if (!bias_raw_.empty()) dbias.upload(bias_raw_);
    if (!table_.empty()) ASSERT_OK(cudaMemcpy(dtab.ptr, table_.data(), table_.size() * 4, cudaMemcpyHostToDevice));
    if (!dequant_f_.empty()) ASSERT_OK(cudaMemcpy(ddq.ptr, dequant_f_.data(), dequant_f_.size() * 4, cudaMemcpyHostToDevice));

    AttentionFwdParams p = params_;
    p.q = static_cast<uint8_t*>(dq.ptr) + q_->offset * esize(q_->dtype);
    p.k = static_cast<uint8_t*>(dk.ptr) + k_->offset * esize(k_->dtype);
    p.v = static_cast<uint8_t*>(dv.ptr) + v_->offset * esize(v_->dtype);
    p.out = static_cast<uint8_t*>(dout.ptr) + out_offset_ * esize(c_.v_dtype);
    p.lse = static_cast<float*>(dlse.ptr);
    p.q_scale = qs_raw_.empty() ? nullptr : static_cast<float*>(dqs.ptr);
    p.k_scale = ks_raw_.empty() ? nullptr : static_cast<float*>(dks.ptr);
    p.bias = bias_raw_.empty() ? nullptr : dbias.ptr;
    p.rel_pos_table = table_.empty() ? nullptr : static_cast<float*>(dtab.ptr);
    p.v_dequant = dequant_f_.empty() ? nullptr : static_cast<float*>(ddq.ptr);
    DeviceBuffer ws(binformer::cuda::attention_fwd_workspace_bytes(p));
    p.workspace = ws.ptr;
    r.status = binformer::cuda::attention_fwd(p, nullptr);
    if (r.status == cudaSuccess) r.status = cudaDeviceSynchronize();
    r.out = dout.download();
    r.lse = dlse.download();
    r.workspace = ws.download();
    r.params = p;
    return r;
  }

  // The K pre-pass output (signs flipped where b_j < 0, zero pad words and rows, popcount
  // constant, |b_j|, rel-pos column offsets) against the host: localises a failure to the
  // pre-pass or to the main kernel.
  void check_prepass(const RunOutput& r) {
    const fwd::WorkspaceLayout w = fwd::fwd_workspace_layout(r.params);
    ASSERT_EQ(w.total, r.workspace.size());
    if (w.total == 0) return;
    int64_t bad = 0;
    std::string first;
    auto fail = [&](const std::string& what) {
      if (bad++ == 0) first = what;
    };
    for (int64_t bh = 0; bh < int64_t(c_.B) * c_.H; ++bh) {
      for (int64_t j = 0; j < w.nk_pad; ++j) {
        const int64_t row = bh * w.nk_pad + j;
        std::vector<uint32_t> want(w.k_words, 0u);
        double bj = 1.0;
        if (j < c_.Nk) {
          if (!b_full_.empty()) bj = b_full_[bh * c_.Nk + j];
          for (int e = 0; e < c_.d; ++e) {
            const bool plus = k_sign_[(bh * c_.Nk + j) * c_.d + e] > 0;
            if (plus != (bj < 0)) want[e / 32] |= 1u << (e % 32);
          }
        }
        int pc = 0;
        for (int k = 0; k < w.k_words; ++k) pc += __builtin_popcount(want[k]);
        if (c_.d <= 64) {  // words 2-3: ~k within d (the P table's operand, pack_keys.h)
          for (int e = 0; e < c_.d; ++e) {
            if (!((want[e / 32] >> (e % 32)) & 1u)) want[2 + e / 32] |= 1u << (e % 32);
          }
        }
        for (int k = 0; k < w.k_words; ++k) {
          uint32_t got;
          std::memcpy(&got, r.workspace.data() + w.k_bits + (row * w.k_words + k) * 4, 4);
          if (got != want[k]) {
            fail("k_bits[bh=" + std::to_string(bh) + ",j=" + std::to_string(j) + ",word=" +
                 std::to_string(k) + "]");
          }
        }
        float colc;
        std::memcpy(&colc, r.workspace.data() + w.k_colc + row * 4, 4);
        if (colc != -(25165824.0f + 2.0f * pc)) fail("k_colc[bh=" + std::to_string(bh) + ",j=" + std::to_string(j) + "]");
        if (fwd::fwd_per_token_k(r.params)) {
          float ks;
          std::memcpy(&ks, r.workspace.data() + w.k_scale + row * 4, 4);
          if (ks != float(j < c_.Nk ? std::fabs(bj) : 0.0)) fail("k_scale_abs[j=" + std::to_string(j) + "]");
        }
        if (c_.relpos && bh == 0) {
          int off;
          std::memcpy(&off, r.workspace.data() + w.relpos_off + j * 4, 4);
          int want_off = 0;
          if (j < c_.Nk && j >= c_.prefix) {
            const int pj = int(j) - c_.prefix;
            want_off = (pj / c_.ww) * (2 * c_.ww - 1) + pj % c_.ww;
          }
          if (off != want_off) fail("relpos_off[j=" + std::to_string(j) + "]");
        }
      }
    }
    if (c_.relpos) {  // each head's table maximum and minimum (exact: no arithmetic)
      const int64_t tsize = int64_t(2 * c_.wh - 1) * (2 * c_.ww - 1) + 3;
      for (int h = 0; h < c_.H; ++h) {
        float mx = -std::numeric_limits<float>::infinity(), mn = std::numeric_limits<float>::infinity();
        for (int64_t x = 0; x < tsize; ++x) {
          mx = std::max(mx, table_[size_t(h * tsize + x)]);
          mn = std::min(mn, table_[size_t(h * tsize + x)]);
        }
        float got[2];
        std::memcpy(got, r.workspace.data() + w.relpos_range + size_t(h) * 8, 8);
        if (got[0] != mx || got[1] != mn) fail("relpos_range[h=" + std::to_string(h) + "]");
      }
    }
    EXPECT_EQ(bad, 0) << bad << " wrong workspace entries written by the K pre-pass; first: " << first;
  }

  void check(const RunOutput& r) {
    const DType ot = c_.v_dtype;
    bt::RefTolerance tol;
    if (c_.pv_int8) {
      tol.out_rel = ot == DType::kFloat16 ? std::ldexp(1.0, -11) : ot == DType::kBFloat16 ? std::ldexp(1.0, -8) : 1e-7;
    } else if (ot == DType::kFloat16) {
      tol.p_rel = tol.out_rel = std::ldexp(1.0, -11);
      tol.accum_rel = 1e-4;
      tol.p_fp16_subnormal = true;
    } else if (ot == DType::kBFloat16) {
      tol.p_rel = tol.out_rel = std::ldexp(1.0, -8);
      tol.accum_rel = 1e-4;
    } else {
      tol.p_rel = std::ldexp(1.0, -21);
      tol.out_rel = std::ldexp(1.0, -24);
      tol.accum_rel = 3e-5;
    }
    const bt::RefResult ref = bt::attention_reference(problem_, tol);
    const int es = esize(ot);
    int64_t bad = 0, unwritten = 0, pad_touched = 0;
    double worst_ratio = 0;
    std::string first_bad;
    for (int b = 0; b < c_.B; ++b)
      for (int h = 0; h < c_.H; ++h)
        for (int i = 0; i < c_.Nq; ++i) {
          const size_t row = (size_t(b) * c_.H + h) * c_.Nq + i;
          for (int64_t cc = 0; cc < out_stride_[2]; ++cc) {
            const uint8_t* src = r.out.data() + (out_offset_ + b * out_stride_[0] + h * out_stride_[1] +
                                                 int64_t(i) * out_stride_[2] + cc) * es;
            if (cc >= c_.dv) {  // padding: must still be poison
              for (int e = 0; e < es; ++e) pad_touched += src[e] != 0xFF;
              continue;
            }
            double got;
            if (ot == DType::kFloat16) {
              __half v;
              std::memcpy(&v, src, 2);
              got = __half2float(v);
            } else if (ot == DType::kBFloat16) {
              __nv_bfloat16 v;
              std::memcpy(&v, src, 2);
              got = __bfloat162float(v);
            } else {
              float v;
              std::memcpy(&v, src, 4);
              got = v;
            }
            const double want = ref.out[row * c_.dv + cc], t = ref.tol[row * c_.dv + cc];
            if (std::isnan(got)) ++unwritten;
            const double err = std::fabs(got - want);
            const double ratio = std::isnan(got) ? 1e30 : err / t;
            if (ratio > worst_ratio) worst_ratio = ratio;
            if (!(err <= t)) {
              if (bad++ == 0) {
                std::ostringstream s;
                s << "out[b=" << b << ",h=" << h << ",i=" << i << ",c=" << cc << "] = " << got
                  << ", want " << want << " (tol " << t << ")";
                first_bad = s.str();
              }
            }
          }
          float got_lse;
          std::memcpy(&got_lse, r.lse.data() + row * 4, 4);
          const double want_lse = ref.lse[row];
          const bool lse_ok = std::isinf(want_lse)
                                  ? (std::isinf(got_lse) && got_lse < 0)
                                  : std::fabs(got_lse - want_lse) <= 1e-4 + 1e-6 * std::fabs(want_lse);
          if (!lse_ok && bad++ == 0) {
            std::ostringstream s;
            s << "lse[b=" << b << ",h=" << h << ",i=" << i << "] = " << got_lse << ", want " << want_lse;
            first_bad = s.str();
          }
        }
    EXPECT_EQ(pad_touched, 0) << "bytes written outside the output rows";
    EXPECT_EQ(unwritten, 0) << "NaN (poison or propagated) output elements";
    EXPECT_EQ(bad, 0) << bad << " elements out of tolerance; worst error/tolerance " << worst_ratio
                      << "; first: " << first_bad;
  }

 private:
  static void ASSERT_OK(cudaError_t e) { ASSERT_EQ(e, cudaSuccess) << cudaGetErrorString(e); }

  double normal() { return std::normal_distribution<double>(0.0, 1.0)(rng_); }
  double uniform(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(rng_); }

  // q or k: random values, their signs for the reference, and (for kBits) the packed words.
  std::unique_ptr<HostTensor> make_qk(DType t, int N, std::vector<int8_t>& sign) {
    const int W = binformer::words_for(c_.d);
    const int64_t cols = t == DType::kBits ? W : c_.d;
    auto x = std::make_unique<HostTensor>(t, c_.B, c_.H, N, cols, t == DType::kBits ? 1 : c_.pad,
                                          t == DType::kBits ? 0 : c_.offset);
    sign.assign(size_t(c_.B) * c_.H * N * c_.d, 0);
    for (int b = 0; b < c_.B; ++b)
      for (int h = 0; h < c_.H; ++h)
        for (int n = 0; n < N; ++n) {
          int8_t* sg = sign.data() + ((size_t(b) * c_.H + h) * N + n) * c_.d;
          std::vector<uint32_t> words(W, 0);
          for (int e = 0; e < c_.d; ++e) {
            // Include exact zeros and negative zeros (both map to +1).
            const int kind = int(uniform(0, 40));
            double v = kind == 0 ? 0.0 : kind == 1 ? -0.0 : normal();
            if (t != DType::kBits) v = encode(t, v, x->at(b, h, n, e));
            sg[e] = std::signbit(v) && v != 0.0 ? -1 : 1;
            if (sg[e] > 0) words[e / 32] |= 1u << (e % 32);
          }
          if (t == DType::kBits) {
            for (int w = 0; w < W; ++w) std::memcpy(x->at(b, h, n, w), &words[w], 4);
          }
        }
    return x;
  }

  void build() {
    const Case& c = c_;
    q_ = make_qk(c.q_dtype, c.Nq, q_sign_);
    k_ = make_qk(c.k_dtype, c.Nk, k_sign_);
    if (c.copy_q_every > 0) {  // float q / k only: key j := +-1 with query j's signs
      for (int b = 0; b < c.B; ++b)
        for (int h = 0; h < c.H; ++h)
          for (int j = 0; j < std::min(c.Nq, c.Nk); j += c.copy_q_every)
            for (int e = 0; e < c.d; ++e) {
              const int8_t sg = q_sign_[((size_t(b) * c.H + h) * c.Nq + j) * c.d + e];
              encode(c.k_dtype, double(sg), k_->at(b, h, j, e));
              k_sign_[((size_t(b) * c.H + h) * c.Nk + j) * c.d + e] = sg;
            }
    }
    // V (int8 values and per-channel dequant for pv_int8)
    const DType vt = c.pv_int8 ? DType::kInt8 : c.v_dtype;
    v_ = std::make_unique<HostTensor>(vt, c.B, c.H, c.Nk, c.dv, c.pad, c.offset);
    v_vals_.assign(size_t(c.B) * c.H * c.Nk * c.dv, 0);
    if (c.pv_int8) dequant_f_.assign(size_t(c.B) * c.H * c.dv, 0.0f);
    for (int b = 0; b < c.B; ++b)
      for (int h = 0; h < c.H; ++h)
        for (int ch = 0; ch < c.dv; ++ch) {
          const size_t bh = size_t(b) * c.H + h;
          const bool zero_channel = c.pv_int8 && ch == 3;  // dq = 0: an all-zero channel
          if (c.pv_int8) dequant_f_[bh * c.dv + ch] = zero_channel ? 0.0f : float(uniform(0.001, 0.05));
          for (int n = 0; n < c.Nk; ++n) {
            double v = c.pv_int8 ? (zero_channel ? 0.0 : std::nearbyint(uniform(-127.4, 127.4))) : normal();
            v_vals_[(bh * c.Nk + n) * c.dv + ch] = encode(vt, v, v_->at(b, h, n, ch));
          }
        }
    if (c.pv_int8) dequant_d_.assign(dequant_f_.begin(), dequant_f_.end());

    // Output layout: padded rows, optional leading offset; lse contiguous.
    out_stride_[2] = c.dv + c.pad;
    out_stride_[1] = int64_t(c.Nq) * out_stride_[2];
    out_stride_[0] = int64_t(c.H) * out_stride_[1];
    out_offset_ = c.offset;
    out_bytes_ = size_t(out_offset_ + c.B * out_stride_[0]) * esize(c.v_dtype);
    lse_bytes_ = size_t(c.B) * c.H * c.Nq * 4;

    // Scales: per head -> [B,H,1] with stride_n 0; per token -> [B,H,N].
    auto make_scale = [&](Scale mode, int N, std::vector<float>& raw, std::vector<double>& full,
                          int64_t* stride) {
      if (mode == Scale::kNone) return;
      const double lo = c.negative_scales ? -c.scale_hi : c.scale_lo, hi = c.scale_hi;
      const int per = mode == Scale::kPerHead ? 1 : N;
      raw.resize(size_t(c.B) * c.H * per);
      for (auto& x : raw) x = float(uniform(lo, hi));
      stride[2] = mode == Scale::kPerHead ? 0 : 1;
      stride[1] = per;
      stride[0] = int64_t(c.H) * per;
      full.resize(size_t(c.B) * c.H * N);
      for (int b = 0; b < c.B; ++b)
        for (int h = 0; h < c.H; ++h)
          for (int n = 0; n < N; ++n)
            full[(size_t(b) * c.H + h) * N + n] = raw[b * stride[0] + h * stride[1] + n * stride[2]];
    };
    make_scale(c.q_scale, c.Nq, qs_raw_, a_full_, params_.q_scale_stride);
    make_scale(c.k_scale, c.Nk, ks_raw_, b_full_, params_.k_scale_stride);

    // Dense bias with the requested broadcast pattern.
    if (c.bias != Bias::kNone) {
      int64_t sz[4] = {c.B, c.H, c.Nq, c.Nk};
      if (c.bias == Bias::kHeadBroadcast) sz[1] = 1;
      if (c.bias == Bias::kBatchAndQueryBroadcast) sz[0] = sz[2] = 1;
      if (c.bias == Bias::kKeyBroadcast) sz[3] = 1;
      int64_t st[4];
      st[3] = 1;
      st[2] = sz[3];
      st[1] = sz[2] * st[2];
      st[0] = sz[1] * st[1];
      bias_raw_.assign(size_t(sz[0] * st[0]) * esize(c.bias_dtype), 0);
      std::vector<double> compact(size_t(sz[0] * st[0]));
      for (size_t idx = 0; idx < compact.size(); ++idx) {
        double v = normal();
        if (c.bias == Bias::kMaskRows) {
          const int64_t i = (int64_t(idx) / st[2]) % sz[2];
          if (i % 5 == 2) v = -std::numeric_limits<double>::infinity();  // fully masked rows
          else if (uniform(0, 1) < 0.2) v = -std::numeric_limits<double>::infinity();
        }
        compact[idx] = encode(c.bias_dtype, v, bias_raw_.data() + idx * esize(c.bias_dtype));
      }
      for (int i = 0; i < 4; ++i) params_.bias_stride[i] = sz[i] == 1 ? 0 : st[i];
      bias_full_.resize(size_t(c.B) * c.H * c.Nq * c.Nk);
      for (int b = 0; b < c.B; ++b)
        for (int h = 0; h < c.H; ++h)
          for (int i = 0; i < c.Nq; ++i)
            for (int j = 0; j < c.Nk; ++j)
              bias_full_[((size_t(b) * c.H + h) * c.Nq + i) * c.Nk + j] =
                  compact[b * params_.bias_stride[0] + h * params_.bias_stride[1] +
                          i * params_.bias_stride[2] + j * params_.bias_stride[3]];
    }
    if (c.relpos) {
      const int64_t tsize = int64_t(2 * c.wh - 1) * (2 * c.ww - 1) + 3;
      table_.resize(size_t(c.H) * tsize);
      for (auto& x : table_) x = float(c.table_sigma * normal());
      table_d_.assign(table_.begin(), table_.end());
      params_.rel_pos_table_stride_h = tsize;
    }

    params_.B = c.B;
    params_.H = c.H;
    params_.Nq = c.Nq;
    params_.Nk = c.Nk;
    params_.head_dim = c.d;
    params_.v_dim = c.dv;
    params_.q_dtype = c.q_dtype;
    params_.k_dtype = c.k_dtype;
    params_.v_dtype = vt;
    params_.out_dtype = c.v_dtype;
    for (int i = 0; i < 3; ++i) {
      params_.q_stride[i] = q_->stride[i];
      params_.k_stride[i] = k_->stride[i];
      params_.v_stride[i] = v_->stride[i];
      params_.out_stride[i] = out_stride_[i];
    }
    params_.bias_dtype = c.bias_dtype;
    params_.rel_pos_wh = c.wh;
    params_.rel_pos_ww = c.ww;
    params_.num_prefix_tokens = c.prefix;
    params_.scale = float(c.scale_mult / std::sqrt(double(c.d)));
    params_.causal = c.causal;
    params_.pv_int8 = c.pv_int8;

    problem_.B = c.B;
    problem_.H = c.H;
    problem_.Nq = c.Nq;
    problem_.Nk = c.Nk;
    problem_.d = c.d;
    problem_.dv = c.dv;
    problem_.q_sign = &q_sign_;
    problem_.k_sign = &k_sign_;
    problem_.v = &v_vals_;
    problem_.v_dequant = c.pv_int8 ? &dequant_d_ : nullptr;
    problem_.a = a_full_.empty() ? nullptr : &a_full_;
    problem_.bk = b_full_.empty() ? nullptr : &b_full_;
    problem_.bias = bias_full_.empty() ? nullptr : &bias_full_;
    problem_.relpos = c.relpos ? &table_d_ : nullptr;
    problem_.wh = c.wh;
    problem_.ww = c.ww;
    problem_.prefix = c.prefix;
    problem_.scale = params_.scale;  // the float the kernel uses
    problem_.causal = c.causal;
    problem_.pv_int8 = c.pv_int8;
    const fwd::FwdConfig cfg = fwd::fwd_select_config(fwd::PvKind::kU8S8, c.dv);
    problem_.int8_block_n =
        fwd::fwd_tile_shape(fwd::PvKind::kU8S8, cfg.dv_pad, c.bias != Bias::kNone || c.relpos).block_n;
  }

  Case c_;
  std::mt19937 rng_;
  std::unique_ptr<HostTensor> q_, k_, v_;
  std::vector<int8_t> q_sign_, k_sign_;
  std::vector<double> v_vals_, dequant_d_, a_full_, b_full_, bias_full_, table_d_;
  std::vector<float> dequant_f_, qs_raw_, ks_raw_, table_;
  std::vector<uint8_t> bias_raw_;
  int64_t out_stride_[3] = {0, 0, 0};
  int64_t out_offset_ = 0;
  size_t out_bytes_ = 0, lse_bytes_ = 0;
  AttentionFwdParams params_{};
  bt::RefProblem problem_;
};

// ------------------------------------------------------------------ the cases
std::vector<Case> all_cases() {
  std::vector<Case> cs;
  uint32_t seed = 100;
  auto add = [&](Case c) {
    c.seed = seed++;
    cs.push_back(c);
  };
  // Shapes: tiny, odd, Nq != Nk, partial tiles, longer sequences.
  for (auto [nq, nk] : std::vector<std::pair<int, int>>{
           {1, 1}, {1, 37}, {7, 13}, {63, 65}, {129, 64}, {197, 197}, {333, 129}, {65, 700}, {700, 300},
           {130, 1100}, {1100, 1100}}) {  // (Nk > 1024: the bounded kernels' 4-warp shape at Dv <= 64)
    Case c;
    c.name = "shape";
    c.Nq = nq;
    c.Nk = nk;
    add(c);
  }
  // Sign widths d (k128 path up to 128 bits, k256 beyond).
  for (int d : {8, 32, 64, 72, 128, 136, 256}) {
    Case c;
    c.name = "head_dim";
    c.d = d;
    c.Nq = 150;
    c.Nk = 170;
    add(c);
  }
  // Value widths: every specialised one and generic ones, fp16 and bf16.
  for (DType vt : {DType::kFloat16, DType::kBFloat16}) {
    for (int dv : {32, 64, 72, 80, 96, 128, 256, 8, 16, 48, 88, 136, 200}) {
      Case c;
      c.name = "value_dim";
      c.v_dtype = vt;
      c.dv = dv;
      c.Nq = 130;
      c.Nk = 190;
      add(c);
    }
  }
  // Causal (top-left), square and rectangular, with and without bias, every tile shape.
  for (auto [nq, nk] : std::vector<std::pair<int, int>>{{300, 300}, {100, 300}, {300, 100}, {1, 5}}) {
    for (int dv : {64, 128, 256}) {
      Case c;
      c.name = "causal";
      c.causal = true;
      c.Nq = nq;
      c.Nk = nk;
      c.dv = dv;
      add(c);
    }
  }
  // Input dtypes: fp32 / bf16 signs, prepacked bits, mixed.
  for (auto [qt, kt] : std::vector<std::pair<DType, DType>>{{DType::kFloat32, DType::kFloat32},
                                                             {DType::kBFloat16, DType::kFloat16},
                                                             {DType::kBits, DType::kBits},
                                                             {DType::kBits, DType::kFloat32}}) {
    for (int d : {64, 200}) {
      Case c;
      c.name = "qk_dtype";
      c.q_dtype = qt;
      c.k_dtype = kt;
      c.d = d;
      c.Nq = 90;
      c.Nk = 250;
      add(c);
    }
  }
  // Row / key factors: per head and per token, positive and with negative values (sign folding).
  for (Scale qs : {Scale::kNone, Scale::kPerHead, Scale::kPerToken}) {
    for (Scale ks : {Scale::kNone, Scale::kPerHead, Scale::kPerToken}) {
      for (bool neg : {false, true}) {
        if (qs == Scale::kNone && ks == Scale::kNone && neg) continue;
        Case c;
        c.name = "scales";
        c.q_scale = qs;
        c.k_scale = ks;
        c.negative_scales = neg;
        c.scale_mult = 2.0;
        c.Nq = 120;
        c.Nk = 200;
        add(c);
      }
    }
  }
  // Peaked softmax (large scores): exercises the conditional rescaling and fp16 subnormal P.
  for (double mult : {8.0, 30.0}) {
    Case c;
    c.name = "peaked";
    c.scale_mult = mult;
    c.q_scale = Scale::kPerToken;
    c.Nq = 100;
    c.Nk = 600;
    add(c);
  }
  // Dense bias: dtypes and broadcast patterns, -inf rows and elements, with causal and per-token k.
  for (Bias bm : {Bias::kFull, Bias::kHeadBroadcast, Bias::kBatchAndQueryBroadcast, Bias::kKeyBroadcast,
                  Bias::kMaskRows}) {
    for (DType bt_ : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
      Case c;
      c.name = "dense_bias";
      c.B = 2;
      c.bias = bm;
      c.bias_dtype = bt_;
      c.Nq = 77;
      c.Nk = 161;
      c.k_scale = bm == Bias::kFull ? Scale::kPerToken : Scale::kNone;
      c.causal = bm == Bias::kHeadBroadcast;
      add(c);
    }
  }
  // Rel-pos bias: with / without cls, non-square grids, ViT-B/16 224 (14x14+1), with dense bias,
  // and a table too large for shared memory (read through L1).
  struct Grid { int wh, ww, prefix; Bias extra; bool causal; };
  for (const Grid& gr : std::vector<Grid>{{7, 7, 1, Bias::kNone, false}, {7, 7, 0, Bias::kNone, false},
                                          {5, 9, 1, Bias::kNone, false}, {14, 14, 1, Bias::kNone, false},
                                          {6, 11, 1, Bias::kFull, false}, {8, 8, 1, Bias::kNone, true},
                                          {46, 46, 1, Bias::kNone, false}}) {
    Case c;
    c.name = "relpos";
    c.relpos = true;
    c.wh = gr.wh;
    c.ww = gr.ww;
    c.prefix = gr.prefix;
    c.Nq = c.Nk = gr.prefix + gr.wh * gr.ww;
    c.bias = gr.extra;
    c.causal = gr.causal;
    c.q_scale = Scale::kPerHead;
    c.k_scale = Scale::kPerHead;
    c.H = gr.wh > 20 ? 1 : 3;
    if (gr.wh > 20) c.d = c.dv = 32;
    add(c);
  }
  // fp32 V (3xTF32 P.V) and fp32 inputs.
  for (int dv : {64, 40, 128, 256}) {
    Case c;
    c.name = "fp32_v";
    c.v_dtype = DType::kFloat32;
    c.q_dtype = c.k_dtype = DType::kFloat32;
    c.dv = dv;
    c.Nq = 100;
    c.Nk = 230;
    c.causal = dv == 128;
    add(c);
  }
  // pv_int8: output dtypes, generic widths, causal, bias, long key ranges.
  for (DType ot : {DType::kFloat16, DType::kBFloat16, DType::kFloat32}) {
    for (int dv : {64, 48, 128, 256}) {
      Case c;
      c.name = "pv_int8";
      c.pv_int8 = true;
      c.v_dtype = ot;
      c.dv = dv;
      c.Nq = 90;
      c.Nk = dv == 64 ? 700 : 200;
      c.causal = ot == DType::kBFloat16;
      c.bias = ot == DType::kFloat32 && dv == 64 ? Bias::kFull : Bias::kNone;
      c.scale_mult = 3.0;
      add(c);
    }
  }
  // Layouts: padded rows with aligned starts, and unaligned starts (scalar fallbacks).
  for (int offset : {0, 1}) {
    for (DType vt : {DType::kFloat16, DType::kFloat32}) {
      Case c;
      c.name = "layout";
      c.pad = offset ? 3 : 24;
      c.offset = offset;
      c.v_dtype = vt;
      c.q_dtype = c.k_dtype = vt;
      c.Nq = 70;
      c.Nk = 140;
      c.bias = Bias::kFull;
      c.bias_dtype = DType::kFloat16;
      add(c);
    }
  }
  {
    Case c;
    c.name = "layout_int8_unaligned";
    c.pv_int8 = true;
    c.offset = 1;
    c.pad = 5;
    c.Nq = 50;
    c.Nk = 99;
    add(c);
  }
  // The bounded-max kernels (fp16/bf16 V, no dense bias, no per-token k scale; see
  // kernel_bounded.h): the row maximum fixed a priori (small scales), after a few online tiles
  // (unit scales, causal), never (large scales, fp16), scores at the a-priori bound (keys equal
  // to queries: P = 2^kTop must not overflow fp16), the k128 / k256 variants (d = 128, 200),
  // 8-warp value widths, and the rel-pos table windows of several query blocks.
  struct Bounded { const char* what; DType vt; int d, dv, nq, nk; double mult; Scale qs; bool causal;
                   int copy_q; int wh, ww, prefix; };
  for (const Bounded& bd : std::vector<Bounded>{
           {"fixed_apriori", DType::kFloat16, 64, 64, 300, 1000, 0.4, Scale::kPerHead, false, 0, 0, 0, 0},
           {"fixed_apriori", DType::kBFloat16, 64, 64, 300, 1000, 0.4, Scale::kPerHead, false, 0, 0, 0, 0},
           {"top", DType::kFloat16, 64, 64, 200, 520, 0.4, Scale::kPerHead, false, 3, 0, 0, 0},
           {"top", DType::kBFloat16, 64, 64, 200, 520, 0.4, Scale::kPerHead, false, 3, 0, 0, 0},
           {"top_causal", DType::kFloat16, 64, 64, 260, 260, 0.6, Scale::kPerToken, true, 2, 0, 0, 0},
           {"switch", DType::kFloat16, 64, 64, 270, 900, 1.0, Scale::kPerToken, false, 0, 0, 0, 0},
           {"switch_causal", DType::kFloat16, 64, 64, 700, 700, 1.0, Scale::kPerHead, true, 0, 0, 0, 0},
           {"online", DType::kFloat16, 64, 64, 150, 800, 5.0, Scale::kPerToken, false, 0, 0, 0, 0},
           {"online", DType::kBFloat16, 64, 64, 150, 800, 5.0, Scale::kPerToken, false, 0, 0, 0, 0},
           {"k128", DType::kFloat16, 128, 64, 200, 400, 1.0, Scale::kPerHead, false, 0, 0, 0, 0},
           {"k256", DType::kFloat16, 200, 64, 200, 400, 1.0, Scale::kPerHead, true, 0, 0, 0, 0},
           {"dv128", DType::kFloat16, 128, 128, 300, 500, 0.5, Scale::kPerHead, false, 0, 0, 0, 0},
           {"dv72", DType::kBFloat16, 72, 72, 200, 333, 1.0, Scale::kPerHead, true, 0, 0, 0, 0},
           {"relpos", DType::kFloat16, 64, 64, 0, 0, 0.5, Scale::kPerHead, false, 0, 20, 30, 1},
           {"relpos", DType::kBFloat16, 64, 64, 0, 0, 1.0, Scale::kPerHead, false, 0, 17, 13, 0},
           {"relpos_top", DType::kFloat16, 64, 64, 0, 0, 0.4, Scale::kPerHead, false, 4, 16, 16, 1},
           {"relpos_causal", DType::kFloat16, 128, 64, 0, 0, 1.0, Scale::kPerToken, true, 0, 11, 23, 1},
           {"relpos_dv128", DType::kFloat16, 64, 128, 0, 0, 0.7, Scale::kPerHead, false, 0, 12, 12, 1}}) {
    Case c;
    c.name = std::string("bounded_") + bd.what;
    c.v_dtype = bd.vt;
    c.d = bd.d;
    c.dv = bd.dv;
    c.Nq = bd.nq;
    c.Nk = bd.nk;
    c.scale_mult = bd.mult;
    c.q_scale = bd.qs;
    c.k_scale = Scale::kPerHead;
    c.scale_lo = 0.5;
    c.scale_hi = 1.5;
    c.negative_scales = bd.qs == Scale::kPerToken;
    c.causal = bd.causal;
    c.copy_q_every = bd.copy_q;
    if (bd.wh > 0) {
      c.relpos = true;
      c.wh = bd.wh;
      c.ww = bd.ww;
      c.prefix = bd.prefix;
      c.Nq = c.Nk = bd.prefix + bd.wh * bd.ww;
      c.table_sigma = 0.5;
    }
    add(c);
  }
  // Larger batch x heads.
  {
    Case c;
    c.name = "batch";
    c.B = 3;
    c.H = 5;
    c.Nq = 200;
    c.Nk = 200;
    c.q_scale = c.k_scale = Scale::kPerHead;
    add(c);
  }
  // The bounded kernels' output / V layouts (the v9 epilogue and copies; the cases above pad
  // every row by 8 elements): contiguous rows (staged 16-byte stores), 4-byte aligned rows (pair
  // stores), unaligned starts (scalar stores, synchronous V copies), Dv 64 and 128 (the 8-key V
  // mapping of the Dv 128 wgmma kernel). (AttentionFwdSm90 / MmaSync run them on both paths.)
  for (int dv : {64, 128}) {
    for (auto [pad, offset] : std::vector<std::pair<int, int>>{{0, 0}, {2, 0}, {3, 1}}) {
      Case c;
      c.name = "layout_bounded";
      c.v_dtype = dv == 128 ? DType::kBFloat16 : DType::kFloat16;
      c.dv = dv;
      c.pad = pad;
      c.offset = offset;
      c.Nq = 150;
      c.Nk = 300;
      c.q_scale = c.k_scale = Scale::kPerHead;
      c.causal = offset == 1;
      add(c);
    }
  }
  return cs;
}

// One case through the public entry point, checked against the float64 reference (the K pre-pass
// output too); skipped where the minimal build lacks the instantiation.
void run_against_reference(const Case& c) {
  SCOPED_TRACE(describe(c));
  AttentionFwdCase t(c);
  const RunOutput r = t.run();
  if (r.status == cudaErrorNotSupported && minimal_build()) GTEST_SKIP() << "not in the minimal build";
  ASSERT_EQ(r.status, cudaSuccess) << cudaGetErrorString(r.status);
  t.check_prepass(r);
  t.check(r);
}

class AttentionFwd : public ::testing::TestWithParam<Case> {};

TEST_P(AttentionFwd, MatchesFloat64Reference) {
  BF_REQUIRE_GPU();
  run_against_reference(GetParam());
}

// gtest names of the parameterised cases: the case's name and its index.
std::string case_test_name(const ::testing::TestParamInfo<Case>& info) {
  return info.param.name + "_" + std::to_string(info.index);
}

INSTANTIATE_TEST_SUITE_P(Cases, AttentionFwd, ::testing::ValuesIn(all_cases()),
                         case_test_name);

// The sm_90a variant of the bounded kernels (wgmma P.V, cuda/src/attention_fwd/pv_wgmma.h) is the
// default on compute capability 9.0 devices (launch.h; BINFORMER_FWD_SM90=0 turns it off), so on
// an H100 the AttentionFwd suite above runs it wherever it applies. Both paths stay tested on
// every case that takes the bounded wgmma-capable path (fp16/bf16 V, no dense bias, no per-token
// k scale, Dv = 64, and since v5 Dv = 72, 80, 96, 128), plus longer key ranges: AttentionFwdSm90
// forces BINFORMER_FWD_SM90=1, BINFORMER_FWD_SM90_WIDE=1 (=2 when set so by the caller: the
// 1-block kernels; skipped on devices other than compute capability 9.0) and
// BINFORMER_FWD_SM90_NARROW=0 (Dv = 64 on the wide block; AttentionFwdSm90Narrow below forces the
// narrow one), AttentionFwdMmaSync forces BINFORMER_FWD_SM90=0 (the mma.sync bounded kernels,
// every device). With BINFORMER_FWD_SM90_LOG=1 the library prints
// one line when the wgmma kernel is first launched.
bool have_sm90_device() { return binformer::cuda::device_is_sm90(); }

// Sets an environment variable for the lifetime of the object, then restores it.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    const char* old = std::getenv(name);
    had_ = old != nullptr;
    if (had_) old_ = old;
    setenv(name, value, 1);
  }
  ~ScopedEnv() {
    if (had_) {
      setenv(name_.c_str(), old_.c_str(), 1);
    } else {
      unsetenv(name_.c_str());
    }
  }

 private:
  std::string name_, old_;
  bool had_ = false;
};

// Test names of a suite that reruns cases under a switch: `prefix` + the case name without its
// first `strip` characters (the source suite's prefix) + the index.
// (A functor constructed with parentheses: nvcc's host pass does not take a returned lambda inside
// the gtest macro, and a braced initializer's comma splits the macro's arguments.)
struct RenamedCase {
  RenamedCase(std::string prefix_, size_t strip_) : prefix(std::move(prefix_)), strip(strip_) {}
  std::string prefix;
  size_t strip;
  std::string operator()(const ::testing::TestParamInfo<Case>& info) const {
    return prefix + info.param.name.substr(strip) + "_" + std::to_string(info.index);
  }
};

std::vector<Case> sm90_cases() {
  std::vector<Case> cs;
  for (Case c : all_cases()) {
    const bool bounded = !c.pv_int8 && (c.v_dtype == DType::kFloat16 || c.v_dtype == DType::kBFloat16) &&
                         c.bias == Bias::kNone && c.k_scale != Scale::kPerToken &&
                         (c.dv == 64 || c.dv == 72 || c.dv == 80 || c.dv == 96 || c.dv == 128);
    if (!bounded) continue;
    c.name = "sm90_" + c.name;
    cs.push_back(c);
  }
  uint32_t seed = 900;
  for (DType vt : {DType::kFloat16, DType::kBFloat16}) {  // many key tiles, both QK^T forms
    Case c;
    c.name = "sm90_long";
    c.v_dtype = vt;
    c.Nq = 260;
    c.Nk = 2100;
    c.d = vt == DType::kFloat16 ? 64 : 128;
    c.q_scale = c.k_scale = Scale::kPerHead;
    c.scale_lo = 0.5;
    c.scale_hi = 1.0;
    c.seed = seed++;
    cs.push_back(c);
    c.name = "sm90_long_causal";
    c.causal = true;
    c.Nq = c.Nk = 1500;
    c.seed = seed++;
    cs.push_back(c);
  }
  // The wide value widths (v5: Dv 72 no swizzle, 80 32B, 96 64B, 128 128B with two column
  // blocks), DiT-like and many 64-key tiles.
  for (int dv : {72, 80, 96, 128}) {
    Case c;
    c.name = "sm90_long_dv" + std::to_string(dv);
    c.v_dtype = dv == 96 ? DType::kBFloat16 : DType::kFloat16;
    c.d = dv;
    c.dv = dv;
    c.Nq = 300;
    c.Nk = 1030;
    c.causal = dv == 80;
    c.q_scale = c.k_scale = Scale::kPerHead;
    c.scale_lo = 0.5;
    c.scale_hi = 1.0;
    c.seed = seed++;
    cs.push_back(c);
  }
  return cs;
}

class AttentionFwdSm90 : public ::testing::TestWithParam<Case> {};

TEST_P(AttentionFwdSm90, MatchesFloat64Reference) {
  BF_REQUIRE_GPU();
  if (!have_sm90_device()) GTEST_SKIP() << "the wgmma path needs a compute capability 9.0 device";
  ScopedEnv sm90("BINFORMER_FWD_SM90", "1");
  // Dv 72..128 too (v5): 2 blocks/SM unless the caller asked for the 1-block kernels (=2).
  const char* wide = std::getenv("BINFORMER_FWD_SM90_WIDE");
  ScopedEnv sm90_wide("BINFORMER_FWD_SM90_WIDE", wide != nullptr && std::string(wide) == "2" ? "2" : "1");
  // Dv = 64 on the wide (two-warpgroup) block; AttentionFwdSm90Narrow runs the narrow one.
  ScopedEnv sm90_narrow("BINFORMER_FWD_SM90_NARROW", "0");
  run_against_reference(GetParam());
}

INSTANTIATE_TEST_SUITE_P(Cases, AttentionFwdSm90, ::testing::ValuesIn(sm90_cases()),
                         case_test_name);

// The narrow one-warpgroup block of the Dv = 64 wgmma kernel (v8: 64 rows, 4 blocks per SM;
// launch.h takes it without rel-pos for Nk >= BINFORMER_FWD_SM90_NARROW_MIN_NK unless BINFORMER_FWD_SM90_NARROW
// says otherwise): forced with BINFORMER_FWD_SM90_NARROW=1 on every Dv = 64 case above (causal,
// rel-pos, bf16, every QK^T form, the long ones too).
std::vector<Case> sm90_narrow_cases() {
  std::vector<Case> cs;
  for (Case c : sm90_cases()) {
    if (c.dv != 64) continue;
    c.name = "narrow_" + c.name.substr(5);
    cs.push_back(c);
  }
  return cs;
}

class AttentionFwdSm90Narrow : public ::testing::TestWithParam<Case> {};

TEST_P(AttentionFwdSm90Narrow, MatchesFloat64Reference) {
  BF_REQUIRE_GPU();
  if (!have_sm90_device()) GTEST_SKIP() << "the wgmma path needs a compute capability 9.0 device";
  ScopedEnv sm90("BINFORMER_FWD_SM90", "1");
  ScopedEnv narrow("BINFORMER_FWD_SM90_NARROW", "1");
  run_against_reference(GetParam());
}

INSTANTIATE_TEST_SUITE_P(Cases, AttentionFwdSm90Narrow, ::testing::ValuesIn(sm90_narrow_cases()),
                         case_test_name);

// The cp.async key tiles of the wgmma kernels (BINFORMER_FWD_TMA=0): the fallback for V that the
// TMA cannot address. By default the TMA copies them wherever V is TMA-addressable (tma_desc.h:
// 16-byte aligned base and strides, i.e. every case above but the unaligned ones), so the suites
// above run the TMA kernels there. Every wgmma case, Dv = 64 on the narrow block for odd seeds.
class AttentionFwdSm90CpAsync : public ::testing::TestWithParam<Case> {};

TEST_P(AttentionFwdSm90CpAsync, MatchesFloat64Reference) {
  BF_REQUIRE_GPU();
  if (!have_sm90_device()) GTEST_SKIP() << "the wgmma path needs a compute capability 9.0 device";
  const Case& c = GetParam();
  ScopedEnv sm90("BINFORMER_FWD_SM90", "1");
  ScopedEnv sm90_wide("BINFORMER_FWD_SM90_WIDE", "1");
  ScopedEnv narrow("BINFORMER_FWD_SM90_NARROW", c.dv == 64 && c.seed % 2 == 1 ? "1" : "0");
  ScopedEnv tma("BINFORMER_FWD_TMA", "0");
  run_against_reference(c);
}

INSTANTIATE_TEST_SUITE_P(Cases, AttentionFwdSm90CpAsync, ::testing::ValuesIn(sm90_cases()),
                         RenamedCase("cpasync_", 5));

class AttentionFwdMmaSync : public ::testing::TestWithParam<Case> {};

TEST_P(AttentionFwdMmaSync, MatchesFloat64Reference) {
  BF_REQUIRE_GPU();
  ScopedEnv sm90("BINFORMER_FWD_SM90", "0");
  run_against_reference(GetParam());
}

INSTANTIATE_TEST_SUITE_P(Cases, AttentionFwdMmaSync, ::testing::ValuesIn(sm90_cases()),
                         RenamedCase("mmasync_", 5));

// Rel-pos in the bounded kernels with the table streamed per key tile (kernel_bounded.h
// relpos_slice; launch.h takes it when a block's table window exceeds 64 KB, and
// BINFORMER_FWD_RELPOS_STREAM=1 forces it): every bounded rel-pos case above, plus a grid whose
// window exceeds 64 KB (64 x 129 + cls: 8257 tokens, one head).
std::vector<Case> relpos_stream_cases() {
  std::vector<Case> cs;
  for (Case c : all_cases()) {
    const bool bounded = c.relpos && !c.pv_int8 && c.bias == Bias::kNone && c.k_scale != Scale::kPerToken &&
                         (c.v_dtype == DType::kFloat16 || c.v_dtype == DType::kBFloat16);
    if (!bounded) continue;
    c.name = "stream_" + c.name;
    cs.push_back(c);
  }
  Case c;
  c.name = "stream_relpos_large_window";
  c.relpos = true;
  c.wh = 64;
  c.ww = 129;
  c.prefix = 1;
  c.Nq = c.Nk = 1 + 64 * 129;
  c.H = 1;
  c.q_scale = c.k_scale = Scale::kPerHead;
  c.seed = 990;
  cs.push_back(c);
  return cs;
}

class AttentionFwdRelPosStream : public ::testing::TestWithParam<Case> {};

TEST_P(AttentionFwdRelPosStream, MatchesFloat64Reference) {
  BF_REQUIRE_GPU();
  ScopedEnv stream("BINFORMER_FWD_RELPOS_STREAM", "1");
  run_against_reference(GetParam());
}

INSTANTIATE_TEST_SUITE_P(Cases, AttentionFwdRelPosStream, ::testing::ValuesIn(relpos_stream_cases()),
                         case_test_name);

// Same inputs, same bits: no atomics or order-dependent reductions in the forward pass.
TEST(AttentionFwdDeterminism, RunToRunIdentical) {
  BF_REQUIRE_GPU();
  for (bool pv_int8 : {false, true}) {
    Case c;
    c.name = "determinism";
    c.B = 2;
    c.Nq = 257;
    c.Nk = 513;
    c.pv_int8 = pv_int8;
    c.bias = Bias::kFull;
    c.k_scale = Scale::kPerToken;
    c.seed = 7;
    SCOPED_TRACE(describe(c));
    AttentionFwdCase t(c);
    const RunOutput a = t.run(), b = t.run();
    ASSERT_EQ(a.status, cudaSuccess) << cudaGetErrorString(a.status);
    ASSERT_EQ(b.status, cudaSuccess) << cudaGetErrorString(b.status);
    EXPECT_TRUE(a.out == b.out) << "out differs between two runs";
    EXPECT_TRUE(a.lse == b.lse) << "lse differs between two runs";
  }
}

// No keys at all: every row is "fully masked" (out 0, lse -inf).
TEST(AttentionFwdEdge, NoKeys) {
  BF_REQUIRE_GPU();
  Case c;
  c.name = "no_keys";
  c.Nq = 37;
  c.Nk = 0;
  AttentionFwdCase t(c);
  const RunOutput r = t.run();
  ASSERT_EQ(r.status, cudaSuccess) << cudaGetErrorString(r.status);
  t.check(r);
}

// Arguments the kernel relies on are validated, never read out of bounds.
TEST(AttentionFwdValidation, RejectsInvalidArguments) {
  BF_REQUIRE_GPU();
  DeviceBuffer buf(1 << 20);  // real device memory, so that a wrongly accepted call stays in bounds
  AttentionFwdParams base{};
  base.B = base.H = 1;
  base.Nq = base.Nk = 16;
  base.head_dim = base.v_dim = 64;
  base.q_dtype = base.k_dtype = base.v_dtype = base.out_dtype = DType::kFloat16;
  base.q_stride[2] = base.k_stride[2] = base.v_stride[2] = base.out_stride[2] = 64;
  base.q = base.k = base.v = buf.ptr;
  base.out = static_cast<uint8_t*>(buf.ptr) + (256 << 10);
  base.workspace = static_cast<uint8_t*>(buf.ptr) + (512 << 10);
  base.scale = 0.125f;
  ASSERT_LE(binformer::cuda::attention_fwd_workspace_bytes(base), size_t(512 << 10));
  ASSERT_EQ(binformer::cuda::attention_fwd(base, nullptr), cudaSuccess) << "the valid baseline";
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  auto expect_invalid = [](AttentionFwdParams p, const char* what) {
    EXPECT_EQ(binformer::cuda::attention_fwd(p, nullptr), cudaErrorInvalidValue) << what;
  };
  AttentionFwdParams p = base;
  p.head_dim = 12;
  expect_invalid(p, "head_dim not a multiple of 8");
  p = base;
  p.head_dim = 264;
  expect_invalid(p, "head_dim > 256");
  p = base;
  p.v_dim = 0;
  expect_invalid(p, "v_dim 0");
  p = base;
  p.v_dim = 260;
  expect_invalid(p, "v_dim > 256");
  p = base;
  p.out_dtype = DType::kFloat32;
  expect_invalid(p, "out dtype differs from v dtype");
  p = base;
  p.pv_int8 = true;
  expect_invalid(p, "pv_int8 without int8 V / dequant");
  p = base;
  p.rel_pos_table = static_cast<const float*>(buf.ptr);
  p.rel_pos_wh = 3;
  p.rel_pos_ww = 3;
  p.num_prefix_tokens = 1;
  expect_invalid(p, "rel-pos grid does not match N");
  p = base;
  p.q = static_cast<const uint8_t*>(buf.ptr) + 1;
  expect_invalid(p, "misaligned q");
  p = base;
  p.workspace = nullptr;
  expect_invalid(p, "missing workspace");
  p = base;
  p.bias = buf.ptr;
  p.bias_dtype = DType::kBits;
  expect_invalid(p, "bias dtype");
  p = base;
  p.Nq = -1;
  expect_invalid(p, "negative size");
}

// Timing of attention_fwd (K pre-pass included) on the SPEC.md peer shapes; run with
//   binformer_cuda_tests --gtest_also_run_disabled_tests --gtest_filter='*AttentionFwdBench*'
// Prints the median of 20 timed calls (after 3 warm-up calls) and the exp floor B*H*Nq*Nk/4.2e12.
// BINFORMER_FWD_BENCH_ONLY=<substring> keeps the shapes whose name contains it (for profilers).
// BINFORMER_FWD_BENCH_Q_BITS=1 passes Q as packed sign words (DType::kBits, packed here): what the
// op would cost with Q packed outside the kernel (NOTES v17).
// Scales as in bench/bench_gpu.py (per-head alpha_q = alpha_k = 0.8 ~ mean |N(0,1)|), rel-pos
// tables 0.1 * N(0,1)-like values.
TEST(AttentionFwdBench, DISABLED_PeerShapes) {
  BF_REQUIRE_GPU();
  struct Shape {
    const char* what;
    int B, H, N, d;
    bool causal, relpos, pv_int8;
    int wh;
  };
  const Shape shapes[] = {
      {"ViT-B/16 224", 128, 12, 197, 64, false, false, false, 0},
      {"ViT-B/16 224 rel-pos", 128, 12, 197, 64, false, true, false, 14},
      {"ViT-L/16 384", 32, 16, 577, 64, false, false, false, 0},
      {"ViT-L/16 384 rel-pos", 32, 16, 577, 64, false, true, false, 24},
      {"DiT-XL/2 512", 16, 16, 1024, 72, false, false, false, 0},
      {"3-D medical", 16, 6, 1680, 64, false, false, false, 0},
      {"N=4096 d=64", 4, 16, 4096, 64, false, false, false, 0},
      {"N=4096 d=64 causal", 4, 16, 4096, 64, true, false, false, 0},
      {"N=4096 d=64 rel-pos", 4, 16, 4096, 64, false, true, false, 64},
      {"N=4096 d=64 pv_int8", 4, 16, 4096, 64, false, false, true, 0},
      {"N=4096 d=128", 4, 16, 4096, 128, false, false, false, 0},
      {"N=16384 d=64", 1, 16, 16384, 64, false, false, false, 0},
  };
  const char* only = std::getenv("BINFORMER_FWD_BENCH_ONLY");
  for (const Shape& sh : shapes) {
    if (only != nullptr && std::string(sh.what).find(only) == std::string::npos) continue;
    const int64_t n_qk = int64_t(sh.B) * sh.H * sh.N * sh.d;
    std::vector<uint16_t> host(static_cast<size_t>(n_qk));
    uint32_t state = 12345;
    for (auto& x : host) {  // random fp16 in (-2, 2)
      state = state * 1664525u + 1013904223u;
      const __half h = __float2half(float(int32_t(state >> 8) - (1 << 23)) / float(1 << 22));
      std::memcpy(&x, &h, 2);
    }
    DeviceBuffer q(n_qk * 2), k(n_qk * 2), v(n_qk * 2), out(n_qk * 2), lse(size_t(sh.B) * sh.H * sh.N * 4);
    std::vector<uint8_t> bytes(size_t(n_qk) * 2);
    std::memcpy(bytes.data(), host.data(), bytes.size());
    const char* q_bits_env = std::getenv("BINFORMER_FWD_BENCH_Q_BITS");
    const bool q_bits = q_bits_env != nullptr && std::string(q_bits_env) == "1";
    const int q_words = binformer::words_for(sh.d);
    if (q_bits) {  // bit c % 32 of word c / 32 = !(x < 0), as pack_sign
      std::vector<uint32_t> words(size_t(n_qk / sh.d) * q_words, 0u);
      for (int64_t row = 0; row < n_qk / sh.d; ++row)
        for (int c = 0; c < sh.d; ++c) {
          if (!(binformer::test::half_bits_to_double(host[size_t(row * sh.d + c)]) < 0.0)) {
            words[size_t(row) * q_words + c / 32] |= 1u << (c % 32);
          }
        }
      std::vector<uint8_t> wbytes(words.size() * 4);
      std::memcpy(wbytes.data(), words.data(), wbytes.size());
      q.upload(wbytes);
    } else {
      q.upload(bytes);
    }
    k.upload(bytes);
    v.upload(bytes);
    const int T = (2 * sh.wh - 1) * (2 * sh.wh - 1) + 3;
    const int prefix = sh.relpos && sh.wh * sh.wh != sh.N ? 1 : 0;  // ViT: cls token
    DeviceBuffer table(sh.relpos ? size_t(sh.H) * T * 4 : 0), scales(size_t(sh.B) * sh.H * 4),
        dq(size_t(sh.B) * sh.H * sh.d * 4);
    if (sh.relpos) {
      std::vector<float> tab(size_t(sh.H) * T);
      for (auto& x : tab) {
        state = state * 1664525u + 1013904223u;
        x = 0.1f * (float(int32_t(state >> 8) - (1 << 23)) / float(1 << 23)) * 1.7f;  // ~0.1 N(0,1) spread
      }
      ASSERT_EQ(cudaMemcpy(table.ptr, tab.data(), table.bytes, cudaMemcpyHostToDevice), cudaSuccess);
    }
    std::vector<float> alphas(size_t(sh.B) * sh.H, 0.8f), dqv(size_t(sh.B) * sh.H * sh.d, 0.01f);
    ASSERT_EQ(cudaMemcpy(scales.ptr, alphas.data(), scales.bytes, cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(dq.ptr, dqv.data(), dq.bytes, cudaMemcpyHostToDevice), cudaSuccess);
    AttentionFwdParams p{};
    p.B = sh.B;
    p.H = sh.H;
    p.Nq = p.Nk = sh.relpos ? prefix + sh.wh * sh.wh : sh.N;
    p.head_dim = p.v_dim = sh.d;
    p.q = q.ptr;
    p.k = k.ptr;
    p.v = v.ptr;
    p.out = out.ptr;
    p.lse = static_cast<float*>(lse.ptr);
    p.q_dtype = p.k_dtype = p.v_dtype = p.out_dtype = DType::kFloat16;
    if (sh.pv_int8) {
      p.v_dtype = DType::kInt8;  // the fp16 bytes reinterpreted as int8 values: timing only
      p.pv_int8 = true;
      p.v_dequant = static_cast<float*>(dq.ptr);
    }
    for (int64_t* st : {p.q_stride, p.k_stride, p.v_stride, p.out_stride}) {
      st[2] = sh.d;
      st[1] = int64_t(p.Nq) * sh.d;
      st[0] = int64_t(sh.H) * st[1];
    }
    if (q_bits) {
      p.q_dtype = DType::kBits;
      p.q_stride[2] = q_words;
      p.q_stride[1] = int64_t(p.Nq) * q_words;
      p.q_stride[0] = int64_t(sh.H) * p.q_stride[1];
    }
    // BinaryAttention: per-(batch, head) alpha_q and alpha_k.
    p.q_scale = p.k_scale = static_cast<float*>(scales.ptr);
    p.q_scale_stride[0] = p.k_scale_stride[0] = sh.H;
    p.q_scale_stride[1] = p.k_scale_stride[1] = 1;
    p.scale = float(1.0 / std::sqrt(double(sh.d)));
    p.causal = sh.causal;
    if (sh.relpos) {
      p.rel_pos_table = static_cast<float*>(table.ptr);
      p.rel_pos_table_stride_h = T;
      p.rel_pos_wh = p.rel_pos_ww = sh.wh;
      p.num_prefix_tokens = prefix;
    }
    DeviceBuffer ws(binformer::cuda::attention_fwd_workspace_bytes(p));
    p.workspace = ws.ptr;
    // A BINFORMER_CUDA_MINIMAL build has the Dv-64 kernels only: skip the other shapes (A/B
    // runs time a minimal build against the full one).
    const cudaError_t first = binformer::cuda::attention_fwd(p, nullptr);
    if (first == cudaErrorNotSupported) {
      std::printf("attention_fwd %-22s not in this build\n", sh.what);
      continue;
    }
    ASSERT_EQ(first, cudaSuccess);
    cudaEvent_t start, stop;
    ASSERT_EQ(cudaEventCreate(&start), cudaSuccess);
    ASSERT_EQ(cudaEventCreate(&stop), cudaSuccess);
    for (int i = 0; i < 2; ++i) ASSERT_EQ(binformer::cuda::attention_fwd(p, nullptr), cudaSuccess);
    std::vector<float> times;
    for (int i = 0; i < 20; ++i) {
      cudaEventRecord(start);
      ASSERT_EQ(binformer::cuda::attention_fwd(p, nullptr), cudaSuccess);
      cudaEventRecord(stop);
      ASSERT_EQ(cudaEventSynchronize(stop), cudaSuccess);
      float ms = 0;
      cudaEventElapsedTime(&ms, start, stop);
      times.push_back(ms * 1e3f);
    }
    std::sort(times.begin(), times.end());
    const double elements = double(sh.B) * sh.H * double(p.Nq) * double(p.Nk) * (sh.causal ? 0.5 : 1.0);
    std::printf("attention_fwd %-22s B=%d H=%d N=%lld d=%d: %8.1f us (exp floor %.1f us)\n", sh.what,
                sh.B, sh.H, (long long)p.Nq, sh.d, times[times.size() / 2], elements / 4.2e12 * 1e6);
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
  }
}

}  // namespace
