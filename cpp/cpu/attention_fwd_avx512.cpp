// AVX-512 attention forward: S = scale a_i b_j <sign q_i, sign k_j> + bias, online softmax, P.V.
//
// Work split: one parallel task = kTaskRows query rows of one (b, h). Inside a task, query rows
// are processed kTileRows at a time (the register block of P.V) against blocks of kKeyBlock
// keys, with the online softmax kept in the log2 domain (log2(e) is folded into the row
// coefficient and the bias, so the exponential is a bare 2^x).
//
// Per key block and row tile:
//   1. scores: XOR + VPOPCNTD over the packed words of 16 keys at a time (k bits transposed so
//      that one load gives one word of 16 keys), dot = d - 2 popcount, times the row/column
//      factors, plus bias; keys past Nk or above the causal diagonal become -inf;
//   2. softmax: new row maximum, p = 2^(s - m) with a polynomial exp2, running sums;
//   3. P.V into fp32 accumulators held in a small L1-resident buffer (rescaled by
//      2^(m_old - m_new) when a block raises the maximum), 4 rows x 64 channels per register
//      block. The multiply-add unit is the bottleneck (at Dv = 64 one score costs 4 zmm FMAs
//      against about 0.7 for steps 1-2), so P.V uses the narrowest product the data allows:
//        fp32 / fp16 V:  fp32 FMA (fp16 V is widened once per head),
//        bf16 V:         VDPBF16PS with P rounded to bf16 (2 keys per instruction; the same
//                        rounding of P that FlashAttention applies on GPUs),
//        pv_int8:        VPDPBUSD u8 P x s8 V (4 keys per instruction), int32 per key block,
//                        or VPMADDWD on CPUs without AVX512_VNNI.
#include <vector>

#include "avx512_common.h"

namespace binformer::cpu::detail {
namespace {

constexpr int kTileRows = 4;     // query rows per register block
constexpr int kKeyBlock = 128;   // keys per online-softmax step (8 vectors of 16)
constexpr int kTaskRows = 64;    // query rows per parallel task
constexpr int kDvChunk = 64;     // output channels per register block (4 zmm)

enum class PvMode { kF32, kBf16, kInt8Vnni, kInt8Madd };

// Keys are grouped per P.V instruction: 1 (fp32 FMA), 2 (bf16 pairs, int16 pairs), 4 (u8 quads).
constexpr int keys_per_group(PvMode mode) {
  return mode == PvMode::kF32 ? 1 : mode == PvMode::kInt8Vnni ? 4 : 2;
}

// Per (b, h) data shared by every task of that head, built once before the main loop.
struct HeadInputs {
  const uint32_t* k_bits_t;  // [Nk_pad / 16][words][16]: word w of 16 consecutive keys
  const float* k_factor;     // [Nk_pad] b_j, or nullptr when b is constant over j
  float k_factor_const;      // b when constant over j (1 without k_scale)
  const void* v;             // V in the layout of the P.V mode (see prepare_v)
  int64_t v_group_pitch;     // elements of v between consecutive key groups
};

struct ForwardPlan {
  const AttentionFwdParams& p;
  int words;
  int64_t nk_pad;   // Nk rounded up to kKeyBlock
  int dv_pad;       // Dv rounded up to 16
  PvMode mode;
  bool k_factor_per_key;
  bool bias_in_row_buffer;  // bias/rel-pos expanded per row into fp32 (else: direct fp32 rows)
  AlignedArray<uint32_t> k_bits_t;
  AlignedArray<float> k_factor;
  AlignedArray<char> v_packed;
  AlignedArray<float> rel_table_reversed;  // [H][T]
  std::vector<HeadInputs> heads;

