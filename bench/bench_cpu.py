"""CPU benchmark: binformer's binary attention against torch SDPA fp32 and the numpy
bitwise_count path (BinaryFormer's public implementation style), same run, same machine.

Throughput is reported in G score elements per second (B*H*Nq*Nk / time).
Usage: python bench/bench_cpu.py [--out bench/results/cpu_bench.json] [--quick]
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import environment, time_cpu, write_json  # noqa: E402

import binformer  # noqa: E402


def numpy_binary_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """sign(q) sign(k)^T via packbits + XOR + bitwise_count, then a float softmax and P V (per head)."""
    b, h, n, d = q.shape
    out = np.empty((b, h, q.shape[2], v.shape[-1]), dtype=np.float32)
    scale = 1.0 / math.sqrt(d)
    for bi in range(b):
        for hi in range(h):
            qb = np.packbits(q[bi, hi] >= 0, axis=-1).view(np.uint64)  # [N, d/64]
            kb = np.packbits(k[bi, hi] >= 0, axis=-1).view(np.uint64)
            x = np.bitwise_count(qb[:, None, :] ^ kb[None, :, :]).sum(-1, dtype=np.int32)
            s = (d - 2 * x).astype(np.float32) * np.float32(scale)
            s -= s.max(axis=-1, keepdims=True)
            p = np.exp(s)
            p /= p.sum(axis=-1, keepdims=True)
            out[bi, hi] = p @ v[bi, hi]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/cpu_bench.json")
    ap.add_argument("--quick", action="store_true", help="fewer shapes, shorter timing")
    args = ap.parse_args()
    torch.manual_seed(0)
    d = 64
    shapes = [(1, h, n) for h in (4, 6) for n in (1024, 2048, 4096)]
    if args.quick:
        shapes = [(1, 4, 1024), (1, 4, 4096)]
    rows = []
    load_before = os.getloadavg()  # the machine is shared: the record says how idle it was
    print(f"threads={torch.get_num_threads()} isa={binformer.cpu_isa()} load average {load_before}")
    print(f"{'shape':>18} {'bin fp32':>9} {'bin bf16':>9} {'bin int8':>9} {'sdpa_fp32':>10} {'numpy':>8}"
          "   (G score elem/s)  fp32 speedup vs sdpa / numpy; bf16, pv_int8 vs sdpa")
    for b, h, n in shapes:
        q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
        elems = b * h * n * n
        t_bin = time_cpu(lambda: binformer.attention(q, k, v), min_time=1.0)
        qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
        t_bf16 = time_cpu(lambda: binformer.attention(qb, kb, vb), min_time=1.0)
        t_int8 = time_cpu(lambda: binformer.attention(q, k, v, pv_int8=True), min_time=1.0)
        t_sdpa = time_cpu(lambda: F.scaled_dot_product_attention(q, k, v), min_time=1.0)
        qn, kn, vn = q.numpy(), k.numpy(), v.numpy()
        t_np = time_cpu(lambda: numpy_binary_attention(qn, kn, vn), min_time=0.5, min_reps=1, warmup=0)
        row = dict(B=b, H=h, N=n, d=d, binformer_s=t_bin, binformer_bf16_s=t_bf16, binformer_pv_int8_s=t_int8,
                   sdpa_fp32_s=t_sdpa, numpy_s=t_np,
                   binformer_gelem_s=elems / t_bin / 1e9, binformer_bf16_gelem_s=elems / t_bf16 / 1e9,
                   binformer_pv_int8_gelem_s=elems / t_int8 / 1e9, sdpa_fp32_gelem_s=elems / t_sdpa / 1e9,
                   numpy_gelem_s=elems / t_np / 1e9,
                   speedup_vs_sdpa=t_sdpa / t_bin, speedup_vs_numpy=t_np / t_bin,
                   bf16_speedup_vs_sdpa=t_sdpa / t_bf16, pv_int8_speedup_vs_sdpa=t_sdpa / t_int8)
        rows.append(row)
        print(f"{str((b, h, n, d)):>18} {row['binformer_gelem_s']:9.2f} {row['binformer_bf16_gelem_s']:9.2f} "
              f"{row['binformer_pv_int8_gelem_s']:9.2f} {row['sdpa_fp32_gelem_s']:10.2f} {row['numpy_gelem_s']:8.3f}"
              f"   {row['speedup_vs_sdpa']:.2f}x / {row['speedup_vs_numpy']:.1f}x; "
              f"{row['bf16_speedup_vs_sdpa']:.2f}x, {row['pv_int8_speedup_vs_sdpa']:.2f}x", flush=True)
    load_after = os.getloadavg()
    print(f"load average after: {load_after}")
    payload = dict(benchmark="cpu_forward", env=environment(), isa=binformer.cpu_isa(), rows=rows,
                   load_average_before=load_before, load_average_after=load_after,
                   targets=dict(speedup_vs_sdpa_at_4096=4.0, speedup_vs_numpy_at_4096=10.0))
    write_json(args.out, payload)
    try:
        from plot import plot_cpu
        plot_cpu(payload, args.out.replace(".json", ".png"))
    except ImportError as e:  # matplotlib missing: the JSON is the record
        print(f"no plot: {e}")


if __name__ == "__main__":
    main()
