#!/usr/bin/env python3
"""Benchmark: torch's fused AdamW (``p3b_fx.train.adamw``) against the per-parameter loop.

Times one optimiser step over the source ViT's parameters and over its P3B probes' (conv probes,
default width), each setting side by side in one process: ``--rounds`` rounds, each timing
``--steps`` steps of the loop then of the fused kernel; reports the median per-step time of each
and their ratio. Also the largest parameter difference after five identical steps (the same update
up to rounding). One torch thread by default (``--threads``).

    python tools/bench_adamw.py
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

import p3b_fx
from p3b_fx import train
from p3b_fx.config import PruneConfig
from p3b_fx.machine import describe

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling tool, also when imported
from bench_train_step import SOURCE_ARCH  # the source ViT's architecture, in one place


def _modules() -> dict[str, nn.Module]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = PruneConfig(model="vit_tiny_patch16_224", model_kwargs=SOURCE_ARCH, data="digits",
                          num_classes=10, out=tmp, device="cpu")  # fmt: skip
        model = train.build_model(cfg)
        gm = p3b_fx.trace(model)
        probes = train.make_probes(model, p3b_fx.find_groups(gm), 10, cfg, gm)
    return {"source ViT": model, "its conv probes": probes}


def _optimizer(module: nn.Module, fused: bool) -> torch.optim.AdamW:
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    return torch.optim.AdamW(params, lr=1e-3, fused=True) if fused else torch.optim.AdamW(params, lr=1e-3)


def measure(module: nn.Module, rounds: int, steps: int) -> tuple[float, float, float]:
    """(median ms per step unfused, fused, max abs parameter difference after 5 steps)."""
    loop, fused = copy.deepcopy(module), copy.deepcopy(module)
    opts = {"loop": _optimizer(loop, False), "fused": _optimizer(fused, True)}
    times: dict[str, list[float]] = {k: [] for k in opts}
    for _ in range(rounds):
        for key, opt in opts.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                opt.step()
            times[key].append(1e3 * (time.perf_counter() - t0) / steps)
    a, b = copy.deepcopy(module), copy.deepcopy(module)
    oa, ob = _optimizer(a, False), _optimizer(b, True)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        pb.grad = pa.grad.clone() if pa.grad is not None else None
    for _ in range(5):
        oa.step()
        ob.step()
    diff = max(
        float((pa - pb).detach().abs().max()) for pa, pb in zip(a.parameters(), b.parameters(), strict=True)
    )
    return statistics.median(times["loop"]), statistics.median(times["fused"]), diff


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"machine: {describe(gpu=False)}; {args.threads} thread(s), {args.rounds} x {args.steps} steps")
    print("| parameters of | count | AdamW loop (ms/step) | fused (ms/step) | ratio | max diff, 5 steps |")
    print("|---|---|---|---|---|---|")
    for name, module in _modules().items():
        count = sum(p.numel() for p in module.parameters())
        loop, fused, diff = measure(module, args.rounds, args.steps)
        print(f"| {name} | {count:,} | {loop:.2f} | {fused:.2f} | {loop / fused:.1f}x | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
