// Runs the attention_bwd kernels (the real kernel source, compiled as C++ with the host emulation
// of bwd_emulation.h) on small problems and compares all seven outputs with the float64 reference
// of the GoogleTest (attention_bwd_reference.h), with the same tolerances. This checks the index
// mappings, tiling, masking and reductions of both paths without a GPU; timing and the real
// hardware behaviour (ex2.approx, cp.async ordering) are left to the GoogleTest on the device.
//
// Build and run from the repository root (needs C++20 for std::barrier):
//   g++ -std=c++20 -O2 -pthread -DBINFORMER_BWD_HOST_EMULATION \
//       -Itests/cuda/emulation -Itests/cuda -Icuda/src/attention_bwd -Icpp/include -Icuda/include \
//       tests/cuda/emulation/emulate_attention_bwd.cpp -o /tmp/emulate_attention_bwd
//   /tmp/emulate_attention_bwd            (prints one PASS / FAIL line per case; exit code 1 on failure)
#include <cstdio>
#include <string>
#include <vector>

#include "attention_bwd_reference.h"
#include "bwd_emulation.h"
#include "bwd_host.h"
#include "bwd_prep.cuh"
#include "bwd_simt.cuh"
#include "bwd_tc.cuh"

using namespace binformer;
using namespace binformer::cuda::bwd;
using binformer::test::BwdCase;
using binformer::test::Problem;
using binformer::test::ScaleMode;

