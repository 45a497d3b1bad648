#!/usr/bin/env python
"""Benchmark: what the traced graph and its gates cost in training, against the eager timm model.

For each model: forward + backward of one batch through (1) the eager timm model, (2) the graph
``p3b_fx.trace`` makes of it (1×1 convolutions as linears between transposes, unequal splits as one
linear per section), (3) that graph with every gate in place and folded into the linears (what a
P3B step runs, without the probes and the optimiser). Timed round-robin in one process, median of
per-round ratios to the eager step. Random weights; timings only.

    python tools/bench_trace_overhead.py --models efficientformerv2_s0 fastvit_sa12 --batch-size 16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

import p3b_fx
from p3b_fx import train
from p3b_fx.config import PruneConfig
from p3b_fx.core.io import atomic_write_text
from p3b_fx.errors import P3BError
from p3b_fx.machine import describe


def _step(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        module.zero_grad(set_to_none=True)
        out = module(x)
        (out[0] if isinstance(out, tuple) else out).float().sum().backward()

    return run


def measure(name: str, img_size: int, batch: int, rounds: int) -> dict[str, float]:
    """Median ms of the eager step and median per-round ratios of the traced and gated steps."""
    torch.manual_seed(0)
    model = train.build_model(PruneConfig(model=name, img_size=img_size, model_kwargs={"num_classes": 10}))
    model.train()
    x = torch.randn(batch, 3, img_size, img_size)
    gm = p3b_fx.trace(model, input_shape=(1, 3, img_size, img_size)).train()
    groups = p3b_fx.find_groups(gm)
    masked, _ = p3b_fx.insert_masks(gm, groups)
    p3b_fx.fold_masks(masked)
    steps = {"eager": _step(model, x), "traced": _step(gm, x), "gated": _step(masked.train(), x)}
    for run in steps.values():  # warm-up
        run()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for key, run in steps.items():
            t0 = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - t0)
    eager = times["eager"]
    ratios = {key: [t / e for t, e in zip(times[key], eager, strict=True)] for key in ("traced", "gated")}
    return {
        "eager_ms": 1e3 * statistics.median(eager),
        **{k: statistics.median(v) for k, v in ratios.items()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--models", nargs="+", default=["efficientformerv2_s0", "fastvit_sa12", "poolformer_s12"])
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="also write the table as markdown to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [
        f"Forward + backward, batch {args.batch_size} at {args.img_size} px, {args.threads} thread(s), "
        f"{args.rounds} rounds; {describe(gpu=False)}",
        "",
        "| model | eager step (ms) | traced / eager | traced + folded gates / eager |",
        "|---|---|---|---|",
    ]
    for name in args.models:
        try:
            r = measure(name, args.img_size, args.batch_size, args.rounds)
        except P3BError as exc:
            print(f"bench_trace_overhead.py: {name}: {exc}", file=sys.stderr)
            return 2
        rows.append(f"| {name} | {r['eager_ms']:.0f} | {r['traced']:.2f}x | {r['gated']:.2f}x |")
        print(rows[-1], flush=True)
    text = "\n".join(rows) + "\n"
    print(text)
    if args.out:
        atomic_write_text(Path(args.out), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
