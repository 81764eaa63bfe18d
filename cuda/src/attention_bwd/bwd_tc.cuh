// attention_bwd on the tensor cores (sm80+, fp16 / bf16 v): one kernel template, two
// orientations.
//
// A CTA owns a block of "rows" and loops over tiles of "columns":
//   key-major   (kKeyMajor):  rows = keys j,    columns = queries i   (dV, dk_scale, dk_sign, ...)
//   query-major (!kKeyMajor): rows = queries i, columns = keys j      (dq_sign)
// Each warp owns 16 rows. For a column tile of kCols it computes the transposed or plain score
// tile (16 x kCols per warp) entirely in registers:
//   popcounts  = mma.m16n8k256 b1 AND.popc (row bits, held in registers; column bits, smem)
//   dot        = 4 popc + (d - 2 p(q)) - 2 p(k)           (exact, integer-valued floats)
//   P          = 2^(dot scale log2e a b + bias log2e - lse log2e)          (0 where masked)
//   dP         = X Y^T on mma.m16n8k16 (fp32 accumulation), X = the row side's matrix
//                (V for key-major, dO for query-major), Y = the column side's (dO or V)
//   dS         = P (dP - D)
// and then, depending on the pass:
//   main pass (key-major only): dV += P^T dO (P rounded to T, as FlashAttention does),
//       dk_scale_j += sum_i dS scale dot a_i (per-thread sums, one quad reduction at the end),
//       column sums of dS scale dot b_j (-> one partial dq_scale row per key block),
//       dbias tile stores, rel-pos partial table (shared memory, see bwd_common.cuh);
//   sign pass: acc += (dS * column scalar) sign(column bits) with the +-1 operand built in
//       registers straight from the packed bits (exact in fp16 / bf16), scaled by the row scalar
//       and `scale` at the end.
// Column tiles are double-buffered in shared memory with cp.async (16-byte rows of Y zero-filled
// past Dv and past the sequence, so partial tiles need no special case in the mma loops).
#pragma once
#include <type_traits>

#include "bwd_common.cuh"
#include "bwd_ptx.cuh"

namespace binformer::cuda::bwd::tc {

template <class T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// +-1 in T from sign bits (1 -> +1, 0 -> -1), two per register: flip the sign bit of -1.
template <class T>
struct MinusOne;
template <>
struct MinusOne<__half> { static constexpr uint32_t kBits = 0xBC00u; };
template <>
struct MinusOne<__nv_bfloat16> { static constexpr uint32_t kBits = 0xBF80u; };

template <class T>
__device__ __forceinline__ uint32_t sign_pair(uint32_t bit_lo, uint32_t bit_hi) {
  return (MinusOne<T>::kBits ^ (bit_lo << 15)) | ((MinusOne<T>::kBits ^ (bit_hi << 15)) << 16);
}

// ---------------------------------------------------------------- configuration
template <class T, int kHdim, bool kKeyMajor, bool kMainPass>
struct Traits {
  static_assert(kKeyMajor || !kMainPass, "the main pass is key-major");
  static_assert(kHdim % 32 == 0 && kHdim <= 256, "head-dim buckets are multiples of 32");
  static constexpr int kWarps = kMainPass ? 8 : 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kRows = 16 * kWarps;
  static_assert(!kMainPass || kRows == kKeyBlockTc, "main-pass key blocks fix the partial layout");
  // Column-tile width: as wide as the registers allow (the main pass holds dV, 16 x kHdim per warp).
  static constexpr int kCols = kMainPass ? tc_main_cols(kHdim) : (kHdim <= 128 ? 64 : 32);
  static constexpr int kStride = kHdim + 8;  // smem row stride of X / Y in T (16-byte skew)
  static constexpr bool kCacheX = kHdim <= 64;  // row-side mma fragments kept in registers
  static constexpr int kColTiles = kCols / 8;
  static constexpr int kColSteps = kCols / 16;
  static constexpr int kDvTiles = kHdim / 8;
  static constexpr int kDvSteps = kHdim / 16;
  static constexpr int kDWords = kHdim / 32;
  static constexpr int kBitsStride = 8;  // words per row of column bits in smem (d <= 256)

