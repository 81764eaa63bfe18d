// AVX-512 attention forward: S = scale a_i b_j <sign q_i, sign k_j> + bias, online softmax, P.V.
//
// Work split: one parallel task = kTaskRows query rows of one (b, h). Inside a task, query rows
// are processed kTileRows at a time (the register block of P.V) against blocks of kKeyBlock
// keys, with the online softmax kept in the log2 domain (log2(e) is folded into the row
// coefficient and the bias, so the exponential is a bare 2^x).
//
// Per key block and row tile:
//   1. one pass of scores and exp: XOR + VPOPCNTD over the packed words of 16 keys at a time
//      (k bits transposed so that one load gives one word of 16 keys), s - m as one FMA on the
//      popcount, plus bias, -inf past Nk or above the causal diagonal; p = 2^(s - m) with a
//      polynomial exp2 against a lazily kept reference maximum m (BlockSoftmax: a block is
//      recomputed only when it exceeds m by more than a slack), row sums;
//   2. P.V into fp32 accumulators (an L1-resident buffer, loaded into registers per block and
//      rescaled by 2^(m_old - m_new) when the reference moved), 4 rows x 64 channels per
//      register block. The multiply-add unit is the bottleneck (at Dv = 64 one score costs 4 zmm
//      FMAs against ~1 cycle for step 1; NOTES.md), so P.V uses the narrowest product the data
//      allows:
//        fp32 / fp16 V:  fp32 FMA (fp16 V is widened once per head),
//        bf16 V:         VDPBF16PS with P rounded to bf16 (2 keys per instruction; the same
//                        rounding of P that FlashAttention applies on GPUs),
//        pv_int8:        VPDPBUSD u8 P x s8 V (4 keys per instruction), int32 per key block,
//                        or VPMADDWD on CPUs without AVX512_VNNI.
//
// Non-finite V: masked keys enter P.V with P = 0, and 0 * NaN = NaN. So a NaN/inf in V reaches
// every row attending to its key (the contract), rows that mask it with a -inf bias (as in the
// float64 reference, which multiplies the zeros too), and, with causal masking, at most the
// kTileRows - 1 rows just above the diagonal that share a tile with an attending row (the
// reference sends it to every row; blocks past a tile's causal limit are skipped entirely).
#include <vector>

#include "attention_avx512.h"

