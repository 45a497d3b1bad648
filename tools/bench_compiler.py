"""Benchmark the compiler itself: trace + find_groups + slim on full-size timm ViTs.

Not a test: prints a table of medians and writes it to docs/bench-compiler.md.
Usage: python tools/bench_compiler.py [--models vit_base_patch16_224 vit_large_patch16_224] [--runs 5]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import p3b_fx
from p3b_fx.core.io import atomic_write_text

TARGETS = {"vit_base_patch16_224": 2.0, "vit_large_patch16_224": 6.0}


def time_once(model: torch.nn.Module) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    gm = p3b_fx.trace(model)
    t1 = time.perf_counter()
    groups = p3b_fx.find_groups(gm)
    t2 = time.perf_counter()
    p3b_fx.slim(gm, p3b_fx.KeepPlan.random(groups, 0.5, seed=0), groups)
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(TARGETS))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "bench-compiler.md"))
    args = ap.parse_args(argv)
    rows = []
    for name in args.models:
        model = timm.create_model(name, pretrained=False).eval()
        runs = [time_once(model) for _ in range(args.runs)]
        med = [statistics.median(r[i] for r in runs) for i in range(3)]
        total = statistics.median(sum(r) for r in runs)
        target = TARGETS.get(name)
        rows.append(f"| {name} | {med[0]:.2f} | {med[1]:.2f} | {med[2]:.2f} | **{total:.2f}** | "
                    f"{f'≤ {target:.0f}' if target else '-'} |")  # fmt: skip
        print(rows[-1], flush=True)
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    text = "\n".join([
        "# Compiler speed: trace + find_groups + slim",
        "",
        f"Measured {when} on {platform.machine()} with {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; medians of {args.runs} runs, seconds; random plan keeping 50%.",
        f"Command: `python tools/bench_compiler.py --runs {args.runs}`.",
        "",
        "| model | trace | find_groups | slim | total | target |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ])  # fmt: skip
    atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