  // Shared memory layout, in bytes.
  static constexpr size_t kXBytes = size_t(kRows) * kStride * sizeof(T);
  static constexpr size_t kYBytes = size_t(kCols) * kStride * sizeof(T);
  static constexpr size_t kBitsBytes = size_t(kCols) * kBitsStride * 4;
  static constexpr size_t kRecBytes = size_t(kCols) * 16;
  static constexpr size_t kOffY = kXBytes;
  static constexpr size_t kOffBits = kOffY + 2 * kYBytes;
  static constexpr size_t kOffRec = kOffBits + 2 * kBitsBytes;
  static constexpr size_t kOffColSum = kOffRec + 2 * kRecBytes;
  static constexpr size_t kColSumBytes = kMainPass ? 2 * size_t(kWarps) * kCols * 4 : 0;  // 2 tiles
  static constexpr size_t kOffDS = kOffColSum + kColSumBytes;
  static constexpr int kDSStride = kCols + 1;
  static constexpr size_t kDSBytes = size_t(kRows) * kDSStride * 4;  // main pass with drel only
  static constexpr size_t kOffTable = kOffDS + kDSBytes;

  static size_t smem_bytes(bool with_rel_pos, int table_size) {
    return with_rel_pos ? kOffTable + size_t(table_size) * 4 : kOffDS;
  }
};

// ---------------------------------------------------------------- the kernel
template <class T, int kHdim, bool kKeyMajor, bool kMainPass>
__global__ void __launch_bounds__(Traits<T, kHdim, kKeyMajor, kMainPass>::kThreads)
attention_bwd_tc_kernel(const BwdArgs a) {
  using Tr = Traits<T, kHdim, kKeyMajor, kMainPass>;
  BINFORMER_BWD_DYNAMIC_SMEM(unsigned char, smem);
  T* x_smem = reinterpret_cast<T*>(smem);
  T* y_smem = reinterpret_cast<T*>(smem + Tr::kOffY);
  uint32_t* bits_smem = reinterpret_cast<uint32_t*>(smem + Tr::kOffBits);
  float4* rec_smem = reinterpret_cast<float4*>(smem + Tr::kOffRec);
  float* colsum_smem = reinterpret_cast<float*>(smem + Tr::kOffColSum);
  float* ds_smem = reinterpret_cast<float*>(smem + Tr::kOffDS);
  float* table_smem = reinterpret_cast<float*>(smem + Tr::kOffTable);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;  // mma fragment coordinates
  const int64_t n_rows = kKeyMajor ? a.Nk : a.Nq, n_cols = kKeyMajor ? a.Nq : a.Nk;
  // Flat grid, row blocks of one head adjacent (they share the column stream in L2).
  const int64_t row_blocks = (n_rows + Tr::kRows - 1) / Tr::kRows;
  const int64_t bh = int64_t(blockIdx.x) / row_blocks, row_block = int64_t(blockIdx.x) - bh * row_blocks;
  const int64_t b = bh / a.H, h = bh - b * a.H;
  const int64_t row0 = row_block * Tr::kRows;
  const int dv = a.dv_dim, d = a.d, words = a.words;

  // Row side: bits, matrix X (V or dO) and records; column side: bits, matrix Y, records.
  const uint32_t* row_bits = kKeyMajor ? a.k_bits + b * a.k_stride[0] + h * a.k_stride[1]
                                       : a.q_bits + b * a.q_stride[0] + h * a.q_stride[1];
  const int64_t row_bits_stride = kKeyMajor ? a.k_stride[2] : a.q_stride[2];
  const uint32_t* col_bits = kKeyMajor ? a.q_bits + b * a.q_stride[0] + h * a.q_stride[1]
                                       : a.k_bits + b * a.k_stride[0] + h * a.k_stride[1];
  const int64_t col_bits_stride = kKeyMajor ? a.q_stride[2] : a.k_stride[2];
  const T* x_gmem = kKeyMajor ? static_cast<const T*>(a.v) + b * a.v_stride[0] + h * a.v_stride[1]
                              : static_cast<const T*>(a.dout) + b * a.dout_stride[0] + h * a.dout_stride[1];
  const int64_t x_stride = kKeyMajor ? a.v_stride[2] : a.dout_stride[2];
  const T* y_gmem = kKeyMajor ? static_cast<const T*>(a.dout) + b * a.dout_stride[0] + h * a.dout_stride[1]
                              : static_cast<const T*>(a.v) + b * a.v_stride[0] + h * a.v_stride[1];
  const int64_t y_stride = kKeyMajor ? a.dout_stride[2] : a.v_stride[2];
  const float4* row_rec = kKeyMajor ? a.krec + bh * a.Nk : a.qrec + bh * a.Nq;
  const float4* col_rec = kKeyMajor ? a.qrec + bh * a.Nq : a.krec + bh * a.Nk;
  const BiasReader bias = make_bias_reader(a, h);
  const bool has_bias = a.bias != nullptr || a.rel_pos_table != nullptr;
  const float scale_log2e = a.scale * kLog2e;

  // Column-tile range (causal: key j is masked for query i when j > i).
  int64_t tile_begin = 0, tile_end;
  if (kKeyMajor) {
    tile_begin = a.causal ? row0 / Tr::kCols : 0;  // = first_query_tile(causal, row_block, kRows, kCols)
    tile_end = (a.Nq + Tr::kCols - 1) / Tr::kCols;
  } else {
    const int64_t last_key = a.causal ? min(a.Nk, row0 + Tr::kRows) : a.Nk;
    tile_end = (last_key + Tr::kCols - 1) / Tr::kCols;
  }

  // ---- issue the row-side X block and the first column tile
  constexpr int kChunks = kHdim / 8;  // 16-byte chunks per row of X / Y
  for (int e = tid; e < Tr::kRows * kChunks; e += Tr::kThreads) {
    const int r = e / kChunks, ch = (e - r * kChunks) * 8;
    const bool ok = row0 + r < n_rows && ch < dv;
    cp_async_16(x_smem + r * Tr::kStride + ch, ok ? x_gmem + (row0 + r) * x_stride + ch : x_gmem, ok);
  }
  auto load_tile = [&](int64_t tile, int buf) {
    const int64_t c0 = tile * Tr::kCols;
    T* ys = y_smem + buf * (Tr::kCols * Tr::kStride);
    for (int e = tid; e < Tr::kCols * kChunks; e += Tr::kThreads) {
      const int c = e / kChunks, ch = (e - c * kChunks) * 8;
      const bool ok = c0 + c < n_cols && ch < dv;
      cp_async_16(ys + c * Tr::kStride + ch, ok ? y_gmem + (c0 + c) * y_stride + ch : y_gmem, ok);
    }
    uint32_t* bs = bits_smem + buf * (Tr::kCols * Tr::kBitsStride);
    for (int e = tid; e < Tr::kCols * Tr::kBitsStride; e += Tr::kThreads) {
      const int c = e / Tr::kBitsStride, w = e - c * Tr::kBitsStride;
      const bool ok = c0 + c < n_cols && w < words;
      cp_async_4(bs + e, ok ? col_bits + (c0 + c) * col_bits_stride + w : col_bits, ok);
    }
    float4* rs = rec_smem + buf * Tr::kCols;
    for (int e = tid; e < Tr::kCols; e += Tr::kThreads) {
      const bool ok = c0 + e < n_cols;
      cp_async_16(rs + e, ok ? col_rec + c0 + e : col_rec, ok);
    }
    cp_async_commit();
  };
  if (tile_begin < tile_end) load_tile(tile_begin, 0);
  else cp_async_commit();

  // ---- row state (registers): bits as the b1 A fragment, records of rows g and g + 8
  const int64_t my_row[2] = {row0 + warp * 16 + g, row0 + warp * 16 + g + 8};
  uint32_t abits[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int64_t r = my_row[k & 1];
    const int w = t + (k >> 1) * 4;
    abits[k] = (r < n_rows && w < words) ? __ldg(row_bits + r * row_bits_stride + w) : 0u;
  }
  // Key-major rows: {b, -2 p(k)}; query-major rows: {lse2, D, a, d - 2 p(q)}.
  float row_corr[2], row_factor[2], row_lse2[2], row_D[2], row_scalar[2];
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const bool ok = my_row[k] < n_rows;
    const float4 rec = ok ? row_rec[my_row[k]] : make_float4(0.f, 0.f, 0.f, 0.f);
    if (kKeyMajor) {
      row_scalar[k] = rec.x;                 // b_j
      row_factor[k] = rec.x * scale_log2e;   // b_j scale log2e
      row_corr[k] = rec.y;                   // -2 p(k_j)
      row_lse2[k] = 0.f;
      row_D[k] = 0.f;
    } else {
      row_lse2[k] = ok ? rec.x : __int_as_float(0x7f800000);  // +inf: P = 0 on padding rows
      row_D[k] = rec.y;
      row_scalar[k] = rec.z;                 // a_i
      row_factor[k] = rec.z * scale_log2e;
      row_corr[k] = rec.w;                   // d - 2 p(q_i)
    }
  }

