"""Rotary embeddings: head dims pruned in pairs, tables gathered at run time or sliced, exactly.

Small hand-written attentions (not timm's) so each rule is seen alone: the strided slice
(``x[..., 1::2]``), the ``stack``/``cat`` that puts a split axis back together, axes that refine to
the same leaves, and operands computed outside the groups (``passes/gather_operands.py``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import p3b_fx
from p3b_fx import KeepPlan, Role
from passes.gather_operands import GatherOperandsPass, is_operand_gather
from passes.rewrite_slim import slim_passes
from tests.conftest import tiny_vit


def _rot_interleaved(x: torch.Tensor) -> torch.Tensor:
    return torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)


def _rot_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class _Table(nn.Module):
    """sin and cos of angles per token (and head) and head dim. Learnt angles (a parameter, as in
    rope-mixed ViTs) are computed in the graph at each call, so the slim graph gathers the kept
    rows; fixed ones (a buffer) are folded into constants by torch.fx, which the rewrite slices."""

    def __init__(self, tokens: int, head_dim: int, per_head: int = 0, learnt: bool = True) -> None:
        super().__init__()
        angles = torch.randn((per_head, tokens, head_dim) if per_head else (tokens, head_dim))
        if learnt:
            self.angles = nn.Parameter(angles)
        else:
            self.register_buffer("angles", angles)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.angles.sin(), self.angles.cos()


class _RotaryAttention(nn.Module):
    def __init__(self, dim: int, heads: int, style: str, table: nn.Module | None) -> None:
        super().__init__()
        self.heads, self.style, self.table = heads, style, table
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, **_: object) -> torch.Tensor:  # timm passes attn_mask, is_causal
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        rot = _rot_interleaved if self.style != "half" else _rot_half
        if self.style == "from-q":  # a "table" computed from q by an op with no rule: already slim
            sin, cos = q.cumsum(-1), q.cumsum(-1)
        else:
            assert self.table is not None
            sin, cos = self.table()
        q = q * cos + rot(q) * sin
        k = k * cos + rot(k) * sin
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


def _model(style: str, per_head: bool = False, learnt: bool = True) -> nn.Module:
    model = tiny_vit(depth=2, class_token=False, global_pool="avg")  # 16 tokens, 4 heads of 12 dims
    for block in model.blocks:
        block.attn = _RotaryAttention(48, 4, style, _Table(16, 12, 4 if per_head else 0, learnt))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.eval()


def _assert_exact(gm: torch.fx.GraphModule, groups: p3b_fx.GroupSet, plan: KeepPlan) -> torch.fx.GraphModule:
    slim = p3b_fx.slim(gm, plan, groups)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out, dense = slim(x), gm(x)
        torch.testing.assert_close(out, p3b_fx.apply_masks(gm, plan, groups)(x), atol=1e-5, rtol=0)
    assert (out - dense).abs().max() > 1e-2
    assert sum(p.numel() for p in slim.parameters()) == plan.predicted_params(groups)
    return slim


@pytest.mark.parametrize("style", ["interleaved", "half"])
@pytest.mark.parametrize("per_head", [False, True], ids=["per-dim", "per-head"])
def test_rotary_head_dims_are_pruned_in_pairs_and_the_table_is_gathered(style: str, per_head: bool) -> None:
    gm = p3b_fx.trace(_model(style, per_head))
    groups = p3b_fx.find_groups(gm)
    for block in ("blocks.0.attn", "blocks.1.attn"):
        head_dim, heads = groups.group(f"{block}:head_dim"), groups.group(f"{block}:heads")
        assert head_dim.prunable and head_dim.size == 6, head_dim.reason  # 6 pairs of 12 dims
        assert heads.prunable, heads.reason
        (pair,) = [g for g in groups if g.block == block and g.role is Role.SELECT and g.size == 2]
        assert not pair.prunable and "at node '" in pair.reason
    keep = {"blocks.0.attn:head_dim": [0, 2, 5], "blocks.1.attn:head_dim": [1, 4],
            "blocks.1.attn:heads": [0, 3]}  # fmt: skip
    slim = _assert_exact(gm, groups, KeepPlan.from_mapping(groups, keep))
    gathers = [n for n in slim.graph.nodes if is_operand_gather(n)]
    # q and k each read sin and cos: 4 gathers per block, one more per operand along the heads
    assert len(gathers) == 2 * 4 + (4 if per_head else 0)
    assert slim.get_submodule("blocks.0.attn.qkv").out_features == 3 * 4 * 6
    assert slim.get_submodule("blocks.1.attn.qkv").out_features == 3 * 2 * 4
    table = "blocks.0.attn.table.angles"
    assert torch.equal(slim.get_parameter(table), gm.get_parameter(table))  # gathered from, not sliced


def _tables(slim: torch.fx.GraphModule, gm: torch.fx.GraphModule) -> list[int]:
    """Widths of the slim graph's sliced rotary tables; each column must be a column of a dense
    table of ``gm`` (16 tokens × 12 dims)."""
    dense = [b for b in gm.buffers() if b.shape == (16, 12)]  # the tables and their sin and cos
    widths = []
    for k, table in slim.named_buffers():
        if k.startswith("p3b_index.table_"):
            assert table.shape[0] == 16
            for i in range(table.shape[1]):
                assert any(torch.equal(table[:, i], d[:, j]) for d in dense for j in range(12))
            widths.append(int(table.shape[1]))
    return sorted(widths)


def test_a_fixed_table_read_by_q_and_k_gets_a_sliced_copy_for_each() -> None:
    """torch.fx makes a table computed from buffers a constant per tensor, here read by q and by k:
    slicing it in place for one would cut it for the other, so each reader gets its own sliced copy
    (no gathering at run time)."""
    gm = p3b_fx.trace(_model("interleaved", learnt=False))
    groups = p3b_fx.find_groups(gm)
    keep = {"blocks.0.attn:head_dim": [0, 2, 5], "blocks.1.attn:head_dim": [1, 4]}
    slim = _assert_exact(gm, groups, KeepPlan.from_mapping(groups, keep))
    assert not any(is_operand_gather(n) for n in slim.graph.nodes)
    assert _tables(slim, gm) == [4, 4, 4, 4, 6, 6, 6, 6]  # sin and cos of q and k, 2 and 3 pairs kept


def test_a_table_shared_by_two_blocks_is_sliced_for_each_not_once() -> None:
    """One buffer that two blocks read (a rotary table owned by a shared module) cannot be sliced in
    place for both: each reader gets its own copy of its block's kept columns."""

    class Direct(_RotaryAttention):
        def forward(self, x: torch.Tensor, **_: object) -> torch.Tensor:  # timm passes attn_mask, is_causal
            b, n, c = x.shape
            qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            assert self.table is not None
            angles = self.table.angles
            q = q * angles + _rot_interleaved(q)
            k = k * angles + _rot_interleaved(k)
            return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))

    model = _model("interleaved", learnt=False)
    table = model.blocks[0].attn.table
    for block in model.blocks:
        old = block.attn
        block.attn = Direct(48, 4, "interleaved", table)
        block.attn.load_state_dict(old.state_dict(), strict=False)
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    assert all(groups.group(f"blocks.{i}.attn:head_dim").prunable for i in range(2))
    keep = {"blocks.0.attn:head_dim": [0, 2, 5], "blocks.1.attn:head_dim": [1, 3, 4]}  # as many, not the same
    slim = _assert_exact(gm, groups, KeepPlan.from_mapping(groups, keep))
    assert not any(is_operand_gather(n) for n in slim.graph.nodes)
    assert _tables(slim, gm) == [6, 6, 6, 6]  # q and k of each block, 3 pairs each