namespace binformer::cpu::detail {
namespace {

constexpr int kKeyBlock = 256;   // keys per online-softmax step (16 vectors of 16)
constexpr int kTaskRows = 64;    // query rows per parallel task
constexpr int kDvChunk = 64;     // output channels per register block (4 zmm)

enum class PvMode { kF32, kBf16, kInt8Vnni, kInt8Madd };

// Keys are grouped per P.V instruction: 1 (fp32 FMA), 2 (bf16 pairs, int16 pairs), 4 (u8 quads).
constexpr int keys_per_group(PvMode mode) {
  return mode == PvMode::kF32 ? 1 : mode == PvMode::kInt8Vnni ? 4 : 2;
}

// Per (b, h) data shared by every task of that head, built once before the main loop.
struct HeadInputs {
  KeyInputs keys;            // transposed k bits and per-key b_j (nullptr when b is constant)
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
  bool score_tables;        // ScoreTables may be used (not disabled through the environment)
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

// dst[(j / kGroup) * dv_pad * kGroup + c * kGroup + j % kGroup] = src row j, channel c, for the
// real keys and channels (the caller zeroes the rest).
template <int kGroup, class Src, class Dst>
void interleave_v_rows(const Src* src, int64_t row_stride, int64_t nk, int dv, int dv_pad, Dst* dst) {
  for (int64_t j = 0; j < nk; ++j) {
    const Src* row = src + j * row_stride;
    Dst* out = dst + (j / kGroup) * dv_pad * kGroup + j % kGroup;
    for (int c = 0; c < dv; ++c) out[c * kGroup] = Dst(row[c]);
  }
}

// Packs one head's V rows [Nk, Dv] into the P.V layout: groups of g keys, inside a group
// channel-major with the g keys of a channel adjacent ([Nk_pad / g][Dv_pad][g]); padded keys
// and channels are zero (their P is 0, and 0 * garbage could be NaN). One loop per layout with
// the element types known (a run-time dtype switch per element was 6% of a pv_int8 forward).
void prepare_v(const ForwardPlan& plan, int64_t b, int64_t h, void* dst) {
  const AttentionFwdParams& p = plan.p;
  const int dv = p.v_dim, dv_pad = plan.dv_pad;
  const int64_t head_off = b * p.v_stride[0] + h * p.v_stride[1], stride = p.v_stride[2];
  std::memset(dst, 0, size_t(plan.nk_pad) * dv_pad * v_elem_size(plan.mode));
  switch (plan.mode) {
    case PvMode::kF32: {  // fp32 rows (Dv not a multiple of 16) or fp16 / bf16 widened
      const char* src = static_cast<const char*>(p.v) + head_off * dtype_size(p.v_dtype);
      float* out = static_cast<float*>(dst);
      for (int64_t j = 0; j < p.Nk; ++j)
        for (int c = 0; c < dv; c += 16) {
          const __mmask16 lanes = first_lanes16(dv - c);
          _mm512_mask_storeu_ps(out + j * dv_pad + c, lanes,
                                load16_as_float(src + (j * stride + c) * dtype_size(p.v_dtype), p.v_dtype, lanes));
        }
      break;
    }
    case PvMode::kBf16:
      interleave_v_rows<2>(static_cast<const uint16_t*>(p.v) + head_off, stride, p.Nk, dv, dv_pad,
                           static_cast<uint16_t*>(dst));
      break;
    case PvMode::kInt8Vnni:
      interleave_v_rows<4>(static_cast<const int8_t*>(p.v) + head_off, stride, p.Nk, dv, dv_pad,
                           static_cast<int8_t*>(dst));
      break;
    case PvMode::kInt8Madd:
      interleave_v_rows<2>(static_cast<const int8_t*>(p.v) + head_off, stride, p.Nk, dv, dv_pad,
                           static_cast<int16_t*>(dst));
      break;
  }
}

void build_plan(ForwardPlan& plan) {
  const AttentionFwdParams& p = plan.p;
  const int64_t BH = p.B * p.H;
  plan.words = words_for(p.head_dim);
  plan.nk_pad = round_up(std::max<int64_t>(p.Nk, 1), kKeyBlock);
  plan.dv_pad = int(round_up(p.v_dim, 16));
  plan.mode = choose_mode(p);
  plan.score_tables = cpu_score_tables_enabled();
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

  const double scores = double(BH) * double(p.Nq) * double(p.Nk);
  parallel_for(BH, grain_for_work(BH, scores), [&](int64_t bh_begin, int64_t bh_end) {
    for (int64_t bh = bh_begin; bh < bh_end; ++bh) {
      const int64_t b = bh / p.H, h = bh % p.H;
      HeadInputs& head = plan.heads[size_t(bh)];
      // k bits, transposed per group of 16 keys; padded keys are 0 (masked later).
      uint32_t* kt = plan.k_bits_t.get() + bh * nk_pad * words;
      transpose_key_bits(p.k, p.k_dtype, b * p.k_stride[0] + h * p.k_stride[1], p.k_stride[2], p.Nk, nk_pad,
                         p.head_dim, kt);
      head.keys.bits_t = kt;
      // Column factor b_j.
      const int64_t ks_head = p.k_scale ? b * p.k_scale_stride[0] + h * p.k_scale_stride[1] : 0;
      head.k_factor_const = p.k_scale && !plan.k_factor_per_key ? p.k_scale[ks_head] : 1.0f;
      head.keys.factor = nullptr;
      if (plan.k_factor_per_key) {
        float* kf = plan.k_factor.get() + bh * nk_pad;
        for (int64_t j = 0; j < nk_pad; ++j) kf[j] = j < p.Nk ? p.k_scale[ks_head + j * p.k_scale_stride[2]] : 0.0f;
        head.keys.factor = kf;
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

// ------------------------------------------------------------------ P.V
// P of one key block for kTileRows rows, in the layout of each P.V mode.
struct ProbBlock {
  alignas(64) float f32[kTileRows][kKeyBlock];    // kF32
  alignas(64) uint16_t u16[kTileRows][kKeyBlock]; // kBf16 (bf16 bits), kInt8Madd (0..255)
  alignas(64) uint8_t u8[kTileRows][kKeyBlock];   // kInt8Vnni (0..255)
};

// Accumulator vector of each P.V mode: fp32 sums, or exact int32 sums of one key block. (A
// specialisation rather than std::conditional: vector types as template arguments lose their
// alignment attributes, which GCC warns about.)
template <PvMode kMode>
struct PvAccType {
  using type = __m512;
};
template <>
struct PvAccType<PvMode::kInt8Vnni> {
  using type = __m512i;
};
template <>
struct PvAccType<PvMode::kInt8Madd> {
  using type = __m512i;
};
template <PvMode kMode>
using PvAcc = typename PvAccType<kMode>::type;

// acc += u8 quads of a x s8 quads of b (VPDPBUSD). Through asm with the accumulator tied in
// place: with the intrinsic, GCC 12 rotated the 16 accumulators of the P.V loop through other
// registers every iteration (~27 zmm moves and a spill per 16 VPDPBUSD, objdump), which cost
// more than the multiply-adds themselves.
inline __m512i dpbusd_tied(__m512i acc, __m512i a, __m512i b) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "vm"(b));
  return acc;
}

// acc[r][k] += sum over the keys [t0, t1) of the block of P[r][t] V[t][c0 + 16 k ..]: v_block is
// the packed (or direct) V at the block's first key group, `pitch` the elements per key group.
// t0 is a multiple of the group size; keys in the group tail past t1 have P = 0.
template <PvMode kMode, int kVecs>
inline void pv_keys(PvAcc<kMode> (&acc)[kTileRows][kVecs], const ProbBlock& prob, const void* v_block,
                    int64_t pitch, int c0, int t0, int t1) {
  if constexpr (kMode == PvMode::kF32) {
    const float* vrow = static_cast<const float*>(v_block) + t0 * pitch + c0;
    for (int t = t0; t < t1; ++t, vrow += pitch) {
      __m512 vv[kVecs];
      for (int k = 0; k < kVecs; ++k) vv[k] = _mm512_loadu_ps(vrow + 16 * k);
      for (int r = 0; r < kTileRows; ++r) {
        const __m512 pr = _mm512_set1_ps(prob.f32[r][t]);
        for (int k = 0; k < kVecs; ++k) acc[r][k] = _mm512_fmadd_ps(pr, vv[k], acc[r][k]);
      }
    }
  } else if constexpr (kMode == PvMode::kBf16) {
    const uint16_t* vpair = static_cast<const uint16_t*>(v_block) + (t0 / 2) * pitch + 2 * c0;
    for (int t = t0; t < t1; t += 2, vpair += pitch) {
      __m512bh vv[kVecs];
      for (int k = 0; k < kVecs; ++k) vv[k] = (__m512bh)_mm512_loadu_si512(vpair + 32 * k);
      for (int r = 0; r < kTileRows; ++r) {
        uint32_t pair;
        std::memcpy(&pair, &prob.u16[r][t], 4);
        const __m512bh pr = (__m512bh)_mm512_set1_epi32(int(pair));
        for (int k = 0; k < kVecs; ++k) acc[r][k] = _mm512_dpbf16_ps(acc[r][k], pr, vv[k]);
      }
    }
  } else if constexpr (kMode == PvMode::kInt8Vnni) {
    const int8_t* vquad = static_cast<const int8_t*>(v_block) + (t0 / 4) * pitch + 4 * c0;
    for (int t = t0; t < t1; t += 4, vquad += pitch) {
      __m512i vv[kVecs];
      for (int k = 0; k < kVecs; ++k) vv[k] = _mm512_loadu_si512(vquad + 64 * k);
      for (int r = 0; r < kTileRows; ++r) {
        uint32_t quad;
        std::memcpy(&quad, &prob.u8[r][t], 4);
        const __m512i pr = _mm512_set1_epi32(int(quad));
        for (int k = 0; k < kVecs; ++k) acc[r][k] = dpbusd_tied(acc[r][k], pr, vv[k]);
      }
    }
  } else {  // kInt8Madd: u8 P and s8 V widened to int16 pairs
    const int16_t* vpair = static_cast<const int16_t*>(v_block) + (t0 / 2) * pitch + 2 * c0;
    for (int t = t0; t < t1; t += 2, vpair += pitch) {
      __m512i vv[kVecs];
      for (int k = 0; k < kVecs; ++k) vv[k] = _mm512_loadu_si512(vpair + 32 * k);
      for (int r = 0; r < kTileRows; ++r) {
        uint32_t pair;
        std::memcpy(&pair, &prob.u16[r][t], 4);
        const __m512i pr = _mm512_set1_epi32(int(pair));
        for (int k = 0; k < kVecs; ++k) acc[r][k] = _mm512_add_epi32(acc[r][k], _mm512_madd_epi16(pr, vv[k]));
      }
    }
  }
}

constexpr bool is_int8(PvMode mode) { return mode == PvMode::kInt8Vnni || mode == PvMode::kInt8Madd; }

// Float accumulators (in memory, acc_mem[r][c0 + 16 k]): load scaled by alpha, or, for the
// integer modes, start integer sums of a block at 0.
template <PvMode kMode, int kVecs>
inline void pv_begin(PvAcc<kMode> (&acc)[kTileRows][kVecs], float* const* acc_mem, int c0, const float* alpha) {
  for (int r = 0; r < kTileRows; ++r)
    for (int k = 0; k < kVecs; ++k) {
      if constexpr (is_int8(kMode)) {
        acc[r][k] = _mm512_setzero_si512();
      } else {
        acc[r][k] = _mm512_mul_ps(_mm512_load_ps(acc_mem[r] + c0 + 16 * k), _mm512_set1_ps(alpha[r]));
      }
    }
}

// Stores them back; integer block sums are added as acc_mem = acc_mem * alpha + float(sum)
// (exact integers below 2^24 per block: 256 keys x 255 x 127 < 2^23).
template <PvMode kMode, int kVecs>
inline void pv_end(PvAcc<kMode> (&acc)[kTileRows][kVecs], float* const* acc_mem, int c0, const float* alpha) {
  for (int r = 0; r < kTileRows; ++r)
    for (int k = 0; k < kVecs; ++k) {
      float* at = acc_mem[r] + c0 + 16 * k;
      if constexpr (is_int8(kMode)) {
        _mm512_store_ps(at, _mm512_fmadd_ps(_mm512_load_ps(at), _mm512_set1_ps(alpha[r]), _mm512_cvtepi32_ps(acc[r][k])));
      } else {
        _mm512_store_ps(at, acc[r][k]);
      }
    }
}

// ------------------------------------------------------------------ scores and softmax
// Stores p (16 keys at prob[r][v ..]) in the layout of kMode.
template <PvMode kMode>
inline void store_prob(ProbBlock& prob, int r, int v, __m512 p) {
  if constexpr (kMode == PvMode::kF32) {
    _mm512_store_ps(&prob.f32[r][v], p);
  } else if constexpr (kMode == PvMode::kBf16) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(&prob.u16[r][v]), (__m256i)_mm512_cvtneps_pbh(p));
  } else {
    // round(p * 255) with p in [0, 1]: vcvtps2dq rounds to nearest even.
    const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(p, _mm512_set1_ps(255.0f)));
    if constexpr (kMode == PvMode::kInt8Vnni) {
      _mm_store_si128(reinterpret_cast<__m128i*>(&prob.u8[r][v]), _mm512_cvtusepi32_epi8(q));
    } else {
      _mm256_store_si256(reinterpret_cast<__m256i*>(&prob.u16[r][v]), _mm512_cvtusepi32_epi16(q));
    }
  }
}

// p = 2^x stored at prob[r][v .. v + 16) in the layout of kMode; returns p.
template <PvMode kMode>
inline __m512 exp_store(ProbBlock& prob, int r, int v, __m512 x, bool may_be_neg_inf) {
  // P that is rounded to 8 bits right after (bf16, u8) needs less than the fp32-accurate exp.
  constexpr int kDegree = kMode == PvMode::kF32 ? 6 : 4;
  const __m512 p = may_be_neg_inf ? exp2_ps<kDegree>(x) : exp2_finite_ps<kDegree>(x);
  store_prob<kMode>(prob, r, v, p);
  return p;
}

// ------------------------------------------------------------------ score tables (no bias)
// Without a bias or per-key factor the log2-domain score of row r is a function of the popcount
// n = popcount(q ^ k) in [0, d] alone: x(n) = n slope_r + (offset_r - m). With slope_r <= 0
// (non-negative scale and row factor: the usual case) and d <= 255, p = 2^x(n) factors as
//   p(n) = hi_r[n >> 4] * lo_r[n & 15],  hi_r[h] = 2^x(16 h),  lo_r[l] = 2^(slope_r l) <= 1,
// two 16-entry VPERMPS lookups and one multiply per 16 keys in place of the convert, the score
// FMA and the exp2 polynomial (~10 FMA-pipe ops). The tables are rebuilt (degree-6 exp2, 2
// vectors per row) only when the row's reference maximum moves, i.e. rarely (BlockSoftmax).
// Error: the two table entries (exp2 of a rounded argument each) and the product add up to
// ~3 u32 relative to 2^x(n), inside the exp term of the error model (tests/python/conftest.py);
// with lo = 0 or subnormal the true p is below 2^(slack - 126): an absolute error, negligible.
// The maximum of x over a block is x(min n) (the popcounts' minimum, on the integer pipes).
struct ScoreTables {
  alignas(64) float hi[kTileRows][16];
  alignas(64) float lo[kTileRows][16];
  float built_for_m[kTileRows];  // the m of each row's tables (NaN: none yet)

