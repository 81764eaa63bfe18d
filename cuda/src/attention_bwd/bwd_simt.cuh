// attention_bwd on the CUDA cores: the path for fp32 v (and for fp16 / bf16 tensors whose
// pointers or strides break the 16-byte alignment the tensor-core path copies with).
//
// Same passes and the same workspace records as the tensor-core path (bwd_common.cuh), with
// everything in fp32 and a plain structure: a CTA of 256 threads owns 32 rows (keys for the
// key-major passes, queries for the query-major pass) and loops over tiles of 32 columns.
//   phase 1: the column tile (Y, bits, records) goes to shared memory as fp32;
//   phase 2: each thread computes 4 score elements (popcounts over the words, P, dP = X_r . Y_c,
//            dS) into shared tiles;
//   phase 3: each thread owns (row, channel) pairs of the row-side accumulators and adds the
//            tile's contribution in column order; row and column sums of the tile are done by one
//            thread per row / column in a fixed order.
// All sums are in a fixed order: bitwise reproducible. d, Dv <= 256 at run time.
#pragma once
#include "bwd_common.cuh"

namespace binformer::cuda::bwd::simt {

constexpr int kThreads = 256;
constexpr int kRows = kKeyBlockSimt;  // 32
constexpr int kCols = 32;
static_assert(kCols == kKeyBlockSimt, "bwd_host.h sets main_cols = kKeyBlockSimt for this pass");
constexpr int kTileStride = kCols + 1;
constexpr int kBitsStride = 9;      // words per bits row in smem (8 + 1 against bank conflicts)
constexpr int kMaxPerThread = 32;   // 32 rows x 256 channels / 256 threads

struct SimtSmem {
  // Offsets in floats from the dynamic shared-memory base.
  int x, y, row_bits, col_bits, col_rec, p, u, tv, table, total;
  __host__ __device__ static SimtSmem make(int dv, bool with_table, int table_size) {
    SimtSmem s;
    const int xs = dv + 1;  // padded rows: thread c reads Y[c][ch] with c along the warp
    s.x = 0;
    s.y = s.x + kRows * xs;
    s.row_bits = s.y + kCols * xs;
    s.col_bits = s.row_bits + kRows * kBitsStride;
    s.col_rec = (s.col_bits + kCols * kBitsStride + 3) / 4 * 4;
    s.p = s.col_rec + kCols * 4;
    s.u = s.p + kRows * kTileStride;
    s.tv = s.u + kRows * kTileStride;
    s.table = s.tv + kRows * kTileStride;
    s.total = s.table + (with_table ? table_size : 0);
    return s;
  }
};

template <class TIn>
__device__ __forceinline__ float load_elem(const void* p, int64_t offset) {
  return to_float<TIn>(static_cast<const TIn*>(p)[offset]);
}

template <class TIn, bool kKeyMajor, bool kMainPass>
__global__ void __launch_bounds__(kThreads) attention_bwd_simt_kernel(const BwdArgs a) {
  BINFORMER_BWD_DYNAMIC_SMEM(float, sm);
  const int dv = a.dv_dim, d = a.d, words = a.words;
  const SimtSmem L = SimtSmem::make(dv, kMainPass && a.drel != nullptr, a.rel_table_size);
  const int xs = dv + 1;
  float* x_s = sm + L.x;
  float* y_s = sm + L.y;
  uint32_t* row_bits_s = reinterpret_cast<uint32_t*>(sm + L.row_bits);
  uint32_t* col_bits_s = reinterpret_cast<uint32_t*>(sm + L.col_bits);
  float4* col_rec_s = reinterpret_cast<float4*>(sm + L.col_rec);
  float* p_s = sm + L.p;    // P
  float* u_s = sm + L.u;    // main: dS; sign pass: dS * column scalar
  float* tv_s = sm + L.tv;  // main: dS dot scale
  float* table_s = sm + L.table;

  const int tid = threadIdx.x;
  const int64_t n_rows = kKeyMajor ? a.Nk : a.Nq, n_cols = kKeyMajor ? a.Nq : a.Nk;
  const int64_t row_blocks = (n_rows + kRows - 1) / kRows;
  const int64_t bh = int64_t(blockIdx.x) / row_blocks, row_block = int64_t(blockIdx.x) - bh * row_blocks;
  const int64_t b = bh / a.H, h = bh - b * a.H;
  const int64_t row0 = row_block * kRows;

  const uint32_t* row_bits = kKeyMajor ? a.k_bits + b * a.k_stride[0] + h * a.k_stride[1]
                                       : a.q_bits + b * a.q_stride[0] + h * a.q_stride[1];
  const int64_t row_bits_stride = kKeyMajor ? a.k_stride[2] : a.q_stride[2];
  const uint32_t* col_bits = kKeyMajor ? a.q_bits + b * a.q_stride[0] + h * a.q_stride[1]
                                       : a.k_bits + b * a.k_stride[0] + h * a.k_stride[1];
  const int64_t col_bits_stride = kKeyMajor ? a.q_stride[2] : a.k_stride[2];
  const void* x_g = kKeyMajor ? a.v : a.dout;
  const int64_t x_off = kKeyMajor ? b * a.v_stride[0] + h * a.v_stride[1] : b * a.dout_stride[0] + h * a.dout_stride[1];
  const int64_t x_stride = kKeyMajor ? a.v_stride[2] : a.dout_stride[2];
  const void* y_g = kKeyMajor ? a.dout : a.v;
  const int64_t y_off = kKeyMajor ? b * a.dout_stride[0] + h * a.dout_stride[1] : b * a.v_stride[0] + h * a.v_stride[1];
  const int64_t y_stride = kKeyMajor ? a.dout_stride[2] : a.v_stride[2];
  const float4* row_rec = kKeyMajor ? a.krec + bh * a.Nk : a.qrec + bh * a.Nq;
  const float4* col_rec = kKeyMajor ? a.qrec + bh * a.Nq : a.krec + bh * a.Nk;
  const BiasReader bias = make_bias_reader(a, h);
  const bool has_bias = a.bias != nullptr || a.rel_pos_table != nullptr;
  const float scale_log2e = a.scale * kLog2e;

  int64_t tile_begin = 0, tile_end;
  if (kKeyMajor) {
    tile_begin = first_query_tile(a.causal, row_block, kRows, kCols);
    tile_end = (a.Nq + kCols - 1) / kCols;
  } else {
    const int64_t last_key = a.causal ? min(a.Nk, row0 + kRows) : a.Nk;
    tile_end = (last_key + kCols - 1) / kCols;
  }

  // ---- row side into shared memory
  for (int e = tid; e < kRows * dv; e += kThreads) {
    const int r = e / dv, ch = e - r * dv;
    x_s[r * xs + ch] = row0 + r < n_rows ? load_elem<TIn>(x_g, x_off + (row0 + r) * x_stride + ch) : 0.f;
  }
  for (int e = tid; e < kRows * 8; e += kThreads) {
    const int r = e / 8, w = e - r * 8;
    row_bits_s[r * kBitsStride + w] = (row0 + r < n_rows && w < words) ? row_bits[(row0 + r) * row_bits_stride + w] : 0u;
  }
  if (kMainPass && a.drel) {
    for (int e = tid; e < a.rel_table_size; e += kThreads) table_s[e] = 0.f;
  }
  if (kMainPass && a.dbias && a.causal) {  // skipped (fully masked) query rows: dbias = 0
    const int64_t skipped = min(tile_begin * kCols, a.Nq);
    const int64_t keys = min(int64_t(kRows), a.Nk - row0);
    for (int64_t e = tid; e < skipped * keys; e += kThreads) {
      const int64_t i = e / keys, j = row0 + (e - i * keys);
      a.dbias[(bh * a.Nq + i) * a.Nk + j] = 0.f;
    }
  }

  // Accumulator ownership: thread -> row (tid / 8), channels / dims (tid % 8) + 8 k.
  const int acc_row = tid >> 3, acc_lane = tid & 7;
  float acc[kMaxPerThread];
#pragma unroll
  for (int k = 0; k < kMaxPerThread; ++k) acc[k] = 0.f;
  float row_sum = 0.f;  // main pass, threads < kRows: dk_scale of row tid

  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t c0 = tile * kCols;
    __syncthreads();  // previous tile fully consumed
    // ---- phase 1: column tile
    for (int e = tid; e < kCols * dv; e += kThreads) {
      const int c = e / dv, ch = e - c * dv;
      y_s[c * xs + ch] = c0 + c < n_cols ? load_elem<TIn>(y_g, y_off + (c0 + c) * y_stride + ch) : 0.f;
    }
    for (int e = tid; e < kCols * 8; e += kThreads) {
      const int c = e / 8, w = e - c * 8;
      col_bits_s[c * kBitsStride + w] = (c0 + c < n_cols && w < words) ? col_bits[(c0 + c) * col_bits_stride + w] : 0u;
    }
    if (tid < kCols) col_rec_s[tid] = c0 + tid < n_cols ? col_rec[c0 + tid] : make_float4(0.f, 0.f, 0.f, 0.f);
    __syncthreads();

    // ---- phase 2: score elements (row r, column c), c along the warp
#pragma unroll
    for (int k = 0; k < kRows * kCols / kThreads; ++k) {
      const int e = tid + k * kThreads;
      const int r = e / kCols, c = e - r * kCols;
      const int64_t row = row0 + r, col = c0 + c;
      const int64_t i = kKeyMajor ? col : row, j = kKeyMajor ? row : col;
      const bool valid = i < a.Nq && j < a.Nk && !(a.causal && j > i);
      int pc = 0;
      for (int w = 0; w < words; ++w) pc += __popc(row_bits_s[r * kBitsStride + w] & col_bits_s[c * kBitsStride + w]);
      const float4 crec = col_rec_s[c];
      const float4 rrec = valid ? row_rec[row] : make_float4(0.f, 0.f, 0.f, 0.f);
      // Query record {lse2, D, a, d - 2 p(q)}, key record {b, -2 p(k)}.
      const float4 qrec = kKeyMajor ? crec : rrec;
      const float4 krec = kKeyMajor ? rrec : crec;
      const float dot = float(4 * pc) + qrec.w + krec.y;
      float p = 0.f, dp = 0.f;
      if (valid) {
        float offset = -qrec.x;
        if (has_bias) offset += bias(b, h, i, j);
        p = exp2f(fmaf(dot, scale_log2e * qrec.z * krec.x, offset));
        const float* xr = x_s + r * xs;
        const float* yc = y_s + c * xs;
        for (int ch = 0; ch < dv; ++ch) dp = fmaf(xr[ch], yc[ch], dp);
      }
      const float ds = p * (dp - qrec.y);
      p_s[r * kTileStride + c] = p;
      if (kMainPass) {
        u_s[r * kTileStride + c] = ds;
        tv_s[r * kTileStride + c] = ds * dot * a.scale;
        if (a.dbias && i < a.Nq && j < a.Nk) a.dbias[(bh * a.Nq + i) * a.Nk + j] = ds;
      } else {
        u_s[r * kTileStride + c] = ds * (kKeyMajor ? qrec.z : krec.x);  // times a_i or b_j
      }
    }
    __syncthreads();

    // ---- phase 3: accumulate
    if (kMainPass) {
      if (a.dv) {
#pragma unroll
        for (int k = 0; k < kMaxPerThread; ++k) {
          const int ch = acc_lane + 8 * k;
          if (ch < dv) {
            float s = acc[k];
            for (int c = 0; c < kCols; ++c) s = fmaf(p_s[acc_row * kTileStride + c], y_s[c * xs + ch], s);
            acc[k] = s;
          }
        }
      }
      if (tid < kRows) {  // dk_scale: sum over the tile's queries of tv a_i
        float s = row_sum;
        for (int c = 0; c < kCols; ++c) s = fmaf(tv_s[tid * kTileStride + c], col_rec_s[c].z, s);
        row_sum = s;
      } else if (tid < kRows + kCols && a.dq_scale) {  // dq_scale partial: sum over the keys of tv b_j
        const int c = tid - kRows;
        if (c0 + c < a.Nq) {
          float s = 0.f;
          for (int r = 0; r < kRows; ++r) {
            const float bj = row0 + r < a.Nk ? row_rec[row0 + r].x : 0.f;
            s = fmaf(tv_s[r * kTileStride + c], bj, s);
          }
          a.dq_scale_partial[(bh * a.num_key_blocks + row_block) * a.Nq + c0 + c] = s;
        }
      }
      if (a.drel) {
        accumulate_rel_pos_tile(u_s, kTileStride, kRows, kCols, c0, row0, a.Nq, a.Nk,
                                make_rel_pos_geometry(a), table_s);
      }
    } else {
#pragma unroll
      for (int k = 0; k < kMaxPerThread; ++k) {
        const int dim = acc_lane + 8 * k;
        if (dim < d) {
          float s = acc[k];
          for (int c = 0; c < kCols; ++c) {
            const uint32_t bit = (col_bits_s[c * kBitsStride + (dim >> 5)] >> (dim & 31)) & 1u;
            const float u = u_s[acc_row * kTileStride + c];
            s += bit ? u : -u;
          }
          acc[k] = s;
        }
      }
    }
  }
  __syncthreads();

