// AVX-512 pack_sign and sign_matmul.
//
// Popcounts use 32-bit lanes (VPOPCNTD): one instruction counts 512 bits whichever lane width
// is used, and dword lanes give one int32 result per lane directly, with no qword padding for
// odd word counts and no repacking of qword counts into the int32 output.
#include "avx512_common.h"

namespace binformer::cpu::detail {
namespace {

// bit = !(x < 0): "not less than" with an unordered predicate, so NaN gives 1.
inline uint32_t sign_bits16(const void* src, DType dtype, int count) {
  const __mmask16 lanes = first_lanes16(count);
  const __m512 x = load16_as_float(src, dtype, lanes);
  return _mm512_mask_cmp_ps_mask(lanes, x, _mm512_setzero_ps(), _CMP_NLT_UQ);
}

// Micro-kernel of sign_matmul: kRows rows of a against 16 * kVecs rows of b (one b-panel).
// b_panel is [words][16 * kVecs] (16 consecutive b rows per vector, word-major).
template <int kRows, int kVecs>
inline void matmul_tile(const uint32_t* const* a_rows, const uint32_t* b_panel, int words, int d,
                        int32_t* const* out_rows, int valid_cols) {
  __m512i count[kRows][kVecs];
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < kVecs; ++v) count[r][v] = _mm512_setzero_si512();
  for (int w = 0; w < words; ++w) {
    __m512i b[kVecs];
    for (int v = 0; v < kVecs; ++v) b[v] = _mm512_load_si512(b_panel + (w * kVecs + v) * 16);
    for (int r = 0; r < kRows; ++r) {
      const __m512i a = _mm512_set1_epi32(int(a_rows[r][w]));
      for (int v = 0; v < kVecs; ++v)
        count[r][v] = _mm512_add_epi32(count[r][v], _mm512_popcnt_epi32(_mm512_xor_si512(a, b[v])));
    }
  }
  const __m512i dvec = _mm512_set1_epi32(d);
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < kVecs; ++v) {
      const __m512i dot = _mm512_sub_epi32(dvec, _mm512_slli_epi32(count[r][v], 1));
      const int cols = valid_cols - 16 * v;
      if (cols >= 16) {
        _mm512_storeu_si512(out_rows[r] + 16 * v, dot);
      } else if (cols > 0) {
        _mm512_mask_storeu_epi32(out_rows[r] + 16 * v, first_lanes16(cols), dot);
      }
    }
}

}  // namespace

void pack_sign_avx512(const PackSignParams& p) {
  const int words = words_for(p.d);
  const size_t esize = dtype_size(p.dtype);
  parallel_for(p.rows, 256, [&](int64_t row_begin, int64_t row_end) {
    for (int64_t r = row_begin; r < row_end; ++r) {
      const char* x = static_cast<const char*>(p.x) + size_t(r) * p.d * esize;
      uint32_t* out = p.out + r * words;
      for (int w = 0; w < words; ++w) {
        const int c0 = 32 * w;
        const uint32_t lo = sign_bits16(x + c0 * esize, p.dtype, p.d - c0);
        const uint32_t hi = p.d - c0 > 16 ? sign_bits16(x + (c0 + 16) * esize, p.dtype, p.d - c0 - 16) : 0u;
        out[w] = lo | (hi << 16);
      }
    }
  });
}

void sign_matmul_avx512(const SignMatmulParams& p) {
  constexpr int kRows = 4, kVecs = 4, kPanel = 16 * kVecs;
  const int words = words_for(p.d);
  if (p.batch <= 0 || p.M <= 0 || p.N <= 0) return;
  // Repack b into panels of 64 rows, word-major inside a panel, so that one aligned load gives
  // word w of 16 consecutive b rows. A broadcast b (stride 0) is repacked once.
  const int64_t b_slices = p.b_batch_stride == 0 ? 1 : p.batch;
  const int64_t panels = ceil_div(p.N, kPanel);
  const int64_t panel_words = int64_t(words) * kPanel;
  auto b_packed = make_aligned<uint32_t>(size_t(b_slices * panels * panel_words));
  parallel_for(b_slices * panels, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slice = t / panels, panel = t % panels;
      const uint32_t* b = p.b + slice * p.b_batch_stride;
      uint32_t* dst = b_packed.get() + t * panel_words;
      for (int w = 0; w < words; ++w)
        for (int col = 0; col < kPanel; ++col) {
          const int64_t n = panel * kPanel + col;
          dst[w * kPanel + col] = n < p.N ? b[n * words + w] : 0u;
        }
    }
  });

  const int64_t row_blocks = ceil_div(p.M, kRows);
  parallel_for(p.batch * row_blocks, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t batch = t / row_blocks, m0 = (t % row_blocks) * kRows;
      const uint32_t* a = p.a + batch * p.a_batch_stride;
      const uint32_t* panel0 = b_packed.get() + (p.b_batch_stride == 0 ? 0 : batch) * panels * panel_words;
      const uint32_t* a_rows[kRows];
      int32_t* out_rows[kRows];
      const int rows = int(std::min<int64_t>(kRows, p.M - m0));
      for (int r = 0; r < kRows; ++r) {
        const int64_t m = m0 + std::min(r, rows - 1);  // surplus rows recompute the last one
        a_rows[r] = a + m * words;
        out_rows[r] = p.out + (batch * p.M + m) * p.N;
      }
      for (int64_t panel = 0; panel < panels; ++panel) {
        const int valid = int(std::min<int64_t>(kPanel, p.N - panel * kPanel));
        int32_t* outs[kRows];
        for (int r = 0; r < kRows; ++r) outs[r] = out_rows[r] + panel * kPanel;
        const uint32_t* b_panel = panel0 + panel * panel_words;
        switch (rows) {  // surplus rows would store duplicates of the last row: skip them
          case 4: matmul_tile<4, kVecs>(a_rows, b_panel, words, p.d, outs, valid); break;
          case 3: matmul_tile<3, kVecs>(a_rows, b_panel, words, p.d, outs, valid); break;
          case 2: matmul_tile<2, kVecs>(a_rows, b_panel, words, p.d, outs, valid); break;
          default: matmul_tile<1, kVecs>(a_rows, b_panel, words, p.d, outs, valid); break;
        }
      }
    }
  });
}

}  // namespace binformer::cpu::detail