  void reset() {
    for (int r = 0; r < kTileRows; ++r) built_for_m[r] = std::numeric_limits<float>::quiet_NaN();
  }
  void ensure(const TileRows& rows, int r, float m) {
    if (built_for_m[r] == m) return;
    const __m512 index = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512 slope = _mm512_set1_ps(rows.slope[r]);
    // x(16 h) exactly as the polynomial path computes x(n): one FMA on n with offset_r - m.
    const __m512 x_hi = _mm512_fmadd_ps(_mm512_mul_ps(index, _mm512_set1_ps(16.0f)), slope,
                                        _mm512_set1_ps(rows.offset[r] - m));
    _mm512_store_ps(hi[r], exp2_finite_ps<6>(x_hi));
    _mm512_store_ps(lo[r], exp2_finite_ps<6>(_mm512_mul_ps(index, slope)));
    built_for_m[r] = m;
  }
};

// Whether the rows of a tile qualify for the tables (see ScoreTables): finite coefficients,
// slope <= 0, d <= 255 (n >> 4 <= 15).
inline bool tables_apply(const TileRows& rows, int d) {
  if (d > 255) return false;
  for (int r = 0; r < kTileRows; ++r)
    if (!(rows.slope[r] <= 0.0f) || !std::isfinite(rows.slope[r]) || !std::isfinite(rows.offset[r])) return false;
  return true;
}

// One row of score_pass_tables with the word count known at compile time: the q words stay in
// registers and the key pointer advances by a constant (with a run-time count GCC kept an inner
// loop per 16 keys, with its branch and an imul for the address: half of the pass).
template <PvMode kMode, bool kExp, int kWords>
void score_row_tables(const TileRows& rows, int r, const uint32_t* k_bits_t, int64_t j0, int keys, float m,
                      const ScoreTables& tables, ProbBlock& prob, float* block_max, float* block_sum) {
  const __m512i lane_index = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  __m512i q_words[kWords];
  for (int w = 0; w < kWords; ++w) q_words[w] = _mm512_set1_epi32(int(rows.q[r][w]));
  const __m512 hi = _mm512_load_ps(tables.hi[r]), lo = _mm512_load_ps(tables.lo[r]);
  const uint32_t* k_group = k_bits_t + (j0 / 16) * kWords * 16;
  __m512i vmin = _mm512_set1_epi32(-1);  // unsigned maximum
  __m512 vsum = _mm512_setzero_ps();
  for (int v = 0; v < keys; v += 16, k_group += kWords * 16) {
    __m512i count = _mm512_popcnt_epi32(_mm512_xor_si512(_mm512_load_si512(k_group), q_words[0]));
    for (int w = 1; w < kWords; ++w)
      count = _mm512_add_epi32(count, _mm512_popcnt_epi32(_mm512_xor_si512(_mm512_load_si512(k_group + 16 * w), q_words[w])));
    const int64_t j = j0 + v;
    __mmask16 valid = 0xffff;
    if (j + 16 > rows.unmasked_end)  // causal diagonal or the end of the keys
      valid = _mm512_cmplt_epi32_mask(_mm512_add_epi32(lane_index, _mm512_set1_epi32(int(j))),
                                      _mm512_set1_epi32(rows.key_limit[r]));
    vmin = _mm512_mask_min_epu32(vmin, valid, vmin, count);
    if constexpr (kExp) {
      // p = hi[n >> 4] * lo[n & 15] (VPERMPS reads the low 4 index bits).
      const __m512 p = _mm512_maskz_mul_ps(valid, _mm512_permutexvar_ps(_mm512_srli_epi32(count, 4), hi),
                                           _mm512_permutexvar_ps(count, lo));
      store_prob<kMode>(prob, r, v, p);
      vsum = _mm512_add_ps(vsum, p);
    }
  }
  const uint32_t n_min = _mm512_reduce_min_epu32(vmin);
  block_max[r] = n_min == 0xffffffffu ? kNegInf : std::fma(float(n_min), rows.slope[r], rows.offset[r] - m);
  if constexpr (kExp) block_sum[r] = _mm512_reduce_add_ps(vsum);
}

// score_pass (below) through the tables: the same outputs (block_max = x(min n) over the
// unmasked keys, -inf if none; with kExp p and its sums).
template <PvMode kMode, bool kExp>
void score_pass_tables(const TileRows& rows, const HeadInputs& head, int words, int64_t j0, int keys,
                       const float* m_use, ScoreTables& tables, ProbBlock& prob, float* block_max, float* block_sum,
                       unsigned row_mask) {
  for (int r = 0; r < kTileRows; ++r) {
    if (!((row_mask >> r) & 1u)) continue;
    const float m = m_use ? m_use[r] : 0.0f;
    if constexpr (kExp) tables.ensure(rows, r, m);
    auto row = [&](auto word_count) {
      score_row_tables<kMode, kExp, decltype(word_count)::value>(rows, r, head.keys.bits_t, j0, keys, m, tables, prob,
                                                                 block_max, block_sum);
    };
    switch (words) {  // d <= 255 (tables_apply): 1..8 words
      case 1: row(std::integral_constant<int, 1>{}); break;
      case 2: row(std::integral_constant<int, 2>{}); break;
      case 3: row(std::integral_constant<int, 3>{}); break;
      case 4: row(std::integral_constant<int, 4>{}); break;
      case 5: row(std::integral_constant<int, 5>{}); break;
      case 6: row(std::integral_constant<int, 6>{}); break;
      case 7: row(std::integral_constant<int, 7>{}); break;
      default: row(std::integral_constant<int, 8>{}); break;
    }
  }
}

// One pass over the keys [j0, j0 + keys) of the rows in row_mask: per row the maximum of
// s - m_use[r] (m_use = nullptr: of s) and, with kExp, p = 2^(s - m_use[r]) into `prob` and its
// sums.
template <PvMode kMode, bool kBias, bool kKeyFactor, bool kExp>
void score_pass(const TileRows& rows, const HeadInputs& head, int words, int64_t j0, int keys, const float* m_use,
                ProbBlock& prob, float* block_max, float* block_sum, unsigned row_mask = (1u << kTileRows) - 1) {
  for (int r = 0; r < kTileRows; ++r) {
    if (!((row_mask >> r) & 1u)) continue;
    const float m = m_use ? m_use[r] : 0.0f;
    __m512 vmax = _mm512_set1_ps(kNegInf), vsum = _mm512_setzero_ps();
    for (int v = 0; v < keys; v += 16) {
      bool neg_inf;
      const __m512 x = shifted_score<kBias, kKeyFactor>(rows, r, head.keys, words, j0 + v, m, &neg_inf);
      vmax = _mm512_max_ps(vmax, x);  // a NaN score reaches m (and p): the row turns NaN
      if constexpr (kExp) vsum = _mm512_add_ps(vsum, exp_store<kMode>(prob, r, v, x, neg_inf));
    }
    block_max[r] = _mm512_reduce_max_ps(vmax);
    if constexpr (kExp) block_sum[r] = _mm512_reduce_add_ps(vsum);
  }
}

// score_pass or score_pass_tables.
template <PvMode kMode, bool kBias, bool kKeyFactor, bool kTables, bool kExp>
inline void any_score_pass(const TileRows& rows, const HeadInputs& head, int words, int64_t j0, int keys,
                           const float* m_use, ScoreTables& tables, ProbBlock& prob, float* block_max,
                           float* block_sum, unsigned row_mask = (1u << kTileRows) - 1) {
  if constexpr (kTables) {
    static_assert(!kBias && !kKeyFactor, "the tables hold scores without bias or key factor");
    score_pass_tables<kMode, kExp>(rows, head, words, j0, keys, m_use, tables, prob, block_max, block_sum, row_mask);
  } else {
    score_pass<kMode, kBias, kKeyFactor, kExp>(rows, head, words, j0, keys, m_use, prob, block_max, block_sum, row_mask);
  }
}

// How far (log2 units) a block's scores may exceed the reference maximum before the block is
// recomputed against its own maximum. P <= 2^slack stays far from fp32 overflow, so most blocks
// exponentiate in the same pass that computes their scores and the reference rarely moves.
// pv_int8 quantizes P in [0, 1] against the running maximum: the slack only absorbs the rounding
// of s - m (without it the maximum itself, recomputed as 0 +- 1 ulp, would trigger recomputes);
// P <= 2^0.002 < 255.5 / 255 still quantizes to at most 255, off by less than half a step.
constexpr float reference_slack(PvMode mode) { return is_int8(mode) ? 0.002f : 8.0f; }

// Online-softmax state of one tile: reference maximum m (log2 units; -inf until a key is
// unmasked), l = sum 2^(s - m).
struct SoftmaxState {
  float m_ref[kTileRows], l[kTileRows];
};

// The reference-maximum protocol around the exp pass of one block (which the caller runs,
// possibly interleaved with P.V, against m_use):
//  prepare: rows without a reference yet take the block's maximum (a score-only pass);
//  finish:  block_max holds max(s - m_use); rows that exceed the slack move their reference to
//           the block maximum and the block's P is recomputed; alpha[r] = 2^(m_old - m_new) is
//           the factor for the accumulators of earlier blocks; l is updated.
template <PvMode kMode, bool kBias, bool kKeyFactor, bool kTables>
struct BlockSoftmax {
  static void prepare(SoftmaxState& st, const TileRows& rows, const HeadInputs& head, int words, int64_t j0,
                      int keys, ScoreTables& tables, ProbBlock& prob, float* m_use) {
    bool any_unset = false;
    for (int r = 0; r < kTileRows; ++r) any_unset |= (st.m_ref[r] == kNegInf);
    if (any_unset) {
      float block_max[kTileRows];
      any_score_pass<kMode, kBias, kKeyFactor, kTables, false>(rows, head, words, j0, keys, nullptr, tables, prob,
                                                              block_max, nullptr);
      for (int r = 0; r < kTileRows; ++r)
        if (st.m_ref[r] == kNegInf) st.m_ref[r] = block_max[r];  // may stay -inf: all masked so far
    }
    for (int r = 0; r < kTileRows; ++r) m_use[r] = st.m_ref[r] == kNegInf ? 0.0f : st.m_ref[r];
  }
  static void finish(SoftmaxState& st, const TileRows& rows, const HeadInputs& head, int words, int64_t j0,
                     int keys, ScoreTables& tables, ProbBlock& prob, float* m_use, float* block_max,
                     float* block_sum, float* alpha) {
    constexpr float kSlack = reference_slack(kMode);
    unsigned redo = 0;
    for (int r = 0; r < kTileRows; ++r) {
      alpha[r] = 1.0f;
      if (block_max[r] > kSlack) {  // false for NaN: a NaN row stays NaN
        const float m_new = m_use[r] + block_max[r];
        alpha[r] = std::exp2(st.m_ref[r] - m_new);
        st.m_ref[r] = m_use[r] = m_new;
        redo |= 1u << r;
      }
    }
    if (redo)
      any_score_pass<kMode, kBias, kKeyFactor, kTables, true>(rows, head, words, j0, keys, m_use, tables, prob,
                                                             block_max, block_sum, redo);
    for (int r = 0; r < kTileRows; ++r) st.l[r] = st.l[r] * alpha[r] + block_sum[r];
  }
};

// ------------------------------------------------------------------ tile kernels
struct TaskScratch {
  AlignedArray<float> acc;       // [kTileRows][dv_pad]
  AlignedArray<float> row_bias;  // [kTileRows][nk_pad] when the bias is expanded per row
  AlignedArray<uint32_t> q_bits; // [kTaskRows][words]
  ProbBlock prob;
  ScoreTables tables;
};

struct TileJob {
  const ForwardPlan* plan;
  const HeadInputs* head;
  TileRows rows;
  int64_t key_end;  // keys [0, key_end) are visited (the last row's limit)
};

// One row tile over all its keys: per key block, the scores and P (one pass, see BlockSoftmax),
// then P.V for each chunk of 64 channels with the accumulators in registers.
//
// Scores and P.V stay separate passes on purpose: interleaving them (P.V of block n - 1 with the
// exp of block n, accumulators held in registers across blocks) was measured slower on Zen 4
// (fp32 5.2 vs 5.1, bf16 3.5 vs 3.2 cycles per score): both compete for the same vector
// dispatch, and the exp's dependent FMA chain stalled behind the P.V FMAs (see NOTES.md).
template <PvMode kMode, bool kBias, bool kKeyFactor, bool kTables>
void run_tile(const TileJob& job, TaskScratch& s, SoftmaxState& st) {
  const ForwardPlan& plan = *job.plan;
  const HeadInputs& head = *job.head;
  const int words = plan.words;
  float* acc_mem[kTileRows];
  for (int r = 0; r < kTileRows; ++r) acc_mem[r] = s.acc.get() + r * plan.dv_pad;
  constexpr int g = keys_per_group(kMode);
  using Softmax = BlockSoftmax<kMode, kBias, kKeyFactor, kTables>;
  ProbBlock& prob = s.prob;
  if constexpr (kTables) s.tables.reset();
  for (int64_t j0 = 0; j0 < job.key_end; j0 += kKeyBlock) {
    const int keys = int(std::min<int64_t>(kKeyBlock, job.key_end - j0));
    float m_use[kTileRows], block_max[kTileRows], block_sum[kTileRows], alpha[kTileRows];
    Softmax::prepare(st, job.rows, head, words, j0, keys, s.tables, prob, m_use);
    any_score_pass<kMode, kBias, kKeyFactor, kTables, true>(job.rows, head, words, j0, keys, m_use, s.tables, prob,
                                                           block_max, block_sum);
    Softmax::finish(st, job.rows, head, words, j0, keys, s.tables, prob, m_use, block_max, block_sum, alpha);
    const void* v_block = static_cast<const char*>(head.v) + (j0 / g) * head.v_group_pitch * v_elem_size(kMode);
    for (int c0 = 0; c0 < plan.dv_pad; c0 += kDvChunk) {
      auto chunk = [&](auto vec_count) {
        constexpr int kVecs = decltype(vec_count)::value;
        PvAcc<kMode> acc[kTileRows][kVecs];
        pv_begin<kMode, kVecs>(acc, acc_mem, c0, alpha);
        pv_keys<kMode, kVecs>(acc, prob, v_block, head.v_group_pitch, c0, 0, keys);
        pv_end<kMode, kVecs>(acc, acc_mem, c0, alpha);
      };
      switch (std::min(kDvChunk, plan.dv_pad - c0) / 16) {
        case 4: chunk(std::integral_constant<int, 4>{}); break;
        case 3: chunk(std::integral_constant<int, 3>{}); break;
        case 2: chunk(std::integral_constant<int, 2>{}); break;
        default: chunk(std::integral_constant<int, 1>{}); break;
      }
    }
  }
}

using TileFn = void (*)(const TileJob&, TaskScratch&, SoftmaxState&);

template <PvMode kMode>
TileFn select_tile(bool bias, bool key_factor) {
  if (bias) return key_factor ? run_tile<kMode, true, true, false> : run_tile<kMode, true, false, false>;
  return key_factor ? run_tile<kMode, false, true, false> : run_tile<kMode, false, false, false>;
}

// ------------------------------------------------------------------ one task
template <PvMode kMode>
void run_task(const ForwardPlan& plan, TileFn tile_fn, TaskScratch& s, int64_t bh, int64_t i_begin, int64_t i_end) {
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
    uint32_t* dst = s.q_bits.get() + (i - i_begin) * words;
    pack_sign_row(static_cast<const char*>(p.q) + (q_head + i * p.q_stride[2]) * dtype_size(p.q_dtype), p.q_dtype, d, dst);
    q_rows_all[i - i_begin] = dst;
  }