  explicit ForwardPlan(const AttentionFwdParams& params) : p(params) {}
};

PvMode choose_mode(const AttentionFwdParams& p) {
  if (p.pv_int8) return cpu_has_vnni() ? PvMode::kInt8Vnni : PvMode::kInt8Madd;
  if (p.v_dtype == DType::kBFloat16 && cpu_has_avx512_bf16()) return PvMode::kBf16;
  return PvMode::kF32;
}

// Element size of the packed V of each mode.
size_t v_elem_size(PvMode mode) {
  switch (mode) {
    case PvMode::kF32: return 4;
    case PvMode::kBf16: return 2;
    case PvMode::kInt8Vnni: return 1;
    case PvMode::kInt8Madd: return 2;
  }
  return 4;
}

// Packs one head's V rows [Nk, Dv] into the P.V layout: groups of g keys, inside a group
// channel-major with the g keys of a channel adjacent ([Nk_pad / g][Dv_pad][g]); padded keys
// and channels are zero (their P is 0, and 0 * garbage could be NaN).
void prepare_v(const ForwardPlan& plan, int64_t b, int64_t h, void* dst) {
  const AttentionFwdParams& p = plan.p;
  const int g = keys_per_group(plan.mode), dv = p.v_dim, dv_pad = plan.dv_pad;
  const int64_t groups = plan.nk_pad / g;
  const int64_t head_off = b * p.v_stride[0] + h * p.v_stride[1];
  for (int64_t grp = 0; grp < groups; ++grp) {
    for (int lane = 0; lane < g; ++lane) {
      const int64_t j = grp * g + lane;
      for (int c = 0; c < dv_pad; ++c) {
        const bool real = j < p.Nk && c < dv;
        const int64_t src = head_off + j * p.v_stride[2] + c;
        const int64_t at = (grp * dv_pad + c) * g + lane;
        switch (plan.mode) {
          case PvMode::kF32:
            static_cast<float*>(dst)[at] = real ? load_as_float(p.v, p.v_dtype, src) : 0.0f;
            break;
          case PvMode::kBf16:
            static_cast<uint16_t*>(dst)[at] = real ? static_cast<const uint16_t*>(p.v)[src] : uint16_t(0);
            break;
          case PvMode::kInt8Vnni:
            static_cast<int8_t*>(dst)[at] = real ? static_cast<const int8_t*>(p.v)[src] : int8_t(0);
            break;
          case PvMode::kInt8Madd:
            static_cast<int16_t*>(dst)[at] = real ? static_cast<const int8_t*>(p.v)[src] : int16_t(0);
            break;
        }
      }
    }
  }
}

void build_plan(ForwardPlan& plan) {
  const AttentionFwdParams& p = plan.p;
  const int64_t BH = p.B * p.H;
  plan.words = words_for(p.head_dim);
  plan.nk_pad = round_up(std::max<int64_t>(p.Nk, 1), kKeyBlock);
  plan.dv_pad = int(round_up(p.v_dim, 16));
  plan.mode = choose_mode(p);
  plan.k_factor_per_key = p.k_scale && p.k_scale_stride[2] != 0;
  plan.bias_in_row_buffer =
      p.rel_pos_table || (p.bias && (p.bias_dtype != DType::kFloat32 || p.bias_stride[3] != 1));

  const int words = plan.words;
  const int64_t nk_pad = plan.nk_pad;
  plan.k_bits_t = make_aligned<uint32_t>(size_t(BH * nk_pad * words));
  if (plan.k_factor_per_key) plan.k_factor = make_aligned<float>(size_t(BH * nk_pad));
  const bool v_direct = plan.mode == PvMode::kF32 && p.v_dtype == DType::kFloat32 && p.v_dim % 16 == 0;
  const size_t v_head_bytes = size_t(nk_pad) * plan.dv_pad * v_elem_size(plan.mode);
  if (!v_direct) plan.v_packed = make_aligned<char>(size_t(BH) * v_head_bytes);
  if (p.rel_pos_table) {
    const RelPosGeometry geo(p.rel_pos_wh, p.rel_pos_ww, p.num_prefix_tokens);
    const int64_t T = geo.table_size;
    plan.rel_table_reversed = make_aligned<float>(size_t(p.H * T));
    for (int64_t h = 0; h < p.H; ++h)
      for (int64_t t = 0; t < T; ++t)
        plan.rel_table_reversed[h * T + t] = p.rel_pos_table[h * p.rel_pos_table_stride_h + T - 1 - t];
  }
  plan.heads.resize(size_t(BH));

  parallel_for(BH, 1, [&](int64_t bh_begin, int64_t bh_end) {
    uint32_t packed_row[kMaxHeadDim / 32];
    for (int64_t bh = bh_begin; bh < bh_end; ++bh) {
      const int64_t b = bh / p.H, h = bh % p.H;
      HeadInputs& head = plan.heads[size_t(bh)];
      // k bits, transposed per group of 16 keys; padded keys are 0 (masked later).
      uint32_t* kt = plan.k_bits_t.get() + bh * nk_pad * words;
      const int64_t k_head = b * p.k_stride[0] + h * p.k_stride[1];
      for (int64_t j = 0; j < nk_pad; ++j) {
        const uint32_t* row = nullptr;
        if (j < p.Nk) {
          if (p.k_dtype == DType::kBits) {
            row = static_cast<const uint32_t*>(p.k) + k_head + j * p.k_stride[2];
          } else {
            const size_t es = dtype_size(p.k_dtype);
            const char* src = static_cast<const char*>(p.k) + (k_head + j * p.k_stride[2]) * es;
            for (int w = 0; w < words; ++w) {
              const int c0 = 32 * w;
              const __m512 lo = load16_as_float(src + c0 * es, p.k_dtype, first_lanes16(p.head_dim - c0));
              const __m512 hi = load16_as_float(src + (c0 + 16) * es, p.k_dtype, first_lanes16(p.head_dim - c0 - 16));
              const uint32_t lo_bits = _mm512_mask_cmp_ps_mask(first_lanes16(p.head_dim - c0), lo, _mm512_setzero_ps(), _CMP_NLT_UQ);
              const uint32_t hi_bits = _mm512_mask_cmp_ps_mask(first_lanes16(p.head_dim - c0 - 16), hi, _mm512_setzero_ps(), _CMP_NLT_UQ);
              packed_row[w] = lo_bits | (hi_bits << 16);
            }
            row = packed_row;
          }
        }
        for (int w = 0; w < words; ++w) kt[(j / 16) * words * 16 + w * 16 + (j % 16)] = row ? row[w] : 0u;
      }
      head.k_bits_t = kt;
      // Column factor b_j.
      const int64_t ks_head = p.k_scale ? b * p.k_scale_stride[0] + h * p.k_scale_stride[1] : 0;
      head.k_factor_const = p.k_scale && !plan.k_factor_per_key ? p.k_scale[ks_head] : 1.0f;
      head.k_factor = nullptr;
      if (plan.k_factor_per_key) {
        float* kf = plan.k_factor.get() + bh * nk_pad;
        for (int64_t j = 0; j < nk_pad; ++j) kf[j] = j < p.Nk ? p.k_scale[ks_head + j * p.k_scale_stride[2]] : 0.0f;
        head.k_factor = kf;
      }
      // V.
      if (v_direct) {
        head.v = static_cast<const float*>(p.v) + b * p.v_stride[0] + h * p.v_stride[1];
        head.v_group_pitch = p.v_stride[2];
      } else {
        void* dst = plan.v_packed.get() + size_t(bh) * v_head_bytes;
        prepare_v(plan, b, h, dst);
        head.v = dst;
        head.v_group_pitch = int64_t(plan.dv_pad) * keys_per_group(plan.mode);
      }
    }
  });
}

// ------------------------------------------------------------------ P.V register blocks
// acc[r][0 .. 16 * kVecs) += sum over the key groups of the block of P[r][group] * V[group][..]
// for channels [c0, c0 + 16 kVecs); accumulators are first multiplied by alpha[r].

template <int kVecs>
inline void pv_f32(float* const* acc, const float (*prob)[kKeyBlock], const float* v, int64_t pitch,
                   int c0, int keys, const float* alpha) {
  __m512 a[kTileRows][kVecs];
  for (int r = 0; r < kTileRows; ++r) {
    const __m512 scale = _mm512_set1_ps(alpha[r]);
    for (int k = 0; k < kVecs; ++k) a[r][k] = _mm512_mul_ps(_mm512_load_ps(acc[r] + c0 + 16 * k), scale);
  }
  const float* vrow = v + c0;
  for (int t = 0; t < keys; ++t, vrow += pitch) {
    __m512 vv[kVecs];
    for (int k = 0; k < kVecs; ++k) vv[k] = _mm512_loadu_ps(vrow + 16 * k);
    for (int r = 0; r < kTileRows; ++r) {
      const __m512 pr = _mm512_set1_ps(prob[r][t]);
      for (int k = 0; k < kVecs; ++k) a[r][k] = _mm512_fmadd_ps(pr, vv[k], a[r][k]);
    }
  }
  for (int r = 0; r < kTileRows; ++r)
    for (int k = 0; k < kVecs; ++k) _mm512_store_ps(acc[r] + c0 + 16 * k, a[r][k]);
}

template <int kVecs>
inline void pv_bf16(float* const* acc, const uint16_t (*prob)[kKeyBlock], const uint16_t* v, int64_t pitch,
                    int c0, int keys, const float* alpha) {
  __m512 a[kTileRows][kVecs];
  for (int r = 0; r < kTileRows; ++r) {
    const __m512 scale = _mm512_set1_ps(alpha[r]);
    for (int k = 0; k < kVecs; ++k) a[r][k] = _mm512_mul_ps(_mm512_load_ps(acc[r] + c0 + 16 * k), scale);
  }
  const uint16_t* vpair = v + 2 * c0;
  for (int t = 0; t < keys; t += 2, vpair += pitch) {
    __m512bh vv[kVecs];
    for (int k = 0; k < kVecs; ++k) vv[k] = (__m512bh)_mm512_loadu_si512(vpair + 32 * k);
    for (int r = 0; r < kTileRows; ++r) {
      uint32_t pair;
      std::memcpy(&pair, &prob[r][t], 4);
      const __m512bh pr = (__m512bh)_mm512_set1_epi32(int(pair));
      for (int k = 0; k < kVecs; ++k) a[r][k] = _mm512_dpbf16_ps(a[r][k], pr, vv[k]);
    }
  }
  for (int r = 0; r < kTileRows; ++r)
    for (int k = 0; k < kVecs; ++k) _mm512_store_ps(acc[r] + c0 + 16 * k, a[r][k]);
}

// pv_int8: integer sums of one key block (exact), then acc = acc * alpha + float(sum).
template <int kVecs, bool kVnni>
inline void pv_int8(float* const* acc, const uint8_t (*prob_u8)[kKeyBlock], const uint16_t (*prob_u16)[kKeyBlock],
                    const void* v, int64_t pitch, int c0, int keys, const float* alpha) {
  __m512i sum[kTileRows][kVecs];
  for (int r = 0; r < kTileRows; ++r)
    for (int k = 0; k < kVecs; ++k) sum[r][k] = _mm512_setzero_si512();
  if constexpr (kVnni) {
    const int8_t* vquad = static_cast<const int8_t*>(v) + 4 * c0;
    for (int t = 0; t < keys; t += 4, vquad += pitch) {
      __m512i vv[kVecs];
      for (int k = 0; k < kVecs; ++k) vv[k] = _mm512_loadu_si512(vquad + 64 * k);
      for (int r = 0; r < kTileRows; ++r) {
        uint32_t quad;
        std::memcpy(&quad, &prob_u8[r][t], 4);
        const __m512i pr = _mm512_set1_epi32(int(quad));
        for (int k = 0; k < kVecs; ++k) sum[r][k] = _mm512_dpbusd_epi32(sum[r][k], pr, vv[k]);
      }
    }
  } else {
    const int16_t* vpair = static_cast<const int16_t*>(v) + 2 * c0;
    for (int t = 0; t < keys; t += 2, vpair += pitch) {
      __m512i vv[kVecs];
      for (int k = 0; k < kVecs; ++k) vv[k] = _mm512_loadu_si512(vpair + 32 * k);
      for (int r = 0; r < kTileRows; ++r) {
        uint32_t pair;
        std::memcpy(&pair, &prob_u16[r][t], 4);
        const __m512i pr = _mm512_set1_epi32(int(pair));
        for (int k = 0; k < kVecs; ++k) sum[r][k] = _mm512_add_epi32(sum[r][k], _mm512_madd_epi16(pr, vv[k]));
      }
    }
  }
  for (int r = 0; r < kTileRows; ++r) {
    const __m512 scale = _mm512_set1_ps(alpha[r]);
    for (int k = 0; k < kVecs; ++k) {
      float* at = acc[r] + c0 + 16 * k;
      _mm512_store_ps(at, _mm512_fmadd_ps(_mm512_load_ps(at), scale, _mm512_cvtepi32_ps(sum[r][k])));
    }
  }
}

// ------------------------------------------------------------------ one task
struct TaskScratch {
  AlignedArray<float> acc;       // [kTileRows][dv_pad]
  AlignedArray<float> row_bias;  // [kTileRows][nk_pad] when the bias is expanded per row
  AlignedArray<uint32_t> q_bits; // [kTaskRows][words]
  alignas(64) float scores[kTileRows][kKeyBlock];
  alignas(64) float prob_f32[kTileRows][kKeyBlock];
  alignas(64) uint16_t prob_u16[kTileRows][kKeyBlock];
  alignas(64) uint8_t prob_u8[kTileRows][kKeyBlock];
};

template <PvMode kMode>
void pv_block(const ForwardPlan& plan, const HeadInputs& head, TaskScratch& s, int64_t j0, int keys,
              const float* alpha) {
  float* acc[kTileRows];
  for (int r = 0; r < kTileRows; ++r) acc[r] = s.acc.get() + r * plan.dv_pad;
  constexpr int g = keys_per_group(kMode);
  const int64_t pitch = head.v_group_pitch;
  // First key group of the block, in elements of the packed V.
  const int64_t start = (j0 / g) * pitch;
  for (int c0 = 0; c0 < plan.dv_pad; c0 += kDvChunk) {
    const int vecs = std::min(kDvChunk, plan.dv_pad - c0) / 16;
    auto run = [&](auto vec_count) {
      constexpr int kVecs = decltype(vec_count)::value;
      if constexpr (kMode == PvMode::kF32) {
        pv_f32<kVecs>(acc, s.prob_f32, static_cast<const float*>(head.v) + start, pitch, c0, keys, alpha);
      } else if constexpr (kMode == PvMode::kBf16) {
        pv_bf16<kVecs>(acc, s.prob_u16, static_cast<const uint16_t*>(head.v) + start, pitch, c0, keys, alpha);
      } else if constexpr (kMode == PvMode::kInt8Vnni) {
        pv_int8<kVecs, true>(acc, s.prob_u8, s.prob_u16, static_cast<const int8_t*>(head.v) + start, pitch, c0, keys, alpha);
      } else {
        pv_int8<kVecs, false>(acc, s.prob_u8, s.prob_u16, static_cast<const int16_t*>(head.v) + start, pitch, c0, keys, alpha);
      }
    };
    switch (vecs) {
      case 4: run(std::integral_constant<int, 4>{}); break;
      case 3: run(std::integral_constant<int, 3>{}); break;
      case 2: run(std::integral_constant<int, 2>{}); break;
      default: run(std::integral_constant<int, 1>{}); break;
    }
  }
}

// Scores of kTileRows rows x 16 keys from the packed words, as integer dot products.
template <int kWords>
inline void tile_dots(const uint32_t* const* q_rows, const uint32_t* k_group, int words, int d, __m512i* dots) {
  __m512i count[kTileRows];
  for (int r = 0; r < kTileRows; ++r) count[r] = _mm512_setzero_si512();
  const int n_words = kWords > 0 ? kWords : words;
  for (int w = 0; w < n_words; ++w) {
    const __m512i kw = _mm512_load_si512(k_group + 16 * w);
    for (int r = 0; r < kTileRows; ++r)
      count[r] = _mm512_add_epi32(count[r], _mm512_popcnt_epi32(_mm512_xor_si512(kw, _mm512_set1_epi32(int(q_rows[r][w])))));
  }
  const __m512i dvec = _mm512_set1_epi32(d);
  for (int r = 0; r < kTileRows; ++r) dots[r] = _mm512_sub_epi32(dvec, _mm512_slli_epi32(count[r], 1));
}

template <PvMode kMode, int kWords>
void run_task(const ForwardPlan& plan, TaskScratch& s, int64_t bh, int64_t i_begin, int64_t i_end) {
  const AttentionFwdParams& p = plan.p;
  const HeadInputs& head = plan.heads[size_t(bh)];
  const int64_t b = bh / p.H, h = bh % p.H;
  const int words = plan.words, d = p.head_dim, dv = p.v_dim, dv_pad = plan.dv_pad;
  const int64_t Nk = p.Nk, nk_pad = plan.nk_pad;

  // Pack (or point at) the sign bits of this task's query rows.
  const uint32_t* q_rows_all[kTaskRows];
  const int64_t q_head = b * p.q_stride[0] + h * p.q_stride[1];
  for (int64_t i = i_begin; i < i_end; ++i) {
    if (p.q_dtype == DType::kBits) {
      q_rows_all[i - i_begin] = static_cast<const uint32_t*>(p.q) + q_head + i * p.q_stride[2];
      continue;
    }
    const size_t es = dtype_size(p.q_dtype);
    const char* src = static_cast<const char*>(p.q) + (q_head + i * p.q_stride[2]) * es;
    uint32_t* dst = s.q_bits.get() + (i - i_begin) * words;
    for (int w = 0; w < words; ++w) {
      const int c0 = 32 * w;
      const __mmask16 lo_lanes = first_lanes16(d - c0), hi_lanes = first_lanes16(d - c0 - 16);
      const uint32_t lo = _mm512_mask_cmp_ps_mask(lo_lanes, load16_as_float(src + c0 * es, p.q_dtype, lo_lanes), _mm512_setzero_ps(), _CMP_NLT_UQ);
      const uint32_t hi = _mm512_mask_cmp_ps_mask(hi_lanes, load16_as_float(src + (c0 + 16) * es, p.q_dtype, hi_lanes), _mm512_setzero_ps(), _CMP_NLT_UQ);
      dst[w] = lo | (hi << 16);
    }
    q_rows_all[i - i_begin] = dst;
  }

  const RelPosGeometry geo(p.rel_pos_wh, p.rel_pos_ww, p.num_prefix_tokens);
  const float* rel_table = p.rel_pos_table ? p.rel_pos_table + h * p.rel_pos_table_stride_h : nullptr;
  const float* rel_reversed = p.rel_pos_table ? plan.rel_table_reversed.get() + h * geo.table_size : nullptr;
  const __m512 log2e = _mm512_set1_ps(kLog2e);
  const __m512 neg_inf = _mm512_set1_ps(kNegInf);
  const __m512i lane_index = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);

