"""GPU forward benchmark: binformer against the attention people use today, side by side in one run.

Peers (fp16): torch SDPA's FlashAttention-2 and cuDNN backends, FlexAttention (compiled),
SageAttention 1 (when importable), cuDNN with a dense [1,H,N,N] bias. binformer runs plain
(BinaryAttention per-head magnitude), with the in-kernel relative-position bias, and with the same
dense bias. Each row also reports the fraction of the exp floor (B*H*N*N / 4.2e12 s, SPEC.md 3).
Also: pack_sign bandwidth on a 1 GB input against a device copy, and sign_matmul TOP/s at 8192^3 bits.

Usage: python bench/bench_gpu.py [--out bench/results/gpu_forward.json] [--shapes a,b] [--no-flex]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(__file__))
from common import GPU_SHAPES, env_switch, environment, exp_floor_s, rel_pos_layout, time_cuda, write_json  # noqa: E402

import binformer  # noqa: E402

# Like SDPA, time the kernels without value checks (each is a device sync; see binformer.set_value_checks).
binformer.set_value_checks(False)


def sdpa(backend, q, k, v, mask=None):
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def try_time(fn):
    try:
        fn()
        torch.cuda.synchronize()
        return time_cuda(fn)
    except Exception as e:  # a peer that does not support the shape is recorded as such
        return f"unsupported: {type(e).__name__}: {str(e).splitlines()[0][:160]}"


def with_env(assignment: str, fn):
    """fn run with one environment variable set (common.env_switch)."""
    def run():
        with env_switch(assignment):
            return fn()
    return run


def bench_attention(names, use_flex: bool, ab_env: str | None = None):
    rows = []
    sage = None
    try:
        from sageattention import sageattn as sage
    except Exception as e:
        print(f"SageAttention not available: {e}")
    flex = None
    if use_flex:
        from torch.nn.attention.flex_attention import flex_attention
        flex = torch.compile(flex_attention, dynamic=False)
    for name in names:
        b, h, n, d = GPU_SHAPES[name]
        torch.manual_seed(0)
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.float16) for _ in range(3))
        aq = q.float().abs().mean(dim=(-2, -1), keepdim=True).squeeze(-1)  # [B,H,1]
        ak = k.float().abs().mean(dim=(-2, -1), keepdim=True).squeeze(-1)
        wh, ww, prefix = rel_pos_layout(n)
        table = 0.1 * torch.randn(h, (2 * wh - 1) * (2 * ww - 1) + 3, device="cuda")
        bias = None
        try:
            bias = 0.1 * torch.randn(1, h, n, n, device="cuda", dtype=torch.float16)
        except torch.OutOfMemoryError:
            pass
        us = {}
        t = {
            "binformer": lambda: binformer.attention(q, k, v, q_scale=aq, k_scale=ak),
            "binformer_relpos": lambda: binformer.attention(q, k, v, q_scale=aq, k_scale=ak, rel_pos_table=table,
                                                            rel_pos_grid=(wh, ww), num_prefix_tokens=prefix),
            "binformer_dense_bias": (lambda: binformer.attention(q, k, v, q_scale=aq, k_scale=ak, bias=bias))
            if bias is not None else None,
            "binformer_pv_int8": lambda: binformer.attention(q, k, v, q_scale=aq, k_scale=ak, pv_int8=True),
            "fa2": lambda: sdpa(SDPBackend.FLASH_ATTENTION, q, k, v),
            "cudnn": lambda: sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v),
            "cudnn_dense_bias": (lambda: sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v, bias)) if bias is not None else None,
            "flex": (lambda: flex(q, k, v)) if flex is not None else None,
            "sage": (lambda: sage(q, k, v, tensor_layout="HND", is_causal=False)) if sage is not None else None,
        }
        # A/B of runtime switches in the same process: one "<name>@NAME=VALUE" row per switch
        for assignment in (ab_env.split(";") if ab_env else []):
            for m in ("binformer", "binformer_relpos"):
                t[m + "@" + assignment] = with_env(assignment, t[m])
        for m, fn in t.items():
            if fn is None:
                continue
            r = try_time(fn)
            us[m] = r * 1e6 if isinstance(r, float) else r
        del bias
        torch.cuda.empty_cache()
        floor = exp_floor_s(b, h, n, n) * 1e6
        num = {m: x for m, x in us.items() if isinstance(x, float)}
        row = dict(shape_name=name, B=b, H=h, N=n, d=d, us=us, exp_floor_us=floor,
                   exp_floor_fraction={m: floor / x for m, x in num.items() if m.startswith("binformer")})

        def ratio(a, bb):
            return num[bb] / num[a] if a in num and bb in num else None
        row["speedup"] = dict(
            vs_fa2=ratio("binformer", "fa2"), vs_cudnn=ratio("binformer", "cudnn"),
            vs_flex=ratio("binformer", "flex"), vs_sage=ratio("binformer", "sage"),
            relpos_vs_cudnn_dense_bias=ratio("binformer_relpos", "cudnn_dense_bias"),
            dense_bias_vs_cudnn_dense_bias=ratio("binformer_dense_bias", "cudnn_dense_bias"),
            pv_int8_vs_fa2=ratio("binformer_pv_int8", "fa2"))
        rows.append(row)
        fmt = lambda x: f"{x:8.1f}" if isinstance(x, float) else "     n/a"  # noqa: E731
        print(f"{name:>12} " + " ".join(f"{m}={fmt(x)}" for m, x in us.items())
              + f" | floor={floor:.1f} vsFA2={row['speedup']['vs_fa2']} vscuDNN={row['speedup']['vs_cudnn']}",
              flush=True)
    return rows


def bench_pack_and_gemm():
    res = {}
    x = torch.randn(4 * 1024 * 1024, 128, device="cuda", dtype=torch.float16)  # 1 GiB
    y = torch.empty_like(x)
    t_copy = time_cuda(lambda: y.copy_(x))
    copy_bw = 2 * x.numel() * 2 / t_copy
    del y
    t_pack = time_cuda(lambda: binformer.pack_sign(x))
    pack_bytes = x.numel() * 2 + x.numel() // 8
    res["pack_sign"] = dict(input_bytes=x.numel() * 2, seconds=t_pack, bandwidth_Bps=pack_bytes / t_pack,
                            copy_bandwidth_Bps=copy_bw, fraction_of_copy=(pack_bytes / t_pack) / copy_bw)
    del x
    torch.cuda.empty_cache()
    m = n = kbits = 8192
    a = torch.randint(-2**31, 2**31 - 1, (m, kbits // 32), device="cuda", dtype=torch.int32)
    bb = torch.randint(-2**31, 2**31 - 1, (n, kbits // 32), device="cuda", dtype=torch.int32)
    t_mm = time_cuda(lambda: binformer.sign_matmul(a, bb, kbits))
    tops = 2 * m * n * kbits / t_mm / 1e12
    res["sign_matmul"] = dict(M=m, N=n, K_bits=kbits, seconds=t_mm, TOPs=tops, mma_sync_b1_and_ceiling_TOPs=10356,
                              fraction_of_ceiling=tops / 10356)
    print(f"pack_sign: {res['pack_sign']['bandwidth_Bps']/1e12:.2f} TB/s = "
          f"{100*res['pack_sign']['fraction_of_copy']:.0f}% of copy ({copy_bw/1e12:.2f} TB/s); "
          f"sign_matmul 8192^3: {tops:.0f} TOP/s = {100*tops/10356:.0f}% of the mma.sync b1 AND ceiling")
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/gpu_forward.json")
    ap.add_argument("--shapes", default=",".join(GPU_SHAPES))
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--ab-env", default=None, help="NAME=VALUE[;NAME=VALUE...]: also time binformer with each env switch set")
    ap.add_argument("--skip-pack-gemm", action="store_true")
    args = ap.parse_args()
    payload = dict(benchmark="gpu_forward_fp16", env=environment())
    payload["rows"] = bench_attention(args.shapes.split(","), not args.no_flex, args.ab_env)
    if not args.skip_pack_gemm:
        payload["pack_and_gemm"] = bench_pack_and_gemm()
    write_json(args.out, payload)
    from plot import plot_gpu
    plot_gpu(payload, args.out.replace(".json", ".png"),
             ["binformer", "binformer_relpos", "binformer_dense_bias", "fa2", "cudnn", "cudnn_dense_bias", "flex", "sage"])


if __name__ == "__main__":
    main()
