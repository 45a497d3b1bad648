"""Which timm ViT families the tools handle: a few steps of each method, then ONNX export, per model.

For every model (small configuration, random weights, sklearn digits, a few steps per epoch) it
runs ``tools/prune.py`` with each ``--methods`` entry and, where P3B finished, compiles its slim
model with ``tools/prune_and_compile.py --target onnx --slim-model`` for every ``--jetpacks``
release. Each run is a subprocess of its own. Reported per run: the exit code and either the slim
vs hard-masked difference and whether the budget was met, the ONNX parity, or the error line the
user would see. This is a coverage check, not an accuracy benchmark: a few steps on random weights.

Usage: ``python tools/sweep_families.py [--models ...] [--methods p3b p3b-deploy uniform global-taylor]
[--out runs/sweep-families.md]`` (``p3b-deploy``: P3B with ``--granularity deploy``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p3b_fx.core.groups import ROLE_ORDER
from p3b_fx.core.io import atomic_write_text
from p3b_fx.machine import describe

TOOLS = Path(__file__).resolve().parent
SMALL = '{"img_size": 32, "patch_size": 8, "depth": 2}'
MODELS: dict[str, list[str]] = {
    "vit_tiny_patch16_224": ["--model-kwargs", SMALL],
    "deit_tiny_distilled_patch16_224": ["--model-kwargs", SMALL],
    "deit3_small_patch16_224": ["--model-kwargs", SMALL],
    "beit_base_patch16_224": ["--model-kwargs", SMALL],
    "eva02_tiny_patch14_224": ["--model-kwargs", SMALL],
    "eva02_base_patch14_224": ["--model-kwargs", SMALL],
    "eva02_base_patch16_clip_224": ["--model-kwargs", SMALL],
    "beit3_base_patch16_224": ["--model-kwargs", SMALL],
    "vit_small_patch16_rope_224": ["--model-kwargs", SMALL],
    "vit_small_patch16_rope_mixed_224": ["--model-kwargs", SMALL],
    "vit_small_patch16_dinov3": ["--model-kwargs", SMALL],
    "vit_pe_core_tiny_patch16_384": ["--model-kwargs", SMALL],
    "vit_base_patch16_sapiens2": [  # grouped-query attention in the second block
        "--model-kwargs", '{"img_size": 32, "patch_size": 8, "depth": 2, "num_kv_heads": [12, 6]}'],
    "vit_relpos_small_patch16_224": ["--model-kwargs", SMALL],
    "vit_small_patch14_reg4_dinov2": ["--model-kwargs", SMALL],
    "vit_base_patch16_clip_224": ["--model-kwargs", SMALL],
    "vit_medium_patch16_gap_256": ["--model-kwargs", SMALL],
    "vit_small_patch16_18x2_224": ["--model-kwargs", SMALL],
    "vit_base_patch16_xp_224": ["--model-kwargs", SMALL],  # ViT-22B-style parallel blocks
    "cait_xxs24_224": ["--model-kwargs", SMALL],
    "vit_small_r26_s32_224": ["--img-size", "64"],
    "xcit_nano_12_p16_224": ["--img-size", "64"],
    "pit_ti_224": ["--img-size", "64"],
    "levit_128s": ["--img-size", "64"],
    "swin_tiny_patch4_window7_224": [
        "--model-kwargs", '{"img_size": 56, "embed_dim": 32, "depths": [2, 2], "num_heads": [2, 4]}'],
    "davit_tiny": ["--img-size", "64"],
    "gcvit_xxtiny": ["--img-size", "64"],
    "maxvit_tiny_tf_224": ["--img-size", "64"],
    "swinv2_tiny_window8_256": [
        "--model-kwargs", '{"img_size": 64, "embed_dim": 32, "depths": [2, 2], "num_heads": [2, 4]}'],
    "tiny_vit_5m_224": ["--img-size", "64"],
    "twins_svt_small": ["--img-size", "64", "--model-kwargs", '{"depths": [1, 1, 1, 1]}'],
    "mobilevit_xxs": ["--img-size", "64"],
    "tnt_s_patch16_224": ["--model-kwargs", '{"depth": 1}'],
    "nextvit_small": ["--img-size", "64"],  # 24 blocks with its 1×1 conv MLPs: 82 % of the parameters
    "edgenext_xx_small": ["--img-size", "64"],  # ConvNeXt blocks writing (N, C, H, W)
    "fastvit_sa12": ["--img-size", "64"],  # attention in its last stage, 1×1 conv MLPs in all four
    "swiftformer_xs": ["--img-size", "64"],  # additive attention (one per stage), 1×1 conv encoders
    "volo_d1_224": ["--img-size", "64"],  # outlook attention: unfold, attention over k x k, fold
    "caformer_s18": ["--img-size", "64"],  # MetaFormer: scaled residuals, StarReLU, separable-conv stages
    # 1×1 convolutions as linears (passes/pointwise_conv.py)
    "poolformer_s12": ["--img-size", "64"],  # pooling mixer, 1×1 conv MLPs, (C, 1, 1) layer scale views
    "efficientformerv2_s0": ["--img-size", "64"],  # BatchNorm2d after every 1×1 conv, strided attention
    "mobilevitv2_050": ["--img-size", "64"],  # separable linear attention over patches
    "efficientvit_m0": ["--img-size", "64"],  # cascaded group attention over windows
    "levit_conv_128s": ["--img-size", "64"],  # LeViT with 1×1 convs and BatchNorm2d
    "sam2_hiera_tiny": ["--img-size", "64", "--model-kwargs",  # query pooling, windowed and global blocks
                        '{"stages": [1, 2, 2, 1], "global_att_blocks": [2], "window_spec": [8, 4, 4, 2]}'],
    "mvitv2_tiny": ["--img-size", "64"],  # pooled q, k and v per head, spatial relative positions
    "samvit_base_patch16": ["--img-size", "64", "--model-kwargs",  # heads folded into the batch, rel-pos
                            '{"depth": 2, "window_size": 2, "global_attn_indexes": [1]}'],
}  # fmt: skip
"""timm name → the flags that make it small (models without a depth argument run at 64 px; Swin with two
small stages at 56 px, so its 7 × 7 windows tile the 14 × 14 and 7 × 7 grids; SwinV2's 8 × 8 windows at
64 px; NeXt-ViT, FastViT and SwiftFormer with ``--blocks-only``, since their transformer blocks hold
only a small share of their parameters and no plan cuts 30 % of the whole model)."""

METHODS = {"p3b-deploy": ["--method", "p3b", "--granularity", "deploy"]}
"""Sweep columns that are not a ``--method`` of their own: P3B at the deploy granularity (whole heads
and hidden neurons, what TensorRT's fused attention wants)."""

COMMON = ["--data", "digits", "--num-classes", "10", "--epochs", "2", "--finetune-epochs", "1",
          "--max-steps-per-epoch", "4", "--batch-size", "16"]  # fmt: skip


def _run(cmd: Sequence[str]) -> tuple[int, str]:
    done = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, check=False)
    lines = [ln for ln in (done.stdout + done.stderr).splitlines() if ln.strip()]
    return done.returncode, (lines[-1] if lines else "")[:240]


