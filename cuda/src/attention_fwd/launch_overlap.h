// What lets the forward's memory traffic overlap across kernels and blocks (sm_90; no-ops before
// sm_90 and in the host emulator, where nothing runs concurrently):
// - programmatic dependent launch (PDL): the K pre-pass lets the attention kernel's blocks start
//   while its own last blocks still run; the attention kernel waits for the pre-pass's results
//   (the workspace) at griddep_wait, just before its first read of them. Without the launch
//   attribute (launch.h) both instructions return at once.
// - an L2 bulk prefetch of the Q rows and V of the block one wave later (kernel.h), so that a
//   block's first loads hit L2 instead of waiting for DRAM.
// Not part of ptx.h: the K pre-pass (pack_keys.h) uses them too, and the emulator provides ptx.h.
#pragma once
#include <cstdint>

namespace binformer::cuda::fwd {

#if defined(BINFORMER_FWD_HOST_EMULATION)
}  // namespace binformer::cuda::fwd
#include "host_emulation/fwd_ptx_emulation.h"
namespace binformer::cuda::fwd {
inline void griddep_wait() {}
inline void griddep_launch_dependents() {}
// (checks that the range lies inside the case's q / v: fwd_ptx_emulation.h)
inline void prefetch_l2_bulk(const void* p, uint32_t bytes) { fwd_emulation::check_prefetch(p, bytes); }
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
// bytes: a multiple of 16, p 16-byte aligned (a hint: nothing is written, no fault is raised
// for the caller to handle, so the callers keep the range inside the tensor).
__device__ __forceinline__ void prefetch_l2_bulk(const void* p, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(p), "r"(bytes) : "memory");
#else
  (void)p;
  (void)bytes;
#endif
}
#endif

}  // namespace binformer::cuda::fwd
