// Torch-free CPU kernels. AVX-512 (VPOPCNTQ, FMA, VNNI) or a portable scalar fallback,
// chosen at run time from CPUID; BINFORMER_CPU_ISA=scalar forces the fallback.
#pragma once
#include <cstdint>
#include <functional>

#include "binformer/params.h"

namespace binformer::cpu {

enum class Isa { kScalar, kAvx512 };

// The ISA the kernels use now: the best the CPU supports unless BINFORMER_CPU_ISA says
// "scalar" (read at each call, so tests can switch).
Isa active_isa();
const char* isa_name(Isa isa);

// Work splitting hook: fn(begin, end) over [0, n) in chunks of at least `grain`.
// The torch binding installs at::parallel_for (torch's thread pool); the default runs serially.
using ParallelFor = std::function<void(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn)>;
void set_parallel_for(ParallelFor pf);
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

void pack_sign(const PackSignParams& p);
void sign_matmul(const SignMatmulParams& p);
void attention_fwd(const AttentionFwdParams& p);
void attention_bwd(const AttentionBwdParams& p);

// pv_int8's V quantizer (BinaryAttention): per (b, h, channel) over the tokens,
//   dequant = amax_n |V| / 127 (fp32; NaN if any V is NaN),
//   v_q = clamp(round_half_even(V / dequant), -127, 127) with NaN -> 0 (+-inf -> +-127),
// bit for bit the fp32 torch ops the reference uses (binformer.reference.quantize_v_int8):
// fp32 division, not a multiplication by 127 / amax.
struct QuantizeVParams {
  int64_t B = 0, H = 0, N = 0;
  int dv = 0;
  const void* v = nullptr;     // [B, H, N, dv] fp32 / fp16 / bf16, channels contiguous
  DType v_dtype = DType::kFloat32;
  int64_t v_stride[3] = {0, 0, 0};  // elements, for B, H, N
  int8_t* v_q = nullptr;       // [B, H, N, dv] contiguous
  float* dequant = nullptr;    // [B, H, dv] contiguous
};
void quantize_v_int8(const QuantizeVParams& p);

}  // namespace binformer::cpu
