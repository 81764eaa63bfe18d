// attention_bwd v2 main pass: key-major, tensor cores, for the common case (no dense bias, no
// rel-pos table, no dbias / drel output, head dims d, Dv <= 128). Outputs dV, dk_scale and the
// partial dq_scale rows (the finalize kernel sums them), like v1's main pass (bwd_tc.cuh), which
// still serves every other case. See cuda/NOTES_pack_gemm_bwd.md, "v2", for the reasoning.
//
// What differs from v1, per score element:
//  * dot from the b1 mma alone: the row and column bit strings are extended to [bits, ~bits]
//    (2 ceil(d/32) <= 8 words, inside the k = 256 of one m16n8k256), so AND.popc counts the
//    matching signs m and dot = 2 m - d. The accumulator starts at 0x4B000000 (2^23 as a float),
//    so the s32 result read as a float is 2^23 + m exactly: one FADD gives dot / 2. v1 needed
//    LOP3 + FADD (int -> float) + FADD + FFMA (popcount corrections).
//  * P = ex2(dot/2 * (a_i 2 scale log2e) b_j - lse_i log2e): FMUL + FFMA + MUFU.
//  * dS = P (dP - D); u = dS dot/2; dk_scale_j += u a_i; column part += u b_j (the factor
//    2 scale is applied once, at the end).
//  * the column sums over the warp's keys are a reduce-scatter (4 shuffles per 16 x 32 chunk and
//    thread instead of 12), then warps in a fixed order through shared memory, deferred to the
//    next tile's barrier.
//  * a warp owns kMTiles m-tiles of 16 keys (2 at hdim 64): every dO fragment read from shared
//    memory feeds kMTiles mmas, which halves the shared-memory traffic per score element (v1 read
//    16 bytes of dO per element, as much as the SM's shared-memory bandwidth allows for the
//    target), and the two m-tiles are independent chains for the scheduler.
//  * the 64-query tile is processed in 16-query chunks (b1 mma -> P -> dP -> dS -> dV k-step), so
//    only one chunk of P / dP / dot is live (registers), and a chunk that is entirely in range and
//    unmasked for the warp runs without index tests.
// Deterministic: every sum has one owner and a fixed order, no atomics.
#pragma once
#include <cstdlib>

#include "bwd_common.cuh"
#include "bwd_ptx.cuh"
#if !defined(BINFORMER_BWD_HOST_EMULATION)
#include "../sm90_support.h"  // device_is_sm90, kernel_has_sm90a_code (the launchers)
#endif

