"""find_groups: structure, coupling, exact costs, fail-closed reasons, non-transformers."""

from __future__ import annotations

import importlib
import inspect
import operator
import sys
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from timm.layers import register_notrace_module
from torch import nn

import p3b_fx
from p3b_fx import BlockKind, Role
from p3b_fx.errors import UnsupportedModelError
from p3b_fx.train import gate_specs
from passes import find_groups as find_groups_module
from tests.conftest import tiny_vit


def test_blocks_and_roles_from_the_graph() -> None:
    groups = p3b_fx.find_groups(p3b_fx.trace(tiny_vit(depth=3)))
    assert [b.name for b in groups.blocks] == [f"blocks.{i}.{k}" for i in range(3) for k in ("attn", "mlp")]
    attn, mlp = groups.blocks[0], groups.blocks[1]
    assert attn.kind is BlockKind.ATTENTION and mlp.kind is BlockKind.MLP
    roles = {groups.group(g).role: groups.group(g) for g in attn.groups}
    assert {r: g.size for r, g in roles.items()} == {
        Role.READ: 48, Role.HEADS: 4, Role.HEAD_DIM: 12, Role.SELECT: 3, Role.WRITE: 48,
    }  # fmt: skip
    assert not roles[Role.SELECT].prunable and "unbind" in roles[Role.SELECT].reason
    assert {groups.group(g).role: groups.group(g).size for g in mlp.groups} == {
        Role.READ: 48, Role.HIDDEN: 192, Role.WRITE: 48,
    }  # fmt: skip


def test_heads_couple_q_k_v_and_proj() -> None:
    groups = p3b_fx.find_groups(p3b_fx.trace(tiny_vit()))
    heads = groups.group("blocks.0.attn:heads")
    found = {(m.param, m.dim, m.shape, m.axis) for m in heads.members}
    assert found == {
        ("blocks.0.attn.qkv.weight", 0, (3, 4, 12), 1),
        ("blocks.0.attn.qkv.bias", 0, (3, 4, 12), 1),
        ("blocks.0.attn.proj.weight", 1, (4, 12), 0),
    }
    head_dim = groups.group("blocks.0.attn:head_dim")
    assert {(m.param, m.axis) for m in head_dim.members} == {
        ("blocks.0.attn.qkv.weight", 2), ("blocks.0.attn.qkv.bias", 2), ("blocks.0.attn.proj.weight", 1),
    }  # fmt: skip


def test_layer_scale_is_a_write_member() -> None:
    groups = p3b_fx.find_groups(p3b_fx.trace(tiny_vit(init_values=0.5)))
    params = {m.param for m in groups.group("blocks.0.mlp:write").members}
    assert params == {"blocks.0.mlp.fc2.weight", "blocks.0.mlp.fc2.bias", "blocks.0.ls2.gamma"}


def test_qk_norm_keeps_head_dim_prunable_and_slices_its_weights_with_it() -> None:
    """A norm over head_dim (q/k norm) no longer fixes it: the slim model recomputes the dense
    statistics (``tests/test_padded_norm.py``), so the norms' weights and biases are members."""
    groups = p3b_fx.find_groups(p3b_fx.trace(tiny_vit(qk_norm=True)))
    hd = groups.group("blocks.0.attn:head_dim")
    assert hd.prunable and groups.group("blocks.0.attn:heads").prunable
    members = {m.param for m in hd.members}
    assert {"blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.bias"} <= members


def test_a_norm_over_two_axes_of_a_group_is_fixed_with_a_reason_naming_the_node() -> None:
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.inner = torch.nn.LayerNorm(8), torch.nn.LayerNorm((3, 4))
            self.fc1, self.fc2 = torch.nn.Linear(8, 12), torch.nn.Linear(12, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inner(self.fc1(self.norm(x)).unflatten(-1, (3, 4))).flatten(-2)
            return x + self.fc2(h)

    groups = p3b_fx.find_groups(p3b_fx.trace(Block(), input_shape=(2, 5, 8)))
    hidden = [g for g in groups.groups if g.role not in (Role.READ, Role.WRITE)]
    assert hidden and not any(g.prunable for g in hidden)
    assert all("normalised over" in g.reason and "node 'inner'" in g.reason for g in hidden)


def test_costs_match_the_model_exactly() -> None:
    model = tiny_vit(depth=2, mlp_ratio=3.0)
    groups = p3b_fx.find_groups(p3b_fx.trace(model))
    assert groups.params_total == sum(p.numel() for p in model.parameters())
    d, n, hidden, ncls = 48, 17, 144, 5
    attn = d * 3 * d + 3 * d + d * d + d + 2 * d  # qkv, proj, norm1
    mlp = d * hidden + hidden + hidden * d + d + 2 * d
    assert [groups.block_params(b) for b in groups.blocks] == [attn, mlp, attn, mlp]
    block_macs = n * (3 * d * d + d * d) + 2 * n * n * d + n * 2 * d * hidden
    nonblock = 16 * 3 * 64 * d + d * ncls
    assert groups.flops_total == 2 * block_macs + nonblock


def test_one_more_element_costs_what_the_slice_holds() -> None:
    groups = p3b_fx.find_groups(p3b_fx.trace(tiny_vit()))
    block = groups.block("blocks.0.attn")
    kept = {"blocks.0.attn:heads": 2, "blocks.0.attn:head_dim": 8, "blocks.0.attn:read": 40}
    base = groups.block_params(block, kept)
    more = groups.block_params(block, {**kept, "blocks.0.attn:heads": 3})
    # one head: q, k, v rows (3 x head_dim x read + 3 x head_dim bias) + proj columns (head_dim x 48)
    assert more - base == 3 * 8 * 40 + 3 * 8 + 8 * 48


class _CumsumMlp(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.cumsum(self.fc1(x), dim=-1))


def test_op_without_rule_fails_closed_naming_the_node() -> None:
    model = tiny_vit(depth=1)
    model.blocks[0].mlp = _CumsumMlp(48)
    groups = p3b_fx.find_groups(p3b_fx.trace(model))
    hidden = groups.group("blocks.0.mlp:hidden")
    assert not hidden.prunable
    assert "no grouping rule" in hidden.reason and "cumsum" in hidden.reason
    assert groups.group("blocks.0.mlp:read").prunable  # reads/writes stay exact


def test_resnet_is_not_a_transformer() -> None:
    model = timm.create_model("resnet18", pretrained=False, num_classes=3).eval()
    with pytest.raises(UnsupportedModelError, match=r"no residual sub-block.*not supported"):
        p3b_fx.find_groups(p3b_fx.trace(model, input_shape=(1, 3, 32, 32)))


def test_describe_lists_every_group() -> None:
    groups = p3b_fx.find_groups(p3b_fx.trace(tiny_vit()))
    text = groups.describe()
    assert text.count("blocks.") >= 4 and "fixed: indexed by unbind" in text


class _BiasChain(torch.nn.Module):
    """A per-head bias built from a (rows, heads) table the way BEiT builds it, or a variant."""

    def __init__(self, variant: str) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(5, 4))
        self.register_buffer("index", torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3]))
        self.variant = variant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.table[self.index]  # (9, 4)
        if self.variant == "literal":
            grid = rows.view(3, 3, 4)
        elif self.variant == "scaled":  # elementwise with a number (SwinV2: 16 * sigmoid(bias))
            grid = torch.sigmoid(rows * 2.0).view(3, 3, -1)
        elif self.variant == "mixed":  # mixes the heads: no exact slice
            grid = rows.cumsum(1).view(3, 3, -1)
        else:
            grid = rows.view(3, 3, -1)
        return x + grid.permute(2, 0, 1).contiguous().unsqueeze(0)


