// binformer forward attention, bounded-max kernel: fp16/bf16 V, no dense bias, no per-token
// k scale (BinaryAttention's per-head scales, plain sign attention, with or without the rel-pos
// bias). Shares the pipeline, Q fragments, P.V and epilogue with FwdBlock (kernel.h).
//
// Why a second kernel. With no dense bias and no per-token key factor every score is bounded
// a priori: in log2 units s_ij log2(e) = c_i <q_i, k_j> + r_ij with c_i = |scale a_i b_head|
// log2(e) >= 0 (sign folding, kernel.h), <q_i, k_j> <= d and r_ij <= rmax_h (the head's table
// maximum, from the K pre-pass). The kernel works with the shifted score
//   z_ij = c_i (<q_i, k_j> - d) + (r_ij - rmax_h) + kTop  <=  kTop,
// so that 2^z never exceeds 2^kTop (2^15.9 for fp16 P, 2^32 for bf16 P). Once a row's maximum
// z is known to reach kFloor (0 for fp16: the largest P of the row is >= 1, so fp16 subnormals
// lose no more than with the usual max-subtracted P; -64 for bf16, whose exponent range is
// fp32's), the row maximum is fixed at 0 for the rest of the row: P = 2^z directly, with no
// FMNMX, no quad shuffles, no rescaling, and no dependency between the keys of a tile, which
// lets every k16 key step run scores -> ex2 -> P.V on its own (the compiler interleaves the
// MUFU work of one step with the tensor work of the next).
//   - a priori (before the first key): when 2 c_i d + (rmax_h - rmin_h) <= kTop - kFloor, the
//     smallest possible row maximum already reaches kFloor;
//   - otherwise each warp starts with the online softmax of kernel.h (conditional rescaling, in
//     z units, 32-key chunks) and switches for good as soon as every row's running maximum is
//     >= kFloor (one rescale of the accumulator by 2^m). Rows that never get there (very large
//     scales in fp16) keep the online path: the result is the same, only slower.
// lse = (m + log2 l + c_i d + rmax_h log2(e) - kTop) ln 2 stays exact (fp32 row sum l).
//
// Per score element the fixed path executes (d <= 64, QK::kDup128, no rel-pos): FADD (column
// constant), FFMA (row factor and row constant), MUFU.EX2, FADD (row sum), 1/2 F2FP, 1/4 b1 mma
// and the P.V mma (6.4 SASS instructions per element, measured). The float conversion of the
// popcount lives in the b1 mma's accumulator input: with d <= 64 the bits are duplicated into
// both halves of the k128 product (lanes t and t + 2 load the same word), D = 2 p(q & k) + C
// with C = the bits of 1.5 * 2^24 (the same for every element: a per-row C costs register
// copies around every mma); in the binade [2^24, 2^25) one unit of the bits is 2, so
//   __int_as_float(D) + colc_j = 1.5 * 2^24 + 4 p(q & k) - 1.5 * 2^24 - 2 p(k_j)   exactly,
// with colc_j = -(1.5 * 2^24) - 2 p(k_j) from the K pre-pass, and the row's -2 p(q_i) joins the
// FFMA's addend: z = fma(4 p(q&k) - 2 p(k_j), c_i, kTop - 2 c_i p(q_i)). With rel-pos the
// addend is the table entry and -p(q_i) is added to the bits (one IADD); d > 64 (no room to
// duplicate) rebuilds the bits with one IMAD: 2 p(q & k) + 0x4BC00000 - p(q_i).
//
// sm_90a, d <= 128 without rel-pos: the fixed tiles take 2 p(q & k) from the asynchronous b1
// wgmma instead (qk_wgmma.h; one IMAD per element rebuilds the same float bits), and with one row
// factor per head at d <= 64 the narrow kernel reads P from a table ("P table" below, NOTES v12).
//
// sm_90a (Tr::kWgmma, pv_wgmma.h): the same kernel with P.V on wgmma. Differences: V tiles in the
// 128-byte-swizzled layout; every decision that selects a code path containing a wgmma (fixed /
// online, masked steps) is uniform per warpgroup (wgmma is .aligned: all 4 warps must execute the
// same instruction), i.e. the fixed flag is voted per block (one or two warpgroups: the narrow
// and wide shapes of tile_config.h) and the masked-step limit covers the warpgroup's 64 rows;
// the accumulator is read or rescaled only after wgmma.wait_group 0 (pv_drain), and every tile
// is drained before the barrier that lets its stage be overwritten.
#pragma once
#include "kernel.h"
#include "pv_wgmma.h"
#include "qk_wgmma.h"

// sm_90a, d <= 128: 1 computes QK^T of the fixed-maximum tiles on the b1 wgmma (NOTES v12), 0 on
// mma.sync as before.
#ifndef BINFORMER_FWD_QK_WGMMA
#define BINFORMER_FWD_QK_WGMMA 1
#endif
// sm_90a: 16-key steps per wgmma commit group (1 or 2; the online path uses its 32-key chunks).
#ifndef BINFORMER_FWD_WGMMA_GROUP_STEPS
#define BINFORMER_FWD_WGMMA_GROUP_STEPS 2
#endif

namespace binformer::cuda::fwd {

template <class Tr>
struct FwdBoundedBlock : FwdBlock<Tr, false> {
  using Base = FwdBlock<Tr, false>;
  using Base::a;
  using Base::b;
  using Base::bh;
  using Base::g;
  using Base::h;
  using Base::l_run;
  using Base::lane;
  using Base::m0;
  using Base::m_run;
  using Base::o;
  using Base::qa;
  using Base::row_of;
  using Base::rowc;
  using Base::rowscale;
  using Base::smem;
  using Base::t;
  using Base::warp_row0;
  static constexpr int kMT = Base::kMT;
  static constexpr int kRows = Base::kRows;
  static constexpr int kBlockN = Base::kBlockN;
  static constexpr int kBlockM = Base::kBlockM;
  static constexpr int kThreads = Base::kThreads;
  static constexpr float kLog2e = Base::kLog2e;
  static constexpr float kInf = Base::kInf;

  static constexpr QK kQK = Tr::kQK;
  static constexpr bool kDup = kQK == QK::kDup128;
  static constexpr bool kK256 = kQK == QK::kK256;
  static constexpr bool kRelPos = Tr::kBoundedRelPos;
  static constexpr bool kBF = Tr::kPv == PvKind::kBF16;
  static constexpr int kKPitch = Tr::kKPitchWords;
  static constexpr bool kWgmma = Tr::kWgmma;
  static constexpr int kGroupSteps = BINFORMER_FWD_WGMMA_GROUP_STEPS;
  // sm_90a, d <= 128: QK^T of the fixed-maximum tiles on the b1 wgmma (qk_wgmma.h); the online
  // tiles keep mma.sync. (A compile-time switch: a run-time one costs the registers of both paths.)
  static constexpr bool kQkWgmma =
      (BINFORMER_FWD_QK_WGMMA && kWgmma && (kDup || kQK == QK::kK128) && !kRelPos) || Tr::kPTable;
  static constexpr bool kPTable = Tr::kPTable;
  static constexpr int kQkKeys = 16 * kGroupSteps;  // keys per b1 wgmma: one P.V group
  static_assert(kGroupSteps == 1 || kGroupSteps == 2, "wgmma group: 1 or 2 k16 steps");
  static_assert(!kWgmma || kMT == 1, "wgmma: one m-tile per warp (rows 16 w of the warpgroup)");
  // The wide shape is two warpgroups, the narrow one (BoundedShape::kNarrow) one: each owns 64 rows.
  static_assert(!kWgmma || (kThreads % 128 == 0 && kBlockM == kThreads / 2), "wgmma: whole warpgroups");
  // The wgmma V tile layout (pv_wgmma.h; unused without kWgmma).
  using VLayout = WgmmaVLayout<kWgmma ? Tr::kDvPad : 64, kBlockN>;
  // log2 of the largest P, and the value every row maximum must reach before it is fixed.
  static constexpr float kTop = kBF ? 32.0f : 15.9f;  // 2^15.9 = 61147 < 65504
  static constexpr float kFloor = kBF ? -64.0f : 0.0f;
  static constexpr int kChunkNB = 4;  // the online path works on 32-key chunks (registers)
  static_assert(kBlockN % (8 * kChunkNB) == 0, "whole online chunks per tile");
  // Bytes of packed Q the fragments read per row: words 0-1 (kDup128), 0-3 (k128), 0-7 (k256).
  static constexpr int kQBytes = kK256 ? 32 : (kQK == QK::kK128 ? 16 : 8);

