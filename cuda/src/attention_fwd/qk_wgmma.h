// The sm_90a QK^T unit of the bounded kernel (kernel_bounded.h with Tr::kQkWgmma): the binary
// scores of a warpgroup's 64 query rows against half a key tile in one asynchronous
// wgmma.m64nNk256 b1 AND.popc (BGMMA), so that no synchronous b1 mma.sync competes with the P.V
// wgmma for the tensor pipe (the profile of cuda/NOTES_attention_fwd.md, v11).
//
// B = the tile's K bits as the stage already holds them for d <= 128: 16 bytes (128 bits) per key
// at a 16-byte pitch. That is the canonical K-major layout without swizzle (PTX ISA, "Shared
// memory matrix layout", T = 128 one-bit elements per 16 bytes): core matrices of 8 keys x 16
// bytes, 128 contiguous bytes, the next 8 keys SBO = 128 bytes further. k256 has a second core
// matrix along K (bits 128..255, LBO away): the kernel's A fragment is zero there, so LBO = 0
// re-reads the first one (an address always inside the tile) and adds nothing.
#pragma once
#include <cstdint>

#include "ptx.h"

namespace binformer::cuda::fwd {

struct WgmmaKBits {
  static constexpr uint32_t kRowBytes = 16;  // one key
  static constexpr uint32_t kSbo = 8 * kRowBytes;
  static constexpr uint32_t kLbo = 0;
  // Descriptor of the keys starting at smem_addr (16-byte aligned): start >> 4 in bits 0-13, LBO
  // >> 4 in 16-29, SBO >> 4 in 32-45, base offset 0, swizzle mode 0 (none).
  __host__ __device__ static constexpr uint64_t desc(uint32_t smem_addr) {
    return uint64_t((smem_addr >> 4) & 0x3FFFu) | (uint64_t(kLbo >> 4) << 16) | (uint64_t(kSbo >> 4) << 32);
  }
  // Added to a descriptor to start `keys` keys further.
  __host__ __device__ static constexpr uint64_t key_step(int keys) { return uint64_t(keys) * kRowBytes >> 4; }
};
static_assert(WgmmaKBits::desc(0x400) == (0x40u | (uint64_t(8) << 32)), "start 0x400, SBO 128 bytes");

}  // namespace binformer::cuda::fwd