  const RelPosGeometry geo(p.rel_pos_wh, p.rel_pos_ww, p.num_prefix_tokens);
  const bool tables_allowed = plan.score_tables && !p.bias && !p.rel_pos_table && !plan.k_factor_per_key;
  const float* rel_table = p.rel_pos_table ? p.rel_pos_table + h * p.rel_pos_table_stride_h : nullptr;
  const float* rel_reversed = p.rel_pos_table ? plan.rel_table_reversed.get() + h * geo.table_size : nullptr;

  for (int64_t t0 = i_begin; t0 < i_end; t0 += kTileRows) {
    const int rows = int(std::min<int64_t>(kTileRows, i_end - t0));
    TileJob job;
    job.plan = &plan;
    job.head = &head;
    int64_t row_index[kTileRows];
    for (int r = 0; r < kTileRows; ++r) {
      const int64_t i = t0 + std::min(r, rows - 1);  // surplus rows repeat the last real row
      row_index[r] = i;
      job.rows.q[r] = q_rows_all[i - i_begin];
      const float a = p.q_scale ? p.q_scale[b * p.q_scale_stride[0] + h * p.q_scale_stride[1] + i * p.q_scale_stride[2]] : 1.0f;
      const float coef = p.scale * a * head.k_factor_const * kLog2e;
      job.rows.slope[r] = -2.0f * coef;
      job.rows.offset[r] = float(d) * coef;
      job.rows.key_limit[r] = int32_t(p.causal ? std::min<int64_t>(Nk, i + 1) : Nk);
      job.rows.bias[r] = nullptr;
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
        job.rows.bias[r] = dst;
      } else if (p.bias) {
        job.rows.bias[r] = static_cast<const float*>(p.bias) + b * p.bias_stride[0] + h * p.bias_stride[1] + i * p.bias_stride[2];
      }
    }
    job.key_end = job.rows.key_limit[kTileRows - 1];  // the last row sees the most keys
    job.rows.unmasked_end = job.rows.key_limit[0];