@pytest.mark.parametrize(
    ("variant", "expected"),
    [
        ("beit", ("table", 1)),
        ("literal", ("table", 1)),
        ("scaled", ("table", 1)),
        ("mixed", "lies between it and a parameter"),
    ],
)
def test_a_bias_axis_is_followed_back_to_its_parameter(variant: str, expected: object) -> None:
    from passes.annotate_shapes import AnnotateShapesPass  # noqa: PLC0415
    from passes.axis_rules import _param_source  # noqa: PLC0415

    gm = torch.fx.symbolic_trace(_BiasChain(variant))
    AnnotateShapesPass(input_shape=(1, 4, 3, 3))(gm)
    add = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.add)
    bias = add.args[1]
    assert isinstance(bias, torch.fx.Node)
    source = _param_source(bias, 1)  # the head axis of the (1, heads, 3, 3) bias
    if isinstance(expected, tuple):
        assert not isinstance(source, str), source
        params, path = source
        assert params == [expected]
        # every node between the table and the bias carries the head axis (for the rewrite)
        scaled = ["sigmoid", "mul"] if variant == "scaled" else []
        assert [n.name for n, _ in path] == ["unsqueeze", "contiguous", "permute", "view", *scaled, "getitem"]
    else:
        assert isinstance(source, str) and str(expected) in source
    assert _param_source(bias, 0) == "'unsqueeze' creates the axis"


