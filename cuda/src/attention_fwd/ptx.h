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

#include "../common/wgmma_ptx.h"

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

// ------------------------------------------------------------------ sm_90a: wgmma
// The fences, commit / wait and the f16 / bf16 P.V form come from common/wgmma_ptx.h (shared with
// the backward); the b1 QK^T form and the TMA / mbarrier wrappers below are the forward's own, with
// the same fragment layouts and the same guard (BINFORMER_WGMMA_CODE: sm_90a code only).

// D(64 x N, s32) = A(64 x 256 bits, registers) AND.popc B(256 bits x N, shared memory, K-major):
// the binary QK^T of a warpgroup's 64 query rows against N keys (BGMMA). The A fragment of warp w
// is the m16n8k256 b1 layout of its 16 rows: a0 = (16w + g, k 32t..32t+31), a1 = (16w + g + 8,
// k 32t..), a2 / a3 the same rows at k 128 + 32t; D is the m16n8 C layout per n8 block, as for
// the f16 shapes (common/wgmma_ptx.h). scale-d = 0: D is overwritten (no accumulator input), so
// the registers need no reset between tiles. N = 16, 32 or 64.
template <int kN>
__device__ __forceinline__ void wgmma_b1_m64nNk256_rs(int (&d)[kN / 8][4], const uint32_t (&a)[4],
                                                      uint64_t desc_b) {
  static_assert(kN == 16 || kN == 32 || kN == 64, "wgmma b1 n");
#if defined(BINFORMER_WGMMA_CODE)
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
#if defined(BINFORMER_WGMMA_CODE)
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals) : "memory");
#else
  __trap();
#endif
}
// Makes the initialised barriers visible to the asynchronous proxy (the TMA unit).
__device__ __forceinline__ void mbar_init_fence() {
#if defined(BINFORMER_WGMMA_CODE)
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#else
  __trap();
#endif
}
// Orders this thread's earlier shared-memory accesses (generic proxy) before its next TMA writes.
__device__ __forceinline__ void fence_proxy_async_smem() {
#if defined(BINFORMER_WGMMA_CODE)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#else
  __trap();
#endif
}
// The producer's arrival, announcing the bytes the stage's copies will bring.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
#if defined(BINFORMER_WGMMA_CODE)
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
#else
  __trap();
#endif
}
// Returns once the barrier's phase `parity` (0 or 1) has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
#if defined(BINFORMER_WGMMA_CODE)
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
#if defined(BINFORMER_WGMMA_CODE)
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
#if defined(BINFORMER_WGMMA_CODE)
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