    SoftmaxState st;
    for (int r = 0; r < kTileRows; ++r) {
      st.m_ref[r] = kNegInf;
      st.l[r] = 0.0f;
    }
    std::memset(s.acc.get(), 0, size_t(kTileRows) * dv_pad * sizeof(float));
    // Without bias or key factor, tiles whose coefficients allow it use the score tables.
    if (tables_allowed && tables_apply(job.rows, d)) {
      run_tile<kMode, false, false, true>(job, s, st);
    } else {
      tile_fn(job, s, st);
    }

    // Epilogue: out = acc / l (pv_int8: times v_dequant / 255), lse = (m + log2 l) ln 2.
    for (int r = 0; r < rows; ++r) {
      const int64_t i = row_index[r];
      const float l = st.l[r];
      const bool empty = (l == 0.0f);  // fully masked row
      const __m512 inv_l = _mm512_set1_ps(empty ? 0.0f : 1.0f / l);
      char* out = static_cast<char*>(p.out) +
                  (b * p.out_stride[0] + h * p.out_stride[1] + i * p.out_stride[2]) * dtype_size(p.out_dtype);
      const float* acc = s.acc.get() + r * dv_pad;
      for (int c = 0; c < dv; c += 16) {
        const __mmask16 lanes = first_lanes16(dv - c);
        __m512 o = _mm512_mul_ps(_mm512_load_ps(acc + c), inv_l);
        if constexpr (is_int8(kMode))
          o = _mm512_mul_ps(o, _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, p.v_dequant + bh * dv + c),
                                             _mm512_set1_ps(1.0f / 255.0f)));
        if (empty) o = _mm512_setzero_ps();
        store16_from_float(out + c * dtype_size(p.out_dtype), p.out_dtype, o, lanes);
      }
      if (p.lse) p.lse[bh * p.Nq + i] = empty ? kNegInf : (st.m_ref[r] + std::log2(l)) * kLn2;
    }
  }
}