namespace binformer::cuda::bwd::tc {

// dO tile in shared memory for the wgmma dV (B operand, K = queries, N = Dv channels, MN-major):
// the canonical layouts of the forward's measured P.V (cuda/src/attention_fwd/pv_wgmma.h,
// WgmmaVLayout; device runs 13-15 at Dv 64..128), with query rows in place of key rows. T = one
// 16-byte chunk of 8 channels; the atom is W = 8, 4 or 2 chunks wide (the widest that divides
// Dv / 8: 64 / 128 -> 128B swizzle, 96 -> 64B, 80 -> 32B):
//   offset(row r, chunk c) = (c / W) * kCols * 16 W + r * 16 W + ((c % W) ^ swz(r)) * 16,
//   swz(r) = (r >> (3 - log2 W)) & (W - 1),
// i.e. m = Dv / (8 W) column blocks of kCols rows of 16 W bytes, every column block starting on
// a multiple of 1024 bytes. Descriptor: LBO = the column-block stride (1024 when there is only
// one), SBO = 8 rows (8 * 16 W bytes), swizzle mode 1 / 2 / 3 (128B / 64B / 32B). The swizzle is
// periodic in r with period 8, so rows r + 8k are the same pattern 8k * 16 W bytes further (the
// chunk of 16 query rows kc starts kc * 16 * 16 W bytes into every column block). At Dv = 64 this
// is exactly the hdim-64 layout (piece c of row r at c ^ (r % 8), 128-byte rows).
template <int kDv, int kRowsPerTile>
struct DoWgmmaLayout {
  static constexpr int kChunks = kDv / 8;
  static constexpr int kW = kChunks % 8 == 0 ? 8 : kChunks % 4 == 0 ? 4 : kChunks % 2 == 0 ? 2 : 1;
  static constexpr int kLogW = kW == 8 ? 3 : kW == 4 ? 2 : kW == 2 ? 1 : 0;
  static constexpr int kColumnBlocks = kChunks / kW;
  static constexpr uint32_t kRowBytes = 16u * kW;
  static constexpr uint32_t kColumnBlockBytes = uint32_t(kRowsPerTile) * kRowBytes;
  static constexpr uint32_t kTileBytes = kColumnBlockBytes * kColumnBlocks;
  static constexpr uint64_t kSwizzleMode = kW == 8 ? 1 : kW == 4 ? 2 : 3;  // 128B / 64B / 32B
  static constexpr uint32_t kLbo = kColumnBlocks == 1 ? 1024u : kColumnBlockBytes;
  static constexpr uint32_t kSbo = 8 * kRowBytes;
  static_assert(kDv % 16 == 0 && kDv >= 64 && kDv <= 128 && kW >= 2, "dO widths 64, 80, 96, 112, 128");
  static_assert(kColumnBlockBytes % 1024 == 0, "every column block starts on a swizzle repeat");
  // Byte offset of 16-byte chunk c (channels 8c..8c+7) of query row r inside a tile.
  __host__ __device__ static constexpr uint32_t chunk_offset(int r, int c) {
    const uint32_t swz = (uint32_t(r) >> (3 - kLogW)) & uint32_t(kW - 1);
    return uint32_t(c / kW) * kColumnBlockBytes + uint32_t(r) * kRowBytes + ((uint32_t(c % kW) ^ swz) << 4);
  }
  // Descriptor of the 16 x Dv B operand whose first row starts at smem address `addr` (start >> 4
  // in bits 0-13, LBO >> 4 in 16-29, SBO >> 4 in 32-45, base offset 0, mode in 62-63).
  __host__ __device__ static constexpr uint64_t desc(uint32_t addr) {
    return uint64_t((addr >> 4) & 0x3FFFu) | (uint64_t(kLbo >> 4) << 16) | (uint64_t(kSbo >> 4) << 32) |
           (kSwizzleMode << 62);
  }
};
static_assert(DoWgmmaLayout<64, 128>::chunk_offset(13, 5) == 13 * 128 + ((5 ^ 5) << 4), "the hdim-64 layout");
static_assert(DoWgmmaLayout<64, 128>::desc(0) == ((uint64_t(64) << 16) | (uint64_t(64) << 32) | (uint64_t(1) << 62)),
              "the hdim-64 descriptor (LBO = SBO = 1024, 128B)");

// kDvw: the channel width of V / dO in shared memory and of the dP / dV products (Dv rounded up:
// the zero channels past Dv cost work). kHdim (the bucket of max(d, Dv)) only sizes the bit words
// then. The hdim-128 wgmma kernels exist at kDvw = 80, 96, 128 (DiT's Dv = 72 runs at 80).
template <class T, int kHdim, bool kPipe = false, bool kNarrow = false, int kWgmma = 0, int kDvw = kHdim>
struct MainTraits {
  static_assert(kHdim == 64 || kHdim == 128, "v2 main pass: head-dim buckets 64 and 128");
  // kWgmma (BINFORMER_BWD_MAIN_WGMMA=1, sm_90a, hdim 64, pipelined, 2 m-tiles): dV += P^T dO on
  // wgmma.m64n64k16 (A = P from registers, B = the chunk's 16 dO rows from shared memory in the
  // 128-byte-swizzled MN-major layout, asynchronous). The CTA's 4 warps are one warpgroup, and
  // m-tile mt of warp w holds keys mt * 64 + 16 w.. (the wgmma row map) instead of 32 w + 16 mt...
  // kWgmma = 2 (BINFORMER_BWD_MAIN_WGMMA=2): dP = V dO^T on wgmma too (m64n16k16, A = V and B =
  // the chunk's dO rows, both K-major from shared memory with the 128-byte swizzle), so the V
  // fragments leave the registers and the 16 dP HMMAs per chunk and warp become 8 wgmmas.
  // hdim 128 (BINFORMER_BWD_MAIN_WGMMA128, default on): kWgmma = 1 on the pipelined 8-warp kernel, i.e. two
  // warpgroups of 64 keys (m-tile of warp w = keys 16 w.., the wgmma row map already), each
  // issuing m64nDvk16 with Dv = kDvw (80, 96, 128).
  static_assert(!kWgmma || (kPipe && !kNarrow && (kHdim == 64 ? kDvw == 64 : kWgmma == 1)),
                "wgmma: the pipelined 2-m-tile hdim-64 kernel, or dV only on the pipelined hdim-128 one");
  static_assert(kDvw % 16 == 0 && kDvw <= kHdim && (kDvw == kHdim || kHdim == 128), "channel width");
  static constexpr bool kWgmmaDp = kWgmma >= 2;
  // 16-key m-tiles per warp (dV: registers): 2 at hdim 64 (4 warps per CTA), 1 otherwise. kNarrow
  // (BINFORMER_BWD_MAIN_NARROW=1, hdim 64): 1 m-tile, 8 warps per CTA, <= 128 registers, so
  // 2 CTAs = 16 warps per SM (twice the warps to hide latency, twice the shared-memory reads of
  // dO per score element).
  static constexpr int kMTiles = kHdim <= 64 && !kNarrow ? 2 : 1;
  static constexpr int kRows = kKeyBlockTc;             // keys per CTA (fixes the partial layout)
  static constexpr int kWarps = kRows / (16 * kMTiles);
  static constexpr int kThreads = 32 * kWarps;
  // CTAs per SM that __launch_bounds__ asks for: 2 x 4 warps at hdim 64 (no spills at <= 255
  // registers); the hdim-64 kernel also exists with 3 (168 registers, ~40 spilled words per
  // chunk, 12 warps per SM), picked with BINFORMER_BWD_MAIN_MIN_BLOCKS=3 for device A/B.
  static constexpr int kMinBlocks = kHdim <= 64 ? 2 : 1;
  static_assert(!kNarrow || kHdim <= 64, "the narrow shape is the hdim-64 one");
  // Queries per tile (one cp.async stage): 64; the pipelined hdim-64 kernel uses 128 (half the
  // per-tile copy setup, barriers and flushes per chunk; 95 / 101 KiB of shared memory, so 2 CTAs
  // per SM on sm_90 (228 KiB) but 1 on sm_80 (164 KiB): the launcher then runs the unpipelined
  // kernel). bwd_host.h's main_cols (the finalize's causal rule) stays kFastMainCols: with
  // 128-key blocks both widths start key block kb at query 128 kb, so the same partials exist.
  static constexpr int kCols = kPipe && kHdim <= 64 ? 128 : kFastMainCols;
  static_assert(kKeyBlockTc % kCols == 0 && kKeyBlockTc % kFastMainCols == 0, "same causal first query");
  static constexpr int kChunks = kCols / 16;
  static constexpr int kStride = kDvw + 8;  // smem row stride of V / dO in T (16-byte skew)
  static constexpr int kDvTiles = kDvw / 8;
  static constexpr int kDvSteps = kDvw / 16;
  static constexpr int kBitWords = 4;             // words per query row in smem (d <= 128)
  static constexpr bool kHighWords = kHdim > 64;  // extended bits can reach words 4..7
  // Query-tile buffers: 2 (load the next tile while computing this one); the pipelined kernel
  // (kPipe) finishes a tile's last chunk during the next tile, so it keeps 3.
  static constexpr int kStages = kPipe ? 3 : 2;

