"""Plots for the benchmark JSON files (matplotlib, headless)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_cpu(payload: dict, path: str) -> None:
    rows = payload["rows"]
    labels = [f"H{r['H']} N{r['N']}" for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    series = [("binformer_gelem_s", "binformer fp32"), ("binformer_bf16_gelem_s", "binformer bf16"),
              ("binformer_pv_int8_gelem_s", "binformer pv_int8"), ("sdpa_fp32_gelem_s", "torch SDPA fp32"),
              ("numpy_gelem_s", "numpy bitwise_count")]
    w = 0.8 / len(series)
    for i, (key, name) in enumerate(series):
        ax.bar([x + (i - (len(series) - 1) / 2) * w for x in xs], [r[key] for r in rows], w, label=name)
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("G score elements / s")
    ax.set_title(f"CPU forward, d=64, B=1 ({payload['env'].get('cpu', '')}, {payload['env']['cpu_threads']} threads)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def plot_gpu(payload: dict, path: str, methods: list[str]) -> None:
    rows = payload["rows"]
    labels = [r["shape_name"] for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    w = 0.8 / len(methods)
    for i, m in enumerate(methods):
        ax.bar([x + (i - (len(methods) - 1) / 2) * w for x in xs],
               [r["us"].get(m) if isinstance(r["us"].get(m), float) else float("nan") for r in rows], w, label=m)
    ax.set_xticks(list(xs), labels, rotation=15)
    ax.set_ylabel("median time (us), lower is better")
    ax.set_yscale("log")
    ax.set_title(f"{payload['benchmark']} on {payload['env'].get('device', '?')}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
