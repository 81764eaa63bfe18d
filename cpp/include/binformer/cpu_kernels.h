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

}  // namespace binformer::cpu
