// AVX-512 pieces shared by the attention forward and backward: packing signs, the transposed
// key bits, and the log2-domain score of a tile of query rows against 16 keys.
// Include only from *_avx512.cpp files; everything has internal linkage.
#pragma once
#include "avx512_common.h"

namespace binformer::cpu::detail {
namespace {

constexpr int kTileRows = 4;  // query rows per register tile

// bit = !(x < 0) for the d values of one row (fp32/fp16/bf16) at `src` -> words_for(d) words.
inline void pack_sign_row(const char* src, DType dtype, int d, uint32_t* dst) {
  const size_t es = dtype_size(dtype);
  for (int w = 0; w < words_for(d); ++w) {
    const int c0 = 32 * w;
    const __mmask16 lo_lanes = first_lanes16(d - c0), hi_lanes = first_lanes16(d - c0 - 16);
    // "not less than" with an unordered predicate: NaN gives 1.
    const uint32_t lo = _mm512_mask_cmp_ps_mask(lo_lanes, load16_as_float(src + c0 * es, dtype, lo_lanes),
                                                _mm512_setzero_ps(), _CMP_NLT_UQ);
    const uint32_t hi = _mm512_mask_cmp_ps_mask(hi_lanes, load16_as_float(src + (c0 + 16) * es, dtype, hi_lanes),
                                                _mm512_setzero_ps(), _CMP_NLT_UQ);
    dst[w] = lo | (hi << 16);
  }
}

// Sign bits of one head's n_rows key rows (kBits words, or floats packed here), transposed per
// group of 16 keys: dst[(j / 16) * words * 16 + w * 16 + j % 16] = word w of key j. Keys in
// [n_rows, n_pad) are 0. `head_offset` and `row_stride` are in elements of the source dtype.
inline void transpose_key_bits(const void* src, DType dtype, int64_t head_offset, int64_t row_stride, int64_t n_rows,
                               int64_t n_pad, int d, uint32_t* dst) {
  const int words = words_for(d);
  uint32_t packed[kMaxHeadDim / 32];
  for (int64_t j = 0; j < n_pad; ++j) {
    const uint32_t* row = nullptr;
    if (j < n_rows) {
      if (dtype == DType::kBits) {
        row = static_cast<const uint32_t*>(src) + head_offset + j * row_stride;
      } else {
        pack_sign_row(static_cast<const char*>(src) + (head_offset + j * row_stride) * dtype_size(dtype), dtype, d,
                      packed);
        row = packed;
      }
    }
    for (int w = 0; w < words; ++w) dst[(j / 16) * words * 16 + w * 16 + (j % 16)] = row ? row[w] : 0u;
  }
}

struct KeyInputs {
  const uint32_t* bits_t;  // [n_pad / 16][words][16] (transpose_key_bits)
  const float* factor;     // [n_pad] b_j, or nullptr when b is constant over j
};

// The rows of one register tile, as the score code reads them. With c_r = scale * a_i * log2(e)
// (times b when b is constant), the log2-domain score of an integer popcount n = popcount(q ^ k)
// is (d - 2 n) c_r (b_j) = n * slope_r (b_j) + offset_r (b_j): one FMA on the converted count.
struct TileRows {
  const uint32_t* q[kTileRows];  // packed sign words
  float slope[kTileRows];        // -2 c_r
  float offset[kTileRows];       // d c_r
  const float* bias[kTileRows];  // fp32 bias row (caller's or expanded), when there is a bias
  int32_t key_limit[kTileRows];  // keys j >= key_limit are masked: Nk, or min(Nk, i + 1) if causal
  int32_t unmasked_end;          // min over rows of key_limit: vectors below it need no mask
};

// x = s - m for row r and the 16 keys [j, j + 16) (log2 domain), -inf where masked, from
//   s = n * slope_r (b_j) + offset_r (b_j) + bias * log2(e);
// *may_be_neg_inf tells whether x may hold -inf (then exp needs the clamp).
template <bool kBias, bool kKeyFactor>
inline __m512 shifted_score(const TileRows& rows, int r, const KeyInputs& keys, int words, int64_t j, float m,
                            bool* may_be_neg_inf) {
  const uint32_t* k_group = keys.bits_t + (j / 16) * words * 16;
  const uint32_t* q = rows.q[r];
  __m512i count = _mm512_popcnt_epi32(_mm512_xor_si512(_mm512_load_si512(k_group), _mm512_set1_epi32(int(q[0]))));
  for (int w = 1; w < words; ++w)
    count = _mm512_add_epi32(count, _mm512_popcnt_epi32(_mm512_xor_si512(_mm512_load_si512(k_group + 16 * w),
                                                                         _mm512_set1_epi32(int(q[w])))));
  __m512 slope = _mm512_set1_ps(rows.slope[r]);
  __m512 offset = _mm512_set1_ps(rows.offset[r] - m);
  if constexpr (kKeyFactor) {
    const __m512 col = _mm512_load_ps(keys.factor + j);
    slope = _mm512_mul_ps(slope, col);
    offset = _mm512_fmsub_ps(_mm512_set1_ps(rows.offset[r]), col, _mm512_set1_ps(m));
  }
  __m512 x = _mm512_fmadd_ps(_mm512_cvtepi32_ps(count), slope, offset);
  const bool partial = j + 16 > rows.unmasked_end;  // causal diagonal or the end of the keys
  __mmask16 valid = 0xffff;
  if (partial) {
    const __m512i key_index = _mm512_add_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                               _mm512_set1_epi32(int(j)));
    valid = _mm512_cmplt_epi32_mask(key_index, _mm512_set1_epi32(rows.key_limit[r]));
  }
  // Masked load: a caller's bias row ends at Nk, not at the padded block end.
  if constexpr (kBias) x = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(valid, rows.bias[r] + j), _mm512_set1_ps(kLog2e), x);
  if (partial) x = _mm512_mask_mov_ps(_mm512_set1_ps(kNegInf), valid, x);
  *may_be_neg_inf = kBias || partial;
  return x;
}

}  // namespace
}  // namespace binformer::cpu::detail
