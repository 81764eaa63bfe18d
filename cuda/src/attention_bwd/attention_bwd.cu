// attention_bwd: validation, workspace layout, the prep and finalize kernels, and the dispatch
// to the tensor-core (fp16 / bf16, per head-dim bucket) or CUDA-core (fp32 / unaligned) passes.
// The math and the pass structure are described in bwd_common.cuh.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "binformer/cuda_kernels.h"
#include "bwd_common.cuh"

namespace binformer::cuda {
namespace bwd {
namespace {

constexpr int kPrepThreads = 256;

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

int grid_for(int64_t items, int threads_per_block, int items_per_thread = 1) {
  const int64_t blocks = (items + int64_t(threads_per_block) * items_per_thread - 1) /
                         (int64_t(threads_per_block) * items_per_thread);
  return int(blocks < 1 ? 1 : (blocks > 65536 ? 65536 : blocks));
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
bool aligned8(const void* p) { return reinterpret_cast<uintptr_t>(p) % 8 == 0; }

// The tensor-core path copies rows of v / dout with 16-byte cp.async and stores dv / d*_sign
// as float2: it needs 16-byte aligned rows (every stride a multiple of 8 elements) and 8-byte
// aligned outputs. Everything else goes to the CUDA-core path.
bool use_tensor_cores(const AttentionBwdParams& p) {
  if (p.v_dtype != DType::kFloat16 && p.v_dtype != DType::kBFloat16) return false;
  for (const void* ptr : {p.v, p.dout}) {
    if (!aligned16(ptr)) return false;
  }
  for (int k = 0; k < 3; ++k) {
    if (p.v_stride[k] % 8 != 0 || p.dout_stride[k] % 8 != 0) return false;
  }
  for (const float* ptr : {p.dv, p.dq_sign, p.dk_sign}) {
    if (ptr && !aligned8(ptr)) return false;
  }
  return true;
}

struct WorkspaceLayout {
  size_t qrec = 0, krec = 0, dq_partial = 0, drel_partial = 0, total = 0;
  int key_block = 0, num_key_blocks = 0;
};

size_t round_up(size_t x) { return (x + 255) / 256 * 256; }

int rel_table_size(const AttentionBwdParams& p) {
  return p.rel_pos_table ? (2 * p.rel_pos_wh - 1) * (2 * p.rel_pos_ww - 1) + 3 : 0;
}

WorkspaceLayout layout_for(const AttentionBwdParams& p) {
  WorkspaceLayout w;
  w.key_block = use_tensor_cores(p) ? kKeyBlockTc : kKeyBlockSimt;
  w.num_key_blocks = int((p.Nk + w.key_block - 1) / w.key_block);
  const size_t bh = size_t(p.B) * size_t(p.H);
  size_t off = 0;
  w.qrec = off;
  off += round_up(bh * size_t(p.Nq) * 16);
  w.krec = off;
  off += round_up(bh * size_t(p.Nk) * 16);
  w.dq_partial = off;
  if (p.dq_scale) off += round_up(bh * size_t(w.num_key_blocks) * size_t(p.Nq) * 4);
  w.drel_partial = off;
  if (p.drel_pos_table) off += round_up(bh * size_t(w.num_key_blocks) * size_t(rel_table_size(p)) * 4);
  w.total = off;
  return w;
}

cudaError_t validate(const AttentionBwdParams& p) {
  if (p.B < 0 || p.H < 0 || p.Nq < 0 || p.Nk < 0) return cudaErrorInvalidValue;
  if (p.head_dim < 8 || p.head_dim > kMaxHeadDim || p.head_dim % 8 != 0) return cudaErrorInvalidValue;
  if (p.v_dim < 8 || p.v_dim > 256 || p.v_dim % 8 != 0) return cudaErrorInvalidValue;
  if (p.v_dtype != DType::kFloat32 && p.v_dtype != DType::kFloat16 && p.v_dtype != DType::kBFloat16) {
    return cudaErrorInvalidValue;
  }
  if (p.bias && p.bias_dtype != DType::kFloat32 && p.bias_dtype != DType::kFloat16 &&
      p.bias_dtype != DType::kBFloat16) {
    return cudaErrorInvalidValue;
  }
  if (p.num_prefix_tokens < 0) return cudaErrorInvalidValue;
  if (p.rel_pos_table || p.drel_pos_table) {
    if (!p.rel_pos_table || p.rel_pos_wh < 1 || p.rel_pos_ww < 1) return cudaErrorInvalidValue;
    const int64_t n = p.num_prefix_tokens + int64_t(p.rel_pos_wh) * p.rel_pos_ww;
    if (p.Nq != n || p.Nk != n) return cudaErrorInvalidValue;
  }
  const bool any_rows = p.B * p.H > 0 && (p.Nq > 0 || p.Nk > 0);
  if (any_rows && (!p.q_bits || !p.k_bits || !p.v || !p.out || !p.dout || (p.Nq > 0 && !p.lse))) {
    return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t launch_prep(const BwdArgs& a, cudaStream_t stream) {
  const int64_t rows = a.B * a.H * (a.Nq + a.Nk);
  if (rows == 0) return cudaSuccess;
  const int grid = grid_for(rows, kPrepThreads / 32);
  switch (a.v_dtype) {
    case DType::kFloat16: attention_bwd_prep_kernel<__half><<<grid, kPrepThreads, 0, stream>>>(a); break;
    case DType::kBFloat16: attention_bwd_prep_kernel<__nv_bfloat16><<<grid, kPrepThreads, 0, stream>>>(a); break;
    default: attention_bwd_prep_kernel<float><<<grid, kPrepThreads, 0, stream>>>(a); break;
  }
  return cudaGetLastError();
}

cudaError_t launch_finalize(const BwdArgs& a, cudaStream_t stream) {
  if (a.dq_scale && a.B * a.H * a.Nq > 0) {
    attention_bwd_dq_scale_kernel<<<grid_for(a.B * a.H * a.Nq, 256), 256, 0, stream>>>(a);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (a.drel && a.H * a.rel_table_size > 0) {
    attention_bwd_drel_kernel<<<grid_for(a.H * int64_t(a.rel_table_size), 256), 256, 0, stream>>>(a);
    return cudaGetLastError();
  }
  return cudaSuccess;
}

}  // namespace bwd

size_t attention_bwd_workspace_bytes(const AttentionBwdParams& p) {
  if (bwd::validate(p) != cudaSuccess) return 0;
  return bwd::layout_for(p).total;
}

cudaError_t attention_bwd(const AttentionBwdParams& p, cudaStream_t stream) {
  using namespace bwd;
  cudaError_t err = validate(p);
  if (err != cudaSuccess) return err;
  const WorkspaceLayout w = layout_for(p);
  if (w.total > 0 && p.workspace == nullptr) return cudaErrorInvalidValue;

  BwdArgs a{};
  a.B = p.B; a.H = p.H; a.Nq = p.Nq; a.Nk = p.Nk;
  a.d = p.head_dim; a.dv_dim = p.v_dim; a.words = words_for(p.head_dim);
  a.q_bits = p.q_bits; a.k_bits = p.k_bits; a.v = p.v; a.out = p.out; a.dout = p.dout;
  for (int k = 0; k < 3; ++k) {
    a.q_stride[k] = p.q_stride[k]; a.k_stride[k] = p.k_stride[k]; a.v_stride[k] = p.v_stride[k];
    a.out_stride[k] = p.out_stride[k]; a.dout_stride[k] = p.dout_stride[k];
    a.q_scale_stride[k] = p.q_scale_stride[k]; a.k_scale_stride[k] = p.k_scale_stride[k];
  }
  a.v_dtype = p.v_dtype;
  a.lse = p.lse;
  a.q_scale = p.q_scale; a.k_scale = p.k_scale;
  a.bias = p.bias; a.bias_dtype = p.bias_dtype;
  for (int k = 0; k < 4; ++k) a.bias_stride[k] = p.bias_stride[k];
  a.rel_pos_table = p.rel_pos_table; a.rel_pos_table_stride_h = p.rel_pos_table_stride_h;
  a.rel_wh = p.rel_pos_wh; a.rel_ww = p.rel_pos_ww; a.num_prefix = p.num_prefix_tokens;
  a.rel_table_size = rel_table_size(p);
  a.scale = p.scale; a.causal = p.causal;
  a.dv = p.dv; a.dq_scale = p.dq_scale; a.dk_scale = p.dk_scale; a.dq_sign = p.dq_sign;
  a.dk_sign = p.dk_sign; a.dbias = p.dbias; a.drel = p.drel_pos_table;
  char* ws = static_cast<char*>(p.workspace);
  a.qrec = reinterpret_cast<float4*>(ws + w.qrec);
  a.krec = reinterpret_cast<float4*>(ws + w.krec);
  a.dq_scale_partial = p.dq_scale ? reinterpret_cast<float*>(ws + w.dq_partial) : nullptr;
  a.drel_partial = p.drel_pos_table ? reinterpret_cast<float*>(ws + w.drel_partial) : nullptr;
  a.key_block = w.key_block;
  a.num_key_blocks = w.num_key_blocks;

  if (a.B * a.H == 0) return cudaSuccess;
  err = launch_prep(a, stream);
  if (err != cudaSuccess) return err;

  if (w.key_block == kKeyBlockTc) {
    const int hdim = p.head_dim > p.v_dim ? p.head_dim : p.v_dim;
    a.main_cols = hdim <= 64 ? 64 : hdim <= 128 ? 32 : 16;  // tc::Traits<..>::kCols of the main pass
    const bool fp16 = p.v_dtype == DType::kFloat16;
    if (hdim <= 64) {
      err = fp16 ? run_attention_bwd_tc<__half, 64>(a, stream) : run_attention_bwd_tc<__nv_bfloat16, 64>(a, stream);
    } else {
#if defined(BINFORMER_CUDA_MINIMAL)
      // The CI compile check builds the hdim64 bucket only.
      return cudaErrorNotSupported;
#else
      if (hdim <= 128) {
        err = fp16 ? run_attention_bwd_tc<__half, 128>(a, stream)
                   : run_attention_bwd_tc<__nv_bfloat16, 128>(a, stream);
      } else {
        err = fp16 ? run_attention_bwd_tc<__half, 256>(a, stream)
                   : run_attention_bwd_tc<__nv_bfloat16, 256>(a, stream);
      }
#endif
    }
  } else {
    a.main_cols = 32;
    err = run_attention_bwd_simt(a, stream);
  }
  if (err != cudaSuccess) return err;
  return launch_finalize(a, stream);
}

}  // namespace binformer::cuda
