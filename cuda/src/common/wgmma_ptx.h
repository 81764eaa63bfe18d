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
// dO widths). The operand lists below are written out per N (N / 2 accumulator registers).
template <int kN, bool kBF16>
__device__ __forceinline__ void wgmma_m64nNk16_rs(float (&d)[kN / 8][4], const uint32_t (&a)[4],
                                                  uint64_t desc_b) {
  static_assert(kN == 8 || kN == 64 || kN == 72 || kN == 80 || kN == 96 || kN == 128, "wgmma n");
#if defined(BINFORMER_WGMMA_CODE)
  if constexpr (kN == 8) {  // (the P table's row sums: P times a ones matrix, kernel_bounded.h)
#define BINFORMER_WGMMA_ASM(TYPE)                                                             \
  asm volatile(                                                                               \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %9, 0;\n"                                             \
      "wgmma.mma_async.sync.aligned.m64n8k16.f32." TYPE "." TYPE " "                         \
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, %8, p, 1, 1, 1;\n}\n"                              \
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3])                             \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(1))
    if constexpr (kBF16) {
      BINFORMER_WGMMA_ASM("bf16");
    } else {
      BINFORMER_WGMMA_ASM("f16");
    }
#undef BINFORMER_WGMMA_ASM
  }
  if constexpr (kN == 64) {
#define BINFORMER_WGMMA_ASM(TYPE)                                                             \
  asm volatile(                                                                               \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                            \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " "                        \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, "  \
      "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "  \
      "{%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                      \
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]),  \
        "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]),  \
        "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]),  \
        "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),  \
        "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]),  \
        "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]),  \
        "+f"(d[7][2]), "+f"(d[7][3])  \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(1))
    if constexpr (kBF16) {
      BINFORMER_WGMMA_ASM("bf16");
    } else {
      BINFORMER_WGMMA_ASM("f16");
    }
#undef BINFORMER_WGMMA_ASM
  }
  if constexpr (kN == 72) {
#define BINFORMER_WGMMA_ASM(TYPE)                                                             \
  asm volatile(                                                                               \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %41, 0;\n"                                            \
      "wgmma.mma_async.sync.aligned.m64n72k16.f32." TYPE "." TYPE " "                        \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, "  \
      "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, "  \
      "%34, %35}, "  \
      "{%36, %37, %38, %39}, %40, p, 1, 1, 1;\n}\n"                      \
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]),  \
        "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]),  \
        "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]),  \
        "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),  \
        "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]),  \
        "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]),  \
        "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]),  \
        "+f"(d[8][3])  \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(1))
    if constexpr (kBF16) {
      BINFORMER_WGMMA_ASM("bf16");
    } else {
      BINFORMER_WGMMA_ASM("f16");
    }
#undef BINFORMER_WGMMA_ASM
  }
  if constexpr (kN == 80) {
#define BINFORMER_WGMMA_ASM(TYPE)                                                             \
  asm volatile(                                                                               \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %45, 0;\n"                                            \
      "wgmma.mma_async.sync.aligned.m64n80k16.f32." TYPE "." TYPE " "                        \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, "  \
      "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, "  \
      "%34, %35, %36, %37, %38, %39}, "  \
      "{%40, %41, %42, %43}, %44, p, 1, 1, 1;\n}\n"                      \
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]),  \
        "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]),  \
        "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]),  \
        "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),  \
        "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]),  \
        "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]),  \
        "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]),  \
        "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3])  \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(1))
    if constexpr (kBF16) {
      BINFORMER_WGMMA_ASM("bf16");
    } else {
      BINFORMER_WGMMA_ASM("f16");
    }
#undef BINFORMER_WGMMA_ASM
  }
  if constexpr (kN == 96) {
#define BINFORMER_WGMMA_ASM(TYPE)                                                             \
  asm volatile(                                                                               \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %53, 0;\n"                                            \
      "wgmma.mma_async.sync.aligned.m64n96k16.f32." TYPE "." TYPE " "                        \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, "  \
      "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, "  \
      "%34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47}, "  \
      "{%48, %49, %50, %51}, %52, p, 1, 1, 1;\n}\n"                      \
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]),  \
        "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]),  \
        "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]),  \
        "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),  \
        "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]),  \
        "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]),  \
        "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]),  \
        "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),  \
        "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]),  \
        "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3])  \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(1))
    if constexpr (kBF16) {
      BINFORMER_WGMMA_ASM("bf16");
    } else {
      BINFORMER_WGMMA_ASM("f16");
    }
#undef BINFORMER_WGMMA_ASM
  }
  if constexpr (kN == 128) {
#define BINFORMER_WGMMA_ASM(TYPE)                                                             \
  asm volatile(                                                                               \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                            \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " "                        \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, "  \
      "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, "  \
      "%34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, "  \
      "%50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "  \
      "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                      \
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]),  \
        "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]),  \
        "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]),  \
        "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),  \
        "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]),  \
        "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]),  \
        "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]),  \
        "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),  \
        "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]),  \
        "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]),  \
        "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]),  \
        "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]),  \
        "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])  \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(1))
    if constexpr (kBF16) {
      BINFORMER_WGMMA_ASM("bf16");
    } else {
      BINFORMER_WGMMA_ASM("f16");
    }
#undef BINFORMER_WGMMA_ASM
  }
#else
  __trap();
#endif
}

}  // namespace binformer::cuda