  // dO rows in shared memory: kStride (skewed) or, for wgmma, 64 elements = 128 bytes with the
  // 16-byte pieces swizzled (piece c of row r at c ^ (r % 8)), every tile on a 1024-byte boundary.
  // (wgmma: DoWgmmaLayout, kDoStride = the row step inside a column block; whole tile kDoBytes.)
  using DoLayout = DoWgmmaLayout<kWgmma ? kDvw : 64, kCols>;
  static constexpr int kDoStride = kWgmma ? int(DoLayout::kRowBytes / sizeof(T)) : kStride;
  static constexpr int kVStride = kWgmmaDp ? 64 : kStride;  // V rows (wgmma dP: swizzled too)
  static constexpr size_t kVBytes = size_t(kRows) * kVStride * sizeof(T);
  static constexpr size_t kDoBytes = kWgmma ? size_t(DoLayout::kTileBytes) : size_t(kCols) * kDoStride * sizeof(T);
  static constexpr int kDoTileElems = int(kDoBytes / sizeof(T));
  static_assert(!kWgmma || (kVBytes % 1024 == 0 && kDoBytes % 1024 == 0), "1024-byte aligned dO tiles");
  static constexpr size_t kBitsBytes = size_t(kCols) * kBitWords * 4;
  static constexpr size_t kRecBytes = size_t(kCols) * 16;
  static constexpr size_t kColSumBytes = size_t(kWarps) * kCols * 4;
  static constexpr size_t kOffDo = kVBytes;
  static constexpr size_t kOffBits = kOffDo + kStages * kDoBytes;
  static constexpr size_t kOffRec = kOffBits + kStages * kBitsBytes;
  static constexpr size_t kOffColSum = kOffRec + kStages * kRecBytes;
  // kPipe: 16 zero rows of dO and 16 scratch column sums, the "pending chunk" before the first.
  static constexpr size_t kOffZero = (kOffColSum + kStages * kColSumBytes + 1023) / 1024 * 1024;
  static constexpr size_t kZeroBytes = kPipe ? size_t(16) * kDoStride * sizeof(T) : 0;
  static constexpr size_t kOffScratch = kOffZero + kZeroBytes;
  // + 1 KiB for wgmma: the kernel aligns the dynamic shared memory base to 1024 bytes itself.
  static constexpr size_t kSmemBytes = kOffScratch + (kPipe ? 16 * 4 : 0) + (kWgmma ? 1024 : 0);
};

// Word w (0..7) of the extended bit string [bits, ~bits, 0...] of a d-bit row: which stored word
// it comes from, whether it is complemented, and which bits are valid (pad bits stay 0).
struct ExtWord {
  int src;
  uint32_t flip, mask;
  __device__ __forceinline__ uint32_t operator()(uint32_t stored) const { return (stored ^ flip) & mask; }
};
__device__ __forceinline__ ExtWord ext_word(int w, int d, int words) {
  const uint32_t last_mask = (d & 31) ? (1u << (d & 31)) - 1u : ~0u;
  ExtWord e;
  if (w < words) {
    e.src = w; e.flip = 0u; e.mask = w == words - 1 ? last_mask : ~0u;
  } else if (w < 2 * words) {
    e.src = w - words; e.flip = ~0u; e.mask = w - words == words - 1 ? last_mask : ~0u;
  } else {
    e.src = 0; e.flip = 0u; e.mask = 0u;
  }
  return e;
}

// K-major operand with the 128-byte swizzle (rows of 64 16-bit elements = 128 bytes, piece c of
// row r at c ^ (r % 8)) starting at shared address `addr` (a multiple of 1024): SBO = 1024 (the
// next 8 rows), LBO unused for swizzled K-major layouts (encoded 1), mode 128B. The k16 slice
// ks of the 64-element rows starts 32 ks bytes further: + 2 ks in the start-address field.
__device__ __forceinline__ uint64_t wgmma_kmajor_desc(uint32_t addr) {
  return uint64_t((addr >> 4) & 0x3FFFu) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}

template <class T, int kHdim, int kMinBlocks, bool kPipe = false, bool kNarrow = false, int kWgmma = 0,
          int kDvw = kHdim>
__global__ void __launch_bounds__(MainTraits<T, kHdim, kPipe, kNarrow, kWgmma, kDvw>::kThreads, kMinBlocks)
attention_bwd_main_kernel(const BwdArgs a) {
  using Tr = MainTraits<T, kHdim, kPipe, kNarrow, kWgmma, kDvw>;
  constexpr int kM = Tr::kMTiles;
#if !defined(BINFORMER_WGMMA_CODE)
  if constexpr (kWgmma) return;  // sm_90a code only (the host launches it only there)
#endif
  BINFORMER_BWD_DYNAMIC_SMEM(unsigned char, smem_raw);
  unsigned char* smem = smem_raw;
  if constexpr (kWgmma) smem += (1024u - (smem_addr(smem_raw) & 1023u)) & 1023u;
  T* v_smem = reinterpret_cast<T*>(smem);
  T* do_smem = reinterpret_cast<T*>(smem + Tr::kOffDo);
  uint32_t* bits_smem = reinterpret_cast<uint32_t*>(smem + Tr::kOffBits);
  float4* rec_smem = reinterpret_cast<float4*>(smem + Tr::kOffRec);
  float* colsum_smem = reinterpret_cast<float*>(smem + Tr::kOffColSum);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;  // mma fragment coordinates
  const int64_t row_blocks = (a.Nk + Tr::kRows - 1) / Tr::kRows;
  const int64_t bh = int64_t(blockIdx.x) / row_blocks, row_block = int64_t(blockIdx.x) - bh * row_blocks;
  const int64_t b = bh / a.H, h = bh - b * a.H;
  const int64_t row0 = row_block * Tr::kRows;
  const int dv = a.dv_dim, d = a.d, words = a.words;
  const int nq = int(a.Nq), nk = int(a.Nk);  // the host picks v2 only for Nq, Nk < 2^30

  const uint32_t* k_bits = a.k_bits + b * a.k_stride[0] + h * a.k_stride[1];
  const uint32_t* q_bits = a.q_bits + b * a.q_stride[0] + h * a.q_stride[1];
  const T* v_gmem = static_cast<const T*>(a.v) + b * a.v_stride[0] + h * a.v_stride[1];
  const T* do_gmem = static_cast<const T*>(a.dout) + b * a.dout_stride[0] + h * a.dout_stride[1];
  const float4* krec = a.krec + bh * a.Nk;
  const float4* qrec = a.qrec + bh * a.Nq;

  const int64_t tile_begin = first_query_tile(a.causal, row_block, Tr::kRows, Tr::kCols);
  const int64_t tile_end = (a.Nq + Tr::kCols - 1) / Tr::kCols;

  // ---- V block and the first query tile (dO rows zero-filled past Dv and past Nq)
  constexpr int kVecV = kDvw / 8;  // 16-byte pieces per V row
  for (int e = tid; e < Tr::kRows * kVecV; e += Tr::kThreads) {
    const int r = e / kVecV, ch = (e - r * kVecV) * 8;
    const bool ok = row0 + r < a.Nk && ch < dv;
    const int dst = Tr::kWgmmaDp ? r * Tr::kVStride + (((ch >> 3) ^ (r & 7)) << 3) : r * Tr::kVStride + ch;
    cp_async_16(v_smem + dst, ok ? v_gmem + (row0 + r) * a.v_stride[2] + ch : v_gmem, ok);
  }
  if constexpr (kPipe) {  // the zero dO rows of the pipeline's initial (empty) pending chunk
    uint32_t* z = reinterpret_cast<uint32_t*>(smem + Tr::kOffZero);
    for (int e = tid; e < int(Tr::kZeroBytes / 4); e += Tr::kThreads) z[e] = 0u;
  }
  // One query tile: dO rows, query bits, query records. Compile-time trip counts (every thread
  // issues the same number of copies) and per-thread offsets computed once, so a tile's copies
  // are a few adds each (the generic 64-bit index math cost ~250 instructions per tile).
  // dO: kVec threads per row (a power of two >= kDvw / 8; threads past the row's pieces copy
  // nothing), so every thread keeps one piece position for the whole tile.
  constexpr int kVec = kDvw / 8 <= 8 ? 8 : 16;
  constexpr int kDoRowsPerRound = Tr::kThreads / kVec;
  constexpr int kBitRowsPerRound = Tr::kThreads / Tr::kBitWords;
  static_assert(Tr::kThreads % kVec == 0 && Tr::kCols % kDoRowsPerRound == 0 &&
                Tr::kCols % kBitRowsPerRound == 0, "whole copy rounds per tile");
  static_assert(Tr::kThreads >= Tr::kCols, "one thread per query column (record copy, column-sum flush)");
  const int do_row = tid / kVec, do_ch = (tid % kVec) * 8;
  const bool do_copies = do_ch < kDvw;  // (thread-uniform for the whole pass)
  // Element offset of this thread's 16-byte dO piece in a tile row group (rows do_row + k
  // kDoRowsPerRound keep do_row % 8, so the swizzle is the same for all of them).
  const int do_dst = kWgmma ? int(Tr::DoLayout::chunk_offset(do_row, do_ch >> 3) / sizeof(T))
                            : do_row * Tr::kDoStride + do_ch;
  static_assert(!kWgmma || kDoRowsPerRound % 8 == 0, "swizzle phase per thread");
  const bool do_ch_ok = do_ch < dv;
  const int bit_row = tid / Tr::kBitWords, bit_word = tid % Tr::kBitWords;
  const bool bit_word_ok = bit_word < words;
  const int64_t do_round_step = int64_t(kDoRowsPerRound) * a.dout_stride[2];
  const int64_t bit_round_step = int64_t(kBitRowsPerRound) * a.q_stride[2];
  auto load_tile = [&](int64_t tile, int buf) {
    const int c0 = int(tile) * Tr::kCols;
    T* ys = do_smem + buf * Tr::kDoTileElems + do_dst;
    const T* src = do_gmem + int64_t(c0 + do_row) * a.dout_stride[2] + do_ch;
    if (do_copies) {
#pragma unroll
      for (int it = 0; it < Tr::kCols / kDoRowsPerRound; ++it) {
        const bool ok = do_ch_ok && c0 + do_row + it * kDoRowsPerRound < nq;
        cp_async_16(ys + it * kDoRowsPerRound * Tr::kDoStride, ok ? src + it * do_round_step : do_gmem, ok);
      }
    }
    uint32_t* bs = bits_smem + buf * (Tr::kCols * Tr::kBitWords) + tid;
    const uint32_t* bsrc = q_bits + int64_t(c0 + bit_row) * a.q_stride[2] + bit_word;
#pragma unroll
    for (int it = 0; it < Tr::kCols / kBitRowsPerRound; ++it) {
      const bool ok = bit_word_ok && c0 + bit_row + it * kBitRowsPerRound < nq;
      cp_async_4(bs + it * Tr::kThreads, ok ? bsrc + it * bit_round_step : q_bits, ok);
    }
    if (tid < Tr::kCols) {
      const bool ok = c0 + tid < nq;
      cp_async_16(rec_smem + buf * Tr::kCols + tid, ok ? qrec + c0 + tid : qrec, ok);
    }
    cp_async_commit();
  };
  if (tile_begin < tile_end) load_tile(tile_begin, 0);
  else cp_async_commit();

  // ---- row (key) state in registers
  // First key (relative to row0) of m-tile mt of this warp: 16 consecutive m-tiles per warp, or
  // for wgmma the warpgroup's row map (m-tile mt = rows mt * 64 .. of the CTA, warp w = 16 w ..).
  auto tile_key = [&](int mt) { return kWgmma ? mt * 64 + warp * 16 : warp * (16 * kM) + mt * 16; };
  int64_t my_row[kM][2];
#pragma unroll
  for (int mt = 0; mt < kM; ++mt) {
    my_row[mt][0] = row0 + tile_key(mt) + g;
    my_row[mt][1] = row0 + tile_key(mt) + g + 8;
  }
  // b1 A fragments of the extended key bits: a0 / a1 = word t of rows g / g + 8, a2 / a3 = word
  // t + 4 (always zero at hdim 64: 2 ceil(64/32) = 4 words).
  uint32_t abits[kM][4];
  const ExtWord ext_lo = ext_word(t, d, words), ext_hi = ext_word(t + 4, d, words);
#pragma unroll
  for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t r = my_row[mt][k & 1];
      const ExtWord& e = (k >> 1) ? ext_hi : ext_lo;
      const bool ok = r < a.Nk && e.mask != 0u && (Tr::kHighWords || (k >> 1) == 0);
      abits[mt][k] = ok ? e(__ldg(k_bits + r * a.k_stride[2] + e.src)) : 0u;
    }
  }
  float row_b[kM][2];  // b_j (0 on padding rows)
