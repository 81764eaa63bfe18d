"""The main job: binary attention on real-sized inputs, timed against torch SDPA on the same machine.

On a GPU: the SPEC.md section 3 shapes in fp16 against SDPA (its default backend choice).
On a CPU: B=1, H=6, N=4096, d=64 in fp32 against SDPA fp32.
Also checks the result against the float64 reference on a slice, so the speed is of a right answer.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import GPU_SHAPES, time_cpu, time_cuda  # noqa: E402

import binformer  # noqa: E402
from binformer.reference import attention_reference  # noqa: E402


def check(q, k, v, out):
    """Compare two heads of the output with the float64 reference."""
    sl = (slice(0, 1), slice(0, 2))
    ref = attention_reference(q[sl].double(), k[sl].double(), v[sl].double())
    err = ((out[sl].double() - ref).norm() / ref.norm()).item()
    return err


def main():
    torch.manual_seed(0)
    if torch.cuda.is_available() and binformer.has_cuda():
        print(f"device: {torch.cuda.get_device_name()}  (fp16)")
        print(f"{'shape (B,H,N,d)':>22} {'binformer us':>13} {'SDPA us':>9} {'speedup':>8} {'rel.err':>8}")
        for name, (b, h, n, d) in GPU_SHAPES.items():
            q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.float16) for _ in range(3))
            out = binformer.attention(q, k, v)
            err = check(q, k, v, out)
            t_b = time_cuda(lambda: binformer.attention(q, k, v))
            t_s = time_cuda(lambda: F.scaled_dot_product_attention(q, k, v))
            print(f"{str((b, h, n, d)):>22} {t_b*1e6:13.1f} {t_s*1e6:9.1f} {t_s/t_b:7.2f}x {err:8.1e}")
    else:
        b, h, n, d = 1, 6, 4096, 64
        print(f"device: CPU ({torch.get_num_threads()} threads, ISA {binformer.cpu_isa()}), fp32")
        q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
        out = binformer.attention(q, k, v)
        err = check(q, k, v, out)
        t_b = time_cpu(lambda: binformer.attention(q, k, v))
        t_s = time_cpu(lambda: F.scaled_dot_product_attention(q, k, v))
        el = b * h * n * n
        print(f"shape (B,H,N,d)={b, h, n, d}: binformer {t_b*1e3:.1f} ms ({el/t_b/1e9:.2f} G scores/s), "
              f"SDPA fp32 {t_s*1e3:.1f} ms ({el/t_s/1e9:.2f} G scores/s): {t_s/t_b:.2f}x faster; "
              f"rel. error vs float64 reference {err:.1e}")


if __name__ == "__main__":
    main()
