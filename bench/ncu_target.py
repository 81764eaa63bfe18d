"""A small driver for Nsight Compute: the forward op on one shape of common.GPU_SHAPES (fp16).

Usage: python bench/ncu_target.py [SHAPE] [relpos]   (default n4096_d64, per-head scales, no bias)
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import GPU_SHAPES, rel_pos_layout  # noqa: E402

import binformer  # noqa: E402

binformer.set_value_checks(False)

name = sys.argv[1] if len(sys.argv) > 1 else "n4096_d64"
b, h, n, d = GPU_SHAPES[name]
torch.manual_seed(0)
q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.float16) for _ in range(3))
aq = q.float().abs().mean(dim=(-2, -1)).unsqueeze(-1)
ak = k.float().abs().mean(dim=(-2, -1)).unsqueeze(-1)
extra = {}
if "relpos" in sys.argv[2:]:
    wh, ww, prefix = rel_pos_layout(n)
    extra = dict(rel_pos_table=0.1 * torch.randn(h, (2 * wh - 1) * (2 * ww - 1) + 3, device="cuda"),
                 rel_pos_grid=(wh, ww), num_prefix_tokens=prefix)
for _ in range(4):
    binformer.attention(q, k, v, q_scale=aq, k_scale=ak, **extra)
torch.cuda.synchronize()