template <PvMode kMode>
void run_all(ForwardPlan& plan) {
  const AttentionFwdParams& p = plan.p;
  const int64_t row_blocks = ceil_div(p.Nq, kTaskRows);
  const TileFn tile_fn = select_tile<kMode>(p.bias || p.rel_pos_table, plan.k_factor_per_key);
  const int64_t tasks = p.B * p.H * row_blocks;
  parallel_for(tasks, grain_for_work(tasks, double(p.B * p.H) * double(p.Nq) * double(p.Nk)),
               [&](int64_t begin, int64_t end) {
    auto scratch = std::make_unique<TaskScratch>();
    scratch->acc = make_aligned<float>(size_t(kTileRows) * plan.dv_pad);
    if (plan.bias_in_row_buffer) scratch->row_bias = make_aligned<float>(size_t(kTileRows) * plan.nk_pad);
    scratch->q_bits = make_aligned<uint32_t>(size_t(kTaskRows) * plan.words);
    // P of keys past a block's end is read by key groups that straddle it: keep it finite.
    std::memset(static_cast<void*>(&scratch->prob), 0, sizeof(scratch->prob));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / row_blocks, blk = balanced_block(task % row_blocks, row_blocks);
      const int64_t i_begin = blk * kTaskRows, i_end = std::min(p.Nq, i_begin + kTaskRows);
      run_task<kMode>(plan, tile_fn, *scratch, bh, i_begin, i_end);
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
