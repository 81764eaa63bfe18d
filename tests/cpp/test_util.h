// Shared helpers of the CPU kernel tests: independent fp16/bf16 conversions, random tensors in
// any of the kernels' dtypes and layouts, ISA switching, and float64 references of the math in
// docs/CONTRACT.md written as plainly as possible (no blocking, no online softmax).
#pragma once
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "binformer/cpu_kernels.h"
#include "binformer/params.h"

namespace bt {

using binformer::DType;

// ------------------------------------------------------------------ fp16 / bf16 (independent of
// the library's helpers: computed through double arithmetic and nearbyint, i.e. round to
// nearest even under the default rounding mode).
inline uint16_t to_half(float f) {
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  if (std::isnan(f)) return 0x7e00;
  const double a = std::fabs(double(f));
  if (a == 0) return sign;
  if (a < std::ldexp(1.0, -14)) {  // subnormal range: multiples of 2^-24
    const double q = std::nearbyint(a / std::ldexp(1.0, -24));
    return uint16_t(sign | uint16_t(q));  // q == 1024 is exactly the smallest normal
  }
  int e;
  std::frexp(a, &e);  // a = m 2^e, m in [0.5, 1): exponent of the leading bit is e - 1
  double q = std::nearbyint(a / std::ldexp(1.0, e - 11));  // 11 significant bits
  int E = e - 1;
  if (q >= 2048) { q /= 2; ++E; }
  if (E > 15) return uint16_t(sign | 0x7c00);
  return uint16_t(sign | ((E + 15) << 10) | (uint16_t(q) - 1024));
}

inline float from_half(uint16_t h) {
  const int e = (h >> 10) & 31, m = h & 1023;
  const double sign = (h & 0x8000) ? -1.0 : 1.0;
  if (e == 31) return m ? std::numeric_limits<float>::quiet_NaN() : float(sign * INFINITY);
  if (e == 0) return float(sign * std::ldexp(double(m), -24));
  return float(sign * std::ldexp(double(1024 + m), e - 25));
}

inline uint16_t to_bf16(float f) {
  if (std::isnan(f)) return std::signbit(f) ? 0xffc0 : 0x7fc0;
  const double a = std::fabs(double(f));
  double r = 0;
  if (a != 0 && std::isfinite(a)) {
    int e;
    std::frexp(a, &e);
    const double ulp = std::max(std::ldexp(1.0, e - 8), std::ldexp(1.0, -133));  // 8 significant bits
    r = std::nearbyint(a / ulp) * ulp;
  } else {
    r = a;
  }
  float rf = float(std::signbit(f) ? -r : r);  // exact (or overflow to inf, which is right)
  uint32_t bits;
  std::memcpy(&bits, &rf, 4);
  return uint16_t(bits >> 16);
}

inline float from_bf16(uint16_t b) {
  const uint32_t bits = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Rounds to what a tensor of `dtype` stores.
inline float quantize(float x, DType dtype) {
  if (dtype == DType::kFloat16) return from_half(to_half(x));
  if (dtype == DType::kBFloat16) return from_bf16(to_bf16(x));
  return x;
}

// ------------------------------------------------------------------ tensors
// A 4-D tensor [B, H, N, X] stored in `dtype` with element strides; value() is the stored
// value as double (what the reference must use).
struct Tensor4 {
  int64_t dims[4] = {0, 0, 0, 0};
  int64_t strides[4] = {0, 0, 0, 1};
  DType dtype = DType::kFloat32;
  std::vector<uint8_t> storage;

  size_t elem_size() const {
    return dtype == DType::kFloat16 || dtype == DType::kBFloat16 ? 2 : dtype == DType::kInt8 ? 1 : 4;
  }
  int64_t offset(int64_t a, int64_t b, int64_t c, int64_t d) const {
    return a * strides[0] + b * strides[1] + c * strides[2] + d * strides[3];
  }
  double value(int64_t a, int64_t b, int64_t c, int64_t d) const {
    const int64_t o = offset(a, b, c, d);
    switch (dtype) {
      case DType::kFloat16: return from_half(reinterpret_cast<const uint16_t*>(storage.data())[o]);
      case DType::kBFloat16: return from_bf16(reinterpret_cast<const uint16_t*>(storage.data())[o]);
      case DType::kInt8: return reinterpret_cast<const int8_t*>(storage.data())[o];
      case DType::kBits: return double(reinterpret_cast<const uint32_t*>(storage.data())[o]);
      default: return reinterpret_cast<const float*>(storage.data())[o];
    }
  }
  void set(int64_t a, int64_t b, int64_t c, int64_t d, float x) {
    const int64_t o = offset(a, b, c, d);
    switch (dtype) {
      case DType::kFloat16: reinterpret_cast<uint16_t*>(storage.data())[o] = to_half(x); break;
      case DType::kBFloat16: reinterpret_cast<uint16_t*>(storage.data())[o] = to_bf16(x); break;
      case DType::kInt8: reinterpret_cast<int8_t*>(storage.data())[o] = int8_t(x); break;
      default: reinterpret_cast<float*>(storage.data())[o] = x; break;
    }
  }
  const void* data() const { return storage.data(); }
  void* data() { return storage.data(); }
};

// Layout of the first three dims: kBHN (contiguous), kBNH (heads interleaved, as a [B, N, H, X]
// tensor viewed as [B, H, N, X]), or broadcast dims (stride 0) listed in `broadcast_mask`
// (bit k set: dim k has size 1 in memory).
enum class Layout { kBHN, kBNH };

inline Tensor4 make_tensor(const int64_t (&dims)[4], DType dtype, Layout layout = Layout::kBHN,
                           unsigned broadcast_mask = 0) {
  Tensor4 t;
  for (int i = 0; i < 4; ++i) t.dims[i] = dims[i];
  t.dtype = dtype;
  int64_t mem[4];
  for (int i = 0; i < 4; ++i) mem[i] = (broadcast_mask >> i) & 1u ? 1 : dims[i];
  // strides in memory order
  if (layout == Layout::kBHN) {
    t.strides[3] = 1;
    t.strides[2] = mem[3];
    t.strides[1] = mem[2] * mem[3];
    t.strides[0] = mem[1] * mem[2] * mem[3];
  } else {
    t.strides[3] = 1;
    t.strides[1] = mem[3];
    t.strides[2] = mem[1] * mem[3];
    t.strides[0] = mem[1] * mem[2] * mem[3];
  }
  for (int i = 0; i < 4; ++i)
    if ((broadcast_mask >> i) & 1u) t.strides[i] = 0;
  t.storage.assign(size_t(mem[0] * mem[1] * mem[2] * mem[3]) * t.elem_size(), 0);
  return t;
}

template <class F>
void fill(Tensor4& t, F&& gen) {
  for (int64_t a = 0; a < t.dims[0]; ++a)
    for (int64_t b = 0; b < t.dims[1]; ++b)
      for (int64_t c = 0; c < t.dims[2]; ++c)
        for (int64_t d = 0; d < t.dims[3]; ++d) t.set(a, b, c, d, gen(a, b, c, d));
}

// Sign bit of the layout rule: 1 = +1, i.e. !(x < 0) (+0, -0 and NaN give 1).
inline bool sign_bit(double x) { return !(x < 0); }

// Reference packing of one row of `d` values.
inline std::vector<uint32_t> pack_row(const std::vector<double>& x) {
  const int d = int(x.size());
  std::vector<uint32_t> w(size_t((d + 31) / 32), 0u);
  for (int c = 0; c < d; ++c)
    if (sign_bit(x[c])) w[size_t(c / 32)] |= 1u << (c % 32);
  return w;
}

// ------------------------------------------------------------------ ISA switching
// Sets BINFORMER_CPU_ISA / BINFORMER_CPU_DISABLE for the lifetime of the object.
// "scalar", "avx512", "avx512-base" (AVX-512 without the VNNI and BF16 routes, and without the
// forward's score tables: every no-bias case then also runs the polynomial exp route).
class IsaScope {
 public:
  explicit IsaScope(const std::string& name) {
    save("BINFORMER_CPU_ISA", isa_);
    save("BINFORMER_CPU_DISABLE", disable_);
    if (name == "scalar") {
      setenv("BINFORMER_CPU_ISA", "scalar", 1);
      unsetenv("BINFORMER_CPU_DISABLE");
    } else {
      unsetenv("BINFORMER_CPU_ISA");
      if (name == "avx512-base") setenv("BINFORMER_CPU_DISABLE", "vnni,bf16,tables", 1);
      else unsetenv("BINFORMER_CPU_DISABLE");
    }
  }
  ~IsaScope() {
    restore("BINFORMER_CPU_ISA", isa_);
    restore("BINFORMER_CPU_DISABLE", disable_);
  }

 private:
  struct Saved { bool set = false; std::string value; };
  static void save(const char* k, Saved& s) {
    const char* v = std::getenv(k);
    s.set = v != nullptr;
    if (v) s.value = v;
  }
  static void restore(const char* k, const Saved& s) {
    if (s.set) setenv(k, s.value.c_str(), 1);
    else unsetenv(k);
  }
  Saved isa_, disable_;
};

inline bool cpu_has_avx512() {
  IsaScope scope("avx512");
  return binformer::cpu::active_isa() == binformer::cpu::Isa::kAvx512;
}

// The ISA names every kernel test runs under.
inline std::vector<std::string> isa_names() { return {"scalar", "avx512", "avx512-base"}; }

#define BT_SKIP_IF_NO_ISA(name)                                               \
  do {                                                                        \
    if ((name) != "scalar" && !bt::cpu_has_avx512()) GTEST_SKIP() << "no AVX-512"; \
  } while (0)

// ------------------------------------------------------------------ parallel_for for tests
// Runs fn over [0, n) in `chunks` contiguous pieces of uneven size on std::threads.
void install_thread_parallel_for(int chunks);
void install_serial_parallel_for();

}  // namespace bt