namespace {

template <class T, int kHdim, bool kKeyMajor, bool kMainPass>
void tc_pass(const BwdArgs& a) {
  using Tr = tc::Traits<T, kHdim, kKeyMajor, kMainPass>;
  const int64_t n_rows = kKeyMajor ? a.Nk : a.Nq;
  const unsigned blocks = unsigned((n_rows + Tr::kRows - 1) / Tr::kRows * a.B * a.H);
  if (blocks == 0) return;
  const size_t smem = Tr::smem_bytes(kMainPass && a.drel != nullptr, a.rel_table_size);
  bwd_emulation::launch(tc::attention_bwd_tc_kernel<T, kHdim, kKeyMajor, kMainPass>, blocks,
                        unsigned(Tr::kThreads), smem, a);
}

// Which v2 main-pass variant runs (the device reads BINFORMER_BWD_MAIN_PIPE / _NARROW; here every
// v2 case runs with each).
bool g_main_pipe = false, g_main_narrow = false;
int g_main_wgmma = 0;  // 1: dV on wgmma, 2: dV and dP (hdim 64); 1 at hdim 128: the WGMMA128 kernels

template <class T, int kHdim, bool kPipe, bool kNarrow, int kWgmma = 0, int kDvw = kHdim>
void main_v2_variant(const BwdArgs& a) {
  using Tr = tc::MainTraits<T, kHdim, kPipe, kNarrow, kWgmma, kDvw>;
  const unsigned blocks = unsigned((a.Nk + Tr::kRows - 1) / Tr::kRows * a.B * a.H);
  if (blocks == 0) return;
  bwd_emulation::launch(tc::attention_bwd_main_kernel<T, kHdim, Tr::kMinBlocks, kPipe, kNarrow, kWgmma, kDvw>, blocks,
                        unsigned(Tr::kThreads), Tr::kSmemBytes, a);
}

template <class T, int kHdim, bool kPipe>
void main_v2_pipe(const BwdArgs& a) {
  if constexpr (kHdim == 128) {  // (the device launcher's choice of width, launch_main_v2)
    if (g_main_wgmma == 1) {
      switch (tc::wgmma128_width(a.dv_dim)) {
        case 80: return main_v2_variant<T, kHdim, true, false, 1, 80>(a);
        case 96: return main_v2_variant<T, kHdim, true, false, 1, 96>(a);
        default: return main_v2_variant<T, kHdim, true, false, 1, 128>(a);
      }
    }
  }
  if constexpr (kHdim <= 64) {
    if (g_main_wgmma == 2) return main_v2_variant<T, kHdim, true, false, 2>(a);
    if (g_main_wgmma == 1) return main_v2_variant<T, kHdim, true, false, 1>(a);
    if (g_main_narrow) return main_v2_variant<T, kHdim, kPipe, true>(a);
  }
  main_v2_variant<T, kHdim, kPipe, false>(a);
}

template <class T, int kHdim>
void main_v2_pass(const BwdArgs& a) {
  if constexpr (kHdim <= 128) {
    if (g_main_pipe) main_v2_pipe<T, kHdim, true>(a);
    else main_v2_pipe<T, kHdim, false>(a);
  } else {
    std::abort();  // make_bwd_args never picks v2 above hdim 128
  }
}

template <class T, int kHdim>
void tc_passes(const BwdArgs& a) {
  if (a.dv || a.dq_scale || a.dk_scale || a.dbias || a.drel) {
    if (a.main_v2) main_v2_pass<T, kHdim>(a);
    else tc_pass<T, kHdim, true, true>(a);
  }
  if (a.dk_sign) tc_pass<T, kHdim, true, false>(a);
  if (a.dq_sign) tc_pass<T, kHdim, false, false>(a);
}

template <class TIn, bool kKeyMajor, bool kMainPass>
void simt_pass(const BwdArgs& a) {
  const int64_t n_rows = kKeyMajor ? a.Nk : a.Nq;
  const unsigned blocks = unsigned((n_rows + simt::kRows - 1) / simt::kRows * a.B * a.H);
  if (blocks == 0) return;
  const simt::SimtSmem L = simt::SimtSmem::make(a.dv_dim, kMainPass && a.drel != nullptr, a.rel_table_size);
  bwd_emulation::launch(simt::attention_bwd_simt_kernel<TIn, kKeyMajor, kMainPass>, blocks,
                        unsigned(simt::kThreads), size_t(L.total) * 4, a);
}

template <class TIn>
void simt_passes(const BwdArgs& a) {
  if (a.dv || a.dq_scale || a.dk_scale || a.dbias || a.drel) simt_pass<TIn, true, true>(a);
  if (a.dk_sign) simt_pass<TIn, true, false>(a);
  if (a.dq_sign) simt_pass<TIn, false, false>(a);
}

// The sequence of attention_bwd() in attention_bwd.cu, with emulated launches (small grids: the
// prep and finalize kernels are grid-stride loops).
bool emulate_attention_bwd(const AttentionBwdParams& p) {
  if (validate(p) != cudaSuccess) return false;
  const WorkspaceLayout w = layout_for(p);
  const BwdArgs a = make_bwd_args(p, w);
  if (a.B * a.H == 0) return true;
  if (prep_vectorized(a)) {
    if (a.v_dtype == DType::kFloat16) bwd_emulation::launch(attention_bwd_prep_vec_kernel<__half>, 2, kPrepThreads, 0, a);
    else bwd_emulation::launch(attention_bwd_prep_vec_kernel<__nv_bfloat16>, 2, kPrepThreads, 0, a);
  } else switch (a.v_dtype) {
    case DType::kFloat16: bwd_emulation::launch(attention_bwd_prep_kernel<__half>, 2, kPrepThreads, 0, a); break;
    case DType::kBFloat16: bwd_emulation::launch(attention_bwd_prep_kernel<__nv_bfloat16>, 2, kPrepThreads, 0, a); break;
    default: bwd_emulation::launch(attention_bwd_prep_kernel<float>, 2, kPrepThreads, 0, a); break;
  }
  if (w.key_block == kKeyBlockTc) {
    const int hdim = std::max(p.head_dim, p.v_dim);
    const bool fp16 = p.v_dtype == DType::kFloat16;
    if (hdim <= 64) fp16 ? tc_passes<__half, 64>(a) : tc_passes<__nv_bfloat16, 64>(a);
    else if (hdim <= 128) fp16 ? tc_passes<__half, 128>(a) : tc_passes<__nv_bfloat16, 128>(a);
    else fp16 ? tc_passes<__half, 256>(a) : tc_passes<__nv_bfloat16, 256>(a);
  } else {
    switch (a.v_dtype) {
      case DType::kFloat16: simt_passes<__half>(a); break;
      case DType::kBFloat16: simt_passes<__nv_bfloat16>(a); break;
      default: simt_passes<float>(a); break;
    }
  }
  if (a.dq_scale) bwd_emulation::launch(attention_bwd_dq_scale_kernel, 1, 256, 0, a);
  if (a.drel) bwd_emulation::launch(attention_bwd_drel_kernel, 1, 256, 0, a);
  return true;
}

const char* main_v2_label() {
  if (g_main_wgmma == 2) return "tensor cores, main v2 wgmma dV + dP (pipelined)";
  if (g_main_wgmma == 1) return "tensor cores, main v2 wgmma dV (pipelined; hdim 128: WGMMA128)";
  if (g_main_narrow) return g_main_pipe ? "tensor cores, main v2 narrow pipelined" : "tensor cores, main v2 narrow";
  return g_main_pipe ? "tensor cores, main v2 pipelined" : "tensor cores, main v2";
}

bool run_case(const BwdCase& c, std::mt19937_64& rng, bool* was_v2) {
  const Problem p = binformer::test::build_problem(c, rng);
  const bool has_rel = c.rel_wh > 0;
  const bool mask[7] = {true, true, true, true, true, c.dense_bias || has_rel, has_rel};
  size_t sizes[7];
  binformer::test::output_sizes(p, sizes);
  constexpr size_t kGuard = 64;
  std::vector<float> buffers[7];
  float* outs[7] = {};
  for (int k = 0; k < 7; ++k) {
    if (!mask[k]) continue;
    buffers[k].assign(sizes[k] + kGuard, std::numeric_limits<float>::quiet_NaN());
    outs[k] = buffers[k].data();
  }
  const binformer::test::InputPointers in{p.q_bits.data(), p.k_bits.data(), p.v.bytes.data(),
                                          p.out.bytes.data(), p.dout.bytes.data(), p.lse.data(),
                                          p.q_scale.data(), p.k_scale.data(), p.table.data(),
                                          p.bias.bytes.data()};
  AttentionBwdParams prm = binformer::test::make_params(p, in, outs);
  std::vector<unsigned char> workspace(layout_for(prm).total + 256, 0xff);
  prm.workspace = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(workspace.data()) + 255) & ~uintptr_t(255));
  const bool tensor_cores = use_tensor_cores(prm);
  const bool main_v2 = make_bwd_args(prm, layout_for(prm)).main_v2;
  *was_v2 = main_v2;
  if (!emulate_attention_bwd(prm)) {
    std::printf("FAIL  %s: rejected\n", binformer::test::describe(c).c_str());
    return false;
  }
  binformer::test::Outputs o;
  std::vector<std::string> fails;
  for (int k = 0; k < 7; ++k) {
    if (!mask[k]) continue;
    for (size_t e = sizes[k]; e < sizes[k] + kGuard; ++e) {
      if (!std::isnan(buffers[k][e])) {
        fails.push_back(std::string(binformer::test::kOutputNames[k]) + ": write past the end");
        break;
      }
    }
    o.at(k).assign(buffers[k].begin(), buffers[k].begin() + sizes[k]);
  }
  for (auto& f : binformer::test::check_against_reference(p, o)) fails.push_back(f);
  std::printf("%s  [%s] %s\n", fails.empty() ? "PASS" : "FAIL",
              tensor_cores ? (main_v2 ? main_v2_label() : "tensor cores")
                           : "CUDA cores",
              binformer::test::describe(c).c_str());
  for (auto& f : fails) std::printf("      %s\n", f.c_str());
  std::fflush(stdout);
  return fails.empty();
}

}  // namespace

