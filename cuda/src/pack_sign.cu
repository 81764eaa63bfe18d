// pack_sign: fp32 / fp16 / bf16 [rows, d] -> uint32 [rows, words_for(d)] sign bits.
//
// Layout (SPEC.md section 2): bit = !(x < 0), so +0, -0 and NaN give 1; element c of a row goes
// to bit c % 32 of word c / 32; the pad bits of a row's last word are 0.
//
// The op is one memory-bound pass (reads 16 or 32 bits per element, writes 1), so everything is
// about the read stream: 16-byte loads, each warp load instruction covering 512 contiguous bytes,
// and one warp keeping 4 (16-bit types: 2 x 4) such loads in flight before it touches any.
//
// Vector path (x 16-byte aligned and d * sizeof(T) a multiple of 16, so that every row starts on
// a 16-byte boundary): a warp produces a "tile" of 32 consecutive output words. A 16-byte vector
// holds E = 16 / sizeof(T) elements (4 fp32, 8 fp16), so one output word is spread over
// L = 32 / E lanes (8 or 4). Load i (of L) of a tile gives lane l the vector of word
// i * E + l / L, part l % L; each lane turns its vector into E bits, shifts them to their place in
// the word and the L lanes of a word OR their parts together with log2(L) xor-shuffles. The lane
// whose part index equals i keeps that word, so after the L loads the 32 lanes hold the 32 words
// of the tile (as a permutation of the lanes), which they store with one coalesced 128-byte write.
// When d % 32 == 0 a word's elements are contiguous in the flat input and the load addresses of a
// warp are 512 contiguous bytes; otherwise each word is mapped to its (row, word-in-row) with a
// multiply-shift division and the vectors past d contribute no bits (the pad).
//
// Scalar path (any alignment): a warp builds one word per step from 32 element loads (lane c
// loads element c of the word) and a __ballot_sync, 32 words per tile, all 32 loads issued before
// the first ballot.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "binformer/cuda_kernels.h"

namespace binformer::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------- the sign rule on raw bits
// x < 0 holds exactly for the bit patterns from "negative, smallest magnitude" up to -inf:
// [sign | 1, sign | inf]. -0 (= sign | 0) and the negative NaNs (above -inf) lie outside, which
// gives bit 1 for them as the layout requires. One subtraction and one unsigned compare.
struct Fp32Sign {
  using Storage = uint32_t;
  static __device__ __forceinline__ uint32_t nonneg(uint32_t u) {
    return (u - 0x80000001u) > (0xff800000u - 0x80000001u) ? 1u : 0u;
  }
};
struct Fp16Sign {
  using Storage = uint16_t;
  static __device__ __forceinline__ uint32_t nonneg(uint32_t h) {  // h: 16 significant bits
    return ((h - 0x8001u) & 0xffffu) > (0xfc00u - 0x8001u) ? 1u : 0u;
  }
};
struct Bf16Sign {
  using Storage = uint16_t;
  static __device__ __forceinline__ uint32_t nonneg(uint32_t h) {
    return ((h - 0x8001u) & 0xffffu) > (0xff80u - 0x8001u) ? 1u : 0u;
  }
};

// Bits of the E elements in a 16-byte vector, element e at bit e.
template <class Sign>
__device__ __forceinline__ uint32_t vector_sign_bits(const uint4& v) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  uint32_t bits = 0;
  if constexpr (sizeof(typename Sign::Storage) == 4) {
#pragma unroll
    for (int e = 0; e < 4; ++e) bits |= Sign::nonneg(w[e]) << e;
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      bits |= Sign::nonneg(w[e] & 0xffffu) << (2 * e);
      bits |= Sign::nonneg(w[e] >> 16) << (2 * e + 1);
    }
  }
  return bits;
}

template <class Sign>
__device__ __forceinline__ uint32_t scalar_sign_bit(typename Sign::Storage s) {
  return Sign::nonneg(static_cast<uint32_t>(s));
}

