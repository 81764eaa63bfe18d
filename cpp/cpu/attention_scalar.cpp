// Portable attention forward and backward: the fallback on CPUs without AVX-512 and the
// readable statement of what the AVX-512 kernels compute.
//
// Both stream over keys (no Nq x Nk buffer). The forward keeps an online softmax over blocks
// of kKeyBlock keys in the natural-log domain; the backward recomputes P from the bits and
// the saved lse, once in a key-major pass (dv, dk_scale, dk_sign) and once in a query-major
// pass (dq_scale, dq_sign, dbias, drel_pos_table), each output owned by exactly one task and
// summed in a fixed order, so results do not depend on how parallel_for splits the work.
#include <vector>

#include "internal.h"

namespace binformer::cpu::detail {
namespace {

constexpr int kKeyBlock = 64;    // keys per online-softmax step
constexpr int kRowBlock = 16;    // query rows per parallel task
constexpr int kBwdKeyBlock = 32; // keys per task of the key-major backward pass

// Packed sign rows of q or k for every (b, h): either the caller's kBits array (strided) or
// a contiguous buffer packed here from floats.
struct BitRows {
  const uint32_t* base = nullptr;
  int64_t stride[3] = {0, 0, 0};
  std::vector<uint32_t> storage;

  const uint32_t* row(int64_t b, int64_t h, int64_t n) const {
    return base + b * stride[0] + h * stride[1] + n * stride[2];
  }
};

void prepare_bits(BitRows& bits, const void* src, DType dtype, const int64_t* src_stride, int64_t B,
                  int64_t H, int64_t N, int d) {
  const int words = words_for(d);
  if (dtype == DType::kBits) {
    bits.base = static_cast<const uint32_t*>(src);
    for (int i = 0; i < 3; ++i) bits.stride[i] = src_stride[i];
    return;
  }
  bits.storage.assign(size_t(B * H * N * words), 0u);
  bits.stride[0] = H * N * words;
  bits.stride[1] = N * words;
  bits.stride[2] = words;
  uint32_t* out = bits.storage.data();
  parallel_for(B * H * N, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (H * N), h = (r / N) % H, n = r % N;
      const int64_t base = b * src_stride[0] + h * src_stride[1] + n * src_stride[2];
      uint32_t* dst = out + r * words;
      for (int c = 0; c < d; ++c)
        dst[c / 32] |= uint32_t(!(load_as_float(src, dtype, base + c) < 0.0f)) << (c % 32);
    }
  });
  bits.base = out;
}

inline int sign_dot(const uint32_t* a, const uint32_t* b, int d) {
  int differing = 0;
  for (int w = 0; w < words_for(d); ++w) differing += __builtin_popcount(a[w] ^ b[w]);
  return d - 2 * differing;
}

inline float sign_of_bit(const uint32_t* bits, int c) { return (bits[c / 32] >> (c % 32)) & 1u ? 1.0f : -1.0f; }

// Everything but the dot product of one score: scale, the per-row factors and the biases.
// Fields common to AttentionFwdParams and AttentionBwdParams.
template <class Params>
struct ScoreTerms {
  const Params& p;
  RelPosGeometry geometry;
  explicit ScoreTerms(const Params& params)
      : p(params), geometry(params.rel_pos_wh, params.rel_pos_ww, params.num_prefix_tokens) {}

  float row_factor(int64_t b, int64_t h, int64_t i) const {  // a_i
    return p.q_scale ? p.q_scale[b * p.q_scale_stride[0] + h * p.q_scale_stride[1] + i * p.q_scale_stride[2]] : 1.0f;
  }
  float col_factor(int64_t b, int64_t h, int64_t j) const {  // b_j
    return p.k_scale ? p.k_scale[b * p.k_scale_stride[0] + h * p.k_scale_stride[1] + j * p.k_scale_stride[2]] : 1.0f;
  }
  float additive(int64_t b, int64_t h, int64_t i, int64_t j) const {  // bias_ij + relpos_ij
    float add = 0.0f;
    if (p.bias)
      add += load_as_float(p.bias, p.bias_dtype,
                           b * p.bias_stride[0] + h * p.bias_stride[1] + i * p.bias_stride[2] + j * p.bias_stride[3]);
    if (p.rel_pos_table)
      add += p.rel_pos_table[h * p.rel_pos_table_stride_h +
                             rel_pos_index(i, j, p.rel_pos_wh, p.rel_pos_ww, p.num_prefix_tokens)];
    return add;
  }
  bool masked(int64_t i, int64_t j) const { return p.causal && j > i; }
};

}  // namespace

