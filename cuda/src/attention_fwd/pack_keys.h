// The forward K pre-pass kernel (launched by attention_fwd.cu; a header so that the host
// emulator in host_emulation/ runs the same source).
#pragma once
#include <cstdint>

#include "binformer/params.h"
#include "launch_overlap.h"
#include "sign_pack.h"

namespace binformer::cuda::fwd {

// One block packs one 128-key slab of one head (nk_pad is a multiple of 128, so a slab never
// straddles heads), one key row a thread.
inline constexpr int kPackThreads = 128;
inline constexpr int kPackRowsPerBlock = 128;

// ------------------------------------------------------------------ K pre-pass
// Packs every key row once (instead of once per query block): signs (flipped where the key's
// scale factor is negative), the popcount correction constant, |k_scale| and the rel-pos column
// offsets; with a rel-pos table, H extra blocks write each head's table maximum and minimum.
// One thread owns a whole row: its sign words, popcount, complement and constants need no
// shuffles, and the row goes out as one or two 16-byte stores (v15; the earlier 8-lanes-a-row
// kernel spent ~41 warp instructions a row on per-lane copies of the row work: NOTES v13-v15).
// The block's head comes from one 32-bit division per block: no 64-bit division per thread
// (which made the first version compute-bound at a third of the copy bandwidth). Rows past Nk
// are written as zero rows.
struct PackKeysArgs {
  const void* k;
  int64_t k_stride[3];
  int H, Nk, d, k_words;
  int nk_pad, blocks_per_head;  // blocks_per_head = nk_pad / kPackRowsPerBlock
  int64_t pack_blocks;          // B * H * blocks_per_head (then the rel-pos range blocks)
  const float* k_scale;
  int64_t k_scale_stride[3];
  uint32_t* k_bits;
  float* k_colc;
  float* k_scale_abs;
  int* relpos_off;
  int relpos_prefix, relpos_ww;
  const float* relpos_table;  // with relpos_range: the extra blocks' input / output
  int64_t relpos_table_stride_h;
  int relpos_table_size;
  float* relpos_range;
};

// The packing grid for BH heads of nk_pad (a multiple of kPackRowsPerBlock) rows each.
inline void set_pack_grid(PackKeysArgs& pk, int64_t bh_count, int64_t nk_pad) {
  pk.nk_pad = int(nk_pad);
  pk.blocks_per_head = int(nk_pad / kPackRowsPerBlock);
  pk.pack_blocks = bh_count * pk.blocks_per_head;
}

template <int kThreads>
__device__ void relpos_range_block(const PackKeysArgs& a, int h) {
  __shared__ float part[2][kThreads / 32];
  const float* table = a.relpos_table + int64_t(h) * a.relpos_table_stride_h;
  float mx = -__builtin_huge_valf(), mn = __builtin_huge_valf();
  for (int idx = threadIdx.x; idx < a.relpos_table_size; idx += kThreads) {
    const float v = __ldg(table + idx);
    mx = fmaxf(mx, v);
    mn = fminf(mn, v);
  }
#pragma unroll
  for (int sh = 16; sh >= 1; sh /= 2) {
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, sh));
    mn = fminf(mn, __shfl_xor_sync(0xffffffffu, mn, sh));
  }
  if (threadIdx.x % 32 == 0) {
    part[0][threadIdx.x / 32] = mx;
    part[1][threadIdx.x / 32] = mn;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kThreads / 32; ++w) {
      mx = fmaxf(mx, part[0][w]);
      mn = fminf(mn, part[1][w]);
    }
    a.relpos_range[2 * h] = mx;
    a.relpos_range[2 * h + 1] = mn;
  }
}

