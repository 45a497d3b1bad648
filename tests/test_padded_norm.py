"""Norms over a pruned axis inside a block (q/k norms, BEiT-3's and EVA-02's inner norms): the slim
model recomputes the dense norm's statistics from the kept elements, exactly."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import RmsNorm
from timm.layers.fast_norm import simple_norm
from torch import nn

import p3b_fx
from p3b_fx import KeepPlan, train
from p3b_fx.core.padded_norm import padded_norm
from passes.pad_norms import PadNormsPass
from tests.conftest import assert_loads_with_torch_alone, tiny_vit
from tests.test_train import tiny_config

N, EPS = 24, 1e-5
KEPT = torch.tensor([0, 3, 4, 9, 10, 11, 17, 23])


def _dense(kind: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if kind == "layer":
        return F.layer_norm(x, (N,), w, b, EPS)
    if kind == "rms":
        return F.rms_norm(x, (N,), w, EPS)
    return simple_norm(x, [N], w, EPS)


@pytest.mark.parametrize("kind", ["layer", "rms", "simple"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_padded_norm_is_the_dense_norm_of_the_input_with_zeros_where_pruned(
    kind: str, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, N, generator=gen) * 2 + 0.7  # a mean far from 0: the zeros' share matters
    w, b = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    zeros = torch.zeros_like(x)
    zeros[..., KEPT] = x[..., KEPT]
    want = _dense(kind, zeros, w, b)[..., KEPT]
    bias = b[KEPT] if kind == "layer" else None
    got = padded_norm(x[..., KEPT].to(dtype), w[KEPT], bias, N, EPS, kind)
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want, atol=tol * float(want.abs().max()), rtol=0)
    # the norm of the kept elements alone would not do: the check can fail
    assert (_dense(kind, x, w, b)[..., KEPT] - want).abs().max() > 1e-2


def test_an_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        padded_norm(torch.ones(2, 4), None, None, 8, EPS, "group")


CASES: dict[str, dict[str, Any]] = {
    "qk_norm": {"qk_norm": True},  # timm LayerNorm → F.layer_norm over head_dim, before q · k
    "qk_norm, nn.RMSNorm": {"qk_norm": True, "norm_layer": nn.RMSNorm},  # a module, eps None
    "inner norms": {"scale_attn_norm": True, "scale_mlp_norm": True},  # over heads × head_dim, hidden
    "inner norms, nn.LayerNorm": {"scale_attn_norm": True, "scale_mlp_norm": True, "qk_norm": True,
                                  "norm_layer": partial(nn.LayerNorm, eps=1e-6)},
    "hidden norm, timm RmsNorm": {"scale_mlp_norm": True, "norm_layer": RmsNorm},  # → F.rms_norm
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_norms_over_heads_head_dims_and_hidden_neurons_prune_exactly(case: str) -> None:
    gm = p3b_fx.trace(_random(tiny_vit(depth=1, **CASES[case])))
    groups = p3b_fx.find_groups(gm)
    fixed = [(g.name, g.reason) for g in groups.groups if not g.prunable and g.role != p3b_fx.Role.SELECT]
    assert not fixed
    norms = [n for b in groups.blocks for n in b.norms]
    assert norms and all(any(g is not None for _, g in n.factors) for n in norms)
    x = torch.randn(2, 3, 32, 32)
    for seed in range(3):
        plan = KeepPlan.random(groups, 0.5, seed=seed)
        slim = p3b_fx.slim(gm, plan, groups)
        with torch.no_grad():
            out, dense = slim(x), gm(x)
            torch.testing.assert_close(out, p3b_fx.apply_masks(gm, plan, groups)(x), atol=1e-5, rtol=0)
        assert (out - dense).abs().max() > 1e-2
        assert sum(p.numel() for p in slim.parameters()) == plan.predicted_params(groups)
        assert not PadNormsPass(groups, plan)(slim).modified  # idempotent: the norms are rewritten


def _random(model: nn.Module) -> nn.Module:
    """Weights large enough that a wrong statistic shows (timm inits norm weights at 1, biases at 0)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5 + (1.0 if param.ndim == 1 else 0.0))
    return model