  for (int64_t t0 = i_begin; t0 < i_end; t0 += kTileRows) {
    const int rows = int(std::min<int64_t>(kTileRows, i_end - t0));
    int64_t row_index[kTileRows];
    const uint32_t* q_rows[kTileRows];
    float row_coef[kTileRows];   // scale * a_i * (constant b) * log2(e)
    const float* bias_rows[kTileRows];
    for (int r = 0; r < kTileRows; ++r) {
      const int64_t i = t0 + std::min(r, rows - 1);  // surplus rows repeat the last real row
      row_index[r] = i;
      q_rows[r] = q_rows_all[i - i_begin];
      const float a = p.q_scale ? p.q_scale[b * p.q_scale_stride[0] + h * p.q_scale_stride[1] + i * p.q_scale_stride[2]] : 1.0f;
      row_coef[r] = p.scale * a * head.k_factor_const * kLog2e;
      bias_rows[r] = nullptr;
      if (plan.bias_in_row_buffer) {
        float* dst = s.row_bias.get() + r * nk_pad;
        if (rel_table) {
          geo.expand_row(rel_table, rel_reversed, i, 0, Nk, dst);
        } else {
          std::memset(dst, 0, size_t(Nk) * sizeof(float));
        }
        if (p.bias) {
          const int64_t off = b * p.bias_stride[0] + h * p.bias_stride[1] + i * p.bias_stride[2];
          if (p.bias_stride[3] == 1) {
            const size_t es = dtype_size(p.bias_dtype);
            const char* src = static_cast<const char*>(p.bias) + off * es;
            for (int64_t j = 0; j < Nk; j += 16) {
              const __mmask16 lanes = first_lanes16(Nk - j);
              _mm512_mask_storeu_ps(dst + j, lanes, _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, dst + j),
                                                                  load16_as_float(src + j * es, p.bias_dtype, lanes)));
            }
          } else {
            for (int64_t j = 0; j < Nk; ++j) dst[j] += load_as_float(p.bias, p.bias_dtype, off + j * p.bias_stride[3]);
          }
        }
        // Keys in the padding of the last block read zeros (they are masked anyway).
        std::memset(dst + Nk, 0, size_t(nk_pad - Nk) * sizeof(float));
        bias_rows[r] = dst;
      } else if (p.bias) {
        bias_rows[r] = static_cast<const float*>(p.bias) + b * p.bias_stride[0] + h * p.bias_stride[1] + i * p.bias_stride[2];
      }
    }

