"""InsertTapsPass: x_0 … x_B recorded in block order, outputs unchanged, idempotent, fails closed."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import fx, nn

import p3b_fx
from p3b_fx.core.groups import GroupSet
from p3b_fx.errors import PassError
from passes.insert_taps import TAP_INDEX, InsertTapsPass, feature_taps, tap_points


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=32, depth=2,
        num_heads=2, num_classes=5,
    )  # fmt: skip
    return model.eval()


@pytest.fixture(scope="module")
def traced(vit: nn.Module) -> tuple[fx.GraphModule, GroupSet]:
    gm = p3b_fx.trace(vit)
    return gm, p3b_fx.find_groups(gm)


def _tapped(traced: tuple[fx.GraphModule, GroupSet], masked: bool) -> fx.GraphModule:
    gm, groups = traced
    work = p3b_fx.insert_masks(gm, groups)[0] if masked else fx.GraphModule(gm, gm.graph)
    work = copy.deepcopy(work)
    assert InsertTapsPass(groups)(work).modified
    return work


@pytest.mark.parametrize("masked", [False, True])
def test_taps_record_stream_and_keep_outputs(traced: tuple[fx.GraphModule, GroupSet], masked: bool) -> None:
    gm, groups = traced
    tapped = _tapped(traced, masked)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected, got = gm(x), tapped(x)
    assert torch.equal(expected, got)
    feats = feature_taps(tapped).take()
    assert len(feats) == len(groups.blocks) + 1 == 5
    assert all(f.shape == (3, 17, 32) for f in feats)


def test_taps_match_eager_residual_stream(vit: nn.Module, traced: tuple[fx.GraphModule, GroupSet]) -> None:
    tapped = _tapped(traced, masked=False)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        tapped(x)
        x0 = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        x1 = x0 + vit.blocks[0].attn(vit.blocks[0].norm1(x0))
        xb = vit.blocks(x0)  # before the final norm
    feats = feature_taps(tapped).take()
    torch.testing.assert_close(feats[0], x0)
    torch.testing.assert_close(feats[1], x1)
    torch.testing.assert_close(feats[-1], xb)


def test_second_run_changes_nothing(traced: tuple[fx.GraphModule, GroupSet]) -> None:
    tapped = _tapped(traced, masked=False)
    result = InsertTapsPass(traced[1])(tapped)
    assert not result.modified
    assert sorted(n.meta[TAP_INDEX] for n in tapped.graph.nodes if TAP_INDEX in n.meta) == list(range(5))


def test_take_without_forward_raises(traced: tuple[fx.GraphModule, GroupSet]) -> None:
    tapped = _tapped(traced, masked=False)
    with pytest.raises(PassError, match="recorded nothing"):
        feature_taps(tapped).take()


def test_groups_of_another_graph_are_refused(traced: tuple[fx.GraphModule, GroupSet]) -> None:
    other = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=32, depth=3,
        num_heads=2, num_classes=5,
    )  # fmt: skip
    gm = p3b_fx.trace(other)
    groups = p3b_fx.find_groups(gm)
    with pytest.raises(PassError, match="not in this graph"):
        InsertTapsPass(groups)(traced[0])


def test_a_plain_vit_is_tapped_as_one_chain(traced: tuple[fx.GraphModule, GroupSet]) -> None:
    points, pairs = tap_points(traced[1])
    assert len(points) == len(traced[1].blocks) + 1
    assert pairs == [(i, i + 1) for i in range(len(traced[1].blocks))]


def test_blocks_on_another_stream_get_their_own_input_tap() -> None:
    """CaiT's class-attention blocks read the class token, not what the last main block wrote: their
    first block's input is a tap of its own, and every tap records that block's input and output."""
    torch.manual_seed(0)
    model = timm.create_model(
        "cait_xxs24_224", img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=5
    ).eval()
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    points, pairs = tap_points(groups)
    first_cls = next(i for i, b in enumerate(groups.blocks) if b.name.startswith("blocks_token_only"))
    assert len(points) == len(groups.blocks) + 2
    assert pairs[first_cls][0] == pairs[first_cls - 1][1] + 1
    tapped = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    InsertTapsPass(groups)(tapped)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(tapped(x), gm(x), rtol=0, atol=0)
    feats = feature_taps(tapped).take()
    for (a, b), block in zip(pairs, groups.blocks, strict=True):
        assert feats[a].shape == feats[b].shape, block.name
    assert feats[pairs[first_cls][0]].shape[1] == 1  # the class token alone
