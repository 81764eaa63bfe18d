// Runs the forward kernels for fp16 / bf16 V (the bounded-max kernel of kernel_bounded.h and the
// online kernels of kernel.h, with and without bias; the real source compiled as C++ with the
// host emulation of fwd_ptx_emulation.h) on small random problems and compares out and lse with
// the float64 reference of the GoogleTest (tests/cuda/attention_fwd_reference.h), with the
// GoogleTest's tolerances. It checks the index mappings, the score algebra (duplicated k128 bits,
// the float magic numbers), the fixed / online maximum and its switch, masking, rel-pos windows
// and the epilogue without a GPU. The K pre-pass (pack_keys.h) runs emulated too and is compared
// with a host packing; timing, ex2.approx and cp.async ordering are the device's part.
//
// From the repository root (C++20 for std::barrier):
//   g++ -std=c++20 -O2 -pthread -DBINFORMER_FWD_HOST_EMULATION -Itests/cuda/emulation -Itests/cuda \
//       -Icuda/src/attention_fwd -Icuda/src -Icpp/include \
//       cuda/src/attention_fwd/host_emulation/emulate_attention_fwd.cpp -o /tmp/emulate_attention_fwd
//   /tmp/emulate_attention_fwd [filter]   (one PASS / FAIL line per case; exit code 1 on failure)
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "attention_fwd_reference.h"
#include "host_emulation/fwd_ptx_emulation.h"
#include "kernel_bounded.h"
#include "pack_keys.h"
#include "tma_desc.h"

using namespace binformer;
using namespace binformer::cuda::fwd;
namespace ref = binformer::test::attention_fwd_ref;

