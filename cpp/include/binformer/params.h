// binformer: the one contract between the op layer (torch binding) and the kernels.
//
// Torch-free on purpose: the CPU kernels (cpp/cpu), the CUDA kernels (cuda/) and the
// GoogleTest drivers all take these plain structs of raw pointers and element strides.
// The binding (cpp/torch) validates shapes, broadcasts with stride 0 and fills them in.
//
// Math (../shared/SPEC.md section 2):
//   S_ij = scale * a_i * b_j * <sign q_i, sign k_j> + bias_ij + relpos_ij   (+ causal mask)
//   P = softmax_j(S), out = P V, lse_i = log sum_j exp(S_ij)  (natural log)
// Bit layout: bit = !(x < 0); element c -> bit c%32 of uint32 word c/32; pad bits are 0.
#pragma once
#include <cstdint>

namespace binformer {

enum class DType : int32_t {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
  kBits = 3,   // uint32 words of packed signs (torch dtype int32)
  kInt8 = 4,   // V quantized per channel (pv_int8)
};

// A short name of the element type (messages, test descriptions).
inline constexpr const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "fp32";
    case DType::kFloat16: return "fp16";
    case DType::kBFloat16: return "bf16";
    case DType::kBits: return "bits";
    case DType::kInt8: return "int8";
  }
  return "?";
}

inline constexpr int kMaxHeadDim = 256;
inline constexpr int words_for(int d) { return (d + 31) / 32; }

// pack_sign: x is a contiguous [rows, d] array of dtype (fp32/fp16/bf16);
// out is a contiguous [rows, words_for(d)] array of uint32.
struct PackSignParams {
  const void* x;
  DType dtype;
  int64_t rows;
  int d;
  uint32_t* out;
};

// sign_matmul: out[b, m, n] = <a[b, m], b[b, n]> over d sign bits (= d - 2 popcount(a ^ b)).
// Rows of a and b are contiguous uint32 words (words_for(d) of them, pad bits 0);
// a batch stride of 0 broadcasts. out is contiguous [batch, M, N] int32.
struct SignMatmulParams {
  const uint32_t* a;
  const uint32_t* b;
  int32_t* out;
  int64_t batch;
  int64_t M, N;
  int d;
  int64_t a_batch_stride;  // in uint32 words
  int64_t b_batch_stride;
};

// Strides are in elements of the tensor's own dtype (uint32 words for kBits).
// A stride of 0 broadcasts along that dim. The last dim is always contiguous.
struct AttentionFwdParams {
  int64_t B, H, Nq, Nk;
  int head_dim;  // d: sign bits per q/k row (any multiple of 8, <= 256)
  int v_dim;     // Dv

  // q [B,H,Nq,d] float (packed inside the kernel) or [B,H,Nq,words_for(d)] kBits.
  const void* q; DType q_dtype; int64_t q_stride[3];   // b, h, n
  const void* k; DType k_dtype; int64_t k_stride[3];
  // v [B,H,Nk,Dv]: fp32/fp16/bf16; kInt8 when pv_int8 (then v_dequant is set).
  const void* v; DType v_dtype; int64_t v_stride[3];
  // out [B,H,Nq,Dv] of out_dtype (the dtype of the user's v).
  void* out; DType out_dtype; int64_t out_stride[3];
  float* lse;  // [B,H,Nq] contiguous fp32, or nullptr when not wanted

  // Optional per-row factors a_i, b_j (fp32), broadcast to [B,H,N]; nullptr means 1.
  const float* q_scale; int64_t q_scale_stride[3];
  const float* k_scale; int64_t k_scale_stride[3];

  // Optional dense additive bias broadcast to [B,H,Nq,Nk] (fp32/fp16/bf16); nullptr = none.
  const void* bias; DType bias_dtype; int64_t bias_stride[4];

  // Optional BinaryAttention relative-position bias from a per-head table
  // [H, (2Wh-1)(2Ww-1)+3] fp32 (index rule: SPEC.md section 1); nullptr = none.
  const float* rel_pos_table; int64_t rel_pos_table_stride_h;
  int rel_pos_wh, rel_pos_ww;
  int num_prefix_tokens;  // 0 or 1 (a cls token before the Wh*Ww patches)

  float scale;  // multiplies the integer dot product (default 1/sqrt(d))
  bool causal;  // top-left aligned: key j masked for query i when j > i

