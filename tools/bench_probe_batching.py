"""Micro-benchmark: the conv probes block by block (as P3B runs them) against one grouped convolution.

P3B's reference patch probe (``p3b_fx.benefit.ConvProbe``) is run once per block and feature map.
On a GPU that is ~50 small conv/BatchNorm/ReLU chains per step, launch-bound (docs/gpu-check.md).
The same arithmetic fits one grouped convolution per map set:

- the B inputs are stacked along channels, and each convolution uses ``groups=B``;
- BatchNorm2d over B·hidden channels keeps each probe's own batch statistics;
- the B classifier heads become one batched matmul.

This tool times forward + backward of both, interleaved, and reports the medians and the largest
difference of their logits. The variants:

- block by block in fp32 (``--probe-impl per-block``, P3B's default on the CPU);
- block by block under autocast (bf16 on the CPU, fp16 on CUDA);
- grouped in fp32 (``p3b_fx.benefit.grouped_conv_probes``, what ``--probe-impl grouped`` runs and
  P3B's default on CUDA; the per-block weights are concatenated on every call, as there).

Usage: ``python tools/bench_probe_batching.py [--device cpu|cuda] [--preset source|vit-s] [--batch-size N]``
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

from p3b_fx.benefit import ConvProbe, default_hidden, grouped_conv_probes

PRESETS = {
    "source": {"blocks": 12, "dim": 192, "grid": 4, "batch": 64},  # the shipped ViT: 6 blocks x 2
    "vit-s": {"blocks": 24, "dim": 384, "grid": 14, "batch": 16},  # ViT-S/16 at 224 px
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", choices=sorted(PRESETS), default="source")
    p.add_argument("--rounds", type=int, default=9, help="interleaved timed rounds (median reported)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, help="instead of the preset's batch")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "bench_probe_batching.py: --device cuda asked for, but CUDA is not available here",
            file=sys.stderr,
        )
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = PRESETS[args.preset]
    n, dim, grid, batch = cfg["blocks"], cfg["dim"], cfg["grid"], args.batch_size or cfg["batch"]
    hidden, classes = default_hidden(dim), 10
    probes = nn.ModuleList(ConvProbe(dim, classes, hidden) for _ in range(n)).to(device)
    grids = [torch.randn(batch, dim, grid, grid, device=device) for _ in range(n)]
    low = torch.bfloat16 if device.type == "cpu" else torch.float16

    def per_block() -> torch.Tensor:
        return torch.stack([probe(g) for probe, g in zip(probes, grids, strict=True)])

    def per_block_autocast() -> torch.Tensor:
        with torch.autocast(device.type, dtype=low):
            return per_block().float()

    variants: dict[str, Callable[[], torch.Tensor]] = {
        "block by block, fp32": per_block,
        f"block by block, autocast {str(low).removeprefix('torch.')}": per_block_autocast,
        "grouped, fp32": lambda: grouped_conv_probes(list(probes), [torch.cat(grids, dim=1)])[0],  # type: ignore[arg-type]
    }
    with torch.no_grad():
        diff = float((per_block() - variants["grouped, fp32"]()).abs().max())
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(args.rounds + 2):
        for name, fn in variants.items():
            _sync(device)
            t0 = time.perf_counter()
            fn().sum().backward()  # type: ignore[no-untyped-call]
            _sync(device)
            if i >= 2:  # two warm-up rounds
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times[next(iter(variants))])
    print(
        f"{args.preset}: {n} probes, dim {dim}, hidden {hidden}, {grid}x{grid} grid, batch {batch}, "
        f"device {device}, {args.threads} thread(s); forward + backward, median of {args.rounds}"
    )
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:36s} {1e3 * med:9.2f} ms  ({med / base:.2f}x)")
    print(f"  largest |logit difference|, grouped vs block by block: {diff:.2g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
