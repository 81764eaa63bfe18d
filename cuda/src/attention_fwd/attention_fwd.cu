// binformer::cuda::attention_fwd: argument validation, workspace, the K pre-pass and the
// dispatch to the per-configuration kernels (cuda/src/instantiations/attention_fwd_*.cu).
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "../sm90_support.h"
#include "binformer/cuda_kernels.h"
#include "fwd_api.h"
#include "fwd_args.h"
#include "instances.inc"
#include "pack_keys.h"
#include "sign_pack.h"
#include "tile_config.h"
#include "workspace_layout.h"

namespace binformer::cuda {
namespace {

using fwd::FwdArgs;
using fwd::PackKeysArgs;
using fwd::PvKind;
using fwd::fwd_pack_keys_kernel;
using fwd::fwd_pack_keys_pairs_kernel;
using fwd::kPackThreads;

constexpr int64_t kRelPosSmemCapBytes = 32 * 1024;  // larger tables are read through L1

int elem_bytes(DType t) {
  switch (t) {
    case DType::kFloat16:
    case DType::kBFloat16: return 2;
    case DType::kInt8: return 1;
    default: return 4;
  }
}

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Every row start p + b*s0 + h*s1 + n*s2 (elements of `esize` bytes) is a multiple of `bytes`.
bool rows_aligned(const void* p, const int64_t* stride, int n_strides, int esize, int64_t bytes) {
  if (!aligned(p, bytes)) return false;
  for (int i = 0; i < n_strides; ++i) {
    if ((stride[i] * esize) % bytes != 0) return false;
  }
  return true;
}

using fwd::WorkspaceLayout;
WorkspaceLayout workspace_layout(const AttentionFwdParams& p) { return fwd::fwd_workspace_layout(p); }
bool per_token_k(const AttentionFwdParams& p) { return fwd::fwd_per_token_k(p); }

// BINFORMER_FWD_PDL=0 (read at every call; A/B runs): the attention kernel starts only after the
// K pre-pass has finished (no programmatic dependent launch: launch.h).
bool fwd_pdl_requested() {
  const char* env = std::getenv("BINFORMER_FWD_PDL");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

bool is_float_dtype(DType t) {
  return t == DType::kFloat32 || t == DType::kFloat16 || t == DType::kBFloat16;
}

cudaError_t validate(const AttentionFwdParams& p) {
  if (p.B < 0 || p.H < 0 || p.Nq < 0 || p.Nk < 0) return cudaErrorInvalidValue;
  if (p.Nq > INT_MAX / 2 || p.Nk > INT_MAX / 2 || p.H > INT_MAX || p.B > INT_MAX) {
    return cudaErrorInvalidValue;
  }
  if (p.head_dim < 8 || p.head_dim > kMaxHeadDim || p.head_dim % 8 != 0) return cudaErrorInvalidValue;
  if (p.v_dim < 8 || p.v_dim > kMaxHeadDim || p.v_dim % 8 != 0) return cudaErrorInvalidValue;
  if (!(is_float_dtype(p.q_dtype) || p.q_dtype == DType::kBits)) return cudaErrorInvalidValue;
  if (!(is_float_dtype(p.k_dtype) || p.k_dtype == DType::kBits)) return cudaErrorInvalidValue;
  if (p.pv_int8) {
    if (p.v_dtype != DType::kInt8 || p.v_dequant == nullptr || !is_float_dtype(p.out_dtype)) {
      return cudaErrorInvalidValue;
    }
    // The s32 P.V accumulator holds up to 255 * 127 * Nk (P_q <= 255, |V_q| <= 127).
    if (p.Nk > 65536) return cudaErrorNotSupported;
  } else if (!is_float_dtype(p.v_dtype) || p.out_dtype != p.v_dtype) {
    return cudaErrorInvalidValue;
  }
  if (p.bias != nullptr && !is_float_dtype(p.bias_dtype)) return cudaErrorInvalidValue;
  if (p.rel_pos_table != nullptr) {
    if (p.rel_pos_wh < 1 || p.rel_pos_ww < 1 || p.num_prefix_tokens < 0 || p.num_prefix_tokens > 1) {
      return cudaErrorInvalidValue;
    }
    const int64_t tokens = int64_t(p.num_prefix_tokens) + int64_t(p.rel_pos_wh) * p.rel_pos_ww;
    if (p.Nq != tokens || p.Nk != tokens) return cudaErrorInvalidValue;
  }
  const bool work = p.B > 0 && p.H > 0 && p.Nq > 0;
  if (work && (p.out == nullptr || p.q == nullptr)) return cudaErrorInvalidValue;
  if (work && p.Nk > 0 && (p.k == nullptr || p.v == nullptr)) return cudaErrorInvalidValue;
  // Element loads and stores need natural alignment of the pointers themselves.
  if (!aligned(p.q, p.q_dtype == DType::kBits ? 4 : elem_bytes(p.q_dtype)) ||
      !aligned(p.k, p.k_dtype == DType::kBits ? 4 : elem_bytes(p.k_dtype)) ||
      !aligned(p.v, elem_bytes(p.v_dtype)) || !aligned(p.out, elem_bytes(p.out_dtype)) ||
      !aligned(p.lse, 4) || !aligned(p.q_scale, 4) || !aligned(p.k_scale, 4) ||
      !aligned(p.rel_pos_table, 4) || !aligned(p.v_dequant, 4) ||
      (p.bias != nullptr && !aligned(p.bias, elem_bytes(p.bias_dtype)))) {
    return cudaErrorInvalidValue;
  }
  const WorkspaceLayout w = workspace_layout(p);
  if (w.total > 0 && (p.workspace == nullptr || !aligned(p.workspace, 16))) return cudaErrorInvalidValue;
  return cudaSuccess;
}

// BINFORMER_FWD_PACK_PAIRS=0 (read at every call: A/B in one process) keeps the 8-lanes pre-pass
// where the two-lanes one applies (16-bit K, 16-byte aligned rows, d <= 64).
bool pack_pairs_wanted() {
  const char* env = std::getenv("BINFORMER_FWD_PACK_PAIRS");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

cudaError_t launch_pack_keys(const PackKeysArgs& pk, DType dtype, bool vec_ok, unsigned blocks,
                             cudaStream_t stream) {
  if ((dtype == DType::kFloat16 || dtype == DType::kBFloat16) && vec_ok && pk.d <= 64 && pk.k_words == 4 &&
      pack_pairs_wanted()) {
    if (dtype == DType::kFloat16) fwd_pack_keys_pairs_kernel<false><<<blocks, kPackThreads, 0, stream>>>(pk);
    else fwd_pack_keys_pairs_kernel<true><<<blocks, kPackThreads, 0, stream>>>(pk);
    return cudaGetLastError();
  }
  if (dtype == DType::kFloat16) {
    if (vec_ok) fwd_pack_keys_kernel<DType::kFloat16, true><<<blocks, kPackThreads, 0, stream>>>(pk);
    else fwd_pack_keys_kernel<DType::kFloat16, false><<<blocks, kPackThreads, 0, stream>>>(pk);
  } else if (dtype == DType::kBFloat16) {
    if (vec_ok) fwd_pack_keys_kernel<DType::kBFloat16, true><<<blocks, kPackThreads, 0, stream>>>(pk);
    else fwd_pack_keys_kernel<DType::kBFloat16, false><<<blocks, kPackThreads, 0, stream>>>(pk);
  } else if (dtype == DType::kFloat32) {
    if (vec_ok) fwd_pack_keys_kernel<DType::kFloat32, true><<<blocks, kPackThreads, 0, stream>>>(pk);
    else fwd_pack_keys_kernel<DType::kFloat32, false><<<blocks, kPackThreads, 0, stream>>>(pk);
  } else {
    fwd_pack_keys_kernel<DType::kBits, false><<<blocks, kPackThreads, 0, stream>>>(pk);
  }
  return cudaGetLastError();
}

// ------------------------------------------------------------------ dispatch
bool instance_available(const fwd::FwdConfig& c) {
#define BINFORMER_FWD_HAVE(DV, PV, MASKED) \
  if (c.pv == PvKind::PV && c.dv_pad == DV && c.dv_masked == MASKED) return true;
  BINFORMER_FWD_INSTANCES_MINIMAL(BINFORMER_FWD_HAVE)
#if !defined(BINFORMER_CUDA_MINIMAL) || defined(BINFORMER_CUDA_BENCH_WIDTHS)
  BINFORMER_FWD_INSTANCES_BENCH_WIDTHS(BINFORMER_FWD_HAVE)
#endif
#if !defined(BINFORMER_CUDA_MINIMAL)
  BINFORMER_FWD_INSTANCES_FULL_ONLY(BINFORMER_FWD_HAVE)
#endif
#undef BINFORMER_FWD_HAVE
  return false;
}

cudaError_t run_instance(const fwd::FwdConfig& c, const FwdArgs& args, cudaStream_t stream) {
#define BINFORMER_FWD_RUN(DV, PV, MASKED)                                \
  if (c.pv == PvKind::PV && c.dv_pad == DV && c.dv_masked == MASKED) { \
    return fwd::run_attention_fwd<DV, PvKind::PV, MASKED>(args, stream); \
  }
  BINFORMER_FWD_INSTANCES_MINIMAL(BINFORMER_FWD_RUN)
#if !defined(BINFORMER_CUDA_MINIMAL) || defined(BINFORMER_CUDA_BENCH_WIDTHS)
  BINFORMER_FWD_INSTANCES_BENCH_WIDTHS(BINFORMER_FWD_RUN)
#endif
#if !defined(BINFORMER_CUDA_MINIMAL)
  BINFORMER_FWD_INSTANCES_FULL_ONLY(BINFORMER_FWD_RUN)
#endif
#undef BINFORMER_FWD_RUN
  return cudaErrorNotSupported;
}

PvKind pv_kind(const AttentionFwdParams& p) {
  if (p.pv_int8) return PvKind::kU8S8;
  if (p.v_dtype == DType::kFloat16) return PvKind::kF16;
  if (p.v_dtype == DType::kBFloat16) return PvKind::kBF16;
  return PvKind::kTF32x3;
}

}  // namespace

size_t attention_fwd_workspace_bytes(const AttentionFwdParams& p) {
  return workspace_layout(p).total;
}

cudaError_t attention_fwd(const AttentionFwdParams& p, cudaStream_t stream) {
  if (const cudaError_t err = validate(p); err != cudaSuccess) return err;
  if (p.B == 0 || p.H == 0 || p.Nq == 0) return cudaSuccess;
  fwd::FwdConfig config = fwd::fwd_select_config(pv_kind(p), p.v_dim);
  // In a BINFORMER_CUDA_MINIMAL build only the hdim64 instantiations exist: a masked (padded)
  // configuration may then run at the next larger padded width that was compiled.
  while (!instance_available(config) && config.dv_masked && config.dv_pad < kMaxHeadDim) {
    config.dv_pad *= 2;
  }
  if (!instance_available(config)) return cudaErrorNotSupported;

  const WorkspaceLayout w = workspace_layout(p);
  char* ws = static_cast<char*>(p.workspace);
  const bool ptk = per_token_k(p);

  FwdArgs args{};
  args.B = int(p.B);
  args.H = int(p.H);
  args.Nq = int(p.Nq);
  args.Nk = int(p.Nk);
  args.d = p.head_dim;
  args.dv = p.v_dim;
  args.k_words = p.head_dim <= 128 ? 4 : 8;
  args.q = p.q;
  args.q_dtype = p.q_dtype;
  for (int i = 0; i < 3; ++i) args.q_stride[i] = p.q_stride[i];
  args.q_vec_ok = p.q_dtype != DType::kBits && rows_aligned(p.q, p.q_stride, 3, elem_bytes(p.q_dtype), 16);

  if (p.Nk > 0) {
    args.nk_pad = int(w.nk_pad);
    args.k_bits = reinterpret_cast<uint32_t*>(ws + w.k_bits);
    args.k_colc = reinterpret_cast<float*>(ws + w.k_colc);
    args.k_scale_abs = ptk ? reinterpret_cast<float*>(ws + w.k_scale) : nullptr;
    args.relpos_off = p.rel_pos_table != nullptr ? reinterpret_cast<int*>(ws + w.relpos_off) : nullptr;

    PackKeysArgs pk{};
    pk.k = p.k;
    for (int i = 0; i < 3; ++i) pk.k_stride[i] = p.k_stride[i];
    const bool k_vec_ok =
        p.k_dtype != DType::kBits && rows_aligned(p.k, p.k_stride, 3, elem_bytes(p.k_dtype), 16);
    pk.H = int(p.H);
    pk.Nk = int(p.Nk);
    pk.d = p.head_dim;
    pk.k_words = args.k_words;
    set_pack_grid(pk, p.B * p.H, w.nk_pad);
    pk.k_scale = p.k_scale;
    for (int i = 0; i < 3; ++i) pk.k_scale_stride[i] = p.k_scale_stride[i];
    pk.k_bits = const_cast<uint32_t*>(args.k_bits);
    pk.k_colc = const_cast<float*>(args.k_colc);
    pk.k_scale_abs = const_cast<float*>(args.k_scale_abs);
    pk.relpos_off = const_cast<int*>(args.relpos_off);
    pk.relpos_prefix = p.num_prefix_tokens;
    pk.relpos_ww = p.rel_pos_ww;
    int64_t blocks = pk.pack_blocks;
    if (p.rel_pos_table != nullptr) {
      args.relpos_range = reinterpret_cast<float*>(ws + w.relpos_range);
      pk.relpos_table = p.rel_pos_table;
      pk.relpos_table_stride_h = p.rel_pos_table_stride_h;
      pk.relpos_table_size = int(int64_t(2 * p.rel_pos_wh - 1) * (2 * p.rel_pos_ww - 1) + 3);
      pk.relpos_range = const_cast<float*>(args.relpos_range);
      blocks += p.H;
    }
    if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
    if (const cudaError_t err = launch_pack_keys(pk, p.k_dtype, k_vec_ok, unsigned(blocks), stream);
        err != cudaSuccess) {
      return err;
    }
  }

  args.v = p.v;
  for (int i = 0; i < 3; ++i) args.v_stride[i] = p.v_stride[i];
  args.v_async_ok = rows_aligned(p.v, p.v_stride, 3, elem_bytes(p.v_dtype), 16);
  args.out = p.out;
  args.out_dtype = p.out_dtype;
  for (int i = 0; i < 3; ++i) args.out_stride[i] = p.out_stride[i];
  const int oe = elem_bytes(p.out_dtype);
  args.out_vec = rows_aligned(p.out, p.out_stride, 3, oe, 16)       ? 16 / oe
                 : rows_aligned(p.out, p.out_stride, 3, oe, 4 * oe) ? 4
                 : rows_aligned(p.out, p.out_stride, 3, oe, 2 * oe) ? 2
                                                                     : 1;
  args.lse = p.lse;

  args.q_scale = p.q_scale;
  for (int i = 0; i < 3; ++i) args.q_scale_stride[i] = p.q_scale_stride[i];
  if (p.k_scale != nullptr && !ptk) {
    args.k_scale_head = p.k_scale;
    args.k_scale_head_stride[0] = p.k_scale_stride[0];
    args.k_scale_head_stride[1] = p.k_scale_stride[1];
  }
  args.scale = p.scale;

  args.bias = p.bias;
  args.bias_dtype = p.bias_dtype;
  for (int i = 0; i < 4; ++i) args.bias_stride[i] = p.bias_stride[i];
  if (p.bias != nullptr) {
    const int be = elem_bytes(p.bias_dtype);
    args.bias_pair_ok = p.bias_stride[3] == 1 && rows_aligned(p.bias, p.bias_stride, 3, be, 2 * be);
  }
  args.relpos_table = p.rel_pos_table;
  args.relpos_table_stride_h = p.rel_pos_table_stride_h;
  args.relpos_wh = p.rel_pos_wh;
  args.relpos_ww = p.rel_pos_ww;
  args.relpos_prefix = p.rel_pos_table != nullptr ? p.num_prefix_tokens : 0;
  if (p.rel_pos_table != nullptr) {
    const int64_t tsize = int64_t(2 * p.rel_pos_wh - 1) * (2 * p.rel_pos_ww - 1) + 3;
    args.relpos_table_size = int(tsize);
    args.relpos_in_smem = tsize * int64_t(sizeof(float)) <= kRelPosSmemCapBytes;
  }
  args.causal = p.causal;
  args.v_dequant = p.v_dequant;
  // Overlap with the K pre-pass (launch_overlap.h) on sm_90 and newer, where the instructions
  // exist: the kernel follows the pre-pass in the stream (Nk > 0).
  args.pdl = p.Nk > 0 && fwd_pdl_requested() && device_compute_capability() >= 90;
  return run_instance(config, args, stream);
}

}  // namespace binformer::cuda
