// Timing driver for the forward (disabled by default: it measures, it does not check):
//   build-cpu/binformer_cpu_tests --gtest_also_run_disabled_tests --gtest_filter='*Bench*'
// Environment: BENCH_B, BENCH_H, BENCH_N, BENCH_D, BENCH_DV, BENCH_THREADS, BENCH_REPS, and
// BENCH_ONLY (run the variants whose name contains it).
// Throughput is reported in G score elements per second: B*H*Nq*Nk / time (for causal runs
// the same full-square count, so it reads as the speed-up from skipping masked blocks).
#include <chrono>
#include <cstdio>
#include <ctime>
#include <thread>

#include "attention_case.h"

namespace bt {
namespace {

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  return v ? std::atoll(v) : fallback;
}

// parallel_for on `threads` std::threads with contiguous equal chunks (as at::parallel_for).
void install_equal_chunks(int threads) {
  binformer::cpu::set_parallel_for([threads](int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(threads, (n + grain - 1) / grain));
    std::vector<std::thread> pool;
    for (int64_t c = 1; c < chunks; ++c)
      pool.emplace_back([&fn, c, n, chunks] { fn(n * c / chunks, n * (c + 1) / chunks); });
    fn(0, n / chunks);
    for (auto& t : pool) t.join();
  });
}

// The machine is shared: besides wall time, process CPU time (all our threads) is measured, and
// elements per CPU-second is the per-core rate that 2 idle cores would double.
double cpu_seconds() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

struct Timing { double wall, cpu; };

Timing time_forward(const AttentionCase& t, int reps) {
  const CaseSpec& s = t.spec;
  std::vector<uint8_t> out(size_t(s.B * s.H * s.Nq * s.dv) * 4);
  std::vector<float> lse(size_t(s.B * s.H * s.Nq));
  const auto p = fwd_params(t, out.data(), lse.data());
  binformer::cpu::attention_fwd(p);  // warm-up (page faults, caches)
  Timing best{1e30, 1e30};
  for (int r = 0; r < reps; ++r) {
    const double c0 = cpu_seconds();
    const auto t0 = std::chrono::steady_clock::now();
    binformer::cpu::attention_fwd(p);
    const auto t1 = std::chrono::steady_clock::now();
    best.cpu = std::min(best.cpu, cpu_seconds() - c0);
    best.wall = std::min(best.wall, std::chrono::duration<double>(t1 - t0).count());
  }
  return best;
}

TEST(DISABLED_Bench, AttentionForward) {
  const int threads = int(env_int("BENCH_THREADS", 2));
  const int reps = int(env_int("BENCH_REPS", 5));
  install_equal_chunks(threads);
  CaseSpec base;
  base.B = env_int("BENCH_B", 1);
  base.H = env_int("BENCH_H", 4);
  base.Nq = base.Nk = env_int("BENCH_N", 4096);
  base.d = int(env_int("BENCH_D", 64));
  base.dv = int(env_int("BENCH_DV", 64));
  struct Variant { const char* name; void (*apply)(CaseSpec&); };
  const Variant variants[] = {
      {"fp32 q/k/v", [](CaseSpec&) {}},
      {"fp32, bits q/k", [](CaseSpec& s) { s.q_dtype = s.k_dtype = DType::kBits; }},
      {"fp32, per-token scales", [](CaseSpec& s) { s.q_scale = s.k_scale = ScaleMode::kPerToken; }},
      {"fp16 q/k/v", [](CaseSpec& s) { s.q_dtype = s.k_dtype = s.v_dtype = DType::kFloat16; }},
      {"bf16 q/k/v", [](CaseSpec& s) { s.q_dtype = s.k_dtype = s.v_dtype = DType::kBFloat16; }},
      {"fp32, pv_int8", [](CaseSpec& s) { s.pv_int8 = true; }},
      {"fp32, rel-pos 64x64", [](CaseSpec& s) {
         s.rel_wh = s.rel_ww = 64; s.num_prefix = 0; s.q_scale = s.k_scale = ScaleMode::kPerHead; }},
      {"fp32, dense fp32 bias", [](CaseSpec& s) { s.bias = BiasMode::kPerBatch; }},
      {"fp32, causal", [](CaseSpec& s) { s.causal = true; }},
  };
  std::printf("B=%lld H=%lld N=%lld d=%d Dv=%d threads=%d, best of %d\n", (long long)base.B, (long long)base.H,
              (long long)base.Nq, base.d, base.dv, threads, reps);
  for (const Variant& v : variants) {
    CaseSpec s = base;
    v.apply(s);
    if (s.rel_wh > 0 && int64_t(s.rel_wh) * s.rel_ww != s.Nq) continue;
    if (const char* only = std::getenv("BENCH_ONLY"); only && !std::strstr(v.name, only)) continue;
    const AttentionCase t = make_case(s);
    const Timing tm = time_forward(t, reps);
    const double elems = double(s.B) * s.H * s.Nq * s.Nk;
    std::printf("  %-26s %8.2f ms wall %6.2f G/s   | %8.2f ms cpu %6.2f G/s per core\n", v.name, tm.wall * 1e3,
                elems / tm.wall * 1e-9, tm.cpu * 1e3, elems / tm.cpu * 1e-9);
  }
  install_serial_parallel_for();
}

