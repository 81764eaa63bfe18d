// GoogleTest of binformer::cuda::attention_bwd against a float64 host reference.
//
// Each case builds random q, k (kept as packed sign bits), v, per-token / broadcast scales,
// optional dense bias (with -inf entries and fully masked rows) and rel-pos table, runs the
// forward in float64 to get lse and O (rounded to fp32 / v's dtype: exactly the inputs the
// backward receives from the forward), draws dO, and compares all seven outputs with the float64
// backward of the same math. Outputs and workspace are poisoned (0xff bytes = NaN) first and 64
// guard floats after each output must stay poisoned. Each case runs twice and every output must
// match bit for bit (determinism); a run with only the "hamming" outputs (dv, dq_scale,
// dk_scale) must reproduce those outputs bit for bit as well.
//
// Tolerances (checked per element as |got - want| <= rtol * M + 1e-6 * max(M), where M is the
// float64 sum of the absolute values of the terms of that element, so cancellation cannot make a
// test pass or fail by luck):
//  * fp32 quantities (P, dP, D, dS and every sum of dS: dq_scale, dk_scale, dbias, drel): the
//    kernel's S has absolute error ~ |S| 2^-23 (dot is exact; the scale product, bias and lse
//    are fp32), ex2.approx adds 2^-22 relative, dP and D are fp32 sums of Dv exact products
//    (<= Dv 2^-24 relative to their magnitude), and the final sums add <= N 2^-24 relative:
//    rtol_f = 1e-4 + N * 6e-8 covers all of it with margin, yet a single wrong or missing
//    element of a row (about M / N for N <= 5000) exceeds it.
//  * tensor-core matmul operands rounded to the input type (P for dV, dS * scalar for the sign
//    gradients): one rounding of 2^-11 (fp16) or 2^-8 (bf16) relative per term, on top of rtol_f.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <limits>
#include <random>
#include <sstream>
#include <string>

#include "attention_bwd_reference.h"
#include "binformer/cuda_kernels.h"
#include "cuda_test_helpers.h"

