"""GPU training benchmark: forward+backward of attention, binformer ("hamming" = BinaryFormer and
"ste" = BinaryAttention) against torch SDPA's FlashAttention-2 and cuDNN, same run, fp16.

Backward time = (forward+backward) - forward, each a median of do_bench.
Usage: python bench/bench_gpu_bwd.py [--out bench/results/gpu_backward.json] [--shapes a,b]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(__file__))
from common import GPU_SHAPES, env_switch, environment, time_cuda, write_json  # noqa: E402

import binformer  # noqa: E402

# Like SDPA, time the kernels without value checks (each is a device sync; see binformer.set_value_checks).
binformer.set_value_checks(False)


def fwd_bwd_times(fwd, inputs, dout):
    def fb():
        for t in inputs:
            t.grad = None
        fwd().backward(dout)
    try:
        fb()
        torch.cuda.synchronize()
        with torch.no_grad():
            t_f = time_cuda(fwd)
        t_fb = time_cuda(fb)
        return t_f * 1e6, t_fb * 1e6, (t_fb - t_f) * 1e6
    except Exception as e:
        msg = f"unsupported: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        return msg, msg, msg


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/gpu_backward.json")
    ap.add_argument("--shapes", default=",".join(GPU_SHAPES))
    ap.add_argument("--ab-env", default=None, help="NAME=VALUE: also time binformer with this env switch set")
    args = ap.parse_args()
    rows = []
    for name in args.shapes.split(","):
        b, h, n, d = GPU_SHAPES[name]
        torch.manual_seed(0)
        mk = lambda: torch.randn(b, h, n, d, device="cuda", dtype=torch.float16)  # noqa: E731
        q, k, v = mk().requires_grad_(), mk().requires_grad_(), mk().requires_grad_()
        dout = mk()
        qw = torch.rand(b, h, n, device="cuda").add_(0.5).requires_grad_()
        kw = torch.rand(b, h, n, device="cuda").add_(0.5).requires_grad_()
        aq = torch.rand(b, h, 1, device="cuda").add_(0.5).requires_grad_()
        ak = torch.rand(b, h, 1, device="cuda").add_(0.5).requires_grad_()
        res = {}

        def sdpa(backend):
            def f():
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v)
            return f
        res["fa2"] = fwd_bwd_times(sdpa(SDPBackend.FLASH_ATTENTION), [q, k, v], dout)
        res["cudnn"] = fwd_bwd_times(sdpa(SDPBackend.CUDNN_ATTENTION), [q, k, v], dout)
        hamming = lambda: binformer.attention(q.detach(), k.detach(), v, q_scale=qw, k_scale=kw,  # noqa: E731
                                              grad_mode="hamming")
        ste = lambda: binformer.attention(q, k, v, q_scale=aq, k_scale=ak, grad_mode="ste")  # noqa: E731
        res["binformer_hamming"] = fwd_bwd_times(hamming, [v, qw, kw], dout)
        res["binformer_ste"] = fwd_bwd_times(ste, [q, k, v, aq, ak], dout)
        if args.ab_env:  # A/B of a runtime switch in the same process ("<name>@env" rows); the
            with env_switch(args.ab_env):  # variable stays set over the forward and the backward
                res["binformer_hamming@env"] = fwd_bwd_times(hamming, [v, qw, kw], dout)
                res["binformer_ste@env"] = fwd_bwd_times(ste, [q, k, v, aq, ak], dout)
        us = {m: dict(fwd=r[0], fwd_bwd=r[1], bwd=r[2]) for m, r in res.items()}
        num = lambda m: us[m]["bwd"] if isinstance(us[m]["bwd"], float) else None  # noqa: E731
        sp = {}
        for m in [m for m in us if m.startswith("binformer")]:
            for peer in ("fa2", "cudnn"):
                if num(m) and num(peer):
                    sp[f"{m}_bwd_vs_{peer}"] = num(peer) / num(m)
        rows.append(dict(shape_name=name, B=b, H=h, N=n, d=d, us=us, speedup=sp))
        print(f"{name:>12} " + " ".join(
            f"{m}: fwd+bwd={us[m]['fwd_bwd'] if isinstance(us[m]['fwd_bwd'], str) else round(us[m]['fwd_bwd'],1)}"
            for m in us) + f" | {({k_: round(v_, 2) for k_, v_ in sp.items()})}", flush=True)
    payload = dict(benchmark="gpu_fwd_bwd_fp16", env=environment(), rows=rows)
    write_json(args.out, payload)
    from plot import plot_gpu
    flat = dict(payload)
    flat["rows"] = [dict(r, us={m: (x["bwd"] if isinstance(x["bwd"], float) else float("nan")) for m, x in r["us"].items()})
                    for r in rows]
    flat["benchmark"] = "attention backward time (fwd+bwd - fwd), fp16"
    plot_gpu(flat, args.out.replace(".json", ".png"), ["binformer_hamming", "binformer_ste", "fa2", "cudnn"])


if __name__ == "__main__":
    main()
