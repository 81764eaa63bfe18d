// attention_bwd: validation, workspace layout, the prep and finalize kernels, and the dispatch
// to the tensor-core (fp16 / bf16, per head-dim bucket) or CUDA-core (fp32 / unaligned) passes.
// The math and the pass structure are described in bwd_common.cuh.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "binformer/cuda_kernels.h"
#include "bwd_common.cuh"
#include "bwd_host.h"
#include "bwd_prep.cuh"

namespace binformer::cuda {
namespace bwd {
namespace {

int grid_for(int64_t items, int threads_per_block, int items_per_thread = 1) {
  const int64_t blocks = (items + int64_t(threads_per_block) * items_per_thread - 1) /
                         (int64_t(threads_per_block) * items_per_thread);
  return int(blocks < 1 ? 1 : (blocks > 65536 ? 65536 : blocks));
}

}  // namespace

cudaError_t launch_prep(const BwdArgs& a, cudaStream_t stream) {
  const int64_t rows = a.B * a.H * (a.Nq + a.Nk);
  if (rows == 0) return cudaSuccess;
  if (prep_vectorized(a)) {
    const int grid = grid_for(rows, kPrepThreads / 8);
    if (a.v_dtype == DType::kFloat16) attention_bwd_prep_vec_kernel<__half><<<grid, kPrepThreads, 0, stream>>>(a);
    else attention_bwd_prep_vec_kernel<__nv_bfloat16><<<grid, kPrepThreads, 0, stream>>>(a);
    return cudaGetLastError();
  }
  const int grid = grid_for(rows, kPrepThreads / 32);
  switch (a.v_dtype) {
    case DType::kFloat16: attention_bwd_prep_kernel<__half><<<grid, kPrepThreads, 0, stream>>>(a); break;
    case DType::kBFloat16: attention_bwd_prep_kernel<__nv_bfloat16><<<grid, kPrepThreads, 0, stream>>>(a); break;
    default: attention_bwd_prep_kernel<float><<<grid, kPrepThreads, 0, stream>>>(a); break;
  }
  return cudaGetLastError();
}

cudaError_t launch_finalize(const BwdArgs& a, cudaStream_t stream) {
  if (a.dq_scale && a.B * a.H * a.Nq > 0) {
    attention_bwd_dq_scale_kernel<<<grid_for(a.B * a.H * a.Nq, 256), 256, 0, stream>>>(a);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (a.drel && a.H * a.rel_table_size > 0) {
    attention_bwd_drel_kernel<<<grid_for(a.H * int64_t(a.rel_table_size), 256), 256, 0, stream>>>(a);
    return cudaGetLastError();
  }
  return cudaSuccess;
}

}  // namespace bwd

size_t attention_bwd_workspace_bytes(const AttentionBwdParams& p) {
  if (bwd::validate(p) != cudaSuccess) return 0;
  return bwd::layout_for(p).total;
}

cudaError_t attention_bwd(const AttentionBwdParams& p, cudaStream_t stream) {
  using namespace bwd;
  cudaError_t err = validate(p);
  if (err != cudaSuccess) return err;
  const WorkspaceLayout w = layout_for(p);
  if (w.total > 0 && p.workspace == nullptr) return cudaErrorInvalidValue;

  BwdArgs a = make_bwd_args(p, w);
  if (a.B * a.H == 0) return cudaSuccess;
  err = launch_prep(a, stream);
  if (err != cudaSuccess) return err;

  if (w.key_block == kKeyBlockTc) {
    const int hdim = p.head_dim > p.v_dim ? p.head_dim : p.v_dim;
    const bool fp16 = p.v_dtype == DType::kFloat16;
    if (hdim <= 64) {
      err = fp16 ? run_attention_bwd_tc<__half, 64>(a, stream) : run_attention_bwd_tc<__nv_bfloat16, 64>(a, stream);
    } else {
#if defined(BINFORMER_CUDA_MINIMAL)
      // The CI compile check builds the hdim64 bucket only.
      return cudaErrorNotSupported;
#else
      if (hdim <= 128) {
        err = fp16 ? run_attention_bwd_tc<__half, 128>(a, stream)
                   : run_attention_bwd_tc<__nv_bfloat16, 128>(a, stream);
      } else {
        err = fp16 ? run_attention_bwd_tc<__half, 256>(a, stream)
                   : run_attention_bwd_tc<__nv_bfloat16, 256>(a, stream);
      }
#endif
    }
  } else {
    err = run_attention_bwd_simt(a, stream);
  }
  if (err != cudaSuccess) return err;
  return launch_finalize(a, stream);
}

}  // namespace binformer::cuda
