// Torch-free CUDA kernels: raw device pointers and a stream; every function returns the
// launch's cudaError_t (cudaGetLastError after the launch), never throws.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>

#include "binformer/params.h"

namespace binformer::cuda {

cudaError_t pack_sign(const PackSignParams& p, cudaStream_t stream);
cudaError_t sign_matmul(const SignMatmulParams& p, cudaStream_t stream);

// Bytes of scratch memory attention_fwd needs for these params (e.g. K packed once).
size_t attention_fwd_workspace_bytes(const AttentionFwdParams& p);
cudaError_t attention_fwd(const AttentionFwdParams& p, cudaStream_t stream);

size_t attention_bwd_workspace_bytes(const AttentionBwdParams& p);
cudaError_t attention_bwd(const AttentionBwdParams& p, cudaStream_t stream);

}  // namespace binformer::cuda
