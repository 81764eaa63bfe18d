// binformer forward attention: the main kernel (FlashAttention-2 structure, mma.sync, sm80+).
//
//   S_ij = scale * a_i * b_j * <sign q_i, sign k_j> + bias_ij + relpos_ij   (+ causal mask)
//   P = softmax_j(S) (online, fp32, exp2),  out = P V,  lse_i = log sum_j exp(S_ij)
//
// One block owns kBlockM query rows of one (batch, head); each warp owns kMTiles m16 row tiles.
// Per key tile of kBlockN keys (visited last to first, see tile_config.h):
//   mainloop  cp.async pipeline: packed K bits + per-key constants + V tile -> shared memory
//   scores    b1 mma (AND + popcount) of the Q bits (registers) with the K bits, integer ->
//             float with the magic-number trick, optional per-key scale, bias, mask, row max
//   softmax   online max/sum in log2 units, conditional rescaling of the accumulator
//   P.V       P converted in registers (the C layout of the score mma is the A layout of the
//             P.V mma, FlashAttention-2's register reuse) and multiplied with V via ldmatrix
//   epilogue  normalise, write out and lse
//
// Sign folding: negative factors are moved into the bits, so that every row factor is >= 0 and
// the row max can be taken on the unscaled dot product. s_ij = |scale a_i| |b_j| <q'_i, k'_j>
// where q'_i = q_i with all d bits flipped when scale * a_i < 0 (done when Q is packed) and
// k'_j flipped when b_j < 0 (done by the K pre-pass). Flipping every bit negates <.,.>.
//
// Popcount correction: <q, k> = 4 p(q & k) - 2 p(q) - 2 p(k) + d. The mma gives r = p(q & k);
// in the binade [2^24, 2^25) one unit of the float bits is 2, so with
// rowc_i = 0x4BC00000 + d/2 - p(q_i) (an integer added to the bits of 1.5 * 2^24) and
// colc_j = -(1.5 * 2^24) - 2 p(k_j):
//   __int_as_float(2 r + rowc_i) + colc_j = <q_i, k_j>  exactly (one IMAD + one FADD, no I2F,
// which would run at the MUFU rate and compete with the exponentials). d is a multiple of 8.
#pragma once
#if !defined(BINFORMER_FWD_HOST_EMULATION)
#include <cuda_runtime.h>
#endif

#include <cstdint>
#include <type_traits>

#include "fwd_args.h"
#include "launch_overlap.h"
#include "ptx.h"
#include "sign_pack.h"
#include "tile_config.h"

// Every k-th n8 block of an unmasked tile computes 2^x with the FMA-pipe polynomial instead of
// MUFU.EX2 (0 = never). A measurement knob, see cuda/NOTES_attention_fwd.md.
#ifndef BINFORMER_FWD_POLY_EXP_EVERY
#define BINFORMER_FWD_POLY_EXP_EVERY 0
#endif

namespace binformer::cuda::fwd {

constexpr int round_up_c(int x, int m) { return (x + m - 1) / m * m; }
__host__ __device__ constexpr int ceil_div_c(int x, int m) { return (x + m - 1) / m; }

// kQK != kRuntime selects the bounded-max kernel of kernel_bounded.h (fp16/bf16 V, no dense
// bias, no per-token k scale; kBoundedRelPos_: with the rel-pos bias); kHasBias_ the online
// kernel's dense and/or rel-pos bias. kBoundedShape_: the bounded kernels' block shape at
// Dv <= 64 (tile_config.h BoundedShape). kWgmma_: the bounded kernel's sm_90a variant
// (kernel_bounded.h with pv_wgmma.h): P.V by wgmma with V in a swizzled shared-memory layout,
// Dv = 64, 72, 80, 96, 128. kTma_: that variant's key tiles copied by the TMA (d <= 128;
// kernel_bounded.h "loads").
template <int kDvPad_, PvKind kPv_, bool kDvMasked_, bool kHasBias_, QK kQK_ = QK::kRuntime,
          bool kBoundedRelPos_ = false, BoundedShape kBoundedShape_ = BoundedShape::kWide,
          bool kWgmma_ = false, int kWgmmaWideBlocks_ = 2, bool kPTable_ = false, bool kTma_ = false>
struct FwdTraits {
  static constexpr int kDvPad = kDvPad_;
  static constexpr PvKind kPv = kPv_;
  static constexpr bool kDvMasked = kDvMasked_;
  static constexpr bool kHasBias = kHasBias_;  // dense and/or rel-pos bias (online kernel)
  static constexpr QK kQK = kQK_;
  static constexpr bool kBounded = kQK_ != QK::kRuntime;
  static constexpr bool kBoundedRelPos = kBoundedRelPos_;
  static constexpr bool kLoadsRelOff = kHasBias || kBoundedRelPos;  // stages hold relpos_off
  static_assert(!kBounded || (!kHasBias && (kPv == PvKind::kF16 || kPv == PvKind::kBF16)),
                "bounded kernels: fp16/bf16 V without a dense bias");
  static_assert(kBounded || !kBoundedRelPos, "kBoundedRelPos is a bounded-kernel option");
  // The sm_90a P.V (pv_wgmma.h): warpgroups of 4 warps x 1 m-tile (rows 16w + 64 * warpgroup:
  // the wide shape has two, the narrow shape one), one m64nDvk16 wgmma per k16 key step, V tiles
  // in the swizzled canonical layout of WgmmaVLayout (Dv * 2 bytes a key, no padding).
  static constexpr bool kWgmma = kWgmma_;
  static_assert(!kWgmma || (kBounded && kBoundedShape_ != BoundedShape::k4x2 && !kDvMasked_ &&
                            (kDvPad_ == 64 || kDvPad_ == 72 || kDvPad_ == 80 || kDvPad_ == 96 ||
                             kDvPad_ == 128)),
                "wgmma P.V: bounded kernels, one m-tile per warp, Dv = 64..128 exactly");
  static_assert(kBoundedShape_ != BoundedShape::kNarrow || (kBounded && kDvPad_ <= 64),
                "the narrow (one-warpgroup) block shape: bounded kernels at Dv <= 64");
  static constexpr BoundedShape kBoundedShape = kBoundedShape_;
  static constexpr TileShape kShape =
      kBounded ? fwd_bounded_tile_shape(kDvPad, kBoundedShape_) : fwd_tile_shape(kPv, kDvPad, kHasBias);
  static constexpr int kWarps = kShape.warps;
  static constexpr int kMTiles = kShape.m_tiles;
  static constexpr int kBlockN = kShape.block_n;
  static constexpr int kStages = kShape.stages;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = 16 * kMTiles * kWarps;
  static constexpr int kNBlocks = kBlockN / 8;  // n8 score blocks per tile
  static constexpr int kDvBlocks = kDvPad / 8;  // n8 output blocks
  // The bounded kernels at Dv <= 64 keep no score tile in registers: 2 blocks of 8 warps x 1
  // m-tile or 4 blocks of 4 warps x 1 m-tile (<= 128 registers), or 3 blocks of 4 warps x 2
  // m-tiles (<= 168) per SM (tile_config.h).
  // The P table kernel (narrow only) runs 3 blocks per SM: at 128 registers ptxas serialized its
  // wgmma (C7512).
  // The wgmma kernels at Dv = 72..128 hold no V fragments either: kWgmmaWideBlocks_ blocks of 8
  // warps per SM (2: 128 registers, a few spills at Dv = 128; 1: up to 255 registers).
  static constexpr int kMinBlocksPerSm =
      kBounded && kDvPad <= 64 ? (kWarps == 8 ? 2 : kMTiles == 1 ? (kPTable_ ? BINFORMER_FWD_PTABLE_BLOCKS : BINFORMER_FWD_SM90_NARROW_BLOCKS) : 3)
      : kWgmma                 ? kWgmmaWideBlocks_
                               : (kThreads >= 256 ? 1 : 2);