template <DType kDtype, bool kVec>
__global__ void __launch_bounds__(kPackThreads)
    fwd_pack_keys_kernel(const __grid_constant__ PackKeysArgs a) {
  // The attention kernel may launch once every block of this grid has started (launch.h): its
  // blocks then take the SMs this grid's last wave leaves idle and wait for the workspace there.
  griddep_launch_dependents();
  if (int64_t(blockIdx.x) >= a.pack_blocks) {
    relpos_range_block<kPackThreads>(a, int(blockIdx.x - a.pack_blocks));
    return;
  }
  const uint32_t bh = blockIdx.x / uint32_t(a.blocks_per_head);
  const int j = int(blockIdx.x - bh * uint32_t(a.blocks_per_head)) * kPackRowsPerBlock + int(threadIdx.x);
  const uint32_t b = bh / uint32_t(a.H), h = bh - b * uint32_t(a.H);
  const bool in_range = j < a.Nk;
  const int j_load = in_range ? j : a.Nk - 1;  // rows past Nk read a row that exists, then zero it
  const int d_bytes = a.d / 8;
  const int esize = kDtype == DType::kFloat16 || kDtype == DType::kBFloat16 ? 2 : 4;
  const char* k_row = static_cast<const char*>(a.k) +
                      (int64_t(b) * a.k_stride[0] + int64_t(h) * a.k_stride[1] + int64_t(j_load) * a.k_stride[2]) * esize;
  const float scale = a.k_scale != nullptr ? __ldg(a.k_scale + int64_t(b) * a.k_scale_stride[0] +
                                                   int64_t(h) * a.k_scale_stride[1] +
                                                   int64_t(j_load) * a.k_scale_stride[2])
                                           : 1.0f;
  uint32_t words[8];
  pack_sign_words<8, kDtype, kVec>(k_row, 0, d_bytes, words);
  const uint32_t flip = scale < 0.0f ? 0xFFFFFFFFu : 0u;
  int pc = 0;
#pragma unroll
  for (int w = 0; w < 8; ++w) {
    words[w] = in_range ? words[w] ^ (flip & row_word_mask(w, a.d)) : 0u;
    pc += __popc(words[w]);
  }
  // d <= 64: words 2-3 (zero for every reader of words 0-1, and ANDed with zero Q words past d
  // by the others) hold the complement ~k within d, for the P table's p(~q & ~k)
  // (kernel_bounded.h). Rows past Nk get all d bits: their keys are masked.
  if (a.d <= 64) {
    words[2] = ~words[0] & row_word_mask(0, a.d);
    words[3] = ~words[1] & row_word_mask(1, a.d);
  }
  const int64_t row = int64_t(bh) * a.nk_pad + j;
  uint4* kb = reinterpret_cast<uint4*>(a.k_bits + row * a.k_words);  // 16-byte aligned rows
  kb[0] = make_uint4(words[0], words[1], words[2], words[3]);
  if (a.k_words == 8) kb[1] = make_uint4(words[4], words[5], words[6], words[7]);
  // -(1.5 * 2^24) - 2 p(k_j): exact in fp32 (2-unit steps in that binade), see kernel.h.
  a.k_colc[row] = -(25165824.0f + 2.0f * float(pc));
  if (a.k_scale_abs != nullptr) a.k_scale_abs[row] = in_range ? fabsf(scale) : 0.0f;
  if (a.relpos_off != nullptr && bh == 0) {
    int off = 0;
    if (in_range && j >= a.relpos_prefix) {
      const int pj = j - a.relpos_prefix;
      off = (pj / a.relpos_ww) * (2 * a.relpos_ww - 1) + pj % a.relpos_ww;
    }
    a.relpos_off[j] = off;
  }
}

// A/B arm for device run 49 (BINFORMER_FWD_PACK_LANES=1): the v13-v14 kernel, 8 lanes a row.
inline constexpr int kPackLanesThreads = 256;
inline constexpr int kPackLanesRowsPerThread = kPackRowsPerBlock / (kPackLanesThreads / 8);

