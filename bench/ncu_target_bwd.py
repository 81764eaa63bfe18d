"""A small driver for Nsight Compute: forward + "hamming" backward at B=4, H=16, N=4096, d=64 (fp16),
BinaryFormer's per-token weights (the benchmark's training case)."""
import torch

import binformer

binformer.set_value_checks(False)

torch.manual_seed(0)
q, k, v, dout = (torch.randn(4, 16, 4096, 64, device="cuda", dtype=torch.float16) for _ in range(4))
v.requires_grad_()
qw = torch.rand(4, 16, 4096, device="cuda").add_(0.5).requires_grad_()
kw = torch.rand(4, 16, 4096, device="cuda").add_(0.5).requires_grad_()
for _ in range(3):
    binformer.attention(q, k, v, q_scale=qw, k_scale=kw, grad_mode="hamming").backward(dout)
torch.cuda.synchronize()
