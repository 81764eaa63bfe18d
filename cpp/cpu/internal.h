// Internal declarations of the CPU kernels: the two implementations of every entry point
// (portable scalar C++ and AVX-512) and the small helpers both share.
//
// Files named *_avx512.cpp are compiled with AVX-512 flags (see CMakeLists.txt) and are only
// entered after active_isa() said the CPU and the OS support it. Everything they define, and
// every inline helper here, has internal linkage except the entry points declared here, so
// that no inline function or template instantiated with AVX-512 code can be merged by the
// linker with a portable copy of the same symbol (which would make the scalar path execute
// AVX-512 instructions on CPUs without them).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>

#include "binformer/cpu_kernels.h"

namespace binformer::cpu::detail {

// ------------------------------------------------------------------ entry points per ISA
void pack_sign_scalar(const PackSignParams& p);
void sign_matmul_scalar(const SignMatmulParams& p);
void attention_fwd_scalar(const AttentionFwdParams& p);
void attention_bwd_scalar(const AttentionBwdParams& p);
void quantize_v_int8_scalar(const QuantizeVParams& p);

void pack_sign_avx512(const PackSignParams& p);
void sign_matmul_avx512(const SignMatmulParams& p);
void attention_fwd_avx512(const AttentionFwdParams& p);
void attention_bwd_avx512(const AttentionBwdParams& p);
void quantize_v_int8_avx512(const QuantizeVParams& p);

// Optional AVX-512 extensions, detected once; BINFORMER_CPU_DISABLE=vnni,bf16 (read on every
// call) hides them so that tests can exercise the routes used on CPUs without them.
bool cpu_has_vnni();
bool cpu_has_avx512_bf16();
// The forward's score tables (attention_fwd_avx512.cpp, ScoreTables); "tables" in
// BINFORMER_CPU_DISABLE turns them off (tests of the polynomial route, A/B timing).
bool cpu_score_tables_enabled();

// Calls with less work than this (score elements, or element copies; ~0.1-0.3 ms) run on the
// calling thread: an OpenMP region costs ~10 us on an idle machine, but on a loaded one it waits
// for a worker that is not scheduled (measured: 16 ms for a 0.4 ms forward at load 70).
// BINFORMER_CPU_SERIAL_BELOW (read on every call) overrides the default 2^18; the chunking
// tests set 0.
int64_t serial_work_below();

// ------------------------------------------------------------------ scratch memory
// 64-byte aligned, uninitialised float/int scratch. Allocation lives in a portable TU.
struct AlignedFree {
  void operator()(void* ptr) const noexcept;
};
void* aligned_alloc_bytes(size_t bytes);  // never returns null (throws std::bad_alloc)

// Everything below is inline and used by both the portable and the AVX-512 translation units:
// internal linkage, so that each TU keeps the copy compiled with its own flags (with external
// linkage the linker would keep one of them, possibly an AVX-512 one, for every caller).
namespace {

template <class T>
using AlignedArray = std::unique_ptr<T[], AlignedFree>;

template <class T>
AlignedArray<T> make_aligned(size_t count) {
  return AlignedArray<T>(static_cast<T*>(aligned_alloc_bytes(count * sizeof(T) + 64)));
}

// ------------------------------------------------------------------ scalar dtype conversion
// IEEE binary16 <-> binary32, round to nearest even, subnormals, inf and NaN kept.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf / NaN (payload kept)
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;  // +-0
  } else {        // subnormal half: normalise
    int e = -1;
    do {
      mant <<= 1;
      ++e;
    } while ((mant & 0x400u) == 0);
    bits = sign | (uint32_t(112 - e) << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return uint16_t(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
  if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520: overflow to inf
  if (ax < 0x38800000u) {                                   // below 2^-14: half subnormal or zero
    // value = ax_float; half subnormal unit = 2^-24. Round-to-nearest-even of value / 2^-24.
    if (ax < 0x33000000u) return sign;  // < 2^-25: rounds to 0 (2^-25 ties to even 0)
    const uint32_t exp = ax >> 23;
    const uint32_t mant = (ax & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - exp;  // mant * 2^(exp-150) / 2^-24 = mant >> (126 - exp)
    uint32_t q = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u), halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (q & 1u))) ++q;
    return uint16_t(sign | q);
  }
  // normal: rebias exponent, round the 13 dropped mantissa bits to nearest even
  uint32_t r = ax + 0xfffu + ((ax >> 13) & 1u);
  r -= 0x38000000u;  // (127 - 15) << 23
  return uint16_t(sign | (r >> 13));
}

inline float bf16_to_float(uint16_t b) {
  const uint32_t bits = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t((x >> 16) | 0x40u);  // quiet NaN
  x += 0x7fffu + ((x >> 16) & 1u);                                          // nearest even
  return uint16_t(x >> 16);
}

// Element `index` of a float array of dtype kFloat32/kFloat16/kBFloat16, as fp32.
inline float load_as_float(const void* base, DType dtype, int64_t index) {
  switch (dtype) {
    case DType::kFloat16: return half_to_float(static_cast<const uint16_t*>(base)[index]);
    case DType::kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(base)[index]);
    default: return static_cast<const float*>(base)[index];
  }
}