template <DType kDtype, bool kVec>
__global__ void __launch_bounds__(kPackLanesThreads)
    fwd_pack_keys_lanes_kernel(const __grid_constant__ PackKeysArgs a) {
  // The attention kernel may launch once every block of this grid has started (launch.h): its
  // blocks then take the SMs this grid's last wave leaves idle and wait for the workspace there.
  griddep_launch_dependents();
  if (int64_t(blockIdx.x) >= a.pack_blocks) {
    relpos_range_block<kPackLanesThreads>(a, int(blockIdx.x - a.pack_blocks));
    return;
  }
  const uint32_t bh = blockIdx.x / uint32_t(a.blocks_per_head);
  const int j0 = int(blockIdx.x - bh * uint32_t(a.blocks_per_head)) * kPackRowsPerBlock + int(threadIdx.x / 8);
  const uint32_t b = bh / uint32_t(a.H), h = bh - b * uint32_t(a.H);
  const int c = int(threadIdx.x % 8);
  const int d_bytes = a.d / 8;
  const int esize = kDtype == DType::kFloat16 || kDtype == DType::kBFloat16 ? 2 : 4;
  const char* k_head = static_cast<const char*>(a.k) + (int64_t(b) * a.k_stride[0] + int64_t(h) * a.k_stride[1]) * esize;
  // Every load of a thread is issued before its first use: loads under per-row / per-chunk
  // branches were issued one DRAM round trip after another (ncu, ViT-B: 25 us for 47 MB; NOTES
  // v13). Rows past Nk read row Nk - 1 and chunks past d read chunk 0 (both exist), and are
  // zeroed afterwards; the chunk loop's condition is uniform across the block.
  uint32_t bytes[kPackLanesRowsPerThread][4] = {};
  float bj[kPackLanesRowsPerThread];
#pragma unroll
  for (int i = 0; i < kPackLanesRowsPerThread; ++i) {
    const int j = j0 + i * (kPackLanesThreads / 8), j_load = min(j, a.Nk - 1);
    const float scale = a.k_scale != nullptr ? __ldg(a.k_scale + int64_t(b) * a.k_scale_stride[0] +
                                                     int64_t(h) * a.k_scale_stride[1] +
                                                     int64_t(j_load) * a.k_scale_stride[2])
                                             : 1.0f;
    bj[i] = j < a.Nk ? scale : 1.0f;
  }
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    if (8 * q >= d_bytes) break;
    const bool chunk_ok = c + 8 * q < d_bytes;
#pragma unroll
    for (int i = 0; i < kPackLanesRowsPerThread; ++i) {
      const int j = j0 + i * (kPackLanesThreads / 8);
      const char* k_row = k_head + int64_t(min(j, a.Nk - 1)) * a.k_stride[2] * esize;
      const uint32_t v = load_sign_byte(k_row, kDtype, chunk_ok ? c + 8 * q : 0, kVec);
      bytes[i][q] = chunk_ok && j < a.Nk ? v : 0u;
    }
  }
  const int64_t row0 = int64_t(bh) * a.nk_pad;
#pragma unroll
  for (int i = 0; i < kPackLanesRowsPerThread; ++i) {
    const int j = j0 + i * (kPackLanesThreads / 8);
    const uint32_t flip = bj[i] < 0.0f ? 0xFFu : 0u;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      if (c + 8 * q < d_bytes) bytes[i][q] ^= flip;
    }
    // Row popcount over the row's 8 lanes (rows never straddle an 8-lane group).
    int pc = __popc(bytes[i][0]) + __popc(bytes[i][1]) + __popc(bytes[i][2]) + __popc(bytes[i][3]);
    pc += __shfl_xor_sync(0xffffffffu, pc, 1);
    pc += __shfl_xor_sync(0xffffffffu, pc, 2);
    pc += __shfl_xor_sync(0xffffffffu, pc, 4);
    const int64_t row = row0 + j;
    unsigned char* kb = reinterpret_cast<unsigned char*>(a.k_bits) + row * a.k_words * 4;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      if (q < a.k_words / 2) kb[c + 8 * q] = static_cast<unsigned char>(bytes[i][q]);
    }
    // d <= 64: words 2-3 (zero for every reader of words 0-1, and ANDed with zero Q words past d
    // by the others) hold the complement ~k within d, for the P table's p(~q & ~k)
    // (kernel_bounded.h). Rows past Nk get all d bits: their keys are masked.
    if (d_bytes <= 8) kb[c + 8] = c < d_bytes ? static_cast<unsigned char>(~bytes[i][0]) : 0;
    if (c == 0) {
      // -(1.5 * 2^24) - 2 p(k_j): exact in fp32 (2-unit steps in that binade), see kernel.h.
      a.k_colc[row] = -(25165824.0f + 2.0f * float(pc));
      if (a.k_scale_abs != nullptr) a.k_scale_abs[row] = j < a.Nk ? fabsf(bj[i]) : 0.0f;
    }
    if (c == 1 && a.relpos_off != nullptr && bh == 0) {
      int off = 0;
      if (j < a.Nk && j >= a.relpos_prefix) {
        const int pj = j - a.relpos_prefix;
        off = (pj / a.relpos_ww) * (2 * a.relpos_ww - 1) + pj % a.relpos_ww;
      }
      a.relpos_off[j] = off;
    }
  }
}

}  // namespace binformer::cuda::fwd
