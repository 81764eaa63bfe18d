// Tensor-core attention_bwd passes for head dims (d, Dv) up to 256, bf16 v / out / dout.
// One instantiation per file keeps the build parallel; BINFORMER_CUDA_MINIMAL drops every
// hdim bucket but 64 (the dispatcher in attention_bwd.cu then answers cudaErrorNotSupported).
#include "../attention_bwd/bwd_tc.cuh"

namespace binformer::cuda::bwd {
BINFORMER_INSTANTIATE_ATTENTION_BWD_TC(__nv_bfloat16, 256)
}  // namespace binformer::cuda::bwd
