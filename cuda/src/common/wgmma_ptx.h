// The sm_90a warpgroup MMA (PTX ISA "wgmma") wrappers that the forward (attention_fwd/ptx.h) and
// the backward (attention_bwd/bwd_ptx.cuh) kernels share: fence / commit / wait, the register
// fences, and the f16 / bf16 register-A form D(64 x N, f32) += A(64 x 16) B(16 x N).
// Compiled only for sm_90a (BINFORMER_WGMMA_CODE); elsewhere the wrappers trap: the sm_90a kernels
// are launched only on sm_90 devices whose binary holds sm_90a code (sm90_support.h). The host
// emulators (attention_fwd/host_emulation, tests/cuda/emulation) provide functions of the same
// names instead of this header.
//
// Register fragments of wgmma.m64nNk16 for warp w (0..3) of the warpgroup (g = lane / 4,
// t = lane % 4):
//   A (.f16/.bf16, 4 x b32): a0 = (16w + g, k 2t..2t+1), a1 = (16w + g + 8, k 2t..), a2 = (16w + g,
//     k 2t+8..), a3 = (16w + g + 8, k 2t+8..): the m16n8k16 A layout of the warp's 16 rows;
//   D (.f32, N/2 floats): d[i][e] = (16w + g + 8 (e / 2), 8i + 2t + e % 2): the m16n8 C layout of
//     n8 block i, so an mma.sync accumulator is the wgmma accumulator unchanged.
// B comes from shared memory through a matrix descriptor (attention_fwd/pv_wgmma.h,
// attention_bwd/bwd_main.cuh).
#pragma once
#include <cstdint>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define BINFORMER_WGMMA_CODE 1
#endif

namespace binformer::cuda {

// Orders this thread's earlier register writes (A fragments, a rescaled accumulator) before the
// next wgmma reads them.
__device__ __forceinline__ void wgmma_fence() {
#if defined(BINFORMER_WGMMA_CODE)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if defined(BINFORMER_WGMMA_CODE)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}
// Waits until at most N committed groups of this warpgroup are still in flight.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if defined(BINFORMER_WGMMA_CODE)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#else
  __trap();
#endif
}
// Keeps the compiler from moving accesses of an accumulator register across a wgmma fence /
// wait (the asm statements above do not name the accumulators).
__device__ __forceinline__ void reg_fence(float& x) { asm volatile("" : "+f"(x)::"memory"); }
__device__ __forceinline__ void reg_fence_u32(uint32_t& x) { asm volatile("" : "+r"(x)::"memory"); }

// D(64 x N, f32) += A(64 x 16, registers) * B(16 x N, shared memory, MN-major: imm-trans-b = 1),
// N = 8 (the forward's P-table row sums), 64, 72, 80, 96, 128 (the forward's Dv, the backward's
// dO widths). Inline asm names every accumulator register, so each N has its operand lists:
// REGS the N / 2 accumulators %0.., then A's four registers, the descriptor and the scale-d
// predicate's operand number; the accumulators follow as n8 blocks (BINFORMER_WGMMA_D).
#define BINFORMER_WGMMA_D(i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])
#define BINFORMER_WGMMA_RS_ASM(SHAPE, TYPE, REGS, A_REGS, DESC, PRED, ...)                         \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " PRED ", 0;\n"                                   \
               "wgmma.mma_async.sync.aligned." SHAPE ".f32." TYPE "." TYPE " "                      \
               "{" REGS "}, {" A_REGS "}, " DESC ", p, 1, 1, 1;\n}\n"                              \
               : __VA_ARGS__                                                                      \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(1))
#define BINFORMER_WGMMA_RS(SHAPE, REGS, A_REGS, DESC, PRED, ...)                                  \
  if constexpr (kBF16) {                                                                          \
    BINFORMER_WGMMA_RS_ASM(SHAPE, "bf16", REGS, A_REGS, DESC, PRED, __VA_ARGS__);                \
  } else {                                                                                        \
    BINFORMER_WGMMA_RS_ASM(SHAPE, "f16", REGS, A_REGS, DESC, PRED, __VA_ARGS__);                 \
  }

