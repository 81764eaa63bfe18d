// Host emulation of ptx.h (compiled with -DBINFORMER_FWD_HOST_EMULATION): the forward kernels'
// source runs on the CPU, one std::thread per CUDA thread, on the CTA machinery of
// tests/cuda/emulation/bwd_emulation.h (barriers, shuffles, 16-bit float types). The warp-level
// instructions are implemented here from the PTX ISA fragment layouts (written independently of
// the kernel), so a wrong lane / register / address mapping in the kernel shows up as a wrong
// result against the float64 reference. Shared-memory "addresses" (smem_u32) are byte offsets
// from the CTA's dynamic shared memory. Not part of any build: see emulate_attention_fwd.cpp.
#pragma once
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <mutex>
#include <thread>
#include <deque>
#include <vector>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "bwd_emulation.h"
#include "fwd_args.h"

// ---------------------------------------------------------------- CUDA types and intrinsics
#define __shared__ static  // block-scope shared arrays: one per kernel (CTAs run one at a time)
#define __grid_constant__
// The vector types and bit-cast intrinsics the forward kernels use, declared in the kernels'
// namespace (unqualified lookup there finds these first), so that they never collide with the
// ones the shared bwd_emulation.h may declare at global scope.
namespace binformer::cuda::fwd {
struct int2 { int x, y; };
struct uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline int2 make_int2(int x, int y) { return {x, y}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline int __float_as_int(float f) { int u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __log2f(float x) { return std::log2(x); }
inline int __float2int_rn(float x) { return int(std::nearbyint(x)); }
inline float __int2float_rn(int x) { return float(x); }
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
}  // namespace binformer::cuda::fwd

namespace fwd_emulation {
using namespace bwd_emulation;
// Per-thread 32-bit vote slots (the bwd machinery's slots are reused by its collectives).
inline bool vote(bool v, bool all) {
  slot(tid())[7] = v ? 1u : 0u;
  warp_sync();
  bool r = all;
  for (unsigned l = 0; l < 32; ++l) {
    const bool x = slot(warp_base() + l)[7] != 0;
    r = all ? (r && x) : (r || x);
  }
  warp_sync();
  return r;
}
inline unsigned char* smem_base() { return bwd_emulation::dynamic_smem(); }
// Thread-tiles processed with the fixed / online maximum (for the driver's coverage line).
inline std::atomic<long long> tiles_fixed{0}, tiles_online{0}, tiles_table{0};
inline void count_tile(bool fixed, bool table = false) {
  (fixed ? tiles_fixed : tiles_online)++;
  if (fixed && table) tiles_table++;
}
}  // namespace fwd_emulation

inline bool __any_sync(unsigned mask, bool v) {
  if (mask != 0xffffffffu) std::abort();
  return fwd_emulation::vote(v, false);
}
inline bool __all_sync(unsigned mask, bool v) {
  if (mask != 0xffffffffu) std::abort();
  return fwd_emulation::vote(v, true);
}
// Block-wide AND vote (slot 6 of every thread; the warp collectives use 0-5 and 7).
inline int __syncthreads_and(int v) {
  using namespace fwd_emulation;
  slot(tid())[6] = v != 0 ? 1u : 0u;
  __syncthreads();
  int all = 1;
  for (unsigned t = 0; t < tl_cta->threads; ++t) all &= slot(t)[6] != 0 ? 1 : 0;
  __syncthreads();
  return all;
}

namespace binformer::cuda::fwd {

// Shared-memory "addresses" start at this offset, a multiple of 128 but not of 1024: kernels that
// need 1024-byte alignment (the wgmma swizzle) must align their base themselves, as on the GPU.
inline constexpr uint32_t kEmulatedSmemAddrBase = 0x280;
inline uint32_t smem_u32(const void* p) {
  const auto* base = fwd_emulation::smem_base();
  const auto* q = static_cast<const unsigned char*>(p);
  if (q < base || q >= base + (1 << 20)) std::abort();  // not a shared-memory pointer
  return uint32_t(q - base) + kEmulatedSmemAddrBase;
}
inline unsigned char* smem_ptr(uint32_t addr) {
  if (addr < kEmulatedSmemAddrBase) std::abort();
  // past the block's dynamic shared memory (an out-of-range address faults on the GPU)
  const auto& mem = bwd_emulation::tl_cta->smem;
  if (fwd_emulation::smem_base() + (addr - kEmulatedSmemAddrBase) >= mem.data() + mem.size()) std::abort();
  return fwd_emulation::smem_base() + (addr - kEmulatedSmemAddrBase);
}

// ------------------------------------------------------------------ b1 products
// A (16 x k, row-major bits): a[0] = row g words t (k 32t..), a[1] = row g+8, a[2] / a[3] the
// words t + 4 (k256); B (k x 8): b0 = column g word t, b1 = word t + 4. C/D: (g, 2t), (g, 2t+1),
// (g+8, 2t), (g+8, 2t+1).
inline void emulate_b1(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, int words,
                       const int (&c)[4]) {
  using namespace fwd_emulation;
  auto& s = slot(tid());
  s[0] = a[0]; s[1] = a[1]; s[2] = a[2]; s[3] = a[3]; s[4] = b0; s[5] = b1;
  warp_sync();
  const unsigned g = lane() / 4, t = lane() % 4, base = warp_base();
  int out[4];
  for (int e = 0; e < 4; ++e) {
    const unsigned row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
    int count = 0;
    for (int w = 0; w < words; ++w) {
      const uint32_t aw = slot(base + (row % 8) * 4 + (w % 4))[(row >= 8 ? 1 : 0) + 2 * (w / 4)];
      const uint32_t bw = slot(base + col * 4 + (w % 4))[4 + w / 4];
      count += __builtin_popcount(aw & bw);
    }
    out[e] = count + c[e];
  }
  warp_sync();
  for (int e = 0; e < 4; ++e) d[e] = out[e];
}
inline void mma_and_popc_k128(int (&d)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
  const uint32_t a[4] = {a0, a1, 0u, 0u};
  emulate_b1(d, a, b0, 0u, 4, {0, 0, 0, 0});
}
inline void mma_and_popc_k128_c(int (&d)[4], uint32_t a0, uint32_t a1, uint32_t b0, int c_lo,
                                int c_hi) {
  const uint32_t a[4] = {a0, a1, 0u, 0u};
  emulate_b1(d, a, b0, 0u, 4, {c_lo, c_lo, c_hi, c_hi});
}
inline void mma_and_popc_k256(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emulate_b1(d, a, b0, b1, 8, {0, 0, 0, 0});
}

// ------------------------------------------------------------------ 16-bit products
// m16n8k16: A a0 = (g, k 2t..2t+1), a1 = (g+8, ..), a2 = (g, k 2t+8..), a3 = (g+8, k 2t+8..),
// lower k in the lower half; B b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g).
template <bool kBF16>
inline double half_of(uint32_t r, bool high) {
  const uint16_t h = uint16_t(high ? r >> 16 : r & 0xffffu);
  return kBF16 ? binformer::test::bf16_bits_to_double(h) : binformer::test::half_bits_to_double(h);
}
template <bool kBF16>
inline void emulate_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  using namespace fwd_emulation;
  auto& s = slot(tid());
  s[0] = a[0]; s[1] = a[1]; s[2] = a[2]; s[3] = a[3]; s[4] = b0; s[5] = b1;
  warp_sync();
  const unsigned g = lane() / 4, t = lane() % 4, base = warp_base();
  auto A = [&](unsigned row, unsigned k) {
    const uint32_t r = slot(base + (row % 8) * 4 + (k % 8) / 2)[(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)];
    return half_of<kBF16>(r, k % 2 == 1);
  };
  auto B = [&](unsigned k, unsigned col) {
    const uint32_t r = slot(base + col * 4 + (k % 8) / 2)[4 + (k >= 8 ? 1 : 0)];
    return half_of<kBF16>(r, k % 2 == 1);
  };
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const unsigned row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
    double sum = 0;
    for (unsigned k = 0; k < 16; ++k) sum += A(row, k) * B(k, col);
    out[e] = float(double(c[e]) + sum);
  }
  warp_sync();
  for (int e = 0; e < 4; ++e) c[e] = out[e];
}
inline void mma_f16_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emulate_16816<false>(c, a, b0, b1);
}
inline void mma_bf16_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emulate_16816<true>(c, a, b0, b1);
}
// ------------------------------------------------------------------ wgmma (sm_90a)
// PTX ISA "Asynchronous Warpgroup Level Matrix Multiply-Accumulate" (wgmma), written from the ISA
// independently of the kernel's pv_wgmma.h:
//   - wgmma.mma_async.m64nNk16 with A in registers: warp w of the warpgroup supplies rows 16w ..
//     16w + 15 of A in the m16n8k16 A layout, a0 = (g, k 2t..2t+1), a1 = (g + 8, k 2t..),
//     a2 = (g, k 2t+8..), a3 = (g + 8, k 2t+8..) (lower k in the lower half);
//   - D (f32): d[4i + e] = (row g + 8 (e / 2) of the warp's 16, column 8i + 2t + e % 2);
//   - B (K x N) from shared memory through the 64-bit matrix descriptor: start address (bits
//     0-13), leading-dimension byte offset LBO (16-29), stride-dimension byte offset SBO (32-45),
//     all >> 4; base offset (49-51); swizzle mode (62-63: 0 none, 1 128B, 2 64B, 3 32B). With
//     imm-trans-b = 1 (MN-major, 16-bit, T = 8 elements per 16 bytes) the canonical layouts are
//       none:  ((T,1,m),(8,k)) : ((1,T,SBO),(1T,LBO))
//       32B:   ((T,2,m),(8,k)) : ((1,T,LBO),(2T,SBO))
//       64B:   ((T,4,m),(8,k)) : ((1,T,LBO),(4T,SBO))
//       128B:  ((T,8,m),(8,k)) : ((1,T,LBO),(8T,SBO))
//     (element strides; the first mode is N, the second K), and the swizzle XORs the 16-byte
//     chunk bits 4.. of the resulting address with the bits 7.. (1, 2 or 3 bits);
//   - asynchrony: the operands and the accumulator are read and written at some point between the
//     wgmma and the wgmma.wait_group that retires its commit group. The emulator does all of it at
//     that wait (A is captured at issue: register reuse is ptxas's business), so a kernel that
//     reads the accumulator or overwrites V before the wait computes with stale / wrong values.
namespace wgmma_emulation {
using namespace ::fwd_emulation;
struct WgmmaOp {
  float* d;           // the thread's n / 2 accumulator registers
  int n;              // N of m64nNk16
  double a[2][16];    // rows g and g + 8 of the warp's A, k = 0..15
  uint64_t desc;
  bool bf16;
  int* di = nullptr;          // b1 (m64nNk256 AND.popc, scale-d 0): the s32 results instead of d
  uint32_t bits[2][8] = {};   // b1: rows g and g + 8 of the warp's A, words 0..7 (k 32w..)
};
inline thread_local std::vector<WgmmaOp> wgmma_open;
inline thread_local std::deque<std::vector<WgmmaOp>> wgmma_groups;
inline thread_local bool wgmma_fenced = false;
inline std::atomic<long long> wgmma_issued{0};  // all threads (the driver checks the path ran)
inline long long wgmma_issued_total() { return wgmma_issued.load(); }

// Byte address of B(k, n) (16-bit elements, MN-major) under the descriptor.
inline uint32_t wgmma_b_address_mn_major(uint64_t desc, unsigned k, unsigned n) {
  const uint32_t start = uint32_t(desc & 0x3FFFu) << 4;
  const uint32_t lbo = uint32_t((desc >> 16) & 0x3FFFu) << 4;
  const uint32_t sbo = uint32_t((desc >> 32) & 0x3FFFu) << 4;
  const unsigned base_offset = unsigned(desc >> 49) & 7u;
  const unsigned mode = unsigned(desc >> 62) & 3u;
  if (base_offset != 0) std::abort();  // (not emulated: only aligned swizzle patterns are used)
  const unsigned swz_bits = mode == 1 ? 3 : mode == 2 ? 2 : mode == 3 ? 1 : 0;
  const unsigned chunks = 1u << swz_bits;  // 16-byte chunks along N per swizzle row
  const unsigned T = 8;
  uint32_t off;
  if (mode == 0) {
    off = (n % T) * 2 + (n / T) * sbo + (k % 8) * 16 + (k / 8) * lbo;
  } else {
    const unsigned e = T * chunks;  // elements along N in one swizzle row
    off = (n % e) * 2 + (n / e) * lbo + (k % 8) * (16 * chunks) + (k / 8) * sbo;
  }
  uint32_t addr = start + off;
  addr ^= ((addr >> 7) & (chunks - 1)) << 4;
  return addr;
}

// Byte address and bit of B(k, n) for b1 (K-major, no swizzle: core matrices of 8 rows (n) x 16
// bytes (k, 128 bits), rows 16 bytes apart, the next 8 rows SBO further, the next 128 bits of k LBO
// further; bit k % 8 of the byte, as the packed sign rows).
inline uint32_t wgmma_b1_address_k_major(uint64_t desc, unsigned k, unsigned n) {
  const uint32_t start = uint32_t(desc & 0x3FFFu) << 4;
  const uint32_t lbo = uint32_t((desc >> 16) & 0x3FFFu) << 4;
  const uint32_t sbo = uint32_t((desc >> 32) & 0x3FFFu) << 4;
  if ((unsigned(desc >> 62) & 3u) != 0 || (unsigned(desc >> 49) & 7u) != 0) std::abort();  // (not emulated)
  return start + (n % 8) * 16 + (n / 8) * sbo + (k % 128) / 8 + (k / 128) * lbo;
}

inline void wgmma_execute(const WgmmaOp& op) {
  const unsigned g = lane() / 4, t = lane() % 4;
  if (op.di != nullptr) {
    for (int i = 0; i < op.n / 8; ++i)
      for (int e = 0; e < 4; ++e) {
        const unsigned col = 8 * i + 2 * t + (e & 1);
        int count = 0;
        for (unsigned k = 0; k < 256; ++k) {
          const unsigned char byte = *binformer::cuda::fwd::smem_ptr(wgmma_b1_address_k_major(op.desc, k, col));
          count += int((op.bits[e / 2][k / 32] >> (k % 32)) & 1u & (byte >> (k % 8)));
        }
        op.di[4 * i + e] = count;
      }
    return;
  }
  for (int i = 0; i < op.n / 8; ++i)
    for (int e = 0; e < 4; ++e) {
      const unsigned col = 8 * i + 2 * t + (e & 1);
      double sum = 0;
      for (unsigned k = 0; k < 16; ++k) {
        uint16_t bits;
        std::memcpy(&bits, binformer::cuda::fwd::smem_ptr(wgmma_b_address_mn_major(op.desc, k, col)), 2);
        const double bv = op.bf16 ? binformer::test::bf16_bits_to_double(bits)
                                  : binformer::test::half_bits_to_double(bits);
        sum += op.a[e / 2][k] * bv;
      }
      op.d[4 * i + e] = float(double(op.d[4 * i + e]) + sum);
    }
}

// Called after a block finished: nothing may be left in flight.
inline void wgmma_check_drained() {
  if (!wgmma_open.empty() || !wgmma_groups.empty()) std::abort();
}
}  // namespace wgmma_emulation