  float lse_shift[kRows];  // c_i d + rmax_h log2(e) - kTop: z units -> log2 units
  float row_add[kRows];    // FFMA addend without rel-pos: kTop (- 2 c_i p(q_i) for kDup128)
  bool fixed;              // warp-uniform: the row maxima are fixed at 0 (P = 2^z)
  // P table (kPTable, see "P table" below): the lane's A words of the b1 wgmma (q, or ~q within
  // d), the shared address of T[0], the ones-matrix descriptor, and the row sums of the table's P
  // (m16n8 C layout: element 0 row g, 2 row g + 8).
  uint32_t tab_q[2];
  uint32_t tab_p;
  uint64_t ones_desc;
  float lsum[1][4];
  bool range_ok;           // the rel-pos range is finite (else z <= kTop is not guaranteed)
  // Rel-pos: shared-memory byte address of the table entry for (row, key with off_j = 0), the
  // byte step per unit of off_j (-4; 0 on the cls row), and the row's cls-column entry.
  uint32_t rel_base[kRelPos ? kRows : 1];
  int rel_mult[kRelPos ? kRows : 1];
  float rel_cls_col[kRelPos ? kRows : 1];
  int rel_len;  // patch entries of this block's table window (then the 3 cls entries)
  // The rel_base of the current key tile (+ the tile's slice shift when streaming, patch rows),
  // the z-unit conversion addend of streamed slices, and the last byte address of the tile's
  // table entries (masked keys past Nk have off_j = 0, which may lie past a streamed slice).
  uint32_t rel_tile[kRelPos ? kRows : 1];
  float rel_zadd;
  uint32_t rel_last;
  // Streamed: the block's patch grid rows, 1 / Ww, and the slice of each stage's tile (set when
  // the tile's copies are issued, read when they are converted and used).
  int rel_y_lo, rel_y_hi;
  float rel_inv_ww;
  int rel_slice_first[kRelPos ? Tr::kStages : 1], rel_slice_len[kRelPos ? Tr::kStages : 1];

  __device__ __forceinline__ FwdBoundedBlock(const FwdArgs& args, unsigned char* smem_base)
      : Base(args, smem_base) {}

  // ============================================================================== driver
  __device__ void run() {
    const int tid = threadIdx.x;
    const auto kt = Base::setup_block(tid);
    if constexpr (Tr::kTma) {
      if (tid == 0) tma_init_barriers();
    } else {
      copy_setup(tid);
    }
    const int n_tiles = kt.n_tiles, first_masked = kt.first_masked;

    // The rel-pos window goes first (its own cp.async group), then the pipeline prologue.
    if constexpr (kRelPos) {
      if (a.relpos_stream) relpos_stream_init();
      issue_table_window(tid);
    }
    griddep_wait();  // (the K pre-pass's workspace is read from here on: launch_overlap.h)
#pragma unroll
    for (int s = 0; s < Tr::kStages - 1; ++s) {
      if (s < n_tiles) load_tile_checked(s, n_tiles - 1 - s, tid, first_masked);
      cp_async_commit();
    }
    prologue(tid);

#pragma unroll
    for (int r = 0; r < kRows; ++r) l_run[r] = 0.0f;
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int nd = 0; nd < Tr::kDvBlocks; ++nd)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[mt][nd][e] = 0.0f;
#pragma unroll
    for (int e = 0; e < 4; ++e) lsum[0][e] = 0.0f;

    for (int it = 0; it < n_tiles; ++it) {
      if constexpr (Tr::kTma) {
        mbar_wait(tma_barrier(it % Tr::kStages), uint32_t(it / Tr::kStages) & 1u);
        if constexpr (kRelPos) cp_async_wait<Tr::kStages - 2>();  // (the streamed table slice)
      } else {
        cp_async_wait<Tr::kStages - 2>();
      }
      if constexpr (kRelPos) relpos_tile(tid, it % Tr::kStages);
      __syncthreads();  // tile `it` landed for every thread; stage (it-1) % kStages is free
      const int next = it + Tr::kStages - 1;
      if (next < n_tiles) load_tile_checked(next % Tr::kStages, n_tiles - 1 - next, tid, first_masked);
      cp_async_commit();
      const int n_tile = n_tiles - 1 - it;
      const unsigned char* st = smem + (it % Tr::kStages) * Tr::kStageBytes;
      const int key0 = n_tile * kBlockN;
#if defined(BINFORMER_FWD_HOST_EMULATION)
      fwd_emulation::count_tile(fixed, kPTable);  // coverage of the fixed / online / table paths
#endif
      if (n_tile >= first_masked) {
        // n8 blocks at or past warp_limit are masked for every row of the warp (wgmma: of the
        // warpgroup, whose 64 rows start at warp_row0 rounded down to 64).
        const int rows_end = kWgmma ? warp_row0 / 64 * 64 + 64 : warp_row0 + 16 * kMT;
        int warp_limit = a.Nk - key0;
        if (a.causal) warp_limit = min(warp_limit, m0 + rows_end - key0);
        if (fixed) {
          fixed_tile<true>(st, key0, warp_limit);
        } else {
          online_tile<true>(st, key0, warp_limit);
        }
      } else {
        if (fixed) {
          fixed_tile<false>(st, key0, kBlockN);
        } else {
          online_tile<false>(st, key0, kBlockN);
        }
      }
      // The next iteration's barrier releases this stage to the copies: its wgmma must be done.
      if constexpr (kWgmma) pv_drain();
    }
    // The table's row sums (zero unless it ran) are whole rows in every lane of the quad, whose
    // partial l_run the epilogue adds up: one lane contributes them. (Weighted, not branched:
    // reading a wgmma accumulator on a divergent path serializes every wgmma, ptxas C7520.)
    if constexpr (kPTable) {
      const float w = t == 0 ? 1.0f : 0.0f;
      l_run[0] = fmaf(w, lsum[0][0], l_run[0]);
      l_run[1] = fmaf(w, lsum[0][2], l_run[1]);
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) m_run[r] += lse_shift[r];  // the epilogue's lse in log2 units
    this->epilogue();
  }

  // Rel-pos per key tile: rel_tile / rel_last for the tile; streamed, each thread also converts
  // the slice entries it copied itself (its copies of this tile are complete after the wait) to
  // z units; the barrier after this publishes them.
  __device__ __forceinline__ void relpos_tile(int tid, int stage) {
    if (!a.relpos_stream) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) rel_tile[r] = rel_base[r];
      rel_last = 0xFFFFFFFFu;
      return;
    }
    RelPosWindow w{0, 0};
#pragma unroll
    for (int s = 0; s < Tr::kStages; ++s) {
      if (s == stage) w = RelPosWindow{rel_slice_first[s], rel_slice_len[s]};
    }
    float* slice = reinterpret_cast<float*>(smem + relpos_slice_offset(stage));
    for (int idx = tid; idx < w.len; idx += kThreads) slice[idx] = fmaf(slice[idx], kLog2e, rel_zadd);
    const uint32_t at = smem_u32(slice);
    const uint32_t shift = at - 4u * uint32_t(w.first);
