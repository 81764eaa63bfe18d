// binformer torch binding: the op schemas (the one place they are written) and the CPU impls.
//
// Schemas and semantics: docs/CONTRACT.md. The CUDA impls live in cuda/ops_cuda.cpp and are
// compiled only when torch and the build both have CUDA (BINFORMER_WITH_CUDA). Fake (meta)
// kernels and autograd are registered from Python (python/binformer/ops.py), which is why the
// library names that module: torch asks for it to be imported if an op is used without it.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <mutex>

#include "binding.h"
#include "binformer/cpu_kernels.h"

namespace binformer::binding {
namespace {

// The CPU kernels split their work through a hook; route it to torch's intra-op thread pool
// (at::parallel_for respects torch.set_num_threads and never nests a second pool).
void install_parallel_for_once() {
  static std::once_flag once;
  std::call_once(once, [] {
    cpu::set_parallel_for(
        [](int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
          at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { fn(begin, end); });
        });
  });
}

at::Tensor pack_sign_cpu(const at::Tensor& x) {
  PackSignCall c = prepare_pack_sign(x);
  if (!c.trivial) {
    install_parallel_for_once();
    cpu::pack_sign(c.params);
  }
  return c.out;
}

at::Tensor sign_matmul_cpu(const at::Tensor& a_bits, const at::Tensor& b_bits, int64_t d) {
  SignMatmulCall c = prepare_sign_matmul(a_bits, b_bits, d);
  if (!c.trivial) {
    install_parallel_for_once();
    cpu::sign_matmul(c.params);
  }
  return c.out;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& q_scale,
    const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& rel_pos_table, int64_t rel_pos_wh, int64_t rel_pos_ww,
    int64_t num_prefix_tokens, int64_t head_dim, double scale, bool is_causal, bool pv_int8,
    c10::string_view grad_mode) {
  install_parallel_for_once();  // before prepare: it runs the pv_int8 V quantizer
  AttentionFwdCall c = prepare_attention_fwd(q, k, v, q_scale, k_scale, bias, rel_pos_table, rel_pos_wh, rel_pos_ww,
                                             num_prefix_tokens, head_dim, scale, is_causal, pv_int8, grad_mode);
  if (!c.trivial) {
    cpu::attention_fwd(c.params);
  }
  return {c.out, c.lse};
}

BwdGrads attention_bwd_cpu(const at::Tensor& dout, const at::Tensor& q_bits, const at::Tensor& k_bits,
                           const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                           const std::optional<at::Tensor>& q_scale, const std::optional<at::Tensor>& k_scale,
                           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& rel_pos_table,
                           int64_t rel_pos_wh, int64_t rel_pos_ww, int64_t num_prefix_tokens, int64_t head_dim,
                           double scale, bool is_causal, std::array<bool, 7> output_mask) {
  AttentionBwdCall c = prepare_attention_bwd(dout, q_bits, k_bits, v, out, lse, q_scale, k_scale, bias, rel_pos_table,
                                             rel_pos_wh, rel_pos_ww, num_prefix_tokens, head_dim, scale, is_causal,
                                             output_mask);
  if (!c.trivial) {
    install_parallel_for_once();
    cpu::attention_bwd(c.params);
  }
  return c.as_tuple();
}

}  // namespace
}  // namespace binformer::binding

TORCH_LIBRARY(binformer, m) {
  m.set_python_module("binformer.ops");
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};
  m.def("pack_sign(Tensor x) -> Tensor", tags);
  m.def("sign_matmul(Tensor a_bits, Tensor b_bits, int d) -> Tensor", tags);
  // grad_mode does not change the forward; it selects the autograd formula registered in
  // python/binformer/ops.py ("ste": BinaryAttention's straight-through sign, "hamming":
  // BinaryFormer's, no gradient to q and k).
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? q_scale, Tensor? k_scale, Tensor? bias, "
      "Tensor? rel_pos_table, int rel_pos_wh, int rel_pos_ww, int num_prefix_tokens, int head_dim, float scale, "
      "bool is_causal, bool pv_int8, str grad_mode=\"ste\") -> (Tensor out, Tensor lse)",
      tags);
  m.def(
      "attention_bwd(Tensor dout, Tensor q_bits, Tensor k_bits, Tensor v, Tensor out, Tensor lse, "
      "Tensor? q_scale, Tensor? k_scale, Tensor? bias, Tensor? rel_pos_table, int rel_pos_wh, int rel_pos_ww, "
      "int num_prefix_tokens, int head_dim, float scale, bool is_causal, bool[7] output_mask) "
      "-> (Tensor dv, Tensor dq_scale, Tensor dk_scale, Tensor dq_sign, Tensor dk_sign, Tensor dbias, "
      "Tensor drel_pos_table)",
      tags);
}

TORCH_LIBRARY_IMPL(binformer, CPU, m) {
  using namespace binformer::binding;
  m.impl("pack_sign", &pack_sign_cpu);
  m.impl("sign_matmul", &sign_matmul_cpu);
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

// `import binformer._C` loads this shared library, which runs the registrations above; the
// module itself is empty (the ops are reached through torch.ops.binformer).
namespace {
// binformer._C.cpu_isa(): the instruction set the CPU kernels use now ("avx512" or "scalar").
PyObject* cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(binformer::cpu::isa_name(binformer::cpu::active_isa()));
}
PyMethodDef module_methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "The instruction set the CPU kernels use now."},
    {nullptr, nullptr, 0, nullptr},
};
}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "binformer's compiled ops; use them through torch.ops.binformer or the binformer package",
      -1,              // no per-module state
      module_methods,  // cpu_isa()
      nullptr,  // no slots
      nullptr,  // traverse
      nullptr,  // clear
      nullptr,  // free
  };
  return PyModule_Create(&module_def);
}