class _RotateHalfMlp(nn.Module):
    """An MLP whose hidden activations are rotated the way a rotary embedding rotates head dims."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.register_buffer("cos", torch.randn(2 * d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        half = h.shape[-1] // 2
        rotated = torch.cat([-h[..., half:], h[..., :half]], dim=-1)
        return self.fc2((h * self.cos + rotated).type_as(x))


def test_a_sliced_axis_is_fixed_and_the_others_stay_free() -> None:
    """Reading the size of a group axis for arithmetic, slicing it, or concatenating along it fixes
    that axis only (with the node that did it); the block's reads and writes stay prunable, and the
    slim model still equals the masked one."""
    model = tiny_vit(depth=1)
    model.blocks[0].mlp = _RotateHalfMlp(48)
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    hidden = groups.group("blocks.0.mlp:hidden")
    assert not hidden.prunable and "its size feeds 'floordiv'" in hidden.reason
    assert groups.group("blocks.0.mlp:read").prunable and groups.group("blocks.0.mlp:write").prunable
    plan = p3b_fx.KeepPlan.random(groups, 0.5, seed=0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(p3b_fx.slim(gm, plan, groups)(x), p3b_fx.apply_masks(gm, plan, groups)(x),
                                   atol=1e-5, rtol=0)  # fmt: skip


def test_a_label_meeting_an_unlabelled_axis_is_fixed_unless_that_axis_broadcasts() -> None:
    from passes.axis_labels import Labels  # noqa: PLC0415
    from passes.track_axes import Tracker  # noqa: PLC0415

    gm = torch.fx.symbolic_trace(nn.Identity())
    node = next(iter(gm.graph.nodes))
    tracker = Tracker(gm, Labels("b"))
    label = tracker.labels.new(8)
    state = ((), (label,))
    assert tracker.unify(node, state, ((), ()), 2, ((4, 8), (4, 1))) == state  # broadcast: free
    assert tracker.labels.reason(label) == ""
    assert tracker.unify(node, ((), ()), state, 2, ((4, 8), (4, 8))) == state  # all 8 elements: fixed
    assert "meets an axis no group runs along" in tracker.labels.reason(label)


def test_merging_split_labels_renames_their_parts_in_every_state_and_names_stay_unique() -> None:
    """Two split labels that merge (k's head dims, split by a rotary chunk before k meets q) merge
    part by part, and the tracker renames the parts too: a state naming a dropped part would point
    at no group. A label made after a merge gets a name no other label has."""
    from passes.axis_labels import Labels  # noqa: PLC0415
    from passes.track_axes import Tracker  # noqa: PLC0415

    gm = torch.fx.symbolic_trace(nn.Identity())
    node = next(iter(gm.graph.nodes))
    tracker = Tracker(gm, Labels("b"))
    q, k = tracker.labels.new(8), tracker.labels.new(8)
    tracker.secondary.add(k)  # k: a projection of its own, free to merge into q
    q_parts, k_parts = tracker.labels.split(q, 4), tracker.labels.split(k, 4)
    tracker.states[node] = ((), (k_parts[1],))
    assert tracker.unify(node, ((q,),), ((k,),), 1, ((8,), (8,))) == ((q,),)
    assert tracker.states[node] == ((), (q_parts[1],))
    made = tracker.labels.new(3)
    assert made not in (q, *q_parts) and tracker.labels.sizes[q] == 8


def test_a_single_label_meeting_a_split_one_of_its_own_is_split_to_match() -> None:
    """Query heads (one label of 12) meet the (key/value heads, copies) that ``repeat_interleave``
    made of the keys: the query heads split into (6, 2) and merge with them part by part."""
    from passes.axis_labels import Labels, Unsupported  # noqa: PLC0415
    from passes.track_axes import Tracker  # noqa: PLC0415

    gm = torch.fx.symbolic_trace(nn.Identity())
    node = next(iter(gm.graph.nodes))
    tracker = Tracker(gm, Labels("b"))
    q_heads, kv_heads, copies = tracker.labels.new(12), tracker.labels.new(6), tracker.labels.new(2)
    tracker.secondary |= {kv_heads, copies}
    out = tracker.unify_axis(node, (q_heads,), (kv_heads, copies), 12, 12)
    assert tracker.labels.children[q_heads] == out and [tracker.labels.sizes[x] for x in out] == [6, 2]
    assert tracker.resolve((kv_heads, copies)) == out
    other = tracker.labels.new(12)  # neither side its own projection: two different index spaces
    with pytest.raises(Unsupported, match="two different index spaces"):
        tracker.unify_axis(node, (other,), out, 12, 12)


class _SqueezeMlp(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.unsqueeze(self.fc1(x), 0).unsqueeze(-2)  # (1, B, N, 1, hidden)
        return self.fc2(torch.squeeze(h.squeeze(-2), 0))


def test_unsqueeze_and_squeeze_keep_the_group_axis() -> None:
    model = tiny_vit(depth=1)
    model.blocks[0].mlp = _SqueezeMlp(48)
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    assert groups.group("blocks.0.mlp:hidden").prunable, groups.group("blocks.0.mlp:hidden").reason
    plan = p3b_fx.KeepPlan.random(groups, 0.5, seed=0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(p3b_fx.slim(gm, plan, groups)(x), p3b_fx.apply_masks(gm, plan, groups)(x),
                                   atol=1e-5, rtol=0)  # fmt: skip


class _AttributeMlp(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * h.mT.mT)  # a tensor read as an attribute: not a shape


def test_a_tensor_read_as_an_attribute_fixes_the_group() -> None:
    model = tiny_vit(depth=1)
    model.blocks[0].mlp = _AttributeMlp(48)
    groups = p3b_fx.find_groups(p3b_fx.trace(model))
    hidden = groups.group("blocks.0.mlp:hidden")
    assert not hidden.prunable and "reads the attribute 'mT'" in hidden.reason


def _assert_random_plans_exact(gm: torch.fx.GraphModule, groups: p3b_fx.GroupSet, x: torch.Tensor) -> None:
    """Three random plans keeping half of every prunable group: slim equals hard-masked."""
    for seed in range(3):
        plan = p3b_fx.KeepPlan.random(groups, 0.5, seed=seed)
        with torch.no_grad():
            slim, masked = p3b_fx.slim(gm, plan, groups)(x), p3b_fx.apply_masks(gm, plan, groups)(x)
        torch.testing.assert_close(slim, masked, atol=1e-5, rtol=0)


class _ShiftedKeyAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.qkv, self.proj, self.heads = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), heads

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        k = k + 1.0  # the keys no longer keep zeros
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


def test_a_contraction_needs_zeros_on_one_side_only() -> None:
    """q · k over a pruned head dim drops out when q is 0 there (the first linear's output is masked),
    whatever happened to k: head_dim stays prunable, and slim still equals masked."""
    model = tiny_vit(depth=1)
    model.blocks[0].attn = _ShiftedKeyAttention(48, 4)
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    head_dim = groups.group("blocks.0.attn:head_dim")
    assert head_dim.prunable, head_dim.reason
    x = torch.randn(2, 3, 32, 32)
    _assert_random_plans_exact(gm, groups, x)


class _LayoutAfterMlp(nn.Module):
    """An MLP whose output is rearranged before the residual add."""

    def __init__(self, d: int, after: str) -> None:
        super().__init__()
        self.fc1, self.fc2, self.after = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(torch.relu(self.fc1(x)))  # (B, 17, d)
        b, n, d = x.shape
        if self.after == "grid":  # move positions only: the written channels stay free
            flat = torch.roll(y.reshape(b * n, d), shifts=3, dims=0).contiguous()
            return flat.view(b, n, d)[:, ::1]
        if self.after == "roll-channels":
            return torch.roll(y, shifts=1, dims=-1)
        if self.after == "crop-channels":
            return torch.nn.functional.pad(y[..., 1:], (0, 1))
        if self.after == "unpartition":  # SAM's window unpartition: the batch from y.shape[0]
            rows = y.shape[0]
            grid = y.view(rows, 1, n, d).permute(0, 2, 1, 3).transpose(0, 1).transpose(0, 1)
            return grid.reshape(rows, n, d)
        if self.after == "channel-size":  # the channel count read as a number
            return y * y.shape[-1] ** -0.5
        if self.after == "permute-channels":  # channels off the last axis and back: positions only
            return y.permute(0, 2, 1).contiguous().permute(0, 2, 1)
        if self.after == "channel-size-permuted":  # the channel count read where a permute put it
            z = y.permute(0, 2, 1)
            return (z * z.shape[1] ** -0.5).permute(0, 2, 1)
        return y.reshape(b, n * 2, d // 2).reshape(b, n, d)  # splits the channel axis


@pytest.mark.parametrize(
    "after",
    ["grid", "unpartition", "permute-channels", "roll-channels", "crop-channels", "split", "channel-size",
     "channel-size-permuted"],
)  # fmt: skip
def test_layout_ops_after_the_last_linear_keep_the_written_channels_only_if_they_keep_the_channel_axis(
    after: str,
) -> None:
    """Reshapes that keep the channel axis last and whole, rolls over other axes, crops of other
    axes, permutes and transposes (also away from the last axis and back), and reads of other axes'
    sizes pass the written channels through; a roll, crop or reshape of the channel axis, or a read
    of the channel count (wherever a permute put it), fixes them."""
    model = tiny_vit(depth=1)
    model.blocks[0].mlp = _LayoutAfterMlp(48, after)
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    write = groups.group("blocks.0.mlp:write")
    assert write.prunable == (after in ("grid", "unpartition", "permute-channels")), write.reason
    x = torch.randn(2, 3, 32, 32)
    for seed in range(2):
        plan = p3b_fx.KeepPlan.random(groups, 0.5, seed=seed)
        with torch.no_grad():
            slim_out = p3b_fx.slim(gm, plan, groups)(x)
            masked_out = p3b_fx.apply_masks(gm, plan, groups)(x)
        torch.testing.assert_close(slim_out, masked_out, atol=1e-5, rtol=0)


class _PooledMlp(nn.Module):
    """An MLP that pools its hidden activations over the tokens, or over the hidden neurons."""

    def __init__(self, d: int, over_hidden: bool) -> None:
        super().__init__()
        self.fc1, self.fc2, self.over_hidden = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), over_hidden
        self.pool = nn.MaxPool1d(3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)  # (B, N, hidden)
        h = self.pool(h) if self.over_hidden else self.pool(h.transpose(1, 2)).transpose(1, 2)
        return self.fc2(h)


@pytest.mark.parametrize("over_hidden", [False, True])
def test_a_pool_keeps_the_groups_of_the_axes_it_does_not_pool(over_hidden: bool) -> None:
    """A pool module pools each channel alone: pooling the tokens keeps the hidden neurons
    prunable (and exact); pooling over the hidden neurons fixes them, naming the node."""
    model = tiny_vit(depth=1)
    model.blocks[0].mlp = _PooledMlp(48, over_hidden)
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    hidden = groups.group("blocks.0.mlp:hidden")
    assert hidden.prunable == (not over_hidden), hidden.reason
    assert not over_hidden or "pools over a group axis" in hidden.reason
    plan = p3b_fx.KeepPlan.random(groups, 0.5, seed=0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(p3b_fx.slim(gm, plan, groups)(x), p3b_fx.apply_masks(gm, plan, groups)(x),
                                   atol=1e-5, rtol=0)  # fmt: skip


def test_a_module_called_by_two_blocks_is_kept_whole() -> None:
    """CoaT's parallel blocks call one MLP at three scales. Slicing it for one residual branch
    would change the others (the plan predicted 1.9 M parameters, the slim model kept 3.6 M): the
    first branch's groups are fixed with the reason, the later calls are not blocks of their own."""
    model = tiny_vit(depth=2)
    model.blocks[1].mlp = model.blocks[0].mlp
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    assert [b.name for b in groups.blocks] == ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn"]
    hidden = groups.group("blocks.0.mlp:hidden")
    assert not hidden.prunable and "also read at" in hidden.reason
    assert any("calls the module of block 'blocks.0.mlp' again" in u for u in groups.unsupported)
    x = torch.randn(2, 3, 32, 32)
    plan = p3b_fx.KeepPlan.random(groups, 0.5, seed=0)
    with torch.no_grad():
        torch.testing.assert_close(p3b_fx.slim(gm, plan, groups)(x), p3b_fx.apply_masks(gm, plan, groups)(x),
                                   atol=1e-5, rtol=0)  # fmt: skip


@register_notrace_module  # a trace leaf (as ConViT's attention): its forward runs in shape propagation
class _CachingMlp(nn.Module):
    """Caches a tensor in its forward, as ConViT's attention caches ``rel_indices``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.register_buffer("cache", torch.zeros(1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cache.shape[0] != x.shape[1]:
            self.cache = torch.ones(x.shape[1])
        return self.fc2(self.fc1(x)) * self.cache[None, :, None]


def test_shape_propagation_leaves_no_fake_tensor_in_a_module() -> None:
    """A forward that stores a tensor in its module stores a fake one under shape propagation; the
    pass restores the module, so the model still runs on real tensors (ConViT failed with a
    DataDependentOutputException after tracing)."""
    from torch._subclasses.fake_tensor import FakeTensor  # noqa: PLC0415

    from passes.annotate_shapes import AnnotateShapesPass  # noqa: PLC0415

    model = tiny_vit(depth=1)
    model.blocks[0].mlp = _CachingMlp(48)
    gm = p3b_fx.trace(model)
    AnnotateShapesPass(input_shape=(1, 3, 32, 32))(gm)
    mlp = gm.get_submodule("blocks.0.mlp")
    assert not any(isinstance(v, FakeTensor) for v in [*mlp._buffers.values(), *vars(mlp).values()])
    with torch.no_grad():
        gm(torch.randn(2, 3, 32, 32))


def test_check_models_reports_ok_refused_and_bugs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tools/check_models.py: a model the core handles is ok, an unknown name is refused, and an
    exception that is no project error is a bug (exit code 1), so a scan cannot hide one."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import check_models  # noqa: PLC0415

    out = tmp_path / "check.md"
    assert check_models.main(["--models", "vit_tiny_patch16_224", "no_such_vit", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| vit_tiny_patch16_224 | 2 | 7/8 |" in text and "ok," in text
    assert "| no_such_vit | - | - | - | refused: no timm model of this name |" in text
    monkeypatch.setattr(check_models, "_model", lambda name: (_ for _ in ()).throw(KeyError("boom")))
    assert check_models.main(["--models", "vit_tiny_patch16_224"]) == 1


class _ShapeReadingBlock(nn.Module):
    """A block that reads its input's shape once and uses it inside the MLP branch and after the
    residual add, and checks the normalised input's shape with an assert outside the branch."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.norm(x)
        torch._assert(h.shape[1] % 1 == 0, "tokens")  # a check on the branch's tensor, outside it
        y = self.fc2(torch.relu(self.fc1(h))).reshape(b, n, c)
        return (x + y).reshape(b, n, c)


def test_shape_reads_and_checks_outside_a_branch_keep_it_a_block() -> None:
    """The stream's shape (``b, n, c = x.shape``) read inside a branch and used after its add, and
    an assert on a branch tensor's shape outside it, do not make the branch escape (MaxViT's
    attention branches were not blocks because of such a check)."""
    model = tiny_vit(depth=1)
    model.blocks[0] = _ShapeReadingBlock(48)  # type: ignore[assignment]
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    assert [b.name for b in groups.blocks] == ["blocks.0"]
    assert groups.group("blocks.0:hidden").prunable
    x = torch.randn(2, 3, 32, 32)
    plan = p3b_fx.KeepPlan.random(groups, 0.5, seed=0)
    with torch.no_grad():
        torch.testing.assert_close(p3b_fx.slim(gm, plan, groups)(x), p3b_fx.apply_masks(gm, plan, groups)(x),
                                   atol=1e-5, rtol=0)  # fmt: skip


def _levit_mlp_vit() -> nn.Module:
    """A tiny ViT whose MLPs are LeViT's: Linear → BatchNorm1d (over batch · tokens) on both
    linears, the second BatchNorm between the last linear and the residual add. Weights and
    BatchNorm statistics random (LeViT zero-inits that last BatchNorm's weight)."""
    from timm.models.levit import LevitMlp  # noqa: PLC0415

    model = tiny_vit(depth=2)
    gen = torch.Generator().manual_seed(0)
    for block in model.blocks:
        block.mlp = LevitMlp(48, 96, 48)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm1d):
                for t in (mod.weight, mod.bias, mod.running_mean):
                    t.copy_(torch.randn(t.shape, generator=gen))
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=gen) + 0.5)
    return model