    float row_max[kTileRows];
    __m512 row_sum[kTileRows];
    for (int r = 0; r < kTileRows; ++r) {
      row_max[r] = kNegInf;
      row_sum[r] = _mm512_setzero_ps();
      std::memset(s.acc.get() + r * dv_pad, 0, size_t(dv_pad) * sizeof(float));
    }

    const int64_t key_end = p.causal ? std::min<int64_t>(Nk, row_index[kTileRows - 1] + 1) : Nk;
    for (int64_t j0 = 0; j0 < key_end; j0 += kKeyBlock) {
      const int keys = int(std::min<int64_t>(kKeyBlock, key_end - j0));
      // 1. scores (log2 domain) and the block maximum per row.
      __m512 block_max[kTileRows];
      for (int r = 0; r < kTileRows; ++r) block_max[r] = neg_inf;
      for (int v = 0; v < keys; v += 16) {
        const int64_t j = j0 + v;
        __m512i dots[kTileRows];
        tile_dots<kWords>(q_rows, head.k_bits_t + (j / 16) * words * 16, words, d, dots);
        const __m512 col = head.k_factor ? _mm512_load_ps(head.k_factor + j) : _mm512_set1_ps(1.0f);
        const __m512i key_index = _mm512_add_epi32(lane_index, _mm512_set1_epi32(int(j)));
        const __mmask16 in_range = first_lanes16(key_end - j);
        for (int r = 0; r < kTileRows; ++r) {
          __m512 sc = _mm512_mul_ps(_mm512_cvtepi32_ps(dots[r]), _mm512_mul_ps(col, _mm512_set1_ps(row_coef[r])));
          // Masked load: a caller's bias row ends at Nk, not at the padded block end.
          if (bias_rows[r]) sc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(in_range, bias_rows[r] + j), log2e, sc);
          __mmask16 valid = in_range;
          if (p.causal) valid &= _mm512_cmple_epi32_mask(key_index, _mm512_set1_epi32(int(row_index[r])));
          sc = _mm512_mask_mov_ps(neg_inf, valid, sc);
          _mm512_store_ps(&s.scores[r][v], sc);
          block_max[r] = _mm512_max_ps(block_max[r], sc);  // a NaN score poisons m, p and l: out NaN
        }
      }
      // 2. online softmax.
      float alpha[kTileRows];
      __m512 m_use[kTileRows];
      for (int r = 0; r < kTileRows; ++r) {
        const float m_new = std::max(row_max[r], _mm512_reduce_max_ps(block_max[r]));
        const float m_safe = m_new == kNegInf ? 0.0f : m_new;  // all masked so far: p = 2^-inf = 0
        alpha[r] = std::exp2(row_max[r] - m_safe);
        row_max[r] = m_new;
        m_use[r] = _mm512_set1_ps(m_safe);
      }
      for (int r = 0; r < kTileRows; ++r) {
        __m512 sum = _mm512_setzero_ps();
        for (int v = 0; v < keys; v += 16) {
          const __m512 prob = exp2_ps(_mm512_sub_ps(_mm512_load_ps(&s.scores[r][v]), m_use[r]));
          sum = _mm512_add_ps(sum, prob);
          if constexpr (kMode == PvMode::kF32) {
            _mm512_store_ps(&s.prob_f32[r][v], prob);
          } else if constexpr (kMode == PvMode::kBf16) {
            _mm256_store_si256(reinterpret_cast<__m256i*>(&s.prob_u16[r][v]), (__m256i)_mm512_cvtneps_pbh(prob));
          } else {
            // round(p * 255) with p in [0, 1]: vcvtps2dq rounds to nearest even.
            const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(prob, _mm512_set1_ps(255.0f)));
            if constexpr (kMode == PvMode::kInt8Vnni) {
              _mm_store_si128(reinterpret_cast<__m128i*>(&s.prob_u8[r][v]), _mm512_cvtusepi32_epi8(q));
            } else {
              _mm256_store_si256(reinterpret_cast<__m256i*>(&s.prob_u16[r][v]), _mm512_cvtusepi32_epi16(q));
            }
          }
        }
        row_sum[r] = _mm512_fmadd_ps(row_sum[r], _mm512_set1_ps(alpha[r]), sum);
      }
      // Key groups (pairs, quads) that straddle `keys` read P of keys in [keys, keys rounded
      // up to 16): those were stored above as 2^-inf = 0.
      // 3. P.V.
      pv_block<kMode>(plan, head, s, j0, keys, alpha);
    }

    // Epilogue: out = acc / l (pv_int8: times v_dequant / 255), lse = (m + log2 l) ln 2.
    for (int r = 0; r < rows; ++r) {
      const int64_t i = row_index[r];
      const float l = _mm512_reduce_add_ps(row_sum[r]);
      const bool empty = (l == 0.0f);  // fully masked row
      const __m512 inv_l = _mm512_set1_ps(empty ? 0.0f : 1.0f / l);
      char* out = static_cast<char*>(p.out) +
                  (b * p.out_stride[0] + h * p.out_stride[1] + i * p.out_stride[2]) * dtype_size(p.out_dtype);
      const float* acc = s.acc.get() + r * dv_pad;
      for (int c = 0; c < dv; c += 16) {
        const __mmask16 lanes = first_lanes16(dv - c);
        __m512 o = _mm512_mul_ps(_mm512_load_ps(acc + c), inv_l);
        if (kMode == PvMode::kInt8Vnni || kMode == PvMode::kInt8Madd)
          o = _mm512_mul_ps(o, _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, p.v_dequant + bh * dv + c),
                                             _mm512_set1_ps(1.0f / 255.0f)));
        if (empty) o = _mm512_setzero_ps();
        store16_from_float(out + c * dtype_size(p.out_dtype), p.out_dtype, o, lanes);
      }
      if (p.lse) p.lse[bh * p.Nq + i] = empty ? kNegInf : (row_max[r] + std::log2(l)) * kLn2;
    }
  }
}

