// Programmatic dependent launch (PDL, sm_90+) of the attention kernel after the K pre-pass: the
// pre-pass lets the attention kernel's blocks start while its own last blocks still run, and
// each attention block sets up (block indices; in the bounded kernels the V copy setup and the
// rel-pos table window) and then waits for the pre-pass's results (the workspace) at
// griddep_wait, just before its first read of them.
// Without the launch attribute (launch.h) both instructions return at once; before sm_90 and in
// the host emulator, where nothing runs concurrently, they are no-ops.
// Not part of ptx.h: the K pre-pass (pack_keys.h) uses them too, and the emulator provides ptx.h.
#pragma once

namespace binformer::cuda::fwd {

#if defined(BINFORMER_FWD_HOST_EMULATION)
inline void griddep_wait() {}
inline void griddep_launch_dependents() {}
#else
__device__ __forceinline__ void griddep_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void griddep_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
#endif

}  // namespace binformer::cuda::fwd