@pytest.mark.parametrize("training", [False, True])
def test_batchnorm_linears_slice_their_statistics_and_the_write_gate_follows_the_norm(training: bool) -> None:
    """LeViT's ``LinearNorm``: a BatchNorm1d normalises each channel on its own, so the hidden
    neurons and the written channels stay prunable, its weight, bias and running statistics are
    sliced with them (the statistics are buffers: sliced, never counted as parameters), and the
    write gate sits after the BatchNorm, whose bias would otherwise move a pruned channel off 0.
    Slim equals hard-masked in eval mode and in training mode (batch statistics)."""
    model = _levit_mlp_vit().train(training)
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    block = groups.block("blocks.0.mlp")
    assert groups.group("blocks.0.mlp:hidden").prunable and groups.group("blocks.0.mlp:write").prunable
    assert {b.name for b in block.buffers} == {
        f"blocks.0.mlp.ln{i}.bn.running_{s}" for i in (1, 2) for s in ("mean", "var")
    }
    assert block.write_site == "blocks_0_mlp_ln2_bn"
    masked, _ = p3b_fx.insert_masks(gm, groups)
    site = next(n for n in masked.graph.nodes if n.meta.get("p3b.mask_site") == "blocks.0.mlp:write")
    assert site.args[0].name == "blocks_0_mlp_ln2_bn"
    x = torch.randn(4, 3, 32, 32)
    plan = p3b_fx.KeepPlan.random(groups, 0.5, seed=1)
    slim = p3b_fx.slim(gm, plan, groups)
    kept = plan.effective(groups)
    bn = slim.get_submodule("blocks.0.mlp.ln1.bn")
    assert bn.running_mean.shape == (len(kept["blocks.0.mlp:hidden"]),) == (bn.num_features,)
    assert sum(p.numel() for p in slim.parameters()) == groups.params_nonblock + sum(
        groups.block_params(b, {g: len(k) for g, k in kept.items()}) for b in groups.blocks
    )
    with torch.no_grad():
        out, dense = slim(x), gm(x)
        torch.testing.assert_close(out, p3b_fx.apply_masks(gm, plan, groups)(x), atol=1e-5, rtol=0)
    assert (out - dense).abs().max() > 1e-2


