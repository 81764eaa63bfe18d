// Host emulation of the CUDA features the attention_bwd kernels use, so that the kernel source
// itself (cuda/src/attention_bwd/*.cuh, compiled with -DBINFORMER_BWD_HOST_EMULATION) runs on the
// CPU: one std::thread per CUDA thread, CTAs one after another, __syncthreads and the warp
// collectives as std::barrier phases. Warp-level tensor-core instructions (mma.sync b1 / f16 /
// bf16, ldmatrix) are implemented from the fragment layouts of the PTX ISA, written here
// independently of the kernels, so a wrong lane/register/address mapping in a kernel shows up as a
// wrong result against the float64 reference. A collective reached by only part of a warp
// deadlocks here, as it is undefined behaviour on the GPU.
//
// Not part of any build; see emulate_attention_bwd.cpp for the command line.
#pragma once
#include <algorithm>
#include <array>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "host_float_bits.h"

// ---------------------------------------------------------------- qualifiers and types
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct uint3 { unsigned x = 0, y = 0, z = 0; };
struct float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorNotSupported = 801,
};
typedef struct CUstream_st* cudaStream_t;

struct __half { uint16_t x; };
struct __nv_bfloat16 { uint16_t x; };
struct __half2 { __half lo, hi; };
struct __nv_bfloat162 { __nv_bfloat16 lo, hi; };
inline float __half2float(__half h) { return float(binformer::test::half_bits_to_double(h.x)); }
inline __half __ushort_as_half(unsigned short x) { return {x}; }
inline float __uint_as_float(unsigned x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
inline float __bfloat162float(__nv_bfloat16 b) { return float(binformer::test::bf16_bits_to_double(b.x)); }
inline __half2 __floats2half2_rn(float lo, float hi) {
  return {{binformer::test::float_to_half_bits(lo)}, {binformer::test::float_to_half_bits(hi)}};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {{binformer::test::float_to_bf16_bits(lo)}, {binformer::test::float_to_bf16_bits(hi)}};
}

// ---------------------------------------------------------------- built-in functions
inline int __popc(uint32_t x) { return __builtin_popcount(x); }
inline float __int_as_float(int x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
template <class T>
inline T __ldg(const T* p) { return *p; }
template <class T>
inline T min(T a, T b) { return a < b ? a : b; }
template <class T>
inline T max(T a, T b) { return a < b ? b : a; }
inline void __trap() { std::abort(); }

namespace bwd_emulation {

struct Cta {
  Cta(unsigned threads, size_t smem_bytes)
      : threads(threads), barrier(std::make_unique<std::barrier<>>(threads)), smem(smem_bytes + 16, 0xA5),
        slots(threads), addrs(threads) {
    for (unsigned w = 0; w < threads / 32; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
  }
  unsigned threads;
  std::unique_ptr<std::barrier<>> barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<unsigned char> smem;  // poisoned: kernels must not read what they did not write
  std::vector<std::array<uint32_t, 8>> slots;  // per-thread registers for warp collectives
  std::vector<const void*> addrs;              // per-thread ldmatrix addresses
};

inline thread_local Cta* tl_cta = nullptr;
inline thread_local long wgmma_ops_in_flight = 0;  // issued, not yet retired by a wait (tc::wgmma_*)
inline thread_local uint3 tl_thread, tl_block, tl_block_dim, tl_grid_dim;

inline unsigned char* dynamic_smem() {
  // 16-byte alignment like __align__(16) extern shared memory.
  const uintptr_t base = reinterpret_cast<uintptr_t>(tl_cta->smem.data());
  return reinterpret_cast<unsigned char*>((base + 15) & ~uintptr_t(15));
}
inline unsigned tid() { return tl_thread.x; }
inline unsigned lane() { return tl_thread.x & 31; }
inline unsigned warp_base() { return tl_thread.x & ~31u; }
inline void warp_sync() { tl_cta->warp_barriers[tl_thread.x / 32]->arrive_and_wait(); }
inline std::array<uint32_t, 8>& slot(unsigned t) { return tl_cta->slots[t]; }

// Runs kernel(args...) for every block of a 1-D grid, one CTA at a time.
template <class Kernel, class... Args>
void launch(Kernel kernel, unsigned grid, unsigned block, size_t smem_bytes, const Args&... args) {
  for (unsigned bx = 0; bx < grid; ++bx) {
    Cta cta(block, smem_bytes);
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (unsigned t = 0; t < block; ++t) {
      threads.emplace_back([&, t] {
        tl_cta = &cta;
        tl_thread = {t, 0, 0};
        tl_block = {bx, 0, 0};
        tl_block_dim = {block, 1, 1};
        tl_grid_dim = {grid, 1, 1};
        kernel(args...);
        if (wgmma_ops_in_flight != 0) std::abort();  // wgmma left in flight at thread exit
      });
    }
    for (auto& th : threads) th.join();
  }
}

}  // namespace bwd_emulation

#define threadIdx (::bwd_emulation::tl_thread)
#define blockIdx (::bwd_emulation::tl_block)
#define blockDim (::bwd_emulation::tl_block_dim)
#define gridDim (::bwd_emulation::tl_grid_dim)

inline void __syncthreads() { bwd_emulation::tl_cta->barrier->arrive_and_wait(); }

template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  using namespace bwd_emulation;
  if (mask != 0xffffffffu) std::abort();  // the kernels only use full-warp shuffles
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  slot(tid())[0] = bits;
  warp_sync();
  const uint32_t other = slot(warp_base() + (lane() ^ unsigned(lane_mask)))[0];
  warp_sync();
  T r;
  std::memcpy(&r, &other, 4);
  return r;
}

// ---------------------------------------------------------------- tensor-core instructions
// PTX ISA fragment layouts (groupID g = lane / 4, threadID_in_group t = lane % 4):
//  m16n8k16 .f16/.bf16  A: a0 (row g, k 2t..2t+1), a1 (row g+8, same k), a2 (row g, k 2t+8..2t+9),
//                           a3 (row g+8, k 2t+8..); the lower k in the lower 16 bits.
//                        B: b0 (k 2t..2t+1, col g), b1 (k 2t+8..2t+9, col g).
//                        C/D: c0 (row g, col 2t), c1 (row g, col 2t+1), c2 (row g+8, col 2t), c3.
//  m16n8k256 .b1         A: a0 (row g, k 32t..32t+31), a1 (row g+8, same k), a2 (row g,
//                           k 128+32t..), a3 (row g+8, k 128+32t..); B: b0 (k 32t.., col g),
//                           b1 (k 128+32t.., col g); C/D as above.
//  ldmatrix .x4          matrix m (0..3) has its 8 row addresses from lanes 8m..8m+7; thread (g, t)
//                        receives r[m] = (row g, cols 2t, 2t+1); with .trans (row 2t, col g) and
//                        (row 2t+1, col g).
namespace binformer::cuda::bwd::tc {

template <class T>
inline double half_value(uint32_t bits16) {
  if constexpr (std::is_same<T, __half>::value) return binformer::test::half_bits_to_double(uint16_t(bits16));
  else return binformer::test::bf16_bits_to_double(uint16_t(bits16));
}

inline void mma_b1_and_popc(int (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  using namespace bwd_emulation;
  auto& s = slot(tid());
  s[0] = a[0]; s[1] = a[1]; s[2] = a[2]; s[3] = a[3]; s[4] = b0; s[5] = b1;
  warp_sync();
  const unsigned g = lane() / 4, t = lane() % 4, base = warp_base();
  int out[4];
  for (int e = 0; e < 4; ++e) {
    const unsigned row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
    int count = 0;
    for (unsigned w = 0; w < 8; ++w) {  // 32-bit word w of k: k = 32 w ..
      const uint32_t aw = slot(base + (row % 8) * 4 + (w % 4))[(row >= 8 ? 1 : 0) + 2 * (w / 4)];
      const uint32_t bw = slot(base + col * 4 + (w % 4))[4 + w / 4];
      count += __builtin_popcount(aw & bw);
    }
    out[e] = count;
  }
  warp_sync();
  for (int e = 0; e < 4; ++e) c[e] += out[e];
}

template <class T>
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  using namespace bwd_emulation;
  auto& s = slot(tid());
  s[0] = a[0]; s[1] = a[1]; s[2] = a[2]; s[3] = a[3]; s[4] = b0; s[5] = b1;
  warp_sync();
  const unsigned g = lane() / 4, t = lane() % 4, base = warp_base();
  auto A = [&](unsigned row, unsigned k) {
    const uint32_t r = slot(base + (row % 8) * 4 + (k % 8) / 2)[(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)];
    return half_value<T>(k % 2 ? r >> 16 : r & 0xffffu);
  };
  auto B = [&](unsigned k, unsigned col) {
    const uint32_t r = slot(base + col * 4 + (k % 8) / 2)[4 + (k >= 8 ? 1 : 0)];
    return half_value<T>(k % 2 ? r >> 16 : r & 0xffffu);
  };
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const unsigned row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
    double sum = 0;  // products of 16-bit inputs are exact; fp32-like accumulation below
    for (unsigned k = 0; k < 16; ++k) sum += A(row, k) * B(k, col);
    out[e] = float(double(c[e]) + sum);
  }
  warp_sync();
  for (int e = 0; e < 4; ++e) c[e] = out[e];
}

// d = a b + c with separate c (the kernels' loop-invariant-offset forms).
inline void mma_b1_and_popc(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, const int (&c)[4]) {
  int acc[4] = {c[0], c[1], c[2], c[3]};
  mma_b1_and_popc(acc, a, b0, b1);
  for (int e = 0; e < 4; ++e) d[e] = acc[e];
}
template <class T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, const float (&c)[4]) {
  float acc[4] = {c[0], c[1], c[2], c[3]};
  mma_16816<T>(acc, a, b0, b1);
  for (int e = 0; e < 4; ++e) d[e] = acc[e];
}

inline uint16_t load16(const void* row_address, unsigned col) {
  uint16_t v;
  std::memcpy(&v, static_cast<const unsigned char*>(row_address) + 2 * col, 2);
  return v;
}

inline void ldmatrix_x4_impl(uint32_t (&r)[4], const void* p, bool trans) {
  using namespace bwd_emulation;
  tl_cta->addrs[tid()] = p;
  warp_sync();
  const unsigned g = lane() / 4, t = lane() % 4, base = warp_base();
  uint32_t out[4];
  for (unsigned m = 0; m < 4; ++m) {
    const void* const* rows = &tl_cta->addrs[base + 8 * m];
    if (!trans) {
      out[m] = uint32_t(load16(rows[g], 2 * t)) | (uint32_t(load16(rows[g], 2 * t + 1)) << 16);
    } else {
      out[m] = uint32_t(load16(rows[2 * t], g)) | (uint32_t(load16(rows[2 * t + 1], g)) << 16);
    }
  }
  warp_sync();
  for (int m = 0; m < 4; ++m) r[m] = out[m];
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) { ldmatrix_x4_impl(r, p, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) { ldmatrix_x4_impl(r, p, true); }

// cp.async completes immediately here; the kernels' wait/commit points become no-ops.
inline void cp_async_16(void* smem, const void* gmem, bool valid) {
  if (valid) std::memcpy(smem, gmem, 16);
  else std::memset(smem, 0, 16);
}
inline void cp_async_4(void* smem, const void* gmem, bool valid) {
  if (valid) std::memcpy(smem, gmem, 4);
  else std::memset(smem, 0, 4);
}
inline void cp_async_commit() {}
inline void cp_async_wait_all() {}

// ---------------------------------------------------------------- shared-memory addresses
// The shared window's addresses of the emulated CTA start at 0x280 (a multiple of 128, not of
// 1024), so a kernel that needs 1024-byte alignment (the wgmma swizzle) must align itself.
inline constexpr uint32_t kEmulatedSmemAddrBase = 0x280;
inline uint32_t smem_addr(const void* p) {
  const auto* base = bwd_emulation::tl_cta->smem.data();
  const auto* q = static_cast<const unsigned char*>(p);
  if (q < base || q >= base + bwd_emulation::tl_cta->smem.size()) std::abort();  // not shared memory
  return uint32_t(q - base) + kEmulatedSmemAddrBase;
}
inline const unsigned char* smem_ptr(uint32_t addr) {
  if (addr < kEmulatedSmemAddrBase || addr - kEmulatedSmemAddrBase >= bwd_emulation::tl_cta->smem.size()) {
    std::abort();
  }
  return bwd_emulation::tl_cta->smem.data() + (addr - kEmulatedSmemAddrBase);
}

// ---------------------------------------------------------------- wgmma (sm_90a)
// PTX ISA "Asynchronous Warpgroup Level Matrix Multiply-Accumulate", written from the ISA
// (independently of the kernel's descriptor code in bwd_main.cuh):
//  - wgmma.mma_async.m64nNk16, A in registers: warp w of the warpgroup supplies rows 16w..16w+15 in
//    the m16n8k16 A layout (a0 = (g, k 2t..2t+1), a1 = (g+8, k 2t..), a2 = (g, k 2t+8..),
//    a3 = (g+8, k 2t+8..), lower k in the lower half); D (f32) d[i][e] = (row g + 8 (e / 2) of the
//    warp's 16, column 8i + 2t + e % 2).
//  - B (K x N) from shared memory through the 64-bit descriptor: start address (bits 0-13),
//    leading-dimension byte offset LBO (16-29), stride-dimension byte offset SBO (32-45), all >> 4;
//    base offset (49-51, must be 0 here); swizzle mode (62-63: 0 none, 1 128B, 2 64B, 3 32B). With
//    imm-trans-b = 1 (MN-major, 16-bit, T = 8 elements = 16 bytes) the canonical layouts are
//      none: ((T,1,m),(8,k)) : ((1,T,SBO),(1T,LBO));  32B: ((T,2,m),(8,k)) : ((1,T,LBO),(2T,SBO));
//      64B:  ((T,4,m),(8,k)) : ((1,T,LBO),(4T,SBO));  128B: ((T,8,m),(8,k)) : ((1,T,LBO),(8T,SBO))
//    (element strides, first mode N, second K); the swizzle XORs the 16-byte chunk bits 4.. of the
//    resulting byte address with bits 7.. (3, 2 or 1 bits).
//  - asynchrony: operands and accumulators are accessed somewhere between the wgmma and the
//    wgmma.wait_group that retires its commit group. Here everything happens at that wait (A is
//    captured at issue), so a kernel that reads the accumulators or overwrites B's shared memory
//    before the wait computes wrong values. A wgmma without a preceding fence, descriptors that
//    differ across a warp, or operations still in flight when the thread exits abort.
#define BINFORMER_WGMMA_CODE 1
namespace wgmma_emulation {
struct Op {
  float* d;         // the thread's n / 2 accumulator registers
  double a[2][16];  // rows g and g + 8 of the warp's A, k = 0..15 (register A)
  uint64_t desc;    // B (register A); A when a_from_smem, with desc_b for B
  bool bf16;
  int n = 64;
  bool a_from_smem = false;  // the SS form: A and B K-major in shared memory
  uint64_t desc_b = 0;
  unsigned warp_in_group = 0;
};
inline thread_local std::vector<Op> open_ops;
inline thread_local std::vector<std::vector<Op>> groups;  // committed, oldest first
inline thread_local bool fenced = false;

inline uint32_t b_address_mn_major(uint64_t desc, unsigned k, unsigned n) {
  const uint32_t start = uint32_t(desc & 0x3FFFu) << 4;
  const uint32_t lbo = uint32_t((desc >> 16) & 0x3FFFu) << 4;
  const uint32_t sbo = uint32_t((desc >> 32) & 0x3FFFu) << 4;
  const unsigned base_offset = unsigned(desc >> 49) & 7u;
  const unsigned mode = unsigned(desc >> 62) & 3u;
  if (base_offset != 0) std::abort();
  const unsigned swz_bits = mode == 1 ? 3 : mode == 2 ? 2 : mode == 3 ? 1 : 0;
  const unsigned chunks = 1u << swz_bits, T = 8;
  uint32_t off;
  if (mode == 0) {
    off = (n % T) * 2 + (n / T) * sbo + (k % 8) * 16 + (k / 8) * lbo;
  } else {
    const unsigned e = T * chunks;
    off = (n % e) * 2 + (n / e) * lbo + (k % 8) * (16 * chunks) + (k / 8) * sbo;
  }
  uint32_t addr = start + off;
  addr ^= ((addr >> 7) & (chunks - 1)) << 4;
  return addr;
}

// Byte address of element (row r, k) of a K-major operand (rows along M or N, k contiguous),
// 16-bit elements. Canonical K-major layouts (T = 8 elements): 128B ((8,m),(T,2k)) :
// ((8T,SBO),(1,T)); only the 128B mode is emulated (the kernel uses no other K-major form).
inline uint32_t address_k_major(uint64_t desc, unsigned r, unsigned k) {
  const uint32_t start = uint32_t(desc & 0x3FFFu) << 4;
  const uint32_t sbo = uint32_t((desc >> 32) & 0x3FFFu) << 4;
  const unsigned base_offset = unsigned(desc >> 49) & 7u;
  const unsigned mode = unsigned(desc >> 62) & 3u;
  if (base_offset != 0 || mode != 1 || k >= 64) std::abort();
  uint32_t addr = start + (r % 8) * 128 + (r / 8) * sbo + k * 2;
  addr ^= ((addr >> 7) & 7u) << 4;
  return addr;
}

inline double load_half(uint32_t addr, bool bf16) {
  uint16_t bits;
  std::memcpy(&bits, smem_ptr(addr), 2);
  return bf16 ? binformer::test::bf16_bits_to_double(bits) : binformer::test::half_bits_to_double(bits);
}

inline void execute(const Op& op) {
  const unsigned t = bwd_emulation::lane() % 4, g = bwd_emulation::lane() / 4;
  if (op.a_from_smem) {
    for (int i = 0; i < op.n / 8; ++i) {
      for (int e = 0; e < 4; ++e) {
        const unsigned row = 16 * op.warp_in_group + g + 8 * (e / 2), col = 8 * i + 2 * t + (e & 1);
        double sum = 0;
        for (unsigned k = 0; k < 16; ++k) {
          sum += load_half(address_k_major(op.desc, row, k), op.bf16) * load_half(address_k_major(op.desc_b, col, k), op.bf16);
        }
        op.d[4 * i + e] = float(double(op.d[4 * i + e]) + sum);
      }
    }
    --bwd_emulation::wgmma_ops_in_flight;
    return;
  }
  for (int i = 0; i < op.n / 8; ++i) {
    for (int e = 0; e < 4; ++e) {
      const unsigned col = 8 * i + 2 * t + (e & 1);
      double sum = 0;
      for (unsigned k = 0; k < 16; ++k) {
        uint16_t bits;
        std::memcpy(&bits, smem_ptr(b_address_mn_major(op.desc, k, col)), 2);
        const double bv = op.bf16 ? binformer::test::bf16_bits_to_double(bits) : binformer::test::half_bits_to_double(bits);
        sum += op.a[e / 2][k] * bv;
      }
      op.d[4 * i + e] = float(double(op.d[4 * i + e]) + sum);
    }
  }
  --bwd_emulation::wgmma_ops_in_flight;
}
}  // namespace wgmma_emulation

inline void wgmma_fence() { wgmma_emulation::fenced = true; }
inline void wgmma_commit() {
  using namespace wgmma_emulation;
  groups.push_back(std::move(open_ops));
  open_ops.clear();
  fenced = false;  // the kernel fences before every group
}
template <int N>
inline void wgmma_wait() {
  using namespace wgmma_emulation;
  while (groups.size() > size_t(N)) {
    for (const Op& op : groups.front()) execute(op);
    groups.erase(groups.begin());
  }
}
inline void reg_fence(float&) {}

template <class T>
inline void wgmma_m64n16k16_ss(float (&d)[2][4], uint64_t desc_a, uint64_t desc_b) {
  using namespace bwd_emulation;
  if (!wgmma_emulation::fenced) std::abort();
  auto& s = slot(tid());
  s[4] = uint32_t(desc_a); s[5] = uint32_t(desc_a >> 32); s[6] = uint32_t(desc_b); s[7] = uint32_t(desc_b >> 32);
  warp_sync();
  const unsigned base = warp_base();
  for (unsigned l = 0; l < 32; ++l) {  // .aligned: the same descriptors in every lane
    for (int w = 4; w < 8; ++w) {
      if (slot(base + l)[w] != s[w]) std::abort();
    }
  }
  warp_sync();
  wgmma_emulation::Op op{&d[0][0], {}, desc_a, std::is_same<T, __nv_bfloat16>::value};
  op.n = 16;
  op.a_from_smem = true;
  op.desc_b = desc_b;
  op.warp_in_group = (tid() / 32) % 4;
  wgmma_emulation::open_ops.push_back(op);
  ++wgmma_ops_in_flight;
}


template <int kN, bool kBF16>
inline void wgmma_m64nNk16_rs(float (&d)[kN / 8][4], const uint32_t (&a)[4], uint64_t desc_b) {
  using T = std::conditional_t<kBF16, __nv_bfloat16, __half>;
  static_assert(kN % 8 == 0 && kN >= 8 && kN <= 256, "wgmma n (f16 / bf16: multiples of 8 up to 256)");
  using namespace bwd_emulation;
  if (!wgmma_emulation::fenced) std::abort();  // PTX: wgmma.fence before a wgmma reading new registers
  auto& s = slot(tid());
  s[0] = a[0]; s[1] = a[1]; s[2] = a[2]; s[3] = a[3];
  s[4] = uint32_t(desc_b); s[5] = uint32_t(desc_b >> 32);
  warp_sync();
  const unsigned g = lane() / 4, base = warp_base();
  wgmma_emulation::Op op{&d[0][0], {}, desc_b, kBF16};
  op.n = kN;
  for (unsigned h = 0; h < 2; ++h) {
    for (unsigned k = 0; k < 16; ++k) {
      const uint32_t r = slot(base + 4 * g + (k % 8) / 2)[h + (k >= 8 ? 2 : 0)];
      op.a[h][k] = half_value<T>(k % 2 ? r >> 16 : r & 0xffffu);
    }
  }
  for (unsigned l = 0; l < 32; ++l) {  // .aligned: one descriptor for the whole warp
    if (slot(base + l)[4] != s[4] || slot(base + l)[5] != s[5]) std::abort();
  }
  warp_sync();
  wgmma_emulation::open_ops.push_back(op);
  ++wgmma_ops_in_flight;
}

}  // namespace binformer::cuda::bwd::tc
