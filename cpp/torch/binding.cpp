// binformer torch binding: argument checks and params assembly (see binding.h).
#include "binding.h"
#include "binformer/cpu_kernels.h"

#include <ATen/ExpandUtils.h>

#include <cmath>
#include <limits>

namespace binformer::binding {
namespace {

bool is_float_dtype(at::ScalarType s) { return s == at::kFloat || s == at::kHalf || s == at::kBFloat16; }

void check_defined(const at::Tensor& t, const char* op, const char* name) {
  BINFORMER_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
}

void check_rank(const at::Tensor& t, int64_t rank, const char* op, const char* name, const char* layout) {
  BINFORMER_CHECK(t.dim() == rank, op, ": ", name, " must be ", rank, "-D ", layout, ", got shape ", t.sizes());
}

void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                       const char* ref_name) {
  BINFORMER_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device(), "; all tensors must be on one device");
}

// The kernels read every row as one contiguous run of elements (q/k bits, v, bias rows).
void check_last_dim_contiguous(const at::Tensor& t, const char* op, const char* name) {
  BINFORMER_CHECK(t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, op, ": the last dim of ", name,
              " must be contiguous (stride 1), got strides ", t.strides(), " for shape ", t.sizes(),
              "; call .contiguous() first");
}

void check_head_dim(int64_t d, const char* op, const char* what) {
  BINFORMER_CHECK(d >= 8 && d <= kMaxHeadDim && d % 8 == 0, op, ": ", what, " must be a multiple of 8 in [8, ",
              kMaxHeadDim, "], got ", d);
}

// Packed bits: one int32 word per 32 sign bits of a row, so the width is fixed by head_dim.
void check_packed_width(const at::Tensor& t, int64_t d, const char* op, const char* name) {
  BINFORMER_CHECK(t.size(-1) == words_for(static_cast<int>(d)), op, ": ", name,
              " holds packed sign bits, so its last dim must be ceil(head_dim / 32) = ",
              words_for(static_cast<int>(d)), " for head_dim = ", d, ", got ", t.size(-1));
}

// A broadcast view of `t` with the given shape (numpy rules: align right, size 1 or equal);
// broadcast dims get stride 0, nothing is copied.
at::Tensor broadcast_to(const at::Tensor& t, at::IntArrayRef shape, const char* op, const char* name,
                        const char* shape_name) {
  bool ok = t.dim() <= static_cast<int64_t>(shape.size());
  for (int64_t i = 1; ok && i <= t.dim(); ++i) {
    const int64_t have = t.size(-i), want = shape[shape.size() - i];
    ok = have == want || have == 1;
  }
  BINFORMER_CHECK(ok, op, ": ", name, " of shape ", t.sizes(), " does not broadcast to ", shape_name, " = ", shape);
  return t.expand(shape);
}

template <size_t N>
void copy_strides(int64_t (&dst)[N], const at::Tensor& t) {
  for (size_t i = 0; i < N; ++i) dst[i] = t.stride(static_cast<int64_t>(i));
}

// The optional inputs of attention_fwd / attention_bwd, validated and broadcast to the
// kernel's view: scales fp32 [B,H,N], bias [B,H,Nq,Nk] with a contiguous last dim, table fp32.
struct OptionalInputs {
  at::Tensor q_scale, k_scale, bias, rel_pos_table;  // undefined when absent
  int rel_pos_wh = 0, rel_pos_ww = 0, num_prefix_tokens = 0;
};

