// Thin wrappers over the PTX instructions of the forward kernel (sm_80+).
//
// Fragment layouts (PTX ISA "Matrix fragments for mma.m16n8k*"; g = lane / 4, t = lane % 4):
//   C/D of every m16n8 mma:  c0 = (g, 2t), c1 = (g, 2t+1), c2 = (g+8, 2t), c3 = (g+8, 2t+1)
//   b1 m16n8k128  A: a0 = row g bits [32t, 32t+32), a1 = row g+8 same bits; B: b0 = col g bits [32t..)
//   b1 m16n8k256  A: a0/a1 as k128, a2/a3 = rows g/g+8 bits [128+32t..); B: b0, b1 = col g, +128
//   f16 m16n8k16  A: a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//                 B: b0 = (k 2t..2t+1, n g), b1 = (k 2t+8..2t+9, n g)
//   u8/s8 m16n8k32 A: a0 = (g, 4t..4t+3), a1 = (g+8, 4t..), a2 = (g, 16+4t..), a3 = (g+8, 16+4t..)
//                 B: b0 = (k 4t..4t+3, n g), b1 = (k 16+4t.., n g)
//   tf32 m16n8k8  A: a0 = (g, t), a1 = (g+8, t), a2 = (g, t+4), a3 = (g+8, t+4)
//                 B: b0 = (k t, n g), b1 = (k t+4, n g)
#pragma once
#if defined(BINFORMER_FWD_HOST_EMULATION)
// The host emulator (cuda/src/attention_fwd/host_emulation) provides every function of this
// header, implemented from the PTX ISA fragment layouts.
#include "host_emulation/fwd_ptx_emulation.h"
#include "exp2_poly.h"
#else
#include "exp2_poly.h"
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace binformer::cuda::fwd {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ------------------------------------------------------------------ binary tensor-core products
// D = popcount(A AND B) (C = 0). AND, never XOR: XOR.popc runs 6.6x slower on Hopper (SPEC.md 3).
__device__ __forceinline__ void mma_and_popc_k128(int (&d)[4], uint32_t a0, uint32_t a1,
                                                  uint32_t b0) {
  asm("mma.sync.aligned.m16n8k128.row.col.s32.b1.b1.s32.and.popc "
      "{%0,%1,%2,%3}, {%4,%5}, {%6}, {%7,%7,%7,%7};\n"
      : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
      : "r"(a0), "r"(a1), "r"(b0), "r"(0));
}

// D = popcount(A AND B) + C with C = {c_lo, c_lo, c_hi, c_hi}: one value for row g and one for
// row g + 8 (the bounded kernels add the bits of a float magic number there, see kernel_bounded.h;
// with c_lo == c_hi the compiler keeps one constant register quad, distinct values cost register
// copies around every mma).
__device__ __forceinline__ void mma_and_popc_k128_c(int (&d)[4], uint32_t a0, uint32_t a1,
                                                    uint32_t b0, int c_lo, int c_hi) {
  asm("mma.sync.aligned.m16n8k128.row.col.s32.b1.b1.s32.and.popc "
      "{%0,%1,%2,%3}, {%4,%5}, {%6}, {%7,%7,%8,%8};\n"
      : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
      : "r"(a0), "r"(a1), "r"(b0), "r"(c_lo), "r"(c_hi));
}

__device__ __forceinline__ void mma_and_popc_k256(int (&d)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%10,%10,%10};\n"
      : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(0));
}