#pragma unroll
    for (int r = 0; r < kRows; ++r) rel_tile[r] = rel_base[r] + (rel_mult[r] != 0 ? shift : 0u);
    rel_last = at + 4u * uint32_t(max(w.len, 1) - 1);
  }

  // ============================================================================== loads
  // One key tile: K bits (the k128 kernels know k_words = 4: 16-byte rows), the column
  // constants, the rel-pos column offsets, V (rows past Nk zero-filled only in masked tiles).
  //
  // Every copy of tile n_tile is (a per-block pointer + key0 * the bytes per key of its array:
  // uniform) + (a per-thread offset, fixed) -> (the stage) + (a per-thread offset, fixed): per
  // tile and 16-byte chunk one 64-bit add and the cp.async; V keeps a per-thread pointer
  // (copy_setup). Before v9 each tile recomputed the head's base, the thread's row / column and
  // 64-bit products (86 SASS instructions a tile for the wgmma Dv = 64 kernel, ncu).
  //
  // V: every thread copies one 16-byte column c of the key rows r0, r0 + kVRowStep, ...:
  //  - rows mapping (kThreads a multiple of the row's chunks, and the wgmma Dv = 64 layout): a
  //    quarter warp copies one whole row (128 contiguous bytes at Dv = 64); r0 = tid / chunks;
  //  - 8-key mapping (any other width, and the wgmma Dv = 72..128 layouts): thread t < 8 chunks
  //    copies chunk t / 8 of the keys t % 8 + 8 q: the 8 lanes of a quarter warp write the 8
  //    keys of one chunk, which every layout puts in 8 different 16-byte bank groups (the wgmma
  //    swizzles by key % 8; the padded pitch is an odd number of chunks), and a warp reads 4
  //    neighbouring chunks of 8 rows. The other threads copy no V.
  static constexpr int kVChunks = Tr::kVChunks;
  static constexpr bool kVRowsMap = kThreads % kVChunks == 0 && (kBlockN * kVChunks) % kThreads == 0 &&
                                    (!kWgmma || Tr::kDvPad == 64);
  static constexpr int kVRowStep = kVRowsMap ? kThreads / kVChunks : 8;
  static constexpr int kVPasses = kBlockN / kVRowStep;
  static constexpr int kVCopyThreads = kVRowsMap ? kThreads : 8 * kVChunks;
  static_assert(kBlockN % kVRowStep == 0 && kVCopyThreads <= kThreads, "whole V passes");
  static_assert(!kWgmma || kVRowStep % 8 == 0, "the swizzle phase (row % 8) is the same every pass");
  // Stage offset of (key row r, chunk c) of the V tile, and its step per pass.
  __host__ __device__ static constexpr uint32_t v_stage_offset(int r, int c) {
    return Tr::kOffV + (kWgmma ? VLayout::chunk_offset(r, c) : uint32_t(r * Tr::kVPitch + c * 16));
  }
  static constexpr uint32_t kVPassBytes = v_stage_offset(kVRowStep, 0) - v_stage_offset(0, 0);
  static_assert(v_stage_offset(kVRowStep + 3, kVChunks - 1) - v_stage_offset(3, kVChunks - 1) == kVPassBytes,
                "one shared-memory step per pass");
  // K bits: kBlockN rows of kKRowBytes (k256: 32 bytes into a 48-byte pitch), column constants
  // and rel-pos column offsets: 4 bytes a key.
  static constexpr int kKRowBytes = kK256 ? 32 : 16;
  static constexpr int kKChunks = kBlockN * kKRowBytes / 16;
  __device__ __forceinline__ static uint32_t k_stage_offset(int c) {
    return Tr::kOffKBits + (kK256 ? uint32_t(c / 2) * 48u + uint32_t(c % 2) * 16u : uint32_t(c) * 16u);
  }

  struct TileCopy {
    const char* v_src;  // this thread's V chunk of its first key row (v_row0) of key tile 0
    uint32_t v_dst;     // its stage offset
    int v_bytes;        // 16, or less for the last channels of a masked Dv (0: past dv)
  };
  TileCopy cp;
  // The thread's first V key row in a tile (recomputed where needed: masked tiles only).
  __device__ __forceinline__ static int v_row0(int tid) { return kVRowsMap ? tid / kVChunks : tid % 8; }

  __device__ __forceinline__ void copy_setup(int tid) {
    const int r0 = v_row0(tid);
    const int c = kVRowsMap ? tid % kVChunks : tid / 8;
    const char* v_head =
        static_cast<const char*>(a.v) + (int64_t(b) * a.v_stride[0] + int64_t(h) * a.v_stride[1]) * 2;
    cp.v_src = v_head + int64_t(r0) * (a.v_stride[2] * 2) + c * 16;
    cp.v_dst = v_stage_offset(r0, tid < kVCopyThreads ? c : 0);  // (threads past kVCopyThreads copy no V)
    cp.v_bytes = 16;
    if constexpr (Tr::kDvMasked) cp.v_bytes = max(0, min(16, a.dv * 2 - c * 16));
  }

  __device__ __forceinline__ void load_tile_checked(int stage, int n_tile, int tid, int first_masked) {
    if constexpr (Tr::kTma) {
      if (tid == 0) load_tile_tma(stage, n_tile);
      load_relpos_slice(stage, n_tile, tid);
    } else if (n_tile >= first_masked) {
      load_tile<true>(stage, n_tile, tid);
    } else {
      load_tile<false>(stage, n_tile, tid);
    }
  }

  template <bool kCheckKeys>
  __device__ __forceinline__ void load_tile(int stage, int n_tile, int tid) {
    unsigned char* st = smem + stage * Tr::kStageBytes;
    const uint32_t st_addr = smem_u32(st);
    const int key0 = n_tile * kBlockN;
    // The workspace rows are padded to whole tiles: no key checks.
    const int64_t key_row = int64_t(bh) * a.nk_pad + key0;
    const char* k_tile = reinterpret_cast<const char*>(a.k_bits) + key_row * kKRowBytes;
    Base::template copy_chunks<kKChunks>(tid, [&](int c) {
      cp_async_16(st_addr + k_stage_offset(c), k_tile + uint32_t(c) * 16u, 16);
    });
    const char* colc_tile = reinterpret_cast<const char*>(a.k_colc + key_row);
    const char* off_tile = kRelPos ? reinterpret_cast<const char*>(a.relpos_off + key0) : nullptr;
    Base::template copy_chunks<kBlockN / 4>(tid, [&](int c) {
      cp_async_16(st_addr + Tr::kOffColc + uint32_t(c) * 16u, colc_tile + uint32_t(c) * 16u, 16);
      if constexpr (kRelPos) {
        cp_async_16(st_addr + Tr::kOffRelOff + uint32_t(c) * 16u, off_tile + uint32_t(c) * 16u, 16);
      }
    });
    load_relpos_slice(stage, n_tile, tid);
    if (!kVRowsMap && tid >= kVCopyThreads) return;  // (the 8-key mapping: past 8 chunks, no V)
    // (zero-filled chunks name any valid global address: the tile's K bits)
    if (a.v_async_ok) {
      copy_v<kCheckKeys>(key0, tid, k_tile, [&](uint32_t dst, const char* src, int bytes) {
        cp_async_16(st_addr + dst, src, bytes);
      });
    } else {  // (rows not 16-byte aligned)
      copy_v<kCheckKeys>(key0, tid, k_tile, [&](uint32_t dst, const char* src, int bytes) {
        Base::copy_16_sync(st + dst, src, bytes);
      });
    }
  }

  // Streamed rel-pos (a.relpos_stream): every thread copies its share of the table entries tile
  // n_tile needs with this block's rows (4-byte cp.async: any alignment), in the tile's group.
  __device__ __forceinline__ void load_relpos_slice(int stage, int n_tile, int tid) {
    if constexpr (kRelPos) {
      if (a.relpos_stream) {
        const RelPosWindow w = relpos_slice(n_tile);
#pragma unroll
        for (int s = 0; s < Tr::kStages; ++s) {  // (registers: no dynamically indexed array)
          if (s == stage) {
            rel_slice_first[s] = w.first;
            rel_slice_len[s] = w.len;
          }
        }
        const float* table = a.relpos_table + int64_t(h) * a.relpos_table_stride_h + w.first;
        const uint32_t dst = smem_u32(smem) + relpos_slice_offset(stage);
        for (int idx = tid; idx < w.len; idx += kThreads) cp_async_4(dst + 4u * uint32_t(idx), table + idx);
      }
    }
  }

  // TMA (Tr::kTma): thread 0 issues the tile's copies, completing on the stage's mbarrier: the K
  // bits, the column constants and the rel-pos column offsets (contiguous workspace rows) as bulk
  // copies, V as VLayout's column blocks, each one box of V's tensor map (tma_desc.h) at {channel
  // 8 W j, key0, h, b}: the box's swizzle (128 / 64 / 32 bytes or none for W = 8 / 4 / 2 / 1) is
  // the wgmma layout, and keys past Nk arrive as zeros, as the masked copies write them. The
  // block's other threads issue nothing (the cp.async tile: ~75 instructions a thread at Dv = 64).
  static constexpr uint32_t kTmaTileBytes = uint32_t(kBlockN) * (16u + 4u + (kRelPos ? 4u : 0u)) + VLayout::kTileBytes;
  __device__ __forceinline__ uint32_t tma_barrier(int stage) const {
    return smem_u32(smem + Tr::kOffTmaBars) + 8u * uint32_t(stage);
  }
  __device__ __forceinline__ void tma_init_barriers() const {
#pragma unroll
    for (int s = 0; s < Tr::kStages; ++s) mbar_init(tma_barrier(s), 1);
    mbar_init_fence();
  }
  __device__ __forceinline__ void load_tile_tma(int stage, int n_tile) const {
    static_assert(Tr::kTma && kKRowBytes == 16 && Tr::kKPitchWords == 4 &&
                      VLayout::kTileBytes == uint32_t(kBlockN) * Tr::kDvPad * 2u,
                  "TMA tiles: 16-byte K rows, V tiles of whole column blocks");
    const uint32_t st = smem_u32(smem + stage * Tr::kStageBytes);
    const uint32_t bar = tma_barrier(stage);
    const int key0 = n_tile * kBlockN;
    const int64_t key_row = int64_t(bh) * a.nk_pad + key0;
    mbar_arrive_expect_tx(bar, kTmaTileBytes);
    tma_bulk_load(st + Tr::kOffKBits, reinterpret_cast<const char*>(a.k_bits) + key_row * 16, kBlockN * 16u, bar);
    tma_bulk_load(st + Tr::kOffColc, a.k_colc + key_row, kBlockN * 4u, bar);
    if constexpr (kRelPos) tma_bulk_load(st + Tr::kOffRelOff, a.relpos_off + key0, kBlockN * 4u, bar);
#pragma unroll
    for (int j = 0; j < VLayout::kColumnBlocks; ++j) {
      tma_load_4d(st + Tr::kOffV + uint32_t(j) * VLayout::kColumnBlockBytes, &a.v_tma, 8 * VLayout::kW * j, key0, h, b,
                  bar);
    }
  }

  // Calls copy(stage offset, source, bytes) for this thread's V chunks of the tile at key0
  // (bytes = 0: zero fill from `valid`, for keys past Nk in masked tiles and channels past a
  // masked dv).
  template <bool kCheckKeys, class F>
  __device__ __forceinline__ void copy_v(int key0, int tid, const char* valid, F&& copy) const {
    // (unsigned 32 x 64-bit products, IMAD.WIDE.U32 + IMAD; modulo 2^64 they give the same
    // address as the signed ones for any stride)
    const uint64_t v_stride = uint64_t(a.v_stride[2]);
    const char* v_tile = cp.v_src + uint64_t(uint32_t(2 * key0)) * v_stride;
    const uint64_t v_pass = uint64_t(2 * kVRowStep) * v_stride;
#pragma unroll
    for (int p = 0; p < kVPasses; ++p) {
      const int row = key0 + p * kVRowStep;  // (plus the thread's v_row0)
      const bool ok = (!kCheckKeys || row + v_row0(tid) < a.Nk) && (!Tr::kDvMasked || cp.v_bytes > 0);
      const char* src = v_tile + p * v_pass;
      copy(cp.v_dst + uint32_t(p) * kVPassBytes, ok ? src : valid, ok ? cp.v_bytes : 0);
    }
  }

  // Streamed rel-pos (a.relpos_stream): the table entries key tile n_tile needs with this
  // block's rows: table rows (y_i - y_j + Wh - 1) for the block's patch rows y_lo..y_hi and the
  // tile's patch keys' rows yk_lo..yk_hi, i.e. entries [first, first + len). The stage's slice
  // sits at kSmemFixed + 16 + stage * slice bytes (after the 3 cls entries).
  __device__ __forceinline__ void relpos_stream_init() {
    const int ww = a.relpos_ww, pre = a.relpos_prefix;
    const int first_row = max(m0, pre), last_row = min(m0 + kBlockM, a.Nq) - 1;
    rel_y_lo = first_row <= last_row ? (first_row - pre) / ww : 0;
    rel_y_hi = first_row <= last_row ? (last_row - pre) / ww : -1;  // no patch row: empty slices
    rel_inv_ww = 1.0f / float(ww);
  }
  // n / Ww for 0 <= n < 2^23 without an integer division (float estimate, one correction each way).
  __device__ __forceinline__ int div_ww(int n) const {
    int q = int(float(n) * rel_inv_ww);
    q -= q * a.relpos_ww > n ? 1 : 0;
    q += (q + 1) * a.relpos_ww <= n ? 1 : 0;
    return q;
  }
  __device__ __forceinline__ RelPosWindow relpos_slice(int n_tile) const {
    const int ww = a.relpos_ww, pre = a.relpos_prefix, wh = a.relpos_wh;
    const int k_lo = max(n_tile * kBlockN, pre), k_hi = min(n_tile * kBlockN + kBlockN, a.Nk) - 1;
    if (rel_y_hi < rel_y_lo || k_lo > k_hi) return RelPosWindow{0, 0};
    const int yk_lo = div_ww(k_lo - pre), yk_hi = div_ww(k_hi - pre);
    return RelPosWindow{(rel_y_lo - yk_hi + wh - 1) * (2 * ww - 1),
                        (rel_y_hi - rel_y_lo + yk_hi - yk_lo + 1) * (2 * ww - 1)};
  }
  __device__ __forceinline__ uint32_t relpos_slice_offset(int stage) const {
    return uint32_t(Tr::kSmemFixed + 16 + stage * ((a.relpos_slice * 4 + 15) / 16 * 16));
  }

  // Shared-memory rel-pos table of this block: the patch entries its rows can reach (table rows
  // y_lo .. y_hi + Wh - 1, see fwd_relpos_window), then the entries T-3, T-2, T-1 (cls row, cls
  // column, cls-cls). Copied with 4-byte cp.async (any alignment) in its own group.
  __device__ __forceinline__ void issue_table_window(int tid) {
    const RelPosWindow w = fwd_relpos_window(m0, kBlockM, a.Nq, a.relpos_prefix, a.relpos_wh,
                                             a.relpos_ww);
    rel_len = a.relpos_stream ? 0 : w.len;  // streamed: the 3 cls entries only
    const float* table = a.relpos_table + int64_t(h) * a.relpos_table_stride_h;
    const uint32_t dst = smem_u32(smem + Tr::kSmemFixed);
    const int tsize = a.relpos_table_size;
    for (int idx = tid; idx < rel_len + 3; idx += kThreads) {
      const int entry = idx < rel_len ? w.first + idx : tsize - 3 + (idx - rel_len);
      cp_async_4(dst + 4u * uint32_t(idx), table + entry);
    }
    cp_async_commit();
  }

  // ============================================================================== prologue
  // Q signs -> shared memory (one byte of 8 signs per load, all loads of a thread in flight
  // together), the rel-pos window to z units, then the fragments and the row constants.
  __device__ __forceinline__ void prologue(int tid) {
    Base::template pack_q_signs<kQBytes>(tid);
    float rmax2 = 0.0f, rmin2 = 0.0f;  // the head's table range in log2 units
    range_ok = true;
    if constexpr (kRelPos) {
      rmax2 = __ldg(a.relpos_range + 2 * h) * kLog2e;
      rmin2 = __ldg(a.relpos_range + 2 * h + 1) * kLog2e;
      // A non-finite table (the Python layer rejects those) keeps the online path throughout,
      // with an unshifted table (-inf - -inf would be NaN).
      range_ok = fabsf(rmax2) < kInf && fabsf(rmin2) < kInf;
      if (!range_ok) rmax2 = rmin2 = 0.0f;
      // z-unit table: t * log2(e) - rmax + kTop. Each thread converts the entries it copied
      // itself (its own cp.async group is complete after this wait); the barrier below
      // publishes them.
      cp_async_wait<Tr::kStages - 1>();
      float* tab = reinterpret_cast<float*>(smem + Tr::kSmemFixed);
      const float add = kTop - rmax2;
      rel_zadd = add;
      for (int idx = tid; idx < rel_len + 3; idx += kThreads) tab[idx] = fmaf(tab[idx], kLog2e, add);
    }
    if constexpr (kPTable) {
      const float k_head_t = a.k_scale_head != nullptr
                                 ? __ldg(a.k_scale_head + int64_t(b) * a.k_scale_head_stride[0] +
                                         int64_t(h) * a.k_scale_head_stride[1])
                                 : 1.0f;
      write_p_table(tid, fabsf(a.scale * this->query_factor(m0) * k_head_t) * kLog2e);
    }
    __syncthreads();

    const uint32_t* sq = reinterpret_cast<const uint32_t*>(smem + Tr::kOffQ);
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      const int lo = warp_row0 + mt * 16 + g, hi = lo + 8;
      // popcounts from words t and t + 4 (all 8 words, zero past d), then the fragment words
      int pop_lo = __popc(sq[lo * 8 + t]) + __popc(sq[lo * 8 + t + 4]);
      int pop_hi = __popc(sq[hi * 8 + t]) + __popc(sq[hi * 8 + t + 4]);
      pop_lo += __shfl_xor_sync(0xffffffffu, pop_lo, 1);
      pop_lo += __shfl_xor_sync(0xffffffffu, pop_lo, 2);
      pop_hi += __shfl_xor_sync(0xffffffffu, pop_hi, 1);
      pop_hi += __shfl_xor_sync(0xffffffffu, pop_hi, 2);
      const int w0 = kDup ? (t & 1) : t;  // kDup128: words 0, 1, 0, 1 across the quad
      qa[mt][0] = sq[lo * 8 + w0];
      qa[mt][1] = sq[hi * 8 + w0];
      qa[mt][2] = sq[lo * 8 + t + 4];
      qa[mt][3] = sq[hi * 8 + t + 4];
      // Added to the mma result bits (see the header): kDup128 already carries 1.5 * 2^24 in
      // the mma's C and, without rel-pos, its -2 p(q_i) in row_add.
      rowc[2 * mt] = (kDup ? 0 : 0x4BC00000) - pop_lo;
      rowc[2 * mt + 1] = (kDup ? 0 : 0x4BC00000) - pop_hi;
      if constexpr (kPTable) {  // A = (q0, q1, ~q0, ~q1) across the quad, ~q within d
        const int w = t & 1;
        const uint32_t in_d = a.d >= 32 * (w + 1) ? ~0u : a.d > 32 * w ? (1u << (a.d - 32 * w)) - 1u : 0u;
        const uint32_t flip = t < 2 ? 0u : in_d;
        tab_q[0] = (sq[lo * 8 + w] ^ flip) & in_d;
        tab_q[1] = (sq[hi * 8 + w] ^ flip) & in_d;
      }
    }

    const float k_head = a.k_scale_head != nullptr
                             ? __ldg(a.k_scale_head + int64_t(b) * a.k_scale_head_stride[0] +
                                     int64_t(h) * a.k_scale_head_stride[1])
                             : 1.0f;
    const float* tab = reinterpret_cast<const float*>(smem + Tr::kSmemFixed);
    const uint32_t tab_addr = smem_u32(tab);
    bool start_fixed = true;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int row = row_of(r);
      const int i = min(row, a.Nq - 1);
      const float c = fabsf(a.scale * this->query_factor(i) * k_head) * kLog2e;
      rowscale[r] = c;
      row_add[r] = kDup && !kRelPos ? fmaf(2.0f * float(rowc[r]), c, kTop) : kTop;
      lse_shift[r] = fmaf(c, float(a.d), rmax2 - kTop);
      // The smallest possible row maximum: every dot product -d, every table entry rmin.
      const float z_lowest = fmaf(-2.0f * float(a.d), c, kTop - (rmax2 - rmin2));
      const bool finite = fabsf(lse_shift[r]) < kInf;  // false for inf / NaN factors
      start_fixed &= row >= a.Nq || (range_ok && finite && z_lowest >= kFloor + 0.0625f);
      if constexpr (kRelPos) {
        const int wh = a.relpos_wh, ww = a.relpos_ww;
        if (i >= a.relpos_prefix) {
          const int p = i - a.relpos_prefix, y = p / ww, x = p % ww;
          const RelPosWindow w = fwd_relpos_window(m0, kBlockM, a.Nq, a.relpos_prefix, wh, ww);
          // streamed: the full-table entry; the tile's slice shift is added per tile
          const int entry = (y + wh - 1) * (2 * ww - 1) + x + ww - 1 - (a.relpos_stream ? 0 : w.first);
          rel_base[r] = (a.relpos_stream ? 0u : tab_addr) + 4u * uint32_t(entry);
          rel_mult[r] = -4;
          rel_cls_col[r] = tab[rel_len + 1];
        } else {  // the cls row: entry T-3 for every patch key, T-1 for the cls key
          rel_base[r] = tab_addr + 4u * uint32_t(rel_len);
          rel_mult[r] = 0;
          rel_cls_col[r] = tab[rel_len + 2];
        }
      }
    }
    // wgmma: one vote per block (the fixed and online paths issue different wgmma instructions).
    if constexpr (kWgmma) {
      // TMA: the shared memory written so far (packed Q, which the last stage aliases, the P
      // table) before the asynchronous proxy's writes and reads.
      if constexpr (Tr::kTma) fence_proxy_async_smem();
      fixed = __syncthreads_and(start_fixed) != 0;
    } else {
      fixed = __all_sync(0xffffffffu, start_fixed);
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) m_run[r] = fixed ? 0.0f : -kInf;
  }

  // ============================================================================== scores
  // z for the n8 key block nb of the tile (elements as the m16n8 C fragment), -inf where masked.
  template <bool kMask>
  __device__ __forceinline__ void scores_nb(float (&z)[kMT][4], const unsigned char* st, int nb,
                                            int key0) const {
    const uint32_t* krow = reinterpret_cast<const uint32_t*>(st + Tr::kOffKBits) + (nb * 8 + g) * kKPitch;
    int pc[kMT][4];
    if constexpr (kDup) {
      const uint32_t kb = krow[t & 1];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        mma_and_popc_k128_c(pc[mt], qa[mt][0], qa[mt][1], kb, 0x4BC00000, 0x4BC00000);
      }
    } else if constexpr (kK256) {
      const uint32_t kb0 = krow[t], kb1 = krow[t + 4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) mma_and_popc_k256(pc[mt], qa[mt], kb0, kb1);
    } else {
      const uint32_t kb0 = krow[t];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) mma_and_popc_k128(pc[mt], qa[mt][0], qa[mt][1], kb0);
    }
    int bits[kMT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = 2 * mt + e / 2;
        if constexpr (kDup) {
          bits[mt][e] = kRelPos ? pc[mt][e] + rowc[r] : pc[mt][e];
        } else {
          bits[mt][e] = pc[mt][e] * 2 + rowc[r];
        }
      }
    scores_from_bits<kMask>(z, st, nb, key0, bits);
  }

  // z of the n8 key block nb from the float bits of 1.5 * 2^24 + <q_i, k_j> - d + 2 p(k_j) (+ 2 p(q_i)
  // for kDup128 without rel-pos; see the header) in the m16n8 C layout.
  template <bool kMask>
  __device__ __forceinline__ void scores_from_bits(float (&z)[kMT][4], const unsigned char* st, int nb,
                                                   int key0, const int (&bits)[kMT][4]) const {
    const float2 cc = *reinterpret_cast<const float2*>(
        reinterpret_cast<const float*>(st + Tr::kOffColc) + nb * 8 + 2 * t);
    int2 off = make_int2(0, 0);
    if constexpr (kRelPos) {
      off = *reinterpret_cast<const int2*>(reinterpret_cast<const int*>(st + Tr::kOffRelOff) +
                                           nb * 8 + 2 * t);
    }
    // Only lanes t == 0 of the first n8 block of tile 0 hold the cls key (element e = 0, 2).
    const bool cls_key = kRelPos && nb == 0 && key0 == 0 && t == 0 && a.relpos_prefix > 0;
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = 2 * mt + e / 2;
        // <q_i, k_j> - d (kDup128 without rel-pos: + 2 p(q_i), which row_add takes back)
        const float y = __int_as_float(bits[mt][e]) + ((e & 1) ? cc.y : cc.x);
        float add = row_add[r];
        if constexpr (kRelPos) {
          uint32_t at = rel_tile[r] + uint32_t(rel_mult[r] * ((e & 1) ? off.y : off.x));
          if (kMask) at = min(at, rel_last);  // keys past Nk (off 0): any entry, masked below
          add = lds_f32(at);
          if ((e & 1) == 0 && nb == 0) add = cls_key ? rel_cls_col[r] : add;
        }
        float x = fmaf(y, rowscale[r], add);
        if (kMask) {
          const int j = key0 + nb * 8 + 2 * t + (e & 1);
          const bool ok = j < a.Nk && (!a.causal || j <= row_of(r));
          x = ok ? x : -kInf;
        }
        z[mt][e] = x;
      }
    }
  }

  // ============================================================================== fixed max
  // BINFORMER_FWD_POLY_EXP_EVERY = k (a measurement knob, default 0): every k-th n8 block of the
  // unmasked tiles computes 2^z on the FMA pipes (exp2_poly.h) instead of the MUFU.
  template <bool kMask>
  __device__ __forceinline__ static bool poly_exp_block(int nb) {
    constexpr int kPoly = BINFORMER_FWD_POLY_EXP_EVERY;
    if constexpr (kPoly > 0 && !kMask) return nb % (kPoly > 0 ? kPoly : 1) == kPoly - 1;
    return false;
  }

  // P = 2^z, streamed one k16 key step at a time.
  template <bool kMask>
  __device__ __forceinline__ void fixed_tile(const unsigned char* st, int key0, int warp_limit) {
    if constexpr (kWgmma) {
      fixed_tile_wgmma<kMask>(st, key0, warp_limit);
      return;
    }
    const uint32_t v_lane = this->v_lane_addr(st);
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      if (kMask && kk * 16 >= warp_limit) break;
      float p[kMT][2][4];
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int nb = 2 * kk + hf;
        if (kMask && nb * 8 >= warp_limit) {
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
            for (int e = 0; e < 4; ++e) p[mt][hf][e] = 0.0f;
          continue;
        }
        float z[kMT][4];
        scores_nb<kMask>(z, st, nb, key0);
        const bool poly = poly_exp_block<kMask>(nb);
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float pe = poly ? ex2_poly(z[mt][e]) : ex2_approx(z[mt][e]);  // masked: 2^-inf = 0
            p[mt][hf][e] = pe;
            l_run[2 * mt + e / 2] += pe;
          }
      }
      pv_step(p, v_lane + kk * 16 * Tr::kVPitch);
    }
  }

  __device__ __forceinline__ void pv_step(const float (&p)[kMT][2][4], uint32_t v_rows) {
    uint32_t pa[kMT][4];
    pack_p(pa, p);
    this->pv_f16_step(pa, v_rows);
  }

  // The two n8 score blocks of a k16 step -> the 16-bit A fragment of the step (per m-tile).
  __device__ __forceinline__ static void pack_p(uint32_t (&pa)[kMT][4], const float (&p)[kMT][2][4]) {
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      pa[mt][0] = pack_pair<kBF>(p[mt][0][0], p[mt][0][1]);
      pa[mt][1] = pack_pair<kBF>(p[mt][0][2], p[mt][0][3]);
      pa[mt][2] = pack_pair<kBF>(p[mt][1][0], p[mt][1][1]);
      pa[mt][3] = pack_pair<kBF>(p[mt][1][2], p[mt][1][3]);
    }
  }

  // ============================================================================== sm_90a P.V
  // Fixed maximum, wgmma P.V: groups of kGroupSteps k16 steps; each group computes its P
  // fragments (scores -> ex2 -> pack, exactly as fixed_tile), then fence, one wgmma per step,
  // commit, and waits for the previous group only: the exponentials of group s + 1 overlap the
  // tensor work of group s. Masked tiles issue every wgmma too (P = 0 past warp_limit; at most
  // the boundary / diagonal tile of a block): a wgmma under a condition that ptxas cannot prove
  // uniform is serialized (ptxas C7520), and the condition would have to be uniform per
  // warpgroup anyway (.aligned).
  template <bool kMask>
  __device__ __forceinline__ void fixed_tile_wgmma(const unsigned char* st, int key0, int warp_limit) {
    const uint64_t desc0 = VLayout::desc(smem_u32(st + Tr::kOffV));
    constexpr int kGroups = kBlockN / (16 * kGroupSteps);
    // kQkWgmma: the integer scores p(q & k) of one P.V group's keys per b1 wgmma, in a ring of
    // two register buffers: group kg + 1's in flight while group kg is consumed (qk_wgmma.h).
    static_assert(!kQkWgmma || 16 * kGroupSteps == kQkKeys, "one b1 wgmma per P.V group");
    if constexpr (kPTable) {
      table_tile<kMask>(st, key0);
      return;
    }
    int sc[kQkWgmma ? 2 : 1][kQkKeys / 8][4];
    if constexpr (kQkWgmma) qk_ring_start(st, sc);
#pragma unroll
    for (int kg = 0; kg < kGroups; ++kg) {
      uint32_t pa[kGroupSteps][kMT][4];
#pragma unroll
      for (int s = 0; s < kGroupSteps; ++s) {
        const int kk = kg * kGroupSteps + s;
        float p[kMT][2][4];
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int nb = 2 * kk + hf;
          if (kMask && nb * 8 >= warp_limit) {
#pragma unroll
            for (int e = 0; e < 4; ++e) p[0][hf][e] = 0.0f;
            continue;
          }
          float z[kMT][4];
          if constexpr (kQkWgmma) {
            int bits[kMT][4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              bits[0][e] = 2 * sc[kg % 2][2 * s + hf][e] + qk_row_bits(e / 2);
            }
            scores_from_bits<kMask>(z, st, nb, key0, bits);
          } else {
            scores_nb<kMask>(z, st, nb, key0);
          }
          const bool poly = poly_exp_block<kMask>(nb);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float pe = poly ? ex2_poly(z[0][e]) : ex2_approx(z[0][e]);  // masked: 2^-inf = 0
            p[0][hf][e] = pe;
            l_run[e / 2] += pe;
          }
        }
        pack_p(pa[s], p);
      }
      pv_wgmma_group(pa, desc0, kg * kGroupSteps);
      if constexpr (kQkWgmma) qk_ring_advance(st, sc, kg);
    }
  }

  // The score ring: groups 0 and 1 issued, group 0 ready.
  __device__ __forceinline__ void qk_ring_start(const unsigned char* st, int (&sc)[2][kQkKeys / 8][4]) {
    qk_issue(st, sc[0], 0);
    qk_issue(st, sc[1], 1);
    wgmma_wait<1>();
    fence_scores(sc[0]);
  }
  // After P.V group kg was issued: its wait retired every older group, so the scores of group
  // kg + 1 are in; group kg + 2 goes into the buffer group kg used.
  __device__ __forceinline__ void qk_ring_advance(const unsigned char* st, int (&sc)[2][kQkKeys / 8][4], int kg) {
    constexpr int kGroups = kBlockN / (16 * kGroupSteps);
    if (kg + 1 < kGroups) fence_scores(sc[(kg + 1) % 2]);
    if (kg + 2 < kGroups) qk_issue(st, sc[kg % 2], kg + 2);
  }

  // ============================================================================== P table
  // With one row factor for the whole block (per-head or no q_scale: the launcher picks these
  // kernels only then), no rel-pos and d <= 64, the fixed path's exponent is z = kTop - 2 c x with
  // x = p(q_i XOR k_j) in 0..d: P = 2^z takes only d + 1 values (SPEC.md section 3). The block
  // writes them once to a shared table, and every score element is a lookup, LEA + LDS + one PRMT,
  // instead of IMAD + FADD + FFMA + MUFU.EX2 + FADD + half an F2FP. The b1 wgmma gives
  // D = p(q & k) + p(~q & ~k) = d - x directly: A = (q0, q1, ~q0, ~q1) across the quad against the
  // K row (k0, k1, ~k0, ~k1) (the pre-pass stores ~k within d in words 2-3 at d <= 64), so the
  // table is indexed by D: T[D] = 2^(kTop - 2 c (d - D)), T[d + 1] = 0 for masked keys.
  // The row sums move to the tensor cores: P times a ones matrix (wgmma m64n8k16). Every score of a
  // row with the same D has the same P, so summing the 16-bit P that P.V uses would carry the
  // rounding of a few entries into lse unaveraged (up to 2^-12 relative): each entry is 32 bits,
  // the 16-bit P in the low half and the 16-bit rounding of (P - that) in the high half, and both
  // halves go through the ones product. (NOTES v11 measured this on the mma.sync b1 product, where
  // the b1 mma.sync throttled on the tensor pipe; v12 re-measures it on the wgmma scores.)
  __device__ __forceinline__ void write_p_table(int tid, float c) {
    constexpr uint32_t kOne = kBF ? 0x3F80u : 0x3C00u;
    const uint32_t ones_addr = smem_u32(smem + Tr::kOffPTable);
    for (int idx = tid; idx < Tr::kPTableOnesBytes / 4; idx += kThreads) {
      st_shared_u32(ones_addr + 4u * uint32_t(idx), kOne | (kOne << 16));
    }
    tab_p = ones_addr + Tr::kPTableOnesBytes;
    for (int dd = tid; dd <= a.d + 1; dd += kThreads) {
      const float p = dd <= a.d ? exp2f(kTop - 2.0f * c * float(a.d - dd)) : 0.0f;
      const uint32_t hi = pack_pair<kBF>(p, 0.0f) & 0xFFFFu;
      const float hi_f = kBF ? __uint_as_float(hi << 16) : __half2float(__ushort_as_half(uint16_t(hi)));
      st_shared_u32(tab_p + 4u * uint32_t(dd), hi | (pack_pair<kBF>(p - hi_f, 0.0f) << 16));
    }
    // No swizzle, 16-byte rows 128 bytes apart in both directions: every element a 1.
    ones_desc = uint64_t((ones_addr >> 4) & 0x3FFFu) | (uint64_t(128 >> 4) << 16) | (uint64_t(128 >> 4) << 32);
  }

  // fixed_tile_wgmma with P from the table: per P.V group the lookups of its scores, then P.V and
  // the two row-sum products. (Masked tiles mask per key: no branch around wgmma operands.)
  template <bool kMask>
  __device__ __forceinline__ void table_tile(const unsigned char* st, int key0) {
    const uint64_t desc0 = VLayout::desc(smem_u32(st + Tr::kOffV));
    constexpr int kGroups = kBlockN / (16 * kGroupSteps);
    const uint32_t masked_at = tab_p + 4u * uint32_t(a.d + 1);
    int sc[2][kQkKeys / 8][4];
    qk_ring_start(st, sc);
#pragma unroll
    for (int kg = 0; kg < kGroups; ++kg) {
      uint32_t pa[kGroupSteps][kMT][4], pl[kGroupSteps][kMT][4];
#pragma unroll
      for (int s = 0; s < kGroupSteps; ++s) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int nb = 2 * (kg * kGroupSteps + s) + hf;
          uint32_t ent[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            uint32_t at = tab_p + 4u * uint32_t(sc[kg % 2][2 * s + hf][e]);
            if (kMask) {
              const int j = key0 + nb * 8 + 2 * t + (e & 1);
              const bool ok = j < a.Nk && (!a.causal || j <= row_of(e / 2));
              at = ok ? at : masked_at;
            }
            ent[e] = lds_u32_invariant(at);
          }
          pa[s][0][2 * hf] = prmt(ent[0], ent[1], 0x5410u);      // row g, columns 2t, 2t + 1
          pa[s][0][2 * hf + 1] = prmt(ent[2], ent[3], 0x5410u);  // row g + 8
          pl[s][0][2 * hf] = prmt(ent[0], ent[1], 0x7632u);
          pl[s][0][2 * hf + 1] = prmt(ent[2], ent[3], 0x7632u);
        }
      }
      pv_wgmma_group<kGroupSteps, true>(pa, desc0, kg * kGroupSteps, &pl);
      qk_ring_advance(st, sc, kg);
    }
  }

  // One commit group: the b1 wgmma scores of the warpgroup's rows against keys kQkKeys * chunk ..
  // of the tile.
  __device__ __forceinline__ void qk_issue(const unsigned char* st, int (&sc)[kQkKeys / 8][4], int chunk) {
    // d <= 128: bits 128..255 unused. kDup128: the K words 2-3 hold ~k (pack_keys.h), which the
    // table's A words pair with ~q and the others with zero.
    const bool k_words_01 = !kDup || t < 2;
    const uint32_t qa4[4] = {kPTable ? tab_q[0] : k_words_01 ? qa[0][0] : 0u,
                             kPTable ? tab_q[1] : k_words_01 ? qa[0][1] : 0u, 0u, 0u};
    wgmma_fence();
    wgmma_b1_m64nNk256_rs<kQkKeys>(
        sc, qa4, WgmmaKBits::desc(smem_u32(st + Tr::kOffKBits)) + WgmmaKBits::key_step(chunk * kQkKeys));
    wgmma_commit();
  }

  // Pins the reads of a score buffer after the wait that retired its wgmma.
  __device__ __forceinline__ static void fence_scores(int (&sc)[kQkKeys / 8][4]) {
#pragma unroll
    for (int nb = 0; nb < kQkKeys / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) reg_fence_s32(sc[nb][e]);
  }

  // Added to 2 p(q & k) for the float bits that scores_from_bits takes (as the mma.sync forms
  // produce them: kDup128 carries 1.5 * 2^24 in its mma's C, kK128 in rowc).
  __device__ __forceinline__ int qk_row_bits(int r) const {
    if constexpr (kDup) return kRelPos ? 0x4BC00000 + rowc[r] : 0x4BC00000;
    return rowc[r];
  }

  // Issues one commit group of P.V: wgmma for the k16 steps step0 .. step0 + kSteps - 1 of the
  // tile, then waits until only this group may still be in flight.
  // kRowSums (the P table): also the row sums of pa and of the remainders *pl (ones products).
  template <int kSteps, bool kRowSums = false>
  __device__ __forceinline__ void pv_wgmma_group(uint32_t (&pa)[kSteps][kMT][4], uint64_t desc0,
                                                 int step0, uint32_t (*pl)[kSteps][kMT][4] = nullptr) {
    // PTX: a wgmma.fence between the register writes (P, a rescaled accumulator) and the wgmma
    // that reads them; reg_fence keeps the compiler from sinking those writes past the fence.
#pragma unroll
    for (int s = 0; s < kSteps; ++s)
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        reg_fence_u32(pa[s][0][q]);
        if constexpr (kRowSums) reg_fence_u32((*pl)[s][0][q]);
      }
    fence_accumulator();
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      wgmma_m64nNk16_rs<Tr::kDvPad, kBF>(o[0], pa[s][0], desc0 + uint64_t(step0 + s) * VLayout::kStepDesc);
      if constexpr (kRowSums) {
        wgmma_m64nNk16_rs<8, kBF>(lsum, pa[s][0], ones_desc);
        wgmma_m64nNk16_rs<8, kBF>(lsum, (*pl)[s][0], ones_desc);
      }
    }
    wgmma_commit();
    wgmma_wait<1>();
  }

  // Every wgmma of this warpgroup complete: the accumulator may be read or rescaled and the
  // stage's V overwritten.
  __device__ __forceinline__ void pv_drain() {
    wgmma_wait<0>();
    fence_accumulator();
  }

  __device__ __forceinline__ void fence_accumulator() {
#pragma unroll
    for (int nd = 0; nd < Tr::kDvBlocks; ++nd)
#pragma unroll
      for (int e = 0; e < 4; ++e) reg_fence(o[0][nd][e]);
    if constexpr (kPTable) {
#pragma unroll
      for (int e = 0; e < 4; ++e) reg_fence(lsum[0][e]);
    }
  }

  // ============================================================================== online max
  // kernel.h's online softmax in z units, on 32-key chunks; after the tile, the switch to the
  // fixed maximum when every row's running maximum reached kFloor.
  template <bool kMask>
  __device__ __forceinline__ void online_tile(const unsigned char* st, int key0, int warp_limit) {
    const uint32_t v_lane = this->v_lane_addr(st);
#pragma unroll
    for (int ch = 0; ch < kBlockN / (8 * kChunkNB); ++ch) {
      // (wgmma: no early exit, every wgmma must sit on a path that ptxas sees as uniform; the
      // masked blocks give P = 0)
      if (!kWgmma && kMask && ch * 8 * kChunkNB >= warp_limit) break;
      float s[kMT][kChunkNB][4];
      float tile_max[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) tile_max[r] = -kInf;
#pragma unroll
      for (int q = 0; q < kChunkNB; ++q) {
        const int nb = ch * kChunkNB + q;
        if (kMask && nb * 8 >= warp_limit) {
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[mt][q][e] = -kInf;
          continue;
        }
        float z[kMT][4];
        scores_nb<kMask>(z, st, nb, key0);
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            s[mt][q][e] = z[mt][e];
            tile_max[2 * mt + e / 2] = fmaxf(tile_max[2 * mt + e / 2], z[mt][e]);
          }
      }
      update_max(tile_max);
      float m_sub[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) m_sub[r] = m_run[r] == -kInf ? 0.0f : m_run[r];
      uint32_t pa[kChunkNB / 2][kMT][4];  // (wgmma: the chunk's steps form one commit group)
#pragma unroll
      for (int kk = 0; kk < kChunkNB / 2; ++kk) {
        if (!kWgmma && kMask && ch * 8 * kChunkNB + kk * 16 >= warp_limit) break;
        float p[kMT][2][4];
#pragma unroll
        for (int hf = 0; hf < 2; ++hf)
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int r = 2 * mt + e / 2;
              const float pe = ex2_approx(s[mt][2 * kk + hf][e] - m_sub[r]);
              p[mt][hf][e] = pe;
              l_run[r] += pe;
            }
        if constexpr (kWgmma) {
          pack_p(pa[kk], p);
        } else {
          pv_step(p, v_lane + (ch * kChunkNB / 2 + kk) * 16 * Tr::kVPitch);
        }
      }
      if constexpr (kWgmma) {
        pv_wgmma_group(pa, VLayout::desc(smem_u32(st + Tr::kOffV)), ch * kChunkNB / 2);
      }
    }
    try_fix_max();
  }

  // Running maxima over the quad; the accumulator is rescaled only when a row maximum grew by
  // more than the threshold since its last move (kernel.h's conditional rescaling).
  __device__ __forceinline__ void update_max(float (&tile_max)[kRows]) {
    constexpr float kThreshold = BINFORMER_FWD_RESCALE_THRESHOLD;
    // wgmma: the rescale below is decided per warp, the wait must be uniform per warpgroup.
    if constexpr (kWgmma) pv_drain();
    float m_old[kRows];
    bool moved[kRows];
    bool any = false;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float mx = tile_max[r];
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run[r], mx);
      moved[r] = m_new > m_run[r] + kThreshold;
      m_old[r] = m_run[r];
      if (moved[r]) m_run[r] = m_new;
      any |= moved[r];
    }
    if (__any_sync(0xffffffffu, any)) {
      float factor[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) factor[r] = moved[r] ? ex2_approx(m_old[r] - m_run[r]) : 1.0f;
      rescale(factor);
    }
  }

  __device__ __forceinline__ void rescale(const float (&factor)[kRows]) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) l_run[r] *= factor[r];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int nd = 0; nd < Tr::kDvBlocks; ++nd)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[mt][nd][e] *= factor[2 * mt + e / 2];
  }

  // Fix the maxima at 0 once every (stored) row's running maximum is >= kFloor: the
  // accumulator and row sum move from units of 2^m_run to units of 2^0 (factor 2^m_run <=
  // 2^kTop). Rows past Nq are never stored and take no part in the vote.
  __device__ __forceinline__ void try_fix_max() {
    bool ok = true;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      ok &= row_of(r) >= a.Nq || (range_ok && m_run[r] >= kFloor && fabsf(lse_shift[r]) < kInf);
    }
    bool all_ok;
    if constexpr (kWgmma) {
      pv_drain();
      all_ok = __syncthreads_and(ok) != 0;  // fixed stays uniform per block
    } else {
      all_ok = __all_sync(0xffffffffu, ok);
    }
    if (all_ok) {
      float factor[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        factor[r] = ex2_approx(m_run[r]);  // rows past Nq: possibly 2^-inf = 0, never stored
        m_run[r] = 0.0f;
      }
      rescale(factor);
      fixed = true;
    }
  }
};