OptionalInputs prepare_optional_inputs(const char* op, const at::Tensor& q, int64_t B, int64_t H, int64_t Nq,
                                       int64_t Nk, const std::optional<at::Tensor>& q_scale,
                                       const std::optional<at::Tensor>& k_scale,
                                       const std::optional<at::Tensor>& bias,
                                       const std::optional<at::Tensor>& rel_pos_table, int64_t rel_pos_wh,
                                       int64_t rel_pos_ww, int64_t num_prefix_tokens) {
  OptionalInputs o;
  auto scale_view = [&](const std::optional<at::Tensor>& s, int64_t N, const char* name, const char* shape_name) {
    if (!s.has_value() || !s->defined()) return at::Tensor();
    BINFORMER_CHECK(at::isFloatingType(s->scalar_type()), op, ": ", name, " must be a floating-point tensor, got ",
                s->scalar_type());
    check_same_device(*s, q, op, name, "q");
    // Converted to fp32 (the kernels' type for the per-row factors) before the broadcast, so
    // only the user's own elements are converted.
    return broadcast_to(s->to(at::kFloat), {B, H, N}, op, name, shape_name);
  };
  o.q_scale = scale_view(q_scale, Nq, "q_scale", "[B, H, Nq]");
  o.k_scale = scale_view(k_scale, Nk, "k_scale", "[B, H, Nk]");

  if (bias.has_value() && bias->defined()) {
    at::Tensor b = *bias;
    BINFORMER_CHECK(is_float_dtype(b.scalar_type()), op, ": bias must be fp32, fp16 or bf16, got ", b.scalar_type());
    check_same_device(b, q, op, "bias", "q");
    BINFORMER_CHECK(b.dim() <= 4, op, ": bias must have at most 4 dims (it broadcasts to [B, H, Nq, Nk]), got shape ",
                b.sizes());
    if (b.dim() == 0) b = b.reshape({1});
    broadcast_to(b, {B, H, Nq, Nk}, op, "bias", "[B, H, Nq, Nk]");  // shape check only
    if (b.size(-1) == 1 && Nk > 1) {
      // A bias constant along the keys: the kernels read bias rows as contiguous runs, so
      // materialize the last dim only (the other broadcast dims stay stride 0).
      std::vector<int64_t> sizes(b.sizes().begin(), b.sizes().end());
      sizes.back() = Nk;
      b = b.expand(sizes).contiguous();
    }
    check_last_dim_contiguous(b, op, "bias");
    o.bias = b.expand({B, H, Nq, Nk});
  }

  if (rel_pos_table.has_value() && rel_pos_table->defined()) {
    const at::Tensor& t = *rel_pos_table;
    BINFORMER_CHECK(at::isFloatingType(t.scalar_type()), op, ": rel_pos_table must be a floating-point tensor, got ",
                t.scalar_type());
    check_same_device(t, q, op, "rel_pos_table", "q");
    BINFORMER_CHECK(rel_pos_wh >= 1 && rel_pos_ww >= 1 && rel_pos_wh <= (1 << 15) && rel_pos_ww <= (1 << 15), op,
                ": rel_pos_wh and rel_pos_ww (the patch grid of rel_pos_table) must be positive, got ",
                rel_pos_wh, " x ", rel_pos_ww);
    BINFORMER_CHECK(num_prefix_tokens == 0 || num_prefix_tokens == 1, op,
                ": num_prefix_tokens must be 0 or 1 (a cls token before the patches), got ", num_prefix_tokens);
    const int64_t table_size = (2 * rel_pos_wh - 1) * (2 * rel_pos_ww - 1) + 3;
    BINFORMER_CHECK(t.dim() == 2 && t.size(0) == H && t.size(1) == table_size, op,
                ": rel_pos_table must be [H, (2*Wh-1)*(2*Ww-1)+3] = [", H, ", ", table_size, "] for a ", rel_pos_wh,
                " x ", rel_pos_ww, " grid, got shape ", t.sizes());
    const int64_t tokens = num_prefix_tokens + rel_pos_wh * rel_pos_ww;
    BINFORMER_CHECK(Nq == tokens && Nk == tokens, op, ": rel_pos_table needs Nq == Nk == num_prefix_tokens + Wh*Ww = ",
                tokens, ", got Nq = ", Nq, ", Nk = ", Nk);
    o.rel_pos_table = t.to(at::kFloat).contiguous();
    o.rel_pos_wh = static_cast<int>(rel_pos_wh);
    o.rel_pos_ww = static_cast<int>(rel_pos_ww);
    o.num_prefix_tokens = static_cast<int>(num_prefix_tokens);
  } else {
    BINFORMER_CHECK(num_prefix_tokens == 0, op, ": num_prefix_tokens only applies to rel_pos_table, which is absent; got ",
                num_prefix_tokens);
  }
  return o;
}

