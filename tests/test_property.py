"""Property test: random ViT configs × random keep plans, masked == slim, exact parameter count."""

from __future__ import annotations

import os

import timm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import p3b_fx
from p3b_fx import KeepPlan
from tests.conftest import assert_trace_matches, set_fused, tiny_vit


def _random_weights(model: torch.nn.Module, seed: int) -> None:
    """Every parameter N(0, 1) · 0.3 from ``seed``: weights large enough that a wrong slice shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


def _assert_slim_matches(
    gm: torch.fx.GraphModule, groups: p3b_fx.GroupSet, plan: KeepPlan, x: torch.Tensor, atol: float
) -> None:
    """At ``x`` (a batch other than the traced one): slim == hard-masked within ``atol``, the slim
    model holds the plan's parameter count, and it traces again to itself."""
    slim = p3b_fx.slim(gm, plan, groups)
    with torch.no_grad():
        torch.testing.assert_close(slim(x), p3b_fx.apply_masks(gm, plan, groups)(x), atol=atol, rtol=0)
    assert sum(p.numel() for p in slim.parameters()) == plan.predicted_params(groups)
    assert_trace_matches(p3b_fx.trace(slim), slim, x)


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


@st.composite
def rotary_configs(draw: st.DrawFn) -> dict[str, object]:
    """timm's Eva (EVA-02, the RoPE ViTs, DINOv3, the Perception Encoder and Sapiens2 are all built
    from it): each kind of rotary table and rotation, fused or separate q/k/v, SwiGLU, inner norms,
    and timm's other attention class, with grouped-query attention (key/value heads shared by 1–4
    query heads each)."""
    heads = draw(st.integers(1, 4))
    fused = draw(st.booleans())
    attn = draw(st.sampled_from(["eva", "rope"]))
    rope = draw(st.sampled_from(["cat", "mixed", "dinov3"]))
    # grouped queries: not with a table per head (rope-mixed), which timm's attention cannot share
    shared = draw(st.sampled_from([g for g in (1, 2, 4) if heads % g == 0]))
    kv_heads = heads // shared if attn == "rope" and rope != "mixed" else heads
    head_dim = draw(st.sampled_from([8, 16] if rope == "dinov3" else [4, 8, 12]))  # dinov3: 4 | head_dim
    return {
        "depth": draw(st.integers(1, 2)),
        "num_heads": heads,
        "embed_dim": heads * head_dim,
        "patch_size": 8,
        "img_size": 8 * draw(st.integers(2, 3)),
        "use_rot_pos_emb": True,
        "rope_type": rope,
        "rope_rotate_half": False if rope == "mixed" else draw(st.booleans()),
        "qkv_fused": fused and kv_heads == heads,  # timm fuses q, k and v only without grouped queries
        "attn_type": attn,
        "num_kv_heads": kv_heads,
        "qk_norm": draw(st.booleans()),
        "swiglu_mlp": (swiglu := draw(st.booleans())),
        "scale_mlp": swiglu and draw(st.booleans()),
        "scale_attn_inner": draw(st.booleans()),
        "class_token": draw(st.booleans()),
        "num_reg_tokens": draw(st.sampled_from([0, 2])),
        "num_classes": 3,
    }


