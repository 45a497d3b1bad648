"""Other ViT-family models in timm: either slim == masked exactly, or a clear project error.

Fail-closed groups are allowed (and expected: SwiGLU's chunk, rotary embeddings' indexing, a
per-head bias the slim graph cannot resize); a silently wrong graph is not. BEiT's table-based bias
is followed back to its parameter, so its heads are pruned.
"""

from __future__ import annotations

import pytest
import timm
import torch

import p3b_fx
from p3b_fx import KeepPlan
from p3b_fx.errors import P3BError

FAMILY = [
    "eva02_tiny_patch14_224",  # SwiGLU MLP, rotary embeddings
    "beit_base_patch16_224",  # relative position bias, layer scale
    "cait_xxs24_224",  # talking heads, class attention
    "pit_ti_224",  # pooling stages
    "vit_relpos_small_patch16_224",  # per-head relative position bias
    "vit_small_patch16_rope_224",  # rotary embeddings
    "xcit_nano_12_p16_224",  # cross-covariance attention, local patch interaction
    "levit_128s",  # BatchNorm linears
    "vit_small_patch16_18x2_224",  # parallel blocks
    "vit_small_r26_s32_224",  # hybrid CNN stem
]


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILY)
def test_slim_equals_masked_or_fails_clearly(name: str) -> None:
    try:
        model = timm.create_model(name, pretrained=False, depth=2).eval()
    except (TypeError, ValueError):  # models without a depth argument
        model = timm.create_model(name, pretrained=False).eval()
    gm = p3b_fx.trace(model)
    try:
        groups = p3b_fx.find_groups(gm)
    except P3BError as exc:
        assert str(exc)  # a named error with a message is an acceptable answer
        return
    assert all(g.reason for g in groups.groups if not g.prunable)
    plan = KeepPlan.random(groups, 0.5, seed=0)
    x = torch.randn(2, *gm.meta["p3b.input_shape"][1:])
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
        torch.testing.assert_close(p3b_fx.slim(gm, plan, groups)(x), p3b_fx.apply_masks(gm, plan, groups)(x),
                                   atol=1e-5, rtol=0)  # fmt: skip


def test_a_head_bias_from_a_literal_reshape_fixes_the_heads_only() -> None:
    """vit_relpos builds its per-head bias with an MLP and ``view(-1, heads)``: the head count is a
    literal the slim graph would keep, so the heads stay whole (with that reason) while the head
    dims, which the bias does not touch, are pruned, and slim equals masked."""
    model = timm.create_model("vit_relpos_small_patch16_224", pretrained=False, depth=1, img_size=32,
                              patch_size=8, embed_dim=48, num_heads=4).eval()  # fmt: skip
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    heads, head_dim = groups.group("blocks.0.attn:heads"), groups.group("blocks.0.attn:head_dim")
    assert not heads.prunable and "writes the axis' size as the literal 4, not -1" in heads.reason
    assert head_dim.prunable
    plan = KeepPlan.from_mapping(groups, {"blocks.0.attn:head_dim": [0, 3, 5, 6, 9]})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = p3b_fx.slim(gm, plan, groups)(x)
        torch.testing.assert_close(out, p3b_fx.apply_masks(gm, plan, groups)(x), atol=1e-5, rtol=0)