def test_levit_heads_are_prunable_though_q_k_and_v_are_unequal_slices_of_each_head() -> None:
    """LeViT splits each head's qkv output into q, k (16 each) and v (32): the per-head axis stays
    whole (fixed), the heads are one group over the qkv rows, its BatchNorm, the attention-bias
    table (``attention_biases[:, idx]``) and the projection's columns, and slicing them is exact."""
    model = timm.create_model("levit_128s", pretrained=False, img_size=64, num_classes=5)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import check_models  # noqa: PLC0415

    gm = p3b_fx.trace(check_models.randomise(model).eval(), input_shape=(1, 3, 64, 64))
    groups = p3b_fx.find_groups(gm)
    heads = groups.group("stages.0.blocks.0.attn:heads")
    assert heads.prunable and heads.size == 4
    fixed = [g for g in groups.groups if g.block == "stages.0.blocks.0.attn" and not g.prunable]
    assert fixed and all("unequal size" in g.reason for g in fixed)
    plan = p3b_fx.KeepPlan.from_mapping(groups, {heads.name: [0, 2]})
    slim = p3b_fx.slim(gm, plan, groups)
    assert slim.get_parameter("stages.0.blocks.0.attn.attention_biases").shape[0] == 2
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = slim(x)
        torch.testing.assert_close(out, p3b_fx.apply_masks(gm, plan, groups)(x), atol=1e-5, rtol=0)
    assert (out - gm(x)).abs().max() > 1e-2


def test_pvt_heads_span_q_and_the_kv_projection_of_the_pooled_input_and_dwconv_neurons_are_prunable() -> None:
    """PVT-v2 takes q from the block input and k, v from a strided-conv copy of it (stage 1); its
    MLP runs a depthwise conv between the linears. The kv projection's output starts a label of its
    own, which merges with q's where q · k meets it, so heads and head dims are one group over q,
    kv and proj; the depthwise conv keeps each hidden neuron's channel apart, so its filters are
    sliced with them. Slim equals hard-masked."""
    model = timm.create_model("pvt_v2_b0", pretrained=False, num_classes=5)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import check_models  # noqa: PLC0415

    gm = p3b_fx.trace(check_models.randomise(model).eval())
    groups = p3b_fx.find_groups(gm)
    for name in ("stages.1.blocks.0.attn:heads", "stages.1.blocks.0.attn:head_dim",
                 "stages.1.blocks.0.mlp:hidden"):  # fmt: skip
        assert groups.group(name).prunable, (name, groups.group(name).reason)
    plan = p3b_fx.KeepPlan.from_mapping(
        groups,
        {"stages.1.blocks.0.attn:heads": [1], "stages.1.blocks.0.attn:head_dim": list(range(0, 32, 2)),
         "stages.1.blocks.0.mlp:hidden": list(range(0, 512, 3))},
    )  # fmt: skip
    slim = p3b_fx.slim(gm, plan, groups)
    assert slim.get_parameter("stages.1.blocks.0.attn.kv.weight").shape[0] == 2 * 1 * 16
    conv = slim.get_submodule("stages.1.blocks.0.mlp.dwconv")
    assert conv.groups == conv.in_channels == conv.out_channels == len(range(0, 512, 3))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out = slim(x)
        torch.testing.assert_close(out, p3b_fx.apply_masks(gm, plan, groups)(x), atol=1e-5, rtol=0)
    assert (out - gm(x)).abs().max() > 1e-2


@pytest.mark.parametrize("key", sorted(find_groups_module._WINDOW_FUNCTIONS), ids="/".join)
def test_each_window_function_on_the_write_path_keeps_channels_and_takes_fewer(key: tuple[str, str]) -> None:
    """The write path lets the layout functions of ``_WINDOW_FUNCTIONS`` through as moving positions
    only: channel c of the output is channel c of the input, and a narrower channel axis passes
    (the function reads it off its input), so the slim model's k written channels go through."""
    fn = getattr(importlib.import_module(key[0]), key[1])
    params = inspect.signature(fn).parameters
    window: Any = (
        2
        if params["window_size" if "window_size" in params else "grid_size"].annotation in (int, "int")
        else (2, 2)
    )
    size = (4, 4, None) if "H" in params else ((4, 4),)
    windows = torch.randn(2 * 4, 2, 2, 6)

    def call(w: torch.Tensor) -> torch.Tensor:
        return fn(w, window, *[s for s in size if s is not None])

    full = call(windows)
    assert full.shape == (2, 4, 4, 6)
    for c in range(6):
        torch.testing.assert_close(call(windows[..., c : c + 1])[..., 0], full[..., c], atol=0, rtol=0)
    torch.testing.assert_close(call(windows[..., [1, 4]]), full[..., [1, 4]], atol=0, rtol=0)


