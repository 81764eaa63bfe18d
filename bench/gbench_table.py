"""The table of a gbench A/B (scripts/gpu_cycle.sh gbench_ab): medians over rounds per arm and shape.

Reads the gbench_<arm>_<round>.log files of a folder (the torch-free AttentionFwdBench gtest, one
median of 20 calls per shape and round) and prints, per shape, each arm's median over its rounds
and every arm's change against the baseline arm, plus the baseline's spread over its rounds:

    python3 bench/gbench_table.py OUT_DIR [--base ARM]

The baseline defaults to `main` when there is such an arm, else the first arm in name order.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import statistics
import sys

LINE = re.compile(r"^attention_fwd (.+?)\s+B=\d+ H=\d+ N=\d+ d=\d+:\s+([0-9.]+) us")
FILE = re.compile(r"^gbench_(.+)_(\d+)\.log$")


def read_rounds(folder: str) -> dict[str, dict[str, list[float]]]:
    """{arm: {shape: [us of each round]}} from the gbench logs of folder."""
    arms: dict[str, dict[str, list[float]]] = {}
    for path in sorted(glob.glob(os.path.join(folder, "gbench_*_*.log"))):
        m = FILE.match(os.path.basename(path))
        if not m:
            continue
        shapes = arms.setdefault(m.group(1), {})
        with open(path) as f:
            for line in f:
                hit = LINE.match(line)
                if hit:
                    shapes.setdefault(hit.group(1).strip(), []).append(float(hit.group(2)))
    return arms


def table(arms: dict[str, dict[str, list[float]]], base: str) -> str:
    names = [base] + sorted(a for a in arms if a != base)
    shapes = list(dict.fromkeys(s for a in names for s in arms[a]))
    head = f"{'shape':<26}" + "".join(f"{a:>12}" for a in names)
    head += "".join(f"{a + '/' + base:>16}" for a in names[1:]) + f"{'spread ' + base:>16}"
    lines = [f"gbench medians over rounds, us (rounds: " + ", ".join(
        f"{a} {max((len(v) for v in arms[a].values()), default=0)}" for a in names) + ")", head]
    for s in shapes:
        med = {a: statistics.median(arms[a][s]) if arms[a].get(s) else None for a in names}
        row = f"{s:<26}" + "".join(f"{med[a]:12.1f}" if med[a] is not None else f"{'n/a':>12}" for a in names)
        for a in names[1:]:
            ok = med[a] is not None and med[base] is not None
            row += f"{100 * (med[a] / med[base] - 1):+15.1f}%" if ok else f"{'n/a':>16}"
        rounds = arms[base].get(s, [])
        row += f"{100 * (max(rounds) - min(rounds)) / min(rounds):15.1f}%" if len(rounds) > 1 else f"{'n/a':>16}"
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--base", default=None, help="the baseline arm (default: main, else the first)")
    args = p.parse_args(argv)
    arms = read_rounds(args.folder)
    if not arms:
        print(f"no gbench_<arm>_<round>.log files with results in {args.folder}", file=sys.stderr)
        return 1
    base = args.base or ("main" if "main" in arms else sorted(arms)[0])
    if base not in arms:
        print(f"no arm {base!r}; arms: {sorted(arms)}", file=sys.stderr)
        return 1
    print(table(arms, base))
    return 0


if __name__ == "__main__":
    sys.exit(main())
