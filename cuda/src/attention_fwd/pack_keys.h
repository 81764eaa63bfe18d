// The forward K pre-pass kernel (launched by attention_fwd.cu; a header so that the host
// emulator in host_emulation/ runs the same source).
#pragma once
#include <cstdint>

#include "binformer/params.h"
#include "launch_overlap.h"
#include "sign_pack.h"

namespace binformer::cuda::fwd {

inline constexpr int kPackThreads = 256;
// One block packs one 128-key slab of one head (nk_pad is a multiple of 128, so a slab never
// straddles heads): 32 rows x 8 lanes, each thread 4 rows 32 apart.
inline constexpr int kPackRowsPerBlock = 128;
inline constexpr int kPackRowsPerThread = kPackRowsPerBlock / (kPackThreads / 8);

// ------------------------------------------------------------------ K pre-pass
// Packs every key row once (instead of once per query block): signs (flipped where the key's
// scale factor is negative), the popcount correction constant, |k_scale| and the rel-pos column
// offsets; with a rel-pos table, H extra blocks write each head's table maximum and minimum.
// 8 lanes per row; lane c owns the sign bytes c, c + 8 (, c + 16, c + 24) of the k_words-word
// row (zero past d). Each byte is one 16-byte load of 16-bit K (two of fp32), all loads of a
// thread (4 rows) are issued together and 8 lanes read a row's 128 contiguous bytes (d = 64,
// fp16). The block's head comes from one 32-bit division per block: no 64-bit division per
// thread (which made the first version compute-bound at a third of the copy bandwidth). Rows
// past Nk are written as zero rows.
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

__device__ void relpos_range_block(const PackKeysArgs& a, int h) {
  __shared__ float part[2][kPackThreads / 32];
  const float* table = a.relpos_table + int64_t(h) * a.relpos_table_stride_h;
  float mx = -__builtin_huge_valf(), mn = __builtin_huge_valf();
  for (int idx = threadIdx.x; idx < a.relpos_table_size; idx += kPackThreads) {
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
    for (int w = 1; w < kPackThreads / 32; ++w) {
      mx = fmaxf(mx, part[0][w]);
      mn = fminf(mn, part[1][w]);
    }
    a.relpos_range[2 * h] = mx;
    a.relpos_range[2 * h + 1] = mn;
  }
}

// Per-row pieces of both pre-pass kernels: key j's scale factor (1 without k_scale), the column
// constant -(1.5 * 2^24) - 2 p(k_j) (exact in fp32: 2-unit steps in that binade, see kernel.h),
// and key j's rel-pos column offset (0 for prefix keys and rows past Nk).
__device__ __forceinline__ float key_scale(const PackKeysArgs& a, uint32_t b, uint32_t h, int j) {
  return a.k_scale != nullptr ? __ldg(a.k_scale + int64_t(b) * a.k_scale_stride[0] +
                                      int64_t(h) * a.k_scale_stride[1] + int64_t(j) * a.k_scale_stride[2])
                              : 1.0f;
}
// The key row this thread packs, with kLanes lanes a row and kPackRowsPerBlock rows a block (a
// block covers one slab of one head): the head's (b * H + h, b, h) and the key index j.
struct KeyRow {
  uint32_t bh, b, h;
  int j;
};
template <int kLanes>
__device__ __forceinline__ KeyRow key_row_of(const PackKeysArgs& a) {
  const uint32_t bh = blockIdx.x / uint32_t(a.blocks_per_head);
  const int j = int(blockIdx.x - bh * uint32_t(a.blocks_per_head)) * kPackRowsPerBlock + int(threadIdx.x / kLanes);
  const uint32_t b = bh / uint32_t(a.H);
  return KeyRow{bh, b, bh - b * uint32_t(a.H), j};
}
__device__ __forceinline__ float key_colc(int popcount) { return -(25165824.0f + 2.0f * float(popcount)); }
__device__ __forceinline__ void write_relpos_off(const PackKeysArgs& a, int j) {
  int off = 0;
  if (j < a.Nk && j >= a.relpos_prefix) {
    const int pj = j - a.relpos_prefix;
    off = (pj / a.relpos_ww) * (2 * a.relpos_ww - 1) + pj % a.relpos_ww;
  }
  a.relpos_off[j] = off;
}

template <DType kDtype, bool kVec>
__global__ void __launch_bounds__(kPackThreads)
    fwd_pack_keys_kernel(const __grid_constant__ PackKeysArgs a) {
  // The attention kernel may launch once every block of this grid has started (launch.h): its
  // blocks then take the SMs this grid's last wave leaves idle and wait for the workspace there.
  griddep_launch_dependents();
  if (int64_t(blockIdx.x) >= a.pack_blocks) {
    relpos_range_block(a, int(blockIdx.x - a.pack_blocks));
    return;
  }
  const auto [bh, b, h, j0] = key_row_of<8>(a);
  const int c = int(threadIdx.x % 8);
  const int d_bytes = a.d / 8;
  const int esize = kDtype == DType::kFloat16 || kDtype == DType::kBFloat16 ? 2 : 4;
  const char* k_head = static_cast<const char*>(a.k) + (int64_t(b) * a.k_stride[0] + int64_t(h) * a.k_stride[1]) * esize;
  // Every load of a thread is issued before its first use: loads under per-row / per-chunk
  // branches were issued one DRAM round trip after another (ncu, ViT-B: 25 us for 47 MB; NOTES
  // v13). Rows past Nk read row Nk - 1 and chunks past d read chunk 0 (both exist), and are
  // zeroed afterwards; the chunk loop's condition is uniform across the block.
  uint32_t bytes[kPackRowsPerThread][4] = {};
  float bj[kPackRowsPerThread];
#pragma unroll
  for (int i = 0; i < kPackRowsPerThread; ++i) {
    const int j = j0 + i * (kPackThreads / 8);
    const float scale = key_scale(a, b, h, min(j, a.Nk - 1));  // (unconditional: loads in flight together)
    bj[i] = j < a.Nk ? scale : 1.0f;
  }
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    if (8 * q >= d_bytes) break;
    const bool chunk_ok = c + 8 * q < d_bytes;
#pragma unroll
    for (int i = 0; i < kPackRowsPerThread; ++i) {
      const int j = j0 + i * (kPackThreads / 8);
      const char* k_row = k_head + int64_t(min(j, a.Nk - 1)) * a.k_stride[2] * esize;
      const uint32_t v = load_sign_byte(k_row, kDtype, chunk_ok ? c + 8 * q : 0, kVec);
      bytes[i][q] = chunk_ok && j < a.Nk ? v : 0u;
    }
  }
  const int64_t row0 = int64_t(bh) * a.nk_pad;
#pragma unroll
  for (int i = 0; i < kPackRowsPerThread; ++i) {
    const int j = j0 + i * (kPackThreads / 8);
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
      a.k_colc[row] = key_colc(pc);
      if (a.k_scale_abs != nullptr) a.k_scale_abs[row] = j < a.Nk ? fabsf(bj[i]) : 0.0f;
    }
    if (c == 1 && a.relpos_off != nullptr && bh == 0) write_relpos_off(a, j);
  }
}