inline void wgmma_fence() { wgmma_emulation::wgmma_fenced = true; }
inline void wgmma_commit() {
  using namespace wgmma_emulation;
  wgmma_groups.push_back(std::move(wgmma_open));
  wgmma_open.clear();
  wgmma_fenced = false;  // (the kernel fences before every group)
}
template <int N>
inline void wgmma_wait() {
  using namespace wgmma_emulation;
  while (wgmma_groups.size() > size_t(N)) {
    for (const WgmmaOp& op : wgmma_groups.front()) wgmma_execute(op);
    wgmma_groups.pop_front();
  }
}
inline void reg_fence(float&) {}
inline void reg_fence_u32(uint32_t&) {}

template <int kN, bool kBF16>
inline void wgmma_m64nNk16_rs(float (&d)[kN / 8][4], const uint32_t (&a)[4], uint64_t desc_b) {
  static_assert(kN % 8 == 0 && kN >= 8 && kN <= 256, "wgmma n (f16/bf16: multiples of 8 up to 256)");
  using namespace wgmma_emulation;
  if (!wgmma_fenced) std::abort();  // PTX: wgmma.fence before the wgmma that reads new registers
  auto& s = slot(tid());
  s[0] = a[0]; s[1] = a[1]; s[2] = a[2]; s[3] = a[3];
  s[4] = uint32_t(desc_b); s[5] = uint32_t(desc_b >> 32);
  warp_sync();
  const unsigned g = lane() / 4, base = warp_base();
  WgmmaOp op{&d[0][0], kN, {}, desc_b, kBF16};
  for (unsigned h = 0; h < 2; ++h)
    for (unsigned k = 0; k < 16; ++k) {
      const uint32_t r = slot(base + 4 * g + (k % 8) / 2)[h + (k >= 8 ? 2 : 0)];
      op.a[h][k] = half_of<kBF16>(r, k % 2 == 1);
    }
  // .aligned: the same descriptor in every lane of the warp
  for (unsigned l = 0; l < 32; ++l) {
    if (slot(base + l)[4] != s[4] || slot(base + l)[5] != s[5]) std::abort();
  }
  warp_sync();
  wgmma_open.push_back(op);
  ++wgmma_issued;
}

