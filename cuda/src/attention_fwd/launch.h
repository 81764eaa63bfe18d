// Launch templates of the forward kernels; included only by the generated instantiation files.
#pragma once
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "../sm90_support.h"
#include "fwd_api.h"
#include "kernel.h"
#include "kernel_bounded.h"
#include "tma_desc.h"

namespace binformer::cuda::fwd {

// BINFORMER_FWD_BOUNDED=0 (a measurement / fallback knob) runs every configuration on the
// online kernels of kernel.h.
#ifndef BINFORMER_FWD_BOUNDED
#define BINFORMER_FWD_BOUNDED 1
#endif

// The bounded kernels keep the rel-pos table window of a block in shared memory; windows above
// this size (very large grids) run the online bias kernel, which reads the table through L1.
inline constexpr int kBoundedRelPosWindowCapBytes = 64 * 1024;

// One launch of a forward kernel. With args.pdl (attention_fwd.cu: right after the K pre-pass on
// sm_90+) as a programmatic dependent launch: its blocks may start while the pre-pass's last
// blocks run, and wait for the workspace at griddep_wait (launch_overlap.h).
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
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(unsigned(blocks));
  config.blockDim = dim3(Tr::kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attr;
  config.numAttrs = args.pdl ? 1 : 0;
  const cudaError_t err = cudaLaunchKernelEx(&config, kernel, args);
  return err != cudaSuccess ? err : cudaGetLastError();
}

template <class Tr, bool kPerTokenK>
cudaError_t launch_attention_fwd(FwdArgs args, cudaStream_t stream) {
  size_t smem = Tr::kSmemFixed;
  if (Tr::kHasBias && args.relpos_table != nullptr && args.relpos_in_smem) {
    smem += (size_t(args.relpos_table_size) * sizeof(float) + 15) / 16 * 16;
  }
  return launch_kernel<Tr>(attention_fwd_kernel<Tr, kPerTokenK>, args, smem, stream);
}

// Rel-pos in the bounded kernels: the block's whole table window in shared memory, or, when that
// exceeds kBoundedRelPosWindowCapBytes, per key tile only the table rows that tile needs (streamed
// with the tile, kernel_bounded.h relpos_slice): at most (block_m - 1) / Ww + (block_n - 1) / Ww + 3
// table rows. BINFORMER_FWD_RELPOS_STREAM (read at every call; A/B and tests): 1 streams every
// rel-pos call, 0 never (windows above the cap then run the online bias kernel, as before v6).
inline int fwd_relpos_stream_mode() {
  const char* env = std::getenv("BINFORMER_FWD_RELPOS_STREAM");
  if (env == nullptr) return -1;
  return std::strcmp(env, "1") == 0 ? 1 : std::strcmp(env, "0") == 0 ? 0 : -1;
}
inline int relpos_slice_floats(const FwdArgs& args, int block_m, int block_n) {
  const int ww = args.relpos_ww;
  return ((block_m - 1) / ww + (block_n - 1) / ww + 3) * (2 * ww - 1);
}
inline size_t fwd_bounded_relpos_smem(const FwdArgs& args, int stages) {
  if (args.relpos_stream) return 16 + size_t(stages) * ((size_t(args.relpos_slice) * sizeof(float) + 15) / 16 * 16);
  return (size_t(args.relpos_window) * sizeof(float) + 15) / 16 * 16;
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

// Sizes the rel-pos window (or the streamed slices) of the bounded kernels for blocks of block_m
// rows. false: neither fits under kBoundedRelPosWindowCapBytes (the online bias kernel runs).
// A shape with fewer rows needs at most the window / slice of one with more (its blocks lie
// inside theirs), so what fits at 128 rows fits at 64.
inline bool size_bounded_relpos(FwdArgs& args, int block_m, int block_n, int stages) {
  args.relpos_stream = false;
  args.relpos_window = relpos_window_floats(args, block_m);
  const int stream_mode = fwd_relpos_stream_mode();
  const bool too_big = size_t(args.relpos_window) * sizeof(float) > size_t(kBoundedRelPosWindowCapBytes);
  if (too_big && stream_mode == 0) return false;
  if (stream_mode == 1 || too_big) {
    args.relpos_stream = true;
    args.relpos_slice = relpos_slice_floats(args, block_m, block_n);
    // (grids wider than ~2700 patches) the online bias kernel
    if (fwd_bounded_relpos_smem(args, stages) > size_t(kBoundedRelPosWindowCapBytes)) return false;
  }
  return true;
}

// The sm_90a wgmma P.V variant of the bounded kernels (kernel_bounded.h, pv_wgmma.h) is the
// default on compute capability 9.0 devices whose binary holds sm_90a code, for fp16/bf16 V with
// Dv = 64 (any d, causal, rel-pos); measured on the H100 (device run 14, NOTES v4): 4096/64
// 696 -> 616 us, 16384 2518 -> 2226 us. BINFORMER_FWD_SM90=0 in the environment (read at every
// call, so that one process can A/B both paths) runs the mma.sync kernels instead.
// Dv = 72, 80, 96, 128 (v5) take it too: BINFORMER_FWD_SM90_WIDE unset or 1 = 2 blocks of 8 warps
// per SM (128 registers), 2 = 1 block per SM (up to 255 registers), 0 = mma.sync (read at every call).
// BINFORMER_FWD_SM90_LOG=1 prints one line on the first launch of that path.
inline bool fwd_wgmma_requested() {
  const char* env = std::getenv("BINFORMER_FWD_SM90");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

// BINFORMER_FWD_SM90_NARROW (read at every call; Dv = 64 wgmma only): 1 runs every call on the
// narrow one-warpgroup shape (64 rows, 4 blocks/SM; tile_config.h BoundedShape), 0 never (the
// wide 128-row shape, 2 blocks/SM, as before v8); unset: narrow without rel-pos when Nk >=
// BINFORMER_FWD_SM90_NARROW_MIN_NK (tile_config.h: the measurement behind it).
inline bool fwd_wgmma_narrow(const FwdArgs& args) {
  const char* env = std::getenv("BINFORMER_FWD_SM90_NARROW");
  if (env != nullptr && std::strcmp(env, "1") == 0) return true;
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  return args.relpos_table == nullptr && args.Nk >= BINFORMER_FWD_SM90_NARROW_MIN_NK;
}

// BINFORMER_FWD_SM90_WIDE: 0 mma.sync, 1 (unset) wgmma at 2 blocks/SM, 2 wgmma at 1 block/SM.
inline int fwd_wgmma_wide_mode() {
  // Default 1 (2 blocks/SM): measured on the H100 (device run 15) DiT 414 -> 293 us and
  // 4096/128 1337 -> 988 us against mma.sync; 2 (1 block/SM) was slower than mma.sync at DiT.
  const char* env = std::getenv("BINFORMER_FWD_SM90_WIDE");
  if (env == nullptr) return 1;
  if (std::strcmp(env, "0") == 0) return 0;
  if (std::strcmp(env, "2") == 0) return 2;
  return 1;
}

template <class Tr>
cudaError_t launch_bounded(FwdArgs args, cudaStream_t stream) {
  size_t smem = Tr::kSmemFixed + Tr::kSmemAlignSlack;
  if constexpr (Tr::kBoundedRelPos) {
    // The window / slices of this shape's blocks (run_bounded checked the 128-row shape, which
    // needs at least as much: this cannot fail after that).
    if (!size_bounded_relpos(args, Tr::kBlockM, Tr::kBlockN, Tr::kStages)) return cudaErrorInvalidConfiguration;
    smem += fwd_bounded_relpos_smem(args, Tr::kStages);
  }
  if constexpr (Tr::kWgmma) {
    static const bool has_code = kernel_has_sm90a_code(attention_fwd_bounded_wgmma_kernel<Tr>);
    if (!has_code) return cudaErrorNotSupported;  // the caller falls back to mma.sync
    static bool logged = false;
    if (!logged) {
      logged = true;
      const char* log = std::getenv("BINFORMER_FWD_SM90_LOG");
      if (log != nullptr && std::strcmp(log, "1") == 0) {
        std::fprintf(stderr, "binformer: attention_fwd sm_90a wgmma P.V kernel (Dv %d, %s V, d form %d, rel-pos %d, %d-row blocks)\n",
                     Tr::kDvPad, Tr::kPv == PvKind::kBF16 ? "bf16" : "fp16", int(Tr::kQK), int(Tr::kBoundedRelPos),
                     Tr::kBlockM);
      }
    }
    return launch_kernel<Tr>(attention_fwd_bounded_wgmma_kernel<Tr>, args, smem, stream);
  } else {
    return launch_kernel<Tr>(attention_fwd_bounded_kernel<Tr>, args, smem, stream);
  }
}

template <int kDvPad, PvKind kPv, bool kDvMasked, bool kRelPos, BoundedShape kShape, bool kWgmma = false,
          int kWgmmaWideBlocks = 2>
cudaError_t run_bounded_qk(FwdArgs args, cudaStream_t stream) {
  constexpr int kB = kWgmmaWideBlocks;
  // sm_90a at d <= 128 (16-byte K rows): the key tiles on the TMA where V's layout allows and
  // BINFORMER_FWD_TMA asks for them (tma_desc.h), 2 blocks per SM at Dv > 64.
  if constexpr (kWgmma && !kDvMasked && kB == 2) {
    using Probe = FwdTraits<kDvPad, kPv, false, false, QK::kK128, kRelPos, kShape, true, kB, false, true>;
    constexpr int kBoxChannels = 8 * WgmmaVLayout<kDvPad, Probe::kBlockN>::kW;
    if (args.d <= 128 && fwd_tma_wanted() && fwd_encode_v_tma(args, kBoxChannels, Probe::kBlockN)) {
      if constexpr (!kRelPos && kShape == BoundedShape::kNarrow) {
        if (args.d <= 64 && fwd_p_table_wanted(args)) {
          return launch_bounded<FwdTraits<kDvPad, kPv, false, false, QK::kDup128, false, kShape, true, kB, true, true>>(args, stream);
        }
      }
      if (args.d <= 64) {
        return launch_bounded<FwdTraits<kDvPad, kPv, false, false, QK::kDup128, kRelPos, kShape, true, kB, false, true>>(args, stream);
      }
      return launch_bounded<FwdTraits<kDvPad, kPv, false, false, QK::kK128, kRelPos, kShape, true, kB, false, true>>(args, stream);
    }
  }
  if constexpr (kWgmma && !kRelPos && kShape == BoundedShape::kNarrow) {  // (narrow only: NOTES v12)
    if (args.d <= 64 && fwd_p_table_wanted(args)) {
      return launch_bounded<FwdTraits<kDvPad, kPv, kDvMasked, false, QK::kDup128, false, kShape, true, kB, true>>(args, stream);
    }
  }
  if (args.d <= 64) {
    return launch_bounded<FwdTraits<kDvPad, kPv, kDvMasked, false, QK::kDup128, kRelPos, kShape, kWgmma, kB>>(args, stream);
  }
  if (args.d <= 128) {
    return launch_bounded<FwdTraits<kDvPad, kPv, kDvMasked, false, QK::kK128, kRelPos, kShape, kWgmma, kB>>(args, stream);
  }
  return launch_bounded<FwdTraits<kDvPad, kPv, kDvMasked, false, QK::kK256, kRelPos, kShape, kWgmma, kB>>(args, stream);
}

// fp16/bf16 V without a dense bias and without a per-token k scale: the bounded-max kernels
// (kernel_bounded.h), one per QK^T form (d <= 64 / 128 / 256), with or without the rel-pos bias.
// Returns false (nothing launched) when the rel-pos window does not fit in shared memory.
template <int kDvPad, PvKind kPv, bool kDvMasked, bool kRelPos>
cudaError_t run_bounded(FwdArgs args, cudaStream_t stream, bool& launched) {
  // Whether the rel-pos table fits, decided for the 128-row shapes (every shape but the narrow
  // one; launch_bounded sizes it again for the shape it launches).
  using Probe = FwdTraits<kDvPad, kPv, kDvMasked, false, QK::kK256, kRelPos>;
  static_assert(!kRelPos || Probe::kBlockM == 128, "the probe is the largest bounded block");
  if (kRelPos) {
    FwdArgs probe = args;
    if (!size_bounded_relpos(probe, Probe::kBlockM, Probe::kBlockN, Probe::kStages)) {
      launched = false;
      return cudaSuccess;
    }
  }
  launched = true;
  using S = BoundedShape;
  // sm_90a: wgmma P.V unless BINFORMER_FWD_SM90=0; Dv = 64 on the narrow (one warpgroup) or wide
  // (two warpgroups) shape, see fwd_wgmma_narrow.
  constexpr bool kWgmmaWidth = kDvPad == 64 || kDvPad == 72 || kDvPad == 80 || kDvPad == 96 || kDvPad == 128;
  if constexpr (kWgmmaWidth && !kDvMasked) {
    const int wide_mode = kDvPad == 64 ? 1 : fwd_wgmma_wide_mode();
    if (fwd_wgmma_requested() && wide_mode != 0 && device_is_sm90()) {
      cudaError_t err;
      if constexpr (kDvPad == 64) {
        err = fwd_wgmma_narrow(args) ? run_bounded_qk<kDvPad, kPv, kDvMasked, kRelPos, S::kNarrow, true>(args, stream)
                                     : run_bounded_qk<kDvPad, kPv, kDvMasked, kRelPos, S::kWide, true>(args, stream);
      } else {
        err = wide_mode == 1 ? run_bounded_qk<kDvPad, kPv, kDvMasked, kRelPos, S::kWide, true, 2>(args, stream)
                             : run_bounded_qk<kDvPad, kPv, kDvMasked, kRelPos, S::kWide, true, 1>(args, stream);
      }
      if (err != cudaErrorNotSupported) return err;
    }
  }
  // Dv <= 64 without rel-pos: the 4-warp shape for long key ranges (tile_config.h).
  if constexpr (kDvPad <= 64 && !kRelPos) {
    if (args.Nk > BINFORMER_FWD_BOUNDED_WIDE_MAX_NK) {
      return run_bounded_qk<kDvPad, kPv, kDvMasked, false, S::k4x2>(args, stream);
    }
  }
  return run_bounded_qk<kDvPad, kPv, kDvMasked, kRelPos, S::kWide>(args, stream);
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