#pragma unroll
  for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
    for (int k = 0; k < 2; ++k) row_b[mt][k] = my_row[mt][k] < a.Nk ? krec[my_row[mt][k]].x : 0.f;
  }

  float acc[kM][Tr::kDvTiles][4];  // dV
#pragma unroll
  for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
    for (int i = 0; i < Tr::kDvTiles; ++i) acc[mt][i][0] = acc[mt][i][1] = acc[mt][i][2] = acc[mt][i][3] = 0.f;
  }
  float dk_sum[kM][2] = {};  // sum_i dS dot/2 a_i of rows g, g + 8

  const float two_scale = 2.f * a.scale;
  const float col_factor_scale = two_scale * kLog2e;   // a_i -> a_i 2 scale log2e
  const float dot_offset = 8388608.f + 0.5f * float(d);  // (2^23 + m) - (2^23 + d/2) = dot / 2
  const int magic[4] = {0x4B000000, 0x4B000000, 0x4B000000, 0x4B000000};  // 2^23 as a float

  // Partial dq_scale of one query tile: the warps' column sums in a fixed order. Only when
  // dq_scale is wanted: without it there is no partial buffer (dq_scale_partial is null).
  auto flush_column_sums = [&](int64_t tile, int buf) {
    const int64_t i = tile * Tr::kCols + tid;
    if (a.dq_scale_partial != nullptr && tid < Tr::kCols && i < a.Nq) {
      const float* cs = colsum_smem + buf * (Tr::kWarps * Tr::kCols);
      float s = 0.f;
#pragma unroll
      for (int w = 0; w < Tr::kWarps; ++w) s += cs[w * Tr::kCols + tid];
      a.dq_scale_partial[(bh * a.num_key_blocks + row_block) * a.Nq + i] = s * two_scale;
    }
  };

  cp_async_wait_all();
  __syncthreads();
  // V fragments (A operand of dP = V dO^T), kept in registers for the whole pass.
  uint32_t vfrag[kM][Tr::kDvSteps][4];
