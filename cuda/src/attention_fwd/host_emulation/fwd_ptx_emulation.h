// Host emulation of ptx.h (compiled with -DBINFORMER_FWD_HOST_EMULATION): the forward kernels'
// source runs on the CPU, one std::thread per CUDA thread, on the CTA machinery of
// tests/cuda/emulation/bwd_emulation.h (barriers, shuffles, 16-bit float types). The warp-level
// instructions are implemented here from the PTX ISA fragment layouts (written independently of
// the kernel), so a wrong lane / register / address mapping in the kernel shows up as a wrong
// result against the float64 reference. Shared-memory "addresses" (smem_u32) are byte offsets
// from the CTA's dynamic shared memory. Not part of any build: see emulate_attention_fwd.cpp.
#pragma once
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "bwd_emulation.h"

// ---------------------------------------------------------------- CUDA types and intrinsics
#define __shared__ static  // block-scope shared arrays: one per kernel (CTAs run one at a time)
#define __grid_constant__
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
inline std::atomic<long long> tiles_fixed{0}, tiles_online{0};
inline void count_tile(bool fixed) { (fixed ? tiles_fixed : tiles_online)++; }
}  // namespace fwd_emulation

inline bool __any_sync(unsigned mask, bool v) {
  if (mask != 0xffffffffu) std::abort();
  return fwd_emulation::vote(v, false);
}
inline bool __all_sync(unsigned mask, bool v) {
  if (mask != 0xffffffffu) std::abort();
  return fwd_emulation::vote(v, true);
}

namespace binformer::cuda::fwd {

inline uint32_t smem_u32(const void* p) {
  const auto* base = fwd_emulation::smem_base();
  const auto* q = static_cast<const unsigned char*>(p);
  if (q < base || q >= base + (1 << 20)) std::abort();  // not a shared-memory pointer
  return uint32_t(q - base);
}
inline unsigned char* smem_ptr(uint32_t addr) { return fwd_emulation::smem_base() + addr; }

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

// ------------------------------------------------------------------ arithmetic
// ex2.approx.ftz.f32: 2^x with ~2^-22 relative error; subnormal results flush to 0.
inline float ex2_approx(float x) {
  const float y = float(std::exp2(double(x)));
  return std::fabs(y) < 1.17549435e-38f ? 0.0f : y;
}
inline uint32_t cvt_tf32(float) { std::abort(); }
inline uint32_t prmt(uint32_t, uint32_t, uint32_t) { std::abort(); }

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