  // pv_int8: P is quantized per element to uint8 steps of 1/255 of the running row maximum
  // (round(exp(s - m_running) * 255)), V arrives as int8 (v_dtype == kInt8) and
  // v_dequant [B,H,Dv] (contiguous fp32, = max|V|/127 per channel) rescales the result.
  bool pv_int8;
  const float* v_dequant;

  // CUDA only: scratch memory of attention_fwd_workspace_bytes(params) bytes (may be null if 0).
  void* workspace;
};

// Backward of attention_fwd (flash-style: scores recomputed from the bits and the saved lse,
// never an N x N buffer except dbias when the caller asks for it).
//   dV = P^T dO,  dP = dO V^T,  D_i = sum_c dO_ic O_ic,  dS = P * (dP - D)
//   with dot_ij = <sign q_i, sign k_j> and S_ij = scale * a_i * b_j * dot_ij + bias:
//   dq_scale_i = sum_j dS_ij * scale * b_j * dot_ij          (per token; the binding reduces
//   dk_scale_j = sum_i dS_ij * scale * a_i * dot_ij           it to the scale's own shape)
//   dq_sign_i  = sum_j dS_ij * scale * a_i * b_j * sign(k_j)  (d floats; "ste" mode only: the
//   dk_sign_j  = sum_i dS_ij * scale * a_i * b_j * sign(q_i)   binding applies the |x|<=1 mask)
//   dbias_ij   = dS_ij;  drel_pos_table[h, idx(i,j)] += dS_ij
// pv_int8 is differentiated as if P.V were exact (straight-through over both quantizers).
// Results must be deterministic: the same inputs give the same bits (no float atomics whose
// order varies; reduce fixed partitions in a fixed order).
struct AttentionBwdParams {
  int64_t B, H, Nq, Nk;
  int head_dim, v_dim;
  const uint32_t* q_bits; int64_t q_stride[3];   // packed [B,H,Nq,words_for(d)]
  const uint32_t* k_bits; int64_t k_stride[3];
  // v, out, dout share v_dtype (fp32/fp16/bf16).
  const void* v; DType v_dtype; int64_t v_stride[3];
  const void* out; int64_t out_stride[3];
  const void* dout; int64_t dout_stride[3];
  const float* lse;  // [B,H,Nq] contiguous, from the forward

  const float* q_scale; int64_t q_scale_stride[3];
  const float* k_scale; int64_t k_scale_stride[3];
  const void* bias; DType bias_dtype; int64_t bias_stride[4];
  const float* rel_pos_table; int64_t rel_pos_table_stride_h;
  int rel_pos_wh, rel_pos_ww;
  int num_prefix_tokens;
  float scale;
  bool causal;

  // Outputs, all fp32 and contiguous; nullptr = not wanted. Every wanted output is fully
  // written (drel_pos_table too: the kernel zero-fills it first).
  float* dv;              // [B,H,Nk,Dv]
  float* dq_scale;        // [B,H,Nq]
  float* dk_scale;        // [B,H,Nk]
  float* dq_sign;         // [B,H,Nq,d]
  float* dk_sign;         // [B,H,Nk,d]
  float* dbias;           // [B,H,Nq,Nk]
  float* drel_pos_table;  // [H, (2Wh-1)(2Ww-1)+3]

  void* workspace;  // CUDA only: attention_bwd_workspace_bytes(params) bytes
};

// Relative-position bias index (SPEC.md section 1), shared by every implementation.
// Tokens are numbered with num_prefix cls tokens first, then Wh x Ww patches row-major.
#if defined(__CUDACC__)
__host__ __device__
#endif
inline int64_t rel_pos_index(int64_t i, int64_t j, int wh, int ww, int num_prefix) {
  const int64_t table = int64_t(2 * wh - 1) * (2 * ww - 1) + 3;
  const bool ci = i < num_prefix, cj = j < num_prefix;
  if (ci && cj) return table - 1;
  if (ci) return table - 3;
  if (cj) return table - 2;
  const int64_t pi = i - num_prefix, pj = j - num_prefix;
  const int64_t yi = pi / ww, xi = pi % ww, yj = pj / ww, xj = pj % ww;
  return (yi - yj + wh - 1) * (2 * ww - 1) + (xi - xj + ww - 1);
}

}  // namespace binformer