inline void store_from_float(void* base, DType dtype, int64_t index, float value) {
  switch (dtype) {
    case DType::kFloat16: static_cast<uint16_t*>(base)[index] = float_to_half(value); break;
    case DType::kBFloat16: static_cast<uint16_t*>(base)[index] = float_to_bf16(value); break;
    default: static_cast<float*>(base)[index] = value; break;
  }
}

inline size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat16:
    case DType::kBFloat16: return 2;
    case DType::kInt8: return 1;
    default: return 4;
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Order in which the blocks of one (b, h) are handed to parallel_for: with causal masking the
// cost of a block grows (rows) or shrinks (keys) along the sequence, and parallel_for gives each
// thread a contiguous range of tasks, so blocks are interleaved from both ends (0, n-1, 1, n-2,
// ...) to give every contiguous range a balanced mix. A permutation of [0, n).
inline int64_t balanced_block(int64_t position, int64_t n) {
  return position % 2 == 0 ? position / 2 : n - 1 - position / 2;
}

// parallel_for grain for a call of `work` units (score elements, or element copies): the whole
// range as one chunk when the call is small, so that it runs on the calling thread.
inline int64_t grain_for_work(int64_t tasks, double work) {
  return work < double(serial_work_below()) ? std::max<int64_t>(tasks, 1) : 1;
}

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ------------------------------------------------------------------ relative-position bias
// For a query patch i and the keys of one grid row, idx(i, j) decreases by one per step of x_j,
// so in the table stored back to front ("reversed") those biases are a contiguous run. With
// T entries and rev[t] = table[T - 1 - t]:
//   bias(i, j) = rev[row_base(i) + kofs(j)],  kofs(j) = y_j * (2Ww - 1) + x_j  (j a patch),
//   row_base(i) = T - 1 - ((y_i + Wh - 1) * (2Ww - 1) + x_i + Ww - 1)          (i a patch),
// so a key block only needs one base per (query row, grid row) instead of one index per element.
// Cls rows and columns take the three trailing entries (see rel_pos_index in params.h).
struct RelPosGeometry {
  int wh = 0, ww = 0, num_prefix = 0;
  int64_t table_size = 0;  // T
  explicit RelPosGeometry(int wh_, int ww_, int prefix)
      : wh(wh_), ww(ww_), num_prefix(prefix), table_size(int64_t(2 * wh_ - 1) * (2 * ww_ - 1) + 3) {}

  // Writes bias(i, j) for j in [j0, j1) into dst[0 .. j1 - j0), from one head's table `table`
  // (stride 1) and its reversed copy. Runs of one grid row are contiguous copies of `reversed`.
  void expand_row(const float* table, const float* reversed, int64_t i, int64_t j0, int64_t j1,
                  float* dst) const {
    const int64_t T = table_size;
    int64_t j = j0;
    if (i < num_prefix) {  // cls query row: cls->cls for the prefix, cls->token for patches
      for (; j < j1 && j < num_prefix; ++j) dst[j - j0] = table[T - 1];
      const float v = table[T - 3];
      for (; j < j1; ++j) dst[j - j0] = v;
      return;
    }
    for (; j < j1 && j < num_prefix; ++j) dst[j - j0] = table[T - 2];  // token->cls
    if (j >= j1) return;
    const int64_t pi = i - num_prefix;
    const int64_t yi = pi / ww, xi = pi % ww;
    const int64_t base = T - 1 - ((yi + wh - 1) * (2 * ww - 1) + xi + ww - 1);
    int64_t pj = j - num_prefix;
    while (j < j1) {
      const int64_t yj = pj / ww, xj = pj % ww;
      const int64_t run = std::min<int64_t>(ww - xj, j1 - j);
      const float* src = reversed + base + yj * (2 * ww - 1) + xj;
      std::memcpy(dst + (j - j0), src, size_t(run) * sizeof(float));
      j += run;
      pj += run;
    }
  }

  // The adjoint of expand_row: reversed[T - 1 - idx(i, j)] += src[j - j0] for j in [j0, j1),
  // i.e. gradients accumulated in the reversed layout (cls entries included: they sit at the
  // reversed positions 0 = cls->cls, 1 = token->cls, 2 = cls->token). Sums run in ascending j.
  void accumulate_row(float* reversed, int64_t i, int64_t j0, int64_t j1, const float* src) const {
    const int64_t T = table_size;
    int64_t j = j0;
    if (i < num_prefix) {
      for (; j < j1 && j < num_prefix; ++j) reversed[0] += src[j - j0];
      for (; j < j1; ++j) reversed[2] += src[j - j0];
      return;
    }
    for (; j < j1 && j < num_prefix; ++j) reversed[1] += src[j - j0];
    if (j >= j1) return;
    const int64_t pi = i - num_prefix;
    const int64_t yi = pi / ww, xi = pi % ww;
    const int64_t base = T - 1 - ((yi + wh - 1) * (2 * ww - 1) + xi + ww - 1);
    int64_t pj = j - num_prefix;
    while (j < j1) {
      const int64_t yj = pj / ww, xj = pj % ww;
      const int64_t run = std::min<int64_t>(ww - xj, j1 - j);
      float* dst = reversed + base + yj * (2 * ww - 1) + xj;
      const float* s = src + (j - j0);
      for (int64_t t = 0; t < run; ++t) dst[t] += s[t];
      j += run;
      pj += run;
    }
  }
};

}  // namespace
}  // namespace binformer::cpu::detail
