// attention_bwd host-side decisions shared by the launcher (attention_bwd.cu) and the host
// emulator (tests/cuda/emulation): validation, the path choice, the workspace layout and the
// flattened kernel arguments.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "bwd_common.cuh"

namespace binformer::cuda::bwd {

// BINFORMER_BWD_MAIN_V1=1 in the environment: run v1's main pass everywhere (read once).
inline bool main_v1_forced() {
  static const bool forced = [] {
    const char* e = std::getenv("BINFORMER_BWD_MAIN_V1");
    return e != nullptr && e[0] == '1';
  }();
  return forced;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
inline bool aligned8(const void* p) { return reinterpret_cast<uintptr_t>(p) % 8 == 0; }

// The tensor-core path copies rows of v / dout with 16-byte cp.async and stores dv / d*_sign
// as float2: it needs 16-byte aligned rows (every stride a multiple of 8 elements) and 8-byte
// aligned outputs. Everything else goes to the CUDA-core path.
inline bool use_tensor_cores(const AttentionBwdParams& p) {
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

// The prep kernel's 16-byte path (attention_bwd_prep_vec_kernel): fp16 / bf16 out and dout
// whose rows start on 16 bytes.
inline bool prep_vectorized(const BwdArgs& a) {
  if (a.v_dtype != DType::kFloat16 && a.v_dtype != DType::kBFloat16) return false;
  if (!aligned16(a.out) || !aligned16(a.dout)) return false;
  for (int k = 0; k < 3; ++k) {
    if (a.out_stride[k] % 8 != 0 || a.dout_stride[k] % 8 != 0) return false;
  }
  return true;
}

struct WorkspaceLayout {
  size_t qrec = 0, krec = 0, dq_partial = 0, drel_partial = 0, total = 0;
  int key_block = 0, num_key_blocks = 0;
};

inline size_t round_up(size_t x) { return (x + 255) / 256 * 256; }

inline int rel_table_size(const AttentionBwdParams& p) {
  return p.rel_pos_table ? (2 * p.rel_pos_wh - 1) * (2 * p.rel_pos_ww - 1) + 3 : 0;
}

inline WorkspaceLayout layout_for(const AttentionBwdParams& p) {
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

inline cudaError_t validate(const AttentionBwdParams& p) {
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

// The kernels' view of the params plus the workspace pieces (p.workspace must hold w.total bytes).
inline BwdArgs make_bwd_args(const AttentionBwdParams& p, const WorkspaceLayout& w) {
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
  // Which main pass runs and its query-tile width (the CUDA-core pass uses 32 x 32 tiles). The
  // v2 pass (bwd_main.cuh) covers the tensor-core path without bias, rel-pos table, dbias or
  // drel at head dims <= 128; BINFORMER_BWD_MAIN_V1=1 forces v1 (A/B timing, bisecting).
  const int hdim = p.head_dim > p.v_dim ? p.head_dim : p.v_dim;
  a.main_v2 = w.key_block == kKeyBlockTc && hdim <= 128 && !p.bias && !p.rel_pos_table && !p.dbias &&
              !p.drel_pos_table && p.Nq < (int64_t(1) << 30) && p.Nk < (int64_t(1) << 30) && !main_v1_forced();
  a.main_cols = w.key_block != kKeyBlockTc ? kKeyBlockSimt : a.main_v2 ? kFastMainCols : tc_main_cols(hdim);

  return a;
}

}  // namespace binformer::cuda::bwd
