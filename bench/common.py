"""Shared pieces of the benchmarks: shapes, timing, environment record, JSON output."""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
import time

import torch

# SPEC.md section 3: the shapes every GPU comparison uses, (B, H, N, D) with D = head dim = Dv.
GPU_SHAPES = {
    "vit_b16_224": (128, 12, 197, 64),
    "vit_l16_384": (32, 16, 577, 64),
    "dit_xl2_512": (16, 16, 1024, 72),
    "med3d": (16, 6, 1680, 64),
    "n4096_d64": (4, 16, 4096, 64),
    "n4096_d128": (4, 16, 4096, 128),
    "n16384_d64": (1, 16, 16384, 64),
}
# Patch grids of the vision shapes (num_prefix_tokens=1 where N = 1 + Wh*Ww), for the rel-pos bias.
def rel_pos_layout(n: int):
    """(Wh, Ww, num_prefix) with Wh*Ww + num_prefix == n, as square as possible."""
    for prefix in (1, 0):
        m = n - prefix
        r = int(round(m ** 0.5))
        if r * r == m:
            return r, r, prefix
    for prefix in (0, 1):
        m = n - prefix
        for h in range(int(m ** 0.5), 0, -1):
            if m % h == 0:
                return h, m // h, prefix
    raise ValueError(n)

EXP_RATE_H100 = 4.2e12  # ex2 results/s on H100 (SPEC.md section 3)


def exp_floor_s(b, h, nq, nk, exp_rate=EXP_RATE_H100):
    return b * h * nq * nk / exp_rate


def environment() -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": platform.processor() or _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, sm=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
        try:
            import triton
            env["triton"] = triton.__version__
        except ImportError:
            pass
    try:
        import binformer
        env["binformer_isa"] = binformer.cpu_isa() if hasattr(binformer, "cpu_isa") else None
    except ImportError:
        pass
    return env


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def time_cpu(fn, *, min_time=1.0, min_reps=3, warmup=1) -> float:
    """Median wall time (s) of fn() over repetitions lasting at least min_time seconds."""
    for _ in range(warmup):
        fn()
    times = []
    t_end = time.perf_counter() + min_time
    while len(times) < min_reps or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_cuda(fn, *, warmup_ms=50, rep_ms=300) -> float:
    """Median time (s) by CUDA events through triton.testing.do_bench."""
    from triton.testing import do_bench
    return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") * 1e-3


@contextlib.contextmanager
def env_switch(assignment: str):
    """NAME=VALUE set for the duration (binformer reads its runtime switches at every call), so one
    process can time both sides of a switch; the previous value comes back afterwards."""
    key, value = assignment.split("=", 1)
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[key]
        else:
            os.environ[key] = old


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")
