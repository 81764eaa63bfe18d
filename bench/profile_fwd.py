"""Where the forward time goes: the public op vs the raw torch op, and per-kernel GPU time (torch.profiler).

Usage: python bench/profile_fwd.py [SHAPES] [--q-bits]
  SHAPES    comma-separated names of common.GPU_SHAPES (default vit_b16_224,n4096_d64)
  --q-bits  also split the op with q given as prepacked sign bits (binformer.pack_sign): what the
            attention kernel saves when it loads Q's bits instead of packing fp16 Q itself.
"""
import sys, os
import torch
from torch.profiler import profile, ProfilerActivity
sys.path.insert(0, os.path.dirname(__file__))
from common import GPU_SHAPES, time_cuda  # noqa: E402
import binformer  # noqa: E402

# Like SDPA, time the kernels without value checks (each is a device sync; see binformer.set_value_checks).
binformer.set_value_checks(False)


def kernel_split(fn, reps=5):
    """(op-average device time, [(kernel name, average device us)]) over reps calls."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    # Kernels only: an op row (aten::, binformer::) would repeat its kernels' device time.
    rows = [(e.key, e.device_time_total / reps) for e in prof.key_averages()
            if e.device_time_total > 0 and not e.key.startswith(("aten::", "binformer::"))]
    rows.sort(key=lambda r: -r[1])
    return sum(t for _, t in rows), rows


args = [a for a in sys.argv[1:] if not a.startswith("--")]
q_bits = "--q-bits" in sys.argv
for name in args[0].split(",") if args else ["vit_b16_224", "n4096_d64"]:
    b, h, n, d = GPU_SHAPES[name]
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.float16) for _ in range(3))
    aq = q.float().abs().mean(dim=(-2, -1)).unsqueeze(-1)
    ak = k.float().abs().mean(dim=(-2, -1)).unsqueeze(-1)
    sc = 1.0 / d ** 0.5
    def raw(q_in, q_scale=aq, k_scale=ak):
        return lambda: torch.ops.binformer.attention_fwd(
            q_in, k, v, q_scale, k_scale, None, None, 0, 0, 0, d, sc, False, False, "ste")
    pub = lambda: binformer.attention(q, k, v, q_scale=aq, k_scale=ak)
    variants = [("fp16 q", raw(q))]
    if q_bits:
        variants.append(("q bits", raw(binformer.pack_sign(q))))
    print(f"{name} (B={b} H={h} N={n} d={d}): public op {time_cuda(pub)*1e6:.1f} us, "
          f"raw op no scales {time_cuda(raw(q, None, None))*1e6:.1f} us", flush=True)
    for label, fn in variants:
        total, rows = kernel_split(fn)
        print(f"  {label}: raw op {time_cuda(fn)*1e6:.1f} us, kernels {total:.1f} us", flush=True)
        for kname, t in rows:
            print(f"    {t:8.1f} us  {kname[:110]}", flush=True)