template <int kN>
inline void wgmma_b1_m64nNk256_rs(int (&d)[kN / 8][4], const uint32_t (&a)[4], uint64_t desc_b) {
  static_assert(kN % 8 == 0 && kN >= 8 && kN <= 256, "wgmma n (b1: multiples of 8 up to 256)");
  using namespace wgmma_emulation;
  if (!wgmma_fenced) std::abort();
  auto& s = slot(tid());
  s[0] = a[0]; s[1] = a[1]; s[2] = a[2]; s[3] = a[3];
  s[4] = uint32_t(desc_b); s[5] = uint32_t(desc_b >> 32);
  warp_sync();
  const unsigned g = lane() / 4, base = warp_base();
  WgmmaOp op{nullptr, kN, {}, desc_b, false};
  op.di = &d[0][0];
  // a0 = (g, k 32t..), a1 = (g + 8, k 32t..), a2 / a3 = the same rows at k 128 + 32t
  for (unsigned h = 0; h < 2; ++h)
    for (unsigned w = 0; w < 8; ++w) op.bits[h][w] = slot(base + 4 * g + w % 4)[h + (w >= 4 ? 2 : 0)];
  for (unsigned l = 0; l < 32; ++l) {
    if (slot(base + l)[4] != s[4] || slot(base + l)[5] != s[5]) std::abort();
  }
  warp_sync();
  wgmma_open.push_back(op);
  ++wgmma_issued;
}
inline void reg_fence_s32(int&) {}

