// The forward kernel's argument block: AttentionFwdParams after validation, with everything the
// kernel would otherwise recompute per block (alignment decisions, broadcast classification,
// workspace pointers) decided once on the host.
#pragma once
#include <cstdlib>
#include <cstring>
#include <cstdint>

#include "binformer/params.h"

namespace binformer::cuda::fwd {

// A TMA tensor map (CUtensorMap: 128 opaque bytes, 128-byte aligned since CUDA 13), encoded on the host
// (tma_desc.h). The host emulator stores its own description of the tensor in the same bytes.
struct alignas(128) TmaDescriptor {
  uint64_t opaque[16];
};
// The tensor a TmaDescriptor describes: a [dims[3]][dims[2]][dims[1]][dims[0]] array of 16-bit
// elements (dims[0] contiguous) with byte strides for dims 1-3, read in boxes of box[0..3]
// elements whose rows of box[0] * 2 bytes land swizzled over that span (none for 16 bytes;
// tma_desc.h encodes it; the host emulator copies it).
struct TmaTensor4d {
  const void* base;
  uint64_t dims[4];
  uint64_t strides[3];
  uint32_t box[4];
};
static_assert(sizeof(TmaTensor4d) <= sizeof(TmaDescriptor), "the emulator keeps the geometry in the descriptor");

// The K pre-pass (attention_fwd.cu) writes, per (batch*head, key) row of nk_pad rows:
//   k_bits      [B*H][nk_pad][k_words] uint32   signs of k (flipped where k_scale < 0), zero pad
//   k_colc      [B*H][nk_pad] float            -(2^23 + 2^22) - 2*popcount(k bits): the column
//                                               half of the popcount correction, see kernel.h
//   k_scale_abs [B*H][nk_pad] float            |b_j|, only for per-token k_scale (else nullptr)
//   relpos_off  [nk_pad] int                   rel-pos column offset y_j*(2Ww-1)+x_j (0 for cls)
//   relpos_range [H][2] float                  max and min of each head's rel-pos table (for
//                                               the bounded kernels' a-priori row maximum)
// Rows at or past Nk are zero bits with k_colc = -(2^23 + 2^22), k_scale_abs = 0, relpos_off = 0.
struct FwdArgs {
  int B, H, Nq, Nk;
  int d;             // sign bits per q/k row
  int dv;            // value channels (<= the kernel's padded width)
  int k_words;       // 4 (d <= 128: one m16n8k128 b1 mma) or 8 (d <= 256: one m16n8k256)
  int num_m_blocks;  // ceil(Nq / block_m), filled in by the launcher

  // q: float rows packed in the kernel, or prepacked bits.
  const void* q;
  DType q_dtype;
  int64_t q_stride[3];
  bool q_vec_ok;  // 16-byte vector loads are aligned for every row

  const uint32_t* k_bits;
  const float* k_colc;
  const float* k_scale_abs;
  const int* relpos_off;
  int nk_pad;

  const void* v;  // fp16 / bf16 / fp32 / int8 (pv_int8)
  int64_t v_stride[3];
  bool v_async_ok;  // every V row chunk is 16-byte aligned (cp.async); else synchronous copies
  // V as a [B][H][Nk][dv] 16-bit tensor for the TMA key tiles (Tr::kTma kernels; tma_desc.h):
  // boxes of one wgmma column block (8 W channels) x one key tile, keys past Nk zero-filled.
  TmaDescriptor v_tma;

  void* out;
  DType out_dtype;
  int64_t out_stride[3];
  int out_vec;  // widest aligned store, in elements: 16 bytes (8 fp16/bf16, 4 fp32), else 4, 2 or 1
  float* lse;   // [B,H,Nq] or nullptr

  // Row factor a_i (any broadcast) and, when k_scale is constant per (b,h), that constant.
  const float* q_scale;
  int64_t q_scale_stride[3];
  const float* k_scale_head;  // per-(b,h) k_scale folded into the row factor, or nullptr
  int64_t k_scale_head_stride[2];
  float scale;

  const void* bias;  // dense additive bias or nullptr
  DType bias_dtype;
  int64_t bias_stride[4];
  bool bias_pair_ok;  // last stride 1 and pairs of elements aligned for one vector load

  const float* relpos_table;  // [H, T] or nullptr
  int64_t relpos_table_stride_h;
  int relpos_wh, relpos_ww, relpos_prefix, relpos_table_size;
  bool relpos_in_smem;  // the head's table is copied to shared memory (else read through L1)
  const float* relpos_range;  // [H][2] (max, min) of each head's table, from the K pre-pass
  int relpos_window;          // bounded kernels: floats of the largest per-block table window
  // Bounded kernels, windows too large for shared memory: each key tile's stage holds only the
  // table rows that tile needs with the block's rows (relpos_slice floats at most), streamed
  // with the tile; the window then holds only the 3 cls entries.
  bool relpos_stream;
  int relpos_slice;

  bool causal;
  const float* v_dequant;  // [B,H,Dv] (pv_int8)

  // Launched as a programmatic dependent of the K pre-pass (sm_90+; launch_overlap.h).
  bool pdl;
};

// The P table of the sm_90a bounded kernels (kernel_bounded.h, NOTES v12): one row factor per
// (b, h) (no per-token q_scale; a per-token k scale never reaches the bounded kernels), d <= 64,
// no rel-pos. BINFORMER_FWD_PTABLE=0 (read at every call: A/B in one process) keeps ex2.
inline bool fwd_p_table_wanted(const FwdArgs& a) {
  const char* env = std::getenv("BINFORMER_FWD_PTABLE");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  return a.q_scale == nullptr || a.q_scale_stride[2] == 0;
}

}  // namespace binformer::cuda::fwd