  static_assert(kDvPad % 8 == 0 && kDvPad <= 256, "value width");
  static_assert(kBlockN % 16 == 0, "key tiles are whole k16 steps");
  static_assert(kPv != PvKind::kU8S8 || kBlockN % 32 == 0, "u8 P.V consumes k32 steps");
  static_assert(kPv != PvKind::kU8S8 || kDvPad % 16 == 0, "int8 V uses 16-channel ldmatrix rows");
  static_assert(kStages >= 2, "pipeline");

  static constexpr int kVElemBytes =
      kPv == PvKind::kTF32x3 ? 4 : (kPv == PvKind::kU8S8 ? 1 : 2);
  static constexpr int kVRowBytes = round_up_c(kDvPad * kVElemBytes, 16);
  static constexpr int kVChunks = kVRowBytes / 16;  // 16-byte chunks per V row
  // V row pitch in shared memory. ldmatrix reads 8 rows x 16 bytes per 8x8 matrix: conflict-free
  // when pitch / 16 is odd. The tf32 path reads rows 2t, 2t+1 at column g with scalar loads:
  // conflict-free when pitch / 4 = 4 (mod 8).
  // The wgmma layout has no padding (its 128-byte swizzle spreads the banks instead).
  static constexpr int kVPitch = kWgmma ? kVRowBytes
                                 : kPv == PvKind::kTF32x3 ? (kDvPad + 4) * 4
                                 : ((kVRowBytes / 16) % 2 == 1 ? kVRowBytes : kVRowBytes + 16);

  // One pipeline stage: K bits (row pitch 4 words for k_words = 4; 12 words for k_words = 8,
  // which keeps the loads of words t and t+4 by lanes (g, t) free of bank conflicts), the
  // per-key constants, and the V tile.
  static constexpr int kKPitchWordsMax = 12;
  // Words of K-bit row pitch a stage reserves: the bounded k128 kernels know k_words = 4.
  static constexpr int kKPitchWords =
      kBounded && kQK != QK::kK256 ? 4 : kKPitchWordsMax;
  static constexpr int kOffKBits = 0;
  static constexpr int kOffColc = kOffKBits + kBlockN * kKPitchWords * 4;
  static constexpr int kOffKScale = kOffColc + kBlockN * 4;
  static constexpr int kOffRelOff = kOffKScale + kBlockN * 4;
  // The swizzle of the wgmma V tiles is a function of address bits 4-9: every V tile (and hence
  // every stage) starts at a multiple of 1024 bytes of a 1024-aligned block base.
  static constexpr int kSmemAlign = kWgmma ? 1024 : 128;
  static constexpr int kOffV = round_up_c(kOffRelOff + kBlockN * 4, kSmemAlign);
  static constexpr int kStageBytes = round_up_c(kOffV + kBlockN * kVPitch, kSmemAlign);
  // The block's packed Q rows ([kBlockM][8] words) are staged once; they alias the last stage,
  // which is first written after the first barrier of the main loop.
  static constexpr int kQStageBytes = kBlockM * 8 * 4;
  static constexpr bool kQAliasesStage = kQStageBytes <= kStageBytes;
  static constexpr int kOffQ = kQAliasesStage ? (kStages - 1) * kStageBytes : kStages * kStageBytes;
  // Bytes before the (optional, runtime-sized) rel-pos table.
  // The P table of the sm_90a bounded kernels at d <= 64 without rel-pos (kernel_bounded.h, "P
  // table"; launched for one row factor per (b, h)): a 16-bit ones matrix for the row-sum wgmma,
  // then the d + 2 table entries.
  static constexpr bool kPTable = kPTable_;
  static_assert(!kPTable || (kBounded && kWgmma && kQK == QK::kDup128 && !kBoundedRelPos), "P table");
  static constexpr int kPTableOnesBytes = 512;
  static constexpr int kOffPTable = kStages * kStageBytes + (kQAliasesStage ? 0 : kQStageBytes);
  static constexpr int kPTableBytes = kPTable ? kPTableOnesBytes + round_up_c((64 + 2) * 4, 16) : 0;
  // TMA key tiles: one mbarrier (8 bytes) per stage.
  static constexpr bool kTma = kTma_;
  static_assert(!kTma || (kWgmma && !kDvMasked && kQK != QK::kK256),
                "TMA key tiles: the wgmma kernels, d <= 128 (16-byte K rows)");
  static constexpr int kOffTmaBars = kOffPTable + kPTableBytes;
  static constexpr int kSmemFixed = kOffTmaBars + (kTma ? round_up_c(8 * kStages, 16) : 0);
  // Extra dynamic shared memory the launcher requests so that the kernel can align its base to
  // kSmemAlign (the runtime guarantees less than 1024).
  static constexpr int kSmemAlignSlack = kWgmma ? kSmemAlign : 0;
};

template <class Tr, bool kPerTokenK>
struct FwdBlock {
  static constexpr bool kHasBias = Tr::kHasBias;
  static constexpr int kMT = Tr::kMTiles;
  static constexpr int kNB = Tr::kNBlocks;
  static constexpr int kRows = 2 * kMT;  // rows per thread: g and g + 8 of every m-tile
  static constexpr int kBlockN = Tr::kBlockN;
  static constexpr int kBlockM = Tr::kBlockM;
  static constexpr int kThreads = Tr::kThreads;
  static constexpr bool kInt8 = Tr::kPv == PvKind::kU8S8;
  static constexpr bool kTF32 = Tr::kPv == PvKind::kTF32x3;
  using Acc = std::conditional_t<kInt8, int, float>;
  static constexpr float kLog2e = 1.4426950408889634f;
  static constexpr float kLn2 = 0.6931471805599453f;
  static constexpr float kInf = __builtin_huge_valf();
  static constexpr float kRescaleThreshold = kInt8 ? 0.0f : BINFORMER_FWD_RESCALE_THRESHOLD;
  static constexpr int kPolyEvery = kTF32 ? 0 : BINFORMER_FWD_POLY_EXP_EVERY;

  const FwdArgs& a;
  unsigned char* smem;
  int lane, g, t;
  int warp_row0;  // first row of this warp inside the block
  int bh, b, h, m0;

  uint32_t qa[kMT][4];   // Q bits as b1 A fragments (words t and t+4 of rows g and g+8)
  int rowc[kRows];       // 0x4BC00000 + d/2 - p(q_i) (bounded kernels: 0x4BC00000 - p(q_i))
  float rowscale[kRows];  // |scale a_i b_head| (natural units with bias, times log2(e) without)
  float m_run[kRows];    // running row max in log2 units (-inf: nothing seen yet)
  float l_run[kRows];    // this thread's part of the row sum of 2^(x - m_run)
  // Rel-pos per row: table position of (i, j) = rel_row - off_j (bytes of shared memory, or
  // elements of the global table) for patch rows; the cls row's index does not depend on j.
  uint32_t rel_row[kHasBias ? kRows : 1];
  // P.V accumulator: fp32, or s32 for pv_int8 (then block nd = 2 * n16 + parity holds the even
  // (parity 0) or odd channels of 16-channel group n16, see pv_u8s8).
  Acc o[kMT][Tr::kDvBlocks][4];

  __device__ __forceinline__ FwdBlock(const FwdArgs& args, unsigned char* smem_base)
      : a(args), smem(smem_base) {}

