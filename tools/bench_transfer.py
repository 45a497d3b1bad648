"""Transfer benchmark: prune a source model on a target domain with every method, ratio and seed.

Default: the shipped Fashion-MNIST ViT -> MNIST-5k (fixed 4,000 / 1,000 split); dense, P3B, uniform,
global Taylor and global magnitude; prune ratios 0.5 and 0.7 (the issue's) and 0.9 (where this easy
target starts to separate allocation methods; parameter budget, non-block parameters counted);
3 seeds; the same epochs for every method (dense trains epochs + fine-tune epochs). Any other pair
works: ``--model``/``--source-checkpoint`` and ``--target-data`` (a named dataset or an ImageFolder
with train/ and val/).

Runs go to ``--out/<method>-pr<ratio>-seed<seed>/`` (dense: ``--out/dense-seed<seed>/``) and are
reused when the benchmark is started again (a finished run with the same options is read back, an
interrupted run resumes from its epoch checkpoint). Writes the raw records
(``benchmarks/transfer.json``), the table into ``docs/bench-transfer.md`` (between markers; text
around them is kept) and the Pareto plot (``docs/transfer_pareto.png``): those committed files only
for the full default run; ``--quick``, ``--max-steps-per-epoch`` or another ``--out`` write them
inside ``--out`` unless ``--doc/--plot/--json`` say otherwise. ``--quick``: one seed, fewer epochs.

Usage: ``python tools/bench_transfer.py [--quick] [--workers 2] [--force]``; ``--help`` for the rest.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p3b_fx import transfer
from p3b_fx.config import METHODS, PROBE_DTYPES, PROBE_KINDS, SOURCE_MODEL, json_object
from p3b_fx.errors import P3BError
from p3b_fx.machine import describe
from p3b_fx.train import read_weights

EXIT_ERROR = 2
EXIT_FAILED_RUNS = 1
FULL = {"epochs": 10, "finetune_epochs": 2, "lr": 5e-3, "seeds": [0, 1, 2], "out": "runs/transfer"}
QUICK = {"epochs": 2, "finetune_epochs": 1, "lr": 5e-3, "seeds": [0], "out": "runs/transfer-quick"}
LR_WHY = (
    "the reference 5e-4 is meant for 50 + 300 epochs; in this few-epoch schedule it leaves every method "
    "far from converged (dense, 3 epochs on MNIST-5k: 63.2% at 5e-4, 80.2% at 2e-3, 88.6% at 5e-3, "
    "87.0% at 1e-2; one seed, measured before the benchmark)"
)
PROBE_WHY = (
    "the reference design (2 x [Conv3x3 → BatchNorm → ReLU], pool, linear) at the default width "
    "max(16, dim // 4) = 48 channels; at the full width (192) the probes would cost ~4.4x a plain "
    "training step on this small model (docs/bench-train-step.md)"
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_transfer.py", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--model", default=SOURCE_MODEL, help="timm model name, or 'source' (the shipped Fashion-MNIST ViT)")
    a("--source-checkpoint", help="weights of the source model (safetensors or state_dict)")
    a("--model-kwargs", type=json_object, help="JSON object of timm constructor arguments")
    a("--target-data", default="mnist-5k", help="named dataset (mnist-5k, digits, ...) or ImageFolder path")
    a("--data-root", help="where torchvision datasets live")
    a("--num-classes", type=int, help="classes of the target (resets the head when it differs)")
    a("--img-size", type=int, help="input side for timm models")
    a("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods (default: all)")
    a(
        "--ratios",
        nargs="+",
        type=float,
        default=[0.5, 0.7, 0.9],
        help="parameter prune ratios (default 0.5 0.7 0.9)",
    )
    a("--seeds", nargs="+", type=int, help="seeds (default 0 1 2; --quick: 0)")
    a("--epochs", type=int, help="pruning epochs, the same for every method (default 10; --quick 2)")
    a("--finetune-epochs", type=int, help="fine-tuning epochs after pruning (default 2; --quick 1)")
    a("--batch-size", type=int, help="batch size (default 64)")
    a("--lr", type=float, help="base learning rate at batch 512, scaled linearly (default 5e-3, see LR_WHY)")
    a("--probe", choices=PROBE_KINDS, default="patch_conv", help="P3B patch probe (default patch_conv)")
    a("--probe-dtype", choices=PROBE_DTYPES, help="P3B probes in float32 (default) or bfloat16 autocast")
    a("--probe-every", type=int, help="P3B probes on every N-th step (default 1)")
    a("--probe-fraction", type=float, help="share of each mini-batch the P3B probes read (default 1)")
    a("--probe-hidden", type=int, help="P3B conv probe channels (default max(16, width // 4))")
    a("--max-steps-per-epoch", type=int, help="cap the steps of an epoch (smoke tests)")
    a("--device", default="auto", help="auto, cpu or cuda[:N]")
    a("--workers", type=int, default=min(2, os.cpu_count() or 1), help="parallel runs (default 2)")
    a("--threads", type=int, default=1, help="torch threads per run (default 1)")
    a("--out", help="run directory (default runs/transfer; --quick: runs/transfer-quick)")
    a("--quick", action="store_true", help="one seed, 2 + 1 epochs, out runs/transfer-quick")
    a("--force", action="store_true", help="rerun every run even when a finished one exists")
    a("--collect-only", action="store_true", help="run nothing; tabulate the finished runs in --out")
    a(
        "--doc",
        help="Markdown file for the table ('' to skip; default: docs/bench-transfer.md for the full "
        "default benchmark, else bench-transfer.md in --out)",
    )
    a("--plot", help="Pareto plot PNG ('' to skip; default docs/transfer_pareto.png or in --out, as --doc)")
    a("--json", help="raw records ('' to skip; default benchmarks/transfer.json or in --out, as --doc)")
    a("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _ints(values: object) -> list[int]:
    assert isinstance(values, list), values
    return [int(v) for v in values]


def make_spec(args: argparse.Namespace) -> transfer.BenchSpec:
    preset = QUICK if args.quick else FULL
    base = {
        "model": args.model, "checkpoint": args.source_checkpoint, "model_kwargs": args.model_kwargs,
        "data": args.target_data, "data_root": args.data_root, "num_classes": args.num_classes,
        "img_size": args.img_size, "epochs": preset["epochs"] if args.epochs is None else args.epochs,
        "finetune_epochs": preset["finetune_epochs"] if args.finetune_epochs is None
        else args.finetune_epochs,
        "batch_size": args.batch_size, "lr": preset["lr"] if args.lr is None else args.lr,
        "probe": args.probe, "probe_dtype": args.probe_dtype, "probe_every": args.probe_every,
        "probe_fraction": args.probe_fraction, "probe_hidden": args.probe_hidden,
        "max_steps_per_epoch": args.max_steps_per_epoch,
        "device": args.device,
    }  # fmt: skip
    return transfer.BenchSpec(
        base={k: v for k, v in base.items() if v is not None},
        methods=tuple(dict.fromkeys(args.methods)),
        ratios=tuple(dict.fromkeys(args.ratios)),
        seeds=tuple(dict.fromkeys(args.seeds if args.seeds else _ints(preset["seeds"]))),
        out=args.out or str(preset["out"]),
    )


def machine() -> str:
    return describe(gpu=False)


def source_accuracy(spec: transfer.BenchSpec) -> str:
    if spec.base.get("model") != SOURCE_MODEL or spec.base.get("checkpoint"):
        return "not known (own checkpoint)"
    from p3b_fx.source_model import ASSETS_DIR, SOURCE_STEM, read_card  # noqa: PLC0415

    card = read_card(ASSETS_DIR / f"{SOURCE_STEM}.json")
    return (
        f"{100 * float(card['test_accuracy']):.2f}% top-1 on {card.get('dataset', '?')} test "
        f"({card.get('test_images', '?')} images; card dated {card.get('date', '?')}, "
        f"weights sha256 {str(card['weights_sha256'])[:12]}…)"
    )


def timing_lines(outcome: transfer.Outcome, wall_s: float, workers: int) -> list[str]:
    secs: dict[str, list[float]] = {}
    for r in outcome.records:
        secs.setdefault(str(r["method"]), []).append(float(r.get("seconds", 0.0)))
    per = ", ".join(f"{m} {sum(v) / len(v):.0f} s" for m, v in secs.items())
    total = sum(sum(v) for v in secs.values())
    return [
        f"- this invocation: {wall_s / 60:.1f} min wall with {workers} worker(s); "
        f"{outcome.reused} of {len(outcome.records)} finished runs were reused from an earlier invocation",
        f"- sum of run times: {total / 60:.1f} min "
        f"(÷ {workers} workers ≈ {total / 60 / max(workers, 1):.1f} min)",
        f"- mean run time per method: {per}",
    ]


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["python", "tools/bench_transfer.py", *sys.argv[1:]])


def render(
    spec: transfer.BenchSpec, args: argparse.Namespace, outcome: transfer.Outcome, wall_s: float
) -> str:
    rows = transfer.aggregate(outcome.records)
    s = spec.base
    lines = [
        f"Written by `tools/bench_transfer.py` on {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC"
        f"{' (--quick)' if args.quick else ''}; machine: {machine()}.",
        "",
        f"Command: `{command_line()}`",
        "",
        f"- source: `{s.get('model')}`{' + ' + str(s['checkpoint']) if s.get('checkpoint') else ''}; "
        f"its own accuracy: {source_accuracy(spec)}",
        f"- target: `{s.get('data')}`; seeds {list(spec.seeds)}; ratios {list(spec.ratios)} "
        "(parameter budget, non-block parameters counted)",
        f"- epochs: {s.get('epochs')} pruning + {s.get('finetune_epochs')} fine-tuning for every pruning "
        f"method; dense fine-tunes {int(s.get('epochs', 0)) + int(s.get('finetune_epochs', 0))} epochs; "
        f"batch {s.get('batch_size', 64)}, base lr {s.get('lr')} at batch 512 (scaled linearly)"
        + (f" — {LR_WHY}" if s.get("lr") == FULL["lr"] else "")
        + (f"; at most {s['max_steps_per_epoch']} steps per epoch" if s.get("max_steps_per_epoch") else ""),
        "- learning rate: constant while pruning (method doc §5), then "
        + (
            "cosine-decayed per step to 0 over the fine-tuning epochs (dense: over its last "
            f"{s.get('finetune_epochs')})"
            if s.get("lr_decay", "cosine") == "cosine"
            else "constant through the fine-tuning epochs too"
        )
        + " — the same for every method",
        f"- P3B probe: `{s.get('probe')}`"
        + (f" — {PROBE_WHY}" if s.get("probe") == "patch_conv" else "")
        + (f", under {s['probe_dtype']} autocast" if s.get("probe_dtype", "float32") != "float32" else "")
        + (f", probes once every {s['probe_every']} steps" if s.get("probe_every", 1) != 1 else "")
        + (f", probes on {s['probe_fraction']:g} of each batch" if s.get("probe_fraction", 1) != 1 else "")
        + (f", {s['probe_hidden']} conv probe channels" if s.get("probe_hidden") else ""),
        "- MACs: counted per image on each final model with `torch.utils.flop_counter` (same counter for "
        "every method)",
        "",
        transfer.format_table(rows),
        "",
        "Target figures (from the issue):",
        "",
        transfer.format_checks(transfer.check_targets(rows)),
        "",
        f"![Pareto: top-1 vs parameters and MACs]({Path(args.plot).name})" if args.plot else "",
        "",
        "Timings:",
        "",
        *timing_lines(outcome, wall_s, args.workers),
    ]
    if outcome.failures:
        lines += ["", "Failed runs:", "", *(f"- {k}: {v}" for k, v in outcome.failures.items())]
    return "\n".join(lines)


def write_outputs(
    spec: transfer.BenchSpec,
    args: argparse.Namespace,
    outcome: transfer.Outcome,
    wall_s: float,
    running: str = "",
) -> str:
    """Records (JSON), plot and doc; ``running`` ("k of N") marks a snapshot taken during the run."""
    text = render(spec, args, outcome, wall_s)
    if running:
        text = f"**In progress: {running} runs finished.**\n\n{text}"
    if args.json:
        meta = {
            **transfer.spec_summary(spec),
            "quick": args.quick,
            "machine": machine(),
            "wall_s": round(wall_s, 1),
            "finished": not running,
        }
        transfer.write_json_atomic(Path(args.json), {"benchmark": meta, "records": outcome.records})
    if args.plot and outcome.records:
        title = f"{spec.base.get('model')} → {spec.base.get('data')}, seeds {list(spec.seeds)}"
        transfer.pareto_plot(transfer.aggregate(outcome.records), Path(args.plot), title)
    if args.doc:
        header = "# Transfer benchmark: P3B against dense and the baselines"
        transfer.update_doc(Path(args.doc), text, header)
    return text


def progress(total: int, initial: int) -> Any:
    from tqdm import tqdm  # noqa: PLC0415

    return tqdm(total=total, initial=initial, desc="runs", unit="run", file=sys.stderr)


def run_or_collect(
    spec: transfer.BenchSpec, args: argparse.Namespace, jobs: list[transfer.Job], start: float
) -> transfer.Outcome:
    """Tabulate the finished runs (``--collect-only``) or run the rest, refreshing the outputs after each."""
    if args.collect_only:
        return transfer.collect(jobs)

    def snapshot(records: list[dict[str, Any]]) -> None:
        partial = transfer.Outcome(records, {}, 0)
        write_outputs(spec, args, partial, time.time() - start, f"{len(records)} of {len(jobs)}")

    return transfer.run_benchmark(
        jobs, workers=args.workers, threads=args.threads, force=args.force, on_record=snapshot,
        progress=progress,
    )  # fmt: skip


COMMITTED = {
    "doc": "docs/bench-transfer.md",
    "plot": "docs/transfer_pareto.png",
    "json": "benchmarks/transfer.json",
}
"""Where the full default benchmark writes: the figures committed with the repository."""
IN_RUN_DIR = {"doc": "bench-transfer.md", "plot": "transfer_pareto.png", "json": "transfer.json"}


def output_paths(args: argparse.Namespace) -> None:
    """Fill in --doc/--plot/--json: the committed files only for the full default benchmark (no
    --quick, no step cap, no other --out), so a smoke run never rewrites them; else inside --out."""
    full = not args.quick and args.max_steps_per_epoch is None and args.out in (None, str(FULL["out"]))
    run_dir = Path(args.out or str((QUICK if args.quick else FULL)["out"]))
    for key, committed in COMMITTED.items():
        if getattr(args, key) is None:
            setattr(args, key, committed if full else str(run_dir / IN_RUN_DIR[key]))


def main(argv: Sequence[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.workers < 1 or args.threads < 1:
        ap.error(f"--workers and --threads must be >= 1, got {args.workers} and {args.threads}")
    output_paths(args)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    start = time.time()
    try:
        spec = make_spec(args)
        if args.source_checkpoint:  # one clear error now, not one per run
            read_weights(Path(args.source_checkpoint), flag="--source-checkpoint")
        jobs = transfer.plan_jobs(spec)
        outcome = run_or_collect(spec, args, jobs, start)
        text = write_outputs(spec, args, outcome, time.time() - start)
    except P3BError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        where = args.out or "the run directory"
        print(f"interrupted: finished runs are kept in {where}; run again to continue", file=sys.stderr)
        return 130
    print(text)
    return EXIT_FAILED_RUNS if outcome.failures else 0


if __name__ == "__main__":
    sys.exit(main())