template <class Params>
void fill_optional_params(Params& p, const OptionalInputs& o) {
  if (o.q_scale.defined()) {
    p.q_scale = o.q_scale.template data_ptr<float>();
    copy_strides(p.q_scale_stride, o.q_scale);
  }
  if (o.k_scale.defined()) {
    p.k_scale = o.k_scale.template data_ptr<float>();
    copy_strides(p.k_scale_stride, o.k_scale);
  }
  if (o.bias.defined()) {
    p.bias = o.bias.data_ptr();
    p.bias_dtype = kernel_dtype(o.bias, "bias");
    copy_strides(p.bias_stride, o.bias);
  }
  if (o.rel_pos_table.defined()) {
    p.rel_pos_table = o.rel_pos_table.template data_ptr<float>();
    p.rel_pos_table_stride_h = o.rel_pos_table.stride(0);
    p.rel_pos_wh = o.rel_pos_wh;
    p.rel_pos_ww = o.rel_pos_ww;
    p.num_prefix_tokens = o.num_prefix_tokens;
  }
}

void keep(std::vector<at::Tensor>& keep_alive, const OptionalInputs& o) {
  for (const at::Tensor* t : {&o.q_scale, &o.k_scale, &o.bias, &o.rel_pos_table})
    if (t->defined()) keep_alive.push_back(*t);
}

}  // namespace

DType kernel_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kInt: return DType::kBits;
    case at::kChar: return DType::kInt8;
    default: break;
  }
  BINFORMER_CHECK(false, "binformer: ", name, " has unsupported dtype ", t.scalar_type());
}

// ------------------------------------------------------------------------------------ pack_sign
PackSignCall prepare_pack_sign(const at::Tensor& x) {
  constexpr const char* op = "binformer::pack_sign";
  check_defined(x, op, "x");
  BINFORMER_CHECK(is_float_dtype(x.scalar_type()), op, ": x must be fp32, fp16 or bf16, got ", x.scalar_type());
  BINFORMER_CHECK(x.dim() >= 1, op, ": x must have at least one dim (the one packed), got a 0-d tensor");
  const int64_t d = x.size(-1);
  BINFORMER_CHECK(d >= 1 && d <= std::numeric_limits<int>::max() / 2, op, ": the last dim of x must be >= 1, got ", d);
  PackSignCall c;
  c.x = x.contiguous();
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end());
  out_sizes.back() = words_for(static_cast<int>(d));
  c.out = at::empty(out_sizes, x.options().dtype(at::kInt));
  const int64_t rows = x.numel() / d;
  c.trivial = rows == 0;
  c.params.x = c.x.data_ptr();
  c.params.dtype = kernel_dtype(c.x, "x");
  c.params.rows = rows;
  c.params.d = static_cast<int>(d);
  c.params.out = reinterpret_cast<uint32_t*>(c.out.data_ptr<int32_t>());
  return c;
}

