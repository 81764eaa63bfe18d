// Launch templates of the forward kernels; included only by the generated instantiation files.
#pragma once
#include <climits>

#include "fwd_api.h"
#include "kernel.h"
#include "kernel_bounded.h"

namespace binformer::cuda::fwd {

// BINFORMER_FWD_BOUNDED=0 (a measurement / fallback knob) runs every configuration on the
// online kernels of kernel.h.
#ifndef BINFORMER_FWD_BOUNDED
#define BINFORMER_FWD_BOUNDED 1
#endif

// The bounded kernels keep the rel-pos table window of a block in shared memory; windows above
// this size (very large grids) run the online bias kernel, which reads the table through L1.
inline constexpr int kBoundedRelPosWindowCapBytes = 64 * 1024;

template <class Tr, class Kernel>
cudaError_t launch_kernel(Kernel kernel, FwdArgs& args, size_t smem, cudaStream_t stream) {
  args.num_m_blocks = ceil_div_c(args.Nq, Tr::kBlockM);
  if ((long long)args.num_m_blocks * args.B * args.H > INT_MAX) return cudaErrorInvalidConfiguration;
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
  }
  const long long blocks = (long long)args.num_m_blocks * args.B * args.H;
  kernel<<<dim3(unsigned(blocks)), Tr::kThreads, smem, stream>>>(args);
  return cudaGetLastError();
}

template <class Tr, bool kPerTokenK>
cudaError_t launch_attention_fwd(FwdArgs args, cudaStream_t stream) {
  size_t smem = Tr::kSmemFixed;
  if (Tr::kHasBias && args.relpos_table != nullptr && args.relpos_in_smem) {
    smem += (size_t(args.relpos_table_size) * sizeof(float) + 15) / 16 * 16;
  }
  return launch_kernel<Tr>(attention_fwd_kernel<Tr, kPerTokenK>, args, smem, stream);
}

// Floats of the largest rel-pos window (plus the 3 cls entries) over the blocks of kBlockM rows.
inline int relpos_window_floats(const FwdArgs& args, int block_m) {
  int most = 0;
  for (int m0 = 0; m0 < args.Nq; m0 += block_m) {
    const RelPosWindow w = fwd_relpos_window(m0, block_m, args.Nq, args.relpos_prefix,
                                             args.relpos_wh, args.relpos_ww);
    most = w.len > most ? w.len : most;
  }
  return most + 3;
}

template <class Tr>
cudaError_t launch_bounded(FwdArgs args, cudaStream_t stream) {
  size_t smem = Tr::kSmemFixed;
  if (Tr::kBoundedRelPos) smem += (size_t(args.relpos_window) * sizeof(float) + 15) / 16 * 16;
  return launch_kernel<Tr>(attention_fwd_bounded_kernel<Tr>, args, smem, stream);
}

template <int kDvPad, PvKind kPv, bool kDvMasked, bool kRelPos, bool kWide>
cudaError_t run_bounded_qk(FwdArgs args, cudaStream_t stream) {
  if (args.d <= 64) {
    return launch_bounded<FwdTraits<kDvPad, kPv, kDvMasked, false, QK::kDup128, kRelPos, kWide>>(args, stream);
  }
  if (args.d <= 128) {
    return launch_bounded<FwdTraits<kDvPad, kPv, kDvMasked, false, QK::kK128, kRelPos, kWide>>(args, stream);
  }
  return launch_bounded<FwdTraits<kDvPad, kPv, kDvMasked, false, QK::kK256, kRelPos, kWide>>(args, stream);
}

// fp16/bf16 V without a dense bias and without a per-token k scale: the bounded-max kernels
// (kernel_bounded.h), one per QK^T form (d <= 64 / 128 / 256), with or without the rel-pos bias.
// Returns false (nothing launched) when the rel-pos window does not fit in shared memory.
template <int kDvPad, PvKind kPv, bool kDvMasked, bool kRelPos>
cudaError_t run_bounded(FwdArgs args, cudaStream_t stream, bool& launched) {
  using Probe = FwdTraits<kDvPad, kPv, kDvMasked, false, QK::kK256, kRelPos>;
  if (kRelPos) {
    args.relpos_window = relpos_window_floats(args, Probe::kBlockM);
    if (size_t(args.relpos_window) * sizeof(float) > size_t(kBoundedRelPosWindowCapBytes)) {
      launched = false;
      return cudaSuccess;
    }
  }
  launched = true;
  // Dv <= 64 without rel-pos: the 4-warp shape for long key ranges (tile_config.h).
  if constexpr (kDvPad <= 64 && !kRelPos) {
    if (args.Nk > BINFORMER_FWD_BOUNDED_WIDE_MAX_NK) {
      return run_bounded_qk<kDvPad, kPv, kDvMasked, false, false>(args, stream);
    }
  }
  return run_bounded_qk<kDvPad, kPv, kDvMasked, kRelPos, true>(args, stream);
}

template <int kDvPad, PvKind kPv, bool kDvMasked>
cudaError_t run_attention_fwd(FwdArgs args, cudaStream_t stream) {
  if (args.dv > kDvPad || (!kDvMasked && args.dv != kDvPad)) return cudaErrorInvalidValue;
  const bool dense_bias = args.bias != nullptr;
  const bool relpos = args.relpos_table != nullptr;
  const bool per_token_k = args.k_scale_abs != nullptr;
  if constexpr (BINFORMER_FWD_BOUNDED && (kPv == PvKind::kF16 || kPv == PvKind::kBF16)) {
    if (!dense_bias && !per_token_k) {
      bool launched = false;
      const cudaError_t err =
          relpos ? run_bounded<kDvPad, kPv, kDvMasked, true>(args, stream, launched)
                 : run_bounded<kDvPad, kPv, kDvMasked, false>(args, stream, launched);
      if (launched || err != cudaSuccess) return err;
    }
  }
  if (dense_bias || relpos) {
    using Tr = FwdTraits<kDvPad, kPv, kDvMasked, true>;
    return per_token_k ? launch_attention_fwd<Tr, true>(args, stream)
                       : launch_attention_fwd<Tr, false>(args, stream);
  }
  using Tr = FwdTraits<kDvPad, kPv, kDvMasked, false>;
  if constexpr (BINFORMER_FWD_BOUNDED && (kPv == PvKind::kF16 || kPv == PvKind::kBF16)) {
    // Without bias and per-token k these always run bounded: only the per-token variant.
    return per_token_k ? launch_attention_fwd<Tr, true>(args, stream) : cudaErrorNotSupported;
  } else {
    return per_token_k ? launch_attention_fwd<Tr, true>(args, stream)
                       : launch_attention_fwd<Tr, false>(args, stream);
  }
}

}  // namespace binformer::cuda::fwd