// The fp32-V and pv_int8 paths are not emulated.
inline void mma_tf32_1688(float (&)[4], const uint32_t (&)[4], uint32_t, uint32_t) { std::abort(); }
inline void mma_u8s8_16832(int (&)[4], const uint32_t (&)[4], uint32_t, uint32_t) { std::abort(); }

// ------------------------------------------------------------------ shared memory
// ldmatrix .x4/.x2 .trans: matrix m takes its 8 row addresses from lanes 8m..8m+7; thread
// (g, t) receives (row 2t, col g) in the low half and (row 2t+1, col g) in the high half.
inline void emulate_ldmatrix_trans(uint32_t* r, int count, uint32_t addr) {
  using namespace fwd_emulation;
  tl_cta->addrs[tid()] = smem_ptr(addr);
  warp_sync();
  const unsigned g = lane() / 4, t = lane() % 4, base = warp_base();
  uint32_t out[4];
  for (int m = 0; m < count; ++m) {
    const unsigned char* row0 = static_cast<const unsigned char*>(tl_cta->addrs[base + 8 * m + 2 * t]);
    const unsigned char* row1 = static_cast<const unsigned char*>(tl_cta->addrs[base + 8 * m + 2 * t + 1]);
    uint16_t lo, hi;
    std::memcpy(&lo, row0 + 2 * g, 2);
    std::memcpy(&hi, row1 + 2 * g, 2);
    out[m] = uint32_t(lo) | (uint32_t(hi) << 16);
  }
  warp_sync();
  for (int m = 0; m < count; ++m) r[m] = out[m];
}
inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) { emulate_ldmatrix_trans(r, 4, addr); }
inline void ldmatrix_x2_trans(uint32_t (&r)[2], uint32_t addr) { emulate_ldmatrix_trans(r, 2, addr); }