// ---------------------------------------------------------------------------------- sign_matmul
SignMatmulCall prepare_sign_matmul(const at::Tensor& a_bits, const at::Tensor& b_bits, int64_t d) {
  constexpr const char* op = "binformer::sign_matmul";
  check_defined(a_bits, op, "a_bits");
  check_defined(b_bits, op, "b_bits");
  BINFORMER_CHECK(a_bits.scalar_type() == at::kInt, op, ": a_bits must be int32 packed sign bits (from pack_sign), got ",
              a_bits.scalar_type());
  BINFORMER_CHECK(b_bits.scalar_type() == at::kInt, op, ": b_bits must be int32 packed sign bits (from pack_sign), got ",
              b_bits.scalar_type());
  check_same_device(b_bits, a_bits, op, "b_bits", "a_bits");
  BINFORMER_CHECK(a_bits.dim() >= 2, op, ": a_bits must be [..., M, W], got shape ", a_bits.sizes());
  BINFORMER_CHECK(b_bits.dim() >= 2, op, ": b_bits must be [..., N, W], got shape ", b_bits.sizes());
  BINFORMER_CHECK(d >= 1 && d <= std::numeric_limits<int>::max() / 2, op, ": d must be >= 1, got ", d);
  check_packed_width(a_bits, d, op, "a_bits");
  check_packed_width(b_bits, d, op, "b_bits");

  const int64_t M = a_bits.size(-2), N = b_bits.size(-2), W = a_bits.size(-1);
  const auto a_batch = a_bits.sizes().slice(0, a_bits.dim() - 2);
  const auto b_batch = b_bits.sizes().slice(0, b_bits.dim() - 2);
  std::vector<int64_t> batch_shape;
  try {
    batch_shape = at::infer_size(a_batch, b_batch);
  } catch (const c10::Error&) {
    BINFORMER_CHECK(false, op, ": the leading (batch) dims of a_bits ", a_batch, " and b_bits ", b_batch,
                " do not broadcast");
  }
  int64_t batch = 1;
  for (int64_t s : batch_shape) batch *= s;

  // One batch stride per operand: collapse the broadcast batch dims; reshape copies only when
  // they cannot be expressed with a single stride (bits are small, the copy is cheap).
  auto collapse = [&](const at::Tensor& t, int64_t rows) {
    std::vector<int64_t> shape(batch_shape);
    shape.push_back(rows);
    shape.push_back(W);
    at::Tensor v = t.expand(shape).reshape({batch, rows, W});
    if (rows > 1 && v.stride(1) != W) v = v.contiguous();
    if (W > 1 && v.stride(2) != 1) v = v.contiguous();
    return v;
  };
  SignMatmulCall c;
  c.a = collapse(a_bits, M);
  c.b = collapse(b_bits, N);
  std::vector<int64_t> out_shape(batch_shape);
  out_shape.push_back(M);
  out_shape.push_back(N);
  c.out = at::empty(out_shape, a_bits.options());
  c.trivial = batch == 0 || M == 0 || N == 0;
  c.params.a = reinterpret_cast<const uint32_t*>(c.a.data_ptr<int32_t>());
  c.params.b = reinterpret_cast<const uint32_t*>(c.b.data_ptr<int32_t>());
  c.params.out = c.out.data_ptr<int32_t>();
  c.params.batch = batch;
  c.params.M = M;
  c.params.N = N;
  c.params.d = static_cast<int>(d);
  c.params.a_batch_stride = batch > 1 ? c.a.stride(0) : 0;
  c.params.b_batch_stride = batch > 1 ? c.b.stride(0) : 0;
  return c;
}

