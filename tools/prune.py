"""Prune a ViT with P3B while fine-tuning it (or run a baseline): ``python tools/prune.py --help``.

Thin entry point: parses flags into a :class:`p3b_fx.config.PruneConfig` (a ``--config`` TOML file
first, flags on top; a flag not given leaves the file's value) and calls :func:`p3b_fx.train.run`.
Every failure prints one clear message on stderr and exits with a non-zero code.

Data-parallel on many GPUs or nodes: ``torchrun --nproc_per_node=N tools/prune.py …`` (see
docs/distributed.md); ``--batch-size`` is then per process. Only rank 0 logs at INFO and prints the
summary; the other ranks log warnings and errors.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p3b_fx.config import (
    BUDGET_UNITS,
    GRANULARITIES,
    LR_DECAYS,
    METHODS,
    PROBE_DTYPES,
    PROBE_IMPLS,
    PROBE_KINDS,
    TORCH_COMPILE_MODES,
    PruneConfig,
    json_object,
)
from p3b_fx.errors import P3BError

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def parser(*, describe: bool = True) -> argparse.ArgumentParser:
    """The flags; ``describe=False`` leaves out ``--describe`` (prune_and_compile.py shares the rest)."""
    p = argparse.ArgumentParser(
        prog="prune.py", description="Prune a Vision Transformer with P3B (Pruning by Block Benefit)."
    )
    p.add_argument("--config", help="TOML file with options (flags override it)")
    if describe:
        p.add_argument(
            "--describe",
            action="store_true",
            help="print what can be pruned in --model (each group, or why it is fixed) and the "
            "largest --prune-ratio per granularity, then exit: no data, no training, no files",
        )
    p.add_argument("--model", help="timm model name, or 'source' for the shipped Fashion-MNIST ViT (default)")
    p.add_argument("--model-kwargs", type=json_object, help="JSON object of timm constructor arguments")
    p.add_argument("--checkpoint", help="weights to start from (safetensors or torch state_dict)")
    p.add_argument("--pretrained", action="store_true", default=None, help="load timm's pretrained weights")
    p.add_argument("--data", help="fashion-mnist, mnist-5k, digits, ... or an ImageFolder path")
    p.add_argument("--data-root", help="where torchvision datasets live")
    p.add_argument("--num-classes", type=int, help="reset the classification head to this many classes")
    p.add_argument("--img-size", type=int, help="input side (a timm model's img_size, where it takes one)")
    p.add_argument("--prune-ratio", type=float, help="share of all parameters to remove, in (0, 1)")
    p.add_argument("--budget", choices=BUDGET_UNITS, help="budget unit (default params)")
    p.add_argument("--blocks-only", action="store_true", default=None, help="budget the blocks only")
    p.add_argument("--floor", type=float, help="lowest keep ratio of any block")
    p.add_argument("--method", choices=METHODS, help="p3b (default) or a baseline")
    p.add_argument("--granularity", choices=GRANULARITIES, help="reference (elements) or deploy (heads)")
    p.add_argument("--round-to", type=int, help="keep hidden neurons in multiples of this (deploy)")
    p.add_argument("--epochs", type=int, help="pruning epochs (warm-up, sparsify, sharpen)")
    p.add_argument("--finetune-epochs", type=int, help="fine-tuning epochs of the slim model")
    p.add_argument("--lr-decay", choices=LR_DECAYS,
                   help="lr during the fine-tuning epochs: cosine to 0 (default) or constant")  # fmt: skip
    p.add_argument("--warmup-epochs", type=float, help="epochs before pruning starts (default 10%%)")
    p.add_argument(
        "--sparse-epochs", type=float, help="epoch at which full sparsity is reached (default 50%%)"
    )
    p.add_argument("--updates-per-epoch", type=int, help="keep-ratio updates per epoch (default 3)")
    p.add_argument("--batch-size", type=int, help="batch per process (effective batch: × torchrun processes)")
    p.add_argument("--lr", type=float, help="base learning rate at batch 512 (scaled by the effective batch)")
    p.add_argument("--probe", choices=PROBE_KINDS, help="patch probe design")
    p.add_argument("--probe-hidden", type=int, help="conv probe channels (default: max(16, width // 4))")
    p.add_argument(
        "--probe-every", type=int, help="run the probes every N-th step (default 1; always a window's last)"
    )
    p.add_argument("--probe-fraction", type=float,
                   help="share of each mini-batch the probes read, in (0, 1] (default 1: all)")  # fmt: skip
    p.add_argument("--probe-dtype", choices=PROBE_DTYPES,
                   help="probes in float32 (default, the reference) or under bfloat16 autocast")  # fmt: skip
    p.add_argument("--probe-impl", choices=PROBE_IMPLS,
                   help="conv probes block by block or as one grouped convolution (same function); "
                   "auto (default): grouped on CUDA, per-block on the CPU")  # fmt: skip
    p.add_argument("--torch-compile", choices=TORCH_COMPILE_MODES,
                   help="torch.compile the training steps in this mode (the same function, compiled "
                   "on first use); off (default): eager. reduce-overhead adds CUDA graphs (CUDA "
                   "only)")  # fmt: skip
    p.add_argument("--out", help="output directory")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu or cuda[:N]")
    p.add_argument("--no-amp", dest="amp", action="store_false", default=None, help="no mixed precision")
    p.add_argument("--max-steps-per-epoch", type=int, help="cap the steps of an epoch (quick runs)")
    p.add_argument(
        "--dist-timeout", type=float, help="minutes a rank waits for the others under torchrun (default 30)"
    )
    p.add_argument("--resume", action="store_true", default=None, help="continue the run in --out")
    p.add_argument("--force", action="store_true", default=None, help="overwrite the run in --out")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def is_rank0() -> bool:
    """Rank 0 of a torchrun launch (WORLD_SIZE > 1), or a single process."""
    return os.environ.get("WORLD_SIZE", "1") in ("", "1") or os.environ.get("RANK", "0") in ("", "0")


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    rank = os.environ.get("RANK") if os.environ.get("WORLD_SIZE", "1") not in ("", "1") else None
    fmt = "%(levelname)s %(message)s" if rank is None else f"[rank {rank}] %(levelname)s %(message)s"
    logging.basicConfig(level=level if is_rank0() else max(level, logging.WARNING), format=fmt)
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "verbose", "describe")}
    out: str | None = None
    try:
        from p3b_fx.train import run  # noqa: PLC0415 - keeps --help fast

        config = PruneConfig.from_sources(args.config, overrides)
        if args.describe:
            from p3b_fx.train import describe_model  # noqa: PLC0415

            print(describe_model(config))
            return 0
        out = config.out
        report = run(config)
    except P3BError as exc:
        tag = "" if rank is None else f" (rank {rank})"
        print(f"error{tag}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        from p3b_fx.train import interrupted_hint  # noqa: PLC0415

        print(f"interrupted: {interrupted_hint(out) if out else 'nothing was written'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not is_rank0():
        return 0
    print(
        f"{report['method']}: {report['params_dense']:,} -> {report['params_slim']:,} parameters, "
        f"top-1 {100 * report['top1']:.2f}% (before pruning {100 * report['top1_before_pruning']:.2f}%); "
        f"report in {Path(config.out) / 'report.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
