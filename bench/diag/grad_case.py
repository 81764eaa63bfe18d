"""Diagnose one random gradient case of tests/python/test_autograd.py on CPU and CUDA:
per-gradient worst err/tol, where dv fails, and a cross check (CUDA backward fed with the CPU
forward's out / lse) that separates forward from backward errors.
Usage: python bench/diag/grad_case.py SEED [DEVICES]   (DEVICES: "cpu,cuda" (default), or "cuda"
alone, e.g. under compute-sanitizer to pin a kernel fault; the cross check needs both)"""
import sys, os, math
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests", "python"))
import torch
import binformer
from binformer import reference as ref
from conftest import attention_tolerances, make_inputs, random_case, rounding_error
import test_autograd as ta

seed = int(sys.argv[1]) if len(sys.argv) > 1 else 23
case = random_case(1000 + seed)
devices = sys.argv[2].split(",") if len(sys.argv) > 2 else ["cpu", "cuda"]
mode = "ste" if seed % 3 else "hamming"
print("case", case, mode)
for dev in devices:
    g, r, t = ta._grads(case, dev, mode, ta.ALL, seed=seed)
    for n in g:
        if g[n] is None or r[n] is None:
            continue
        err = (g[n].double() - r[n]).abs()
        tol = t[n] + rounding_error(r[n], g[n].dtype)  # what conftest.assert_grads_match allows
        ratio = err / tol.clamp_min(1e-300)
        w = ratio.argmax()
        print(f"{dev} {n}: worst err/tol {ratio.max().item():.3g} bad {(ratio > 1).sum().item()}/{ratio.numel()} "
              f"at {tuple(int(i) for i in torch.unravel_index(w, ratio.shape))} got {g[n].flatten()[w].item():.6g} "
              f"ref {r[n].flatten()[w].item():.6g} tol {tol.flatten()[w].item():.3g}")
        if n == "v" and (ratio > 1).any():
            print("  bad dv elements (b,h,key,ch):", [tuple(int(i) for i in x) for x in (ratio > 1).nonzero()[:20]])
if devices != ["cpu", "cuda"]:
    sys.exit(0)
# forward out / lse on both devices
q, k, v, kw = make_inputs(case, "cpu", seed=seed)
res = {}
for dev in ("cpu", "cuda"):
    mv = lambda x: x.to(dev) if torch.is_tensor(x) else x
    kd = {n: mv(x) for n, x in kw.items()}
    out, lse = binformer.attention(mv(q), mv(k), mv(v), **{**kd, "return_lse": True})
    res[dev] = (out.cpu(), lse.cpu())
ref_out, ref_lse, tol_out, tol_lse = attention_tolerances(q, k, v, kw, "cuda")
for dev in res:
    o, l = res[dev]
    print(f"{dev} fwd: out err/tol {((o.double() - ref_out).abs() / tol_out).max().item():.3g}; "
          f"lse err/tol {((l.double() - ref_lse).abs() / tol_lse).nan_to_num(0).max().item():.3g}")
print("cpu vs cuda lse max diff", (res["cpu"][1] - res["cuda"][1]).abs().nan_to_num(0).max().item(),
      "out max diff", (res["cpu"][0].float() - res["cuda"][0].float()).abs().max().item())
