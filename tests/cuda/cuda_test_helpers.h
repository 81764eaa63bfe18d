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

#include "host_float_bits.h"

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

}  // namespace binformer::test