#pragma unroll
  for (int mt = 0; mt < (Tr::kWgmmaDp ? 0 : kM); ++mt) {
    const T* vw = v_smem + (tile_key(mt) + (lane & 7) + ((lane >> 3) & 1) * 8) * Tr::kStride + (lane >> 4) * 8;
#pragma unroll
    for (int ks = 0; ks < Tr::kDvSteps; ++ks) ldmatrix_x4(vfrag[mt][ks], vw + ks * 16);
  }
  // Per-lane smem offsets of the dO fragments of a chunk: non-transposed (dP) and transposed (dV).
  // (wgmma: rows of 64 elements, piece p of chunk row r at p ^ (r % 8), r % 8 = lane % 8.)
  // (wgmma: DoWgmmaLayout; this lane's row (lane >> 4) * 8 + lane % 8 of the chunk, piece
  // 2 ks + bit 3 of the lane.)
  const int do_row_l = (lane >> 4) * 8 + (lane & 7);
  const int do_off = kWgmma ? 0 : do_row_l * Tr::kDoStride + ((lane >> 3) & 1) * 8;
  auto do_piece = [&](int ks) {  // element offset of this lane's piece for k-step ks
    return kWgmma ? int(Tr::DoLayout::chunk_offset(do_row_l, 2 * ks + ((lane >> 3) & 1)) / sizeof(T)) : ks * 16;
  };
  const int do_off_t = (((lane >> 3) & 1) * 8 + (lane & 7)) * Tr::kDoStride + (lane >> 4) * 8;
  // Column-sum slot of this lane inside a chunk's 16 columns (after the reduce-scatter below);
  // only even g store (the odd ones hold duplicates).
  const int cs_lane = (g >> 2) * 8 + 2 * t + ((g >> 1) & 1);
  const bool cs_store = (g & 1) == 0;

  // The back half of a chunk: column sums over the warp's keys (reduce-scatter over g = lane
  // bits 4, 3, 2; afterwards lane (g, t) holds query column cs_lane) into the chunk's slot
  // `cs`, and dV += P^T dO with P (rounded to T, as FlashAttention does) straight from the
  // accumulator layout as the A operand, k = the chunk's 16 queries `ys` (dO rows in smem).
  // (kWgmma: the column sums only; the chunk issues its own dV wgmma, see below.)
  auto chunk_back = [&](const uint32_t (&pa)[kM][4], const float (&col_part)[2][2], const T* ys, float* cs) {
    {
      const bool up16 = (lane & 16) != 0, up8 = (lane & 8) != 0;
      float keep0 = up16 ? col_part[1][0] : col_part[0][0];
      float keep1 = up16 ? col_part[1][1] : col_part[0][1];
      const float send0 = up16 ? col_part[0][0] : col_part[1][0];
      const float send1 = up16 ? col_part[0][1] : col_part[1][1];
      keep0 += __shfl_xor_sync(0xffffffffu, send0, 16);
      keep1 += __shfl_xor_sync(0xffffffffu, send1, 16);
      float keep = up8 ? keep1 : keep0;
      const float send = up8 ? keep0 : keep1;
      keep += __shfl_xor_sync(0xffffffffu, send, 8);
      keep += __shfl_xor_sync(0xffffffffu, keep, 4);
      if (cs_store) cs[cs_lane] = keep;
    }
    if constexpr (!kWgmma) {
#pragma unroll
      for (int dp = 0; dp < Tr::kDvTiles / 2; ++dp) {
        uint32_t yb[4];
        ldmatrix_x4_trans(yb, ys + do_off_t + dp * 16);
#pragma unroll
        for (int mt = 0; mt < kM; ++mt) {
          mma_16816<T>(acc[mt][2 * dp], pa[mt], yb[0], yb[1]);
          mma_16816<T>(acc[mt][2 * dp + 1], pa[mt], yb[2], yb[3]);
        }
      }
    }
  };

  // kPipe: the back half of chunk c runs in the iteration of the next processed chunk, in the
  // same basic block as that chunk's front half (b1 mma, exps, dP), so the scheduler overlaps
  // the two dependency chains: chunk c's shuffles and dV mmas fill the latency of chunk c + 1's
  // b1 mma -> exp -> dP chain. Before the first chunk the pending one is empty (P = 0 against
  // zero dO rows, column sums to a scratch slot): exact no-ops, so no branch is needed.
  uint32_t pend_pa[kM][4];
  float pend_col[2][2];
  const T* pend_ys = reinterpret_cast<const T*>(smem + Tr::kOffZero);
  float* pend_cs = reinterpret_cast<float*>(smem + Tr::kOffScratch);
#pragma unroll
  for (int mt = 0; mt < kM; ++mt) pend_pa[mt][0] = pend_pa[mt][1] = pend_pa[mt][2] = pend_pa[mt][3] = 0u;
  pend_col[0][0] = pend_col[0][1] = pend_col[1][0] = pend_col[1][1] = 0.f;

  int stage = 0;  // (tile - tile_begin) % kStages
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int buf = stage;
    const int next = buf + 1 == Tr::kStages ? 0 : buf + 1;
    stage = next;
    cp_async_wait_all();
    __syncthreads();
    if (tile + 1 < tile_end) load_tile(tile + 1, next);
    // Column sums complete at this barrier: the previous tile's (kPipe: the one before, since
    // the previous tile's last chunk finishes during this tile's first). Its buffer is `next`
    // with 3 stages (tile - 2) and with 2 (tile - 1).
    if constexpr (kPipe) {
      if (tile >= tile_begin + 2) flush_column_sums(tile - 2, next);
    } else {
      if (tile > tile_begin) flush_column_sums(tile - 1, next);
    }
    const int64_t c0 = tile * Tr::kCols;
    const T* ys = do_smem + buf * Tr::kDoTileElems;
    const uint32_t* bs = bits_smem + buf * (Tr::kCols * Tr::kBitWords);
    const float4* rs = rec_smem + buf * Tr::kCols;
    float* colsum = colsum_smem + (buf * Tr::kWarps + warp) * Tr::kCols;