// Backward: every output wanted except dbias (N x N), with rel-pos and per-token scales.
TEST(DISABLED_Bench, AttentionBackward) {
  const int threads = int(env_int("BENCH_THREADS", 2));
  const int reps = int(env_int("BENCH_REPS", 3));
  install_equal_chunks(threads);
  CaseSpec s;
  s.B = env_int("BENCH_B", 1);
  s.H = env_int("BENCH_H", 4);
  s.Nq = s.Nk = env_int("BENCH_N", 4096);
  s.d = int(env_int("BENCH_D", 64));
  s.dv = int(env_int("BENCH_DV", 64));
  s.q_dtype = s.k_dtype = DType::kBits;
  s.q_scale = s.k_scale = ScaleMode::kPerToken;
  const AttentionCase t = make_case(s);
  // out / lse from our own forward (the backward only needs them consistent).
  std::vector<float> out(size_t(s.B * s.H * s.Nq * s.dv)), lse(size_t(s.B * s.H * s.Nq)), dout(out.size(), 0.01f);
  binformer::cpu::attention_fwd(fwd_params(t, out.data(), lse.data()));
  binformer::AttentionBwdParams p{};
  p.B = s.B; p.H = s.H; p.Nq = s.Nq; p.Nk = s.Nk; p.head_dim = s.d; p.v_dim = s.dv;
  p.q_bits = reinterpret_cast<const uint32_t*>(t.q_bits.data());
  p.k_bits = reinterpret_cast<const uint32_t*>(t.k_bits.data());
  for (int i = 0; i < 3; ++i) {
    p.q_stride[i] = t.q_bits.strides[i]; p.k_stride[i] = t.k_bits.strides[i]; p.v_stride[i] = t.v.strides[i];
    p.q_scale_stride[i] = t.q_scale_stride[i]; p.k_scale_stride[i] = t.k_scale_stride[i];
  }
  p.out_stride[0] = p.dout_stride[0] = s.H * s.Nq * s.dv;
  p.out_stride[1] = p.dout_stride[1] = s.Nq * s.dv;
  p.out_stride[2] = p.dout_stride[2] = s.dv;
  p.v = t.v.data(); p.v_dtype = DType::kFloat32; p.out = out.data(); p.dout = dout.data(); p.lse = lse.data();
  p.q_scale = t.q_scale.data(); p.k_scale = t.k_scale.data();
  p.scale = t.scale;
  const size_t BH = size_t(s.B * s.H);
  std::vector<float> dv(BH * s.Nk * s.dv), dqs(BH * s.Nq), dks(BH * s.Nk), dqg(BH * s.Nq * s.d), dkg(BH * s.Nk * s.d);
  p.dv = dv.data(); p.dq_scale = dqs.data(); p.dk_scale = dks.data(); p.dq_sign = dqg.data(); p.dk_sign = dkg.data();
  binformer::cpu::attention_bwd(p);
  Timing best{1e30, 1e30};
  for (int r = 0; r < reps; ++r) {
    const double c0 = cpu_seconds();
    const auto t0 = std::chrono::steady_clock::now();
    binformer::cpu::attention_bwd(p);
    const auto t1 = std::chrono::steady_clock::now();
    best.cpu = std::min(best.cpu, cpu_seconds() - c0);
    best.wall = std::min(best.wall, std::chrono::duration<double>(t1 - t0).count());
  }
  const double elems = double(s.B) * s.H * s.Nq * s.Nk;
  std::printf("backward B=%lld H=%lld N=%lld d=%d Dv=%d threads=%d (dv, dq/dk scale and sign)\n", (long long)s.B,
              (long long)s.H, (long long)s.Nq, s.d, s.dv, threads);
  std::printf("  %8.2f ms wall %6.2f G/s   | %8.2f ms cpu %6.2f G/s per core\n", best.wall * 1e3, elems / best.wall * 1e-9,
              best.cpu * 1e3, elems / best.cpu * 1e-9);
  install_serial_parallel_for();
}

}  // namespace
}  // namespace bt
