// AVX-512 attention backward (flash-style: P recomputed from the sign bits and the saved lse).
//
//   P_ij = 2^(s_ij - lse_i log2 e)         s in the log2 domain as in the forward
//   dP_ij = dO_i . V_j,  D_i = dO_i . O_i,  dS_ij = P_ij (dP_ij - D_i)
//
// Two passes, both recomputing P, dP and dS tile by tile (4 query rows x 64 keys):
//  A. key-major: one task per (b, h, 64 keys) walks all query rows in ascending order and owns
//     dv, dk_scale and dk_sign of its keys;
//  B. query-major: one task per (b, h, 64 query rows) walks the keys in ascending order and owns
//     dq_scale, dq_sign and dbias of its rows, plus a partial rel-pos table that is reduced per
//     head in task order afterwards.
// Every output is summed by one task in a fixed order, so the bits do not depend on the number
// of threads or on how parallel_for splits the tasks.
//
// Sign gradients: sum_i u_i sign(q_ic) = 2 sum_{i: bit c of q_i = 1} u_i - sum_i u_i, so they
// accumulate with masked adds driven by the sign bits (on the FP add pipes, beside the FMAs of
// dP and dV) instead of multiplications by +-1.
#include <vector>

#include "attention_avx512.h"

namespace binformer::cpu::detail {
namespace {

constexpr int kKeyBlock = 64;               // keys per tile (4 vectors of 16)
constexpr int kKeyVecs = kKeyBlock / 16;
constexpr int kChunkTiles = 4;              // pass A: row tiles per step (16 rows)
constexpr int kTaskRowsB = 64;              // pass B: query rows per task
constexpr int kChanChunk = 64;              // channels per register block (4 zmm)

// Per (b, h) inputs, prepared once.
struct BwdHead {
  KeyInputs keys;            // transposed k bits, per-key b_j (nullptr when constant)
  float k_factor_const;      // b when constant over keys
  const float* v_t;          // [nk_pad / 16][Dv][16]: channel c of 16 consecutive keys
  const float* dout;         // [Nq][dv_pad] fp32, zero padded
  const float* row_delta;    // [Nq] D_i
  const float* lse2;         // [Nq] lse_i log2(e)
  const uint32_t* q_bits;    // row i at q_bits + i * q_row_stride (the caller's array)
  int64_t q_row_stride;
  const uint32_t* k_bits;
  int64_t k_row_stride;
};

struct BwdPlan {
  const AttentionBwdParams& p;
  int words = 0, dv_pad = 0, d_pad = 0;
  int64_t nk_pad = 0;
  bool k_factor_per_key = false;
  bool bias_in_row_buffer = false;
  bool has_bias = false;
  AlignedArray<uint32_t> k_bits_t;
  AlignedArray<float> k_factor, v_t, dout, row_delta, lse2, rel_reversed;
  std::vector<BwdHead> heads;
  explicit BwdPlan(const AttentionBwdParams& params) : p(params) {}
};

// In-place transpose of a 16 x 16 fp32 matrix held in 16 registers (rows in, columns out).
inline void transpose16x16(__m512 (&m)[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {  // interleave pairs of rows: 2 x 2 blocks
    t[i] = _mm512_unpacklo_ps(m[i], m[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(m[i], m[i + 1]);
  }
  for (int i = 0; i < 16; i += 4)  // 4 x 4 blocks within each 128-bit lane
    for (int k = 0; k < 2; ++k) {
      m[i + k] = _mm512_shuffle_ps(t[i + k], t[i + k + 2], _MM_SHUFFLE(1, 0, 1, 0));
      m[i + k + 2] = _mm512_shuffle_ps(t[i + k], t[i + k + 2], _MM_SHUFFLE(3, 2, 3, 2));
    }
  for (int i = 0; i < 16; i += 8)  // 128-bit lanes of rows i.. and i + 4..
    for (int k = 0; k < 4; ++k) {
      t[i + k] = _mm512_shuffle_f32x4(m[i + k], m[i + k + 4], _MM_SHUFFLE(2, 0, 2, 0));
      t[i + k + 4] = _mm512_shuffle_f32x4(m[i + k], m[i + k + 4], _MM_SHUFFLE(3, 1, 3, 1));
    }
  for (int k = 0; k < 8; ++k) {  // 256-bit halves of rows k and k + 8
    m[k] = _mm512_shuffle_f32x4(t[k], t[k + 8], _MM_SHUFFLE(2, 0, 2, 0));
    m[k + 8] = _mm512_shuffle_f32x4(t[k], t[k + 8], _MM_SHUFFLE(3, 1, 3, 1));
  }
  // The lane shuffles leave output row r at m[perm(r)]: reorder once (register renames).
  __m512 out[16];
  for (int r = 0; r < 16; ++r) out[r] = m[r];
  const int order[16] = {0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15};
  for (int r = 0; r < 16; ++r) m[r] = out[order[r]];
}

// dst[((j / 16) * dv + c) * 16 + j % 16] = V[j][c] as fp32 for j < n_pad (0 for j >= n_rows):
// 16 rows of V at a time are widened into a [16][dv_pad] block and transposed per 16 x 16
// square (a run-time dtype switch per element made this a fifth of the tiny-shape backward).
void transpose_v_groups(const char* v_head, DType dtype, int64_t row_stride, int64_t n_rows, int64_t n_pad, int dv,
                        float* dst) {
  const size_t es = dtype_size(dtype);
  const int dv_pad = int(round_up(dv, 16));
  alignas(64) float block[16][kMaxHeadDim];
  for (int64_t j0 = 0; j0 < n_pad; j0 += 16) {
    for (int jj = 0; jj < 16; ++jj) {
      const int64_t j = j0 + jj;
      for (int c = 0; c < dv_pad; c += 16) {
        const __mmask16 lanes = j < n_rows ? first_lanes16(dv - c) : __mmask16(0);
        _mm512_store_ps(&block[jj][c], load16_as_float(v_head + (j * row_stride + c) * es, dtype, lanes));
      }
    }
    float* group = dst + j0 * dv;
    for (int c = 0; c < dv; c += 16) {
      __m512 square[16];
      for (int jj = 0; jj < 16; ++jj) square[jj] = _mm512_load_ps(&block[jj][c]);
      transpose16x16(square);
      for (int cc = 0; cc < 16 && c + cc < dv; ++cc) _mm512_store_ps(group + (c + cc) * 16, square[cc]);
    }
  }
}

void build_plan(BwdPlan& plan) {
  const AttentionBwdParams& p = plan.p;
  const int64_t BH = p.B * p.H, Nq = p.Nq, Nk = p.Nk;
  const int d = p.head_dim, dv = p.v_dim;
  plan.words = words_for(d);
  plan.dv_pad = int(round_up(dv, 16));
  plan.d_pad = int(round_up(d, 16));
  plan.nk_pad = round_up(std::max<int64_t>(Nk, 1), kKeyBlock);
  plan.k_factor_per_key = p.k_scale && p.k_scale_stride[2] != 0;
  plan.has_bias = p.bias || p.rel_pos_table;
  plan.bias_in_row_buffer =
      p.rel_pos_table || (p.bias && (p.bias_dtype != DType::kFloat32 || p.bias_stride[3] != 1));
  const int64_t nk_pad = plan.nk_pad;
  const int words = plan.words, dv_pad = plan.dv_pad;
  plan.k_bits_t = make_aligned<uint32_t>(size_t(BH * nk_pad * words));
  if (plan.k_factor_per_key) plan.k_factor = make_aligned<float>(size_t(BH * nk_pad));
  plan.v_t = make_aligned<float>(size_t(BH * nk_pad * dv));
  plan.dout = make_aligned<float>(size_t(BH * Nq * dv_pad));
  plan.row_delta = make_aligned<float>(size_t(BH * Nq));
  plan.lse2 = make_aligned<float>(size_t(BH * Nq));
  if (p.rel_pos_table) {
    const RelPosGeometry geo(p.rel_pos_wh, p.rel_pos_ww, p.num_prefix_tokens);
    const int64_t T = geo.table_size;
    plan.rel_reversed = make_aligned<float>(size_t(p.H * T));
    for (int64_t h = 0; h < p.H; ++h)
      for (int64_t t = 0; t < T; ++t)
        plan.rel_reversed[h * T + t] = p.rel_pos_table[h * p.rel_pos_table_stride_h + T - 1 - t];
  }
  plan.heads.resize(size_t(BH));
  const size_t vsize = dtype_size(p.v_dtype);
  // tile_grads reads key vectors only up to the last one holding a key: the transposed k bits
  // and V are filled up to Nk rounded to 16, not to the block (Nk = 17: 32 of 64 keys).
  const int64_t nk_fill = round_up(Nk, 16);

  parallel_for(BH, grain_for_work(BH, double(BH) * double(Nq + Nk) * double(dv + d)), [&](int64_t bh_begin, int64_t bh_end) {
    for (int64_t bh = bh_begin; bh < bh_end; ++bh) {
      const int64_t b = bh / p.H, h = bh % p.H;
      BwdHead& head = plan.heads[size_t(bh)];
      uint32_t* kt = plan.k_bits_t.get() + bh * nk_pad * words;
      transpose_key_bits(p.k_bits, DType::kBits, b * p.k_stride[0] + h * p.k_stride[1], p.k_stride[2], Nk, nk_fill, d, kt);
      head.keys.bits_t = kt;
      head.keys.factor = nullptr;
      const int64_t ks_head = p.k_scale ? b * p.k_scale_stride[0] + h * p.k_scale_stride[1] : 0;
      head.k_factor_const = p.k_scale && !plan.k_factor_per_key ? p.k_scale[ks_head] : 1.0f;
      if (plan.k_factor_per_key) {
        float* kf = plan.k_factor.get() + bh * nk_pad;
        for (int64_t j = 0; j < nk_pad; ++j) kf[j] = j < Nk ? p.k_scale[ks_head + j * p.k_scale_stride[2]] : 0.0f;
        head.keys.factor = kf;
      }
      // V transposed per group of 16 keys (zero for padded keys, so their dP is 0).
      float* vt = plan.v_t.get() + bh * nk_pad * dv;
      const char* v_head = static_cast<const char*>(p.v) + (b * p.v_stride[0] + h * p.v_stride[1]) * vsize;
      transpose_v_groups(v_head, p.v_dtype, p.v_stride[2], Nk, nk_fill, dv, vt);
      head.v_t = vt;
      // dO as fp32 rows, D_i = dO_i . O_i, lse in log2 units.
      float* dout = plan.dout.get() + bh * Nq * dv_pad;
      float* delta = plan.row_delta.get() + bh * Nq;
      float* lse2 = plan.lse2.get() + bh * Nq;
      const char* do_head = static_cast<const char*>(p.dout) + (b * p.dout_stride[0] + h * p.dout_stride[1]) * vsize;
      const char* o_head = static_cast<const char*>(p.out) + (b * p.out_stride[0] + h * p.out_stride[1]) * vsize;
      for (int64_t i = 0; i < Nq; ++i) {
        __m512 acc = _mm512_setzero_ps();
        for (int c = 0; c < dv_pad; c += 16) {
          const __mmask16 lanes = first_lanes16(dv - c);
          const __m512 g = load16_as_float(do_head + (i * p.dout_stride[2] + c) * vsize, p.v_dtype, lanes);
          const __m512 o = load16_as_float(o_head + (i * p.out_stride[2] + c) * vsize, p.v_dtype, lanes);
          _mm512_store_ps(dout + i * dv_pad + c, g);
          acc = _mm512_fmadd_ps(g, o, acc);
        }
        delta[i] = _mm512_reduce_add_ps(acc);
        lse2[i] = p.lse[bh * Nq + i] * kLog2e;
      }
      head.dout = dout;
      head.row_delta = delta;
      head.lse2 = lse2;
      head.q_bits = p.q_bits + b * p.q_stride[0] + h * p.q_stride[1];
      head.q_row_stride = p.q_stride[2];
      head.k_bits = p.k_bits + b * p.k_stride[0] + h * p.k_stride[1];
      head.k_row_stride = p.k_stride[2];
    }
  });
}

// ------------------------------------------------------------------ one tile: P, dS
// Rows of a tile and what the gradient code needs of them.
struct GradRows {
  TileRows score;              // q words, slope/offset (unused here), bias rows, key limits
  float coef[kTileRows];       // scale * a_i * (b when constant) * log2(e)
  float m[kTileRows];          // lse_i log2(e) (0 for a fully masked row: its key_limit is 0)
  float delta[kTileRows];      // D_i
  float a[kTileRows];          // a_i
  const float* dout[kTileRows];
  int real_rows;               // rows beyond it repeat the last one and must not be summed
};

struct TileGrads {
  alignas(64) float p[kTileRows][kKeyBlock];
  alignas(64) float ds[kTileRows][kKeyBlock];   // dS
  alignas(64) float dsd[kTileRows][kKeyBlock];  // dS * dot (for the scale gradients)
};

// P, dS and dS * dot for the tile rows x keys [j0, j0 + 16 kVecs) (keys past the limits give
// 0); the vectors [kVecs, kKeyVecs) of the tile are stored as 0 without computing anything, so
// that short key ranges (Nk = 17: 2 of 4 vectors) cost what they hold, not a full block.
template <bool kBias, bool kKeyFactor, int kVecs>
void tile_grads_n(const BwdHead& head, const GradRows& rows, int words, int d, int dv, int64_t j0, TileGrads& g) {
  // dP = dO V^T: 4 rows x 16 kVecs keys in registers, one broadcast of dO_ic per row and channel.
  __m512 dp[kTileRows][kVecs];
  for (int r = 0; r < kTileRows; ++r)
    for (int v = 0; v < kVecs; ++v) dp[r][v] = _mm512_setzero_ps();
  const float* vt = head.v_t + (j0 / 16) * dv * 16;
  for (int c = 0; c < dv; ++c) {
    __m512 vv[kVecs];
    for (int v = 0; v < kVecs; ++v) vv[v] = _mm512_load_ps(vt + (v * dv + c) * 16);
    for (int r = 0; r < kTileRows; ++r) {
      const __m512 go = _mm512_set1_ps(rows.dout[r][c]);
      for (int v = 0; v < kVecs; ++v) dp[r][v] = _mm512_fmadd_ps(go, vv[v], dp[r][v]);
    }
  }
  for (int r = 0; r < kTileRows; ++r)
    for (int v = kVecs; v < kKeyVecs; ++v) {
      _mm512_store_ps(&g.p[r][16 * v], _mm512_setzero_ps());
      _mm512_store_ps(&g.ds[r][16 * v], _mm512_setzero_ps());
      _mm512_store_ps(&g.dsd[r][16 * v], _mm512_setzero_ps());
    }
  const __m512i lane_index = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int r = 0; r < kTileRows; ++r) {
    const uint32_t* q = rows.score.q[r];
    for (int v = 0; v < kVecs; ++v) {
      const int64_t j = j0 + 16 * v;
      const uint32_t* k_group = head.keys.bits_t + (j / 16) * words * 16;
      __m512i count = _mm512_setzero_si512();
      for (int w = 0; w < words; ++w)
        count = _mm512_add_epi32(count, _mm512_popcnt_epi32(_mm512_xor_si512(_mm512_load_si512(k_group + 16 * w),
                                                                             _mm512_set1_epi32(int(q[w])))));
      const __m512 dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_set1_epi32(d), _mm512_slli_epi32(count, 1)));
      const __mmask16 valid =
          _mm512_cmplt_epi32_mask(_mm512_add_epi32(lane_index, _mm512_set1_epi32(int(j))),
                                  _mm512_set1_epi32(rows.score.key_limit[r]));
      __m512 coef = _mm512_set1_ps(rows.coef[r]);
      if constexpr (kKeyFactor) coef = _mm512_mul_ps(coef, _mm512_load_ps(head.keys.factor + j));
      __m512 x = _mm512_fmsub_ps(dot, coef, _mm512_set1_ps(rows.m[r]));
      if constexpr (kBias)
        x = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(valid, rows.score.bias[r] + j), _mm512_set1_ps(kLog2e), x);
      x = _mm512_mask_mov_ps(_mm512_set1_ps(kNegInf), valid, x);
      const __m512 prob = exp2_ps<6>(x);
      // Masked keys: exactly 0 whatever dP holds.
      const __m512 ds = _mm512_maskz_mul_ps(valid, prob, _mm512_sub_ps(dp[r][v], _mm512_set1_ps(rows.delta[r])));
      _mm512_store_ps(&g.p[r][16 * v], prob);
      _mm512_store_ps(&g.ds[r][16 * v], ds);
      _mm512_store_ps(&g.dsd[r][16 * v], _mm512_mul_ps(ds, dot));
    }
  }
}

// tile_grads_n for the keys [j0, key_end) (at most one tile of kKeyBlock).
template <bool kBias, bool kKeyFactor>
void tile_grads(const BwdHead& head, const GradRows& rows, int words, int d, int dv, int64_t j0, int64_t key_end,
                TileGrads& g) {
  switch (std::min<int64_t>(kKeyVecs, ceil_div(key_end - j0, 16))) {
    case 1: return tile_grads_n<kBias, kKeyFactor, 1>(head, rows, words, d, dv, j0, g);
    case 2: return tile_grads_n<kBias, kKeyFactor, 2>(head, rows, words, d, dv, j0, g);
    case 3: return tile_grads_n<kBias, kKeyFactor, 3>(head, rows, words, d, dv, j0, g);
    default: return tile_grads_n<kBias, kKeyFactor, kKeyVecs>(head, rows, words, d, dv, j0, g);
  }
}

// Fills the score rows of a tile starting at query row i0 (rows past Nq repeat the last one).
// Bias rows must cover the keys [j_lo, j_hi): expanded into `bias_buf` ([kTileRows][nk_pad])
// when the bias is not a plain fp32 row of the caller.
void setup_rows(const BwdPlan& plan, const BwdHead& head, int64_t bh, int64_t i0, int64_t j_lo, int64_t j_hi,
                float* bias_buf, GradRows& rows) {
  const AttentionBwdParams& p = plan.p;
  const int64_t b = bh / p.H, h = bh % p.H, Nk = p.Nk;
  rows.real_rows = int(std::min<int64_t>(kTileRows, p.Nq - i0));
  const RelPosGeometry geo(p.rel_pos_wh, p.rel_pos_ww, p.num_prefix_tokens);
  for (int r = 0; r < kTileRows; ++r) {
    const int64_t i = i0 + std::min(r, rows.real_rows - 1);
    rows.score.q[r] = head.q_bits + i * head.q_row_stride;
    rows.a[r] = p.q_scale ? p.q_scale[b * p.q_scale_stride[0] + h * p.q_scale_stride[1] + i * p.q_scale_stride[2]] : 1.0f;
    rows.coef[r] = p.scale * rows.a[r] * head.k_factor_const * kLog2e;
    rows.delta[r] = head.row_delta[i];
    rows.dout[r] = head.dout + i * plan.dv_pad;
    const float lse2 = head.lse2[i];
    const bool empty = lse2 == kNegInf;  // fully masked in the forward: P = 0
    rows.m[r] = empty ? 0.0f : lse2;
    rows.score.key_limit[r] = empty ? 0 : int32_t(p.causal ? std::min<int64_t>(Nk, i + 1) : Nk);
    rows.score.bias[r] = nullptr;
    if (plan.bias_in_row_buffer) {
      float* dst = bias_buf + r * plan.nk_pad;
      const int64_t j1 = std::min(j_hi, Nk);
      if (p.rel_pos_table) {
        geo.expand_row(p.rel_pos_table + h * p.rel_pos_table_stride_h,
                       plan.rel_reversed.get() + h * geo.table_size, i, j_lo, j1, dst + j_lo);
      } else {
        std::memset(dst + j_lo, 0, size_t(std::max<int64_t>(0, j1 - j_lo)) * sizeof(float));
      }
      if (p.bias) {
        const int64_t off = b * p.bias_stride[0] + h * p.bias_stride[1] + i * p.bias_stride[2];
        for (int64_t j = j_lo; j < j1; ++j) dst[j] += load_as_float(p.bias, p.bias_dtype, off + j * p.bias_stride[3]);
      }
      rows.score.bias[r] = dst;
    } else if (p.bias) {
      rows.score.bias[r] = static_cast<const float*>(p.bias) + b * p.bias_stride[0] + h * p.bias_stride[1] + i * p.bias_stride[2];
    }
  }
}

// ------------------------------------------------------------------ pass B (query-major)
// Runs fn(std::integral_constant<int, n>) for n = 1..4: register blocks of n channel vectors
// whose accumulators stay in registers (a run-time count would put them on the stack).
template <class Fn>
inline void with_vec_count(int n, Fn&& fn) {
  switch (n) {
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    default: fn(std::integral_constant<int, 1>{}); break;
  }
}

struct PassBScratch {
  AlignedArray<float> sign_acc;  // [kTileRows][d_pad]
  AlignedArray<float> bias_buf;  // [kTileRows][nk_pad]
  TileGrads grads;
  GradRows rows;
  alignas(64) float u[kTileRows][kKeyBlock];  // dS b_j of one block (the sign gradient's weights)
};

// T of the tile rows x channels [c0, c0 + 16 kVecs) += u = dS b_j where k_j's bit is set.
template <int kVecs>
void pass_b_sign_block(PassBScratch& s, const BwdHead& head, int64_t j0, int keys, int c0, int d_pad) {
  __m512 acc[kTileRows][kVecs];
  for (int r = 0; r < kTileRows; ++r)
    for (int k = 0; k < kVecs; ++k) acc[r][k] = _mm512_load_ps(s.sign_acc.get() + r * d_pad + c0 + 16 * k);
  for (int t = 0; t < keys; ++t) {
    const uint16_t* bits16 = reinterpret_cast<const uint16_t*>(head.k_bits + (j0 + t) * head.k_row_stride) + c0 / 16;
    __mmask16 m[kVecs];
    for (int k = 0; k < kVecs; ++k) m[k] = __mmask16(bits16[k]);
    for (int r = 0; r < kTileRows; ++r) {
      const __m512 uu = _mm512_set1_ps(s.u[r][t]);
      for (int k = 0; k < kVecs; ++k) acc[r][k] = _mm512_mask_add_ps(acc[r][k], m[k], acc[r][k], uu);
    }
  }
  for (int r = 0; r < kTileRows; ++r)
    for (int k = 0; k < kVecs; ++k) _mm512_store_ps(s.sign_acc.get() + r * d_pad + c0 + 16 * k, acc[r][k]);
}

// Row sums of one row tile over its key blocks (pass B's state between blocks).
struct RowSums {
  __m512 scale_acc[kTileRows];  // sum_j dS b_j dot
  __m512 u_sum[kTileRows];      // sum_j dS b_j
};

void pass_b_begin_tile(const BwdPlan& plan, PassBScratch& s, RowSums& sums) {
  if (plan.p.dq_sign) std::memset(s.sign_acc.get(), 0, size_t(kTileRows) * plan.d_pad * sizeof(float));
  for (int r = 0; r < kTileRows; ++r) sums.scale_acc[r] = sums.u_sum[r] = _mm512_setzero_ps();
}

// The query-side sums of one tile (rows i0.., `rows`) x keys [j0, j0 + keys), from its P / dS `g`
// (left unchanged): dq_scale and dq_sign sums, dbias, the rel-pos partial table.
void pass_b_block(const BwdPlan& plan, const BwdHead& head, PassBScratch& s, RowSums& sums, const GradRows& rows,
                  const TileGrads& g, int64_t bh, int64_t i0, int64_t j0, int keys, float* rel_partial) {
  const AttentionBwdParams& p = plan.p;
  const int64_t Nk = p.Nk;
  for (int r = 0; r < kTileRows; ++r)
    for (int v = 0; v < kKeyVecs; ++v) {
      const int64_t j = j0 + 16 * v;
      const __m512 col = head.keys.factor ? _mm512_load_ps(head.keys.factor + j) : _mm512_set1_ps(head.k_factor_const);
      sums.scale_acc[r] = _mm512_fmadd_ps(_mm512_load_ps(&g.dsd[r][16 * v]), col, sums.scale_acc[r]);
      const __m512 ds = _mm512_load_ps(&g.ds[r][16 * v]);
      if (p.dbias && r < rows.real_rows)
        _mm512_mask_storeu_ps(p.dbias + (bh * p.Nq + i0 + r) * Nk + j, first_lanes16(Nk - j), ds);
      const __m512 u = _mm512_mul_ps(ds, col);
      sums.u_sum[r] = _mm512_add_ps(sums.u_sum[r], u);
      _mm512_store_ps(&s.u[r][16 * v], u);
    }
  if (rel_partial) {
    const RelPosGeometry geo(p.rel_pos_wh, p.rel_pos_ww, p.num_prefix_tokens);
    for (int r = 0; r < rows.real_rows; ++r) geo.accumulate_row(rel_partial, i0 + r, j0, j0 + keys, g.ds[r]);
  }
  if (p.dq_sign)  // T_i[c] += dS_ij b_j where bit c of k_j is 1: 4 rows x 64 channels per block.
    for (int c0 = 0; c0 < plan.d_pad; c0 += kChanChunk)
      with_vec_count(std::min(kChanChunk, plan.d_pad - c0) / 16, [&](auto vecs) {
        pass_b_sign_block<decltype(vecs)::value>(s, head, j0, keys, c0, plan.d_pad);
      });
}

// Rows of a finished tile: dq_scale, dq_sign; dbias is 0 past the keys the tile visited
// (key_end; the blocks below it were stored whole).
void pass_b_finish_tile(const BwdPlan& plan, PassBScratch& s, const RowSums& sums, const GradRows& rows, int64_t bh,
                        int64_t i0, int64_t key_end) {
  const AttentionBwdParams& p = plan.p;
  const int d = p.head_dim, d_pad = plan.d_pad;
  const int64_t Nk = p.Nk;
  for (int r = 0; r < rows.real_rows; ++r) {
    const int64_t i = i0 + r;
    if (p.dq_scale) p.dq_scale[bh * p.Nq + i] = p.scale * _mm512_reduce_add_ps(sums.scale_acc[r]);
    if (p.dbias && key_end < Nk) {
      const int64_t from = round_up(key_end, kKeyBlock) < Nk ? round_up(key_end, kKeyBlock) : Nk;
      std::memset(p.dbias + (bh * p.Nq + i) * Nk + from, 0, size_t(Nk - from) * sizeof(float));
    }
    if (p.dq_sign) {
      // dq_sign_ic = scale a_i sum_j dS b_j sign(k_jc) = scale a_i (2 T_ic - U_i).
      const __m512 f = _mm512_set1_ps(p.scale * rows.a[r]);
      const __m512 total = _mm512_set1_ps(_mm512_reduce_add_ps(sums.u_sum[r]));
      float* dst = p.dq_sign + (bh * p.Nq + i) * d;
      for (int c = 0; c < d; c += 16) {
        const __m512 tt = _mm512_load_ps(s.sign_acc.get() + r * d_pad + c);
        _mm512_mask_storeu_ps(dst + c, first_lanes16(d - c), _mm512_mul_ps(f, _mm512_sub_ps(_mm512_add_ps(tt, tt), total)));
      }
    }
  }
}

// Highest key of any row of a tile, plus one.
inline int64_t tile_key_end(const GradRows& rows) {
  int64_t key_end = 0;
  for (int r = 0; r < kTileRows; ++r) key_end = std::max<int64_t>(key_end, rows.score.key_limit[r]);
  return key_end;
}

template <bool kBias, bool kKeyFactor>
void pass_b_task(const BwdPlan& plan, PassBScratch& s, int64_t bh, int64_t i_begin, int64_t i_end, float* rel_partial) {
  const AttentionBwdParams& p = plan.p;
  const BwdHead& head = plan.heads[size_t(bh)];
  const int d = p.head_dim, dv = p.v_dim, words = plan.words;
  const int64_t Nk = p.Nk;
  const RelPosGeometry geo(p.rel_pos_wh, p.rel_pos_ww, p.num_prefix_tokens);
  if (rel_partial) std::memset(rel_partial, 0, size_t(geo.table_size) * sizeof(float));

  for (int64_t i0 = i_begin; i0 < i_end; i0 += kTileRows) {
    GradRows& rows = s.rows;
    setup_rows(plan, head, bh, i0, 0, Nk, s.bias_buf.get(), rows);
    rows.score.unmasked_end = 0;
    const int64_t key_end = tile_key_end(rows);
    RowSums sums;
    pass_b_begin_tile(plan, s, sums);
    for (int64_t j0 = 0; j0 < key_end; j0 += kKeyBlock) {
      const int keys = int(std::min<int64_t>(kKeyBlock, Nk - j0));
      tile_grads<kBias, kKeyFactor>(head, rows, words, d, dv, j0, std::min(key_end, j0 + kKeyBlock), s.grads);
      pass_b_block(plan, head, s, sums, rows, s.grads, bh, i0, j0, keys, rel_partial);
    }
    pass_b_finish_tile(plan, s, sums, rows, bh, i0, key_end);
  }
}

// ------------------------------------------------------------------ pass A (key-major)
struct PassAScratch {
  AlignedArray<float> dv_acc;    // [64][dv_pad]
  AlignedArray<float> sign_acc;  // [64][d_pad]: T_j[c] = sum over rows with bit c set of dS a
  AlignedArray<float> bias_buf;  // [kTileRows][nk_pad]
  TileGrads grads[kChunkTiles];
  GradRows rows[kChunkTiles];
};

// dV of keys [k0, k0 + 4) x channels [c0, c0 + 16 kVecs) += sum over the step's rows of P dO.
template <int kVecs>
void pass_a_dv_block(PassAScratch& s, int tiles, int k0, int c0, int dv_pad) {
  __m512 acc[4][kVecs];
  for (int kk = 0; kk < 4; ++kk)
    for (int k = 0; k < kVecs; ++k) acc[kk][k] = _mm512_load_ps(s.dv_acc.get() + (k0 + kk) * dv_pad + c0 + 16 * k);
  for (int t = 0; t < tiles; ++t)
    for (int r = 0; r < s.rows[t].real_rows; ++r) {
      const float* go = s.rows[t].dout[r] + c0;
      __m512 g[kVecs];
      for (int k = 0; k < kVecs; ++k) g[k] = _mm512_load_ps(go + 16 * k);
      for (int kk = 0; kk < 4; ++kk) {
        const __m512 pr = _mm512_set1_ps(s.grads[t].p[r][k0 + kk]);
        for (int k = 0; k < kVecs; ++k) acc[kk][k] = _mm512_fmadd_ps(pr, g[k], acc[kk][k]);
      }
    }
  for (int kk = 0; kk < 4; ++kk)
    for (int k = 0; k < kVecs; ++k) _mm512_store_ps(s.dv_acc.get() + (k0 + kk) * dv_pad + c0 + 16 * k, acc[kk][k]);
}

// T of keys [k0, k0 + 4) x channels [c0, c0 + 16 kVecs) += u = dS a_i where q_i's bit is set.
template <int kVecs>
void pass_a_sign_block(PassAScratch& s, int tiles, int k0, int c0, int d_pad) {
  __m512 acc[4][kVecs];
  for (int kk = 0; kk < 4; ++kk)
    for (int k = 0; k < kVecs; ++k) acc[kk][k] = _mm512_load_ps(s.sign_acc.get() + (k0 + kk) * d_pad + c0 + 16 * k);
  for (int t = 0; t < tiles; ++t)
    for (int r = 0; r < s.rows[t].real_rows; ++r) {
      const uint16_t* bits16 = reinterpret_cast<const uint16_t*>(s.rows[t].score.q[r]) + c0 / 16;
      __mmask16 m[kVecs];
      for (int k = 0; k < kVecs; ++k) m[k] = __mmask16(bits16[k]);
      for (int kk = 0; kk < 4; ++kk) {
        const __m512 uu = _mm512_set1_ps(s.grads[t].ds[r][k0 + kk]);
        for (int k = 0; k < kVecs; ++k) acc[kk][k] = _mm512_mask_add_ps(acc[kk][k], m[k], acc[kk][k], uu);
      }
    }
  for (int kk = 0; kk < 4; ++kk)
    for (int k = 0; k < kVecs; ++k) _mm512_store_ps(s.sign_acc.get() + (k0 + kk) * d_pad + c0 + 16 * k, acc[kk][k]);
}

// fused_b: the keys fit in one block (Nk <= kKeyBlock), so this task's tiles hold whole rows of
// dS, and it also produces pass B's outputs for them (dq_scale, dq_sign, dbias, rel-pos partial
// tables; the same operations in the same order as pass_b_task, so the same bits) instead of a
// second pass recomputing every tile. rel_partials: the [row block][T] tables of this head.
template <bool kBias, bool kKeyFactor>
void pass_a_task(const BwdPlan& plan, PassAScratch& s, int64_t bh, int64_t j0, PassBScratch* fused_b,
                 float* rel_partials) {
  const AttentionBwdParams& p = plan.p;
  const BwdHead& head = plan.heads[size_t(bh)];
  const int d = p.head_dim, dv = p.v_dim, dv_pad = plan.dv_pad, d_pad = plan.d_pad, words = plan.words;
  const int keys = int(std::min<int64_t>(kKeyBlock, p.Nk - j0));
  const bool want_dv = p.dv != nullptr, want_sign = p.dk_sign != nullptr, want_scale = p.dk_scale != nullptr;
  if (want_dv) std::memset(s.dv_acc.get(), 0, size_t(kKeyBlock) * dv_pad * sizeof(float));
  if (want_sign) std::memset(s.sign_acc.get(), 0, size_t(kKeyBlock) * d_pad * sizeof(float));
  __m512 scale_acc[kKeyVecs], u_sum[kKeyVecs];  // sum_i dS a_i dot, sum_i dS a_i
  for (int v = 0; v < kKeyVecs; ++v) scale_acc[v] = u_sum[v] = _mm512_setzero_ps();

  // Causal: rows i < j0 see none of these keys.
  const int64_t i_begin = p.causal ? std::min<int64_t>(j0, p.Nq) : 0;
  for (int64_t ic = i_begin; ic < p.Nq; ic += kTileRows * kChunkTiles) {
    int tiles = 0;
    for (int t = 0; t < kChunkTiles && ic + t * kTileRows < p.Nq; ++t, ++tiles) {
      GradRows& rows = s.rows[t];
      setup_rows(plan, head, bh, ic + t * kTileRows, j0, j0 + kKeyBlock, s.bias_buf.get(), rows);
      rows.score.unmasked_end = 0;
      tile_grads<kBias, kKeyFactor>(head, rows, words, d, dv, j0, j0 + keys, s.grads[t]);
      TileGrads& g = s.grads[t];
      if (fused_b) {
        const int64_t i0 = ic + t * kTileRows;
        float* rel_partial = nullptr;
        if (rel_partials) {
          const int64_t T = RelPosGeometry(p.rel_pos_wh, p.rel_pos_ww, p.num_prefix_tokens).table_size;
          rel_partial = rel_partials + (i0 / kTaskRowsB) * T;
          if (i0 % kTaskRowsB == 0) std::memset(rel_partial, 0, size_t(T) * sizeof(float));
        }
        RowSums sums;
        pass_b_begin_tile(plan, *fused_b, sums);
        pass_b_block(plan, head, *fused_b, sums, rows, g, bh, i0, j0, keys, rel_partial);
        pass_b_finish_tile(plan, *fused_b, sums, rows, bh, i0, tile_key_end(rows));
      }
      for (int r = 0; r < rows.real_rows; ++r) {
        const __m512 a = _mm512_set1_ps(rows.a[r]);
        for (int v = 0; v < kKeyVecs; ++v) {
          scale_acc[v] = _mm512_fmadd_ps(_mm512_load_ps(&g.dsd[r][16 * v]), a, scale_acc[v]);
          // u = dS a_i, kept in place of dS for the sign gradient below.
          const __m512 u = _mm512_mul_ps(_mm512_load_ps(&g.ds[r][16 * v]), a);
          _mm512_store_ps(&g.ds[r][16 * v], u);
          u_sum[v] = _mm512_add_ps(u_sum[v], u);
        }
      }
    }
    // dV_j += sum_i P_ij dO_i: 4 keys x 64 channels per register block.
    if (want_dv)
      for (int k0 = 0; k0 < keys; k0 += 4)
        for (int c0 = 0; c0 < dv_pad; c0 += kChanChunk)
          with_vec_count(std::min(kChanChunk, dv_pad - c0) / 16, [&](auto vecs) {
            pass_a_dv_block<decltype(vecs)::value>(s, tiles, k0, c0, dv_pad);
          });
    // T_j[c] += dS_ij a_i where bit c of q_i is 1.
    if (want_sign)
      for (int k0 = 0; k0 < keys; k0 += 4)
        for (int c0 = 0; c0 < d_pad; c0 += kChanChunk)
          with_vec_count(std::min(kChanChunk, d_pad - c0) / 16, [&](auto vecs) {
            pass_a_sign_block<decltype(vecs)::value>(s, tiles, k0, c0, d_pad);
          });
  }

  // Write the keys of this block.
  alignas(64) float dk_scale[kKeyBlock], u_total[kKeyBlock];
  for (int v = 0; v < kKeyVecs; ++v) {
    _mm512_store_ps(dk_scale + 16 * v, _mm512_mul_ps(scale_acc[v], _mm512_set1_ps(p.scale)));
    _mm512_store_ps(u_total + 16 * v, u_sum[v]);
  }
  for (int t = 0; t < keys; ++t) {
    const int64_t j = j0 + t;
    if (want_scale) p.dk_scale[bh * p.Nk + j] = dk_scale[t];
    if (want_dv) std::memcpy(p.dv + (bh * p.Nk + j) * dv, s.dv_acc.get() + t * dv_pad, size_t(dv) * sizeof(float));
    if (want_sign) {
      // dk_sign_jc = scale b_j sum_i dS a_i sign(q_ic) = scale b_j (2 T_jc - U_j).
      const float bj = head.keys.factor ? head.keys.factor[j] : head.k_factor_const;
      const __m512 f = _mm512_set1_ps(p.scale * bj), total = _mm512_set1_ps(u_total[t]);
      float* dst = p.dk_sign + (bh * p.Nk + j) * d;
      for (int c = 0; c < d; c += 16) {
        const __m512 tt = _mm512_load_ps(s.sign_acc.get() + t * d_pad + c);
        _mm512_mask_storeu_ps(dst + c, first_lanes16(d - c),
                              _mm512_mul_ps(f, _mm512_sub_ps(_mm512_add_ps(tt, tt), total)));
      }
    }
  }
}

template <bool kBias, bool kKeyFactor>
void run_passes(BwdPlan& plan) {
  const AttentionBwdParams& p = plan.p;
  const int64_t BH = p.B * p.H;
  const bool want_rel = p.drel_pos_table && p.rel_pos_table;
  const RelPosGeometry geo(p.rel_pos_wh, p.rel_pos_ww, p.num_prefix_tokens);
  const int64_t T = geo.table_size;
  const int64_t row_blocks = ceil_div(p.Nq, kTaskRowsB);
  AlignedArray<float> rel_partial;
  if (want_rel) rel_partial = make_aligned<float>(size_t(BH * row_blocks * T));
  const auto make_b_scratch = [&] {
    auto s = std::make_unique<PassBScratch>();
    s->sign_acc = make_aligned<float>(size_t(kTileRows) * plan.d_pad);
    s->bias_buf = make_aligned<float>(size_t(kTileRows) * plan.nk_pad);
    return s;
  };
  const bool want_a = p.dv || p.dk_scale || p.dk_sign;
  // Per score element a pass costs ~4x a forward score (dP and dV or the sign sums).
  const double bwd_work = 4.0 * double(BH) * double(p.Nq) * double(p.Nk);
  const bool want_b = p.dq_scale || p.dq_sign || p.dbias || want_rel;
  const bool fuse_b = want_a && want_b && p.Nk <= kKeyBlock;  // one key block: see pass_a_task
  if (want_a) {
    const int64_t key_blocks = ceil_div(p.Nk, kKeyBlock);
    parallel_for(BH * key_blocks, grain_for_work(BH * key_blocks, bwd_work), [&](int64_t begin, int64_t end) {
      auto s = std::make_unique<PassAScratch>();
      s->dv_acc = make_aligned<float>(size_t(kKeyBlock) * plan.dv_pad);
      s->sign_acc = make_aligned<float>(size_t(kKeyBlock) * plan.d_pad);
      s->bias_buf = make_aligned<float>(size_t(kTileRows) * plan.nk_pad);
      std::unique_ptr<PassBScratch> b_scratch = fuse_b ? make_b_scratch() : nullptr;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t bh = t / key_blocks;
        pass_a_task<kBias, kKeyFactor>(plan, *s, bh, balanced_block(t % key_blocks, key_blocks) * kKeyBlock,
                                       b_scratch.get(), want_rel ? rel_partial.get() + bh * row_blocks * T : nullptr);
      }
    });
  }
  if (want_b && !fuse_b) {
    parallel_for(BH * row_blocks, grain_for_work(BH * row_blocks, bwd_work), [&](int64_t begin, int64_t end) {
      auto s = make_b_scratch();
      for (int64_t t = begin; t < end; ++t) {
        const int64_t bh = t / row_blocks, blk = balanced_block(t % row_blocks, row_blocks);
        const int64_t i0 = blk * kTaskRowsB;
        // Partial rel-pos tables are indexed by block (not by task position): fixed sum order.
        pass_b_task<kBias, kKeyFactor>(plan, *s, bh, i0, std::min(p.Nq, i0 + kTaskRowsB),
                                       want_rel ? rel_partial.get() + (bh * row_blocks + blk) * T : nullptr);
      }
    });
  }
  if (p.drel_pos_table) {
    // Per head, in the forward layout: sum of the partial tables over b and row blocks in
    // ascending order (reversed position T - 1 - idx holds entry idx).
    for (int64_t h = 0; h < p.H; ++h) {
      float* dst = p.drel_pos_table + h * T;
      std::memset(dst, 0, size_t(T) * sizeof(float));
      if (!want_rel) continue;
      for (int64_t b = 0; b < p.B; ++b)
        for (int64_t blk = 0; blk < row_blocks; ++blk) {
          const float* src = rel_partial.get() + ((b * p.H + h) * row_blocks + blk) * T;
          for (int64_t idx = 0; idx < T; ++idx) dst[idx] += src[T - 1 - idx];
        }
    }
  }
}

}  // namespace

void attention_bwd_avx512(const AttentionBwdParams& p) {
  if (p.B <= 0 || p.H <= 0 || p.Nq <= 0 || p.Nk <= 0) return attention_bwd_scalar(p);  // zero-fills
  BwdPlan plan(p);
  build_plan(plan);
  if (plan.has_bias) {
    plan.k_factor_per_key ? run_passes<true, true>(plan) : run_passes<true, false>(plan);
  } else {
    plan.k_factor_per_key ? run_passes<false, true>(plan) : run_passes<false, false>(plan);
  }
}

}  // namespace binformer::cpu::detail
