// attention_bwd prep and finalize kernels (see bwd_common.cuh for the pass structure).
#pragma once
#include "bwd_common.cuh"

namespace binformer::cuda::bwd {

inline constexpr int kPrepThreads = 256;

// One warp per row. Query rows: {lse log2e (+inf for a fully masked row, so that every P of
// the row is 0 instead of NaN), D = dO . O (fixed shuffle tree), a_i, d - 2 p(q_i)}.
// Key rows: {b_j, -2 p(k_j), 0, 0}.
template <class T>
__global__ void __launch_bounds__(kPrepThreads) attention_bwd_prep_kernel(const BwdArgs a) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (kPrepThreads / 32);
  const int64_t q_rows = a.B * a.H * a.Nq, total = q_rows + a.B * a.H * a.Nk;
  for (int64_t row = int64_t(blockIdx.x) * (kPrepThreads / 32) + (threadIdx.x >> 5); row < total;
       row += warps) {
    const bool is_query = row < q_rows;
    const int64_t r = is_query ? row : row - q_rows;
    const int64_t n_len = is_query ? a.Nq : a.Nk;
    const int64_t bh = r / n_len, n = r - bh * n_len, b = bh / a.H, h = bh - b * a.H;
    const uint32_t* bits = is_query ? a.q_bits + b * a.q_stride[0] + h * a.q_stride[1] + n * a.q_stride[2]
                                    : a.k_bits + b * a.k_stride[0] + h * a.k_stride[1] + n * a.k_stride[2];
    int pop = lane < a.words ? __popc(bits[lane]) : 0;
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) pop += __shfl_xor_sync(0xffffffffu, pop, m);
    if (is_query) {
      const T* o = static_cast<const T*>(a.out) + b * a.out_stride[0] + h * a.out_stride[1] + n * a.out_stride[2];
      const T* g = static_cast<const T*>(a.dout) + b * a.dout_stride[0] + h * a.dout_stride[1] + n * a.dout_stride[2];
      float dot = 0.f;
      for (int c = lane; c < a.dv_dim; c += 32) dot = fmaf(to_float<T>(o[c]), to_float<T>(g[c]), dot);
#pragma unroll
      for (int m = 16; m > 0; m >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, m);
      if (lane == 0) {
        const float lse = a.lse[r];
        const float lse2 = lse == -INFINITY ? INFINITY : lse * kLog2e;
        const float sa = a.q_scale ? a.q_scale[b * a.q_scale_stride[0] + h * a.q_scale_stride[1] +
                                               n * a.q_scale_stride[2]]
                                   : 1.f;
        a.qrec[r] = make_float4(lse2, dot, sa, float(a.d - 2 * pop));
      }
    } else if (lane == 0) {
      const float sb = a.k_scale ? a.k_scale[b * a.k_scale_stride[0] + h * a.k_scale_stride[1] +
                                             n * a.k_scale_stride[2]]
                                 : 1.f;
      a.krec[r] = make_float4(sb, float(-2 * pop), 0.f, 0.f);
    }
  }
}

// A 16-bit fp16 / bf16 pattern (low bits of `bits`) as a float, without type punning.
template <class T>
__device__ __forceinline__ float half_bits_to_float(uint32_t bits);
template <>
__device__ __forceinline__ float half_bits_to_float<__half>(uint32_t bits) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}
template <>
__device__ __forceinline__ float half_bits_to_float<__nv_bfloat16>(uint32_t bits) {
  return __uint_as_float(bits << 16);
}