// The pre-pass for 16-bit K with 16-byte aligned rows at d <= 64 (k_words = 4; NOTES v17): two
// lanes a row. Lane p of a pair loads the 16-byte chunks p, p + 2, p + 4, p + 6 of its row, so that
// each of its 4 loads (all in flight before the first use) and its partner's cover one whole
// 32-byte sector (the 8-lanes kernel above repeats the row's address, factor and popcount
// shuffles on 8 lanes: 41 warp instructions a row, ncu run 40; one thread a row, v15, read half
// sectors and measured slower). One shuffle swaps the pair's sign bytes; the even lane writes
// the row (sign words, then ~k within d) as one 16-byte store, the odd lane the constants.
template <bool kBF16>
__global__ void __launch_bounds__(kPackThreads)
    fwd_pack_keys_pairs_kernel(const __grid_constant__ PackKeysArgs a) {
  griddep_launch_dependents();  // (as fwd_pack_keys_kernel)
  if (int64_t(blockIdx.x) >= a.pack_blocks) {
    relpos_range_block(a, int(blockIdx.x - a.pack_blocks));
    return;
  }
  const auto [bh, b, h, j] = key_row_of<2>(a);
  const int p = int(threadIdx.x % 2);
  const int d_bytes = a.d / 8;
  const int j_load = min(j, a.Nk - 1);  // (rows past Nk read row Nk - 1, then count as zero)
  const float scale = key_scale(a, b, h, j_load);
  const uint4* k_row = reinterpret_cast<const uint4*>(
      static_cast<const char*>(a.k) +
      (int64_t(b) * a.k_stride[0] + int64_t(h) * a.k_stride[1] + int64_t(j_load) * a.k_stride[2]) * 2);
  uint4 chunk[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) chunk[k] = __ldg(k_row + (p + 2 * k < d_bytes ? p + 2 * k : 0));
  const bool row_ok = j < a.Nk;
  const uint32_t flip = row_ok && scale < 0.0f ? 0xFFu : 0u;
  uint32_t mine = 0;  // this lane's sign bytes p, p + 2, p + 4, p + 6 of the row, in bytes 0..3
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const uint32_t byte = (signs_of_8x16<kBF16>(chunk[k]) ^ flip) & 0xFFu;
    mine |= (row_ok && p + 2 * k < d_bytes ? byte : 0u) << (8 * k);
  }
  const uint32_t other = __shfl_xor_sync(0xffffffffu, mine, 1);
  const uint32_t even = p == 0 ? mine : other, odd = p == 0 ? other : mine;  // row bytes 0,2,4,6 / 1,3,5,7
  const uint32_t w0 = (even & 0xFFu) | ((odd & 0xFFu) << 8) | ((even & 0xFF00u) << 8) | ((odd & 0xFF00u) << 16);
  const uint32_t w1 = ((even >> 16) & 0xFFu) | ((odd >> 8) & 0xFF00u) | ((even >> 8) & 0xFF0000u) | (odd & 0xFF000000u);
  const int64_t row = int64_t(bh) * a.nk_pad + j;
  if (p == 0) {
    // words 2-3: ~k within d (the P table's p(~q & ~k), see fwd_pack_keys_kernel); rows past Nk
    // get all d bits (their keys are masked)
    const uint32_t m0 = d_bytes >= 4 ? ~0u : (1u << (8 * d_bytes)) - 1u;
    const uint32_t m1 = d_bytes >= 8 ? ~0u : d_bytes > 4 ? (1u << (8 * (d_bytes - 4))) - 1u : 0u;
    reinterpret_cast<uint4*>(a.k_bits)[row] = make_uint4(w0, w1, ~w0 & m0, ~w1 & m1);
  } else {
    const int pc = __popc(w0) + __popc(w1);
    a.k_colc[row] = key_colc(pc);
    if (a.k_scale_abs != nullptr) a.k_scale_abs[row] = row_ok ? fabsf(scale) : 0.0f;
    if (a.relpos_off != nullptr && bh == 0) write_relpos_off(a, j);
  }
}

}  // namespace binformer::cuda::fwd