namespace binformer::test {
namespace {

// ---------------------------------------------------------------- device run
constexpr size_t kGuard = 64;

// Runs attention_bwd with the outputs of `mask` (params order: dv, dq_scale, dk_scale, dq_sign,
// dk_sign, dbias, drel) and returns them (empty when not wanted). Checks the guard floats.
void run_device(const Problem& p, const bool (&mask)[7], Outputs& o) {
  const BwdCase& c = p.c;
  DeviceBuffer<uint32_t> q_bits(p.q_bits.size()), k_bits(p.k_bits.size());
  BF_ASSERT_CUDA(q_bits.upload(p.q_bits));
  BF_ASSERT_CUDA(k_bits.upload(p.k_bits));
  DeviceBuffer<uint8_t> v(p.v.bytes.size()), out(p.out.bytes.size()), dout(p.dout.bytes.size());
  BF_ASSERT_CUDA(v.upload(p.v.bytes));
  BF_ASSERT_CUDA(out.upload(p.out.bytes));
  BF_ASSERT_CUDA(dout.upload(p.dout.bytes));
  DeviceBuffer<float> lse(p.lse.size()), q_scale(p.q_scale.size()), k_scale(p.k_scale.size()), table(p.table.size());
  BF_ASSERT_CUDA(lse.upload(p.lse));
  if (!p.q_scale.empty()) BF_ASSERT_CUDA(q_scale.upload(p.q_scale));
  if (!p.k_scale.empty()) BF_ASSERT_CUDA(k_scale.upload(p.k_scale));
  if (!p.table.empty()) BF_ASSERT_CUDA(table.upload(p.table));
  DeviceBuffer<uint8_t> bias(p.bias.bytes.size());
  if (c.dense_bias) BF_ASSERT_CUDA(bias.upload(p.bias.bytes));

  size_t sizes[7];
  output_sizes(p, sizes);
  DeviceBuffer<float> outs[7];
  float* out_ptrs[7] = {};
  for (int k = 0; k < 7; ++k) {
    if (mask[k]) {
      BF_ASSERT_CUDA(outs[k].reset(sizes[k] + kGuard));
      BF_ASSERT_CUDA(outs[k].poison(0xff));
      out_ptrs[k] = outs[k].get();
    }
  }
  const InputPointers in{q_bits.get(), k_bits.get(), v.get(), out.get(), dout.get(), lse.get(),
                         q_scale.get(), k_scale.get(), table.get(), bias.get()};
  AttentionBwdParams prm = make_params(p, in, out_ptrs);
  const size_t ws_bytes = cuda::attention_bwd_workspace_bytes(prm);
  DeviceBuffer<uint8_t> ws(ws_bytes);
  BF_ASSERT_CUDA(ws.poison(0xff));
  prm.workspace = ws_bytes ? ws.get() : nullptr;
  BF_ASSERT_CUDA(cuda::attention_bwd(prm, nullptr));
  BF_ASSERT_CUDA(cudaDeviceSynchronize());

  for (int k = 0; k < 7; ++k) {
    o.at(k).clear();
    if (!mask[k]) continue;
    std::vector<float> all;
    BF_ASSERT_CUDA(outs[k].download(all));
    size_t guard_bad = 0;
    for (size_t e = sizes[k]; e < sizes[k] + kGuard; ++e) {
      uint32_t u;
      std::memcpy(&u, &all[e], 4);
      guard_bad += u != 0xffffffffu;
    }
    EXPECT_EQ(guard_bad, 0u) << kOutputNames[k] << ": writes past the end of the output";
    all.resize(sizes[k]);
    o.at(k) = std::move(all);
  }
}

void expect_bitwise_equal(const char* name, const std::vector<float>& a, const std::vector<float>& b) {
  ASSERT_EQ(a.size(), b.size()) << name;
  if (a.empty()) return;
  size_t first = a.size();
  for (size_t e = 0; e < a.size(); ++e) {
    if (std::memcmp(&a[e], &b[e], 4) != 0) { first = e; break; }
  }
  EXPECT_EQ(first, a.size()) << name << ": runs differ first at element " << first << ": " << a[first]
                             << " vs " << b[first];
}

void run_case(const BwdCase& c, std::mt19937_64& rng) {
  SCOPED_TRACE(describe(c));
  const Problem p = build_problem(c, rng);
  const bool has_rel = c.rel_wh > 0;
  const bool all[7] = {true, true, true, true, true, c.dense_bias || has_rel, has_rel};
  Outputs first, second, hamming;
  run_device(p, all, first);
  if (::testing::Test::HasFatalFailure()) return;
  run_device(p, all, second);
  if (::testing::Test::HasFatalFailure()) return;
  const bool hamming_mask[7] = {true, true, true, false, false, false, false};
  run_device(p, hamming_mask, hamming);
  if (::testing::Test::HasFatalFailure()) return;
  // Without dq_scale there is no partial dq_scale buffer: nothing may be written there (the
  // v2 main pass once did, found by pytest's q_scale=None cases).
  Outputs no_dq;
  const bool no_dq_mask[7] = {true, false, true, false, false, false, false};
  run_device(p, no_dq_mask, no_dq);
  if (::testing::Test::HasFatalFailure()) return;

  // Determinism: the same inputs give the same bits; the hamming-only run shares its pass.
  expect_bitwise_equal("dv (run 2)", first.dv, second.dv);
  expect_bitwise_equal("dq_scale (run 2)", first.dq_scale, second.dq_scale);
  expect_bitwise_equal("dk_scale (run 2)", first.dk_scale, second.dk_scale);
  expect_bitwise_equal("dq_sign (run 2)", first.dq_sign, second.dq_sign);
  expect_bitwise_equal("dk_sign (run 2)", first.dk_sign, second.dk_sign);
  expect_bitwise_equal("dbias (run 2)", first.dbias, second.dbias);
  expect_bitwise_equal("drel (run 2)", first.drel, second.drel);
  expect_bitwise_equal("dv (hamming-only run)", first.dv, hamming.dv);
  expect_bitwise_equal("dq_scale (hamming-only run)", first.dq_scale, hamming.dq_scale);
  expect_bitwise_equal("dk_scale (hamming-only run)", first.dk_scale, hamming.dk_scale);
  expect_bitwise_equal("dv (run without dq_scale)", first.dv, no_dq.dv);
  expect_bitwise_equal("dk_scale (run without dq_scale)", first.dk_scale, no_dq.dk_scale);

  if (!c.check_reference) return;
  for (const std::string& failure : check_against_reference(p, first)) ADD_FAILURE() << failure;
}

// ---------------------------------------------------------------- the cases
TEST(AttentionBwd, TensorCoreHeadDims) {
  BF_REQUIRE_GPU();
  std::mt19937_64 rng(11);
  for (DType t : {DType::kFloat16, DType::kBFloat16}) {
    BwdCase c;
    c.v_dtype = t;
    c.B = 2; c.H = 3; c.Nq = 37; c.Nk = 53; c.d = 64; c.dv = 64;
    c.q_scale = ScaleMode::kPerToken; c.k_scale = ScaleMode::kPerToken;
    run_case(c, rng);
    c.B = 1; c.H = 2; c.Nq = 130; c.Nk = 129; c.d = 128; c.dv = 128;
    c.q_scale = ScaleMode::kPerHead; c.k_scale = ScaleMode::kNone;
    run_case(c, rng);
    c.Nq = 65; c.Nk = 70; c.d = 72; c.dv = 40;  // hdim128 bucket, Dv not a multiple of 16
    run_case(c, rng);
    c.Nq = 70; c.Nk = 90; c.d = 24; c.dv = 16;  // small dims: one word, one k-step
    c.k_scale = ScaleMode::kPerToken;
    run_case(c, rng);
    c.Nq = 33; c.Nk = 47; c.d = 256; c.dv = 256;  // generic bucket
    run_case(c, rng);
    c.Nq = 40; c.Nk = 41; c.d = 160; c.dv = 200;
    run_case(c, rng);
    if (HasFailure()) return;
  }
}

TEST(AttentionBwd, CausalAndUnequalLengths) {
  BF_REQUIRE_GPU();
  std::mt19937_64 rng(12);
  for (DType t : {DType::kFloat16, DType::kBFloat16}) {
    BwdCase c;
    c.v_dtype = t;
    c.causal = true;
    c.B = 1; c.H = 2; c.Nq = 300; c.Nk = 300; c.d = 64; c.dv = 64;
    c.q_scale = ScaleMode::kPerToken; c.k_scale = ScaleMode::kPerToken;
    run_case(c, rng);
    c.Nq = 100; c.Nk = 260;  // keys past the last query: fully masked key blocks
    run_case(c, rng);
    c.Nq = 260; c.Nk = 100;
    c.d = 128; c.dv = 64;
    run_case(c, rng);
    c.causal = false;
    c.Nq = 1; c.Nk = 200;
    run_case(c, rng);
    c.Nq = 200; c.Nk = 1;
    run_case(c, rng);
    if (HasFailure()) return;
  }
}

TEST(AttentionBwd, DenseBiasMaskedRowsAndLayouts) {
  BF_REQUIRE_GPU();
  std::mt19937_64 rng(13);
  for (DType bt : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    BwdCase c;
    c.v_dtype = bt == DType::kBFloat16 ? DType::kBFloat16 : DType::kFloat16;
    c.B = 2; c.H = 2; c.Nq = 77; c.Nk = 93; c.d = 64; c.dv = 32;
    c.dense_bias = true; c.bias_dtype = bt; c.masked_rows = true;
    c.q_scale = ScaleMode::kPerToken;
    run_case(c, rng);
    c.bias_broadcast_batch = true;
    c.bnhd_layout = true;
    c.causal = true;
    run_case(c, rng);
    if (HasFailure()) return;
  }
}

TEST(AttentionBwd, RelativePositionTable) {
  BF_REQUIRE_GPU();
  std::mt19937_64 rng(14);
  for (DType t : {DType::kFloat16, DType::kBFloat16}) {
    BwdCase c;
    c.v_dtype = t;
    c.B = 2; c.H = 3; c.d = 64; c.dv = 64;
    c.q_scale = ScaleMode::kPerHead; c.k_scale = ScaleMode::kPerHead;  // BinaryAttention's alphas
    c.rel_wh = 5; c.rel_ww = 7; c.num_prefix = 1;
    c.Nq = c.Nk = 1 + 35;
    run_case(c, rng);
    c.rel_wh = 14; c.rel_ww = 14;  // ViT-S/16 at 224: 197 tokens, several key blocks
    c.Nq = c.Nk = 197;
    c.B = 1;
    run_case(c, rng);
    c.rel_wh = 8; c.rel_ww = 9; c.num_prefix = 0;  // no cls token
    c.Nq = c.Nk = 72;
    c.dense_bias = true;  // both biases at once
    c.d = 128; c.dv = 96;
    run_case(c, rng);
    if (HasFailure()) return;
  }
}

TEST(AttentionBwd, CudaCorePath) {
  BF_REQUIRE_GPU();
  std::mt19937_64 rng(15);
  BwdCase c;
  c.v_dtype = DType::kFloat32;
  c.B = 2; c.H = 2; c.Nq = 45; c.Nk = 70; c.d = 64; c.dv = 48;
  c.q_scale = ScaleMode::kPerToken; c.k_scale = ScaleMode::kPerToken;
  run_case(c, rng);
  c.causal = true; c.Nq = 70; c.Nk = 45; c.d = 256; c.dv = 256;
  run_case(c, rng);
  c.causal = false;
  c.rel_wh = 6; c.rel_ww = 5; c.num_prefix = 1; c.Nq = c.Nk = 31;
  c.d = 40; c.dv = 24;
  c.dense_bias = true; c.masked_rows = true;
  run_case(c, rng);
  // fp16 / bf16 whose v pointer breaks 16-byte alignment: the CUDA-core path too.
  for (DType t : {DType::kFloat16, DType::kBFloat16}) {
    BwdCase m;
    m.v_dtype = t;
    m.v_offset = 3;
    m.B = 1; m.H = 3; m.Nq = 50; m.Nk = 66; m.d = 96; m.dv = 64; m.causal = true;
    m.k_scale = ScaleMode::kPerToken;
    run_case(m, rng);
  }
}

TEST(AttentionBwd, LongerSequences) {
  BF_REQUIRE_GPU();
  std::mt19937_64 rng(16);
  BwdCase c;
  c.B = 1; c.H = 2; c.Nq = 640; c.Nk = 700; c.d = 64; c.dv = 64;
  c.q_scale = ScaleMode::kPerToken; c.k_scale = ScaleMode::kPerToken;
  run_case(c, rng);
  c.v_dtype = DType::kBFloat16; c.causal = true; c.d = 128; c.dv = 128; c.Nq = c.Nk = 513;
  run_case(c, rng);
  // Determinism only (no float64 reference) at a size where many CTAs run concurrently.
  BwdCase big;
  big.B = 2; big.H = 4; big.Nq = big.Nk = 2048; big.d = 64; big.dv = 64;
  big.q_scale = ScaleMode::kPerToken; big.k_scale = ScaleMode::kPerToken;
  big.check_reference = false;
  run_case(big, rng);
}

// The v2 main pass (bwd_main.cuh: no bias / rel-pos, head dims <= 128) on shapes that reach its
// corners: extended-bit words past 4 and d % 32 != 0 (complemented, masked words), one bit word,
// causal chunks skipped per warp with Nq > Nk and Nq < Nk, tiles straddling Nq and Nk, hdim128's
// 8-warp shape. (Run the whole suite once with BINFORMER_BWD_MAIN_V1=1 to test v1's main pass on
// the same cases.)
void run_main_pass_v2_shapes(std::mt19937_64& rng) {
  for (DType t : {DType::kFloat16, DType::kBFloat16}) {
    BwdCase c;
    c.v_dtype = t;
    c.q_scale = ScaleMode::kPerToken; c.k_scale = ScaleMode::kPerToken;
    c.B = 2; c.H = 2; c.Nq = 200; c.Nk = 260; c.d = 128; c.dv = 128; c.causal = true;
    run_case(c, rng);
    c.causal = false; c.Nq = 130; c.Nk = 70; c.d = 96; c.dv = 72;
    run_case(c, rng);
    c.causal = true; c.Nq = 300; c.Nk = 140; c.d = 40; c.dv = 64; c.q_scale = ScaleMode::kNone;
    run_case(c, rng);
    c.causal = false; c.Nq = 1; c.Nk = 150; c.d = 8; c.dv = 8; c.q_scale = ScaleMode::kPerToken;
    run_case(c, rng);
    c.Nq = 129; c.Nk = 1; c.d = 32; c.dv = 48;
    run_case(c, rng);
    c.Nq = 1100; c.Nk = 1030; c.d = 64; c.dv = 64; c.causal = true;  // many tiles, partial last ones
    run_case(c, rng);
    c.Nq = 257; c.Nk = 385; c.d = 72; c.dv = 72; c.causal = false;  // DiT-like d = 72
    run_case(c, rng);
    if (::testing::Test::HasFailure()) return;
  }
}

TEST(AttentionBwd, MainPassV2Shapes) {
  BF_REQUIRE_GPU();
  std::mt19937_64 rng(17);
  run_main_pass_v2_shapes(rng);
}

// The same shapes with the v2 main-pass variants that runtime switches select (read on every
// launch): BINFORMER_BWD_MAIN_PIPE=1 (pipelined chunks, 3-stage ring of query tiles),
// BINFORMER_BWD_MAIN_NARROW=1 (hdim 64: 1 m-tile per warp, 8 warps per CTA) and both, plus
// determinism-only cases where many CTAs run per SM and the tile ring wraps many times.
// BINFORMER_BWD_MAIN_WGMMA is on by default on sm_90 devices with sm_90a code (and then
// overrides PIPE / NARROW at hdim 64), so the mma.sync variants set it to 0 themselves.
struct ScopedEnv {
  const char* name;
  ScopedEnv(const char* n, const char* value) : name(n) {
    if (value) setenv(name, value, 1);
    else unsetenv(name);
  }
  ScopedEnv(const char* n, bool on) : ScopedEnv(n, on ? "1" : nullptr) {}
  ~ScopedEnv() { unsetenv(name); }
};

// wgmma: the value of BINFORMER_BWD_MAIN_WGMMA ("0" = the mma.sync kernels; nullptr = the default).
// wgmma128: the value of BINFORMER_BWD_MAIN_WGMMA128 (hdim-128 bucket on wgmma; unset = on).
void run_main_pass_v2_variant(bool pipe, bool narrow, const char* wgmma = "0", const char* wgmma128 = nullptr) {
  const ScopedEnv env_pipe("BINFORMER_BWD_MAIN_PIPE", pipe), env_narrow("BINFORMER_BWD_MAIN_NARROW", narrow);
  const ScopedEnv env_wgmma("BINFORMER_BWD_MAIN_WGMMA", wgmma), env_w128("BINFORMER_BWD_MAIN_WGMMA128", wgmma128);
  SCOPED_TRACE(std::string("BINFORMER_BWD_MAIN_PIPE=") + (pipe ? "1" : "0") +
               " BINFORMER_BWD_MAIN_NARROW=" + (narrow ? "1" : "0") +
               " BINFORMER_BWD_MAIN_WGMMA=" + (wgmma ? wgmma : "(unset)") +
               " BINFORMER_BWD_MAIN_WGMMA128=" + (wgmma128 ? wgmma128 : "(unset)"));
  std::mt19937_64 rng(17);
  run_main_pass_v2_shapes(rng);
  if (::testing::Test::HasFailure()) return;
  BwdCase big;
  big.B = 2; big.H = 4; big.Nq = big.Nk = 2048; big.d = 64; big.dv = 64;
  big.q_scale = ScaleMode::kPerToken; big.k_scale = ScaleMode::kPerToken;
  big.check_reference = false;
  run_case(big, rng);
  big.causal = true; big.v_dtype = DType::kBFloat16; big.Nq = big.Nk = 1500; big.d = big.dv = 128;
  run_case(big, rng);
  if (wgmma128 != nullptr) {  // the other hdim-128 widths: Dv 80 (DiT's 72 pads to it) and 96
    big.causal = false; big.v_dtype = DType::kFloat16; big.Nq = big.Nk = 1024; big.d = big.dv = 72;
    run_case(big, rng);
    big.d = 128; big.dv = 96;
    run_case(big, rng);
    BwdCase c;  // Dv = 96 against the reference (64B-swizzled dO), two key blocks, partial tiles
    c.B = 1; c.H = 2; c.Nq = 150; c.Nk = 200; c.d = 80; c.dv = 96;
    c.q_scale = ScaleMode::kPerHead; c.k_scale = ScaleMode::kPerToken;
    run_case(c, rng);
    c.v_dtype = DType::kBFloat16; c.causal = true; c.Nq = c.Nk = 333; c.d = 128;
    run_case(c, rng);
  }
}

// The default v2 kernels with wgmma switched off: what sm_80 and every non-sm_90a case run.
TEST(AttentionBwd, MainPassV2MmaSync) {
  BF_REQUIRE_GPU();
  run_main_pass_v2_variant(false, false);
}

TEST(AttentionBwd, MainPassV2Pipelined) {
  BF_REQUIRE_GPU();
  run_main_pass_v2_variant(true, false);
}

TEST(AttentionBwd, MainPassV2Narrow) {
  BF_REQUIRE_GPU();
  run_main_pass_v2_variant(false, true);
  if (HasFailure()) return;
  run_main_pass_v2_variant(true, true);
}

// BINFORMER_BWD_MAIN_WGMMA=1 (the default: dV on wgmma at hdim 64), =2 (dV and dP) (sm_90 devices
// with sm_90a code; elsewhere the switch falls back to the other kernels, so this repeats
// MainPassV2MmaSync there).
TEST(AttentionBwd, MainPassV2Wgmma) {
  BF_REQUIRE_GPU();
  run_main_pass_v2_variant(false, false, "1");
  if (HasFailure()) return;
  run_main_pass_v2_variant(false, false, nullptr);  // unset = the default
  if (HasFailure()) return;
  run_main_pass_v2_variant(false, false, "2");  // dP on wgmma as well
}

// BINFORMER_BWD_MAIN_WGMMA128=1: the hdim-128 bucket on the sm_90a kernel with dV on wgmma at
// channel widths 80 / 96 / 128 (d = 72 / Dv = 72 runs at 80, Dv = 96 at 96, the rest of the bucket
// at 128), opt-in until measured. Elsewhere it falls back to the mma.sync kernels.
TEST(AttentionBwd, MainPassV2Wgmma128) {
  BF_REQUIRE_GPU();
  run_main_pass_v2_variant(false, false, nullptr, "1");
}

TEST(AttentionBwd, RejectsBadArguments) {
  AttentionBwdParams p{};
  p.B = 1; p.H = 1; p.Nq = 4; p.Nk = 4; p.head_dim = 12; p.v_dim = 8;  // d not a multiple of 8
  EXPECT_EQ(cuda::attention_bwd(p, nullptr), cudaErrorInvalidValue);
  p.head_dim = 64; p.v_dim = 264;
  EXPECT_EQ(cuda::attention_bwd(p, nullptr), cudaErrorInvalidValue);
  p.v_dim = 64; p.v_dtype = DType::kInt8;
  EXPECT_EQ(cuda::attention_bwd(p, nullptr), cudaErrorInvalidValue);
}

// Timing of the backward at the SPEC's reference shape. BINFORMER_BWD_MAIN_V1=1 times v1's main
// pass instead of v2's; BINFORMER_BWD_MAIN_MIN_BLOCKS=3 the 3-CTAs-per-SM build of v2 (hdim 64);
// BINFORMER_BWD_MAIN_PIPE=1 the pipelined v2 main pass (combinable with MIN_BLOCKS=3 or with
// BINFORMER_BWD_MAIN_NARROW=1, the 8-warp 1-m-tile hdim-64 shape; both need
// BINFORMER_BWD_MAIN_WGMMA=0 on the H100); BINFORMER_BWD_MAIN_WGMMA (default 1 on sm_90a: the
// kernel with dV on wgmma at hdim 64; 0 off; 2 dV and dP on wgmma); BINFORMER_BWD_MAIN_WGMMA128=1
// the hdim-128 bucket (the d = 128 lines) on the wgmma dV kernel. Not a pass/fail test: run with
// --gtest_also_run_disabled_tests --gtest_filter='*AttentionBwdBench*' and compare "hamming"
// with FlashAttention-2's backward at the same shape (SPEC target: >= 1.5x faster at N >= 1024).
TEST(AttentionBwdBench, DISABLED_B4H16N4096) {
  BF_REQUIRE_GPU();
  for (int d : {64, 128}) {
    BwdCase c;
    c.B = 4; c.H = 16; c.Nq = c.Nk = 4096; c.d = d; c.dv = d;
    c.q_scale = ScaleMode::kPerToken; c.k_scale = ScaleMode::kPerToken;
    c.check_reference = false;
    const int64_t BH = c.B * c.H;
    // Synthetic inputs on the device (timing does not depend on the values beyond masking).
    DeviceBuffer<uint32_t> q_bits(size_t(BH * c.Nq * words_for(d))), k_bits(size_t(BH * c.Nk * words_for(d)));
    DeviceBuffer<uint16_t> v(size_t(BH * c.Nk * d)), out(size_t(BH * c.Nq * d)), dout(size_t(BH * c.Nq * d));
    DeviceBuffer<float> lse(size_t(BH * c.Nq)), qs(size_t(BH * c.Nq)), ks(size_t(BH * c.Nk));
    BF_ASSERT_CUDA(q_bits.poison(0x5a)); BF_ASSERT_CUDA(k_bits.poison(0x3c));
    BF_ASSERT_CUDA(v.poison(0x30)); BF_ASSERT_CUDA(out.poison(0x30)); BF_ASSERT_CUDA(dout.poison(0x31));
    BF_ASSERT_CUDA(lse.poison(0x41)); BF_ASSERT_CUDA(qs.poison(0x3f)); BF_ASSERT_CUDA(ks.poison(0x3f));
    DeviceBuffer<float> dv(size_t(BH * c.Nk * d)), dq_scale(size_t(BH * c.Nq)), dk_scale(size_t(BH * c.Nk));
    DeviceBuffer<float> dq_sign(size_t(BH * c.Nq * d)), dk_sign(size_t(BH * c.Nk * d));
    for (bool causal : {false, true}) {
      for (int mode = 0; mode < 2; ++mode) {  // 0: hamming (dv, dq_scale, dk_scale); 1: + signs
        AttentionBwdParams p{};
        p.B = c.B; p.H = c.H; p.Nq = c.Nq; p.Nk = c.Nk; p.head_dim = d; p.v_dim = d;
        const int w = words_for(d);
        p.q_bits = q_bits.get(); p.k_bits = k_bits.get();
        p.q_stride[0] = c.H * c.Nq * w; p.q_stride[1] = c.Nq * w; p.q_stride[2] = w;
        p.k_stride[0] = c.H * c.Nk * w; p.k_stride[1] = c.Nk * w; p.k_stride[2] = w;
        p.v = v.get(); p.out = out.get(); p.dout = dout.get(); p.v_dtype = DType::kFloat16;
        for (auto* s : {p.v_stride, p.out_stride, p.dout_stride}) { s[0] = c.H * c.Nq * d; s[1] = c.Nq * d; s[2] = d; }
        p.lse = lse.get();
        p.q_scale = qs.get(); p.q_scale_stride[0] = c.H * c.Nq; p.q_scale_stride[1] = c.Nq; p.q_scale_stride[2] = 1;
        p.k_scale = ks.get(); p.k_scale_stride[0] = c.H * c.Nk; p.k_scale_stride[1] = c.Nk; p.k_scale_stride[2] = 1;
        p.scale = 0.125f; p.causal = causal;
        p.dv = dv.get(); p.dq_scale = dq_scale.get(); p.dk_scale = dk_scale.get();
        if (mode == 1) { p.dq_sign = dq_sign.get(); p.dk_sign = dk_sign.get(); }
        DeviceBuffer<uint8_t> ws(cuda::attention_bwd_workspace_bytes(p));
        p.workspace = ws.get();
        cudaEvent_t start, stop;
        BF_ASSERT_CUDA(cudaEventCreate(&start));
        BF_ASSERT_CUDA(cudaEventCreate(&stop));
        for (int i = 0; i < 3; ++i) BF_ASSERT_CUDA(cuda::attention_bwd(p, nullptr));
        const int iters = 10;
        BF_ASSERT_CUDA(cudaEventRecord(start));
        for (int i = 0; i < iters; ++i) BF_ASSERT_CUDA(cuda::attention_bwd(p, nullptr));
        BF_ASSERT_CUDA(cudaEventRecord(stop));
        BF_ASSERT_CUDA(cudaEventSynchronize(stop));
        float ms = 0;
        BF_ASSERT_CUDA(cudaEventElapsedTime(&ms, start, stop));
        std::printf("attention_bwd B=4 H=16 N=4096 d=Dv=%d fp16 %s %s: %.3f ms\n", d,
                    causal ? "causal" : "full", mode == 0 ? "hamming (dv, dq_scale, dk_scale)" : "all (+ dq_sign, dk_sign)",
                    ms / iters);
        cudaEventDestroy(start);
        cudaEventDestroy(stop);
      }
    }
  }
}

}  // namespace
}  // namespace binformer::test