#pragma unroll 1
    for (int kc = 0; kc < Tr::kChunks; ++kc) {
      // Positions inside one head fit in int (nq, nk above).
      const int q0 = int(c0) + kc * 16;
      // Past the last query (the last tile): nothing to compute, and no column sum is read there
      // (the flush stops at Nq). Block-uniform. (Before, these chunks ran with P = 0: e.g. 4 of
      // the 40 chunks per key block at N = 577.)
      if (q0 >= nq) break;
      // Warp-uniform: the chunk's 16 queries against the warp's 16 kM keys (wgmma: block-uniform,
      // the CTA's keys, since the whole warpgroup issues every wgmma).
      const int k_lo = int(row0) + (kWgmma ? 0 : tile_key(0)), k_hi = k_lo + (kWgmma ? Tr::kRows : 16 * kM);
      if (a.causal && k_lo > q0 + 15) {  // every key after every query: P = 0, nothing to add
        if (cs_store) colsum[kc * 16 + cs_lane] = 0.f;
        continue;
      }
      const bool interior = q0 + 16 <= nq && k_hi <= nk && !(a.causal && k_hi - 1 > q0);

      auto chunk = [&](auto check_bounds) {
        constexpr bool kCheck = decltype(check_bounds)::value;
        // Column records {lse log2e, D, a_i, -} of the 4 queries this thread touches; -D in the
        // accumulator layout (rows g and g + 8 share the column) seeds the dP mma, so dP - D
        // costs no instruction.
        float c_lse[2][2], c_a[2][2], c_f[2][2], minus_d[2][4];
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
          for (int cs = 0; cs < 2; ++cs) {
            const float4 r = rs[kc * 16 + nt * 8 + 2 * t + cs];
            c_lse[nt][cs] = r.x;
            minus_d[nt][cs] = minus_d[nt][cs + 2] = -r.y;
            c_a[nt][cs] = r.z;
            c_f[nt][cs] = r.z * col_factor_scale;
          }
        }
        // dot / 2 from the b1 mma (see the header comment).
        float s_x[kM][2][4];
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          const uint32_t* cb = bs + (kc * 16 + nt * 8 + g) * Tr::kBitWords;
          const uint32_t b0 = ext_lo(cb[ext_lo.src]);
          const uint32_t b1 = Tr::kHighWords ? ext_hi(cb[ext_hi.src]) : 0u;
#pragma unroll
          for (int mt = 0; mt < kM; ++mt) {
            int pc[4];
            mma_b1_and_popc(pc, abits[mt], b0, b1, magic);
#pragma unroll
            for (int e = 0; e < 4; ++e) s_x[mt][nt][e] = __int_as_float(pc[e]) - dot_offset;
          }
        }
        // kWgmma = 2: dP - D = V dO^T - D on wgmma, issued before the exps (which it does not
        // need) and retired before dS: per m-tile 4 k16 steps of m64n16k16, the accumulator
        // seeded with -D.
        float w_dp[kM][2][4];
        (void)w_dp;
        if constexpr (Tr::kWgmmaDp) {
#pragma unroll
          for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
              for (int e = 0; e < 4; ++e) w_dp[mt][nt][e] = minus_d[nt][e];
            }
          }
          const uint64_t desc_b = wgmma_kmajor_desc(smem_addr(ys + kc * 16 * Tr::kDoStride));
          wgmma_fence();
#pragma unroll
          for (int mt = 0; mt < kM; ++mt) {
            const uint64_t desc_a = wgmma_kmajor_desc(smem_addr(v_smem + mt * 64 * Tr::kVStride));
#pragma unroll
            for (int ks = 0; ks < Tr::kDvSteps; ++ks) {
              wgmma_m64n16k16_ss<T>(w_dp[mt], desc_a + 2 * ks, desc_b + 2 * ks);
            }
          }
          wgmma_commit();
        }
        // The pending chunk's back half (kPipe), independent of everything above and below.
        if constexpr (kPipe) chunk_back(pend_pa, pend_col, pend_ys, pend_cs);
        // P = 2^(dot/2 f_i b_j - lse_i log2e), zero where masked.
        float s_p[kM][2][4];
#pragma unroll
        for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int rs2 = e >> 1, cs = e & 1;
              const float p = ex2_approx(fmaf(s_x[mt][nt][e], c_f[nt][cs] * row_b[mt][rs2], -c_lse[nt][cs]));
              if constexpr (kCheck) {
                const int i = q0 + nt * 8 + 2 * t + cs, j = int(row0) + tile_key(mt) + g + 8 * rs2;
                const bool valid = i < nq && j < nk && !(a.causal && j > i);
                s_p[mt][nt][e] = valid ? p : 0.f;
              } else {
                s_p[mt][nt][e] = p;
              }
            }
          }
        }
        // P rounded to T in the A-operand layout of the dV mma (the accumulator layout, k = the
        // chunk's 16 queries).
        uint32_t pa[kM][4];
#pragma unroll
        for (int mt = 0; mt < kM; ++mt) {
          pa[mt][0] = pack2<T>(s_p[mt][0][0], s_p[mt][0][1]);
          pa[mt][1] = pack2<T>(s_p[mt][0][2], s_p[mt][0][3]);
          pa[mt][2] = pack2<T>(s_p[mt][1][0], s_p[mt][1][1]);
          pa[mt][3] = pack2<T>(s_p[mt][1][2], s_p[mt][1][3]);
        }
        // kWgmma: dV += P^T dO for this chunk now, one m64n64k16 per m-tile (B = the chunk's 16
        // swizzled dO rows), asynchronous: it runs under the dP mmas and dS below and is retired
        // at the end of the chunk (wait_group 0), before pa or the dO rows can change.
        if constexpr (kWgmma) {
          const uint64_t desc = Tr::DoLayout::desc(smem_addr(ys + kc * 16 * Tr::kDoStride));
          wgmma_fence();
#pragma unroll
          for (int mt = 0; mt < kM; ++mt) wgmma_m64nNk16_rs<kDvw, std::is_same_v<T, __nv_bfloat16>>(acc[mt], pa[mt], desc);
          wgmma_commit();
        }
        // dP - D = V dO^T - D (k = channels); each dO fragment serves the kM m-tiles. No Dv
        // guard: V and dO are zero past Dv in shared memory, and a runtime test here would split
        // the chunk into basic blocks (v1 paid that per element).
        float s_dp[kM][2][4];
        if constexpr (Tr::kWgmmaDp) {
          // retire the dP group (issued before the exps); the dV group may still run
          wgmma_wait<1>();
#pragma unroll
          for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                s_dp[mt][nt][e] = w_dp[mt][nt][e];
                reg_fence(s_dp[mt][nt][e]);
              }
            }
          }
        }