// -------------------------------------------------------------------------------- attention_fwd
AttentionFwdCall prepare_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const std::optional<at::Tensor>& q_scale,
                                       const std::optional<at::Tensor>& k_scale,
                                       const std::optional<at::Tensor>& bias,
                                       const std::optional<at::Tensor>& rel_pos_table, int64_t rel_pos_wh,
                                       int64_t rel_pos_ww, int64_t num_prefix_tokens, int64_t head_dim,
                                       double scale, bool is_causal, bool pv_int8, c10::string_view grad_mode) {
  constexpr const char* op = "binformer::attention_fwd";
  BINFORMER_CHECK(grad_mode == "ste" || grad_mode == "hamming", op, ": grad_mode must be \"ste\" or \"hamming\", got \"",
              grad_mode, "\"");
  check_defined(q, op, "q");
  check_defined(k, op, "k");
  check_defined(v, op, "v");
  const auto qk_ok = [](const at::Tensor& t) { return is_float_dtype(t.scalar_type()) || t.scalar_type() == at::kInt; };
  BINFORMER_CHECK(qk_ok(q), op, ": q must be fp32, fp16, bf16 or int32 packed sign bits, got ", q.scalar_type());
  BINFORMER_CHECK(qk_ok(k), op, ": k must be fp32, fp16, bf16 or int32 packed sign bits, got ", k.scalar_type());
  BINFORMER_CHECK(is_float_dtype(v.scalar_type()), op, ": v must be fp32, fp16 or bf16, got ", v.scalar_type());
  check_same_device(k, q, op, "k", "q");
  check_same_device(v, q, op, "v", "q");
  check_rank(q, 4, op, "q", "[B, H, Nq, d] (or [B, H, Nq, ceil(d/32)] packed bits)");
  check_rank(k, 4, op, "k", "[B, H, Nk, d] (or [B, H, Nk, ceil(d/32)] packed bits)");
  check_rank(v, 4, op, "v", "[B, H, Nk, Dv]");
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), Nk = k.size(2), Dv = v.size(3);
  BINFORMER_CHECK(k.size(0) == B && k.size(1) == H, op, ": k must have the [B, H] = [", B, ", ", H,
              "] of q, got shape ", k.sizes());
  BINFORMER_CHECK(v.size(0) == B && v.size(1) == H && v.size(2) == Nk, op, ": v must be [B, H, Nk, Dv] with [B, H, Nk] = [",
              B, ", ", H, ", ", Nk, "] from q and k, got shape ", v.sizes());

  // head_dim: the float operand fixes it; with both operands packed the caller must say it.
  const bool q_bits = q.scalar_type() == at::kInt, k_bits = k.scalar_type() == at::kInt;
  int64_t d = head_dim;
  if (!q_bits) {
    BINFORMER_CHECK(head_dim <= 0 || head_dim == q.size(3), op, ": head_dim = ", head_dim,
                " does not match the last dim of the float q, ", q.size(3));
    d = q.size(3);
  }
  if (!k_bits) {
    BINFORMER_CHECK(d <= 0 || d == k.size(3), op, ": the last dim of k (", k.size(3), ") must equal head_dim = ", d);
    d = k.size(3);
  }
  BINFORMER_CHECK(d > 0, op, ": head_dim is required when q and k are both packed int32 bits");
  check_head_dim(d, op, "head_dim (d)");
  check_head_dim(Dv, op, "the last dim of v (Dv)");
  if (q_bits) check_packed_width(q, d, op, "q");
  if (k_bits) check_packed_width(k, d, op, "k");
  check_last_dim_contiguous(q, op, "q");
  check_last_dim_contiguous(k, op, "k");
  check_last_dim_contiguous(v, op, "v");
  BINFORMER_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);

  OptionalInputs opt = prepare_optional_inputs(op, q, B, H, Nq, Nk, q_scale, k_scale, bias, rel_pos_table,
                                               rel_pos_wh, rel_pos_ww, num_prefix_tokens);

  AttentionFwdCall c;
  c.out = at::empty({B, H, Nq, Dv}, v.options());
  c.lse = at::empty({B, H, Nq}, v.options().dtype(at::kFloat));
  if (B * H * Nq == 0) {
    c.trivial = true;  // nothing to compute: empty out / lse of the right shapes
    return c;
  }
  if (Nk == 0) {
    // Every row sums over no keys: the fully-masked-row rule (out = 0, lse = -inf).
    c.out.zero_();
    c.lse.fill_(-std::numeric_limits<float>::infinity());
    c.trivial = true;
    return c;
  }

  AttentionFwdParams& p = c.params;
  p.B = B;
  p.H = H;
  p.Nq = Nq;
  p.Nk = Nk;
  p.head_dim = static_cast<int>(d);
  p.v_dim = static_cast<int>(Dv);
  p.q = q.data_ptr();
  p.q_dtype = kernel_dtype(q, "q");
  copy_strides(p.q_stride, q);
  p.k = k.data_ptr();
  p.k_dtype = kernel_dtype(k, "k");
  copy_strides(p.k_stride, k);
  p.out = c.out.data_ptr();
  p.out_dtype = kernel_dtype(c.out, "out");
  copy_strides(p.out_stride, c.out);
  p.lse = c.lse.data_ptr<float>();
  fill_optional_params(p, opt);
  keep(c.keep_alive, opt);
  p.scale = static_cast<float>(scale);
  p.causal = is_causal;
  p.pv_int8 = pv_int8;

  if (pv_int8) {
    // Symmetric int8 per (b, h, channel) over the tokens, in fp32 torch ops (the reference
    // repeats exactly these steps): dq = amax|V| / 127, V_q = round(V / dq). An all-zero
    // channel has dq = 0 and V_q = 0 (0/0 -> NaN -> 0). Non-finite V gives a non-finite dq,
    // which carries the non-finite value into that channel of the output.
    at::Tensor dq, v_q;
    if (v.is_cpu()) {
      // The same steps in one CPU kernel (two passes over V instead of eight torch ops with
      // their temporaries: ~10% of a pv_int8 forward at N = 4096).
      dq = at::empty({B, H, Dv}, v.options().dtype(at::kFloat));
      v_q = at::empty({B, H, Nk, Dv}, v.options().dtype(at::kChar));
      cpu::QuantizeVParams qp;
      qp.B = B; qp.H = H; qp.N = Nk; qp.dv = int(Dv);
      qp.v = v.data_ptr(); qp.v_dtype = kernel_dtype(v, "v");
      for (int i = 0; i < 3; ++i) qp.v_stride[i] = v.stride(i);
      qp.v_q = v_q.data_ptr<int8_t>();
      qp.dequant = dq.data_ptr<float>();
      cpu::quantize_v_int8(qp);
    } else {
      const at::Tensor v32 = v.to(at::kFloat);
      dq = v32.abs().amax({2}).div(127.0).contiguous();  // [B, H, Dv]
      v_q = at::nan_to_num(at::round(v32.div(dq.unsqueeze(2))), 0.0, 127.0, -127.0)
                .clamp(-127, 127)
                .to(at::kChar)
                .contiguous();
    }
    c.keep_alive.push_back(dq);
    c.keep_alive.push_back(v_q);
    p.v = v_q.data_ptr();
    p.v_dtype = DType::kInt8;
    copy_strides(p.v_stride, v_q);
    p.v_dequant = dq.data_ptr<float>();
  } else {
    p.v = v.data_ptr();
    p.v_dtype = kernel_dtype(v, "v");
    copy_strides(p.v_stride, v);
  }
  return c;
}