template <PvMode kMode>
void run_all(ForwardPlan& plan) {
  const AttentionFwdParams& p = plan.p;
  const int64_t row_blocks = ceil_div(p.Nq, kTaskRows);
  using TaskFn = void (*)(const ForwardPlan&, TaskScratch&, int64_t, int64_t, int64_t);
  TaskFn task_fn;
  switch (plan.words) {  // the common head dims get a fully unrolled word loop
    case 1: task_fn = run_task<kMode, 1>; break;
    case 2: task_fn = run_task<kMode, 2>; break;
    case 4: task_fn = run_task<kMode, 4>; break;
    default: task_fn = run_task<kMode, 0>; break;
  }
  parallel_for(p.B * p.H * row_blocks, 1, [&](int64_t begin, int64_t end) {
    auto scratch = std::make_unique<TaskScratch>();
    scratch->acc = make_aligned<float>(size_t(kTileRows) * plan.dv_pad);
    if (plan.bias_in_row_buffer) scratch->row_bias = make_aligned<float>(size_t(kTileRows) * plan.nk_pad);
    scratch->q_bits = make_aligned<uint32_t>(size_t(kTaskRows) * plan.words);
    std::memset(scratch->prob_u16, 0, sizeof(scratch->prob_u16));
    std::memset(scratch->prob_u8, 0, sizeof(scratch->prob_u8));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / row_blocks, blk = task % row_blocks;
      const int64_t i_begin = blk * kTaskRows, i_end = std::min(p.Nq, i_begin + kTaskRows);
      task_fn(plan, *scratch, bh, i_begin, i_end);
    }
  });
}

}  // namespace

void attention_fwd_avx512(const AttentionFwdParams& p) {
  if (p.B <= 0 || p.H <= 0 || p.Nq <= 0) return;
  ForwardPlan plan(p);
  build_plan(plan);
  switch (plan.mode) {
    case PvMode::kF32: run_all<PvMode::kF32>(plan); break;
    case PvMode::kBf16: run_all<PvMode::kBf16>(plan); break;
    case PvMode::kInt8Vnni: run_all<PvMode::kInt8Vnni>(plan); break;
    case PvMode::kInt8Madd: run_all<PvMode::kInt8Madd>(plan); break;
  }
}

}  // namespace binformer::cpu::detail