  __device__ __forceinline__ int row_of(int r) const {
    return m0 + warp_row0 + (r / 2) * 16 + (r % 2) * 8 + g;
  }

  // ============================================================================== driver
  // The block's place (lane / warp coordinates, (b, h), first row m0) and its key tiles: how many
  // it visits and the first one that needs element masks (the partial last tile and, for
  // causal, every tile reaching past the block's first row). Shared by every forward kernel.
  struct KeyTiles {
    int n_tiles, first_masked;
  };
  __device__ __forceinline__ KeyTiles setup_block(int tid) {
    lane = tid % 32;
    g = lane / 4;
    t = lane % 4;
    warp_row0 = (tid / 32) * 16 * kMT;
    bh = blockIdx.x / a.num_m_blocks;
    int m_block = blockIdx.x % a.num_m_blocks;
    if (a.causal) m_block = a.num_m_blocks - 1 - m_block;  // longest rows first
    b = bh / a.H;
    h = bh % a.H;
    m0 = m_block * kBlockM;
    KeyTiles kt;
    kt.n_tiles = ceil_div_c(a.Nk, kBlockN);
    if (a.causal) kt.n_tiles = min(kt.n_tiles, ceil_div_c(min(a.Nq, m0 + kBlockM), kBlockN));
    kt.first_masked = kt.n_tiles;
    if (a.Nk % kBlockN != 0) kt.first_masked = min(kt.first_masked, a.Nk / kBlockN);
    if (a.causal) kt.first_masked = min(kt.first_masked, m0 / kBlockN);
    return kt;
  }

  __device__ void run() {
    const int tid = threadIdx.x;
    const KeyTiles kt = setup_block(tid);
    const int n_tiles = kt.n_tiles, first_masked = kt.first_masked;
    griddep_wait();  // (the workspace: launch_overlap.h)

    // Pipeline prologue: tiles n_tiles-1, n_tiles-2, ... into stages 0 .. kStages-2.
#pragma unroll
    for (int s = 0; s < Tr::kStages - 1; ++s) {
      if (s < n_tiles) load_tile(s, n_tiles - 1 - s, tid);
      cp_async_commit();
    }

    prologue(tid);

#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      m_run[r] = -kInf;
      l_run[r] = 0.0f;
    }
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int nd = 0; nd < Tr::kDvBlocks; ++nd)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[mt][nd][e] = Acc(0);

    for (int it = 0; it < n_tiles; ++it) {
      cp_async_wait<Tr::kStages - 2>();
      __syncthreads();  // tile `it` landed for every thread; stage (it-1) % kStages is free
      const int next = it + Tr::kStages - 1;
      if (next < n_tiles) load_tile(next % Tr::kStages, n_tiles - 1 - next, tid);
      cp_async_commit();
      const int n_tile = n_tiles - 1 - it;
      const unsigned char* st = smem + (it % Tr::kStages) * Tr::kStageBytes;
      if (n_tile >= first_masked) {
        process_tile<true>(st, n_tile);
      } else {
        process_tile<false>(st, n_tile);
      }
    }
    epilogue();
  }

  // ============================================================================== mainloop
  // Global -> shared copies of one key tile. K bits and per-key constants come from the
  // pre-pass workspace (padded to whole tiles, always 16-byte aligned); V rows past Nk and
  // channels past dv are zero-filled (P is 0 there, and 0 * garbage could be NaN).
  __device__ __forceinline__ void load_tile(int stage, int n_tile, int tid) {
    unsigned char* st = smem + stage * Tr::kStageBytes;
    const uint32_t st_addr = smem_u32(st);
    const int key0 = n_tile * kBlockN;
    const int64_t krow0 = int64_t(bh) * a.nk_pad + key0;
    // K bits: kBlockN rows of k_words words; 16-byte chunks, (kBlockN * k_words / 4) of them.
    const uint32_t* k_src = a.k_bits + krow0 * a.k_words;
    if (a.k_words == 4) {
      copy_chunks<kBlockN>(tid, [&](int c) {
        cp_async_16(st_addr + Tr::kOffKBits + c * 16, k_src + 4 * c, 16);
      });
    } else {
      copy_chunks<2 * kBlockN>(tid, [&](int c) {
        cp_async_16(st_addr + Tr::kOffKBits + (c / 2) * 48 + (c % 2) * 16, k_src + 4 * c, 16);
      });
    }
    copy_chunks<kBlockN / 4>(tid, [&](int c) {
      cp_async_16(st_addr + Tr::kOffColc + c * 16, a.k_colc + krow0 + 4 * c, 16);
      if constexpr (kPerTokenK) {
        cp_async_16(st_addr + Tr::kOffKScale + c * 16, a.k_scale_abs + krow0 + 4 * c, 16);
      }
      if constexpr (Tr::kLoadsRelOff) {
        if (a.relpos_off != nullptr) {
          cp_async_16(st_addr + Tr::kOffRelOff + c * 16, a.relpos_off + key0 + 4 * c, 16);
        }
      }
    });
    const char* v_head = static_cast<const char*>(a.v) +
                         (int64_t(b) * a.v_stride[0] + int64_t(h) * a.v_stride[1]) * Tr::kVElemBytes;
    copy_chunks<kBlockN * Tr::kVChunks>(tid, [&](int c) {
      const int row = c / Tr::kVChunks, chunk = c % Tr::kVChunks;
      const int key = key0 + row;
      int bytes = 16;
      if constexpr (Tr::kDvMasked) bytes = max(0, min(16, a.dv * Tr::kVElemBytes - chunk * 16));
      if (key >= a.Nk) bytes = 0;
      const char* src =
          bytes > 0 ? v_head + int64_t(key) * a.v_stride[2] * Tr::kVElemBytes + chunk * 16 : v_head;
      const int dst = Tr::kOffV + row * Tr::kVPitch + chunk * 16;
      if (a.v_async_ok) {
        cp_async_16(st_addr + dst, src, bytes);
      } else {
        copy_16_sync(st + dst, src, bytes);
      }
    });
  }

  // Calls f(c) for c = tid, tid + kThreads, ... < kChunks with a compile-time trip count.
  template <int kChunks, class F>
  __device__ __forceinline__ static void copy_chunks(int tid, F&& f) {
#pragma unroll
    for (int it = 0; it < (kChunks + kThreads - 1) / kThreads; ++it) {
      const int c = tid + it * kThreads;
      if (kChunks % kThreads == 0 || c < kChunks) f(c);
    }
  }

  // Fallback for V rows that are not 16-byte aligned: element-wise loads, zero fill.
  __device__ __forceinline__ static void copy_16_sync(unsigned char* dst, const char* src,
                                                      int bytes) {
    constexpr int kE = Tr::kVElemBytes;
    uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int e = 0; e < 16 / kE; ++e) {
      if (e * kE < bytes) {
        uint32_t v;
        if constexpr (kE == 4) {
          v = __ldg(reinterpret_cast<const unsigned int*>(src) + e);
        } else if constexpr (kE == 2) {
          v = __ldg(reinterpret_cast<const unsigned short*>(src) + e);
        } else {
          v = __ldg(reinterpret_cast<const unsigned char*>(src) + e);
        }
        w[(e * kE) / 4] |= v << (8 * ((e * kE) % 4));
      }
    }
    *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
  }

  // Sign bytes of the block's Q rows into the Q stage: row r's 32-byte slot holds 8 words; bytes
  // past d (and rows past Nq) are zero, rows with scale * a_i < 0 get their d bits flipped. The
  // fragments read the first kQBytes bytes of a slot (the rest is written zero).
  // Every load is unconditional (out-of-range bytes read row m0's byte 0, which exists, and are
  // zeroed afterwards), so that all of a thread's loads of an 8-byte group are in flight
  // together: loads under a branch were issued one DRAM round trip after another (ncu, ViT-B:
  // 18% of the bounded kernel's stall samples; NOTES v13).
  template <int kQBytes>
  __device__ __forceinline__ void pack_q_signs(int tid) {
    const bool vec = a.q_vec_ok;
    switch (a.q_dtype) {
      case DType::kFloat16: vec ? pack_q_bytes<kQBytes, DType::kFloat16, true>(tid) : pack_q_bytes<kQBytes, DType::kFloat16, false>(tid); break;
      case DType::kBFloat16: vec ? pack_q_bytes<kQBytes, DType::kBFloat16, true>(tid) : pack_q_bytes<kQBytes, DType::kBFloat16, false>(tid); break;
      case DType::kFloat32: vec ? pack_q_bytes<kQBytes, DType::kFloat32, true>(tid) : pack_q_bytes<kQBytes, DType::kFloat32, false>(tid); break;
      default: pack_q_bytes<kQBytes, DType::kBits, false>(tid); break;
    }
  }
  template <int kQBytes, DType kDtype, bool kVec>
  __device__ __forceinline__ void pack_q_bytes(int tid) {
    unsigned char* sq = smem + Tr::kOffQ;
    const int q_elem = kDtype == DType::kFloat32 || kDtype == DType::kBits ? 4 : 2;
    const char* q_head = static_cast<const char*>(a.q) +
                         (int64_t(b) * a.q_stride[0] + int64_t(h) * a.q_stride[1]) * q_elem;
    const int d_bytes = a.d / 8;
    // One 8-byte group of every row per pass: thread tid covers rows (tid + it kThreads) / 8.
    static_assert(kQBytes % 8 == 0 && kQBytes <= 32 && (kBlockM * 8) % kThreads == 0, "whole Q-byte passes");
    constexpr int kIters = kBlockM * 8 / kThreads;
    float factor[kIters];  // (compared only where the bytes are stored: no wait before their loads)
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int r = (tid + it * kThreads) / 8;
      factor[it] = query_factor(min(m0 + r, a.Nq - 1));
    }
