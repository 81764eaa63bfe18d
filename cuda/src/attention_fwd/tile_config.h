// Tile shapes of the forward attention kernel, one per (P.V kind, padded value width).
//
// Host- and device-visible constexpr on purpose: the GoogleTest driver includes this header to
// emulate the pv_int8 quantization exactly (P is rounded against the *running* row maximum, so
// the result depends on the key-tile size and on the order in which key tiles are visited).
//
// Why these shapes (H100, mma.sync; details and predictions in cuda/NOTES_attention_fwd.md):
// - Every warp owns kMTiles x 16 query rows. Two m16 tiles per warp reuse each V fragment read
//   from shared memory twice: at Dv = 64 one m-tile per warp would need 8 bytes of ldmatrix
//   traffic per score element (16 elements/clk/SM at 128 B/clk), exactly the exp (MUFU) rate;
//   two m-tiles halve it.
// - Registers per thread ~ kMTiles*Dv/2 (O accumulator) + kMTiles*block_n/2 (scores) must stay
//   below 255 without spills: above Dv = 64 a warp keeps one m-tile (Dv/2 accumulator registers)
//   and the block has 8 warps (two m-tiles spilled at Dv = 72..128 even with 32-key tiles). That
//   costs ldmatrix bandwidth: Dv/8 bytes of V per score element, e.g. 9 B at Dv = 72 (14 elem/
//   clk/SM), 16 B at Dv = 128 (8 elem/clk/SM, below the ~9.6 of mma.sync); see the notes.
#pragma once

#if defined(__CUDACC__)
#define BINFORMER_FWD_HD __host__ __device__
#else
#define BINFORMER_FWD_HD
#endif

// Compile-time knobs (for measurements; defaults are the tuned choice).
#ifndef BINFORMER_FWD_STAGES
#define BINFORMER_FWD_STAGES 2  // cp.async pipeline depth for the K-bit / V tiles
#endif
// Pipeline depth of the bounded kernels (a measurement knob; see NOTES v16).
#ifndef BINFORMER_FWD_BOUNDED_STAGES
#define BINFORMER_FWD_BOUNDED_STAGES BINFORMER_FWD_STAGES
#endif
#ifndef BINFORMER_FWD_BOUNDED_BLOCK_N
#define BINFORMER_FWD_BOUNDED_BLOCK_N 128  // key tile of the bounded kernels at Dv <= 64
#endif
// The mma.sync bounded kernels at Dv <= 64 run two block shapes of 128 rows: 4 warps x 2 m-tiles at
// 168 registers, 3 blocks (12 warps) per SM, and 8 warps x 1 m-tile at 128 registers, 2 blocks
// (16 warps) per SM. Measured on the H100 (cuda/NOTES_attention_fwd.md, v3): the 8-warp shape
// is 10-18% faster on short key ranges and with rel-pos, 4% slower at Nk >= 4096 without bias
// (one V ldmatrix per m16 tile instead of per two, +28% instructions). The dispatcher takes the
// 8-warp shape with rel-pos and for Nk <= this bound.
#ifndef BINFORMER_FWD_BOUNDED_WIDE_MAX_NK
#define BINFORMER_FWD_BOUNDED_WIDE_MAX_NK 1024
#endif
// The sm_90a wgmma kernel at Dv = 64 runs the narrow one-warpgroup shape (BoundedShape::kNarrow,
// 64 rows, 4 blocks per SM) without rel-pos for Nk >= this bound unless BINFORMER_FWD_SM90_NARROW
// says otherwise (launch.h). Measured (device run 21, H200, same process, whole op, us, wide ->
// narrow): med3d (Nk 1680) 210.7 -> 188.4, 4096/64 615.1 -> 581.1, ViT-L (577) 192.4 -> 193.6,
// ViT-B (197) 153.8 -> 159.4; with rel-pos narrow was slower on ViT-B (188 -> 206), ViT-L
// (240 -> 257) and 4096 (789 -> 867), faster only on med3d (266 -> 254). (The prediction, NOTES
// v8, was the reverse: gains on the short ranges from overlapping 4 blocks' prologues.)
// Blocks per SM of the narrow shape (launch bounds: 4 -> 128 registers, 3 -> 168).
#ifndef BINFORMER_FWD_SM90_NARROW_BLOCKS
#define BINFORMER_FWD_SM90_NARROW_BLOCKS 4
#endif
// Blocks per SM of the narrow P-table kernel (3 -> 168 registers; at 4 ptxas serialized its wgmma).
#ifndef BINFORMER_FWD_PTABLE_BLOCKS
#define BINFORMER_FWD_PTABLE_BLOCKS 3
#endif
#ifndef BINFORMER_FWD_SM90_NARROW_MIN_NK
#define BINFORMER_FWD_SM90_NARROW_MIN_NK 1024
#endif