class _UnbindLastAttention(nn.Module):
    """q, k and v unbound from the last axis (``qkv.reshape(B, N, H, D, 3).unbind(-1)``, as CSATv2's
    scalar attention does): a negative unbind axis once left the state of q with the wrong rank."""

    def __init__(self, dim: int = 48, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, **_: object) -> torch.Tensor:  # timm passes attn_mask, is_causal
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, self.heads, c // self.heads, 3).permute(0, 2, 1, 3, 4).unbind(-1)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


def test_an_unbind_over_the_last_axis_keeps_heads_and_head_dims_prunable_and_exact() -> None:
    model = tiny_vit(depth=1)
    model.blocks[0].attn = _UnbindLastAttention()
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    assert groups.group("blocks.0.attn:heads").prunable and groups.group("blocks.0.attn:head_dim").prunable
    x = torch.randn(2, 3, 32, 32)
    for seed in range(2):
        plan = p3b_fx.KeepPlan.random(groups, 0.5, seed=seed)
        with torch.no_grad():
            out = p3b_fx.slim(gm, plan, groups)(x)
            torch.testing.assert_close(out, p3b_fx.apply_masks(gm, plan, groups)(x), atol=1e-5, rtol=0)


def test_a_rule_that_miscounts_axes_fixes_the_groups_it_touches(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tracker checks every rule's state against the node's rank: a wrong state fixes the groups
    with a reason that names the node, never a silently wrong group."""
    from passes import track_axes  # noqa: PLC0415

    table = dict(track_axes.rules())
    good = table[nn.GELU]
    table[nn.GELU] = lambda node, t: (*good(node, t), ())  # one axis too many
    monkeypatch.setattr(track_axes, "_RULES", table)
    groups = p3b_fx.find_groups(p3b_fx.trace(tiny_vit(depth=1)))
    hidden = groups.group("blocks.0.mlp:hidden")
    assert not hidden.prunable and "axes for a rank-3 tensor (a p3b-fx bug" in hidden.reason


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_a_model_cast_before_tracing_is_traced_masked_and_slimmed_in_its_dtype(dtype: torch.dtype) -> None:
    """Shape propagation, the mask gates and the padded norms follow the model's dtype (a bfloat16
    model failed in shape propagation: float32 input, bfloat16 bias)."""
    model = tiny_vit(depth=1, scale_mlp_norm=True).to(dtype)
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    plan = p3b_fx.KeepPlan.random(groups, 0.5, seed=0)
    masked = p3b_fx.apply_masks(gm, plan, groups)
    assert {b.dtype for b in masked.get_submodule("p3b_masks").buffers()} == {dtype}
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    with torch.no_grad():
        out, want = p3b_fx.slim(gm, plan, groups)(x), masked(x)
    assert out.dtype == want.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 5e-2
    torch.testing.assert_close(out, want, atol=tol, rtol=0)


def test_a_model_with_no_prunable_group_masks_to_itself() -> None:
    """SwiftFormer's blocks are all fixed: masking it gives an empty gate bank, not an AttributeError."""
    model = tiny_vit(depth=1)
    shared = _Shared(48)
    model.blocks[0].attn = model.blocks[0].mlp = shared  # both branches call one module: kept whole
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    assert groups.blocks and not groups.prunable
    masked = p3b_fx.apply_masks(gm, p3b_fx.KeepPlan.dense(groups), groups)
    assert not list(masked.get_submodule("p3b_masks").buffers())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(masked(x), gm(x), atol=0, rtol=0)


class _Shared(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor, **_: object) -> torch.Tensor:  # timm passes attn_mask, is_causal
        return self.fc2(torch.relu(self.fc1(x)))


class _BatchFoldedAttention(nn.Module):
    """Attention that folds the heads into the batch (``(B·heads, N, d)``, as SAM's does) and
    contracts scores and values with ``torch.einsum``; ``sum_head_dims`` adds an einsum that sums
    the values over their head dims."""

    def __init__(self, dim: int, heads: int, sum_head_dims: bool = False) -> None:
        super().__init__()
        self.qkv, self.proj, self.heads, self.sum_head_dims = (
            nn.Linear(dim, 3 * dim),
            nn.Linear(dim, dim),
            heads,
            sum_head_dims,
        )

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.heads, n, -1).unbind(0)
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        if self.sum_head_dims:  # a sum over the head dims of one operand: not exact under pruning
            attn = attn * torch.einsum("bmd,bnm->bn", v, attn)[..., None]
        out = torch.einsum("bnm,bmd->bnd", attn, v)
        return self.proj(out.view(b, self.heads, n, -1).transpose(1, 2).reshape(b, n, c))


def test_heads_folded_into_the_batch_and_einsum_contractions_prune_exactly() -> None:
    """``(B, heads, N, d) → (B·heads, N, d)`` merges the batch (no group) with the heads: the batch
    stays an opaque factor of that axis, so heads and head dims remain groups, the slim graph scales
    the run-time ``B·heads`` size by kept / dense, and attention FLOPs count the heads. The traced
    batch is 2; slim equals masked at batch 3."""
    model = tiny_vit(depth=1)
    model.blocks[0].attn = _BatchFoldedAttention(48, 4)
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    for role in ("heads", "head_dim"):
        group = groups.group(f"blocks.0.attn:{role}")
        assert group.prunable, group.reason
    assert [g.size for g in groups if g.block == "blocks.0.attn" and g.role is Role.HEADS] == [4]
    x = torch.randn(3, 3, 32, 32)
    _assert_random_plans_exact(gm, groups, x)
    slim = p3b_fx.slim(gm, p3b_fx.KeepPlan.from_mapping(groups, {"blocks.0.attn:heads": [1, 2]}), groups)
    sizes = [n for n in slim.graph.nodes if n.target is operator.mul and 2 in n.args]  # B * kept heads
    assert sizes and not any(n.target is operator.floordiv for n in slim.graph.nodes)
    products = [t for t in groups.block("blocks.0.attn").flops if t.coef == 1]  # per sample
    assert [[g for _, g in t.factors] for t in products] == [
        ["blocks.0.attn:heads", None, "blocks.0.attn:head_dim", None],  # q @ kᵀ: heads × n × d × m
        ["blocks.0.attn:heads", None, None, "blocks.0.attn:head_dim"],  # einsum bnm,bmd: heads × n × m × d
    ]


