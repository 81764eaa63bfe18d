// Small helpers shared by the CUDA GoogleTests of pack_sign, sign_matmul and attention_bwd:
// RAII device buffers, error checks, and exact host decoding of fp16 / bf16 bit patterns (the
// references decode by hand so that they do not share code with the kernels).
#pragma once
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace binformer::test {

#define BF_ASSERT_CUDA(expr)                                                          \
  do {                                                                                \
    const cudaError_t bf_err_ = (expr);                                               \
    ASSERT_EQ(bf_err_, cudaSuccess) << #expr << ": " << cudaGetErrorString(bf_err_); \
  } while (0)

#define BF_EXPECT_CUDA(expr)                                                          \
  do {                                                                                \
    const cudaError_t bf_err_ = (expr);                                               \
    EXPECT_EQ(bf_err_, cudaSuccess) << #expr << ": " << cudaGetErrorString(bf_err_); \
  } while (0)

// True when a CUDA device of compute capability >= 8.0 is present (the kernels need sm_80+).
inline bool have_sm80_device() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) return false;
  int major = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0);
  return major >= 8;
}

#define BF_REQUIRE_GPU()                                              \
  do {                                                                \
    if (!::binformer::test::have_sm80_device()) {                     \
      GTEST_SKIP() << "no CUDA device of compute capability >= 8.0"; \
    }                                                                 \
  } while (0)

// A device allocation of n elements of T (plus optional guard elements after them).
template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n) { reset(n); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { release(); }

  cudaError_t reset(size_t n) {
    release();
    n_ = n;
    if (n == 0) return cudaSuccess;
    return cudaMalloc(reinterpret_cast<void**>(&ptr_), n * sizeof(T));
  }
  cudaError_t upload(const std::vector<T>& host, size_t offset = 0) {
    return cudaMemcpy(ptr_ + offset, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
  }
  cudaError_t download(std::vector<T>& host) const {
    host.resize(n_);
    return cudaMemcpy(host.data(), ptr_, n_ * sizeof(T), cudaMemcpyDeviceToHost);
  }
  // Fills every byte with `byte` (0xff gives NaN floats and -1 ints: a "poison" that no correct
  // result of these kernels equals bit for bit where a finite value is expected).
  cudaError_t poison(unsigned char byte = 0xff) {
    return n_ ? cudaMemset(ptr_, byte, n_ * sizeof(T)) : cudaSuccess;
  }
  T* get() const { return ptr_; }
  size_t size() const { return n_; }

 private:
  void release() {
    if (ptr_) cudaFree(ptr_);
    ptr_ = nullptr;
    n_ = 0;
  }
  T* ptr_ = nullptr;
  size_t n_ = 0;
};

// Exact value of an IEEE binary16 pattern.
inline double half_bits_to_double(uint16_t h) {
  const int sign = h >> 15, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  double v;
  if (exponent == 0x1f) {
    v = mantissa ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  } else if (exponent == 0) {
    v = std::ldexp(double(mantissa), -24);
  } else {
    v = std::ldexp(double(mantissa + 1024), exponent - 25);
  }
  return sign ? -v : v;
}

// Exact value of a bfloat16 pattern (the upper half of an fp32).
inline double bf16_bits_to_double(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return double(f);
}

inline double fp32_bits_to_double(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return double(f);
}

// Round-to-nearest-even conversions used to build fp16 / bf16 inputs on the host.
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline uint16_t float_to_half_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return uint16_t(sign | 0x7e00u);
  if (abs >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {                                  // below 2^-14: subnormal or zero
    // value = abs_float; subnormal step is 2^-24.
    float af;
    std::memcpy(&af, &abs, 4);
    const float scaled = af * 16777216.0f;  // exact multiply by 2^24
    const uint32_t m = uint32_t(std::nearbyint(scaled));  // ties to even (default rounding)
    return uint16_t(sign | m);
  }
  const uint32_t mantissa = abs & 0x7fffffu;
  const int exponent = int(abs >> 23) - 127 + 15;
  uint32_t h = (uint32_t(exponent) << 10) | (mantissa >> 13);
  const uint32_t rest = mantissa & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return uint16_t(sign | h);
}

}  // namespace binformer::test