  // ---- accumulators
  constexpr int kAccTiles = kMainPass ? Tr::kDvTiles : Tr::kDWords * 4;
  float acc[kAccTiles][4];
#pragma unroll
  for (int i = 0; i < kAccTiles; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  float row_sum[2] = {0.f, 0.f};  // main pass: dk_scale

  if (kMainPass) {
    if (a.drel) {
      for (int e = tid; e < a.rel_table_size; e += Tr::kThreads) table_smem[e] = 0.f;
    }
    // Causal: dbias entries of the query rows this block skips are zero (fully masked).
    if (a.dbias && a.causal) {
      const int64_t skipped = min(tile_begin * Tr::kCols, a.Nq);
      const int64_t keys = min(int64_t(Tr::kRows), a.Nk - row0);
      for (int64_t e = tid; e < skipped * keys; e += Tr::kThreads) {
        const int64_t i = e / keys, j = row0 + (e - (e / keys) * keys);
        a.dbias[(bh * a.Nq + i) * a.Nk + j] = 0.f;
      }
    }
  }

  // Partial dq_scale of one query tile: the sum over this CTA's keys, warps in a fixed order.
  auto flush_column_sums = [&](int64_t tile, int buf) {
    const int64_t i = tile * Tr::kCols + tid;
    if (tid < Tr::kCols && i < a.Nq) {
      const float* cs = colsum_smem + buf * (Tr::kWarps * Tr::kCols);
      float s = 0.f;
#pragma unroll
      for (int w = 0; w < Tr::kWarps; ++w) s += cs[w * Tr::kCols + tid];
      a.dq_scale_partial[(bh * a.num_key_blocks + row_block) * a.Nq + i] = s;
    }
  };

  cp_async_wait_all();
  __syncthreads();
  uint32_t xfrag[Tr::kCacheX ? Tr::kDvSteps : 1][4];
  const T* x_warp = x_smem + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * Tr::kStride + (lane >> 4) * 8;
  if constexpr (Tr::kCacheX) {
#pragma unroll
    for (int ks = 0; ks < Tr::kDvSteps; ++ks) ldmatrix_x4(xfrag[ks], x_warp + ks * 16);
  }

  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int buf = int((tile - tile_begin) & 1);
    cp_async_wait_all();
    __syncthreads();
    if (tile + 1 < tile_end) load_tile(tile + 1, buf ^ 1);
    if constexpr (kMainPass) {
      // The previous tile's dq_scale column sums are complete (barrier above): reduce them
      // over the warps here instead of paying a barrier of their own.
      if (a.dq_scale && tile > tile_begin) flush_column_sums(tile - 1, buf ^ 1);
    }
    const int64_t c0 = tile * Tr::kCols;
    const T* ys = y_smem + buf * (Tr::kCols * Tr::kStride);
    const uint32_t* bs = bits_smem + buf * (Tr::kCols * Tr::kBitsStride);
    const float4* rs = rec_smem + buf * Tr::kCols;

    // ---- scores: popcount(row & col) per element, as floats with the +-1 correction
    float s_dot[Tr::kColTiles][4];
#pragma unroll
    for (int nt = 0; nt < Tr::kColTiles; ++nt) {
      int pc[4] = {0, 0, 0, 0};
      const uint32_t* cb = bs + (nt * 8 + g) * Tr::kBitsStride + t;
      mma_b1_and_popc(pc, abits, cb[0], cb[4]);
#pragma unroll
      for (int e = 0; e < 4; ++e) s_dot[nt][e] = small_int_to_float(pc[e]);
    }

    // ---- P (registers). Interior tiles (every element in range and unmasked: most tiles of a
    // long sequence) skip the per-element index tests.
    float s_p[Tr::kColTiles][4];
    // Both flags are compile-time so that the common case (no bias, interior tile) is
    // straight-line code: a runtime `if (has_bias)` per element splits the unrolled tile into
    // one basic block per element and serialises the exp chains (v1's main cost).
    auto compute_p = [&](auto check_bounds, auto with_bias) {
      constexpr bool kCheck = decltype(check_bounds)::value;
      constexpr bool kBias = decltype(with_bias)::value;
#pragma unroll
      for (int nt = 0; nt < Tr::kColTiles; ++nt) {
#pragma unroll
        for (int cs = 0; cs < 2; ++cs) {
          const int c = nt * 8 + 2 * t + cs;
          const float4 rec = rs[c];
          const int64_t col = c0 + c;
          // Key-major columns: {lse2, D, a, d - 2 p(q)}; query-major columns: {b, -2 p(k)}.
          const float col_corr = kKeyMajor ? rec.w : rec.y;
          const float col_factor = kKeyMajor ? rec.z : rec.x;
#pragma unroll
          for (int rs2 = 0; rs2 < 2; ++rs2) {
            const int e = rs2 * 2 + cs;
            const int64_t i = kKeyMajor ? col : my_row[rs2];
            const int64_t j = kKeyMajor ? my_row[rs2] : col;
            const bool valid = !kCheck || (i < a.Nq && j < a.Nk && !(a.causal && j > i));
            const float dot = fmaf(4.f, s_dot[nt][e], row_corr[rs2] + col_corr);
            s_dot[nt][e] = dot;
            const float lse2 = kKeyMajor ? rec.x : row_lse2[rs2];
            float offset = -lse2;
            if (kBias && valid) offset += bias(b, h, i, j);
            s_p[nt][e] = valid ? ex2_approx(fmaf(dot, row_factor[rs2] * col_factor, offset)) : 0.f;
          }
        }
      }
    };
    {
      const int64_t q_lo = kKeyMajor ? c0 : row0, q_hi = q_lo + (kKeyMajor ? Tr::kCols : Tr::kRows);
      const int64_t k_lo = kKeyMajor ? row0 : c0, k_hi = k_lo + (kKeyMajor ? Tr::kRows : Tr::kCols);
      const bool interior = q_hi <= a.Nq && k_hi <= a.Nk && !(a.causal && k_hi - 1 > q_lo);
      if (has_bias) {
        if (interior) compute_p(std::false_type{}, std::true_type{});
        else compute_p(std::true_type{}, std::true_type{});
      } else {
        if (interior) compute_p(std::false_type{}, std::false_type{});
        else compute_p(std::true_type{}, std::false_type{});
      }
    }

    // ---- dP = X Y^T (16 rows x kCols per warp, k = channels)
    float s_dp[Tr::kColTiles][4];
#pragma unroll
    for (int nt = 0; nt < Tr::kColTiles; ++nt) s_dp[nt][0] = s_dp[nt][1] = s_dp[nt][2] = s_dp[nt][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < Tr::kDvSteps; ++ks) {
      if (ks * 16 >= dv) break;
      uint32_t xa[4];
      if constexpr (Tr::kCacheX) {
        xa[0] = xfrag[ks][0]; xa[1] = xfrag[ks][1]; xa[2] = xfrag[ks][2]; xa[3] = xfrag[ks][3];
      } else {
        ldmatrix_x4(xa, x_warp + ks * 16);
      }
#pragma unroll
      for (int np = 0; np < Tr::kColTiles / 2; ++np) {
        uint32_t yb[4];
        ldmatrix_x4(yb, ys + (np * 16 + (lane >> 4) * 8 + (lane & 7)) * Tr::kStride + ks * 16 +
                            ((lane >> 3) & 1) * 8);
        mma_16816<T>(s_dp[2 * np], xa, yb[0], yb[1]);
        mma_16816<T>(s_dp[2 * np + 1], xa, yb[2], yb[3]);
      }
    }

    if constexpr (kMainPass) {
      // ---- dS and everything that is a sum of dS (first: s_dot and s_dp die here)
#pragma unroll
      for (int nt = 0; nt < Tr::kColTiles; ++nt) {
#pragma unroll
        for (int cs = 0; cs < 2; ++cs) {
          const int c = nt * 8 + 2 * t + cs;
          const float4 rec = rs[c];  // {lse2, D, a_i, corr}
          const int64_t i = c0 + c;
          float part = 0.f;
#pragma unroll
          for (int rs2 = 0; rs2 < 2; ++rs2) {
            const int e = rs2 * 2 + cs;
            const float ds = s_p[nt][e] * (s_dp[nt][e] - rec.y);
            const float tv = ds * s_dot[nt][e] * a.scale;
            row_sum[rs2] = fmaf(tv, rec.z, row_sum[rs2]);
            part = fmaf(tv, row_scalar[rs2], part);
            const int64_t j = my_row[rs2];
            if (a.dbias && i < a.Nq && j < a.Nk) a.dbias[(bh * a.Nq + i) * a.Nk + j] = ds;
            if (a.drel) ds_smem[(warp * 16 + g + 8 * rs2) * Tr::kDSStride + c] = ds;
          }
          if (a.dq_scale) {  // column sum over the warp's 16 keys (fixed xor tree)
            part += __shfl_xor_sync(0xffffffffu, part, 4);
            part += __shfl_xor_sync(0xffffffffu, part, 8);
            part += __shfl_xor_sync(0xffffffffu, part, 16);
            if (g == 0) colsum_smem[(buf * Tr::kWarps + warp) * Tr::kCols + c] = part;
          }
        }
      }
      // ---- dV += P^T dO (A = P from registers, B = dO tile through ldmatrix.trans)
      if (a.dv) {
#pragma unroll
        for (int kc = 0; kc < Tr::kColSteps; ++kc) {
          const uint32_t pa[4] = {pack2<T>(s_p[2 * kc][0], s_p[2 * kc][1]),
                                  pack2<T>(s_p[2 * kc][2], s_p[2 * kc][3]),
                                  pack2<T>(s_p[2 * kc + 1][0], s_p[2 * kc + 1][1]),
                                  pack2<T>(s_p[2 * kc + 1][2], s_p[2 * kc + 1][3])};
#pragma unroll
          for (int dp = 0; dp < Tr::kDvTiles / 2; ++dp) {
            if (dp * 16 >= dv) break;
            uint32_t yb[4];
            ldmatrix_x4_trans(yb, ys + (kc * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * Tr::kStride +
                                      dp * 16 + (lane >> 4) * 8);
            mma_16816<T>(acc[2 * dp], pa, yb[0], yb[1]);
            mma_16816<T>(acc[2 * dp + 1], pa, yb[2], yb[3]);
          }
        }
      }
      if (a.drel) {
        __syncthreads();
        accumulate_rel_pos_tile(ds_smem, Tr::kDSStride, Tr::kRows, Tr::kCols, c0, row0, a.Nq, a.Nk,
                                make_rel_pos_geometry(a), table_smem);
      }
    } else {
      // ---- sign pass: acc += (dS * column scalar) sign(column bits)
      float s_u[Tr::kColTiles][4];
#pragma unroll
      for (int nt = 0; nt < Tr::kColTiles; ++nt) {
#pragma unroll
        for (int cs = 0; cs < 2; ++cs) {
          const float4 rec = rs[nt * 8 + 2 * t + cs];
          const float col_scalar = kKeyMajor ? rec.z : rec.x;  // a_i or b_j
#pragma unroll
          for (int rs2 = 0; rs2 < 2; ++rs2) {
            const int e = rs2 * 2 + cs;
            const float D = kKeyMajor ? rec.y : row_D[rs2];
            s_u[nt][e] = s_p[nt][e] * (s_dp[nt][e] - D) * col_scalar;
          }
        }
      }
#pragma unroll
      for (int kc = 0; kc < Tr::kColSteps; ++kc) {
        const uint32_t ua[4] = {pack2<T>(s_u[2 * kc][0], s_u[2 * kc][1]),
                                pack2<T>(s_u[2 * kc][2], s_u[2 * kc][3]),
                                pack2<T>(s_u[2 * kc + 1][0], s_u[2 * kc + 1][1]),
                                pack2<T>(s_u[2 * kc + 1][2], s_u[2 * kc + 1][3])};
        const uint32_t* cb = bs + (kc * 16 + 2 * t) * Tr::kBitsStride;
#pragma unroll
        for (int w = 0; w < Tr::kDWords; ++w) {
          if (w * 32 >= d) break;
          const uint32_t w0 = cb[w], w1 = cb[Tr::kBitsStride + w];
          const uint32_t w8 = cb[8 * Tr::kBitsStride + w], w9 = cb[9 * Tr::kBitsStride + w];
#pragma unroll
          for (int nd = 0; nd < 4; ++nd) {
            if ((w * 4 + nd) * 8 >= d) break;
            const int pos = nd * 8 + g;
            const uint32_t b0 = sign_pair<T>((w0 >> pos) & 1u, (w1 >> pos) & 1u);
            const uint32_t b1 = sign_pair<T>((w8 >> pos) & 1u, (w9 >> pos) & 1u);
            mma_16816<T>(acc[w * 4 + nd], ua, b0, b1);
          }
        }
      }
    }
  }

  // ---- epilogue
  if constexpr (kMainPass) {
    if (a.dq_scale && tile_begin < tile_end) {
      __syncthreads();
      flush_column_sums(tile_end - 1, int((tile_end - 1 - tile_begin) & 1));
    }
    if (a.dv) {
#pragma unroll
      for (int dt = 0; dt < Tr::kDvTiles; ++dt) {
        const int ch = dt * 8 + 2 * t;
        if (ch >= dv) break;
#pragma unroll
        for (int rs2 = 0; rs2 < 2; ++rs2) {
          const int64_t j = my_row[rs2];
          if (j < a.Nk) {
            *reinterpret_cast<float2*>(a.dv + (bh * a.Nk + j) * dv + ch) =
                make_float2(acc[dt][rs2 * 2], acc[dt][rs2 * 2 + 1]);
          }
        }
      }
    }
    if (a.dk_scale) {
#pragma unroll
      for (int rs2 = 0; rs2 < 2; ++rs2) {
        float v = row_sum[rs2];
        v += __shfl_xor_sync(0xffffffffu, v, 1);
        v += __shfl_xor_sync(0xffffffffu, v, 2);
        if (t == 0 && my_row[rs2] < a.Nk) a.dk_scale[bh * a.Nk + my_row[rs2]] = v;
      }
    }
    if (a.drel) {
      __syncthreads();
      float* dst = a.drel_partial + (bh * a.num_key_blocks + row_block) * int64_t(a.rel_table_size);
      for (int e = tid; e < a.rel_table_size; e += Tr::kThreads) dst[e] = table_smem[e];
    }
  } else {
    float* out = kKeyMajor ? a.dk_sign : a.dq_sign;
#pragma unroll
    for (int dt = 0; dt < Tr::kDWords * 4; ++dt) {
      const int dim = dt * 8 + 2 * t;
      if (dim >= d) break;
#pragma unroll
      for (int rs2 = 0; rs2 < 2; ++rs2) {
        const int64_t r = my_row[rs2];
        if (r < n_rows) {
          const float f = row_scalar[rs2] * a.scale;
          *reinterpret_cast<float2*>(out + (bh * n_rows + r) * d + dim) =
              make_float2(acc[dt][rs2 * 2] * f, acc[dt][rs2 * 2 + 1] * f);
        }
      }
    }
  }
}

}  // namespace binformer::cuda::bwd::tc