  // ---- epilogue
  const int64_t my_row = row0 + acc_row;
  if (kMainPass) {
    if (a.dv && my_row < a.Nk) {
#pragma unroll
      for (int k = 0; k < kMaxPerThread; ++k) {
        const int ch = acc_lane + 8 * k;
        if (ch < dv) a.dv[(bh * a.Nk + my_row) * dv + ch] = acc[k];
      }
    }
    if (a.dk_scale && tid < kRows && row0 + tid < a.Nk) a.dk_scale[bh * a.Nk + row0 + tid] = row_sum;
    if (a.drel) {
      float* dst = a.drel_partial + (bh * a.num_key_blocks + row_block) * int64_t(a.rel_table_size);
      for (int e = tid; e < a.rel_table_size; e += kThreads) dst[e] = table_s[e];
    }
  } else if (my_row < n_rows) {
    // Row scalar: b_j (key-major) or a_i (query-major).
    const float4 rrec = row_rec[my_row];
    const float f = (kKeyMajor ? rrec.x : rrec.z) * a.scale;
    float* out = (kKeyMajor ? a.dk_sign : a.dq_sign) + (bh * n_rows + my_row) * d;
#pragma unroll
    for (int k = 0; k < kMaxPerThread; ++k) {
      const int dim = acc_lane + 8 * k;
      if (dim < d) out[dim] = acc[k] * f;
    }
  }
}

}  // namespace binformer::cuda::bwd::simt
