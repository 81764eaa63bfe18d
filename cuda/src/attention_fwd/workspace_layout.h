// Layout of attention_fwd's workspace (host side; shared with the tests, which inspect the K
// pre-pass output to localise failures). See fwd_args.h for what each region holds.
#pragma once
#include <cstddef>
#include <cstdint>

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