inline float lds_f32(uint32_t addr) {
  float v;
  std::memcpy(&v, smem_ptr(addr), 4);
  return v;
}

inline uint32_t lds_u32_invariant(uint32_t addr) {
  if ((addr & 3u) != 0) std::abort();  // misaligned
  smem_ptr(addr + 3);
  uint32_t v;
  std::memcpy(&v, smem_ptr(addr), 4);
  return v;
}

inline void st_shared_u32(uint32_t addr, uint32_t v) {
  if ((addr & 3u) != 0) std::abort();  // misaligned
  smem_ptr(addr + 3);
  std::memcpy(smem_ptr(addr), &v, 4);
}
inline uint4 ld_shared_v4(uint32_t addr) {
  if ((addr & 15u) != 0) std::abort();  // misaligned
  smem_ptr(addr + 15);
  uint4 v;
  std::memcpy(&v, smem_ptr(addr), 16);
  return v;
}

// cp.async completes at once here (the kernel's wait / barrier points are still executed).
inline void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  unsigned char* d = smem_ptr(dst);
  std::memset(d, 0, 16);
  if (src_bytes > 0) std::memcpy(d, src, size_t(src_bytes));
}
inline void cp_async_4(uint32_t dst, const void* src) { std::memcpy(smem_ptr(dst), src, 4); }
inline void cp_async_commit() {}
template <int N>
inline void cp_async_wait() {}