// ---------------------------------------------------------------- word index -> (row, word)
// Division by the run-time words-per-row: multiply-shift (Granlund-Montgomery) for dividends
// below 2^31, exact 64-bit division beyond (only for outputs of more than 2^31 words).
struct WordDivider {
  int64_t divisor;
  uint32_t multiplier;
  uint32_t shift;
  bool use_magic;

  static WordDivider make(int divisor, int64_t max_dividend) {
    WordDivider w{divisor, 0u, 0u, max_dividend < (int64_t(1) << 31)};
    uint32_t s = 0;
    while ((int64_t(1) << s) < divisor) ++s;
    w.shift = s;
    w.multiplier = uint32_t(((uint64_t(1) << 32) * ((uint64_t(1) << s) - uint64_t(divisor))) /
                            uint64_t(divisor) + 1);
    return w;
  }
  __device__ __forceinline__ int64_t quotient(int64_t n) const {
    if (use_magic) {
      const uint32_t n32 = uint32_t(n);
      return int64_t((__umulhi(n32, multiplier) + n32) >> shift);
    }
    return n / divisor;
  }
};

// ---------------------------------------------------------------- vector path
template <class T, class Sign, bool kWordAligned>
__global__ void __launch_bounds__(kThreads)
pack_sign_vector_kernel(const T* __restrict__ x, uint32_t* __restrict__ out, int64_t total_words,
                        int d, int words_per_row, WordDivider row_of_word) {
  constexpr int kElems = 16 / int(sizeof(T));      // E: elements per 16-byte vector
  constexpr int kLanesPerWord = 32 / kElems;       // L
  constexpr int kLoadsPerTile = kLanesPerWord;     // L loads of E words each = 32 words
  constexpr int kTilesPerStep = 8 / kLoadsPerTile; // keep 8 x 16 bytes in flight per lane

  const int lane = threadIdx.x & 31;
  const int part = lane % kLanesPerWord;           // which E-element slice of its word
  const int word_in_load = lane / kLanesPerWord;   // which of the E words of one load
  const int64_t num_tiles = (total_words + 31) / 32;
  const int64_t warp_id = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  const int64_t warp_stride = int64_t(gridDim.x) * kWarpsPerBlock;

  for (int64_t tile0 = warp_id * kTilesPerStep; tile0 < num_tiles;
       tile0 += warp_stride * kTilesPerStep) {
    uint4 vec[kTilesPerStep][kLoadsPerTile];
    bool valid[kTilesPerStep][kLoadsPerTile];
#pragma unroll
    for (int t = 0; t < kTilesPerStep; ++t) {
#pragma unroll
      for (int i = 0; i < kLoadsPerTile; ++i) {
        const int64_t word = (tile0 + t) * 32 + i * kElems + word_in_load;
        int64_t elem;
        bool ok = word < total_words;
        if constexpr (kWordAligned) {
          elem = word * 32 + part * kElems;
        } else {
          const int64_t row = row_of_word.quotient(word);
          const int col = int(word - row * words_per_row) * 32 + part * kElems;
          ok = ok && col < d;  // d % E == 0: a vector lies wholly inside or wholly in the pad
          elem = row * d + col;
        }
        valid[t][i] = ok;
        vec[t][i] = ok ? __ldcs(reinterpret_cast<const uint4*>(x + elem)) : make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int t = 0; t < kTilesPerStep; ++t) {
      uint32_t kept = 0;
#pragma unroll
      for (int i = 0; i < kLoadsPerTile; ++i) {
        uint32_t bits = valid[t][i] ? vector_sign_bits<Sign>(vec[t][i]) << (part * kElems) : 0u;
#pragma unroll
        for (int m = 1; m < kLanesPerWord; m <<= 1) bits |= __shfl_xor_sync(kFullMask, bits, m);
        if (part == i) kept = bits;
      }
      // Lane (word_in_load, part) kept word part * E + word_in_load of the tile.
      const int64_t word = (tile0 + t) * 32 + part * kElems + word_in_load;
      if (word < total_words) out[word] = kept;
    }
  }
}

// ---------------------------------------------------------------- scalar path (any alignment)
template <class T, class Sign>
__global__ void __launch_bounds__(kThreads)
pack_sign_scalar_kernel(const T* __restrict__ x, uint32_t* __restrict__ out, int64_t total_words,
                        int d, int words_per_row, WordDivider row_of_word) {
  using Storage = typename Sign::Storage;
  const Storage* xs = reinterpret_cast<const Storage*>(x);
  const int lane = threadIdx.x & 31;
  const int64_t num_tiles = (total_words + 31) / 32;
  const int64_t warp_id = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  const int64_t warp_stride = int64_t(gridDim.x) * kWarpsPerBlock;

  for (int64_t tile = warp_id; tile < num_tiles; tile += warp_stride) {
    // Bit j of lane_bits: the sign bit of element `lane` of word j of the tile. The 32 loads are
    // independent of each other, so they are all in flight before the first compare needs one.
    uint32_t lane_bits = 0;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const int64_t word = tile * 32 + j;
      const int64_t row = row_of_word.quotient(word);
      const int col = int(word - row * words_per_row) * 32 + lane;
      const bool valid = word < total_words && col < d;
      const Storage v = valid ? xs[row * d + col] : Storage(0);
      lane_bits |= (valid ? scalar_sign_bit<Sign>(v) : 0u) << j;
    }
    uint32_t kept = 0;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const uint32_t word_bits = __ballot_sync(kFullMask, (lane_bits >> j) & 1u);
      if (lane == j) kept = word_bits;
    }
    const int64_t word = tile * 32 + lane;
    if (word < total_words) out[word] = kept;
  }
}

