#pragma once
// Host-side checks the forward and backward launchers make before taking an sm_90a (wgmma) path.
#include <cuda_runtime.h>

namespace binformer::cuda {

// Compute capability of the current device as 10 * major + minor (0 when it cannot be read).
inline int device_compute_capability() {
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
    return 0;
  }
  return 10 * major + minor;
}

// Compute capability 9.0 (H100 / H200) on the current device.
inline bool device_is_sm90() { return device_compute_capability() == 90; }

// Whether the loaded binary of `kernel` is sm_90a code (a build without 90a in
// BINFORMER_CUDA_ARCHS would run PTX or sm_80 code, where the wgmma kernels' bodies are empty).
template <class Kernel>
bool kernel_has_sm90a_code(Kernel kernel) {
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) return false;
  return attr.binaryVersion == 90;
}

}  // namespace binformer::cuda