namespace {

// kOnlineBias: rel-pos via kernel.h; kWgmma: the bounded kernel's sm_90a variant (Dv = 64..128);
// kWgmmaNarrow: the same on the narrow one-warpgroup block (64 rows, Dv = 64).
enum class Kernel { kBounded, kOnline, kOnlineBias, kWgmma, kWgmmaNarrow };

struct Case {
  std::string name;
  Kernel kernel = Kernel::kBounded;
  bool per_token_k = false;  // k_scale per key (online kernels only)
  int B = 1, H = 2, Nq = 100, Nk = 150, d = 64, dv = 64;
  bool bf16 = false, causal = false;
  double scale_mult = 1.0;
  bool per_token_q = false;  // a_i per query (else per head)
  double a_lo = 0.2, a_hi = 2.0;
  bool negative = false;
  bool relpos = false;
  bool relpos_stream = false;  // bounded kernels: per-tile table slices instead of the window
  int wh = 0, ww = 0, prefix = 0;
  double table_sigma = 1.0;
  int copy_q_every = 0;  // > 0: key j = query j's signs for j % copy_q_every == 0 (dot = d)
  // Memory layouts (elements): out rows padded by out_pad and starting out_offset elements into
  // the buffer (the epilogue's staged / vector / scalar stores, chosen from the alignment as
  // attention_fwd.cu does), V starting v_offset elements in (odd: the synchronous V copies).
  int out_pad = 0, out_offset = 0, v_offset = 0;
  bool p_table = true;  // wgmma kernels: the P table where eligible (else ex2 throughout)
  bool tma = true;      // wgmma kernels at Dv = 64: the TMA key tiles where eligible (else cp.async)
  uint32_t seed = 1;
};

template <class Tr>
void entry(const FwdArgs& args) {
  if constexpr (Tr::kWgmma) {  // as attention_fwd_bounded_wgmma_kernel
    FwdBoundedBlock<Tr> block(args, align_smem_base<Tr::kSmemAlign>(fwd_emulation::smem_base()));
    block.run();
    wgmma_emulation::wgmma_check_drained();
  } else {
    FwdBoundedBlock<Tr> block(args, fwd_emulation::smem_base());
    block.run();
  }
}

template <class Tr, bool kPerTokenK>
void online_entry(const FwdArgs& args) {
  FwdBlock<Tr, kPerTokenK> block(args, fwd_emulation::smem_base());
  block.run();
}

template <class Tr, bool kPerTokenK>
void launch_online(FwdArgs args) {
  args.num_m_blocks = (args.Nq + Tr::kBlockM - 1) / Tr::kBlockM;
  size_t smem = Tr::kSmemFixed;
  if (Tr::kHasBias && args.relpos_table != nullptr) smem += (size_t(args.relpos_table_size) * 4 + 15) / 16 * 16;
  bwd_emulation::launch(online_entry<Tr, kPerTokenK>, unsigned(args.num_m_blocks * args.B * args.H),
                        unsigned(Tr::kThreads), smem, args);
}

template <class Tr>
void launch(FwdArgs args) {
  args.num_m_blocks = (args.Nq + Tr::kBlockM - 1) / Tr::kBlockM;
  size_t smem = Tr::kSmemFixed + Tr::kSmemAlignSlack;
  if (Tr::kBoundedRelPos) {  // as launch.h's size_bounded_relpos / fwd_bounded_relpos_smem
    int most = 0;  // the window of this shape's blocks (exact: the emulated smem aborts past it)
    for (int m0 = 0; m0 < args.Nq; m0 += Tr::kBlockM) {
      most = std::max(most, fwd_relpos_window(m0, Tr::kBlockM, args.Nq, args.relpos_prefix, args.relpos_wh,
                                              args.relpos_ww).len);
    }
    args.relpos_window = most + 3;
    if (args.relpos_stream) {
      args.relpos_slice = ((Tr::kBlockM - 1) / args.relpos_ww + (Tr::kBlockN - 1) / args.relpos_ww + 3) *
                          (2 * args.relpos_ww - 1);
      smem += 16 + size_t(Tr::kStages) * ((size_t(args.relpos_slice) * 4 + 15) / 16 * 16);
    } else {
      smem += (size_t(args.relpos_window) * 4 + 15) / 16 * 16;
    }
  }
  bwd_emulation::launch(entry<Tr>, unsigned(args.num_m_blocks * args.B * args.H), unsigned(Tr::kThreads),
                        smem, args);
}

// The case's TMA choice (Case::tma), and the kernels launched with TMA key tiles (as launch.h).
bool g_tma = true;
std::atomic<long long> g_tma_launches{0};

template <int kDv, PvKind kPv, bool kRelPos, bool kWgmma = false, BoundedShape kShape = BoundedShape::kWide,
          bool kMasked = false>
void dispatch(FwdArgs& args, bool p_table = false) {
  // As launch.h (the TMA key tiles at every wgmma width unless the case asks for cp.async).
  if constexpr (kWgmma && !kMasked) {
    using Probe = FwdTraits<kDv, kPv, false, false, QK::kK128, kRelPos, kShape, true, 2, false, true>;
    constexpr int kBoxChannels = 8 * WgmmaVLayout<kDv, Probe::kBlockN>::kW;
    if (g_tma && args.d <= 128 && fwd_encode_v_tma(args, kBoxChannels, Probe::kBlockN)) {
      ++g_tma_launches;
      if constexpr (!kRelPos && kShape == BoundedShape::kNarrow) {
        if (p_table && args.d <= 64 && fwd_p_table_wanted(args)) {
          return launch<FwdTraits<kDv, kPv, false, false, QK::kDup128, false, kShape, true, 2, true, true>>(args);
        }
      }
      if (args.d <= 64) return launch<FwdTraits<kDv, kPv, false, false, QK::kDup128, kRelPos, kShape, true, 2, false, true>>(args);
      return launch<FwdTraits<kDv, kPv, false, false, QK::kK128, kRelPos, kShape, true, 2, false, true>>(args);
    }
  }
  if constexpr (kWgmma && !kRelPos && !kMasked && kShape == BoundedShape::kNarrow) {  // as launch.h
    if (p_table && args.d <= 64 && fwd_p_table_wanted(args)) {
      return launch<FwdTraits<kDv, kPv, false, false, QK::kDup128, false, kShape, true, 2, true>>(args);
    }
  }
  if (args.d <= 64) launch<FwdTraits<kDv, kPv, kMasked, false, QK::kDup128, kRelPos, kShape, kWgmma>>(args);
  else if (args.d <= 128) launch<FwdTraits<kDv, kPv, kMasked, false, QK::kK128, kRelPos, kShape, kWgmma>>(args);
  else launch<FwdTraits<kDv, kPv, kMasked, false, QK::kK256, kRelPos, kShape, kWgmma>>(args);
}

// kMasked: the padded width kDv with dv < kDv (masked V copies and output channels).
template <int kDv, PvKind kPv, bool kRelPos, bool kMasked = false>
void dispatch_kernel(FwdArgs& args, Kernel kernel, bool p_table) {
  const bool ptk = args.k_scale_abs != nullptr;
  if (kernel == Kernel::kBounded) {
    dispatch<kDv, kPv, kRelPos, false, BoundedShape::kWide, kMasked>(args);
  } else if (kernel == Kernel::kWgmma) {
    if constexpr (!kMasked && (kDv == 64 || kDv == 72 || kDv == 80 || kDv == 96 || kDv == 128)) {
      const long long before = wgmma_emulation::wgmma_issued_total();
      dispatch<kDv, kPv, kRelPos, true>(args, p_table);
      if (wgmma_emulation::wgmma_issued_total() == before) std::abort();  // the wgmma path must have run
    } else {
      std::abort();  // (Dv = 64 .. 128 only)
    }
  } else if (kernel == Kernel::kWgmmaNarrow) {
    if constexpr (kDv == 64) {
      const long long before = wgmma_emulation::wgmma_issued_total();
      dispatch<kDv, kPv, kRelPos, true, BoundedShape::kNarrow>(args, p_table);
      if (wgmma_emulation::wgmma_issued_total() == before) std::abort();
    } else {
      std::abort();  // (Dv = 64 only)
    }
  } else if (kernel == Kernel::kOnline) {
    using Tr = FwdTraits<kDv, kPv, kMasked, false>;
    ptk ? launch_online<Tr, true>(args) : launch_online<Tr, false>(args);
  } else {
    using Tr = FwdTraits<kDv, kPv, kMasked, true>;
    ptk ? launch_online<Tr, true>(args) : launch_online<Tr, false>(args);
  }
}

template <PvKind kPv, bool kRelPos>
void dispatch_dv(FwdArgs& args, Kernel kernel, bool p_table) {
  if (args.dv == 64) dispatch_kernel<64, kPv, kRelPos>(args, kernel, p_table);
  else if (args.dv == 32) dispatch_kernel<32, kPv, kRelPos>(args, kernel, p_table);
  else if (args.dv == 72) dispatch_kernel<72, kPv, kRelPos>(args, kernel, p_table);
  else if (args.dv == 80) dispatch_kernel<80, kPv, kRelPos>(args, kernel, p_table);
  else if (args.dv == 96) dispatch_kernel<96, kPv, kRelPos>(args, kernel, p_table);
  else if (args.dv == 128) dispatch_kernel<128, kPv, kRelPos>(args, kernel, p_table);
  else if (args.dv == 40) dispatch_kernel<64, kPv, kRelPos, true>(args, kernel, p_table);  // masked
  else std::abort();
}

template <int kBlockMDv64>
int block_m_for(int dv) { return dv <= 64 ? kBlockMDv64 : 128; }

bool run_case(const Case& c) {
  std::mt19937 rng(c.seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_real_distribution<double> uni(0.0, 1.0);
  const int B = c.B, H = c.H, Nq = c.Nq, Nk = c.Nk, d = c.d, dv = c.dv;
  // q as fp16 rows (packed in the kernel), k signs packed here, v fp16/bf16.
  std::vector<uint16_t> q(size_t(B) * H * Nq * d);
  std::vector<int8_t> qs(q.size()), ks(size_t(B) * H * Nk * d);
  for (size_t i = 0; i < q.size(); ++i) {
    const double x = normal(rng);
    q[i] = binformer::test::float_to_half_bits(float(x));
    qs[i] = x < 0 ? -1 : 1;
  }
  std::vector<uint16_t> kf(ks.size());  // fp16 K (the pre-pass input); exact zeros map to +1
  for (size_t i = 0; i < ks.size(); ++i) {
    const double x = uni(rng) < 0.03 ? 0.0 : normal(rng);
    kf[i] = binformer::test::float_to_half_bits(float(x));
    ks[i] = x < 0 ? -1 : 1;
  }
  if (c.copy_q_every > 0) {  // the largest possible scores: P reaches 2^kTop in the fixed path
    for (int bh = 0; bh < B * H; ++bh)
      for (int j = 0; j < std::min(Nq, Nk); j += c.copy_q_every)
        for (int e = 0; e < d; ++e) {
          const size_t kidx = (size_t(bh) * Nk + j) * d + e;
          ks[kidx] = qs[(size_t(bh) * Nq + j) * d + e];
          kf[kidx] = binformer::test::float_to_half_bits(ks[kidx] > 0 ? 1.0f : -1.0f);
        }
  }
  std::vector<uint16_t> v(size_t(c.v_offset) + size_t(B) * H * Nk * dv);
  std::vector<double> vd(size_t(B) * H * Nk * dv);
  for (size_t i = 0; i < vd.size(); ++i) {
    const float x = float(normal(rng));
    uint16_t& bits = v[c.v_offset + i];
    bits = c.bf16 ? binformer::test::float_to_bf16_bits(x) : binformer::test::float_to_half_bits(x);
    vd[i] = c.bf16 ? binformer::test::bf16_bits_to_double(bits) : binformer::test::half_bits_to_double(bits);
  }
  // row factors: per head or per query token; k_head per head
  std::vector<float> qscale(c.per_token_q ? size_t(B) * H * Nq : size_t(B) * H),
      khead(c.per_token_k ? size_t(B) * H * Nk : size_t(B) * H);
  auto factor = [&]() {
    const double m = c.a_lo + (c.a_hi - c.a_lo) * uni(rng);
    return float(c.negative && uni(rng) < 0.5 ? -m : m);
  };
  for (auto& x : qscale) x = factor();
  for (auto& x : khead) x = factor();
  std::vector<double> a_full(size_t(B) * H * Nq), b_full(size_t(B) * H * Nk);
  for (int bh = 0; bh < B * H; ++bh) {
    for (int i = 0; i < Nq; ++i) a_full[size_t(bh) * Nq + i] = qscale[c.per_token_q ? size_t(bh) * Nq + i : bh];
    for (int j = 0; j < Nk; ++j) b_full[size_t(bh) * Nk + j] = khead[c.per_token_k ? size_t(bh) * Nk + j : bh];
  }
  const int T = c.relpos ? (2 * c.wh - 1) * (2 * c.ww - 1) + 3 : 0;
  std::vector<float> table(size_t(H) * T);
  for (auto& x : table) x = float(c.table_sigma * normal(rng));
  std::vector<double> table_d(table.begin(), table.end());

  // K pre-pass on the host, as attention_fwd.cu's: signs flipped where the (per-head) k scale
  // is negative, |b| is folded into the row factor by the kernel.
  const int64_t nk_pad = (Nk + 127) / 128 * 128;
  const int k_words = d <= 128 ? 4 : 8;
  std::vector<uint32_t> k_bits(size_t(B) * H * nk_pad * k_words, 0u);
  std::vector<float> colc(size_t(B) * H * nk_pad), kabs(c.per_token_k ? colc.size() : 0);
  for (int bh = 0; bh < B * H; ++bh)
    for (int j = 0; j < nk_pad; ++j) {
      int pc = 0;
      if (j < Nk) {
        for (int e = 0; e < d; ++e) {
          if ((ks[(size_t(bh) * Nk + j) * d + e] > 0) != (b_full[size_t(bh) * Nk + j] < 0)) {
            k_bits[(size_t(bh) * nk_pad + j) * k_words + e / 32] |= 1u << (e % 32);
            ++pc;
          }
        }
      }
      if (d <= 64) {  // words 2-3: ~k within d (the P table's operand, pack_keys.h)
        uint32_t* row = &k_bits[(size_t(bh) * nk_pad + j) * k_words];
        for (int e = 0; e < d; ++e) {
          if (!((row[e / 32] >> (e % 32)) & 1u)) row[2 + e / 32] |= 1u << (e % 32);
        }
      }
      colc[size_t(bh) * nk_pad + j] = -(25165824.0f + 2.0f * float(pc));
      if (c.per_token_k) kabs[size_t(bh) * nk_pad + j] = j < Nk ? std::fabs(float(b_full[size_t(bh) * Nk + j])) : 0.0f;
    }
  std::vector<int> relpos_off(nk_pad, 0);
  std::vector<float> range(size_t(H) * 2);
  if (c.relpos) {
    for (int j = c.prefix; j < Nk; ++j) {
      const int pj = j - c.prefix;
      relpos_off[j] = (pj / c.ww) * (2 * c.ww - 1) + pj % c.ww;
    }
    for (int h = 0; h < H; ++h) {
      float mx = -INFINITY, mn = INFINITY;
      for (int x = 0; x < T; ++x) {
        mx = std::max(mx, table[size_t(h) * T + x]);
        mn = std::min(mn, table[size_t(h) * T + x]);
      }
      range[2 * h] = mx;
      range[2 * h + 1] = mn;
    }
  }
  // The real pre-pass (emulated) must reproduce the host packing exactly: the 8-lanes kernel, and
  // at d <= 64 the two-lanes one that attention_fwd.cu launches there (fp16 K here).
  for (int variant = 0; variant < (d <= 64 && k_words == 4 ? 2 : 1); ++variant) {
    std::vector<uint32_t> dev_bits(k_bits.size(), 0xA5A5A5A5u);
    std::vector<float> dev_colc(colc.size(), NAN), dev_range(range.size(), NAN), dev_kabs(kabs.size(), NAN);
    std::vector<int> dev_off(relpos_off.size(), -7);
    PackKeysArgs pk{};
    pk.k = kf.data();
    pk.k_stride[2] = d; pk.k_stride[1] = int64_t(Nk) * d; pk.k_stride[0] = int64_t(H) * Nk * d;
    pk.H = H; pk.Nk = Nk; pk.d = d; pk.k_words = k_words;
    set_pack_grid(pk, int64_t(B) * H, nk_pad);
    pk.k_scale = khead.data();
    pk.k_scale_stride[0] = c.per_token_k ? int64_t(H) * Nk : H;
    pk.k_scale_stride[1] = c.per_token_k ? Nk : 1;
    pk.k_scale_stride[2] = c.per_token_k ? 1 : 0;
    pk.k_scale_abs = c.per_token_k ? dev_kabs.data() : nullptr;
    pk.k_bits = dev_bits.data(); pk.k_colc = dev_colc.data();
    pk.relpos_off = c.relpos ? dev_off.data() : nullptr;
    pk.relpos_prefix = c.prefix; pk.relpos_ww = c.ww;
    int64_t blocks = pk.pack_blocks;
    if (c.relpos) {
      pk.relpos_table = table.data(); pk.relpos_table_stride_h = T; pk.relpos_table_size = T;
      pk.relpos_range = dev_range.data();
      blocks += H;
    }
    if (variant == 0) {
      bwd_emulation::launch(fwd_pack_keys_kernel<DType::kFloat16, true>, unsigned(blocks), unsigned(kPackThreads), 0, pk);
    } else {
      bwd_emulation::launch(fwd_pack_keys_pairs_kernel<false>, unsigned(blocks), unsigned(kPackThreads), 0, pk);
    }
    const bool same = dev_bits == k_bits && dev_colc == colc && dev_kabs == kabs &&
                      (!c.relpos || (dev_off == relpos_off && dev_range == range));
    if (!same) {
      std::printf("FAIL %-28s the emulated K pre-pass (%s) differs from the host packing\n", c.name.c_str(),
                  variant == 0 ? "8 lanes a row" : "2 lanes a row");
      return false;
    }
  }
  const int64_t out_pitch = dv + c.out_pad;
  std::vector<uint16_t> out(size_t(c.out_offset) + size_t(B) * H * Nq * out_pitch, 0xFFFFu);
  std::vector<float> lse(size_t(B) * H * Nq, NAN);

  FwdArgs args{};
  args.B = B; args.H = H; args.Nq = Nq; args.Nk = Nk; args.d = d; args.dv = dv;
  args.k_words = k_words;
  args.q = q.data(); args.q_dtype = DType::kFloat16;
  args.q_stride[2] = d; args.q_stride[1] = int64_t(Nq) * d; args.q_stride[0] = int64_t(H) * Nq * d;
  args.q_vec_ok = true;
  args.k_bits = k_bits.data(); args.k_colc = colc.data(); args.nk_pad = int(nk_pad);
  args.relpos_off = c.relpos ? relpos_off.data() : nullptr;
  args.v = v.data() + c.v_offset;
  args.v_stride[2] = dv; args.v_stride[1] = int64_t(Nk) * dv; args.v_stride[0] = int64_t(H) * Nk * dv;
  // as attention_fwd.cu: rows_aligned(pointer, strides, bytes)
  auto rows_aligned = [](const void* ptr, const int64_t* stride, int64_t bytes) {
    if (reinterpret_cast<uintptr_t>(ptr) % uintptr_t(bytes) != 0) return false;
    for (int i = 0; i < 3; ++i)
      if ((stride[i] * 2) % bytes != 0) return false;
    return true;
  };
  args.v_async_ok = rows_aligned(args.v, args.v_stride, 16);
  args.out = out.data() + c.out_offset; args.out_dtype = c.bf16 ? DType::kBFloat16 : DType::kFloat16;
  args.out_stride[2] = out_pitch; args.out_stride[1] = int64_t(Nq) * out_pitch; args.out_stride[0] = int64_t(H) * Nq * out_pitch;
  args.out_vec = rows_aligned(args.out, args.out_stride, 16) ? 8
                 : rows_aligned(args.out, args.out_stride, 8) ? 4
                 : rows_aligned(args.out, args.out_stride, 4) ? 2
                                                              : 1;
  args.lse = lse.data();
  args.q_scale = qscale.data();
  args.q_scale_stride[0] = c.per_token_q ? int64_t(H) * Nq : H;
  args.q_scale_stride[1] = c.per_token_q ? Nq : 1;
  args.q_scale_stride[2] = c.per_token_q ? 1 : 0;
  if (c.per_token_k) {
    args.k_scale_abs = kabs.data();
  } else {
    args.k_scale_head = khead.data(); args.k_scale_head_stride[0] = H; args.k_scale_head_stride[1] = 1;
  }
  args.scale = float(c.scale_mult / std::sqrt(double(d)));
  if (c.relpos) {
    args.relpos_table = table.data(); args.relpos_table_stride_h = T;
    args.relpos_wh = c.wh; args.relpos_ww = c.ww; args.relpos_prefix = c.prefix; args.relpos_table_size = T;
    args.relpos_range = range.data();
    args.relpos_in_smem = true;  // (the online bias kernel's table copy)
    args.relpos_stream = c.relpos_stream;  // (launch() sizes the window / slices per shape)
  }
  args.causal = c.causal;
  g_tma = c.tma;
  const long long tma_before = g_tma_launches.load();
  if (c.bf16) {
    c.relpos ? dispatch_dv<PvKind::kBF16, true>(args, c.kernel, c.p_table)
             : dispatch_dv<PvKind::kBF16, false>(args, c.kernel, c.p_table);
  } else {
    c.relpos ? dispatch_dv<PvKind::kF16, true>(args, c.kernel, c.p_table)
             : dispatch_dv<PvKind::kF16, false>(args, c.kernel, c.p_table);
  }
  // The TMA key tiles run exactly where this driver takes them (as launch.h).
  const bool tma_expected = c.tma && (c.kernel == Kernel::kWgmma || c.kernel == Kernel::kWgmmaNarrow) &&
                            d <= 128 && args.v_async_ok;
  if ((g_tma_launches.load() != tma_before) != tma_expected) {
    std::printf("FAIL %s: TMA key tiles %s\n", c.name.c_str(), tma_expected ? "expected, not run" : "ran unexpectedly");
    return false;
  }

  ref::RefProblem p;
  p.B = B; p.H = H; p.Nq = Nq; p.Nk = Nk; p.d = d; p.dv = dv;
  p.q_sign = &qs; p.k_sign = &ks; p.v = &vd; p.a = &a_full; p.bk = &b_full;
  if (c.relpos) { p.relpos = &table_d; p.wh = c.wh; p.ww = c.ww; p.prefix = c.prefix; }
  p.scale = double(args.scale);
  p.causal = c.causal;
  ref::RefTolerance tol;
  tol.p_rel = tol.out_rel = c.bf16 ? std::ldexp(1.0, -8) : std::ldexp(1.0, -11);
  tol.accum_rel = 1e-4;
  tol.p_fp16_subnormal = !c.bf16;
  const ref::RefResult r = ref::attention_reference(p, tol);
  int64_t bad = 0;
  double worst = 0;
  std::string first;
  for (size_t row = 0; row < size_t(B) * H * Nq; ++row) {
    for (int ch = 0; ch < dv; ++ch) {
      const uint16_t bits = out[c.out_offset + row * out_pitch + ch];
      const double got = c.bf16 ? binformer::test::bf16_bits_to_double(bits) : binformer::test::half_bits_to_double(bits);
      const double err = std::fabs(got - r.out[row * dv + ch]), t = r.tol[row * dv + ch];
      const double ratio = std::isnan(got) ? 1e30 : err / t;
      worst = std::max(worst, ratio);
      if (!(err <= t) && bad++ == 0) {
        first = "out[row " + std::to_string(row) + ", c " + std::to_string(ch) + "] = " + std::to_string(got) +
                " want " + std::to_string(r.out[row * dv + ch]);
      }
    }
    const double want = r.lse[row];  // (lse is contiguous [B,H,Nq] by the API)
    const bool ok = std::isinf(want) ? (std::isinf(lse[row]) && lse[row] < 0)
                                     : std::fabs(lse[row] - want) <= 1e-4 + 1e-6 * std::fabs(want);
    if (!ok && bad++ == 0) {
      first = "lse[row " + std::to_string(row) + "] = " + std::to_string(lse[row]) + " want " + std::to_string(want);
    }
  }
  int64_t touched = 0;  // elements outside the output rows (padding, the offset) must keep the poison
  for (size_t idx = 0; idx < out.size(); ++idx) {
    const bool owned = idx >= size_t(c.out_offset) && int64_t(idx - c.out_offset) % out_pitch < dv;
    if (!owned && out[idx] != 0xFFFFu) ++touched;
  }
  if (touched > 0) {
    if (bad++ == 0) first = std::to_string(touched) + " elements written outside the output rows";
  }
  const long long nf = fwd_emulation::tiles_fixed.exchange(0), no = fwd_emulation::tiles_online.exchange(0);
  const long long nt = fwd_emulation::tiles_table.exchange(0);
  std::printf("%s %-28s worst err/tol %.3g, fixed-max tiles %.0f%% (P table %.0f%%)%s%s\n", bad ? "FAIL" : "PASS",
              c.name.c_str(), worst, 100.0 * double(nf) / double(std::max(1LL, nf + no)),
              100.0 * double(nt) / double(std::max(1LL, nf + no)), bad ? "; first: " : "", first.c_str());
  return bad == 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string filter = argc > 1 ? argv[1] : "";
  std::vector<Case> cases;
  uint32_t seed = 11;
  auto add = [&](Case c) { c.seed = seed++; cases.push_back(c); };
  {  // a-priori fixed maximum (small scales), fp16 and bf16
    Case c; c.name = "fixed_apriori_f16"; c.scale_mult = 0.4; c.Nq = 130; c.Nk = 300; add(c);
    c.name = "fixed_apriori_bf16"; c.bf16 = true; add(c);
  }
  {  // scores at the a-priori bound (keys equal to queries): P = 2^kTop must not overflow
    Case c; c.name = "top_f16"; c.scale_mult = 0.4; c.a_lo = 0.9; c.a_hi = 1.1; c.copy_q_every = 3;
    c.Nq = 100; c.Nk = 260; add(c);
    c.name = "top_bf16"; c.bf16 = true; add(c);
    c.name = "top_f16_switch"; c.bf16 = false; c.scale_mult = 1.5; add(c);
  }
  {  // unit scales: the online first tile, then the switch
    Case c; c.name = "switch_f16"; c.Nq = 140; c.Nk = 333; add(c);
    c.name = "switch_bf16"; c.bf16 = true; add(c);
    c.name = "switch_f16_causal"; c.bf16 = false; c.causal = true; c.Nq = 300; c.Nk = 300; add(c);
  }
  {  // large scales: online throughout (fp16), bf16 still switches
    Case c; c.name = "online_f16"; c.scale_mult = 6.0; c.per_token_q = true; c.negative = true;
    c.Nq = 70; c.Nk = 400; add(c);
    c.name = "online_bf16"; c.bf16 = true; add(c);
  }
  {  // d variants (k128 with IMAD, k256) and value widths
    Case c; c.name = "d128_dv64"; c.d = 128; c.Nq = 90; c.Nk = 200; add(c);
    c.name = "d200_dv64"; c.d = 200; add(c);
    c.name = "d32_dv32"; c.d = 32; c.dv = 32; add(c);
    c.name = "d64_dv128"; c.d = 64; c.dv = 128; c.Nq = 140; c.Nk = 170; add(c);
    c.name = "d72_dv72_causal"; c.d = 72; c.dv = 72; c.causal = true; c.Nq = 150; c.Nk = 150; add(c);
  }
  {  // rel-pos: cls / no cls, non-square, ViT-B-like, causal, several blocks
    Case c; c.name = "relpos_7x7_cls"; c.relpos = true; c.wh = 7; c.ww = 7; c.prefix = 1;
    c.Nq = c.Nk = 50; c.scale_mult = 0.5; c.table_sigma = 0.3; add(c);
    c.name = "relpos_5x9"; c.wh = 5; c.ww = 9; c.prefix = 0; c.Nq = c.Nk = 45; c.scale_mult = 1.0;
    c.table_sigma = 1.0; add(c);
    c.name = "relpos_14x14_cls"; c.wh = 14; c.ww = 14; c.prefix = 1; c.Nq = c.Nk = 197; add(c);
    c.name = "relpos_14x14_bf16"; c.bf16 = true; add(c);
    c.name = "relpos_12x20_causal"; c.bf16 = false; c.wh = 12; c.ww = 20; c.prefix = 1;
    c.Nq = c.Nk = 241; c.causal = true; add(c);
    c.name = "relpos_9x9_dv128"; c.causal = false; c.wh = 9; c.ww = 9; c.Nq = c.Nk = 82; c.dv = 128; add(c);
  }
  {  // the online kernels of kernel.h (dense-bias / per-token-k / fallback paths), same math
    Case c; c.kernel = Kernel::kOnline; c.name = "online_kernel_f16"; c.Nq = 130; c.Nk = 300; add(c);
    c.name = "online_kernel_ptk_bf16"; c.bf16 = true; c.per_token_k = true; c.negative = true; add(c);
    c.name = "online_kernel_ptk_causal"; c.bf16 = false; c.causal = true; c.Nq = c.Nk = 200; add(c);
    c.name = "online_kernel_d200_dv128"; c.causal = false; c.per_token_k = false; c.d = 200; c.dv = 128; add(c);
    Case r; r.kernel = Kernel::kOnlineBias; r.name = "online_bias_relpos"; r.relpos = true; r.wh = 14;
    r.ww = 14; r.prefix = 1; r.Nq = r.Nk = 197; add(r);
    r.name = "online_bias_relpos_ptk"; r.per_token_k = true; r.wh = 7; r.ww = 9; r.prefix = 0;
    r.Nq = r.Nk = 63; r.causal = true; add(r);
  }
  {  // the sm_90a variant (wgmma P.V) on every bounded Dv = 64..128 case, plus longer key ranges
     // and the value widths 80 / 96 (the 32B and 64B swizzles; 72 has none, 64 / 128 the 128B)
    std::vector<Case> wg;
    for (const Case& c : cases) {
      if (c.kernel != Kernel::kBounded || c.dv < 64 || c.dv > 128) continue;
      Case w = c;
      w.kernel = Kernel::kWgmma;
      w.name = "wgmma_" + c.name;
      wg.push_back(w);
    }
    Case c; c.kernel = Kernel::kWgmma; c.name = "wgmma_long_causal"; c.Nq = 200; c.Nk = 700;
    c.causal = true; c.scale_mult = 0.4; wg.push_back(c);
    c.name = "wgmma_long_bf16"; c.causal = false; c.bf16 = true; c.Nq = 130; c.Nk = 1100; c.scale_mult = 1.0;
    wg.push_back(c);
    Case v; v.kernel = Kernel::kWgmma; v.name = "wgmma_d64_dv80_causal"; v.dv = 80; v.causal = true;
    v.Nq = v.Nk = 200; wg.push_back(v);
    v.name = "wgmma_d96_dv96_bf16"; v.d = 96; v.dv = 96; v.causal = false; v.bf16 = true; v.Nq = 140;
    v.Nk = 300; wg.push_back(v);
    v.name = "wgmma_d72_dv72_long"; v.d = 72; v.dv = 72; v.bf16 = false; v.scale_mult = 0.4; v.Nq = 130;
    v.Nk = 700; wg.push_back(v);
    v.name = "wgmma_d128_dv128_relpos"; v.d = 128; v.dv = 128; v.relpos = true; v.wh = 10; v.ww = 13;
    v.prefix = 1; v.Nq = v.Nk = 131; v.scale_mult = 1.0; wg.push_back(v);
    for (Case& w : wg) add(w);
  }
  {  // streamed rel-pos slices (launch.h: windows above 64 KB, or BINFORMER_FWD_RELPOS_STREAM=1) on
     // every bounded / wgmma rel-pos case, plus a wide grid whose blocks span several grid rows
    std::vector<Case> st;
    for (const Case& c : cases) {
      if (!c.relpos || (c.kernel != Kernel::kBounded && c.kernel != Kernel::kWgmma)) continue;
      Case s2 = c;
      s2.relpos_stream = true;
      s2.name = "stream_" + c.name;
      st.push_back(s2);
    }
    Case w; w.kernel = Kernel::kWgmma; w.name = "stream_wgmma_relpos_6x40"; w.relpos = true; w.relpos_stream = true;
    w.wh = 6; w.ww = 40; w.prefix = 1; w.Nq = w.Nk = 241; st.push_back(w);
    w.kernel = Kernel::kBounded; w.name = "stream_relpos_30x7_causal"; w.wh = 30; w.ww = 7; w.prefix = 0;
    w.Nq = w.Nk = 210; w.causal = true; st.push_back(w);
    for (Case& c : st) add(c);
  }
  {  // the narrow one-warpgroup shape (v8: 64-row blocks, BINFORMER_FWD_SM90_NARROW) on every
     // Dv = 64 wgmma case above, streamed rel-pos included (plain, causal, rel-pos, bf16, the three
     // QK^T forms, Nk = 45 .. 1100, Nq not a multiple of 64), plus ViT-B's 197 x 197 and the k128
     // form over 6 key tiles
    std::vector<Case> nw;
    for (const Case& c : cases) {
      if (c.kernel != Kernel::kWgmma || c.dv != 64) continue;
      Case w = c;
      w.kernel = Kernel::kWgmmaNarrow;
      w.name.replace(w.name.find("wgmma_"), 6, "narrow_");
      nw.push_back(w);
    }
    Case c; c.kernel = Kernel::kWgmmaNarrow; c.name = "narrow_vitb_197"; c.Nq = c.Nk = 197; nw.push_back(c);
    c.name = "narrow_d128_nk700_bf16"; c.d = 128; c.bf16 = true; c.Nq = 130; c.Nk = 700; nw.push_back(c);
    for (Case& w : nw) add(w);
  }
  {  // the ex2 fixed path where the P table would run (BINFORMER_FWD_PTABLE=0), on the wgmma shapes
    std::vector<Case> nt;
    for (const Case& c : cases) {
      if (c.kernel != Kernel::kWgmma && c.kernel != Kernel::kWgmmaNarrow) continue;
      if (c.name.find("switch_f16") == std::string::npos && c.name.find("top_bf16") == std::string::npos &&
          c.name.find("long") == std::string::npos) continue;
      Case w = c;
      w.p_table = false;
      w.name = "ex2_" + c.name;
      nt.push_back(w);
    }
    for (Case& w : nt) add(w);
  }
  {  // the cp.async key tiles where the TMA would run (BINFORMER_FWD_TMA=0, or V not TMA-addressable)
    std::vector<Case> nt;
    for (const Case& c : cases) {
      if ((c.kernel != Kernel::kWgmma && c.kernel != Kernel::kWgmmaNarrow) || c.d > 128) continue;
      Case w = c;
      w.tma = false;
      w.name = "cpasync_" + c.name;
      nt.push_back(w);
    }
    for (Case& w : nt) add(w);
  }
  {  // output / V layouts: padded rows (16-byte aligned: the staged epilogue; 4-byte: pairs),
     // unaligned rows (scalar stores; V through the synchronous copies), a masked Dv (40 of 64)
    Case c; c.name = "layout_out_pad8_wgmma"; c.kernel = Kernel::kWgmma; c.out_pad = 8; c.Nq = 200; c.Nk = 300;
    add(c);
    c.name = "layout_out_pad2"; c.kernel = Kernel::kBounded; c.out_pad = 2; c.bf16 = true; add(c);
    c.name = "layout_unaligned"; c.out_pad = 3; c.out_offset = 1; c.v_offset = 1; c.bf16 = false; c.causal = true; add(c);
    c.name = "layout_unaligned_wgmma_dv128"; c.kernel = Kernel::kWgmma; c.dv = 128; c.causal = false; add(c);
    c.name = "layout_out_pad8_dv72"; c.kernel = Kernel::kBounded; c.dv = 72; c.d = 72; c.out_pad = 8; c.out_offset = 0;
    c.v_offset = 0; add(c);
    c.name = "layout_dv40_masked"; c.dv = 40; c.d = 64; c.out_pad = 0; add(c);
    c.name = "layout_dv40_masked_online"; c.kernel = Kernel::kOnline; c.out_pad = 8; add(c);
    c.name = "layout_online_pad8"; c.dv = 64; c.per_token_k = true; add(c);
  }
  bool all = true;
  for (const Case& c : cases) {
    if (!filter.empty() && c.name.find(filter) == std::string::npos) continue;
    all &= run_case(c);
  }
  return all ? 0 : 1;
}
