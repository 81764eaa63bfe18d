// attention_bwd on the CUDA cores: launches (the kernel and its description are in bwd_simt.cuh).
#include "bwd_simt.cuh"

namespace binformer::cuda::bwd {
namespace {

using namespace simt;

template <class TIn, bool kKeyMajor, bool kMainPass>
cudaError_t launch_simt_pass(const BwdArgs& a, cudaStream_t stream) {
  const int64_t n_rows = kKeyMajor ? a.Nk : a.Nq;
  const int64_t blocks = (n_rows + kRows - 1) / kRows * a.B * a.H;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const SimtSmem L = SimtSmem::make(a.dv_dim, kMainPass && a.drel != nullptr, a.rel_table_size);
  const size_t smem = size_t(L.total) * 4;
  auto kernel = attention_bwd_simt_kernel<TIn, kKeyMajor, kMainPass>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return err;
  kernel<<<unsigned(blocks), kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

template <class TIn>
cudaError_t run_simt(const BwdArgs& a, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  if (a.dv || a.dq_scale || a.dk_scale || a.dbias || a.drel) {
    err = launch_simt_pass<TIn, true, true>(a, stream);
    if (err != cudaSuccess) return err;
  }
  if (a.dk_sign) {
    err = launch_simt_pass<TIn, true, false>(a, stream);
    if (err != cudaSuccess) return err;
  }
  if (a.dq_sign) err = launch_simt_pass<TIn, false, false>(a, stream);
  return err;
}

}  // namespace

cudaError_t run_attention_bwd_simt(const BwdArgs& a, cudaStream_t stream) {
  switch (a.v_dtype) {
    case DType::kFloat32: return run_simt<float>(a, stream);
    case DType::kFloat16: return run_simt<__half>(a, stream);
    case DType::kBFloat16: return run_simt<__nv_bfloat16>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace binformer::cuda::bwd
