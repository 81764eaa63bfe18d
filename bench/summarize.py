"""Markdown tables from the benchmark JSON files in bench/results (for README and the notes)."""
from __future__ import annotations

import json
import os
import sys

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _us(x):
    return f"{x:.0f}" if isinstance(x, float) else "n/a"


def forward_table(path=os.path.join(HERE, "gpu_forward.json")) -> str:
    d = json.load(open(path))
    e = d["env"]
    lines = [f"Forward, fp16, {e.get('device')}, torch {e['torch']}, {e['date']} (median us; speedup = peer / binformer)", "",
             "| shape (B,H,N,d) | binformer | FA2 | cuDNN | Flex | Sage | x FA2 | x cuDNN | exp floor | of floor | rel-pos | cuDNN+bias | x |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        u, s = r["us"], r["speedup"]
        f = lambda x: f"{x:.2f}" if x else "n/a"  # noqa: E731
        lines.append(
            f"| {r['shape_name']} ({r['B']},{r['H']},{r['N']},{r['d']}) | {_us(u.get('binformer'))} | {_us(u.get('fa2'))} | "
            f"{_us(u.get('cudnn'))} | {_us(u.get('flex'))} | {_us(u.get('sage'))} | {f(s['vs_fa2'])} | {f(s['vs_cudnn'])} | "
            f"{r['exp_floor_us']:.0f} | {r['exp_floor_fraction'].get('binformer', 0):.2f} | {_us(u.get('binformer_relpos'))} | "
            f"{_us(u.get('cudnn_dense_bias'))} | {f(s['relpos_vs_cudnn_dense_bias'])} |")
    pg = d.get("pack_and_gemm")
    if pg:
        lines += ["", f"pack_sign on 1 GiB fp16: {pg['pack_sign']['bandwidth_Bps']/1e12:.2f} TB/s = "
                      f"{100*pg['pack_sign']['fraction_of_copy']:.0f}% of the device copy ({pg['pack_sign']['copy_bandwidth_Bps']/1e12:.2f} TB/s); "
                      f"sign_matmul 8192^3 bits: {pg['sign_matmul']['TOPs']:.0f} TOP/s = "
                      f"{100*pg['sign_matmul']['fraction_of_ceiling']:.0f}% of the mma.sync b1 AND ceiling (10356 TOP/s)."]
    return "\n".join(lines)


def backward_table(path=os.path.join(HERE, "gpu_backward.json")) -> str:
    d = json.load(open(path))
    e = d["env"]
    lines = [f"Backward (fwd+bwd - fwd), fp16, {e.get('device')}, torch {e['torch']}, {e['date']} (median us)", "",
             "| shape | hamming bwd | ste bwd | FA2 bwd | cuDNN bwd | hamming x FA2 |", "|---|---|---|---|---|---|"]
    for r in d["rows"]:
        u = r["us"]
        lines.append(f"| {r['shape_name']} | {_us(u['binformer_hamming']['bwd'])} | {_us(u['binformer_ste']['bwd'])} | "
                     f"{_us(u['fa2']['bwd'])} | {_us(u['cudnn']['bwd'])} | "
                     f"{r['speedup'].get('binformer_hamming_bwd_vs_fa2', float('nan')):.2f} |")
    return "\n".join(lines)


def cpu_table(path=os.path.join(HERE, "cpu_bench.json")) -> str:
    d = json.load(open(path))
    lines = [f"CPU forward, d=64, B=1, {d['env'].get('cpu')}, {d['env']['cpu_threads']} threads, ISA {d['isa']}, "
             f"{d['env']['date']} (G score elements/s; speedup vs SDPA fp32)", "",
             "| H, N | fp32 | bf16 | pv_int8 | SDPA fp32 | numpy | fp32 x SDPA | bf16 x SDPA | int8 x SDPA | fp32 x numpy |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        lines.append(f"| {r['H']}, {r['N']} | {r['binformer_gelem_s']:.2f} | {r['binformer_bf16_gelem_s']:.2f} | "
                     f"{r['binformer_pv_int8_gelem_s']:.2f} | {r['sdpa_fp32_gelem_s']:.2f} | {r['numpy_gelem_s']:.3f} | "
                     f"{r['speedup_vs_sdpa']:.2f} | {r['bf16_speedup_vs_sdpa']:.2f} | {r['pv_int8_speedup_vs_sdpa']:.2f} | "
                     f"{r['speedup_vs_numpy']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    which = sys.argv[1:] or ["forward", "backward", "cpu"]
    for w in which:
        try:
            print({"forward": forward_table, "backward": backward_table, "cpu": cpu_table}[w]())
        except FileNotFoundError as e:
            print(f"({w}: {e})")
        print()