def test_an_einsum_that_sums_one_operand_over_a_group_axis_fixes_it() -> None:
    model = tiny_vit(depth=1)
    model.blocks[0].attn = _BatchFoldedAttention(48, 4, sum_head_dims=True)
    groups = p3b_fx.find_groups(p3b_fx.trace(model))
    head_dim = groups.group("blocks.0.attn:head_dim")
    assert not head_dim.prunable and "einsum sums one operand over a group axis" in head_dim.reason


def test_a_factor_no_group_runs_along_is_opaque_inside_a_group_axis() -> None:
    """A reshape merging the batch with a group axis keeps the batch as an opaque label; taken out
    alone again it is a plain axis; it can never merge with a group's label."""
    from passes.axis_labels import Labels, Unsupported, reshape_state  # noqa: PLC0415

    labels = Labels("b")
    heads = labels.new(4)
    merged = reshape_state(labels, ((), (heads,), ()), (2, 4, 5), (8, 5))
    (batch, kept), rest = merged
    assert kept == heads and batch in labels.opaque and labels.sizes[batch] == 2 and rest == ()
    assert reshape_state(labels, merged, (8, 5), (2, 4, 5)) == ((), (heads,), ())
    with pytest.raises(Unsupported, match="no group runs along"):
        labels.merge(labels.new(2), batch)


class _SizeLeavingMlp(nn.Module):
    """An MLP that hands its hidden width (``read_hidden``) or its token count to the caller, read
    from a tensor inside the branch (MViTv2 hands its pooled grid size to the next block)."""

    def __init__(self, dim: int, read_hidden: bool) -> None:
        super().__init__()
        self.fc1, self.fc2, self.read_hidden = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim), read_hidden

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        h = self.fc1(x).relu()
        size = h.shape[-1] if self.read_hidden else h.shape[1]
        return self.fc2(h.reshape(h.shape[0], h.shape[1], -1)), size