int grid_for(int64_t warps_wanted) {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    sms = 132;
  }
  const int64_t blocks = (warps_wanted + kWarpsPerBlock - 1) / kWarpsPerBlock;
  // A persistent-ish grid: 8 blocks of 256 threads fill an SM; more only adds tail waves.
  const int64_t cap = int64_t(sms) * 8;
  return int(blocks < cap ? (blocks < 1 ? 1 : blocks) : cap);
}

template <class T, class Sign>
cudaError_t launch(const PackSignParams& p, cudaStream_t stream) {
  const int words_per_row = words_for(p.d);
  const int64_t total_words = p.rows * words_per_row;
  // Tail warps compute (and then discard) word indices up to a few tiles past the end.
  const WordDivider divider = WordDivider::make(words_per_row, total_words + 64 * 32);
  constexpr int kElems = 16 / int(sizeof(T));
  const bool aligned16 = (reinterpret_cast<uintptr_t>(p.x) % 16 == 0) && (p.d % kElems == 0);
  const T* x = static_cast<const T*>(p.x);
  const int64_t tiles = (total_words + 31) / 32;
  if (aligned16) {
    constexpr int kTilesPerStep = 8 / (32 / kElems);
    const int grid = grid_for((tiles + kTilesPerStep - 1) / kTilesPerStep);
    if (p.d % 32 == 0) {
      pack_sign_vector_kernel<T, Sign, true>
          <<<grid, kThreads, 0, stream>>>(x, p.out, total_words, p.d, words_per_row, divider);
    } else {
      pack_sign_vector_kernel<T, Sign, false>
          <<<grid, kThreads, 0, stream>>>(x, p.out, total_words, p.d, words_per_row, divider);
    }
  } else {
    pack_sign_scalar_kernel<T, Sign>
        <<<grid_for(tiles), kThreads, 0, stream>>>(x, p.out, total_words, p.d, words_per_row, divider);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t pack_sign(const PackSignParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.d < 0) return cudaErrorInvalidValue;
  if (p.rows == 0 || p.d == 0) return cudaSuccess;
  if (p.x == nullptr || p.out == nullptr) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kFloat32: return launch<float, Fp32Sign>(p, stream);
    case DType::kFloat16: return launch<__half, Fp16Sign>(p, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16, Bf16Sign>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace binformer::cuda
