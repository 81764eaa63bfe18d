"""Where the forward time goes: the public op vs the raw torch op, and per-kernel GPU time (torch.profiler)."""
import sys, os
import torch
from torch.profiler import profile, ProfilerActivity
sys.path.insert(0, os.path.dirname(__file__))
from common import GPU_SHAPES, time_cuda  # noqa: E402
import binformer  # noqa: E402

# Like SDPA, time the kernels without value checks (each is a device sync; see binformer.set_value_checks).
binformer.set_value_checks(False)

for name in sys.argv[1].split(",") if len(sys.argv) > 1 else ["vit_b16_224", "n4096_d64"]:
    b, h, n, d = GPU_SHAPES[name]
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.float16) for _ in range(3))
    aq = q.float().abs().mean(dim=(-2, -1)).unsqueeze(-1)
    ak = k.float().abs().mean(dim=(-2, -1)).unsqueeze(-1)
    sc = 1.0 / d ** 0.5
    raw = lambda: torch.ops.binformer.attention_fwd(q, k, v, aq, ak, None, None, 0, 0, 0, d, sc, False, False, "ste")
    raw_plain = lambda: torch.ops.binformer.attention_fwd(q, k, v, None, None, None, None, 0, 0, 0, d, sc, False, False, "ste")
    pub = lambda: binformer.attention(q, k, v, q_scale=aq, k_scale=ak)
    print(f"{name}: public {time_cuda(pub)*1e6:.1f} us, raw op {time_cuda(raw)*1e6:.1f} us, "
          f"raw op no scales {time_cuda(raw_plain)*1e6:.1f} us", flush=True)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            pub()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60), flush=True)