#pragma unroll
        for (int ks = 0; ks < (Tr::kWgmmaDp ? 0 : Tr::kDvSteps); ++ks) {
          uint32_t yb[4];
          ldmatrix_x4(yb, ys + kc * 16 * Tr::kDoStride + do_off + do_piece(ks));
#pragma unroll
          for (int mt = 0; mt < kM; ++mt) {
            if (ks == 0) {
              mma_16816<T>(s_dp[mt][0], vfrag[mt][ks], yb[0], yb[1], minus_d[0]);
              mma_16816<T>(s_dp[mt][1], vfrag[mt][ks], yb[2], yb[3], minus_d[1]);
            } else {
              mma_16816<T>(s_dp[mt][0], vfrag[mt][ks], yb[0], yb[1]);
              mma_16816<T>(s_dp[mt][1], vfrag[mt][ks], yb[2], yb[3]);
            }
          }
        }
        // dS and its sums.
        float col_part[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
#pragma unroll
        for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int rs2 = e >> 1, cs = e & 1;
              const float u = s_p[mt][nt][e] * s_dp[mt][nt][e] * s_x[mt][nt][e];
              dk_sum[mt][rs2] = fmaf(u, c_a[nt][cs], dk_sum[mt][rs2]);
              col_part[nt][cs] = fmaf(u, row_b[mt][rs2], col_part[nt][cs]);
            }
          }
        }
        if constexpr (kWgmma) wgmma_wait<0>();  // this chunk's dV wgmma (see above)
        if constexpr (kPipe) {  // this chunk becomes the pending one
#pragma unroll
          for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
            for (int k = 0; k < 4; ++k) pend_pa[mt][k] = pa[mt][k];
          }
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
            pend_col[nt][0] = col_part[nt][0];
            pend_col[nt][1] = col_part[nt][1];
          }
          pend_ys = ys + kc * 16 * Tr::kDoStride;
          pend_cs = colsum + kc * 16;
        } else {
          chunk_back(pa, col_part, ys + kc * 16 * Tr::kDoStride, colsum + kc * 16);
        }
      };
      if (interior) chunk(std::false_type{});
      else chunk(std::true_type{});
    }
  }
  // kPipe: the last pending chunk (or the empty one when no chunk ran).
  if constexpr (kPipe) chunk_back(pend_pa, pend_col, pend_ys, pend_cs);
  if constexpr (kWgmma) {
    wgmma_wait<0>();  // (every chunk retired its own; the accumulators are final here)
#pragma unroll
    for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
      for (int i = 0; i < Tr::kDvTiles; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) reg_fence(acc[mt][i][e]);
      }
    }
  }

  // ---- epilogue
  if (tile_begin < tile_end) {
    __syncthreads();
    if (a.dq_scale) {
      if constexpr (kPipe) {
        if (tile_end - 2 >= tile_begin) flush_column_sums(tile_end - 2, int((tile_end - 2 - tile_begin) % Tr::kStages));
      }
      flush_column_sums(tile_end - 1, int((tile_end - 1 - tile_begin) % Tr::kStages));
    }
  }
  if (a.dv) {
#pragma unroll
    for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
      for (int dt = 0; dt < Tr::kDvTiles; ++dt) {
        const int ch = dt * 8 + 2 * t;
        if (ch >= dv) break;
#pragma unroll
        for (int rs2 = 0; rs2 < 2; ++rs2) {
          const int64_t j = my_row[mt][rs2];
          if (j < a.Nk) {
            *reinterpret_cast<float2*>(a.dv + (bh * a.Nk + j) * dv + ch) =
                make_float2(acc[mt][dt][rs2 * 2], acc[mt][dt][rs2 * 2 + 1]);
          }
        }
      }
    }
  }
  if (a.dk_scale) {
#pragma unroll
    for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
      for (int rs2 = 0; rs2 < 2; ++rs2) {
        float v = dk_sum[mt][rs2];
        v += __shfl_xor_sync(0xffffffffu, v, 1);
        v += __shfl_xor_sync(0xffffffffu, v, 2);
        if (t == 0 && my_row[mt][rs2] < a.Nk) a.dk_scale[bh * a.Nk + my_row[mt][rs2]] = v * two_scale;
      }
    }
  }
}
}  // namespace binformer::cuda::bwd::tc

namespace binformer::cuda::bwd::tc {

// BINFORMER_BWD_MAIN_PIPE=1: the pipelined main pass (kPipe: a chunk's column sums and dV mmas
// overlap the next chunk's b1 mma / exps / dP). Read on every launch (a getenv), so a test can
// switch it; pending device verification, then it becomes the default. Combines with
// BINFORMER_BWD_MAIN_NARROW=1 or BINFORMER_BWD_MAIN_MIN_BLOCKS=3 (NARROW wins over MIN_BLOCKS).
inline bool main_pipe_knob() {
  const char* e = std::getenv("BINFORMER_BWD_MAIN_PIPE");
  return e != nullptr && e[0] == '1';
}
// BINFORMER_BWD_MAIN_NARROW=1: the hdim-64 kernel with 1 m-tile per warp and 8 warps per CTA
// (MainTraits::kNarrow; 16 warps per SM). Read on every launch; pending device A/B.
inline bool main_narrow_knob() {
  const char* e = std::getenv("BINFORMER_BWD_MAIN_NARROW");
  return e != nullptr && e[0] == '1';
}
// BINFORMER_BWD_MAIN_WGMMA: the sm_90a kernel with dV on wgmma (MainTraits::kWgmma; implies the
// pipelined 2-m-tile shape at hdim 64; overrides PIPE / NARROW / MIN_BLOCKS there). **Default on**
// (unset or 1) since device run 15 (H100: 4096/64 hamming 1.576 -> 1.529 ms, gtests green); it
// applies only on sm_90 devices whose binary holds sm_90a code, everything else runs the mma.sync
// kernels. =0 forces the mma.sync kernels (A/B, and the gtests that cover them on the H100);
// =2 puts dP on wgmma too (pending device verification). Read on every launch.
inline int main_wgmma_knob() {  // 0 (off), 1 (dV on wgmma) or 2 (dV and dP)
  const char* e = std::getenv("BINFORMER_BWD_MAIN_WGMMA");
  if (e == nullptr || e[0] == '\0') return 1;
  return e[0] == '0' ? 0 : e[0] == '2' ? 2 : 1;
}

// BINFORMER_BWD_MAIN_WGMMA128=1: the hdim-128 bucket (d or Dv in 65..128) on the sm_90a kernel
// with dV on wgmma (pipelined, 8 warps = 2 warpgroups, dO / V at the channel width kDvw = Dv
// rounded up to 80, 96 or 128). Default since device run 16 (H100: 4096/128 hamming main pass
// 3.035 -> 2.761 ms, gtest MainPassV2Wgmma128 passed); =0 here or BINFORMER_BWD_MAIN_WGMMA=0
// turns it off. Read on every launch.
inline bool main_wgmma128_knob() {
  const char* e = std::getenv("BINFORMER_BWD_MAIN_WGMMA128");
  return e == nullptr || e[0] != '0';
}
// The channel width of the hdim-128 wgmma kernel for Dv (<= 128).
inline int wgmma128_width(int dv) { return dv <= 80 ? 80 : dv <= 96 ? 96 : 128; }

}  // namespace binformer::cuda::bwd::tc

