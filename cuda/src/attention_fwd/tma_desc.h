// The host side of the TMA key tiles (kernel_bounded.h, Tr::kTma): V's tensor map.
//
// V is described as the 4-d tensor (dv, Nk, H, B) with V's own byte strides, so one column block
// of a key tile of any (b, h) (pv_wgmma.h WgmmaVLayout: 8 W channels, W = 8, 4, 2, 1 16-byte
// chunks) is one box {8 W channels, block_n keys, 1, 1} at coordinates {8 W j, key0, h, b}; keys
// past Nk are outside the tensor and the TMA fills them with zeros (the masked tile's rows). The
// box's swizzle over its 16 W-byte rows (128, 64, 32 bytes; none for 16) is the layout's.
// The map is encoded per call (a host function of the driver, ~1 us): V's pointer and strides are
// the call's.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "fwd_args.h"
#if !defined(BINFORMER_FWD_HOST_EMULATION)
#include <cuda.h>
#include <cuda_runtime.h>
#endif

namespace binformer::cuda::fwd {

// BINFORMER_FWD_TMA (read at every call: A/B in one process): unset or 1, the TMA key tiles at
// every wgmma width (Dv = 64..128); 0, the cp.async tiles everywhere. Measured on the H100 (device
// run 55, NOTES v20): DiT -14%, 4096/128 -12% against the cp.async tiles at Dv = 72..128.
inline bool fwd_tma_wanted() {
  const char* env = std::getenv("BINFORMER_FWD_TMA");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

// The geometry of 16-bit V for boxes of box_channels (8, 16, 32 or 64: one wgmma column block)
// x block_n keys; false where the TMA cannot address V (a base or a stride that is not a multiple
// of 16 bytes).
inline bool fwd_v_tma_tensor(const FwdArgs& a, int box_channels, int block_n, TmaTensor4d& t) {
  if (a.dv % box_channels != 0 || reinterpret_cast<uintptr_t>(a.v) % 16 != 0) return false;
  t.base = a.v;
  t.dims[0] = uint64_t(a.dv);
  t.dims[1] = uint64_t(a.Nk);
  t.dims[2] = uint64_t(a.H);
  t.dims[3] = uint64_t(a.B);
  const int64_t stride[3] = {a.v_stride[2], a.v_stride[1], a.v_stride[0]};
  uint64_t packed = t.dims[0] * 2;  // (a dimension of size 1 is never stepped: any legal stride will do)
  for (int i = 0; i < 3; ++i) {
    const uint64_t bytes = t.dims[i + 1] == 1 ? packed : uint64_t(stride[i]) * 2;
    if (stride[i] < 0 || bytes == 0 || bytes % 16 != 0 || bytes >= (uint64_t(1) << 40)) return false;
    t.strides[i] = bytes;
    packed = bytes * t.dims[i + 1];
  }
  t.box[0] = uint32_t(box_channels);
  t.box[1] = uint32_t(block_n);
  t.box[2] = 1;
  t.box[3] = 1;
  return true;
}

#if defined(BINFORMER_FWD_HOST_EMULATION)
// The emulated TMA (fwd_ptx_emulation.h) reads the geometry itself.
inline bool fwd_tma_encode(const TmaTensor4d& t, TmaDescriptor& desc) {
  std::memset(&desc, 0, sizeof(desc));
  std::memcpy(&desc, &t, sizeof(t));
  return true;
}
#else
// cuTensorMapEncodeTiled through the runtime's driver entry point (no link against libcuda); the
// swizzle spans a box row (128, 64, 32 bytes; none for 16).
inline bool fwd_tma_encode(const TmaTensor4d& t, TmaDescriptor& desc) {
  using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  static const EncodeTiled encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      return EncodeTiled(nullptr);
    }
    return reinterpret_cast<EncodeTiled>(fn);
  }();
  static_assert(sizeof(CUtensorMap) == sizeof(TmaDescriptor) && alignof(TmaDescriptor) >= alignof(CUtensorMap),
                "TmaDescriptor holds a CUtensorMap");
  if (encode == nullptr) return false;
  const CUtensorMapSwizzle swizzle = t.box[0] == 64   ? CU_TENSOR_MAP_SWIZZLE_128B
                                     : t.box[0] == 32 ? CU_TENSOR_MAP_SWIZZLE_64B
                                     : t.box[0] == 16 ? CU_TENSOR_MAP_SWIZZLE_32B
                                                      : CU_TENSOR_MAP_SWIZZLE_NONE;
  const cuuint64_t dims[4] = {t.dims[0], t.dims[1], t.dims[2], t.dims[3]};
  const cuuint64_t strides[3] = {t.strides[0], t.strides[1], t.strides[2]};
  const cuuint32_t box[4] = {t.box[0], t.box[1], t.box[2], t.box[3]};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  const CUresult r = encode(reinterpret_cast<CUtensorMap*>(&desc), CU_TENSOR_MAP_DATA_TYPE_UINT16, 4,
                            const_cast<void*>(t.base), dims, strides, box, element_strides,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS;
}
#endif

// a.v_tma for boxes of one column block x block_n keys; false: the cp.async tiles.
inline bool fwd_encode_v_tma(FwdArgs& a, int box_channels, int block_n) {
  TmaTensor4d t{};
  return fwd_v_tma_tensor(a, box_channels, block_n, t) && fwd_tma_encode(t, a.v_tma);
}

}  // namespace binformer::cuda::fwd
