// attention_bwd: the pieces every backward kernel shares.
//
// Math (params.h, AttentionBwdParams): with dot_ij = <sign q_i, sign k_j>,
//   S_ij = scale a_i b_j dot_ij + bias_ij (+ causal mask),  P_ij = exp(S_ij - lse_i),
//   dP_ij = dO_i . V_j,  D_i = dO_i . O_i,  dS_ij = P_ij (dP_ij - D_i),
//   dV_j = sum_i P_ij dO_i,   dq_scale_i = sum_j dS_ij scale b_j dot_ij,
//   dk_scale_j = sum_i dS_ij scale a_i dot_ij,
//   dq_sign_i = scale a_i sum_j (dS_ij b_j) sign(k_j),  dk_sign_j = scale b_j sum_i (dS_ij a_i) sign(q_i),
//   dbias_ij = dS_ij,  drel_pos_table[h, idx(i, j)] = sum over b, i, j of dS_ij.
//
// Work plan (all passes recompute S from the packed bits and the saved lse, tile by tile):
//   1. prep: one warp per query row writes {lse * log2 e, D_i, a_i, d - 2 p(q_i)} and one warp
//      per key row writes {b_j, -2 p(k_j)} into the workspace ("records"), so that
//      dot = 4 p(q & k) + (d - 2 p(q)) + (-2 p(k)) is two adds away from the b1 mma result.
//   2. key-major main pass (a CTA owns 128 keys and loops over query tiles): dV, dk_scale, and
//      per-CTA partial column sums for dq_scale, dbias tiles, and a per-CTA partial rel-pos
//      table (in shared memory, written to the workspace at the end).
//   3. key-major sign pass (only if dk_sign is wanted) and query-major sign pass (only if
//      dq_sign is wanted): dS' sign(.) on the tensor cores.
//   4. finalize: dq_scale = sum of the partials over key blocks, drel = sum of the partial
//      tables over batch and key blocks, each in a fixed order.
// No float atomics anywhere: every sum has one owner thread and a fixed order, so results are
// bitwise reproducible run to run.
#pragma once
#if defined(BINFORMER_BWD_HOST_EMULATION)
// The kernels compiled as plain C++ for the host emulator in tests/cuda/emulation, which provides
// the CUDA built-ins, the fp16 / bf16 types and the warp collectives.
#include "bwd_emulation.h"
#define BINFORMER_BWD_DYNAMIC_SMEM(type, name) \
  type* name = reinterpret_cast<type*>(::bwd_emulation::dynamic_smem())
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define BINFORMER_BWD_DYNAMIC_SMEM(type, name) extern __shared__ __align__(16) type name[]
#endif

#include <cstdint>

#include "binformer/params.h"

namespace binformer::cuda::bwd {

constexpr float kLog2e = 1.4426950408889634f;
// Keys per CTA of the key-major main pass on the tensor cores and on the CUDA cores. The main
// pass writes one partial dq_scale row per key block, so the workspace layout and the finalize
// kernel follow the block size of the path that ran (BwdArgs::key_block).
constexpr int kKeyBlockTc = 128;
constexpr int kKeyBlockSimt = 32;

// Query-tile width of the tensor-core main pass for head dims (max of d and Dv) up to `hdim`: as
// wide as the registers allow (the pass holds dV, 16 x hdim fp32 per warp). The CUDA-core main
// pass uses 32. The finalize kernel needs it for the causal rule (first_query_tile).
__host__ __device__ constexpr int tc_main_cols(int hdim) { return hdim <= 64 ? 64 : hdim <= 128 ? 32 : 16; }
// Query-tile width of the v2 main pass (bwd_main.cuh: no bias / rel-pos, head dims <= 128).
constexpr int kFastMainCols = 64;

// Everything the kernels read, flattened once on the host.
struct BwdArgs {
  int64_t B, H, Nq, Nk;
  int d, dv_dim, words;  // head dim, v dim, words_for(d)

  const uint32_t* q_bits; int64_t q_stride[3];
  const uint32_t* k_bits; int64_t k_stride[3];
  const void* v; int64_t v_stride[3];
  const void* out; int64_t out_stride[3];
  const void* dout; int64_t dout_stride[3];
  DType v_dtype;
  const float* lse;
  const float* q_scale; int64_t q_scale_stride[3];
  const float* k_scale; int64_t k_scale_stride[3];
  const void* bias; DType bias_dtype; int64_t bias_stride[4];
  const float* rel_pos_table; int64_t rel_pos_table_stride_h;
  int rel_wh, rel_ww, num_prefix;
  int rel_table_size;  // (2Wh-1)(2Ww-1)+3, 0 when no table
  float scale;
  bool causal;

  // Outputs (nullptr = not wanted).
  float* dv; float* dq_scale; float* dk_scale; float* dq_sign; float* dk_sign;
  float* dbias; float* drel;

