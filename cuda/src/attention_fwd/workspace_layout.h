// Layout of attention_fwd's workspace (host side; shared with the tests, which inspect the K
// pre-pass output to localise failures). See fwd_args.h for what each region holds.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "binformer/params.h"

namespace binformer::cuda::fwd {

inline constexpr int64_t kNkPadMultiple = 128;  // >= every key tile: whole tiles, no K predicates

struct WorkspaceLayout {
  int64_t nk_pad = 0;
  int k_words = 0;  // 4 (d <= 128) or 8
  size_t k_bits = 0, k_colc = 0, k_scale = 0, relpos_off = 0, relpos_range = 0;  // byte offsets
  size_t total = 0;  // size
};

inline bool fwd_per_token_k(const AttentionFwdParams& p) {
  return p.k_scale != nullptr && p.k_scale_stride[2] != 0;
}

// v10: the bounded kernels pack K themselves (kernel_bounded.h, "fused K") instead of reading
// the K pre-pass output, when the call runs a bounded kernel without rel-pos (fp16/bf16 V, no
// pv_int8, no dense bias, no per-token k scale; the rel-pos kernels need the pre-pass's
// relpos_off and relpos_range), q and k are the same float dtype with 16-byte aligned rows, and
// Nk <= BINFORMER_FWD_FUSED_K_MAX_NK. The pre-pass is then not launched at all (the workspace
// keeps its size; its K regions stay unwritten). BINFORMER_FWD_FUSED_K (read at every call):
// "0" never, "1" wherever supported up to kFusedKForceMaxNk keys (the resident K area of a block
// is ceil(Nk / block_n) * (block_n * (16 or 48) + block_n * 4) bytes of shared memory).
#ifndef BINFORMER_FWD_FUSED_K_MAX_NK
#define BINFORMER_FWD_FUSED_K_MAX_NK 256
#endif
inline constexpr int64_t kFusedKForceMaxNk = 2048;

inline bool fwd_rows_aligned16(const void* p, const int64_t* stride, int esize) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  for (int i = 0; i < 3; ++i) {
    if ((stride[i] * esize) % 16 != 0) return false;
  }
  return true;
}

inline bool fwd_k_fused(const AttentionFwdParams& p) {
#if defined(BINFORMER_FWD_BOUNDED) && !BINFORMER_FWD_BOUNDED
  return false;  // (no bounded kernels in this build)
#endif
  const char* env = std::getenv("BINFORMER_FWD_FUSED_K");
  const int mode = env == nullptr ? -1 : std::strcmp(env, "0") == 0 ? 0 : std::strcmp(env, "1") == 0 ? 1 : -1;
  if (mode == 0 || p.Nk <= 0) return false;
  const int64_t bound = mode == 1 ? kFusedKForceMaxNk : int64_t(BINFORMER_FWD_FUSED_K_MAX_NK);
  if (p.Nk > bound) return false;
  const bool bounded = !p.pv_int8 && (p.v_dtype == DType::kFloat16 || p.v_dtype == DType::kBFloat16) &&
                       p.bias == nullptr && p.rel_pos_table == nullptr && !fwd_per_token_k(p);
  if (!bounded) return false;
  const bool fdt = p.k_dtype == DType::kFloat16 || p.k_dtype == DType::kBFloat16 || p.k_dtype == DType::kFloat32;
  if (!fdt || p.q_dtype != p.k_dtype) return false;
  const int esize = p.k_dtype == DType::kFloat32 ? 4 : 2;
  return fwd_rows_aligned16(p.q, p.q_stride, esize) && fwd_rows_aligned16(p.k, p.k_stride, esize);
}

inline WorkspaceLayout fwd_workspace_layout(const AttentionFwdParams& p) {
  WorkspaceLayout w;
  if (p.B <= 0 || p.H <= 0 || p.Nq <= 0 || p.Nk <= 0) return w;
  w.nk_pad = (p.Nk + kNkPadMultiple - 1) / kNkPadMultiple * kNkPadMultiple;
  w.k_words = p.head_dim <= 128 ? 4 : 8;
  const size_t rows = size_t(p.B) * size_t(p.H) * size_t(w.nk_pad);
  auto take = [&w](size_t bytes) {
    const size_t off = w.total;
    w.total += (bytes + 255) / 256 * 256;
    return off;
  };
  w.k_bits = take(rows * size_t(w.k_words) * 4);
  w.k_colc = take(rows * 4);
  if (fwd_per_token_k(p)) w.k_scale = take(rows * 4);
  if (p.rel_pos_table != nullptr) {
    w.relpos_off = take(size_t(w.nk_pad) * 4);
    w.relpos_range = take(size_t(p.H) * 2 * 4);  // per head: max, min of the table
  }
  return w;
}

}  // namespace binformer::cuda::fwd
