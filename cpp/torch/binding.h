// binformer torch binding: argument checks and kernel-parameter assembly shared by the
// CPU impls (ops.cpp) and the CUDA impls (cuda/ops_cuda.cpp).
//
// Each prepare_* function validates its arguments with TORCH_CHECKs that name the offending
// argument, broadcasts the optional inputs with stride-0 views, allocates the outputs and
// fills the torch-free params struct of cpp/include/binformer/params.h. The device-specific
// impl then only adds what belongs to its device (CUDA: the stream and the workspace) and
// calls the kernel. Degenerate sizes (nothing to compute) are answered here, with `trivial`
// set, so no kernel ever sees an empty problem.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdio>
#include <string>
#include <string_view>
#include <type_traits>
#include <optional>
#include <tuple>
#include <vector>

#include "binformer/params.h"

namespace binformer::binding {

// Error messages are assembled here, numbers through std::to_string / snprintf, instead of
// through c10::str's iostreams: on the GPU machine (torch 2.11, extension built with a GCC
// newer than the libstdc++ torch loads) numeric ostream insertion from inline header code in
// this module segfaulted, so a failed check with a number in its message crashed the process.
namespace message_detail {
inline void append(std::string& s, const char* x) { s += x; }
inline void append(std::string& s, const std::string& x) { s += x; }
inline void append(std::string& s, std::string_view x) { s += x; }
template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline void append(std::string& s, T v) { s += std::to_string(v); }
template <class T, std::enable_if_t<std::is_floating_point_v<T>, int> = 0>
inline void append(std::string& s, T v) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.9g", static_cast<double>(v));
  s += buf;
}
inline void append(std::string& s, at::IntArrayRef a) {
  s += '[';
  for (size_t i = 0; i < a.size(); ++i) s += (i ? ", " : "") + std::to_string(a[i]);
  s += ']';
}
inline void append(std::string& s, at::ScalarType t) { s += c10::toString(t); }
inline void append(std::string& s, const at::Device& d) { s += d.str(); }
}  // namespace message_detail

template <class... Args>
std::string message(const Args&... args) {
  std::string s;
  (message_detail::append(s, args), ...);
  return s;
}

}  // namespace binformer::binding

// TORCH_CHECK with a message built by binformer::binding::message (see above).
#define BINFORMER_CHECK(cond, ...) TORCH_CHECK(cond, ::binformer::binding::message(__VA_ARGS__))

namespace binformer::binding {

// The kernel dtype code of a tensor the kernels accept (fp32/fp16/bf16, int32 = packed bits,
// int8 = quantized V); a TORCH_CHECK failure for anything else.
DType kernel_dtype(const at::Tensor& t, const char* name);

struct PackSignCall {
  PackSignParams params{};
  at::Tensor x;    // contiguous input (keeps a copy alive when one was needed)
  at::Tensor out;  // int32 [..., words_for(d)]
  bool trivial = false;
};
PackSignCall prepare_pack_sign(const at::Tensor& x);

struct SignMatmulCall {
  SignMatmulParams params{};
  at::Tensor a, b;  // [batch, M, W] / [batch, N, W] views with contiguous rows
  at::Tensor out;   // int32 [..., M, N]
  bool trivial = false;
};
SignMatmulCall prepare_sign_matmul(const at::Tensor& a_bits, const at::Tensor& b_bits, int64_t d);

struct AttentionFwdCall {
  AttentionFwdParams params{};
  at::Tensor out, lse;
  std::vector<at::Tensor> keep_alive;  // converted / broadcast / quantized inputs
  bool trivial = false;                // out and lse already hold the answer
};
AttentionFwdCall prepare_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const std::optional<at::Tensor>& q_scale,
                                       const std::optional<at::Tensor>& k_scale,
                                       const std::optional<at::Tensor>& bias,
                                       const std::optional<at::Tensor>& rel_pos_table,
                                       int64_t rel_pos_wh, int64_t rel_pos_ww, int64_t num_prefix_tokens,
                                       int64_t head_dim, double scale, bool is_causal, bool pv_int8,
                                       c10::string_view grad_mode);

// Output order of attention_bwd (and of its output_mask).
enum BwdOutput { kDv = 0, kDqScale, kDkScale, kDqSign, kDkSign, kDbias, kDrelPosTable, kNumBwdOutputs };
using BwdGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

struct AttentionBwdCall {
  AttentionBwdParams params{};
  std::array<at::Tensor, kNumBwdOutputs> grads;  // undefined-free: unwanted ones are empty tensors
  std::vector<at::Tensor> keep_alive;
  bool trivial = false;  // grads already hold the answer (zeros)
  BwdGrads as_tuple() const;
};
AttentionBwdCall prepare_attention_bwd(const at::Tensor& dout, const at::Tensor& q_bits, const at::Tensor& k_bits,
                                       const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                       const std::optional<at::Tensor>& q_scale,
                                       const std::optional<at::Tensor>& k_scale,
                                       const std::optional<at::Tensor>& bias,
                                       const std::optional<at::Tensor>& rel_pos_table,
                                       int64_t rel_pos_wh, int64_t rel_pos_ww, int64_t num_prefix_tokens,
                                       int64_t head_dim, double scale, bool is_causal,
                                       std::array<bool, kNumBwdOutputs> output_mask);

}  // namespace binformer::binding