  // Workspace pieces.
  float4* qrec;               // [B*H*Nq] {lse * log2e (+inf for a fully masked row), D, a, d - 2 p(q)}
  float4* krec;               // [B*H*Nk] {b, -2 p(k), 0, 0}
  float* dq_scale_partial;    // [B*H*num_key_blocks*Nq]
  float* drel_partial;        // [B*H*num_key_blocks*rel_table_size]
  int key_block;              // keys per CTA of the main pass (kKeyBlockTc or kKeyBlockSimt)
  int num_key_blocks;         // ceil(Nk / key_block)
  int main_cols;              // query-tile width of the main pass
  bool main_v2;               // the main pass is bwd_main.cuh's (else bwd_tc.cuh's / bwd_simt's)
};

// ---------------------------------------------------------------- small device helpers
__device__ __forceinline__ float ex2_approx(float x) {
#if defined(BINFORMER_BWD_HOST_EMULATION)
  return exp2f(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}

// int -> float for 0 <= x < 2^23 without the I2F unit (it runs at the MUFU rate).
__device__ __forceinline__ float small_int_to_float(int x) {
  return __int_as_float(0x4B000000 | x) - 8388608.0f;
}

template <class T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ float load_as_float(const void* p, DType t, int64_t offset) {
  switch (t) {
    case DType::kFloat16: return __half2float(static_cast<const __half*>(p)[offset]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[offset]);
    default: return static_cast<const float*>(p)[offset];
  }
}

// Additive bias of S in log2 units (bias * log2 e): dense bias and/or the rel-pos table.
struct BiasReader {
  const void* bias; DType bias_dtype; int64_t bs[4];
  const float* table; int ww, num_prefix, patch_base, table_size;

  __device__ __forceinline__ float operator()(int64_t b, int64_t h, int64_t i, int64_t j) const {
    float v = 0.f;
    if (bias) v = load_as_float(bias, bias_dtype, b * bs[0] + h * bs[1] + i * bs[2] + j * bs[3]);
    if (table) {
      // Token indices fit in int (the rel-pos grid has Wh * Ww tokens).
      const int ii = int(i), jj = int(j);
      int idx;
      const bool ci = ii < num_prefix, cj = jj < num_prefix;
      if (ci && cj) idx = table_size - 1;
      else if (ci) idx = table_size - 3;
      else if (cj) idx = table_size - 2;
      else {
        const int pi = ii - num_prefix, pj = jj - num_prefix;
        const int yi = pi / ww, xi = pi - yi * ww, yj = pj / ww, xj = pj - yj * ww;
        idx = (yi - yj) * (2 * ww - 1) + (xi - xj) + patch_base;
      }
      v += __ldg(table + idx);
    }
    return v * kLog2e;
  }
};

__host__ __device__ inline BiasReader make_bias_reader(const BwdArgs& a, int64_t h) {
  BiasReader r;
  r.bias = a.bias;
  r.bias_dtype = a.bias_dtype;
  for (int k = 0; k < 4; ++k) r.bs[k] = a.bias_stride[k];
  r.table = a.rel_pos_table ? a.rel_pos_table + h * a.rel_pos_table_stride_h : nullptr;
  r.ww = a.rel_ww;
  r.num_prefix = a.num_prefix;
  r.patch_base = (a.rel_wh - 1) * (2 * a.rel_ww - 1) + (a.rel_ww - 1);
  r.table_size = a.rel_table_size;
  return r;
}

// First query tile (of width `cols`) that key block `kb` (of `key_block` keys) visits: under the
// causal mask a key block starting at j0 only sees queries i >= j0. Shared by the main passes
// and by the finalize kernel, which must know which partial dq_scale entries exist.
__host__ __device__ inline int64_t first_query_tile(bool causal, int64_t kb, int key_block, int cols) {
  return causal ? (kb * key_block) / cols : 0;
}

// ---------------------------------------------------------------- rel-pos partial tables
struct RelPosGeometry {
  int num_prefix, ww, table_size;
  int patch_base;  // (Wh-1)(2Ww-1) + (Ww-1): idx of the zero offset
};

// Adds a tile of dS (rows = keys j0.., cols = queries i0.., row-major in shared memory with
// `stride` floats per row) into the CTA's partial table `table` (shared memory, table_size
// floats) without atomics and in a fixed order:
//  * patch pairs: idx(i, j) determines (y_i - y_j, x_i - x_j), which determines i - j, so every
//    table entry is touched by exactly one diagonal of the tile; thread t owns diagonal
//    c - r = t - (rows - 1), walks it in order and flushes a running sum whenever idx changes
//    (a few times per diagonal: idx only changes where x_i or x_j wraps);
//  * cls entries (T-1, T-2, T-3) are summed by warp 0 after its walk with a fixed shuffle tree;
//    no patch pair maps to them, so they never race with the walkers.
// The caller synchronizes before (dS written) and after (table complete).
__device__ inline void accumulate_rel_pos_tile(const float* dS, int stride, int rows, int cols,
                                               int64_t i0, int64_t j0, int64_t Nq, int64_t Nk,
                                               const RelPosGeometry& g, float* table) {
  const int tid = threadIdx.x;
  const int P = g.num_prefix;
  if (tid < rows + cols - 1) {
    const int diag = tid - (rows - 1);  // c - r on this thread's diagonal
    int64_t r_begin = diag < 0 ? -diag : 0;
    int64_t r_end = cols - 1 - diag < rows - 1 ? cols - 1 - diag : rows - 1;  // inclusive
    // Patches only: num_prefix <= i < Nq and num_prefix <= j < Nk.
    r_begin = max(r_begin, max(int64_t(P) - i0 - diag, int64_t(P) - j0));
    r_end = min(r_end, min(Nq - 1 - i0 - diag, Nk - 1 - j0));
    if (r_begin <= r_end) {
      const int64_t pi = i0 + r_begin + diag - P, pj = j0 + r_begin - P;
      int yi = int(pi / g.ww), xi = int(pi - int64_t(yi) * g.ww);
      int yj = int(pj / g.ww), xj = int(pj - int64_t(yj) * g.ww);
      const int row_len = 2 * g.ww - 1;
      int cur = (yi - yj) * row_len + (xi - xj) + g.patch_base;
      float sum = 0.f;
      for (int r = int(r_begin); r <= int(r_end); ++r) {
        const int idx = (yi - yj) * row_len + (xi - xj) + g.patch_base;
        if (idx != cur) {
          table[cur] += sum;
          sum = 0.f;
          cur = idx;
        }
        sum += dS[r * stride + r + diag];
        if (++xi == g.ww) { xi = 0; ++yi; }
        if (++xj == g.ww) { xj = 0; ++yj; }
      }
      table[cur] += sum;
    }
  }
  // cls entries: only tiles that touch the first num_prefix queries or keys have any.
  if (P > 0 && (i0 < P || j0 < P) && tid < 32) {
    const int lane = tid;
    float cls_row = 0.f, cls_col = 0.f, cls_cls = 0.f;  // T-3 (i cls), T-2 (j cls), T-1 (both)
    const int valid_rows = int(min(int64_t(rows), Nk - j0));
    const int valid_cols = int(min(int64_t(cols), Nq - i0));
    const int prefix_cols = int(min(int64_t(valid_cols), max(int64_t(0), int64_t(P) - i0)));
    const int prefix_rows = int(min(int64_t(valid_rows), max(int64_t(0), int64_t(P) - j0)));
    // Columns of cls queries: every valid key.
    for (int e = lane; e < prefix_cols * valid_rows; e += 32) {
      const int c = e / valid_rows, r = e - c * valid_rows;
      const float v = dS[r * stride + c];
      if (r < prefix_rows) cls_cls += v; else cls_row += v;
    }
    // Rows of cls keys: the patch queries.
    for (int e = lane; e < prefix_rows * (valid_cols - prefix_cols); e += 32) {
      const int r = e / (valid_cols - prefix_cols), c = prefix_cols + e - r * (valid_cols - prefix_cols);
      cls_col += dS[r * stride + c];
    }
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) {
      cls_row += __shfl_xor_sync(0xffffffffu, cls_row, m);
      cls_col += __shfl_xor_sync(0xffffffffu, cls_col, m);
      cls_cls += __shfl_xor_sync(0xffffffffu, cls_cls, m);
    }
    if (lane == 0) {
      table[g.table_size - 3] += cls_row;
      table[g.table_size - 2] += cls_col;
      table[g.table_size - 1] += cls_cls;
    }
  }
}

__host__ __device__ inline RelPosGeometry make_rel_pos_geometry(const BwdArgs& a) {
  RelPosGeometry g;
  g.num_prefix = a.num_prefix;
  g.ww = a.rel_ww > 0 ? a.rel_ww : 1;
  g.table_size = a.rel_table_size;
  g.patch_base = (a.rel_wh - 1) * (2 * a.rel_ww - 1) + (a.rel_ww - 1);
  return g;
}

// Host-side launchers implemented in attention_bwd.cu.
cudaError_t launch_prep(const BwdArgs& a, cudaStream_t stream);
cudaError_t launch_finalize(const BwdArgs& a, cudaStream_t stream);

// Tensor-core passes for one head-dim bucket (d, Dv <= kHdim); explicit instantiations live in
// cuda/src/instantiations/attention_bwd_hdim*_*.cu.
template <class T, int kHdim>
cudaError_t run_attention_bwd_tc(const BwdArgs& a, cudaStream_t stream);

// CUDA-core passes for any dtype, head dim and alignment (fp32 v, or misaligned fp16/bf16).
cudaError_t run_attention_bwd_simt(const BwdArgs& a, cudaStream_t stream);

}  // namespace binformer::cuda::bwd