class _SizeUsingBlock(nn.Module):
    def __init__(self, dim: int, read_hidden: bool) -> None:
        super().__init__()
        self.norm, self.mlp, self.out = (
            nn.LayerNorm(dim),
            _SizeLeavingMlp(dim, read_hidden),
            nn.Linear(dim, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, size = self.mlp(self.norm(x))
        return self.out(x + y) * (size / 100)


class _SizeNet(nn.Module):
    def __init__(self, read_hidden: bool) -> None:
        super().__init__()
        self.embed, self.block, self.head = (
            nn.Linear(8, 16),
            _SizeUsingBlock(16, read_hidden),
            nn.Linear(16, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(x)))


@pytest.mark.parametrize("read_hidden", [False, True])
def test_a_size_read_inside_a_branch_may_leave_it_unless_a_group_runs_along_it(read_hidden: bool) -> None:
    """A number read from the shape of a tensor inside the branch may leave the branch: the token
    count does not change when the block is pruned, so the hidden neurons stay free; the hidden
    width would, so reading it for a node outside the block fixes them. Slim equals masked."""
    gm = p3b_fx.trace(_SizeNet(read_hidden), input_shape=(1, 5, 8))
    groups = p3b_fx.find_groups(gm)
    hidden = groups.group("block.mlp:hidden")
    assert hidden.prunable is not read_hidden, hidden.reason
    if read_hidden:
        assert "its size feeds" in hidden.reason
    x = torch.randn(3, 5, 8)
    _assert_random_plans_exact(gm, groups, x)


class _AdditiveAttention(nn.Module):
    """SwiftFormer's additive attention in the token layout: q and k projections, q weighted by a
    learnt vector and summed over the tokens, a projection between the first and the last linear,
    whose output is added to q (a residual add inside the branch), then the output projection."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q, self.k, self.proj, self.final = (nn.Linear(dim, dim) for _ in range(4))
        self.w_g = nn.Parameter(torch.randn(dim, 1))

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        q = nn.functional.normalize(self.q(x), dim=-1)
        k = nn.functional.normalize(self.k(x), dim=-1)
        weights = nn.functional.normalize(q @ self.w_g, dim=1)
        g = torch.sum(weights * q, dim=1, keepdim=True)
        return self.final(self.proj(g * k) + q)


def test_a_residual_inside_a_branch_and_a_linear_between_the_first_and_last_prune_exactly() -> None:
    """``proj(g * k) + q`` looks like a residual add (q is computed before it), but it lies inside the
    attention's own branch: the outer branch is the block, holding it whole, not two blocks that
    share modules (which kept SwiftFormer's attention whole). ``proj`` sits between the first linears
    and the last: its input is gated and contracted, its output is an index space of its own that
    merges with q's where they add, so one group runs through q, k, w_g, proj and final's input."""
    model = tiny_vit(depth=1)
    model.blocks[0].attn = _AdditiveAttention(48)
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    assert [b.name for b in groups.blocks] == ["blocks.0.attn", "blocks.0.mlp"]
    block = groups.block("blocks.0.attn")
    assert block.mids == ("blocks_0_attn_proj",)
    inner = [g for g in groups if g.block == block.name and g.role not in (Role.READ, Role.WRITE)]
    assert [(g.size, g.prunable) for g in inner] == [(48, True)], [g.reason for g in inner]
    members = {(m.param, m.dim) for m in inner[0].members}
    assert {("blocks.0.attn.proj.weight", 0), ("blocks.0.attn.proj.weight", 1), ("blocks.0.attn.w_g", 0),
            ("blocks.0.attn.final.weight", 1)} <= members  # fmt: skip
    gated = {spec.name for spec in gate_specs(groups, "reference", 1)[block.name]}
    assert inner[0].name in gated  # P3B prunes it (a contracted index of a block without q · k)
    deploy = {spec.name: spec.round_to for spec in gate_specs(groups, "deploy", 8)[block.name]}
    assert deploy == {inner[0].name: 8}  # no fused attention to keep whole: a width, rounded
    _assert_random_plans_exact(gm, groups, torch.randn(3, 3, 32, 32))
    plan = p3b_fx.KeepPlan.random(groups, 0.5, seed=1)
    slim = p3b_fx.slim(gm, plan, groups)
    assert sum(p.numel() for p in slim.parameters()) == plan.predicted_params(groups)


class _DeepMlp(nn.Module):
    """fc1 → GELU → mid → ReLU → fc2, reducing its hidden activations with ``reduce``."""

    def __init__(self, d: int, reduce: str) -> None:
        super().__init__()
        self.fc1, self.mid, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, 3 * d), nn.Linear(3 * d, d)
        self.reduce = reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.gelu(self.fc1(x))
        if self.reduce == "sum over tokens":
            h = h * torch.sigmoid(h.sum(dim=1, keepdim=True))
        elif self.reduce == "sum over hidden":
            h = h * h.sum(-1, keepdim=True)
        elif self.reduce == "mean over hidden":
            h = h - h.mean(dim=-1, keepdim=True)
        elif self.reduce == "amax over hidden":
            h = h / h.amax(-1, keepdim=True)
        return self.fc2(torch.relu(self.mid(h)))


@pytest.mark.parametrize(
    ("reduce", "why"),
    [("sum over tokens", ""), ("sum over hidden", ""), ("mean over hidden", "a mean over it"),
     ("amax over hidden", "a max over it")],
)  # fmt: skip
def test_reductions_keep_the_groups_they_do_not_spoil(reduce: str, why: str) -> None:
    """Two hidden layers (fc1's and the middle linear's neurons), each a group. A sum over the
    tokens, or over fc1's neurons (pruned ones are zero there), keeps fc1's neurons prunable; a mean
    or a max over them would change with pruning and fixes them, naming the node. The middle
    linear's neurons stay prunable either way; slim equals hard-masked."""
    model = tiny_vit(depth=1)
    model.blocks[0].mlp = _DeepMlp(48, reduce)
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    first, second = (g for g in groups if g.block == "blocks.0.mlp" and g.role is Role.HIDDEN)
    assert (first.size, second.size) == (96, 144)
    assert first.prunable == (not why) and why in first.reason, first.reason
    assert second.prunable, second.reason
    gated = {spec.name for spec in gate_specs(groups, "deploy", 8)["blocks.0.mlp"]}
    assert gated == {g.name for g in (first, second) if g.prunable}
    _assert_random_plans_exact(gm, groups, torch.randn(3, 3, 32, 32))
    plan = p3b_fx.KeepPlan.random(groups, 0.5, seed=2)
    assert sum(p.numel() for p in p3b_fx.slim(gm, plan, groups).parameters()) == plan.predicted_params(groups)


class _ScaledResidualBlock(nn.Module):
    """A timm Block whose residual adds go through an ``nn.Identity`` or a per-channel scale of the
    stream (MetaFormer's ``res_scale``: ``x' = s·x + branch(x)``), with a StarReLU MLP
    (``scale · relu(h)² + bias``)."""

    def __init__(self, block: nn.Module, scaled: bool) -> None:
        super().__init__()
        self.block = block
        dim = block.norm1.normalized_shape[0]
        self.res_scale = nn.Identity()
        self.scale = nn.Parameter(torch.rand(dim) + 0.5) if scaled else None
        self.star = nn.Parameter(torch.tensor([0.8, -0.1]))

    def _stream(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(-1) if self.scale is not None else self.res_scale(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        x = self._stream(x) + b.attn(b.norm1(x))
        h = b.mlp.fc1(b.norm2(x))
        h = self.star[0] * torch.relu(h) ** 2 + self.star[1]
        return self._stream(x) + b.mlp.fc2(h)


@pytest.mark.parametrize("scaled", [False, True])
def test_a_residual_through_an_identity_or_a_scale_is_a_block(scaled: bool) -> None:
    """``identity(x) + branch(x)`` and ``x * s + branch(x)``: the branch reads ``x``, so the add is
    the block's residual (its taps read ``x``), and a block removed by a plan leaves ``s·x``. A
    StarReLU's square keeps pruned zeros. Slim equals hard-masked, also with whole blocks removed."""
    model = tiny_vit(depth=2)
    model.blocks[0] = _ScaledResidualBlock(model.blocks[0], scaled)
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    assert [b.name for b in groups.blocks] == [
        "blocks.0.block.attn",
        "blocks.0.block.mlp",
        "blocks.1.attn",
        "blocks.1.mlp",
    ]
    assert all(g.prunable for g in groups if g.block.startswith("blocks.0") and g.role is not Role.SELECT)
    _assert_random_plans_exact(gm, groups, torch.randn(3, 3, 32, 32))
    keep = p3b_fx.KeepPlan.random(groups, 0.5, seed=4).as_dict()
    keep["blocks.0.block.mlp:hidden"] = ()  # the whole MLP goes: the stream is scaled, not dropped
    plan = p3b_fx.KeepPlan.from_mapping(groups, keep)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(p3b_fx.slim(gm, plan, groups)(x), p3b_fx.apply_masks(gm, plan, groups)(x),
                                   atol=1e-5, rtol=0)  # fmt: skip


class _SpatialGatingMlp(nn.Module):
    """gMLP's spatial gating unit: fc1's outputs split into u and v, v normalised and mixed over the
    tokens by a linear between fc1 and fc2, then ``u * v``."""

    def __init__(self, d: int, tokens: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(2 * d, d)
        self.norm, self.proj = nn.LayerNorm(2 * d), nn.Linear(tokens, tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.fc1(x).chunk(2, dim=-1)
        v = self.proj(self.norm(v).transpose(-1, -2)).transpose(-1, -2)
        return self.fc2(u * v)


def test_a_linear_over_the_tokens_inside_a_block_leaves_the_groups_where_they_are() -> None:
    """A linear between the first and the last that mixes an axis no group runs along (gMLP's
    tokens) starts no group: its weight is not sliced, and the hidden neurons (u and v together,
    under v's norm) stay prunable. Slim equals hard-masked."""
    model = tiny_vit(depth=1)
    model.blocks[0].mlp = _SpatialGatingMlp(48, 17)
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    hidden = [g for g in groups if g.block == "blocks.0.mlp" and g.role is Role.HIDDEN]
    assert [(g.size, g.prunable) for g in hidden] == [(96, True)], [g.reason for g in hidden]
    assert groups.block("blocks.0.mlp").mids == ()
    assert not any(m.param.startswith("blocks.0.mlp.proj") for g in groups for m in g.members)
    _assert_random_plans_exact(gm, groups, torch.randn(3, 3, 32, 32))