// ------------------------------------------------------------------ P.V tensor-core products
__device__ __forceinline__ void mma_f16_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                              uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], const uint32_t (&a)[4],
                                               uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void mma_tf32_1688(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                              uint32_t b1) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void mma_u8s8_16832(int (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
  asm("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ------------------------------------------------------------------ sm_90a: wgmma (P.V)
// Warpgroup-level asynchronous MMA (PTX ISA "wgmma"), compiled only for sm_90a; elsewhere the
// wrappers trap (the sm_90a kernels are launched only on sm_90 devices whose binary holds sm_90a
// code, launch.h). Register fragments of wgmma.m64nNk16 for warp w (0..3) of the warpgroup:
//   A (.f16/.bf16, 4 x b32): a0 = (16w + g, k 2t..2t+1), a1 = (16w + g + 8, k 2t..), a2 = (16w + g,
//     k 2t+8..), a3 = (16w + g + 8, k 2t+8..): the m16n8k16 A layout of the warp's 16 rows;
//   D (.f32, N/2 floats): d[4i + e] = (16w + g + 8 (e / 2), 8i + 2t + e % 2): the m16n8 C layout of
//     n8 block i, so the mma.sync accumulator o[nd][e] is the wgmma accumulator unchanged.
// B comes from shared memory through a matrix descriptor (pv_wgmma.h).
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define BINFORMER_FWD_WGMMA_CODE 1
#endif

// Orders this thread's earlier register writes (the P fragments) before the next wgmma reads.
__device__ __forceinline__ void wgmma_fence() {
#if defined(BINFORMER_FWD_WGMMA_CODE)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if defined(BINFORMER_FWD_WGMMA_CODE)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}
// Waits until at most N committed groups of this warpgroup are still in flight.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if defined(BINFORMER_FWD_WGMMA_CODE)
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
// N = 8 (the P table's row sums), 64, 72, 80, 96, 128 (the f16/bf16 shapes with N a multiple of
// 8 that the bounded kernel uses for Dv). The operand lists below are written out per N (N / 2 accumulator registers).
template <int kN, bool kBF16>
__device__ __forceinline__ void wgmma_m64nNk16_rs(float (&d)[kN / 8][4], const uint32_t (&a)[4],
                                                  uint64_t desc_b) {
  static_assert(kN == 8 || kN == 64 || kN == 72 || kN == 80 || kN == 96 || kN == 128, "wgmma n");
#if defined(BINFORMER_FWD_WGMMA_CODE)
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

// D(64 x N, s32) = A(64 x 256 bits, registers) AND.popc B(256 bits x N, shared memory, K-major):
// the binary QK^T of a warpgroup's 64 query rows against N keys (BGMMA). The A fragment of warp w
// is the m16n8k256 b1 layout of its 16 rows: a0 = (16w + g, k 32t..32t+31), a1 = (16w + g + 8,
// k 32t..), a2 / a3 the same rows at k 128 + 32t; D is the m16n8 C layout per n8 block, as for
// the f16 shapes above. scale-d = 0: D is overwritten (no accumulator input), so the registers
// need no reset between tiles. N = 16, 32 or 64.
template <int kN>
__device__ __forceinline__ void wgmma_b1_m64nNk256_rs(int (&d)[kN / 8][4], const uint32_t (&a)[4],
                                                      uint64_t desc_b) {
  static_assert(kN == 16 || kN == 32 || kN == 64, "wgmma b1 n");
#if defined(BINFORMER_FWD_WGMMA_CODE)
  if constexpr (kN == 16) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n16k256.s32.b1.b1.and.popc {"
        "%0, %1, %2, %3, %4, %5, %6, %7}, "
        "{%8, %9, %10, %11}, %12, p;\n}\n"
        : "=r"(d[0][0]), "=r"(d[0][1]), "=r"(d[0][2]), "=r"(d[0][3]),
          "=r"(d[1][0]), "=r"(d[1][1]), "=r"(d[1][2]), "=r"(d[1][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(0));
  }
  if constexpr (kN == 32) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k256.s32.b1.b1.and.popc {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "
        "{%16, %17, %18, %19}, %20, p;\n}\n"
        : "=r"(d[0][0]), "=r"(d[0][1]), "=r"(d[0][2]), "=r"(d[0][3]),
          "=r"(d[1][0]), "=r"(d[1][1]), "=r"(d[1][2]), "=r"(d[1][3]),
          "=r"(d[2][0]), "=r"(d[2][1]), "=r"(d[2][2]), "=r"(d[2][3]),
          "=r"(d[3][0]), "=r"(d[3][1]), "=r"(d[3][2]), "=r"(d[3][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(0));
  }
  if constexpr (kN == 64) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k256.s32.b1.b1.and.popc {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "{%32, %33, %34, %35}, %36, p;\n}\n"
        : "=r"(d[0][0]), "=r"(d[0][1]), "=r"(d[0][2]), "=r"(d[0][3]),
          "=r"(d[1][0]), "=r"(d[1][1]), "=r"(d[1][2]), "=r"(d[1][3]),
          "=r"(d[2][0]), "=r"(d[2][1]), "=r"(d[2][2]), "=r"(d[2][3]),
          "=r"(d[3][0]), "=r"(d[3][1]), "=r"(d[3][2]), "=r"(d[3][3]),
          "=r"(d[4][0]), "=r"(d[4][1]), "=r"(d[4][2]), "=r"(d[4][3]),
          "=r"(d[5][0]), "=r"(d[5][1]), "=r"(d[5][2]), "=r"(d[5][3]),
          "=r"(d[6][0]), "=r"(d[6][1]), "=r"(d[6][2]), "=r"(d[6][3]),
          "=r"(d[7][0]), "=r"(d[7][1]), "=r"(d[7][2]), "=r"(d[7][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(0));
  }
#else
  __trap();
#endif
}
__device__ __forceinline__ void reg_fence_s32(int& x) { asm volatile("" : "+r"(x)::"memory"); }

// ------------------------------------------------------------------ shared memory
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(addr));
}

__device__ __forceinline__ float lds_f32(uint32_t addr) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(addr));
  return v;
}

// A load from shared memory that never changes after the block's first barrier (the P table):
// not volatile and without a memory clobber, so that the compiler may schedule it freely across
// the wgmma fences (asm volatile statements keep their order among themselves).
__device__ __forceinline__ uint32_t lds_u32_invariant(uint32_t addr) {
  uint32_t v;
  asm("ld.shared.b32 %0, [%1];\n" : "=r"(v) : "r"(addr));
  return v;
}

__device__ __forceinline__ void st_shared_u32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}

__device__ __forceinline__ uint4 ld_shared_v4(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr)
               : "memory");
  return v;
}

// 16-byte global -> shared copy that bypasses L1; bytes past src_bytes (0..16) are zero-filled.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}
// 4-byte global -> shared copy through L1 (for rel-pos table windows of any alignment).
__device__ __forceinline__ void cp_async_4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ------------------------------------------------------------------ TMA (sm_90a)
// The bounded wgmma kernels' key tiles (kernel_bounded.h, Tr::kTma): one thread issues a tile's
// copies on the tensor memory accelerator (V through the tensor map of FwdArgs::v_tma, the K bits,
// column constants and rel-pos offsets as plain bulk copies), and an mbarrier per stage counts the
// bytes landing (transaction count); every thread waits on the stage's phase.
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t arrivals) {
#if defined(BINFORMER_FWD_WGMMA_CODE)
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals) : "memory");
#else
  __trap();