def test_a_table_computed_from_a_tracked_value_fixes_the_head_dims() -> None:
    """An operand computed from q has q's slim size already: it is not gathered; the axes it spans
    are fixed, with the node named."""
    gm = p3b_fx.trace(_model("from-q"))
    groups = p3b_fx.find_groups(gm)
    head_dim = groups.group("blocks.0.attn:head_dim")
    assert not head_dim.prunable and "at node '" in head_dim.reason
    _assert_exact(gm, groups, KeepPlan.random(groups, 0.5, seed=0))


class _StridedMlp(nn.Module):
    """Hidden neurons read with a stride that does not pick one of a whole number of pairs."""

    def __init__(self, d: int, start: int, step: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 48), nn.Linear(48 // step, d)
        self.start, self.step = start, step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x))[..., self.start :: self.step])


@pytest.mark.parametrize(("start", "step", "prunable"), [(1, 2, True), (0, 3, True), (2, 4, True)])
def test_a_strided_slice_keeps_the_outer_factor_a_group(start: int, step: int, prunable: bool) -> None:
    """``h[..., s::k]`` over 48 hidden neurons: neurons k·i + s for i < 48 / k, so the 48 / k factor
    is the hidden group (each element a run of k neurons, of which the block reads one) and the
    k-factor is a fixed selector."""
    model = tiny_vit(depth=1)
    model.blocks[0].mlp = _StridedMlp(48, start, step)
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    hidden = groups.group("blocks.0.mlp:hidden")
    assert hidden.prunable is prunable and hidden.size == 48 // step, hidden.reason
    plan = KeepPlan.random(groups, 0.5, seed=3)
    slim = _assert_exact(gm, groups, plan)
    kept = len(plan.indices(groups, "blocks.0.mlp:hidden"))
    assert slim.get_submodule("blocks.0.mlp.fc1").out_features == kept * step


def test_the_gather_pass_is_idempotent() -> None:
    gm = p3b_fx.trace(_model("half", per_head=True))
    groups = p3b_fx.find_groups(gm)
    plan = KeepPlan.random(groups, 0.5, seed=1)
    for p in slim_passes(groups, plan):
        gm = p(gm).graph_module
    assert GatherOperandsPass(groups, plan)(gm).modified is False


@pytest.mark.parametrize(
    ("style", "per_head", "learnt"), [("interleaved", True, True), ("half", False, False)]
)
def test_the_gathers_and_sliced_tables_stay_on_the_models_device(
    style: str, per_head: bool, learnt: bool
) -> None:
    """The run-time gathers' index buffers and the per-reader table copies are made on the model's
    device: "meta" stands in for CUDA here (it refuses CPU operands as CUDA does), as in
    ``tests/test_slim.py::test_every_pass_keeps_a_model_on_its_own_device``. A learnt per-head table
    is gathered at run time; a fixed one becomes constants that the rewrite slices."""
    meta = torch.device("meta")
    gm = p3b_fx.trace(_model(style, per_head=per_head, learnt=learnt).to(meta), input_shape=(1, 3, 32, 32))
    groups = p3b_fx.find_groups(gm)
    slim = p3b_fx.slim(gm, KeepPlan.random(groups, 0.6, 1), groups)
    made = [
        k
        for k, _ in slim.named_buffers()
        if k.startswith("p3b_index.operand_" if learnt else "p3b_index.table_")
    ]
    assert made, "the case must exercise the gather pass"
    where = {k: t.device for k, t in (*slim.named_parameters(), *slim.named_buffers())}
    assert all(d == meta for d in where.values()), {k: d for k, d in where.items() if d != meta}
    with torch.no_grad():
        assert slim(torch.empty(2, 3, 32, 32, device=meta)).shape == (2, 5)