// -------------------------------------------------------------------------------- attention_bwd
BwdGrads AttentionBwdCall::as_tuple() const {
  return {grads[0], grads[1], grads[2], grads[3], grads[4], grads[5], grads[6]};
}

AttentionBwdCall prepare_attention_bwd(const at::Tensor& dout, const at::Tensor& q_bits, const at::Tensor& k_bits,
                                       const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                       const std::optional<at::Tensor>& q_scale,
                                       const std::optional<at::Tensor>& k_scale,
                                       const std::optional<at::Tensor>& bias,
                                       const std::optional<at::Tensor>& rel_pos_table, int64_t rel_pos_wh,
                                       int64_t rel_pos_ww, int64_t num_prefix_tokens, int64_t head_dim,
                                       double scale, bool is_causal, std::array<bool, kNumBwdOutputs> output_mask) {
  constexpr const char* op = "binformer::attention_bwd";
  for (auto [t, name] : {std::pair{&dout, "dout"}, {&q_bits, "q_bits"}, {&k_bits, "k_bits"}, {&v, "v"},
                         {&out, "out"}, {&lse, "lse"}})
    check_defined(*t, op, name);
  BINFORMER_CHECK(q_bits.scalar_type() == at::kInt, op, ": q_bits must be int32 packed sign bits, got ",
              q_bits.scalar_type());
  BINFORMER_CHECK(k_bits.scalar_type() == at::kInt, op, ": k_bits must be int32 packed sign bits, got ",
              k_bits.scalar_type());
  BINFORMER_CHECK(is_float_dtype(v.scalar_type()), op, ": v must be fp32, fp16 or bf16, got ", v.scalar_type());
  BINFORMER_CHECK(out.scalar_type() == v.scalar_type(), op, ": out must have v's dtype ", v.scalar_type(), ", got ",
              out.scalar_type());
  BINFORMER_CHECK(dout.scalar_type() == v.scalar_type(), op, ": dout must have v's dtype ", v.scalar_type(), ", got ",
              dout.scalar_type());
  BINFORMER_CHECK(lse.scalar_type() == at::kFloat, op, ": lse must be fp32, got ", lse.scalar_type());
  for (auto [t, name] : {std::pair{&dout, "dout"}, {&k_bits, "k_bits"}, {&v, "v"}, {&out, "out"}, {&lse, "lse"}})
    check_same_device(*t, q_bits, op, name, "q_bits");
  check_rank(q_bits, 4, op, "q_bits", "[B, H, Nq, ceil(d/32)]");
  check_rank(k_bits, 4, op, "k_bits", "[B, H, Nk, ceil(d/32)]");
  check_rank(v, 4, op, "v", "[B, H, Nk, Dv]");
  const int64_t B = q_bits.size(0), H = q_bits.size(1), Nq = q_bits.size(2), Nk = k_bits.size(2), Dv = v.size(3);
  BINFORMER_CHECK(k_bits.size(0) == B && k_bits.size(1) == H, op, ": k_bits must have the [B, H] = [", B, ", ", H,
              "] of q_bits, got shape ", k_bits.sizes());
  BINFORMER_CHECK(v.size(0) == B && v.size(1) == H && v.size(2) == Nk, op, ": v must be [B, H, Nk, Dv] = [", B, ", ",
              H, ", ", Nk, ", Dv], got shape ", v.sizes());
  BINFORMER_CHECK(out.sizes() == at::IntArrayRef({B, H, Nq, Dv}), op, ": out must be [B, H, Nq, Dv] = [", B, ", ", H,
              ", ", Nq, ", ", Dv, "], got shape ", out.sizes());
  BINFORMER_CHECK(dout.sizes() == out.sizes(), op, ": dout must have out's shape ", out.sizes(), ", got ", dout.sizes());
  BINFORMER_CHECK(lse.sizes() == at::IntArrayRef({B, H, Nq}), op, ": lse must be [B, H, Nq] = [", B, ", ", H, ", ", Nq,
              "], got shape ", lse.sizes());
  BINFORMER_CHECK(head_dim > 0, op, ": head_dim is required (q_bits and k_bits are packed)");
  check_head_dim(head_dim, op, "head_dim (d)");
  check_head_dim(Dv, op, "the last dim of v (Dv)");
  check_packed_width(q_bits, head_dim, op, "q_bits");
  check_packed_width(k_bits, head_dim, op, "k_bits");
  for (auto [t, name] : {std::pair{&dout, "dout"}, {&q_bits, "q_bits"}, {&k_bits, "k_bits"}, {&v, "v"}, {&out, "out"}})
    check_last_dim_contiguous(*t, op, name);
  BINFORMER_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);

  OptionalInputs opt = prepare_optional_inputs(op, q_bits, B, H, Nq, Nk, q_scale, k_scale, bias, rel_pos_table,
                                               rel_pos_wh, rel_pos_ww, num_prefix_tokens);
  BINFORMER_CHECK(!output_mask[kDrelPosTable] || opt.rel_pos_table.defined(), op,
              ": output_mask asks for drel_pos_table but rel_pos_table is absent");

  AttentionBwdCall c;
  const auto f32 = v.options().dtype(at::kFloat);
  const std::array<std::vector<int64_t>, kNumBwdOutputs> shapes = {{
      {B, H, Nk, Dv},
      {B, H, Nq},
      {B, H, Nk},
      {B, H, Nq, head_dim},
      {B, H, Nk, head_dim},
      {B, H, Nq, Nk},
      {H, opt.rel_pos_table.defined() ? opt.rel_pos_table.size(1) : 0},
  }};
  for (int i = 0; i < kNumBwdOutputs; ++i)
    c.grads[i] = output_mask[i] ? at::empty(shapes[i], f32) : at::empty({0}, f32);

  if (B * H * Nq == 0 || Nk == 0) {
    // No score element exists, so every wanted gradient is zero.
    for (int i = 0; i < kNumBwdOutputs; ++i)
      if (output_mask[i]) c.grads[i].zero_();
    c.trivial = true;
    return c;
  }

  const at::Tensor lse_c = lse.contiguous();
  c.keep_alive.push_back(lse_c);
  AttentionBwdParams& p = c.params;
  p.B = B;
  p.H = H;
  p.Nq = Nq;
  p.Nk = Nk;
  p.head_dim = static_cast<int>(head_dim);
  p.v_dim = static_cast<int>(Dv);
  p.q_bits = reinterpret_cast<const uint32_t*>(q_bits.data_ptr<int32_t>());
  copy_strides(p.q_stride, q_bits);
  p.k_bits = reinterpret_cast<const uint32_t*>(k_bits.data_ptr<int32_t>());
  copy_strides(p.k_stride, k_bits);
  p.v = v.data_ptr();
  p.v_dtype = kernel_dtype(v, "v");
  copy_strides(p.v_stride, v);
  p.out = out.data_ptr();
  copy_strides(p.out_stride, out);
  p.dout = dout.data_ptr();
  copy_strides(p.dout_stride, dout);
  p.lse = lse_c.data_ptr<float>();
  fill_optional_params(p, opt);
  keep(c.keep_alive, opt);
  p.scale = static_cast<float>(scale);
  p.causal = is_causal;
  auto ptr = [&](int i) { return output_mask[i] ? c.grads[i].data_ptr<float>() : nullptr; };
  p.dv = ptr(kDv);
  p.dq_scale = ptr(kDqScale);
  p.dk_scale = ptr(kDkScale);
  p.dq_sign = ptr(kDqSign);
  p.dk_sign = ptr(kDkSign);
  p.dbias = ptr(kDbias);
  p.drel_pos_table = ptr(kDrelPosTable);
  return c;
}

}  // namespace binformer::binding