def test_without_the_gates_around_it_the_norm_would_not_be_exact() -> None:
    """The mask pass gates a norm's input and output: the masked model is what the slim one computes.
    Remove the gate before the hidden norm and the masked model differs, so the gates matter."""
    gm = p3b_fx.trace(_random(tiny_vit(depth=1, scale_mlp_norm=True)))
    groups = p3b_fx.find_groups(gm)
    plan = KeepPlan.from_mapping(groups, {"blocks.0.mlp:hidden": list(range(0, 192, 3))})
    masked = p3b_fx.apply_masks(gm, plan, groups)
    sites = {n.meta.get("p3b.mask_site") for n in masked.graph.nodes} - {None}
    norm = groups.block("blocks.0.mlp").norms[0].node
    assert f"blocks.0.mlp:{norm}:in" in sites
    assert f"blocks.0.mlp:{norm}:out" not in sites  # fc2's input gate zeroes its output already
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = p3b_fx.slim(gm, plan, groups)(x)
        torch.testing.assert_close(masked(x), want, atol=1e-5, rtol=0)
        site = next(n for n in masked.graph.nodes if n.meta.get("p3b.mask_site") == f"blocks.0.mlp:{norm}:in")
        site.replace_all_uses_with(site.args[0])  # type: ignore[arg-type]
        masked.graph.erase_node(site)
        masked.recompile()
        assert (masked(x) - want).abs().max() > 1e-3


def test_a_slim_model_with_padded_norms_loads_with_torch_alone_and_exports(tmp_path: Path) -> None:
    gm = p3b_fx.trace(_random(tiny_vit(depth=1, scale_attn_norm=True, scale_mlp_norm=True, qk_norm=True)))
    groups = p3b_fx.find_groups(gm)
    slim = p3b_fx.slim(gm, KeepPlan.random(groups, 0.5, seed=1), groups)
    x = torch.randn(2, 3, 32, 32)
    assert_loads_with_torch_alone(slim, x, tmp_path)
    from p3b_fx.export.jetpack import jetpack  # noqa: PLC0415 - onnx only here
    from p3b_fx.export.onnx import export_onnx  # noqa: PLC0415

    for version in ("4.6", "6.1"):
        report = export_onnx(slim.eval(), x[:1], tmp_path / f"m{version}.onnx", jetpack=jetpack(version))
        assert report.parity_max_abs_diff <= 1e-4


def test_p3b_prunes_the_hidden_neurons_under_a_norm_end_to_end(tmp_path: Path) -> None:
    """A short P3B run on a ViT with BEiT-3's inner norms: the gates around the norms score and
    mask like any other, the budget is met, and the slim model equals the hard-masked one."""
    kwargs = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2,
              "scale_attn_norm": True, "scale_mlp_norm": True}  # fmt: skip
    report = train.run(tiny_config(tmp_path / "run", model_kwargs=kwargs, finetune_epochs=0))
    assert report["budget_met"] and report["slim_max_abs_diff"] <= train.SLIM_TOLERANCE
    shrunk = KeepPlan.load(tmp_path / "run" / "plan.json").as_dict()
    assert any(name.endswith((":hidden", ":heads", ":head_dim")) for name in shrunk), sorted(shrunk)


def test_eva02_base_hidden_neurons_and_heads_under_inner_norms_are_prunable() -> None:
    """EVA-02-CLIP-B: a LayerNorm over the SwiGLU's hidden neurons and one over heads × head_dim
    before the projection. Both groups are free now (head_dim, in rotary pairs, too)."""
    model = timm.create_model("eva02_base_patch16_clip_224", pretrained=False, depth=1, img_size=32,
                              embed_dim=64, num_heads=4)  # fmt: skip
    gm = p3b_fx.trace(_random(model).eval())
    groups = p3b_fx.find_groups(gm)
    for name in ("blocks.0.attn:heads", "blocks.0.attn:head_dim", "blocks.0.mlp:hidden"):
        assert groups.group(name).prunable, groups.group(name).reason
    keep = {
        "blocks.0.attn:heads": [0, 3],
        "blocks.0.attn:head_dim": [1, 2, 6],
        "blocks.0.mlp:hidden": list(range(0, 170, 2)),
    }
    plan = KeepPlan.from_mapping(groups, keep)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = p3b_fx.slim(gm, plan, groups)(x)
        torch.testing.assert_close(out, p3b_fx.apply_masks(gm, plan, groups)(x), atol=1e-5, rtol=0)
    assert (out - gm(x)).abs().max() > 1e-2