// The same records with 8 lanes per row (4 rows per warp step) and 16-byte loads of O and dO:
// for fp16 / bf16 whose out / dout rows start on 16 bytes. v1's warp-per-row version moved 64
// bytes per load instruction and kept few loads in flight (~50 us at B=4 H=16 N=4096 d=64).
// D = dO . O: per-lane fp32 sums of 8-element pieces, then a fixed xor tree over the 8 lanes.
template <class T>
__global__ void __launch_bounds__(kPrepThreads) attention_bwd_prep_vec_kernel(const BwdArgs a) {
  static_assert(sizeof(T) == 2, "16-bit out / dout");
  const int lane = threadIdx.x & 31, sub = lane & 7;
  const int64_t groups = int64_t(gridDim.x) * (kPrepThreads / 8);
  const int64_t q_rows = a.B * a.H * a.Nq, total = q_rows + a.B * a.H * a.Nk;
  // Every lane of a warp runs the same number of steps (the shuffles need the full warp).
  const int64_t first = int64_t(blockIdx.x) * (kPrepThreads / 8) + (threadIdx.x >> 3);
  const int64_t warp_first = first - ((threadIdx.x >> 3) & 3);
  for (int64_t base = warp_first; base < total; base += groups) {
    const int64_t row = base + ((threadIdx.x >> 3) & 3);
    const bool live = row < total;
    const bool is_query = row < q_rows;
    const int64_t r = is_query ? row : row - q_rows;
    const int64_t n_len = is_query ? a.Nq : a.Nk;
    const int64_t bh = live ? r / n_len : 0, n = live ? r - bh * n_len : 0, b = bh / a.H, h = bh - b * a.H;
    const uint32_t* bits = is_query ? a.q_bits + b * a.q_stride[0] + h * a.q_stride[1] + n * a.q_stride[2]
                                    : a.k_bits + b * a.k_stride[0] + h * a.k_stride[1] + n * a.k_stride[2];
    int pop = live && sub < a.words ? __popc(bits[sub]) : 0;
    float dot = 0.f;
    if (live && is_query) {
      const T* o = static_cast<const T*>(a.out) + b * a.out_stride[0] + h * a.out_stride[1] + n * a.out_stride[2];
      const T* g = static_cast<const T*>(a.dout) + b * a.dout_stride[0] + h * a.dout_stride[1] + n * a.dout_stride[2];
      for (int c = sub * 8; c < a.dv_dim; c += 64) {
        const uint4 ov = *reinterpret_cast<const uint4*>(o + c), gv = *reinterpret_cast<const uint4*>(g + c);
        const uint32_t ow[4] = {ov.x, ov.y, ov.z, ov.w}, gw[4] = {gv.x, gv.y, gv.z, gv.w};
#pragma unroll
        for (int k = 0; k < 4; ++k) {  // elements 2k (low half) and 2k + 1 (high half)
          dot = fmaf(half_bits_to_float<T>(ow[k] & 0xffffu), half_bits_to_float<T>(gw[k] & 0xffffu), dot);
          dot = fmaf(half_bits_to_float<T>(ow[k] >> 16), half_bits_to_float<T>(gw[k] >> 16), dot);
        }
      }
    }
#pragma unroll
    for (int m = 4; m > 0; m >>= 1) {
      pop += __shfl_xor_sync(0xffffffffu, pop, m);
      dot += __shfl_xor_sync(0xffffffffu, dot, m);
    }
    if (!live || sub != 0) continue;
    if (is_query) {
      const float lse = a.lse[r];
      const float lse2 = lse == -INFINITY ? INFINITY : lse * kLog2e;
      const float sa = a.q_scale ? a.q_scale[b * a.q_scale_stride[0] + h * a.q_scale_stride[1] +
                                             n * a.q_scale_stride[2]]
                                 : 1.f;
      a.qrec[r] = make_float4(lse2, dot, sa, float(a.d - 2 * pop));
    } else {
      const float sb = a.k_scale ? a.k_scale[b * a.k_scale_stride[0] + h * a.k_scale_stride[1] +
                                             n * a.k_scale_stride[2]]
                                 : 1.f;
      a.krec[r] = make_float4(sb, float(-2 * pop), 0.f, 0.f);
    }
  }
}

// dq_scale[bh, i] = sum over the key blocks that visited query i of their partial, in key-block
// order.
__global__ void attention_bwd_dq_scale_kernel(const BwdArgs a) {
  const int64_t total = a.B * a.H * a.Nq;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t bh = e / a.Nq, i = e - bh * a.Nq;
    const int64_t tile_of_i = i / a.main_cols;
    float s = 0.f;
    for (int kb = 0; kb < a.num_key_blocks; ++kb) {
      if (first_query_tile(a.causal, kb, a.key_block, a.main_cols) > tile_of_i) break;  // grows with kb
      s += a.dq_scale_partial[(bh * a.num_key_blocks + kb) * a.Nq + i];
    }
    a.dq_scale[e] = s;
  }
}

// drel[h, idx] = sum over batches and key blocks of the per-CTA partial tables, in that order.
__global__ void attention_bwd_drel_kernel(const BwdArgs a) {
  const int64_t total = a.H * int64_t(a.rel_table_size);
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t h = e / a.rel_table_size, idx = e - h * a.rel_table_size;
    float s = 0.f;
    for (int64_t b = 0; b < a.B; ++b) {
      const float* part = a.drel_partial + ((b * a.H + h) * a.num_key_blocks) * int64_t(a.rel_table_size) + idx;
      for (int kb = 0; kb < a.num_key_blocks; ++kb) s += part[int64_t(kb) * a.rel_table_size];
    }
    a.drel[e] = s;
  }
}

}  // namespace binformer::cuda::bwd