def prune(model: str, method: str, ratio: float, out: Path) -> str:
    how = METHODS.get(method, ["--method", method])
    flags = [*MODELS.get(model, []), *COMMON, *how, "--prune-ratio", str(ratio)]
    rc, last = _run([str(TOOLS / "prune.py"), "--model", model, *flags, "--out", str(out)])
    if rc != 0:
        return f"exit {rc}: {last}"
    report = json.loads((out / "report.json").read_text())
    diff = report.get("slim_max_abs_diff")
    diff_text = "" if diff is None else f", slim vs masked {diff:.1e}"
    return f"ok{diff_text}, budget met {report.get('budget_met')}{_roles(out / 'plan.json')}"


def _roles(plan: Path) -> str:
    """The kinds of group the run could prune (the roles its plan lists), e.g. ", prunes heads+hidden"."""
    if not plan.is_file():
        return ""
    keep = json.loads(plan.read_text()).get("keep", {})
    roles = {name.rsplit(":", 1)[-1].rstrip("'") for name in keep}
    return ", prunes " + "+".join(str(r) for r in ROLE_ORDER if r in roles)


def export(model: str, slim: Path, jetpack: str, out: Path) -> str:
    cmd = [str(TOOLS / "prune_and_compile.py"), "--target", "onnx", "--jetpack", jetpack, "--slim-model",
           str(slim), "--model", model, *MODELS.get(model, []), "--data", "digits", "--num-classes", "10",
           "--out", str(out)]  # fmt: skip
    rc, last = _run(cmd)
    if rc != 0:
        return f"exit {rc}: {last}"
    onnx = json.loads((out / "report.json").read_text())["onnx"]
    return f"opset {onnx['opset']}, parity {onnx['parity_max_abs_diff']:.1e}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument(
        "--models", nargs="+", default=list(MODELS), help="timm names (default: the families above)"
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=["p3b", "p3b-deploy", "uniform", "global-taylor"],
        help="--method values of tools/prune.py, and p3b-deploy (P3B with --granularity deploy)",
    )
    p.add_argument("--ratio", type=float, default=0.3, help="parameter prune ratio")
    p.add_argument("--jetpacks", nargs="+", default=["6.1", "4.6"])
    p.add_argument("--out", default="runs/sweep-families.md", help="Markdown table")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    columns = [*args.methods, *(f"ONNX JetPack {j}" for j in args.jetpacks)]
    rows = ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    with tempfile.TemporaryDirectory(prefix="sweep-") as tmp:
        for model in args.models:
            cells = [prune(model, m, args.ratio, Path(tmp) / f"{model}-{m}") for m in args.methods]
            slim = Path(tmp) / f"{model}-p3b" / "slim.pt"
            cells += [export(model, slim, j, Path(tmp) / f"{model}-onnx-{j}") if slim.is_file() else "-"
                      for j in args.jetpacks]  # fmt: skip
            rows.append(f"| {model} | " + " | ".join(c.replace("|", "/") for c in cells) + " |")
            print(rows[-1], flush=True)
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = "python tools/sweep_families.py " + " ".join(sys.argv[1:] if argv is None else argv)
    head = (f"# timm ViT families: what the tools do with them\n\nWritten {when} by `{command.strip()}`: "
            f"random weights, sklearn digits, 2 + 1 epochs of at most 4 steps, prune ratio {args.ratio}; "
            f"machine: {describe()}."
            "\n\n")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, head + "\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
