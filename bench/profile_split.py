"""Where the forward op's time goes: device time per kernel (torch.profiler) next to the op's
wall time (CUDA events), per shape of bench/common.py GPU_SHAPES.

Usage: python bench/profile_split.py [--shapes a,b] [--relpos]
Prints, per shape, each kernel's mean device time per call and the op's median time; the
difference is launch gaps and host work between the kernels.
"""
import argparse
import collections
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import GPU_SHAPES, rel_pos_layout, time_cuda  # noqa: E402

import binformer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(GPU_SHAPES))
    ap.add_argument("--relpos", action="store_true", help="with BinaryAttention's rel-pos bias")
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args()
    for name in args.shapes.split(","):
        b, h, n, d = GPU_SHAPES[name]
        torch.manual_seed(0)
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.float16) for _ in range(3))
        aq = q.float().abs().mean(dim=(-2, -1), keepdim=True).squeeze(-1)
        ak = k.float().abs().mean(dim=(-2, -1), keepdim=True).squeeze(-1)
        kw = {}
        if args.relpos:
            wh, ww, prefix = rel_pos_layout(n)
            kw = dict(rel_pos_table=0.1 * torch.randn(h, (2 * wh - 1) * (2 * ww - 1) + 3, device="cuda"),
                      rel_pos_grid=(wh, ww), num_prefix_tokens=prefix)

        def fn():
            return binformer.attention(q, k, v, q_scale=aq, k_scale=ak, **kw)

        op_us = time_cuda(fn) * 1e6
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(args.calls):
                fn()
            torch.cuda.synchronize()
        per_kernel = collections.defaultdict(float)
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA:
                per_kernel[ev.name] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
        total = sum(per_kernel.values()) / args.calls
        print(f"{name}{' relpos' if args.relpos else ''} (B={b} H={h} N={n} d={d}): op {op_us:.1f} us, "
              f"kernels {total:.1f} us")
        for kname, t in sorted(per_kernel.items(), key=lambda x: -x[1]):
            print(f"    {t / args.calls:8.1f} us  {kname[:110]}")


if __name__ == "__main__":
    main()