namespace binformer::cuda::fwd {

// How P.V is computed, i.e. the element type of V in shared memory.
enum class PvKind : int {
  kF16 = 0,     // V fp16, P rounded to fp16, mma.sync m16n8k16 with fp32 accumulation
  kBF16 = 1,    // V bf16, P rounded to bf16, same mma in bf16
  kTF32x3 = 2,  // V fp32: big/small tf32 split of P and V, three m16n8k8 mma (~fp32 accuracy)
  kU8S8 = 3,    // pv_int8: P quantized to u8, V int8, mma.sync m16n8k32 u8.s8 -> s32
};

// How the binary QK^T product is computed (a template parameter of the kernels).
//   kRuntime  the online kernels: m16n8k128 or m16n8k256 chosen at run time per n8 block.
//   kDup128   d <= 64: the d bits are duplicated into both halves of an m16n8k128 (lanes t and
//             t + 2 load the same word), so the mma returns 2 p(q & k); with the accumulator
//             input C = the bits of 1.5 * 2^24 - p(q_i) (2-unit steps in that binade), the float
//             value of D is 1.5 * 2^24 + <q_i, k_j> - d + 2 p(k_j) exactly: no integer
//             instruction per element (see kernel_bounded.h).
//   kK128     d <= 128: m16n8k128, one IMAD per element rebuilds the same float bits.
//   kK256     d <= 256: m16n8k256, one IMAD per element.
enum class QK : int { kRuntime = 0, kDup128 = 1, kK128 = 2, kK256 = 3 };

struct TileShape {
  int warps;    // warps per block
  int m_tiles;  // m16 row tiles per warp
  int block_n;  // keys per tile (multiple of 32)
  int stages;   // cp.async pipeline stages
};

BINFORMER_FWD_HD constexpr int min_c(int x, int y) { return x < y ? x : y; }

// has_bias: a dense or rel-pos bias keeps the prefilled bias tile in registers next to the
// accumulator, so those kernels use 32-key tiles to stay spill-free.
BINFORMER_FWD_HD constexpr TileShape fwd_tile_shape(PvKind pv, int dv_pad, bool has_bias) {
  const int st = BINFORMER_FWD_STAGES;
  TileShape shape{4, 2, 64, st};
  if (pv == PvKind::kTF32x3) {
    if (dv_pad > 64) shape = dv_pad <= 128 ? TileShape{8, 1, 64, st} : TileShape{4, 1, 32, st};
  } else if (dv_pad > 64) {
    shape = TileShape{8, 1, dv_pad <= 128 ? 64 : 32, st};
  }
  if (has_bias) shape.block_n = min_c(shape.block_n, 32);
  // Dv = 256 with a bias: 16-key tiles (u8 P.V needs whole k32 steps, and has half the V bytes).
  if (has_bias && dv_pad > 128 && pv != PvKind::kU8S8) shape.block_n = 16;
  return shape;
}

// The block shapes of the bounded kernels at Dv <= 64 (a FwdTraits parameter; Dv > 64 always
// runs 8 warps x 1 m-tile):
//   k4x2    4 warps x 2 m-tiles = 128 rows, 168 registers, 3 blocks (12 warps) per SM (v2);
//   kWide   8 warps x 1 m-tile = 128 rows (two warpgroups), 128 registers, 2 blocks per SM (v3);
//   kNarrow 4 warps x 1 m-tile = 64 rows (one warpgroup), 128 registers, 4 blocks per SM (v8):
//           the same 16 warps per SM as kWide, but short key ranges (a block visits 2-14 tiles)
//           overlap the Q-load / epilogue latency of 4 independent blocks instead of 2.
// (The values of k4x2 / kWide are those of the former bool `wide`.)
enum class BoundedShape : int { k4x2 = 0, kWide = 1, kNarrow = 2 };

// The bounded-max kernels (kernel_bounded.h: fp16/bf16 V, no dense bias, no per-token k scale)
// stream every k16 key step through scores -> exp -> P.V without a tile-wide maximum, so their
// registers do not grow with the key tile: 128-key tiles halve the per-tile overhead (barrier,
// copy issue, loop) at Dv <= 64. Dv > 64 keeps 64-key tiles (the V tile is 2*Dv bytes a key).
BINFORMER_FWD_HD constexpr TileShape fwd_bounded_tile_shape(int dv_pad, BoundedShape shape) {
  const int st = BINFORMER_FWD_BOUNDED_STAGES;
  if (dv_pad <= 64) {
    const int warps = shape == BoundedShape::kWide ? 8 : 4;
    return TileShape{warps, shape == BoundedShape::k4x2 ? 2 : 1, BINFORMER_FWD_BOUNDED_BLOCK_N, st};
  }
  return TileShape{8, 1, dv_pad <= 128 ? 64 : 32, st};
}

BINFORMER_FWD_HD constexpr int fwd_block_m(PvKind pv, int dv_pad, bool has_bias) {
  return fwd_tile_shape(pv, dv_pad, has_bias).warps * 16 *
         fwd_tile_shape(pv, dv_pad, has_bias).m_tiles;
}

// The value widths with their own (unmasked) kernels for fp16/bf16 V. Any other multiple of 8
// runs the next "generic" padded width with masked loads and stores.
BINFORMER_FWD_HD constexpr bool fwd_is_specialised_dv(int dv) {
  return dv == 32 || dv == 64 || dv == 72 || dv == 80 || dv == 96 || dv == 128 || dv == 256;
}
BINFORMER_FWD_HD constexpr int fwd_generic_dv_pad(int dv) {
  return dv <= 32 ? 32 : dv <= 64 ? 64 : dv <= 128 ? 128 : 256;
}

// The padded value width and masking the dispatcher picks. fp32 V and pv_int8 always use the
// padded generic widths (masked), fp16/bf16 V use the exact kernel when one exists.
struct FwdConfig {
  PvKind pv;
  int dv_pad;
  bool dv_masked;
};
BINFORMER_FWD_HD constexpr FwdConfig fwd_select_config(PvKind pv, int dv) {
  if ((pv == PvKind::kF16 || pv == PvKind::kBF16) && fwd_is_specialised_dv(dv)) {
    return FwdConfig{pv, dv, false};
  }
  return FwdConfig{pv, fwd_generic_dv_pad(dv), true};
}

// The rel-pos table entries a block of query rows [m0, m0 + block_m) can reach: for patch rows
// in grid rows y_lo .. y_hi and any key, index = (y_i - y_j + Wh - 1)(2Ww - 1) + x_i - x_j +
// Ww - 1 lies in table rows y_lo .. y_hi + Wh - 1, i.e. entries [first, first + len). len = 0
// when the block holds no patch row. (The bounded kernels copy this window plus the three cls
// entries to shared memory; the launcher sizes it with the largest window over all blocks.)
struct RelPosWindow {
  int first, len;
};
BINFORMER_FWD_HD constexpr RelPosWindow fwd_relpos_window(int m0, int block_m, int nq, int prefix,
                                                          int wh, int ww) {
  const int first_row = m0 > prefix ? m0 : prefix;
  const int last_row = min_c(m0 + block_m, nq) - 1;
  if (first_row > last_row) return RelPosWindow{0, 0};
  const int y_lo = (first_row - prefix) / ww, y_hi = (last_row - prefix) / ww;
  return RelPosWindow{y_lo * (2 * ww - 1), (y_hi - y_lo + wh) * (2 * ww - 1)};
}

// Key tiles are visited from the last one to the first (the tiles that need masking, at the end
// of the key range or on the causal diagonal, come first). pv_int8 rounds P against the running
// maximum, which therefore grows in this order, one key tile of fwd_tile_shape().block_n at a
// time.
inline constexpr bool kFwdKeyTilesBackward = true;

// The online softmax rescales the output accumulator only when the row maximum grew by more
// than this many powers of two (FlashAttention-4's conditional rescaling); in between, P values
// up to 2^threshold are fed to the P.V product, which is harmless for fp16/bf16/tf32 P.
// pv_int8 always uses 0 (P must stay <= 1 to fit in u8, and the contract fixes the quantization
// to the running maximum).
#ifndef BINFORMER_FWD_RESCALE_THRESHOLD
#define BINFORMER_FWD_RESCALE_THRESHOLD 8.0f
#endif

}  // namespace binformer::cuda::fwd
