"""Where ONNX Runtime CPU spends its time: milliseconds per op type, dense vs slim, side by side.

The same variants as ``tools/bench_latency.py`` (a uniform keep plan per granularity and parameter
reduction, static-batch ONNX for the chosen JetPack), each run under ONNX Runtime's own profiler
(:func:`p3b_fx.latency.ort_op_times`): one warm-up run, then ``--runs`` profiled runs. Prints a
Markdown table (ms per inference per op type, and each variant's total) and writes it with
``--out``. Use it to see which ops a slim graph does not shrink (e.g. the last-axis ``Gather`` of
the reference granularity's channel reads).

Usage: python tools/profile_ort.py [--model deit_small_patch16_224] [--granularities reference deploy]
       [--reductions 0.5] [--batch 8] [--threads 1] [--runs 5] [--out docs/profile-ort.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import onnxruntime as ort
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_latency import MODELS, timm_model

import p3b_fx
from p3b_fx import latency
from p3b_fx.errors import P3BError
from p3b_fx.export.jetpack import jetpack
from p3b_fx.machine import cpu_name

EXIT_ERROR = 2


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="profile_ort.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    p.add_argument(
        "--model", default="deit_small_patch16_224", help="'source' or a timm name (random weights)"
    )
    p.add_argument(
        "--granularities", nargs="+", default=["reference", "deploy"], choices=["reference", "deploy"]
    )
    p.add_argument("--reductions", nargs="+", type=float, default=[0.5], help="parameter reductions")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    p.add_argument("--runs", type=int, default=5, help="profiled runs per variant")
    p.add_argument("--jetpack", default="6.1")
    p.add_argument("--out", help="also write the table (Markdown) to this file")
    args = p.parse_args(argv)
    bad = [f"--{k} must be >= 1" for k in ("batch", "threads", "runs") if getattr(args, k) < 1]
    bad += [f"--reductions {r} must be in [0, 1)" for r in args.reductions if not 0 <= r < 1]
    if bad:
        p.error("; ".join(bad))
    return args


def variants(args: argparse.Namespace, workdir: Path) -> dict[str, tuple[Path, float]]:
    """Variant name → (ONNX file at ``--batch``, MACs per sample)."""
    model, shape = MODELS.get(args.model, timm_model(args.model))()
    gm = p3b_fx.trace(model, input_shape=(1, *shape))
    groups = p3b_fx.find_groups(gm)
    # the dense model through the same rewrite as the slim ones (a plan keeping everything): 1×1
    # convolutions, linears in the trace (passes/pointwise_conv.py), are convolutions again in both
    models: dict[str, nn.Module] = {"dense": p3b_fx.slim(gm, p3b_fx.KeepPlan.dense(groups), groups)}
    flops = {"dense": float(groups.flops_total)}
    for gran in args.granularities:
        for red in args.reductions:
            plan = latency.uniform_plan(groups, red, gran)
            models[f"{gran} {red:.0%}"] = p3b_fx.slim(gm, plan, groups)
            flops[f"{gran} {red:.0%}"] = float(plan.predicted_flops(groups))
    exported = latency.export_variants(models, shape, (args.batch,), jetpack(args.jetpack), workdir)
    return {v.name: (Path(v.onnx[args.batch]), flops[v.name]) for v in exported}


def table(times: Mapping[str, Mapping[str, float]], flops: Mapping[str, float]) -> str:
    names = list(times)
    ops = sorted(
        {op for t in times.values() for op in t}, key=lambda op: -max(t.get(op, 0.0) for t in times.values())
    )
    rows = [
        "| op type (ms per inference) | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for op in ops:
        if max(t.get(op, 0.0) for t in times.values()) < 0.05:
            continue
        cells = []
        for n in names:
            ms, total = times[n].get(op, 0.0), sum(times[n].values())
            cells.append(f"{ms:.1f} ({ms / total:.0%})" if ms else "-")
        rows.append(f"| {op} | " + " | ".join(cells) + " |")
    dense = sum(times[names[0]].values())
    rows.append("| **total** | " + " | ".join(f"**{sum(times[n].values()):.1f}**" for n in names) + " |")
    rows.append(
        "| speed-up vs dense (FLOP ratio) | "
        + " | ".join(
            f"{dense / sum(times[n].values()):.2f}x ({flops[names[0]] / flops[n]:.2f}x)" for n in names
        )
        + " |"
    )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            found = variants(args, Path(tmp))
            times = {
                n: latency.ort_op_times(path, args.batch, args.threads, runs=args.runs)
                for n, (path, _) in found.items()
            }
    except P3BError as exc:
        print(f"profile_ort.py: {exc}", file=sys.stderr)
        return EXIT_ERROR
    text = table(times, {n: f for n, (_, f) in found.items()})
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    head = (
        "# Where ONNX Runtime CPU spends its time: dense vs slim\n\n"
        f"ONNX Runtime {ort.__version__} CPU op profile of `{args.model}`, batch {args.batch}, "
        f"{args.threads} thread(s), mean of {args.runs} profiled runs; {cpu_name()}, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; {when}.\n"
        f"Command: `python tools/profile_ort.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n\n"
    )
    print(head + text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_name(out.name + ".tmp")
        tmp_out.write_text(head + text + "\n", encoding="utf-8")
        tmp_out.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
