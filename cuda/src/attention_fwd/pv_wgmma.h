// The sm_90a P.V unit of the bounded kernel (kernel_bounded.h with Tr::kWgmma): FlashAttention-3's
// register-A wgmma. Per 16-key step every warp of a warpgroup holds the A fragment of its 16 rows
// of P (the m16n8k16 A layout that the bounded kernel already builds from its score C fragments),
// and one m64nDvk16 wgmma (Dv = 64, 72, 80, 96, 128) multiplies the warpgroup's 64 x 16 P with
// the step's 16 x Dv V from shared memory. (The description below is the Dv = 64 case;
// WgmmaVLayout generalises it.) Compared with mma.sync (8 HMMA + 4 LDSM.x4 per warp and step at one m-tile) that
// is 1 wgmma + ~3 fence / commit / wait instructions per group, and the exponentials of the next
// steps run while the tensor cores work on the previous ones (asynchronous, ping-pong P registers:
// at most two groups in flight, wgmma.wait_group 1 after every commit).
//
// V in shared memory: the canonical MN-major layout with the 128-byte swizzle (PTX ISA, "Shared
// memory matrix layout", "Matrix descriptor"). B(k, n) = V[key0 + k][n] (16-bit, n contiguous);
// one key row is exactly 64 channels = 128 bytes = one swizzle row:
//   byte(key, n) = key * 128 + ((n / 8) ^ (key % 8)) * 16 + (n % 8) * 2,
// i.e. the 16-byte chunk c of key row r lands at chunk c ^ (r % 8) (the swizzle XORs address
// bits 4-6 with bits 7-9, so every tile starts at a multiple of 1024 bytes). In the canonical form
// ((T,8,m),(8,k)) : ((1,T,LBO),(8T,SBO)) (T = 8 elements of 16 bytes) the 8 key rows of a core
// group are 128 bytes apart and the next 8 keys SBO = 1024 bytes further; LBO (the stride between
// 64-channel column blocks) is unused at N = 64 and set to 1024 as well, so that the descriptor
// means the same layout whichever of the two offsets the hardware took for the K direction.
// The host emulator (host_emulation/fwd_ptx_emulation.h) decodes descriptors from the ISA's
// definition independently of this file.
#pragma once
#include <cstdint>

#include "ptx.h"