#pragma unroll
    for (int q = 0; q < kQBytes / 8; ++q) {
      uint32_t byte[kIters] = {};
      if (8 * q < d_bytes) {  // (uniform)
#pragma unroll
        for (int it = 0; it < kIters; ++it) {
          const int idx = tid + it * kThreads;
          const int r = idx / 8, c = 8 * q + idx % 8, i = m0 + r;
          const bool ok = i < a.Nq && c < d_bytes;
          byte[it] = load_sign_byte(q_head + int64_t(ok ? i : m0) * a.q_stride[2] * q_elem, kDtype, ok ? c : 0, kVec);
        }
      }
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        const int idx = tid + it * kThreads;
        const int r = idx / 8, c = 8 * q + idx % 8, i = m0 + r;
        const bool ok = 8 * q < d_bytes && i < a.Nq && c < d_bytes;
        sq[r * 32 + c] = static_cast<unsigned char>(ok ? byte[it] ^ (a.scale * factor[it] < 0.0f ? 0xFFu : 0u) : 0u);
      }
    }
    // Words past kQBytes are read for the popcount (always zero: write them).
    if constexpr (kQBytes < 32) {
      constexpr int kZeroWords = (32 - kQBytes) / 4;
      uint32_t* sq32 = reinterpret_cast<uint32_t*>(sq);
      for (int idx = tid; idx < kBlockM * kZeroWords; idx += kThreads) {
        sq32[(idx / kZeroWords) * 8 + kQBytes / 4 + idx % kZeroWords] = 0u;
      }
    }
  }

  // Packs the block's Q rows into shared memory, loads the fragments, the row constants and the
  // rel-pos table.
  __device__ __forceinline__ void prologue(int tid) {
    const uint32_t* sq = reinterpret_cast<const uint32_t*>(smem + Tr::kOffQ);
    pack_q_signs<32>(tid);
    if constexpr (kHasBias) {
      if (a.relpos_table != nullptr && a.relpos_in_smem) {
        float* table = reinterpret_cast<float*>(smem + Tr::kSmemFixed);
        const float* src = a.relpos_table + int64_t(h) * a.relpos_table_stride_h;
        for (int idx = tid; idx < a.relpos_table_size; idx += kThreads) table[idx] = __ldg(src + idx);
      }
    }
    __syncthreads();

#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      const int lo = warp_row0 + mt * 16 + g, hi = lo + 8;
      qa[mt][0] = sq[lo * 8 + t];
      qa[mt][1] = sq[hi * 8 + t];
      qa[mt][2] = sq[lo * 8 + t + 4];
      qa[mt][3] = sq[hi * 8 + t + 4];
      int pop_lo = __popc(qa[mt][0]) + __popc(qa[mt][2]);
      int pop_hi = __popc(qa[mt][1]) + __popc(qa[mt][3]);
      pop_lo += __shfl_xor_sync(0xffffffffu, pop_lo, 1);
      pop_lo += __shfl_xor_sync(0xffffffffu, pop_lo, 2);
      pop_hi += __shfl_xor_sync(0xffffffffu, pop_hi, 1);
      pop_hi += __shfl_xor_sync(0xffffffffu, pop_hi, 2);
      rowc[2 * mt] = 0x4BC00000 + a.d / 2 - pop_lo;
      rowc[2 * mt + 1] = 0x4BC00000 + a.d / 2 - pop_hi;
    }

    const float k_head = a.k_scale_head != nullptr
                             ? __ldg(a.k_scale_head + int64_t(b) * a.k_scale_head_stride[0] +
                                     int64_t(h) * a.k_scale_head_stride[1])
                             : 1.0f;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int i = min(row_of(r), a.Nq - 1);
      const float c = fabsf(a.scale * query_factor(i) * k_head);
      rowscale[r] = kHasBias ? c : c * kLog2e;
      if constexpr (kHasBias) {
        if (a.relpos_table != nullptr) {
          const int wh = a.relpos_wh, ww = a.relpos_ww, tsize = a.relpos_table_size;
          int base = tsize - 3;  // cls row
          if (i >= a.relpos_prefix) {
            const int p = i - a.relpos_prefix, y = p / ww, x = p % ww;
            base = (y + wh - 1) * (2 * ww - 1) + x + ww - 1;
          }
          rel_row[r] = a.relpos_in_smem ? smem_u32(smem + Tr::kSmemFixed) + 4u * uint32_t(base)
                                        : uint32_t(base);
        }
      }
    }
  }

  __device__ __forceinline__ float query_factor(int i) const {
    if (a.q_scale == nullptr) return 1.0f;
    return __ldg(a.q_scale + int64_t(b) * a.q_scale_stride[0] + int64_t(h) * a.q_scale_stride[1] +
                 int64_t(i) * a.q_scale_stride[2]);
  }

  // ============================================================================== one key tile
  template <bool kMask>
  __device__ __forceinline__ void process_tile(const unsigned char* st, int n_tile) {
    const int key0 = n_tile * kBlockN;
    // n8 blocks at or past this tile-relative key are masked for every row of the warp: they
    // skip the score mma, the exponentials and the P.V mma.
    int warp_limit = kBlockN;
    if (kMask) {
      warp_limit = a.Nk - key0;
      if (a.causal) warp_limit = min(warp_limit, m0 + warp_row0 + 16 * kMT - key0);
    }
    float s[kMT][kNB][4];
    if constexpr (kHasBias) prefill_bias<kMask>(s, st, key0, warp_limit);
    float tile_max[kRows];
    compute_scores<kMask>(s, st, key0, warp_limit, tile_max);
    update_max_and_rescale(tile_max);
    exponentiate<kMask>(s, warp_limit);
    if constexpr (kInt8) {
      pv_u8s8<kMask>(s, st, warp_limit);
    } else if constexpr (kTF32) {
      pv_tf32x3<kMask>(s, st, warp_limit);
    } else {
      pv_f16<kMask>(s, st, warp_limit);
    }
  }

  // ---------------------------------------------------------------- bias (natural units)
  template <bool kMask>
  __device__ __forceinline__ void prefill_bias(float (&s)[kMT][kNB][4], const unsigned char* st,
                                               int key0, int warp_limit) {
    if (a.bias != nullptr) {
      if (a.bias_dtype == DType::kFloat32) {
        load_dense_bias<uint32_t, false, kMask>(s, key0, warp_limit);
      } else if (a.bias_dtype == DType::kFloat16) {
        load_dense_bias<uint16_t, false, kMask>(s, key0, warp_limit);
      } else {
        load_dense_bias<uint16_t, true, kMask>(s, key0, warp_limit);
      }
    } else {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int nb = 0; nb < kNB; ++nb)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mt][nb][e] = 0.0f;
    }
    if (a.relpos_table != nullptr) add_relpos<kMask>(s, st, key0, warp_limit);
  }

  template <bool kBF16>
  __device__ __forceinline__ static float bias_to_float(uint32_t raw) {
    return __uint_as_float(raw);
  }
  template <bool kBF16>
  __device__ __forceinline__ static float bias_to_float(uint16_t raw) {
    return kBF16 ? __uint_as_float(uint32_t(raw) << 16) : __half2float(__ushort_as_half(raw));
  }

  // Dense bias, read through L1 straight into the score fragment layout. Rows past Nq are
  // clamped (their results are never stored), and in masked tiles keys past Nk too, so every
  // load is in bounds without a branch.
  template <class Raw, bool kBF16, bool kMask>
  __device__ __forceinline__ void load_dense_bias(float (&s)[kMT][kNB][4], int key0,
                                                  int warp_limit) {
    const Raw* head = static_cast<const Raw*>(a.bias) + int64_t(b) * a.bias_stride[0] +
                      int64_t(h) * a.bias_stride[1];
    const Raw* rowp[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) rowp[r] = head + int64_t(min(row_of(r), a.Nq - 1)) * a.bias_stride[2];
    if (!kMask && a.bias_pair_ok) {
#pragma unroll
      for (int nb = 0; nb < kNB; ++nb) {
        const int j = key0 + nb * 8 + 2 * t;
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          float lo, hi;
          if constexpr (sizeof(Raw) == 4) {
            const float2 v = __ldg(reinterpret_cast<const float2*>(rowp[r] + j));
            lo = v.x;
            hi = v.y;
          } else {
            const uint32_t v = __ldg(reinterpret_cast<const unsigned int*>(rowp[r] + j));
            lo = bias_to_float<kBF16>(uint16_t(v & 0xFFFFu));
            hi = bias_to_float<kBF16>(uint16_t(v >> 16));
          }
          s[r / 2][nb][2 * (r % 2)] = lo;
          s[r / 2][nb][2 * (r % 2) + 1] = hi;
        }
      }
    } else {
      const int64_t s3 = a.bias_stride[3];
#pragma unroll
      for (int nb = 0; nb < kNB; ++nb) {
        if (kMask && nb * 8 >= warp_limit) continue;
        int j0 = key0 + nb * 8 + 2 * t, j1 = j0 + 1;
        if (kMask) {
          j0 = min(j0, a.Nk - 1);
          j1 = min(j1, a.Nk - 1);
        }
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          s[r / 2][nb][2 * (r % 2)] = bias_to_float<kBF16>(Raw(__ldg(rowp[r] + j0 * s3)));
          s[r / 2][nb][2 * (r % 2) + 1] = bias_to_float<kBF16>(Raw(__ldg(rowp[r] + j1 * s3)));
        }
      }
    }
  }

  // Rel-pos bias from the head's table: index(i, j) = base_i - off_j for two patches (base_i
  // and off_j precomputed per row / per key), constant T-3 on the cls row, and the cls column
  // (key 0: tile 0, lanes t == 0, element 0 of n8 block 0) patched with entry T-2 (T-1 for the
  // cls row).
  template <bool kMask>
  __device__ __forceinline__ void add_relpos(float (&s)[kMT][kNB][4], const unsigned char* st,
                                             int key0, int warp_limit) {
    const int* off = reinterpret_cast<const int*>(st + Tr::kOffRelOff);
    const bool in_smem = a.relpos_in_smem;
    const float* table = a.relpos_table + int64_t(h) * a.relpos_table_stride_h;
    const bool fix_cls = a.relpos_prefix > 0 && key0 == 0 && t == 0;  // this lane holds key 0
    int mult[kRows];  // bytes (shared) or elements (global) per unit of off_j; 0 on the cls row
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      mult[r] = min(row_of(r), a.Nq - 1) < a.relpos_prefix ? 0 : (in_smem ? -4 : -1);
    }
