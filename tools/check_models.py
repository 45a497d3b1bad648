#!/usr/bin/env python3
"""Which timm models the compiler core handles: groups found, and slim == hard-masked on random plans.

For each model (random weights, BatchNorm statistics included, one block per stage where timm takes
``depth``): trace, find the groups, count the prunable ones per role, then slice three random plans
(half of every prunable group) and compare the slim model with the hard-masked one, and with the
dense one (the plan must change the output, or the comparison shows nothing). No training
(``tools/sweep_families.py`` runs the training methods on fewer models). A project error (the model
is refused with a reason) is a clear answer; any other exception is reported as a bug.

    python tools/check_models.py --out docs/check-models.md
    python tools/check_models.py --models swin_tiny_patch4_window7_224 coat_tiny
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import timm
import torch
from tqdm import tqdm

import p3b_fx
from p3b_fx.core.groups import ROLE_ORDER
from p3b_fx.core.io import atomic_write_text
from p3b_fx.errors import P3BError
from p3b_fx.machine import describe

MODELS = (
    # plain and near-plain ViTs
    "vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "deit3_small_patch16_224",
    "vit_small_patch14_reg4_dinov2", "vit_base_patch16_clip_224", "vit_base_patch16_siglip_256",
    "vit_medium_patch16_gap_256", "vit_small_r26_s32_224", "flexivit_small", "vitamin_small_224",
    # attention variants
    "beit_base_patch16_224", "beitv2_base_patch16_224", "vit_relpos_small_patch16_224",
    "vit_srelpos_small_patch16_224",
    "eva02_tiny_patch14_224", "eva02_base_patch14_224", "eva02_base_patch16_clip_224",
    "beit3_base_patch16_224", "vit_small_patch16_rope_224", "vit_small_patch16_rope_mixed_224",
    "vit_small_patch16_dinov3", "vit_pe_core_tiny_patch16_384", "vit_small_patch16_18x2_224",
    "vit_base_patch16_xp_224", "cait_xxs24_224", "xcit_nano_12_p16_224", "convit_tiny",
    # hierarchical and windowed
    "pit_ti_224", "levit_128s", "swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256",
    "maxvit_tiny_tf_224", "davit_tiny", "gcvit_xxtiny", "nest_tiny", "hiera_tiny_224", "twins_svt_small",
    "crossvit_tiny_240", "coat_tiny", "coat_lite_tiny", "volo_d1_224", "tnt_s_patch16_224",
    "mvitv2_tiny", "efficientformer_l1", "pvt_v2_b0", "twins_pcpvt_small", "maxxvitv2_nano_rw_256",
    "sam2_hiera_tiny", "samvit_base_patch16",
    # more ViTs of timm 1.0.31
    "naflexvit_base_patch16_gap", "vit_so150m_patch16_reg4_map_256", "aimv2_large_patch14_224",
    "vit_base_patch16_sapiens2",
    # efficient and hybrid designs for small devices (blocks behind leaf modules, convolutions)
    "tiny_vit_5m_224", "mobilevit_xxs", "nextvit_small", "edgenext_xx_small", "fastvit_sa12",
    "swiftformer_xs", "csatv2", "efficientvit_m0",
    # MetaFormer (convolutional stages, then attention; scaled residuals)
    "caformer_s18", "poolformer_s12",
    # 1×1 convolutions as their linears (passes/pointwise_conv.py)
    "efficientformerv2_s0", "mobilevitv2_050", "efficientvit_b0", "levit_conv_128s", "coatnet_0_rw_224",
    "visformer_tiny",
)  # fmt: skip
PLANS = 3
TOLERANCE = 1e-9
"""Slim vs hard-masked, relative to the plan's effect. The check runs in float64: an exact rewrite
lands near 1e-15 there, a wrong slice near the effect itself. In float32 some random-weight models
(NeXt-ViT: outputs of 3e4 behind a dozen BatchNorms) lose 1e-3 of the output to rounding in the
masked model alone, which a float32 check would take for a bug."""


KWARGS: dict[str, dict[str, Any]] = {
    # grouped-query attention in the middle blocks only: one full, one with 6 key/value heads
    "vit_base_patch16_sapiens2": {"depth": 2, "num_kv_heads": (12, 6), "img_size": 224},
}
"""Models built with these arguments instead of ``depth=1``."""


def _model(name: str) -> torch.nn.Module:
    if name in KWARGS:
        return timm.create_model(name, pretrained=False, **KWARGS[name]).eval()
    try:
        return timm.create_model(name, pretrained=False, depth=1).eval()
    except (TypeError, ValueError):  # no depth argument (multi-stage models)
        return timm.create_model(name, pretrained=False).eval()


WEIGHT_SCALE = 0.3
"""The parameters are redrawn (:func:`randomise`): timm's init zeroes or shrinks what ends many
residual branches (LeViT's last BatchNorm weights, layer scales of 1e-5), and a check of a branch
that adds nothing would pass whatever the slice."""


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Redraw every floating parameter from ``seed``: matrices N(0, 1 / fan-in), so activations stay
    of order 1; vectors N(1, s²) for norm weights and scales, N(0, s²) otherwise, s =
    :data:`WEIGHT_SCALE`; every BatchNorm's running mean N(0, 0.1²) and variance U(0.5, 1.5)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.is_floating_point():
                continue
            draw = torch.randn(param.shape, generator=gen)
            if param.ndim >= 2:
                param.copy_(draw / math.sqrt(math.prod(param.shape[1:])))
            else:
                scale_like = name.rsplit(".", 1)[-1] in ("weight", "gamma", "scale")
                param.copy_(draw * WEIGHT_SCALE + float(scale_like))
        for mod in model.modules():
            mean, var = getattr(mod, "running_mean", None), getattr(mod, "running_var", None)
            if isinstance(mod, torch.nn.modules.batchnorm._NormBase) and mean is not None and var is not None:
                mean.copy_(torch.randn(mean.shape, generator=gen) * 0.1)
                var.copy_(torch.rand(var.shape, generator=gen) + 0.5)
    return model


def check(name: str) -> str:
    """One Markdown row: blocks, prunable groups per role, the worst slim-vs-masked difference."""
    t0 = time.perf_counter()
    if not timm.is_model(name):
        return f"| {name} | - | - | - | refused: no timm model of this name | - | 0 |"
    try:
        gm = p3b_fx.trace(randomise(_model(name)).double())
        groups = p3b_fx.find_groups(gm)
        roles = Counter(str(g.role) for g in groups.prunable)
        total = Counter(str(g.role) for g in groups.groups)
        per_role = ", ".join(f"{r} {roles[r]}/{total[r]}" for r in map(str, ROLE_ORDER) if total[r])
        x = torch.randn(2, *gm.meta["p3b.input_shape"][1:], dtype=torch.float64)
        worst, effect = 0.0, float("inf")
        with torch.no_grad():
            dense = gm(x)
            for seed in range(PLANS):
                plan = p3b_fx.KeepPlan.random(groups, 0.5, seed=seed)
                out = p3b_fx.slim(gm, plan, groups)(x)
                worst = max(worst, float((out - p3b_fx.apply_masks(gm, plan, groups)(x)).abs().max()))
                effect = min(effect, float((out - dense).abs().max()))
        verdict = "ok" if worst <= TOLERANCE * max(1.0, effect) else f"**slim differs by {worst:.1e}**"
        counts = f"{len(groups.blocks)} | {len(groups.prunable)}/{len(groups.groups)}"
        shown = "-" if not groups.prunable else f"{effect:.1e}"
        result = f"{counts} | {per_role} | {verdict}, {worst:.1e} | {shown}"
    except P3BError as exc:
        result = f"- | - | - | refused: {str(exc).splitlines()[0][:160]} | -"
    except Exception as exc:
        result = f"- | - | - | **bug: {type(exc).__name__}: {str(exc).splitlines()[0][:140]}** | -"
    return f"| {name} | {result} | {time.perf_counter() - t0:.0f} |"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument(
        "--models", nargs="+", default=list(MODELS), help=f"timm names (default: {len(MODELS)} models)"
    )
    p.add_argument("--out", help="also write the table as Markdown to this file")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    head = (
        "| model | blocks | prunable groups | per role (prunable/all) "
        "| slim vs hard-masked (max abs, float64) | plan's effect (least max abs change of the output) "
        "| s |\n"
        "|---|---|---|---|---|---|---|"
    )
    rows = [check(name) for name in tqdm(args.models, desc="models")]
    text = head + "\n" + "\n".join(rows)
    print(text)
    if args.out:
        when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        argv_text = " ".join(
            ["python", "tools/check_models.py", *(argv if argv is not None else sys.argv[1:])]
        )
        doc = (
            "# timm models: groups and slim exactness\n\n"
            f"Written by `{argv_text}`, {when}; machine: {describe(gpu=False)}, "
            f"timm {timm.__version__}. Random weights (every parameter N(0, 1) · {WEIGHT_SCALE}, BatchNorm "
            "statistics too), one block per stage where the model takes `depth`, "
            f"{PLANS} random plans keeping half of every prunable group, all in float64 (the model is "
            'cast before it is traced). "Slim vs hard-masked" must stay within '
            f"{TOLERANCE:g} of the plan's effect; the effect (how far the least-changed slim output "
            "moved from the dense one) shows the check is not vacuous. A row marked bug is an exception "
            "that is not a project error.\n\n" + text + "\n"
        )
        atomic_write_text(Path(args.out), doc)
    bugs = [r for r in rows if "**bug" in r or "**slim differs" in r]
    return 1 if bugs else 0


if __name__ == "__main__":
    sys.exit(main())