namespace binformer::cuda::fwd {

// V tile layout and descriptor for P.V with n = kDv (64, 72, 80, 96, 128) and kBlockN keys per
// tile. The canonical MN-major layouts (PTX ISA; T = one 16-byte chunk of 8 channels):
//   none:  ((T,1,m),(8,k)) : ((1,T,SBO),(1T,LBO))
//   32B:   ((T,2,m),(8,k)) : ((1,T,LBO),(2T,SBO))
//   64B:   ((T,4,m),(8,k)) : ((1,T,LBO),(4T,SBO))
//   128B:  ((T,8,m),(8,k)) : ((1,T,LBO),(8T,SBO))
// The atom is W = 8, 4, 2 or 1 chunks wide: the widest that divides Dv / 8 (CUTLASS's choice, so
// that m is a whole number of atoms: Dv 64 and 128 -> 128B, 96 -> 64B, 80 -> 32B, 72 -> none).
// The tile is m = Dv / (8 W) column blocks of kBlockN key rows of 16 W bytes each:
//   offset(key r, chunk c) = (c / W) * kBlockN * 16 W + r * 16 W + ((c % W) ^ swz(r)) * 16,
// where swz(r) = (r >> (3 - log2 W)) & (W - 1) is the swizzle (address bits 4.. XOR bits 7..,
// every column block starting at a multiple of 1024 bytes). The key direction advances 8 keys
// per 128 W bytes (SBO; LBO for "none"), the column blocks are kBlockN * 16 W bytes apart (LBO;
// SBO for "none"). Dv = 64 is one column block: its LBO is unused and set to 1024 (the value of
// the first, measured version).
template <int kDv, int kBlockN>
struct WgmmaVLayout {
  static constexpr int kChunks = kDv / 8;  // 16-byte chunks per key row
  static constexpr int kW = kChunks % 8 == 0 ? 8 : kChunks % 4 == 0 ? 4 : kChunks % 2 == 0 ? 2 : 1;
  static constexpr int kLogW = kW == 8 ? 3 : kW == 4 ? 2 : kW == 2 ? 1 : 0;
  static constexpr int kColumnBlocks = kChunks / kW;
  static constexpr uint32_t kRowBytes = 16u * kW;                       // one key row of an atom
  static constexpr uint32_t kColumnBlockBytes = uint32_t(kBlockN) * kRowBytes;
  static constexpr uint32_t kTileBytes = kColumnBlockBytes * kColumnBlocks;
  static constexpr uint32_t kKeyGroupBytes = 8 * kRowBytes;             // 8 keys
  static constexpr uint32_t kStepBytes = 2 * kKeyGroupBytes;            // one k16 step
  // descriptor bits 62-63: 1 = 128B, 2 = 64B, 3 = 32B, 0 = none (interleaved)
  static constexpr uint64_t kSwizzleMode = kW == 8 ? 1 : kW == 4 ? 2 : kW == 2 ? 3 : 0;
  static constexpr uint32_t kColumnStride = kColumnBlocks == 1 ? 1024u : kColumnBlockBytes;
  static constexpr uint32_t kLbo = kW == 1 ? kKeyGroupBytes : kColumnStride;
  static constexpr uint32_t kSbo = kW == 1 ? kColumnStride : kKeyGroupBytes;
  static_assert(kDv % 8 == 0 && kDv >= 64 && kDv <= 128, "wgmma n = Dv in 64..128");
  static_assert(kColumnBlockBytes % 1024 == 0, "every column block starts on a swizzle repeat");
  static_assert((kLbo >> 4) < (1u << 14) && (kSbo >> 4) < (1u << 14), "descriptor offsets");

  // Byte offset of 16-byte chunk c (channels 8c..8c+7) of key row r inside a V tile.
  __host__ __device__ static constexpr uint32_t chunk_offset(int r, int c) {
    const uint32_t swz = (uint32_t(r) >> (3 - kLogW)) & uint32_t(kW - 1);
    return uint32_t(c / kW) * kColumnBlockBytes + uint32_t(r) * kRowBytes +
           ((uint32_t(c % kW) ^ swz) << 4);
  }

  // Matrix descriptor of the 16 x Dv B operand whose first key row starts at smem_addr (a multiple
  // of 1024): start address >> 4 in bits 0-13, LBO >> 4 in 16-29, SBO >> 4 in 32-45, base offset
  // 0 (bits 49-51: the tile is aligned to the swizzle repeat), swizzle mode in 62-63.
  __host__ __device__ static constexpr uint64_t desc(uint32_t smem_addr) {
    return uint64_t((smem_addr >> 4) & 0x3FFFu) | (uint64_t((kLbo >> 4) & 0x3FFFu) << 16) |
           (uint64_t((kSbo >> 4) & 0x3FFFu) << 32) | (kSwizzleMode << 62);
  }
  // Added to a descriptor per k16 step (the start address field, in 16-byte units; no carry
  // out of the 14-bit field below 256 KB).
  static constexpr uint64_t kStepDesc = kStepBytes >> 4;
};

// The first (Dv = 64, 128-key tiles) layout, measured on the H100 (device runs 13-14).
using WgmmaV = WgmmaVLayout<64, 128>;
static_assert(WgmmaV::chunk_offset(13, 5) == 13 * 128 + ((5 ^ 5) << 4), "Dv 64: chunk c ^ (r % 8)");
static_assert(WgmmaV::desc(0) == ((uint64_t(64) << 16) | (uint64_t(64) << 32) | (uint64_t(1) << 62)),
              "Dv 64: the measured descriptor (LBO = SBO = 1024, 128B swizzle)");
static_assert(WgmmaV::kStepDesc == 128, "Dv 64: +2048 bytes per k16 step");

}  // namespace binformer::cuda::fwd
