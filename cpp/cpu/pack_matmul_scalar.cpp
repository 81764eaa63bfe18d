// Portable pack_sign and sign_matmul.
#include "internal.h"

namespace binformer::cpu::detail {

void pack_sign_scalar(const PackSignParams& p) {
  const int words = words_for(p.d);
  parallel_for(p.rows, 256, [&](int64_t row_begin, int64_t row_end) {
    for (int64_t r = row_begin; r < row_end; ++r) {
      uint32_t* out = p.out + r * words;
      for (int w = 0; w < words; ++w) {
        uint32_t word = 0;
        const int c_end = std::min(p.d, 32 * w + 32);
        for (int c = 32 * w; c < c_end; ++c) {
          const float x = load_as_float(p.x, p.dtype, r * p.d + c);
          word |= uint32_t(!(x < 0.0f)) << (c % 32);  // NaN, +0, -0 -> 1
        }
        out[w] = word;
      }
    }
  });
}

void sign_matmul_scalar(const SignMatmulParams& p) {
  const int words = words_for(p.d);
  const int64_t rows = p.batch * p.M;
  parallel_for(rows, 16, [&](int64_t row_begin, int64_t row_end) {
    for (int64_t r = row_begin; r < row_end; ++r) {
      const int64_t b = r / p.M, m = r % p.M;
      const uint32_t* a_row = p.a + b * p.a_batch_stride + m * words;
      const uint32_t* b_rows = p.b + b * p.b_batch_stride;
      int32_t* out = p.out + r * p.N;
      for (int64_t n = 0; n < p.N; ++n) {
        const uint32_t* b_row = b_rows + n * words;
        int differing = 0;
        for (int w = 0; w < words; ++w) differing += __builtin_popcount(a_row[w] ^ b_row[w]);
        out[n] = p.d - 2 * differing;
      }
    }
  });
}

}  // namespace binformer::cpu::detail