// The dynamic shared memory base rounded up to kAlign (the launcher adds Tr::kSmemAlignSlack).
template <int kAlign>
__device__ __forceinline__ unsigned char* align_smem_base(unsigned char* p) {
  return p + ((kAlign - (smem_u32(p) & (kAlign - 1))) & (kAlign - 1));
}

#if !defined(BINFORMER_FWD_HOST_EMULATION)  // (the emulator runs the block directly)
template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kMinBlocksPerSm)
    attention_fwd_bounded_kernel(const __grid_constant__ FwdArgs args) {
  extern __shared__ __align__(128) unsigned char fwd_smem[];
  FwdBoundedBlock<Tr> block(args, fwd_smem);
  block.run();
}

// sm_90a only (wgmma); the other compilations leave the body empty and launch.h never launches
// it there (it checks the device and the kernel's binary version).
template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kMinBlocksPerSm)
    attention_fwd_bounded_wgmma_kernel(const __grid_constant__ FwdArgs args) {
#if defined(BINFORMER_WGMMA_CODE)
  extern __shared__ __align__(128) unsigned char fwd_smem[];
  FwdBoundedBlock<Tr> block(args, align_smem_base<Tr::kSmemAlign>(fwd_smem));
  block.run();
#endif
}
#endif

}  // namespace binformer::cuda::fwd
