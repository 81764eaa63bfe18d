// Launch template of the forward kernel; included only by the generated instantiation files.
#pragma once
#include <climits>

#include "fwd_api.h"
#include "kernel.h"

namespace binformer::cuda::fwd {

template <class Tr, bool kPerTokenK>
cudaError_t launch_attention_fwd(FwdArgs args, cudaStream_t stream) {
  auto kernel = attention_fwd_kernel<Tr, kPerTokenK>;
  args.num_m_blocks = ceil_div_c(args.Nq, Tr::kBlockM);
  if ((long long)args.num_m_blocks * args.B * args.H > INT_MAX) return cudaErrorInvalidConfiguration;
  size_t smem = Tr::kSmemFixed;
  if (Tr::kHasBias && args.relpos_table != nullptr && args.relpos_in_smem) {
    smem += (size_t(args.relpos_table_size) * sizeof(float) + 15) / 16 * 16;
  }
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
  }
  const long long blocks = (long long)args.num_m_blocks * args.B * args.H;
  kernel<<<dim3(unsigned(blocks)), Tr::kThreads, smem, stream>>>(args);
  return cudaGetLastError();
}

template <int kDvPad, PvKind kPv, bool kDvMasked>
cudaError_t run_attention_fwd(FwdArgs args, cudaStream_t stream) {
  if (args.dv > kDvPad || (!kDvMasked && args.dv != kDvPad)) return cudaErrorInvalidValue;
  const bool has_bias = args.bias != nullptr || args.relpos_table != nullptr;
  const bool per_token_k = args.k_scale_abs != nullptr;
  if (has_bias) {
    using Tr = FwdTraits<kDvPad, kPv, kDvMasked, true>;
    return per_token_k ? launch_attention_fwd<Tr, true>(args, stream)
                       : launch_attention_fwd<Tr, false>(args, stream);
  }
  using Tr = FwdTraits<kDvPad, kPv, kDvMasked, false>;
  return per_token_k ? launch_attention_fwd<Tr, true>(args, stream)
                     : launch_attention_fwd<Tr, false>(args, stream);
}

}  // namespace binformer::cuda::fwd
