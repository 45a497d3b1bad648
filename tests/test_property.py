"""Property test: random ViT configs × random keep plans, masked == slim, exact parameter count."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import p3b_fx
from p3b_fx import KeepPlan
from tests.conftest import set_fused, tiny_vit


@st.composite
def vit_configs(draw: st.DrawFn) -> dict[str, object]:
    heads = draw(st.integers(1, 4))
    patch = draw(st.sampled_from([4, 8]))
    return {
        "depth": draw(st.integers(1, 3)),
        "num_heads": heads,
        "embed_dim": heads * draw(st.sampled_from([4, 8, 12])),
        "mlp_ratio": draw(st.sampled_from([1.0, 2.0, 4.0])),
        "patch_size": patch,
        "img_size": patch * draw(st.integers(1, 3)),
        "qkv_bias": draw(st.booleans()),
        "init_values": draw(st.sampled_from([None, 0.5])),
        "class_token": (cls := draw(st.booleans())),
        "global_pool": "token" if cls else "avg",
        "reg_tokens": draw(st.sampled_from([0, 2])),
        "num_classes": draw(st.integers(2, 6)),
    }


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=vit_configs(), ratio=st.floats(0.05, 1.0), seed=st.integers(0, 10_000), fused=st.booleans(),
       drop_block=st.booleans())  # fmt: skip
def test_random_models_and_plans(
    cfg: dict[str, object], ratio: float, seed: int, fused: bool, drop_block: bool
) -> None:
    model = set_fused(tiny_vit(**cfg), fused)
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    keep = KeepPlan.random(groups, ratio, seed).as_dict()
    if drop_block:  # also exercise whole-block removal
        keep[next(g.name for g in groups.prunable if g.role == p3b_fx.Role.HIDDEN)] = ()
    plan = KeepPlan.from_mapping(groups, keep)
    masked, slim = p3b_fx.apply_masks(gm, plan, groups), p3b_fx.slim(gm, plan, groups)
    size = int(cfg["img_size"])  # type: ignore[call-overload]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(slim(x), masked(x), atol=1e-5, rtol=0)
    assert sum(p.numel() for p in slim.parameters()) == plan.predicted_params(groups)
    again = p3b_fx.trace(slim)
    assert torch.equal(again(x), slim(x))
