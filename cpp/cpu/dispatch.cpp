// Run-time ISA selection, the parallel_for hook and the public entry points.
#include <cpuid.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>

#include "internal.h"

namespace binformer::cpu {
namespace {

struct CpuFeatures {
  bool avx512_core = false;  // F + BW + VL + DQ + VPOPCNTDQ + FMA + F16C, zmm state enabled by the OS
  bool vnni = false;         // AVX512_VNNI (vpdpbusd)
  bool bf16 = false;         // AVX512_BF16 (vdpbf16ps, vcvtne2ps2bf16)
};

uint64_t read_xcr0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}

CpuFeatures detect_cpu_features() {
  CpuFeatures f;
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return f;
  const bool osxsave = ecx & (1u << 27), fma = ecx & (1u << 12), f16c = ecx & (1u << 29);
  if (!osxsave || !fma || !f16c) return f;
  // XCR0 bits 1, 2 (xmm, ymm), 5, 6, 7 (opmask, upper halves of zmm0-15, zmm16-31): the OS
  // saves and restores the AVX-512 state on context switches.
  if ((read_xcr0() & 0xe6u) != 0xe6u) return f;
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, eax, ebx, ecx, edx);
  const bool avx512f = ebx & (1u << 16), avx512dq = ebx & (1u << 17);
  const bool avx512bw = ebx & (1u << 30), avx512vl = ebx & (1u << 31);
  const bool vpopcntdq = ecx & (1u << 14);
  f.avx512_core = avx512f && avx512dq && avx512bw && avx512vl && vpopcntdq;
  f.vnni = f.avx512_core && (ecx & (1u << 11));
  const unsigned max_sub = eax;
  if (max_sub >= 1) {
    __cpuid_count(7, 1, eax, ebx, ecx, edx);
    f.bf16 = f.avx512_core && (eax & (1u << 5));
  }
  return f;
}

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect_cpu_features();
  return features;
}

// Comma-separated list in BINFORMER_CPU_DISABLE (read on every call, for tests): "vnni", "bf16",
// "tables" (the forward's score tables).
bool disabled_by_env(const char* feature) {
  const char* env = std::getenv("BINFORMER_CPU_DISABLE");
  if (!env) return false;
  const std::string list = std::string(",") + env + ",";
  return list.find(std::string(",") + feature + ",") != std::string::npos;
}

std::mutex& parallel_for_mutex() {
  static std::mutex m;
  return m;
}
ParallelFor& parallel_for_slot() {
  static ParallelFor pf;
  return pf;
}

}  // namespace

Isa active_isa() {
  const char* env = std::getenv("BINFORMER_CPU_ISA");
  if (env && std::strcmp(env, "scalar") == 0) return Isa::kScalar;
  return cpu_features().avx512_core ? Isa::kAvx512 : Isa::kScalar;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kScalar: return "scalar";
  }
  return "unknown";
}

namespace detail {
bool cpu_has_vnni() { return cpu_features().vnni && !disabled_by_env("vnni"); }
bool cpu_has_avx512_bf16() { return cpu_features().bf16 && !disabled_by_env("bf16"); }
bool cpu_score_tables_enabled() { return !disabled_by_env("tables"); }
int64_t serial_work_below() {
  const char* env = std::getenv("BINFORMER_CPU_SERIAL_BELOW");
  return env ? std::atoll(env) : int64_t(1) << 18;
}

void AlignedFree::operator()(void* ptr) const noexcept { std::free(ptr); }

void* aligned_alloc_bytes(size_t bytes) {
  const size_t rounded = (bytes + 63) / 64 * 64;
  void* ptr = std::aligned_alloc(64, rounded == 0 ? 64 : rounded);
  if (!ptr) throw std::bad_alloc();
  return ptr;
}
}  // namespace detail

void set_parallel_for(ParallelFor pf) {
  std::lock_guard<std::mutex> lock(parallel_for_mutex());
  parallel_for_slot() = std::move(pf);
}

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  ParallelFor pf;
  {
    std::lock_guard<std::mutex> lock(parallel_for_mutex());
    pf = parallel_for_slot();
  }
  if (pf && n > grain) {
    pf(n, grain < 1 ? 1 : grain, fn);
  } else {
    fn(0, n);
  }
}

void pack_sign(const PackSignParams& p) {
  if (active_isa() == Isa::kAvx512) return detail::pack_sign_avx512(p);
  detail::pack_sign_scalar(p);
}

void sign_matmul(const SignMatmulParams& p) {
  if (active_isa() == Isa::kAvx512) return detail::sign_matmul_avx512(p);
  detail::sign_matmul_scalar(p);
}

void attention_fwd(const AttentionFwdParams& p) {
  if (active_isa() == Isa::kAvx512) return detail::attention_fwd_avx512(p);
  detail::attention_fwd_scalar(p);
}

void quantize_v_int8(const QuantizeVParams& p) {
  if (active_isa() == Isa::kAvx512) return detail::quantize_v_int8_avx512(p);
  detail::quantize_v_int8_scalar(p);
}

void attention_bwd(const AttentionBwdParams& p) {
  if (active_isa() == Isa::kAvx512) return detail::attention_bwd_avx512(p);
  detail::attention_bwd_scalar(p);
}

}  // namespace binformer::cpu