// ------------------------------------------------------------------ forward
// The row maximum with IEEE propagation: std::max(-inf, NaN) is -inf, so a row whose scores are
// all NaN (a NaN scale) would look fully masked and return out = 0 instead of NaN.
inline float nan_max(float a, float b) { return (std::isnan(a) || std::isnan(b)) ? a + b : std::max(a, b); }

void attention_fwd_scalar(const AttentionFwdParams& p) {
  const int d = p.head_dim, dv = p.v_dim;
  BitRows q_bits, k_bits;
  prepare_bits(q_bits, p.q, p.q_dtype, p.q_stride, p.B, p.H, p.Nq, d);
  prepare_bits(k_bits, p.k, p.k_dtype, p.k_stride, p.B, p.H, p.Nk, d);
  const ScoreTerms<AttentionFwdParams> terms(p);
  const int64_t row_blocks = ceil_div(p.Nq, kRowBlock);

  parallel_for(p.B * p.H * row_blocks, 1, [&](int64_t task_begin, int64_t task_end) {
    std::vector<float> scores(kKeyBlock), acc(dv), v_row(dv);
    std::vector<int32_t> acc_int(dv);
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t bh = task / row_blocks, b = bh / p.H, h = bh % p.H;
      const int64_t i_begin = balanced_block(task % row_blocks, row_blocks) * kRowBlock;
      const int64_t i_end = std::min(p.Nq, i_begin + kRowBlock);
      const char* v_base = static_cast<const char*>(p.v) + (b * p.v_stride[0] + h * p.v_stride[1]) * dtype_size(p.v_dtype);
      for (int64_t i = i_begin; i < i_end; ++i) {
        const uint32_t* qi = q_bits.row(b, h, i);
        const float row_coef = p.scale * terms.row_factor(b, h, i);
        float m = kNegInf, l = 0.0f;
        std::fill(acc.begin(), acc.end(), 0.0f);
        const int64_t j_end = p.causal ? std::min(p.Nk, i + 1) : p.Nk;
        for (int64_t j0 = 0; j0 < j_end; j0 += kKeyBlock) {
          const int n = int(std::min<int64_t>(kKeyBlock, j_end - j0));
          float block_max = kNegInf;
          for (int t = 0; t < n; ++t) {
            const int64_t j = j0 + t;
            const int dot = sign_dot(qi, k_bits.row(b, h, j), d);
            const float s = row_coef * terms.col_factor(b, h, j) * float(dot) + terms.additive(b, h, i, j);
            scores[t] = s;
            block_max = nan_max(block_max, s);
          }
          const float m_new = nan_max(m, block_max);
          if (m_new == kNegInf) continue;  // everything so far masked: nothing to accumulate
          const float alpha = std::exp(m - m_new);  // m = -inf -> 0 (acc and l are 0 anyway)
          l *= alpha;
          for (int c = 0; c < dv; ++c) acc[c] *= alpha;
          m = m_new;
          if (p.pv_int8) std::fill(acc_int.begin(), acc_int.end(), 0);
          for (int t = 0; t < n; ++t) {
            const float prob = std::exp(scores[t] - m);
            l += prob;
            const int64_t v_off = (j0 + t) * p.v_stride[2];
            if (p.pv_int8) {
              // P quantized against the running maximum: round(exp(s - m) * 255) in [0, 255].
              const int32_t pq = int32_t(std::nearbyint(prob * 255.0f));
              const int8_t* vq = reinterpret_cast<const int8_t*>(v_base) + v_off;
              for (int c = 0; c < dv; ++c) acc_int[c] += pq * int32_t(vq[c]);
            } else {
              for (int c = 0; c < dv; ++c) acc[c] += prob * load_as_float(v_base, p.v_dtype, v_off + c);
            }
          }
          if (p.pv_int8)
            for (int c = 0; c < dv; ++c) acc[c] += float(acc_int[c]);
        }
        // out = acc / l; pv_int8 also undoes the two quantization scales (255 and v_dequant).
        const int64_t out_off = b * p.out_stride[0] + h * p.out_stride[1] + i * p.out_stride[2];
        const bool empty = (l == 0.0f);  // fully masked row: out = 0, lse = -inf
        const float inv_l = empty ? 0.0f : 1.0f / l;
        for (int c = 0; c < dv; ++c) {
          float o = acc[c] * inv_l;
          if (p.pv_int8) o *= p.v_dequant[(b * p.H + h) * dv + c] * (1.0f / 255.0f);
          store_from_float(p.out, p.out_dtype, out_off + c, empty ? 0.0f : o);
        }
        if (p.lse) p.lse[(b * p.H + h) * p.Nq + i] = empty ? kNegInf : m + std::log(l);
      }
    }
  });
}