#include "bwd_main.cuh"  // the v2 main pass (uses pack2 above)

// ---------------------------------------------------------------- host side
#if !defined(BINFORMER_BWD_HOST_EMULATION)
namespace binformer::cuda::bwd::tc {

template <class T, int kHdim, bool kKeyMajor, bool kMainPass>
cudaError_t launch_pass(const BwdArgs& a, cudaStream_t stream) {
  using Tr = Traits<T, kHdim, kKeyMajor, kMainPass>;
  const int64_t n_rows = kKeyMajor ? a.Nk : a.Nq;
  const int64_t blocks = (n_rows + Tr::kRows - 1) / Tr::kRows * a.B * a.H;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const size_t smem = Tr::smem_bytes(kMainPass && a.drel != nullptr, a.rel_table_size);
  auto kernel = attention_bwd_tc_kernel<T, kHdim, kKeyMajor, kMainPass>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return err;
  kernel<<<unsigned(blocks), Tr::kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace binformer::cuda::bwd::tc

namespace binformer::cuda::bwd {

// Runs the tensor-core passes that the wanted outputs need (prep and finalize are the caller's).
template <class T, int kHdim>
cudaError_t run_attention_bwd_tc(const BwdArgs& a, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  if (a.dv || a.dq_scale || a.dk_scale || a.dbias || a.drel) {
    if constexpr (kHdim <= 128) {
      err = a.main_v2 ? tc::launch_main_v2<T, kHdim>(a, stream) : tc::launch_pass<T, kHdim, true, true>(a, stream);
    } else {
      err = tc::launch_pass<T, kHdim, true, true>(a, stream);
    }
    if (err != cudaSuccess) return err;
  }
  if (a.dk_sign) {
    err = tc::launch_pass<T, kHdim, true, false>(a, stream);
    if (err != cudaSuccess) return err;
  }
  if (a.dq_sign) err = tc::launch_pass<T, kHdim, false, false>(a, stream);
  return err;
}

#define BINFORMER_INSTANTIATE_ATTENTION_BWD_TC(T, HDIM) \
  template cudaError_t run_attention_bwd_tc<T, HDIM>(const BwdArgs&, cudaStream_t);

}  // namespace binformer::cuda::bwd
#endif  // !BINFORMER_BWD_HOST_EMULATION