#pragma unroll
    for (int nb = 0; nb < kNB; ++nb) {
      if (kMask && nb * 8 >= warp_limit) continue;
      const int2 o2 = *reinterpret_cast<const int2*>(off + nb * 8 + 2 * t);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        float v0, v1;
        if (in_smem) {
          v0 = lds_f32(rel_row[r] + uint32_t(mult[r] * o2.x));
          v1 = lds_f32(rel_row[r] + uint32_t(mult[r] * o2.y));
        } else {
          v0 = __ldg(table + int(rel_row[r]) + mult[r] * o2.x);
          v1 = __ldg(table + int(rel_row[r]) + mult[r] * o2.y);
        }
        if (nb == 0 && fix_cls) {
          v0 = __ldg(table + (mult[r] == 0 ? a.relpos_table_size - 1 : a.relpos_table_size - 2));
        }
        s[r / 2][nb][2 * (r % 2)] += v0;
        s[r / 2][nb][2 * (r % 2) + 1] += v1;
      }
    }
  }

  // ---------------------------------------------------------------- scores
  // s <- x_ij: with bias, the natural-unit score scale*a*b*dot + bias; without bias the
  // (per-key scaled) dot product y_ij, the row factor being applied inside the exponential.
  // Masked elements get -inf. tile_max gets this thread's row maxima of s.
  template <bool kMask>
  __device__ __forceinline__ void compute_scores(float (&s)[kMT][kNB][4], const unsigned char* st,
                                                 int key0, int warp_limit,
                                                 float (&tile_max)[kRows]) {
    const uint32_t* sk = reinterpret_cast<const uint32_t*>(st + Tr::kOffKBits);
    const float* colc = reinterpret_cast<const float*>(st + Tr::kOffColc);
    const float* kscale = reinterpret_cast<const float*>(st + Tr::kOffKScale);
    const bool k256 = a.k_words == 8;
    const int kpitch = k256 ? 12 : 4;
#pragma unroll
    for (int r = 0; r < kRows; ++r) tile_max[r] = -kInf;
    // One n8 key block at a time: its popcounts are converted right away, so that only one
    // block of integer results is live next to the scores (and, with bias, the prefilled bias).
#pragma unroll
    for (int nb = 0; nb < kNB; ++nb) {
      if (kMask && nb * 8 >= warp_limit) {
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mt][nb][e] = -kInf;
        continue;
      }
      int pc[kMT][4];
      const uint32_t* krow = sk + (nb * 8 + g) * kpitch + t;
      const uint32_t kb0 = krow[0];
      if (k256) {
        const uint32_t kb1 = krow[4];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) mma_and_popc_k256(pc[mt], qa[mt], kb0, kb1);
      } else {
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) mma_and_popc_k128(pc[mt], qa[mt][0], qa[mt][1], kb0);
      }
      const float2 cc = *reinterpret_cast<const float2*>(colc + nb * 8 + 2 * t);
      float2 kk = make_float2(1.0f, 1.0f);
      if constexpr (kPerTokenK) kk = *reinterpret_cast<const float2*>(kscale + nb * 8 + 2 * t);
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = 2 * mt + e / 2;
          float y = __int_as_float(pc[mt][e] * 2 + rowc[r]) + ((e & 1) ? cc.y : cc.x);
          if constexpr (kPerTokenK) y *= (e & 1) ? kk.y : kk.x;
          float x;
          if constexpr (kHasBias) {
            x = fmaf(y, rowscale[r], s[mt][nb][e]);
          } else {
            x = y;
          }
          if (kMask) {
            const int j = key0 + nb * 8 + 2 * t + (e & 1);
            const bool ok = j < a.Nk && (!a.causal || j <= row_of(r));
            x = ok ? x : -kInf;
          }
          s[mt][nb][e] = x;
          tile_max[r] = fmaxf(tile_max[r], x);
        }
      }
    }
  }

  // ---------------------------------------------------------------- online softmax
  // Row maxima over the quad of lanes sharing a row; the running max moves (and the accumulator
  // and row sum are rescaled) only when it grew by more than kRescaleThreshold, decided per row
  // but executed under one warp-uniform branch.
  __device__ __forceinline__ void update_max_and_rescale(float (&tile_max)[kRows]) {
    float m_old[kRows];
    bool moved[kRows];
    bool any = false;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float mx = tile_max[r];
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      float m_tile;
      if constexpr (kHasBias) {
        m_tile = mx * kLog2e;
      } else {
        m_tile = mx == -kInf ? -kInf : rowscale[r] * mx;  // rowscale >= 0 keeps the argmax
      }
      const float m_new = fmaxf(m_run[r], m_tile);
      moved[r] = m_new > m_run[r] + kRescaleThreshold;
      m_old[r] = m_run[r];
      if (moved[r]) m_run[r] = m_new;
      any |= moved[r];
    }
    // Rarely taken once the maxima settle: the factors' MUFU work stays inside the branch.
    if (__any_sync(0xffffffffu, any)) {
      float factor[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        factor[r] = moved[r] ? ex2_approx(m_old[r] - m_run[r]) : 1.0f;  // 0 when m_old = -inf
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) l_run[r] *= factor[r];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int nd = 0; nd < Tr::kDvBlocks; ++nd)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = 2 * mt + e / 2;
            if constexpr (kInt8) {
              // The s32 accumulator is rescaled and rounded back to an integer: 0.5 units of
              // P_q * V_q, well below the quantization error of P itself.
              const int scaled = __float2int_rn(__int2float_rn(o[mt][nd][e]) * factor[r]);
              o[mt][nd][e] = moved[r] ? scaled : o[mt][nd][e];
            } else {
              o[mt][nd][e] *= factor[r];
            }
          }
    }
  }

  // s <- 2^(x - m_run) (fp32), accumulated into l_run.
  template <bool kMask>
  __device__ __forceinline__ void exponentiate(float (&s)[kMT][kNB][4], int warp_limit) {
    float m_sub[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) m_sub[r] = m_run[r] == -kInf ? 0.0f : m_run[r];
#pragma unroll
    for (int nb = 0; nb < kNB; ++nb) {
      if (kMask && nb * 8 >= warp_limit) {
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mt][nb][e] = 0.0f;
        continue;
      }
      constexpr bool kNever = kPolyEvery == 0;
      const bool poly = !kNever && !kMask && (nb % (kNever ? 1 : kPolyEvery)) == (kPolyEvery - 1);
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = 2 * mt + e / 2;
          const float x = s[mt][nb][e];
          const float arg = kHasBias ? fmaf(x, kLog2e, -m_sub[r]) : fmaf(x, rowscale[r], -m_sub[r]);
          float p = poly ? ex2_poly(arg) : ex2_approx(arg);
          // Without bias x is the dot product and rowscale may be 0: -inf * 0 would be NaN.
          if (kMask && !kHasBias) p = x == -kInf ? 0.0f : p;
          s[mt][nb][e] = p;
          l_run[r] += p;
        }
      }
    }
  }

  // ---------------------------------------------------------------- P.V, fp16 / bf16 V
  // The score C fragments of n8 blocks 2kk and 2kk+1 are exactly the A fragment of the k16 step
  // kk; V's B fragments come from ldmatrix.trans of the row-major [key][channel] tile.
  template <bool kMask>
  __device__ __forceinline__ void pv_f16(const float (&s)[kMT][kNB][4], const unsigned char* st,
                                         int warp_limit) {
    constexpr bool kBF = Tr::kPv == PvKind::kBF16;
    const uint32_t v_lane = v_lane_addr(st);
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      if (kMask && kk * 16 >= warp_limit) continue;
      uint32_t pa[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        pa[mt][0] = pack_pair<kBF>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        pa[mt][1] = pack_pair<kBF>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        pa[mt][2] = pack_pair<kBF>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        pa[mt][3] = pack_pair<kBF>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
      pv_f16_step(pa, v_lane + kk * 16 * Tr::kVPitch);
    }
  }

  // This lane's ldmatrix row address in the stage's V tile (rows lane % 16, 16-byte column
  // lane / 16 of every 16 x 16 block).
  __device__ __forceinline__ uint32_t v_lane_addr(const unsigned char* st) const {
    return smem_u32(st + Tr::kOffV) + (lane & 15) * Tr::kVPitch + (lane >> 4) * 16;
  }

  // One k16 key step of P.V: pa holds the A fragments of P (per m-tile), v_rows the lane's
  // ldmatrix address of the step's first V row.
  __device__ __forceinline__ void pv_f16_step(const uint32_t (&pa)[kMT][4], uint32_t v_rows) {
    constexpr bool kBF = Tr::kPv == PvKind::kBF16;
#pragma unroll
    for (int nn = 0; nn < Tr::kDvPad / 16; ++nn) {
      if (Tr::kDvMasked && nn * 16 >= a.dv) break;
      uint32_t bv[4];
      ldmatrix_x4_trans(bv, v_rows + nn * 32);
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        if constexpr (kBF) {
          mma_bf16_16816(o[mt][2 * nn], pa[mt], bv[0], bv[1]);
          mma_bf16_16816(o[mt][2 * nn + 1], pa[mt], bv[2], bv[3]);
        } else {
          mma_f16_16816(o[mt][2 * nn], pa[mt], bv[0], bv[1]);
          mma_f16_16816(o[mt][2 * nn + 1], pa[mt], bv[2], bv[3]);
        }
      }
    }
    if constexpr (Tr::kDvPad % 16 != 0) {  // a last n8 block (Dv = 72): two 8x8 matrices
      uint32_t bv[2];
      ldmatrix_x2_trans(bv, v_rows + (Tr::kDvPad / 16) * 32);
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        if constexpr (kBF) {
          mma_bf16_16816(o[mt][Tr::kDvBlocks - 1], pa[mt], bv[0], bv[1]);
        } else {
          mma_f16_16816(o[mt][Tr::kDvBlocks - 1], pa[mt], bv[0], bv[1]);
        }
      }
    }
  }

  // ---------------------------------------------------------------- P.V, fp32 V (3xTF32)
  // P = Pb + Ps and V = Vb + Vs with tf32 big/small parts; Ps Vb + Pb Vs + Pb Vb (the Ps Vs term,
  // ~2^-22 relative, is dropped) gives close to fp32 accuracy. Key permutation: the m16n8k8 A
  // fragment takes k index t from the score element (g, 2t) and k index t+4 from (g, 2t+1), so
  // V's B fragment reads rows 2t and 2t+1 of the n8 key block.
  template <bool kMask>
  __device__ __forceinline__ void pv_tf32x3(const float (&s)[kMT][kNB][4],
                                            const unsigned char* st, int warp_limit) {
    constexpr int kPitchW = Tr::kVPitch / 4;
    const float* sv = reinterpret_cast<const float*>(st + Tr::kOffV);
#pragma unroll
    for (int nb = 0; nb < kNB; ++nb) {
      if (kMask && nb * 8 >= warp_limit) continue;
      uint32_t p_big[kMT][4], p_small[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        const float pv[4] = {s[mt][nb][0], s[mt][nb][2], s[mt][nb][1], s[mt][nb][3]};
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          p_big[mt][q] = cvt_tf32(pv[q]);
          p_small[mt][q] = cvt_tf32(pv[q] - __uint_as_float(p_big[mt][q]));
        }
      }
      const float* v0 = sv + (nb * 8 + 2 * t) * kPitchW + g;
      const float* v1 = v0 + kPitchW;
#pragma unroll
      for (int nd = 0; nd < Tr::kDvBlocks; ++nd) {
        if (Tr::kDvMasked && nd * 8 >= a.dv) break;
        const float x0 = v0[nd * 8], x1 = v1[nd * 8];
        const uint32_t b0 = cvt_tf32(x0), b1 = cvt_tf32(x1);
        const uint32_t s0 = cvt_tf32(x0 - __uint_as_float(b0));
        const uint32_t s1 = cvt_tf32(x1 - __uint_as_float(b1));
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma_tf32_1688(o[mt][nd], p_small[mt], b0, b1);
          mma_tf32_1688(o[mt][nd], p_big[mt], s0, s1);
          mma_tf32_1688(o[mt][nd], p_big[mt], b0, b1);
        }
      }
    }
  }

  // ---------------------------------------------------------------- P.V, pv_int8
  // P_q = round(255 * 2^(x - m_run)) in u8 (m_run is the exact running max: threshold 0), V
  // int8, s32 accumulation across tiles. Key permutation of one k32 step (keys 32kc + ...):
  // logical k 4t..4t+3 <- keys {2t, 2t+1, 8+2t, 9+2t}, logical k 16+4t.. <- the same + 16, i.e.
  // score elements (c0, c1) of n8 blocks 4kc and 4kc+1 (then 4kc+2, 4kc+3). ldmatrix.trans of
  // 8 keys x 16 int8 channels gives lane (g, t) bytes {V[2t][2g], V[2t][2g+1], V[2t+1][2g],
  // V[2t+1][2g+1]}; byte permutes regroup the even and the odd channel of each pair into the B
  // fragments of two n8 blocks ("even" holds channels 16 n16 + 2n, "odd" 16 n16 + 2n + 1).
  __device__ __forceinline__ static uint32_t pack_u8x4(float p0, float p1, float p2, float p3) {
    // fma(p, 255, 1.5 * 2^23): the low byte of the result's bits is round-to-nearest(255 p).
    const uint32_t u0 = __float_as_uint(fmaf(p0, 255.0f, 12582912.0f));
    const uint32_t u1 = __float_as_uint(fmaf(p1, 255.0f, 12582912.0f));
    const uint32_t u2 = __float_as_uint(fmaf(p2, 255.0f, 12582912.0f));
    const uint32_t u3 = __float_as_uint(fmaf(p3, 255.0f, 12582912.0f));
    return prmt(prmt(u0, u1, 0x0040u), prmt(u2, u3, 0x0040u), 0x5410u);
  }

  template <bool kMask>
  __device__ __forceinline__ void pv_u8s8(const float (&s)[kMT][kNB][4], const unsigned char* st,
                                          int warp_limit) {
    constexpr int kKc = kBlockN / 32;
    uint32_t pa[kMT][kKc][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int kc = 0; kc < kKc; ++kc)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int na = 4 * kc + 2 * half, nb = na + 1;
          pa[mt][kc][2 * half] =
              pack_u8x4(s[mt][na][0], s[mt][na][1], s[mt][nb][0], s[mt][nb][1]);
          pa[mt][kc][2 * half + 1] =
              pack_u8x4(s[mt][na][2], s[mt][na][3], s[mt][nb][2], s[mt][nb][3]);
        }
    const uint32_t v_lane = smem_u32(st + Tr::kOffV) + lane * Tr::kVPitch;