@settings(max_examples=int(os.environ.get("P3B_ROTARY_EXAMPLES", "40")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(cfg=rotary_configs(), ratio=st.floats(0.1, 1.0), seed=st.integers(0, 10_000))
def test_random_rotary_models_and_plans(cfg: dict[str, object], ratio: float, seed: int) -> None:
    """Head dims pruned in pairs, the rotary table's kept rows gathered or sliced: slim == masked."""
    model = tiny_vit(name="eva02_tiny_patch14_224", **cfg)
    _random_weights(model, seed)
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    head_dim = groups.group("blocks.0.attn:head_dim")
    assert head_dim.prunable and head_dim.size * 2 == int(cfg["embed_dim"]) // int(cfg["num_heads"]), head_dim
    heads, kv_heads = int(cfg["num_heads"]), int(cfg["num_kv_heads"])  # type: ignore[call-overload]
    if kv_heads == 1 < heads:  # every query head reads the one key/value head: kept together
        assert "grouped-query attention" in groups.group("blocks.0.attn:heads").reason
    elif heads > 1:  # one group per key/value head; the query heads that read one are kept together
        assert groups.group("blocks.0.attn:heads").size == kv_heads
        if kv_heads < heads:
            shared = groups.group("blocks.0.attn:heads'")
            assert shared.size == heads // kv_heads and not shared.prunable, shared
    plan = KeepPlan.random(groups, ratio, seed)
    size = int(cfg["img_size"])  # type: ignore[call-overload]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(
            p3b_fx.slim(gm, plan, groups)(x), p3b_fx.apply_masks(gm, plan, groups)(x), atol=1e-5, rtol=0
        )


@st.composite
def sam_configs(draw: st.DrawFn) -> dict[str, object]:
    depth = draw(st.integers(1, 3))
    heads = draw(st.integers(1, 4))
    return {
        "img_size": draw(st.sampled_from([32, 64])),
        "depth": depth,
        "num_heads": heads,
        "embed_dim": heads * draw(st.sampled_from([4, 8])),
        "window_size": draw(st.sampled_from([0, 2])),
        "global_attn_indexes": tuple(draw(st.sets(st.integers(0, depth - 1)))),
        "use_rel_pos": draw(st.booleans()),
        "qkv_bias": draw(st.booleans()),
        "neck_chans": 8,
        "num_classes": draw(st.integers(2, 6)),
    }


@settings(max_examples=int(os.environ.get("P3B_SAM_EXAMPLES", "40")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(cfg=sam_configs(), ratio=st.floats(0.05, 1.0), seed=st.integers(0, 10_000), fused=st.booleans())
def test_random_sam_models_and_plans(cfg: dict[str, object], ratio: float, seed: int, fused: bool) -> None:
    """SAM's attention folds the heads into the batch (and, with relative positions, adds an einsum
    bias from q): at a batch other than the traced one, slim == masked and the parameter count is
    the plan's; the slim model traces again to itself."""
    model = timm.create_model("samvit_base_patch16", pretrained=False, **cfg).eval()
    _random_weights(model, seed)
    for block in model.blocks:
        block.attn.fused_attn = fused
    size = int(cfg["img_size"])  # type: ignore[call-overload]
    gm = p3b_fx.trace(model, input_shape=(1, 3, size, size))
    groups = p3b_fx.find_groups(gm)
    if int(cfg["num_heads"]) > 1:  # type: ignore[call-overload]
        assert groups.group("blocks.0.attn:heads").prunable, groups.group("blocks.0.attn:heads").reason
    plan = KeepPlan.random(groups, ratio, seed)
    _assert_slim_matches(gm, groups, plan, torch.randn(3, 3, size, size), atol=1e-5)  # traced at batch 2


@st.composite
def mvit_configs(draw: st.DrawFn) -> dict[str, object]:
    stages = draw(st.integers(1, 2))
    return {
        "depths": tuple(draw(st.integers(1, 2)) for _ in range(stages)),
        "embed_dim": draw(st.sampled_from([8, 16])),
        "num_heads": draw(st.integers(1, 2)),
        "mlp_ratio": draw(st.sampled_from([1.0, 2.0])),
        "expand_attn": draw(st.booleans()),
        "qkv_bias": draw(st.booleans()),
        "use_cls_token": draw(st.booleans()),
        "residual_pooling": draw(st.booleans()),
        "mode": draw(st.sampled_from(["conv", "max", "avg"])),
        "stride_q": ((1, 1), (2, 2))[:stages],
        "stride_kv_adaptive": draw(st.sampled_from([(2, 2), (4, 4)])),
        "rel_pos_type": draw(st.sampled_from(["spatial", "none"])),
    }


@settings(max_examples=int(os.environ.get("P3B_MVIT_EXAMPLES", "30")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(cfg=mvit_configs(), ratio=st.floats(0.05, 1.0), seed=st.integers(0, 10_000))
def test_random_mvitv2_models_and_plans(cfg: dict[str, object], ratio: float, seed: int) -> None:
    """MViTv2's pooled attention (conv, max or average pooling, a class token or none, residual
    pooling, spatial relative positions or none): slim == masked at a batch other than the traced
    one, parameter count as planned, retrace equal. (``pool_first`` and ``conv_unshared`` fail in
    timm's own forward at most of these sizes, so they are not drawn.)"""
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg  # noqa: PLC0415

    model = MultiScaleVit(MultiScaleVitCfg(**cfg), img_size=32, num_classes=3).eval()  # type: ignore[arg-type]
    _random_weights(model, seed)
    gm = p3b_fx.trace(model, input_shape=(1, 3, 32, 32))
    groups = p3b_fx.find_groups(gm)
    plan = KeepPlan.random(groups, ratio, seed)
    _assert_slim_matches(gm, groups, plan, torch.randn(3, 3, 32, 32), atol=1e-4)  # traced at batch 2


@st.composite
def cait_configs(draw: st.DrawFn) -> dict[str, object]:
    heads = draw(st.integers(1, 4))
    return {
        "img_size": 16,
        "patch_size": draw(st.sampled_from([4, 8])),
        "depth": draw(st.integers(1, 2)),
        "depth_token_only": draw(st.integers(1, 2)),
        "num_heads": heads,
        "embed_dim": heads * draw(st.sampled_from([4, 8])),
        "mlp_ratio": draw(st.sampled_from([1.0, 2.0])),
        "qkv_bias": draw(st.booleans()),
        "num_classes": draw(st.integers(2, 6)),
    }


@settings(max_examples=int(os.environ.get("P3B_CAIT_EXAMPLES", "30")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(cfg=cait_configs(), ratio=st.floats(0.05, 1.0), seed=st.integers(0, 10_000))
def test_random_cait_models_and_plans(cfg: dict[str, object], ratio: float, seed: int) -> None:
    """CaiT's talking heads: two linears between the attention's first and last, over the heads
    axis before and after the softmax; and its class-attention blocks. slim == masked at a batch
    other than the traced one, parameter count as planned, retrace equal, and the heads and the
    mixed maps between the two talking-heads projections are groups of their own."""
    model = timm.create_model("cait_xxs24_224", pretrained=False, **cfg).eval()
    _random_weights(model, seed)
    gm = p3b_fx.trace(model, input_shape=(1, 3, 16, 16))
    groups = p3b_fx.find_groups(gm)
    for role in ("heads", "hidden") if int(cfg["num_heads"]) > 1 else ():  # type: ignore[call-overload]
        group = groups.group(f"blocks.0.attn:{role}")  # one head: an axis of size 1, no group's
        assert group.prunable and group.size == cfg["num_heads"], group.reason
    plan = KeepPlan.random(groups, ratio, seed)
    _assert_slim_matches(gm, groups, plan, torch.randn(3, 3, 16, 16), atol=1e-4)  # traced at batch 2