// ------------------------------------------------------------------ backward
void attention_bwd_scalar(const AttentionBwdParams& p) {
  const int d = p.head_dim, dv = p.v_dim;
  const int64_t B = p.B, H = p.H, Nq = p.Nq, Nk = p.Nk;
  BitRows q_bits, k_bits;
  prepare_bits(q_bits, p.q_bits, DType::kBits, p.q_stride, B, H, Nq, d);
  prepare_bits(k_bits, p.k_bits, DType::kBits, p.k_stride, B, H, Nk, d);
  const ScoreTerms<AttentionBwdParams> terms(p);
  const RelPosGeometry& geometry = terms.geometry;
  const DType vt = p.v_dtype;
  auto vec = [&](const void* base, const int64_t* stride, int64_t b, int64_t h, int64_t n, int c) {
    return load_as_float(base, vt, b * stride[0] + h * stride[1] + n * stride[2] + c);
  };

  // D_i = sum_c dO_ic O_ic (the softmax-backward row term).
  std::vector<float> row_delta(size_t(B * H * Nq));
  parallel_for(B * H * Nq, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (H * Nq), h = (r / Nq) % H, i = r % Nq;
      float sum = 0.0f;
      for (int c = 0; c < dv; ++c) sum += vec(p.dout, p.dout_stride, b, h, i, c) * vec(p.out, p.out_stride, b, h, i, c);
      row_delta[r] = sum;
    }
  });

  // P_ij and dS_ij = P_ij (dO_i . V_j - D_i) for one (b, h, i, j); dot_ij is returned too.
  struct Grad { float prob, dscore; int dot; };
  auto recompute = [&](int64_t b, int64_t h, int64_t i, int64_t j) -> Grad {
    const float lse = p.lse[(b * H + h) * Nq + i];
    if (terms.masked(i, j) || lse == kNegInf) return {0.0f, 0.0f, 0};
    const int dot = sign_dot(q_bits.row(b, h, i), k_bits.row(b, h, j), d);
    const float s = p.scale * terms.row_factor(b, h, i) * terms.col_factor(b, h, j) * float(dot) +
                    terms.additive(b, h, i, j);
    const float prob = std::exp(s - lse);
    float dprob = 0.0f;
    for (int c = 0; c < dv; ++c) dprob += vec(p.dout, p.dout_stride, b, h, i, c) * vec(p.v, p.v_stride, b, h, j, c);
    return {prob, prob * (dprob - row_delta[(b * H + h) * Nq + i]), dot};
  };

  // Key-major pass: each task owns kBwdKeyBlock keys of one (b, h) and sums over all queries
  // in ascending order.
  if (p.dv || p.dk_scale || p.dk_sign) {
    const int64_t key_blocks = ceil_div(Nk, kBwdKeyBlock);
    parallel_for(B * H * key_blocks, 1, [&](int64_t task_begin, int64_t task_end) {
      for (int64_t task = task_begin; task < task_end; ++task) {
        const int64_t bh = task / key_blocks, b = bh / H, h = bh % H;
        const int64_t j_begin = (task % key_blocks) * kBwdKeyBlock, j_end = std::min(Nk, j_begin + kBwdKeyBlock);
        for (int64_t j = j_begin; j < j_end; ++j) {
          float* dv_j = p.dv ? p.dv + ((bh * Nk) + j) * dv : nullptr;
          float* dks_j = p.dk_sign ? p.dk_sign + ((bh * Nk) + j) * d : nullptr;
          if (dv_j) std::fill(dv_j, dv_j + dv, 0.0f);
          if (dks_j) std::fill(dks_j, dks_j + d, 0.0f);
          float dk_scale = 0.0f;
          const float bj = terms.col_factor(b, h, j);
          for (int64_t i = 0; i < Nq; ++i) {
            const Grad g = recompute(b, h, i, j);
            if (g.prob == 0.0f && g.dscore == 0.0f) continue;
            if (dv_j)
              for (int c = 0; c < dv; ++c) dv_j[c] += g.prob * vec(p.dout, p.dout_stride, b, h, i, c);
            const float ai_scaled = p.scale * terms.row_factor(b, h, i);
            dk_scale += g.dscore * ai_scaled * float(g.dot);
            if (dks_j) {
              const float w = g.dscore * ai_scaled * bj;
              const uint32_t* qi = q_bits.row(b, h, i);
              for (int c = 0; c < d; ++c) dks_j[c] += w * sign_of_bit(qi, c);
            }
          }
          if (p.dk_scale) p.dk_scale[bh * Nk + j] = dk_scale;
        }
      }
    });
  }

  // Query-major pass: each task owns kRowBlock query rows of one (b, h); rel-pos gradients go
  // to a per-task partial table, summed per head afterwards in task order.
  const bool want_rel = p.drel_pos_table && p.rel_pos_table;
  const int64_t T = geometry.table_size;
  const int64_t row_blocks = ceil_div(Nq, kRowBlock);
  std::vector<float> rel_partial(want_rel ? size_t(B * H * row_blocks * T) : 0);
  if (p.dq_scale || p.dq_sign || p.dbias || want_rel) {
    parallel_for(B * H * row_blocks, 1, [&](int64_t task_begin, int64_t task_end) {
      for (int64_t task = task_begin; task < task_end; ++task) {
        const int64_t bh = task / row_blocks, b = bh / H, h = bh % H;
        const int64_t i_begin = (task % row_blocks) * kRowBlock, i_end = std::min(Nq, i_begin + kRowBlock);
        float* rel = want_rel ? rel_partial.data() + task * T : nullptr;
        if (rel) std::fill(rel, rel + T, 0.0f);
        for (int64_t i = i_begin; i < i_end; ++i) {
          float* dqs_i = p.dq_sign ? p.dq_sign + (bh * Nq + i) * d : nullptr;
          if (dqs_i) std::fill(dqs_i, dqs_i + d, 0.0f);
          float dq_scale = 0.0f;
          const float ai_scaled = p.scale * terms.row_factor(b, h, i);
          for (int64_t j = 0; j < Nk; ++j) {
            const Grad g = recompute(b, h, i, j);
            if (p.dbias) p.dbias[(bh * Nq + i) * Nk + j] = g.dscore;
            if (g.dscore == 0.0f) continue;
            const float bj = terms.col_factor(b, h, j);
            dq_scale += g.dscore * p.scale * bj * float(g.dot);
            if (dqs_i) {
              const float w = g.dscore * ai_scaled * bj;
              const uint32_t* kj = k_bits.row(b, h, j);
              for (int c = 0; c < d; ++c) dqs_i[c] += w * sign_of_bit(kj, c);
            }
            if (rel) rel[rel_pos_index(i, j, geometry.wh, geometry.ww, geometry.num_prefix)] += g.dscore;
          }
          if (p.dq_scale) p.dq_scale[bh * Nq + i] = dq_scale;
        }
      }
    });
  }
  if (p.drel_pos_table) {
    // Per head: sum over b and row blocks in ascending order (fixed, thread-independent).
    for (int64_t h = 0; h < H; ++h) {
      float* dst = p.drel_pos_table + h * T;
      std::fill(dst, dst + T, 0.0f);
      if (!want_rel) continue;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t blk = 0; blk < row_blocks; ++blk) {
          const float* src = rel_partial.data() + ((b * H + h) * row_blocks + blk) * T;
          for (int64_t t = 0; t < T; ++t) dst[t] += src[t];
        }
    }
  }
}

}  // namespace binformer::cpu::detail