int main(int argc, char** argv) {
  std::mt19937_64 rng(2026);
  std::vector<BwdCase> cases;
  auto add = [&](BwdCase c) { cases.push_back(c); };
  {
    BwdCase c;
    c.B = 1; c.H = 2; c.Nq = 37; c.Nk = 53; c.d = 64; c.dv = 64;
    c.q_scale = ScaleMode::kPerToken; c.k_scale = ScaleMode::kPerToken;
    add(c);
    c.v_dtype = DType::kBFloat16; c.causal = true; c.Nq = 70; c.Nk = 140; c.H = 1;
    add(c);
    c.v_dtype = DType::kFloat16; c.causal = true; c.Nq = 140; c.Nk = 66;
    c.q_scale = ScaleMode::kPerHead; c.k_scale = ScaleMode::kNone;
    add(c);
    c.causal = false; c.Nq = 33; c.Nk = 47; c.d = 72; c.dv = 40; c.H = 2;  // hdim128 bucket
    add(c);
    c.Nq = 20; c.Nk = 17; c.d = 160; c.dv = 200;  // generic bucket
    c.k_scale = ScaleMode::kPerToken;
    add(c);
    c.Nq = 30; c.Nk = 41; c.d = 24; c.dv = 16;
    add(c);
    // Several key blocks and query tiles per head, B > 1: partial dq_scale rows and their
    // causal visiting rule in the finalize kernel.
    c.B = 2; c.H = 1; c.Nq = 150; c.Nk = 200; c.d = 64; c.dv = 64; c.causal = true;
    c.q_scale = ScaleMode::kPerToken;
    add(c);
    c.causal = false; c.v_dtype = DType::kBFloat16;
    add(c);
    c.causal = true; c.B = 1; c.Nq = 90; c.Nk = 150; c.d = 256; c.dv = 136;  // generic, causal
    add(c);
  }
  {
    BwdCase c;  // rel-pos + dense bias with masked rows, cls token
    c.B = 2; c.H = 1; c.d = 64; c.dv = 32;
    c.rel_wh = 5; c.rel_ww = 7; c.num_prefix = 1; c.Nq = c.Nk = 36;
    c.dense_bias = true; c.bias_dtype = DType::kFloat16; c.masked_rows = true; c.bias_broadcast_batch = true;
    c.q_scale = ScaleMode::kPerHead; c.k_scale = ScaleMode::kPerHead;
    add(c);
    c.v_dtype = DType::kBFloat16; c.rel_wh = 9; c.rel_ww = 15; c.num_prefix = 1; c.Nq = c.Nk = 136;
    c.dense_bias = false; c.bnhd_layout = true; c.B = 1;  // two key blocks, three query tiles
    add(c);
    c.rel_wh = 8; c.rel_ww = 9; c.num_prefix = 0; c.Nq = c.Nk = 72; c.d = 128; c.dv = 96;
    add(c);
  }
  {
    BwdCase c;  // CUDA-core path
    c.v_dtype = DType::kFloat32;
    c.B = 1; c.H = 2; c.Nq = 45; c.Nk = 70; c.d = 64; c.dv = 48;
    c.q_scale = ScaleMode::kPerToken; c.k_scale = ScaleMode::kPerToken;
    add(c);
    c.causal = true; c.rel_wh = 6; c.rel_ww = 5; c.num_prefix = 1; c.Nq = c.Nk = 31; c.d = 40; c.dv = 24;
    c.dense_bias = true; c.masked_rows = true;
    add(c);
    BwdCase m;
    m.v_dtype = DType::kFloat16; m.v_offset = 3;
    m.B = 1; m.H = 1; m.Nq = 50; m.Nk = 66; m.d = 96; m.dv = 64; m.causal = true;
    m.k_scale = ScaleMode::kPerToken;
    add(m);
  }
  {
    BwdCase c;  // tests/python random_case(1023): large |S| (d = 256, scale 0.5), generic bucket
    c.B = 2; c.H = 2; c.Nq = c.Nk = 97; c.d = 256; c.dv = 24; c.scale = 0.5;
    c.q_scale = ScaleMode::kPerHead; c.k_scale = ScaleMode::kPerHead;
    c.dense_bias = true; c.bias_dtype = DType::kFloat16; c.bias_broadcast_batch = true;
    add(c);
  }
  {
    // v2 main pass (bwd_main.cuh): extended-bit words past 4 (d > 64), d % 32 != 0 (masked
    // complement words), one word, causal chunks skipped per warp, Nq > Nk and Nq < Nk, several
    // key blocks and query tiles, hdim128's 8-warp shape.
    BwdCase c;
    c.q_scale = ScaleMode::kPerToken; c.k_scale = ScaleMode::kPerToken;
    c.B = 1; c.H = 1; c.Nq = 200; c.Nk = 260; c.d = 128; c.dv = 128; c.causal = true;
    add(c);
    c.v_dtype = DType::kBFloat16; c.causal = false; c.Nq = 130; c.Nk = 70; c.d = 96; c.dv = 72;
    add(c);
    c.v_dtype = DType::kFloat16; c.causal = true; c.Nq = 300; c.Nk = 140; c.d = 40; c.dv = 64;
    c.q_scale = ScaleMode::kNone;
    add(c);
    c.causal = false; c.Nq = 1; c.Nk = 150; c.d = 8; c.dv = 8; c.q_scale = ScaleMode::kPerToken;
    add(c);
    c.Nq = 129; c.Nk = 1; c.d = 32; c.dv = 48;
    add(c);
    // The pipelined pass's 3-stage ring of 128-query tiles wrapping (5 tiles), and causal with
    // key blocks that start at different tiles, Nq = Nk not a multiple of 16.
    c.Nq = 600; c.Nk = 150; c.d = 64; c.dv = 64; c.B = 2;
    add(c);
    c.v_dtype = DType::kBFloat16; c.causal = true; c.Nq = c.Nk = 455; c.B = 1; c.d = 56; c.dv = 40;
    add(c);
    // hdim-128 bucket at channel width 96 (the WGMMA128 kernel's 64B-swizzled dO), two key
    // blocks, a partial last query tile, per-head scales.
    c.v_dtype = DType::kFloat16; c.causal = false; c.Nq = 150; c.Nk = 200; c.d = 80; c.dv = 96;
    c.q_scale = ScaleMode::kPerHead; c.k_scale = ScaleMode::kPerToken;
    add(c);
  }
  // Optional: run only case N (argv[1]).
  int only = argc > 1 ? std::atoi(argv[1]) : -1;
  bool ok = true;
  for (size_t k = 0; k < cases.size(); ++k) {
    if (only >= 0 && int(k) != only) {
      binformer::test::build_problem(cases[k], rng);  // keep the random stream identical
      continue;
    }
    const std::mt19937_64 before = rng;
    std::printf("case %zu: ", k);
    bool v2 = false;
    ok = run_case(cases[k], rng, &v2) && ok;
    // The v2 cases again with the pipelined, narrow (hdim 64), narrow pipelined and wgmma (hdim 64)
    // main pass, on the same problem (same random stream).
    const bool hdim64 = std::max(cases[k].d, cases[k].dv) <= 64;
    // (hdim 128: pipelined and wgmma dV, variants 1 and 4.)
    for (int variant = 1; v2 && variant < 6; ++variant) {
      if (!hdim64 && variant != 1 && variant != 4) continue;
      std::mt19937_64 again = before;
      g_main_pipe = (variant & 1) != 0;
      g_main_narrow = (variant & 2) != 0;
      g_main_wgmma = variant == 4 ? 1 : variant == 5 ? 2 : 0;
      std::printf("case %zu: ", k);
      ok = run_case(cases[k], again, &v2) && ok;
    }
    g_main_pipe = g_main_narrow = false;
    g_main_wgmma = 0;
  }
  return ok ? 0 : 1;
}
