// The sm_90a P.V unit of the bounded kernel (kernel_bounded.h with Tr::kWgmma): FlashAttention-3's
// register-A wgmma. Per 16-key step every warp of a warpgroup holds the A fragment of its 16 rows
// of P (the m16n8k16 A layout that the bounded kernel already builds from its score C fragments),
// and one m64n64k16 wgmma multiplies the warpgroup's 64 x 16 P with the step's 16 x 64 V from
// shared memory. Compared with mma.sync (8 HMMA + 4 LDSM.x4 per warp and step at one m-tile) that
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

struct WgmmaV {
  static constexpr int kRowBytes = 128;       // one key row of V (64 x 16-bit)
  static constexpr int kStepBytes = 16 * kRowBytes;  // one k16 step: 2 swizzle atoms of 1024 B
  static constexpr uint32_t kSbo = 1024, kLbo = 1024;
  static constexpr uint64_t kSwizzle128B = 1;  // descriptor bits 62-63

  // Byte offset of 16-byte chunk c (channels 8c..8c+7) of key row r inside a V tile.
  __host__ __device__ static constexpr uint32_t chunk_offset(int r, int c) {
    return uint32_t(r) * kRowBytes + (uint32_t(c ^ (r & 7)) << 4);
  }

  // Matrix descriptor of the 16 x 64 B operand whose first key row starts at smem_addr (a multiple
  // of 1024): start address >> 4 in bits 0-13, LBO >> 4 in 16-29, SBO >> 4 in 32-45, base offset
  // 0 (bits 49-51: the tile is aligned to the swizzle repeat), swizzle mode in 62-63.
  __host__ __device__ static constexpr uint64_t desc(uint32_t smem_addr) {
    return uint64_t((smem_addr >> 4) & 0x3FFFu) | (uint64_t((kLbo >> 4) & 0x3FFFu) << 16) |
           (uint64_t((kSbo >> 4) & 0x3FFFu) << 32) | (kSwizzle128B << 62);
  }
  // Added to a descriptor per k16 step (the start address field, in 16-byte units; no carry
  // out of the 14-bit field below 256 KB).
  static constexpr uint64_t kStepDesc = kStepBytes >> 4;
};

}  // namespace binformer::cuda::fwd