#if !defined(BINFORMER_BWD_HOST_EMULATION)
namespace binformer::cuda::bwd::tc {

// BINFORMER_BWD_MAIN_MIN_BLOCKS=3: the 3-CTAs-per-SM build of the hdim-64 kernel (read once).
inline int main_min_blocks_knob() {
  static const int v = [] {
    const char* e = std::getenv("BINFORMER_BWD_MAIN_MIN_BLOCKS");
    return e != nullptr && e[0] == '3' ? 3 : 0;
  }();
  return v;
}

template <class T, int kHdim, bool kPipe, bool kNarrow, int kWgmma = 0, int kDvw = kHdim>
cudaError_t launch_main_v2_variant(const BwdArgs& a, cudaStream_t stream) {
  using Tr = MainTraits<T, kHdim, kPipe, kNarrow, kWgmma, kDvw>;
  const int64_t blocks = (a.Nk + Tr::kRows - 1) / Tr::kRows * a.B * a.H;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  auto kernel = attention_bwd_main_kernel<T, kHdim, Tr::kMinBlocks, kPipe, kNarrow, kWgmma, kDvw>;
  if constexpr (kHdim <= 64 && !kNarrow && !kWgmma) {
    if (main_min_blocks_knob() == 3) kernel = attention_bwd_main_kernel<T, kHdim, 3, kPipe>;
  }
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(Tr::kSmemBytes));
  if (err != cudaSuccess) return err;
  kernel<<<unsigned(blocks), Tr::kThreads, Tr::kSmemBytes, stream>>>(a);
  return cudaGetLastError();
}

template <class T, int kHdim, bool kPipe>
cudaError_t launch_main_v2_pipe(const BwdArgs& a, cudaStream_t stream) {
  if constexpr (kHdim <= 64) {
    if (main_narrow_knob()) return launch_main_v2_variant<T, kHdim, kPipe, true>(a, stream);
  }
  return launch_main_v2_variant<T, kHdim, kPipe, false>(a, stream);
}

// Whether `blocks` CTAs of `smem_bytes` dynamic shared memory fit on one SM of the current device
// (1 KiB per CTA is reserved by the runtime on sm_80 / sm_90).
inline bool fits_per_sm(size_t smem_bytes, int blocks) {
  int dev = 0, per_sm = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev) != cudaSuccess) {
    return false;
  }
  return size_t(blocks) * (smem_bytes + 1024) <= size_t(per_sm);
}

// The wgmma kernel runs only on compute capability 9.0 with sm_90a code in the binary (a build
// without 90a in BINFORMER_CUDA_ARCHS has an empty kernel body there).
template <class T, int kHdim>
cudaError_t launch_main_v2(const BwdArgs& a, cudaStream_t stream) {
  if constexpr (kHdim == 128) {
    using W = MainTraits<T, kHdim, true, false, 1, 128>;
    if (main_wgmma128_knob() && main_wgmma_knob() != 0 && device_is_sm90() && fits_per_sm(W::kSmemBytes, W::kMinBlocks)) {
      static const bool has_code =
          kernel_has_sm90a_code(attention_bwd_main_kernel<T, kHdim, W::kMinBlocks, true, false, 1, 128>);
      if (has_code) {
        switch (wgmma128_width(a.dv_dim)) {
          case 80: return launch_main_v2_variant<T, kHdim, true, false, 1, 80>(a, stream);
          case 96: return launch_main_v2_variant<T, kHdim, true, false, 1, 96>(a, stream);
          default: return launch_main_v2_variant<T, kHdim, true, false, 1, 128>(a, stream);
        }
      }
    }
  }
  if constexpr (kHdim <= 64) {
    using W = MainTraits<T, kHdim, true, false, 1>;
    const int wg = main_wgmma_knob();
    if (wg != 0 && device_is_sm90() && fits_per_sm(W::kSmemBytes, W::kMinBlocks)) {
      // (one query per process and instantiation: the loaded binary does not change)
      static const bool has_code =
          kernel_has_sm90a_code(attention_bwd_main_kernel<T, kHdim, W::kMinBlocks, true, false, 1>);
      if (has_code) {
        return wg == 2 ? launch_main_v2_variant<T, kHdim, true, false, 2>(a, stream)
                       : launch_main_v2_variant<T, kHdim, true, false, 1>(a, stream);
      }
    }
  }
  // The pipelined kernel only where it keeps the unpipelined kernel's CTAs per SM (its 3-stage
  // ring of 128-query tiles needs ~95 KiB per CTA at hdim 64: sm_90 yes, sm_80 no).
  using P = MainTraits<T, kHdim, true, false>;
  if (main_pipe_knob() && fits_per_sm(P::kSmemBytes, P::kMinBlocks)) return launch_main_v2_pipe<T, kHdim, true>(a, stream);
  return launch_main_v2_pipe<T, kHdim, false>(a, stream);
}

}  // namespace binformer::cuda::bwd::tc
#endif  // !BINFORMER_BWD_HOST_EMULATION