template <int kN, bool kBF16>
__device__ __forceinline__ void wgmma_m64nNk16_rs(float (&d)[kN / 8][4], const uint32_t (&a)[4],
                                                  uint64_t desc_b) {
  static_assert(kN == 8 || kN == 64 || kN == 72 || kN == 80 || kN == 96 || kN == 128, "wgmma n");
#if defined(BINFORMER_WGMMA_CODE)
  if constexpr (kN == 8) {
    BINFORMER_WGMMA_RS("m64n8k16",
                       "%0, %1, %2, %3",
                       "%4, %5, %6, %7", "%8", "%9",
                       BINFORMER_WGMMA_D(0));
  }
  if constexpr (kN == 64) {
    BINFORMER_WGMMA_RS("m64n64k16",
                       "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                       "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, "
                       "%30, %31",
                       "%32, %33, %34, %35", "%36", "%37",
                       BINFORMER_WGMMA_D(0), BINFORMER_WGMMA_D(1), BINFORMER_WGMMA_D(2),
                       BINFORMER_WGMMA_D(3), BINFORMER_WGMMA_D(4), BINFORMER_WGMMA_D(5),
                       BINFORMER_WGMMA_D(6), BINFORMER_WGMMA_D(7));
  }
  if constexpr (kN == 72) {
    BINFORMER_WGMMA_RS("m64n72k16",
                       "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                       "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, "
                       "%30, %31, %32, %33, %34, %35",
                       "%36, %37, %38, %39", "%40", "%41",
                       BINFORMER_WGMMA_D(0), BINFORMER_WGMMA_D(1), BINFORMER_WGMMA_D(2),
                       BINFORMER_WGMMA_D(3), BINFORMER_WGMMA_D(4), BINFORMER_WGMMA_D(5),
                       BINFORMER_WGMMA_D(6), BINFORMER_WGMMA_D(7), BINFORMER_WGMMA_D(8));
  }
  if constexpr (kN == 80) {
    BINFORMER_WGMMA_RS("m64n80k16",
                       "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                       "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, "
                       "%30, %31, %32, %33, %34, %35, %36, %37, %38, %39",
                       "%40, %41, %42, %43", "%44", "%45",
                       BINFORMER_WGMMA_D(0), BINFORMER_WGMMA_D(1), BINFORMER_WGMMA_D(2),
                       BINFORMER_WGMMA_D(3), BINFORMER_WGMMA_D(4), BINFORMER_WGMMA_D(5),
                       BINFORMER_WGMMA_D(6), BINFORMER_WGMMA_D(7), BINFORMER_WGMMA_D(8),
                       BINFORMER_WGMMA_D(9));
  }
  if constexpr (kN == 96) {
    BINFORMER_WGMMA_RS("m64n96k16",
                       "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                       "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, "
                       "%30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, "
                       "%44, %45, %46, %47",
                       "%48, %49, %50, %51", "%52", "%53",
                       BINFORMER_WGMMA_D(0), BINFORMER_WGMMA_D(1), BINFORMER_WGMMA_D(2),
                       BINFORMER_WGMMA_D(3), BINFORMER_WGMMA_D(4), BINFORMER_WGMMA_D(5),
                       BINFORMER_WGMMA_D(6), BINFORMER_WGMMA_D(7), BINFORMER_WGMMA_D(8),
                       BINFORMER_WGMMA_D(9), BINFORMER_WGMMA_D(10), BINFORMER_WGMMA_D(11));
  }
  if constexpr (kN == 128) {
    BINFORMER_WGMMA_RS("m64n128k16",
                       "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                       "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, "
                       "%30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, "
                       "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, "
                       "%58, %59, %60, %61, %62, %63",
                       "%64, %65, %66, %67", "%68", "%69",
                       BINFORMER_WGMMA_D(0), BINFORMER_WGMMA_D(1), BINFORMER_WGMMA_D(2),
                       BINFORMER_WGMMA_D(3), BINFORMER_WGMMA_D(4), BINFORMER_WGMMA_D(5),
                       BINFORMER_WGMMA_D(6), BINFORMER_WGMMA_D(7), BINFORMER_WGMMA_D(8),
                       BINFORMER_WGMMA_D(9), BINFORMER_WGMMA_D(10), BINFORMER_WGMMA_D(11),
                       BINFORMER_WGMMA_D(12), BINFORMER_WGMMA_D(13), BINFORMER_WGMMA_D(14),
                       BINFORMER_WGMMA_D(15));
  }
#else
  __trap();
#endif
}
#undef BINFORMER_WGMMA_RS
#undef BINFORMER_WGMMA_RS_ASM
#undef BINFORMER_WGMMA_D

}  // namespace binformer::cuda