#pragma unroll
    for (int n16 = 0; n16 < Tr::kDvPad / 16; ++n16) {
      if (Tr::kDvMasked && n16 * 16 >= a.dv) break;
#pragma unroll
      for (int kc = 0; kc < kKc; ++kc) {
        if (kMask && kc * 32 >= warp_limit) continue;
        uint32_t r[4];
        ldmatrix_x4_trans(r, v_lane + kc * 32 * Tr::kVPitch + n16 * 16);
        const uint32_t even0 = prmt(r[0], r[1], 0x6420u), even1 = prmt(r[2], r[3], 0x6420u);
        const uint32_t odd0 = prmt(r[0], r[1], 0x7531u), odd1 = prmt(r[2], r[3], 0x7531u);
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma_u8s8_16832(o[mt][2 * n16], pa[mt][kc], even0, even1);
          mma_u8s8_16832(o[mt][2 * n16 + 1], pa[mt][kc], odd0, odd1);
        }
      }
    }
  }

  // ============================================================================== epilogue
  // out = acc / l (0 for rows without any unmasked key: l = 0), lse = (m + log2 l) * ln 2
  // (-inf for those rows). NaN in l (from NaN scores) propagates to out through acc.
  //
  // The output dtype is the V dtype (attention_fwd.cu checks it), so a compile-time choice
  // except for pv_int8 (fp16 / bf16 / fp32: one switch per block). Two sinks for the same
  // normalised fragments (for_each_out):
  //  - staged (16-bit out, whole Dv, rows 16-byte aligned: a.out_vec * 2 >= 16, and the tile fits
  //    in the stage buffers): the block's O tile goes through shared memory (free after a
  //    barrier), then every thread writes whole 16-byte chunks of the rows: a warp stores whole
  //    contiguous rows (128 bytes at Dv = 64) instead of 4-byte pieces of 8 rows;
  //  - direct: per row one base pointer, one store of kVec elements per group (kVec = the group
  //    size when out_vec allows it, else 1: chosen once per block, no branch per store).
  static constexpr DType kOutDtype = kTF32 ? DType::kFloat32 : Tr::kPv == PvKind::kBF16 ? DType::kBFloat16
                                                                                      : DType::kFloat16;
  static constexpr int kOutGroup = kInt8 ? 4 : 2;  // consecutive channels per fragment group
  // Staged O tile: rows of kDvPad 16-bit values at a pitch of an odd number of 16-byte chunks
  // (fragment stores of the 8 rows g of a warp hit 8 different bank groups).
  static constexpr int kOutChunks = Tr::kDvPad * 2 / 16;
  static constexpr int kOutPitch = (kOutChunks | 1) * 16;
  static constexpr bool kStagedOut =
      !kInt8 && !kTF32 && !Tr::kDvMasked && kBlockM * kOutPitch <= Tr::kSmemFixed;

  __device__ __forceinline__ void epilogue() {
    float inv[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float l = l_run[r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int i = row_of(r);
      if (a.lse != nullptr && t == 0 && i < a.Nq) {
        a.lse[int64_t(bh) * a.Nq + i] = (m_run[r] + __log2f(l)) * kLn2;
      }
      inv[r] = l > 0.0f ? 1.0f / l : 0.0f;
    }
    if constexpr (kInt8) {
      switch (a.out_dtype) {
        case DType::kFloat32: store_out<DType::kFloat32>(inv); break;
        case DType::kBFloat16: store_out<DType::kBFloat16>(inv); break;
        default: store_out<DType::kFloat16>(inv); break;
      }
    } else {
      store_out<kOutDtype>(inv);
    }
  }

  // Calls f(r, c0, vals) for every group of kOutGroup consecutive output channels c0.. of this
  // thread's row r (normalised; pv_int8 also dequantised), channels past dv left out.
  template <class F>
  __device__ __forceinline__ void for_each_out(const float (&inv)[kRows], F&& f) const {
    if constexpr (kInt8) {
#pragma unroll
      for (int n16 = 0; n16 < Tr::kDvPad / 16; ++n16) {
        const int c0 = n16 * 16 + 4 * t;  // this lane's 4 consecutive channels
        if (Tr::kDvMasked && c0 >= a.dv) continue;
        const float* dq = a.v_dequant + int64_t(bh) * a.dv + c0;
        const float dq0 = __ldg(dq), dq1 = __ldg(dq + 1), dq2 = __ldg(dq + 2), dq3 = __ldg(dq + 3);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const int mt = r / 2, hr = r % 2;
          const float s = inv[r] * (1.0f / 255.0f);
          const float vals[4] = {float(o[mt][2 * n16][2 * hr]) * dq0 * s, float(o[mt][2 * n16 + 1][2 * hr]) * dq1 * s,
                                 float(o[mt][2 * n16][2 * hr + 1]) * dq2 * s,
                                 float(o[mt][2 * n16 + 1][2 * hr + 1]) * dq3 * s};
          f(r, c0, vals);
        }
      }
    } else {
#pragma unroll
      for (int nd = 0; nd < Tr::kDvBlocks; ++nd) {
        const int c0 = nd * 8 + 2 * t;
        if (Tr::kDvMasked && c0 >= a.dv) continue;
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const int mt = r / 2, hr = r % 2;
          const float vals[2] = {float(o[mt][nd][2 * hr]) * inv[r], float(o[mt][nd][2 * hr + 1]) * inv[r]};
          f(r, c0, vals);
        }
      }
    }
  }

  template <DType kOut>
  __device__ __forceinline__ void store_out(const float (&inv)[kRows]) {
    constexpr int kOutBytes = kOut == DType::kFloat32 ? 4 : 2;
    char* const out_head = static_cast<char*>(a.out) +
                           (int64_t(b) * a.out_stride[0] + int64_t(h) * a.out_stride[1]) * kOutBytes;
    const int64_t row_bytes = a.out_stride[2] * kOutBytes;
    if constexpr (kStagedOut && kOut != DType::kFloat32) {
      if (a.out_vec * kOutBytes >= 16) {
        store_out_staged<kOut>(inv, out_head, row_bytes);
        return;
      }
    }
    if (a.out_vec >= kOutGroup) {
      store_out_direct<kOut, kOutGroup>(inv, out_head, row_bytes);
    } else {
      store_out_direct<kOut, 1>(inv, out_head, row_bytes);
    }
  }

  template <DType kOut, int kVec>
  __device__ __forceinline__ void store_out_direct(const float (&inv)[kRows], char* out_head,
                                                   int64_t row_bytes) {
    using OutT = std::conditional_t<kOut == DType::kFloat32, float, uint16_t>;
    OutT* row_ptr[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) row_ptr[r] = reinterpret_cast<OutT*>(out_head + int64_t(row_of(r)) * row_bytes);
    for_each_out(inv, [&](int r, int c0, const float* vals) {
      if (row_of(r) >= a.Nq) return;
      store_group<kOut, kVec>(row_ptr[r] + c0, vals);
    });
  }

  // kOutGroup values to p (aligned to kVec elements).
  template <DType kOut, int kVec>
  __device__ __forceinline__ static void store_group(void* p, const float* vals) {
    constexpr int kN = kOutGroup;
    if constexpr (kOut == DType::kFloat32) {
      float* q = static_cast<float*>(p);
      if constexpr (kVec == 4) {
        *reinterpret_cast<float4*>(q) = make_float4(vals[0], vals[1], vals[2], vals[3]);
      } else if constexpr (kVec == 2) {
        *reinterpret_cast<float2*>(q) = make_float2(vals[0], vals[1]);
      } else {
#pragma unroll
        for (int e = 0; e < kN; ++e) q[e] = vals[e];
      }
    } else {
      uint32_t pairs[kN / 2];
#pragma unroll
      for (int e = 0; e < kN / 2; ++e) pairs[e] = pack_pair<kOut == DType::kBFloat16>(vals[2 * e], vals[2 * e + 1]);
      uint16_t* q = static_cast<uint16_t*>(p);
      if constexpr (kVec == 4) {
        *reinterpret_cast<uint2*>(q) = make_uint2(pairs[0], pairs[1]);
      } else if constexpr (kVec == 2) {
        *reinterpret_cast<uint32_t*>(q) = pairs[0];
      } else {
#pragma unroll
        for (int e = 0; e < kN; ++e) q[e] = uint16_t(pairs[e / 2] >> (16 * (e % 2)));
      }
    }
  }

  // The staged sink: every stage buffer is free once all copies landed and every warp is past
  // its last tile (the barrier); the rows are then written in whole 16-byte chunks.
  template <DType kOut>
  __device__ __forceinline__ void store_out_staged(const float (&inv)[kRows], char* out_head,
                                                   int64_t row_bytes) {
    cp_async_wait<0>();
    __syncthreads();
    const uint32_t tile = smem_u32(smem);
    for_each_out(inv, [&](int r, int c0, const float* vals) {
      const int row = warp_row0 + (r / 2) * 16 + (r % 2) * 8 + g;  // row_of(r) - m0
      st_shared_u32(tile + uint32_t(row * kOutPitch + c0 * 2), pack_pair<kOut == DType::kBFloat16>(vals[0], vals[1]));
    });
    __syncthreads();
    // chunk idx -> (row idx / kOutChunks, chunk idx % kOutChunks); a whole column per thread when
    // kOutChunks divides the block.
    constexpr bool kColumn = kThreads % kOutChunks == 0;
    constexpr int kTotal = kBlockM * kOutChunks;
    const int tid = threadIdx.x;
#pragma unroll
    for (int it = 0; it < (kTotal + kThreads - 1) / kThreads; ++it) {
      const int idx = tid + it * kThreads;
      if (kTotal % kThreads != 0 && idx >= kTotal) break;
      const int row = kColumn ? tid / kOutChunks + it * (kThreads / kOutChunks) : idx / kOutChunks;
      const int c = kColumn ? tid % kOutChunks : idx % kOutChunks;
      if (m0 + row >= a.Nq) continue;
      const uint4 v = ld_shared_v4(tile + uint32_t(row * kOutPitch + c * 16));
      *reinterpret_cast<uint4*>(out_head + int64_t(m0 + row) * row_bytes + c * 16) = v;
    }
  }
};

#if !defined(BINFORMER_FWD_HOST_EMULATION)  // (the emulator runs the block directly)
template <class Tr, bool kPerTokenK>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kMinBlocksPerSm)
    attention_fwd_kernel(const __grid_constant__ FwdArgs args) {
  extern __shared__ __align__(128) unsigned char fwd_smem[];
  FwdBlock<Tr, kPerTokenK> block(args, fwd_smem);
  block.run();
}
#endif

}  // namespace binformer::cuda::fwd