// ------------------------------------------------------------------ TMA and mbarriers
// Written from the PTX ISA (mbarrier phases and transaction counts; cp.async.bulk and
// cp.async.bulk.tensor .tile with the 128 / 64 / 32-byte swizzles: 16-byte chunk j of a row at
// shared address A lands at chunk j ^ ((A >> 7) & (span / 16 - 1)), out-of-bound elements zero) and the tensor
// geometry that tma_desc.h stores in the descriptor under emulation. The copies complete when
// issued; the waits spin until the phase has completed (a wrong byte count or parity hangs:
// aborted after 30 s).
namespace mbar_emulation {
struct State {
  uint8_t arrivals, pending, phase, pad;
  int32_t tx;
};
static_assert(sizeof(State) == 8, "one mbarrier: 8 bytes of shared memory");
inline std::mutex mutex;
inline State* at(uint32_t bar) {
  if ((bar & 7u) != 0) std::abort();  // mbarriers are 8-byte aligned
  return reinterpret_cast<State*>(smem_ptr(bar));
}
// One arrival and / or completed bytes; the phase completes when both reach zero.
inline void update(uint32_t bar, int arrive, int32_t expect, int32_t done) {
  std::lock_guard<std::mutex> lock(mutex);
  State* st = at(bar);
  if (st->arrivals == 0) std::abort();  // not initialised
  st->tx += expect - done;
  if (arrive != 0) {
    if (st->pending == 0) std::abort();
    st->pending = uint8_t(st->pending - 1);
  }
  if (st->pending == 0 && st->tx == 0) {
    st->phase ^= 1u;
    st->pending = st->arrivals;
  }
}
}  // namespace mbar_emulation

