// Float64 host reference of binformer's forward attention (the same binary math as the CUDA
// kernel) and the per-element error bounds the GoogleTest driver checks against.
//
//   S_ij = scale * a_i * b_j * <sign q_i, sign k_j> + bias_ij + relpos_ij, masked (causal,
//   -inf bias), P = softmax_j S, out = P V, lse = log sum_j exp S_ij.
// Inputs are given as the values the kernel sees (already rounded to their dtype).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "binformer/params.h"

namespace binformer::test::attention_fwd_ref {

struct RefProblem {
  int B = 1, H = 1, Nq = 1, Nk = 1, d = 64, dv = 64;
  // sign bits as +1/-1 per element: [B,H,Nq,d] / [B,H,Nk,d] (index ((b*H+h)*N+n)*d+c)
  const std::vector<int8_t>* q_sign = nullptr;
  const std::vector<int8_t>* k_sign = nullptr;
  // V values [B,H,Nk,dv] (for pv_int8 the int8 values) and the per-channel dequant [B,H,dv]
  const std::vector<double>* v = nullptr;
  const std::vector<double>* v_dequant = nullptr;  // pv_int8 only
  // a_i [B,H,Nq], b_j [B,H,Nk] (already broadcast), 1 when null
  const std::vector<double>* a = nullptr;
  const std::vector<double>* bk = nullptr;
  // bias [B,H,Nq,Nk] (already broadcast, -inf allowed), null = none
  const std::vector<double>* bias = nullptr;
  // rel-pos table [H,T]; null = none
  const std::vector<double>* relpos = nullptr;
  int wh = 0, ww = 0, prefix = 0;
  double scale = 1.0;
  bool causal = false;
  bool pv_int8 = false;
  int int8_block_n = 64;  // key tile of the kernel: the running max grows one tile at a time
};

// Relative precision of P as fed to the P.V product and of the stored output.
struct RefTolerance {
  double p_rel = 0;      // rounding of P (fp16 2^-11, bf16 2^-8, tf32x3 ~2^-21)
  double out_rel = 0;    // rounding of the stored output
  double accum_rel = 0;  // fp32 accumulation / exp2 approximation, relative to sum_j P|V|
  bool p_fp16_subnormal = false;  // fp16 P has an absolute resolution of 2^-25 near 0
};

struct RefResult {
  std::vector<double> out;   // [B,H,Nq,dv]
  std::vector<double> tol;   // [B,H,Nq,dv] admissible |kernel - out|
  std::vector<double> lse;   // [B,H,Nq] (natural log, -inf for fully masked rows)
};

inline RefResult attention_reference(const RefProblem& p, const RefTolerance& tol) {
  const double inf = std::numeric_limits<double>::infinity();
  RefResult r;
  const size_t rows = size_t(p.B) * p.H * p.Nq;
  r.out.assign(rows * p.dv, 0.0);
  r.tol.assign(rows * p.dv, 0.0);
  r.lse.assign(rows, -inf);
  const int64_t tsize = int64_t(2 * p.wh - 1) * (2 * p.ww - 1) + 3;
  std::vector<double> s(p.Nk), e(p.Nk), w(p.Nk), qp(p.Nk);
  std::vector<char> flip(p.Nk);
  for (int b = 0; b < p.B; ++b) {
    for (int h = 0; h < p.H; ++h) {
      const size_t bh = size_t(b) * p.H + h;
      for (int i = 0; i < p.Nq; ++i) {
        const size_t row = bh * p.Nq + i;
        const int8_t* qs = p.q_sign->data() + row * p.d;
        const double ai = p.a ? (*p.a)[row] : 1.0;
        double m = -inf;
        for (int j = 0; j < p.Nk; ++j) {
          const int8_t* ks = p.k_sign->data() + (bh * p.Nk + j) * p.d;
          int dot = 0;
          for (int c = 0; c < p.d; ++c) dot += qs[c] * ks[c];
          const double bj = p.bk ? (*p.bk)[bh * p.Nk + j] : 1.0;
          double x = p.scale * ai * bj * dot;
          if (p.bias) x += (*p.bias)[row * p.Nk + j];
          if (p.relpos) x += (*p.relpos)[size_t(h) * tsize + rel_pos_index(i, j, p.wh, p.ww, p.prefix)];
          if (p.causal && j > i) x = -inf;
          s[j] = x;
          m = std::max(m, x);
        }
        if (m == -inf) continue;  // fully masked: out 0, lse -inf
        double l = 0;
        for (int j = 0; j < p.Nk; ++j) {
          e[j] = std::exp(s[j] - m);
          l += e[j];
        }
        r.lse[row] = m + std::log(l);
        double* out = r.out.data() + row * p.dv;
        double* t = r.tol.data() + row * p.dv;
        if (!p.pv_int8) {
          for (int c = 0; c < p.dv; ++c) {
            double acc = 0, acc_abs = 0, v_abs = 0;
            for (int j = 0; j < p.Nk; ++j) {
              const double v = (*p.v)[(bh * p.Nk + j) * p.dv + c];
              acc += e[j] * v;
              acc_abs += e[j] * std::fabs(v);
              v_abs += std::fabs(v);
            }
            out[c] = acc / l;
            t[c] = (tol.p_rel + tol.out_rel + tol.accum_rel) * 1.25 * acc_abs / l +
                   (tol.p_fp16_subnormal ? std::ldexp(v_abs, -25) / l : 0.0) + 1e-30;
          }
          continue;
        }
        // pv_int8: emulate the kernel's running maximum (key tiles visited last to first).
        const int bn = p.int8_block_n;
        const int n_tiles = (p.Nk + bn - 1) / bn;
        std::vector<double> run(n_tiles, -inf);
        int moves = 0;
        double cur = -inf;
        for (int tile = n_tiles - 1; tile >= 0; --tile) {
          double tmax = -inf;
          for (int j = tile * bn; j < std::min(p.Nk, (tile + 1) * bn); ++j) tmax = std::max(tmax, s[j]);
          if (tmax > cur) {
            if (cur != -inf) ++moves;
            cur = tmax;
          }
          run[tile] = cur;
        }
        for (int j = 0; j < p.Nk; ++j) {
          const double mr = run[j / bn];
          if (s[j] == -inf || mr == -inf) {
            qp[j] = 0;
            w[j] = 0;
            flip[j] = 0;
            continue;
          }
          const double scaled = 255.0 * std::exp(s[j] - mr);
          qp[j] = std::nearbyint(scaled);
          w[j] = std::exp(mr - m);
          // The kernel's exp2 and fp32 score differ from this one by ~1e-6 relative: a value
          // this close to a rounding boundary may round the other way.
          flip[j] = std::fabs(scaled - std::floor(scaled) - 0.5) < 2e-3;
        }
        for (int c = 0; c < p.dv; ++c) {
          const double dq = (*p.v_dequant)[bh * p.dv + c];
          double acc = 0, flips = 0;
          for (int j = 0; j < p.Nk; ++j) {
            const double v = (*p.v)[(bh * p.Nk + j) * p.dv + c];
            acc += qp[j] * v * w[j];
            if (flip[j]) flips += std::fabs(v) * w[j];
          }
          out[c] = dq * acc / (255.0 * l);
          // flips: one step of P_q; moves: the s32 accumulator is rounded each time the max moves.
          t[c] = dq * (flips + 0.5 * moves + 1.0) / (255.0 * l) +
                 (tol.out_rel + 1e-5) * std::fabs(out[c]) + 1e-30;
        }
      }
    }
  }
  return r;
}

}  // namespace binformer::test::attention_fwd_ref
