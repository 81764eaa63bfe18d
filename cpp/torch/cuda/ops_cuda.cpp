// binformer torch binding: the CUDA impls (compiled only when torch and the build have CUDA;
// CMakeLists.txt adds this folder and defines BINFORMER_WITH_CUDA).
//
// Same validation and params assembly as the CPU impls (../binding.h); here only the device
// guard, the current stream (c10::cuda::getCurrentCUDAStream, which at::cuda re-exports; the
// c10 header avoids ATen/cuda's dependency on the cuSPARSE/cuBLAS headers), the workspace (from
// torch's caching allocator, so it is reused across calls and safe on the stream) and the error
// check of each launch are added.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../binding.h"
#include "binformer/cuda_kernels.h"

namespace binformer::binding {
namespace {

void check_launch(cudaError_t err, const char* op) {
  BINFORMER_CHECK(err == cudaSuccess, op, " (CUDA): ", cudaGetErrorString(err));
}

// Attention errors also say which problem failed (e.g. a configuration the kernels do not
// support answers cudaErrorNotSupported).
template <class Params>
void check_attention_launch(cudaError_t err, const char* op, const Params& p) {
  BINFORMER_CHECK(err == cudaSuccess, op, " (CUDA): ", cudaGetErrorString(err), " for B=", p.B, " H=", p.H, " Nq=", p.Nq,
              " Nk=", p.Nk, " head_dim=", p.head_dim, " Dv=", p.v_dim, " v ", dtype_name(p.v_dtype),
              p.bias ? " with bias" : "", p.rel_pos_table ? " with rel_pos_table" : "", p.causal ? " causal" : "");
}

// Scratch memory of `bytes` on the tensor's device. The caching allocator ties the block to
// the current stream, so freeing it when the call returns is safe with the kernel in flight.
at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

at::Tensor pack_sign_cuda(const at::Tensor& x) {
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  PackSignCall c = prepare_pack_sign(x);
  if (!c.trivial) check_launch(cuda::pack_sign(c.params, c10::cuda::getCurrentCUDAStream()), "binformer::pack_sign");
  return c.out;
}

at::Tensor sign_matmul_cuda(const at::Tensor& a_bits, const at::Tensor& b_bits, int64_t d) {
  const c10::cuda::OptionalCUDAGuard guard(a_bits.device());
  SignMatmulCall c = prepare_sign_matmul(a_bits, b_bits, d);
  if (!c.trivial)
    check_launch(cuda::sign_matmul(c.params, c10::cuda::getCurrentCUDAStream()), "binformer::sign_matmul");
  return c.out;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& q_scale,
    const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& rel_pos_table, int64_t rel_pos_wh, int64_t rel_pos_ww,
    int64_t num_prefix_tokens, int64_t head_dim, double scale, bool is_causal, bool pv_int8,
    c10::string_view grad_mode) {
  const c10::cuda::OptionalCUDAGuard guard(q.device());
  AttentionFwdCall c = prepare_attention_fwd(q, k, v, q_scale, k_scale, bias, rel_pos_table, rel_pos_wh, rel_pos_ww,
                                             num_prefix_tokens, head_dim, scale, is_causal, pv_int8, grad_mode);
  if (!c.trivial) {
    const size_t bytes = cuda::attention_fwd_workspace_bytes(c.params);
    const at::Tensor ws = bytes > 0 ? workspace(bytes, q) : at::Tensor();
    c.params.workspace = bytes > 0 ? ws.data_ptr() : nullptr;
    check_attention_launch(cuda::attention_fwd(c.params, c10::cuda::getCurrentCUDAStream()), "binformer::attention_fwd",
                           c.params);
  }
  return {c.out, c.lse};
}

BwdGrads attention_bwd_cuda(const at::Tensor& dout, const at::Tensor& q_bits, const at::Tensor& k_bits,
                            const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                            const std::optional<at::Tensor>& q_scale, const std::optional<at::Tensor>& k_scale,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& rel_pos_table,
                            int64_t rel_pos_wh, int64_t rel_pos_ww, int64_t num_prefix_tokens, int64_t head_dim,
                            double scale, bool is_causal, std::array<bool, 7> output_mask) {
  const c10::cuda::OptionalCUDAGuard guard(q_bits.device());
  AttentionBwdCall c = prepare_attention_bwd(dout, q_bits, k_bits, v, out, lse, q_scale, k_scale, bias, rel_pos_table,
                                             rel_pos_wh, rel_pos_ww, num_prefix_tokens, head_dim, scale, is_causal,
                                             output_mask);
  if (!c.trivial) {
    const size_t bytes = cuda::attention_bwd_workspace_bytes(c.params);
    const at::Tensor ws = bytes > 0 ? workspace(bytes, v) : at::Tensor();
    c.params.workspace = bytes > 0 ? ws.data_ptr() : nullptr;
    check_attention_launch(cuda::attention_bwd(c.params, c10::cuda::getCurrentCUDAStream()), "binformer::attention_bwd",
                           c.params);
  }
  return c.as_tuple();
}

}  // namespace
}  // namespace binformer::binding

TORCH_LIBRARY_IMPL(binformer, CUDA, m) {
  using namespace binformer::binding;
  m.impl("pack_sign", &pack_sign_cuda);
  m.impl("sign_matmul", &sign_matmul_cuda);
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
}