#endif
}
// Makes the initialised barriers visible to the asynchronous proxy (the TMA unit).
__device__ __forceinline__ void mbar_init_fence() {
#if defined(BINFORMER_FWD_WGMMA_CODE)
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#else
  __trap();
#endif
}
// Orders this thread's earlier shared-memory accesses (generic proxy) before its next TMA writes.
__device__ __forceinline__ void fence_proxy_async_smem() {
#if defined(BINFORMER_FWD_WGMMA_CODE)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#else
  __trap();
#endif
}
// The producer's arrival, announcing the bytes the stage's copies will bring.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
#if defined(BINFORMER_FWD_WGMMA_CODE)
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
#else
  __trap();
#endif
}
// Returns once the barrier's phase `parity` (0 or 1) has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
#if defined(BINFORMER_FWD_WGMMA_CODE)
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "wait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
#else
  __trap();
#endif
}
// bytes (a multiple of 16) from 16-byte aligned global memory to shared memory.
__device__ __forceinline__ void tma_bulk_load(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
#if defined(BINFORMER_FWD_WGMMA_CODE)
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
               "l"(src), "r"(bytes), "r"(bar)
               : "memory");
#else
  __trap();
#endif
}
// The box of the 4-d tensor map at element coordinates (c0 innermost, .. c3).
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const void* tmap, int c0, int c1, int c2, int c3,
                                            uint32_t bar) {
#if defined(BINFORMER_FWD_WGMMA_CODE)
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(dst),
      "l"(tmap), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
#else
  __trap();
#endif
}

// ------------------------------------------------------------------ arithmetic
// 2^x on the special-function unit (MUFU.EX2, ~2^-22 relative error, subnormal results -> 0).
__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint32_t cvt_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t selector) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(selector));
  return d;
}

// Two floats -> packed 16-bit pair (x in the low half), round to nearest even.
template <bool kBF16>
__device__ __forceinline__ uint32_t pack_pair(float x, float y) {
  if constexpr (kBF16) {
    __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
    return *reinterpret_cast<uint32_t*>(&h);
  } else {
    __half2 h = __floats2half2_rn(x, y);
    return *reinterpret_cast<uint32_t*>(&h);
  }
}

}  // namespace binformer::cuda::fwd
#endif  // BINFORMER_FWD_HOST_EMULATION