inline void mbar_init(uint32_t bar, uint32_t arrivals) {
  std::lock_guard<std::mutex> lock(mbar_emulation::mutex);
  mbar_emulation::State* st = mbar_emulation::at(bar);
  *st = mbar_emulation::State{uint8_t(arrivals), uint8_t(arrivals), 0, 0, 0};
}
inline void mbar_init_fence() {}
inline void fence_proxy_async_smem() {}
inline void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) { mbar_emulation::update(bar, 1, int32_t(bytes), 0); }
inline void mbar_wait(uint32_t bar, uint32_t parity) {
  const auto start = std::chrono::steady_clock::now();
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(mbar_emulation::mutex);
      if (mbar_emulation::at(bar)->phase != parity) return;  // phase `parity` completed
    }
    if (std::chrono::steady_clock::now() - start > std::chrono::seconds(30)) {
      std::fprintf(stderr, "mbarrier wait (parity %u) never completed\n", parity);
      std::abort();
    }
    std::this_thread::yield();
  }
}
inline void tma_bulk_load(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  if ((dst & 15u) != 0 || (reinterpret_cast<uintptr_t>(src) & 15u) != 0 || bytes % 16 != 0) std::abort();
  smem_ptr(dst + bytes - 1);
  std::memcpy(smem_ptr(dst), src, bytes);
  mbar_emulation::update(bar, 0, 0, int32_t(bytes));
}
inline void tma_load_4d(uint32_t dst, const void* tmap, int c0, int c1, int c2, int c3, uint32_t bar) {
  TmaTensor4d t;
  std::memcpy(&t, tmap, sizeof(t));
  // The swizzle spans a box row (box[0] * 2 = 128, 64, 32 bytes; 16: none): chunk j of the span
  // XOR address bits 7.. (as many bits as the span has chunk bits); the destination is aligned
  // to the pattern's repeat (8 rows).
  const uint32_t span = t.box[0] * 2;
  if (span != 128 && span != 64 && span != 32 && span != 16) std::abort();
  const uint32_t swz_mask = span / 16 - 1;
  if (span > 16 && (dst % (8 * span)) != 0) std::abort();
  const int c[4] = {c0, c1, c2, c3};
  uint32_t off = 0;
  for (uint32_t i3 = 0; i3 < t.box[3]; ++i3)
    for (uint32_t i2 = 0; i2 < t.box[2]; ++i2)
      for (uint32_t i1 = 0; i1 < t.box[1]; ++i1)
        for (uint32_t i0 = 0; i0 < t.box[0]; ++i0, off += 2) {
          const int64_t x[4] = {int64_t(c[0]) + i0, int64_t(c[1]) + i1, int64_t(c[2]) + i2, int64_t(c[3]) + i3};
          uint16_t v = 0;
          bool inside = true;
          for (int k = 0; k < 4; ++k) inside &= x[k] >= 0 && uint64_t(x[k]) < t.dims[k];
          if (inside) {
            const auto* src = static_cast<const unsigned char*>(t.base) + x[0] * 2 + x[1] * int64_t(t.strides[0]) +
                              x[2] * int64_t(t.strides[1]) + x[3] * int64_t(t.strides[2]);
            std::memcpy(&v, src, 2);
          }
          const uint32_t addr = dst + off;
          std::memcpy(smem_ptr(addr ^ (((addr >> 7) & swz_mask) << 4)), &v, 2);
        }
  mbar_emulation::update(bar, 0, 0, int32_t(off));
}

// ------------------------------------------------------------------ arithmetic
// ex2.approx.ftz.f32: 2^x with ~2^-22 relative error; subnormal results flush to 0.
inline float ex2_approx(float x) {
  const float y = float(std::exp2(double(x)));
  return std::fabs(y) < 1.17549435e-38f ? 0.0f : y;
}
inline uint32_t cvt_tf32(float) { std::abort(); }
// prmt.b32 (default mode): byte i of the result is byte (selector nibble i & 7) of {b, a}, or its
// sign replicated when bit 3 of the nibble is set.
inline uint32_t prmt(uint32_t a, uint32_t b, uint32_t selector) {
  const uint64_t src = uint64_t(a) | (uint64_t(b) << 32);
  uint32_t d = 0;
  for (int i = 0; i < 4; ++i) {
    const unsigned nib = (selector >> (4 * i)) & 0xFu;
    uint32_t byte = uint32_t(src >> (8 * (nib & 7u))) & 0xFFu;
    if (nib & 8u) byte = (byte & 0x80u) ? 0xFFu : 0u;
    d |= byte << (8 * i);
  }
  return d;
}

template <bool kBF16>
inline uint32_t pack_pair(float x, float y) {
  if constexpr (kBF16) {
    return uint32_t(binformer::test::float_to_bf16_bits(x)) |
           (uint32_t(binformer::test::float_to_bf16_bits(y)) << 16);
  } else {
    return uint32_t(binformer::test::float_to_half_bits(x)) |
           (uint32_t(binformer::test::float_to_half_bits(y)) << 16);
  }
}

}  // namespace binformer::cuda::fwd
