"""Other ViT-family models in timm: either slim == masked exactly, or a clear project error.

Fail-closed groups are allowed (and expected: the head dims a rotary embedding slices and rotates,
a per-head bias the slim graph cannot resize); a silently wrong graph is not. BEiT's table and
vit_relpos's bias MLP are followed back from the attention bias, so their heads are pruned; the
rotary models (EVA-02, RoPE ViT and rope-mixed, DINOv3, Perception Encoder) prune whole heads and
pairs of head dims, gathering the kept rows of their rotary tables;
EVA-02's SwiGLU (a chunked fc1) prunes its hidden neurons in pairs. And ``--torch-compile`` compiles
each family's masked model whole (``fullgraph``): no graph break.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

import p3b_fx
from p3b_fx import KeepPlan, latency, train
from p3b_fx.core.groups import Role
from p3b_fx.errors import P3BError
from p3b_fx.export.jetpack import jetpack
from p3b_fx.export.onnx import export_onnx
from passes.gather_operands import is_operand_gather
from tests.conftest import assert_loads_with_torch_alone, assert_trace_matches, sapiens2

FAMILY = [
    "eva02_tiny_patch14_224",  # SwiGLU MLP, rotary embeddings
    "eva02_base_patch16_clip_224",  # norms over heads × head_dim and over the SwiGLU hidden neurons
    "beit_base_patch16_224",  # relative position bias, layer scale
    "cait_xxs24_224",  # talking heads, class attention
    "pit_ti_224",  # pooling stages
    "vit_relpos_small_patch16_224",  # per-head relative position bias
    "vit_small_patch16_rope_224",  # rotary embeddings
    "vit_small_patch16_dinov3",  # rotary embeddings computed at run time, rotate-half
    "vit_pe_core_tiny_patch16_384",  # rotary embeddings, attention pooling
    "xcit_nano_12_p16_224",  # cross-covariance attention, local patch interaction
    "levit_128s",  # BatchNorm linears
    "vit_small_patch16_18x2_224",  # parallel blocks
    "vit_small_r26_s32_224",  # hybrid CNN stem
]


def _assert_random_plans_exact(gm: torch.fx.GraphModule, groups: p3b_fx.GroupSet, x: torch.Tensor) -> None:
    """Two random plans (half of every prunable group): slim equals hard-masked, and differs from
    dense (so the plans cut something that matters)."""
    for seed in range(2):
        plan = KeepPlan.random(groups, 0.5, seed=seed)
        with torch.no_grad():
            out, dense = p3b_fx.slim(gm, plan, groups)(x), gm(x)
            torch.testing.assert_close(out, p3b_fx.apply_masks(gm, plan, groups)(x), atol=1e-5, rtol=0)
        assert (out - dense).abs().max() > 1e-2


def _slim_exactly(
    gm: torch.fx.GraphModule, groups: p3b_fx.GroupSet, plan: KeepPlan, x: torch.Tensor
) -> torch.fx.GraphModule:
    """The slim model of ``plan``, checked equal to the hard-masked one and unlike the dense one."""
    slim = p3b_fx.slim(gm, plan, groups)
    with torch.no_grad():
        out, dense = slim(x), gm(x)
        atol = 1e-5 * max(float(dense.abs().max()), 1.0)  # FastViT's random-weight outputs reach 1e4
        torch.testing.assert_close(out, p3b_fx.apply_masks(gm, plan, groups)(x), atol=atol, rtol=0)
    assert (out - dense).abs().max() > 1e-3
    return slim


def _random_weights(model: torch.nn.Module, scale: float) -> None:
    """Every parameter drawn at random (seed 0) times ``scale``: large enough that a wrong slice shows."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * scale)


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
        assert_trace_matches(gm, model, x)
        torch.testing.assert_close(p3b_fx.slim(gm, plan, groups)(x), p3b_fx.apply_masks(gm, plan, groups)(x),
                                   atol=1e-5, rtol=0)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", *FAMILY])
def test_the_masked_model_has_no_graph_break(name: str) -> None:
    """What ``--torch-compile`` needs (``train.compiled`` with ``fullgraph=True``): the masked, tapped
    and folded model of every family traces into one graph with gates scoring and taps recording."""
    try:
        model = timm.create_model(name, pretrained=False, depth=1, img_size=64).train()
    except (TypeError, ValueError):  # models without a depth argument
        model = timm.create_model(name, pretrained=False, img_size=64).train()
    gm = p3b_fx.trace(model, input_shape=(1, 3, 64, 64))
    assert _graph_breaks(gm, p3b_fx.find_groups(gm), torch.randn(2, 3, 64, 64)) == []


def _graph_breaks(gm: torch.fx.GraphModule, groups: p3b_fx.GroupSet, x: torch.Tensor) -> list[str]:
    """Why dynamo breaks the masked, tapped and folded model of ``gm`` (gates scoring, taps
    recording) into more than one graph: one line per break, none when it traces whole."""
    masked, bank = p3b_fx.insert_masks(gm, groups, share_parameters=True)
    taps = train.tap(masked, groups)
    p3b_fx.fold_masks(masked)
    bank.scoring(True)
    taps.recording = True
    explained = torch._dynamo.explain(masked)(x)
    if explained.graph_break_count == 0:
        return []
    return [b.reason.splitlines()[0] for b in explained.break_reasons] or ["a break without a reason"]


@pytest.mark.parametrize("name", ["vit_relpos_small_patch16_224", "vit_relpos_medium_patch16_cls_224"])
def test_relpos_heads_are_pruned_with_their_bias_mlp(name: str, tmp_path: Path) -> None:
    """vit_relpos computes its per-head bias with a small MLP and reshapes it with the head count
    written out (``view(-1, 4)``; the class-token variant also pads it): the head axis is the
    MLP's last Linear's output, which is sliced with the heads, and the literal is resized."""
    model = timm.create_model(name, pretrained=False, depth=1, img_size=32, patch_size=8, embed_dim=48,
                              num_heads=4).eval()  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # large block weights (and layer scales), so a wrong slice would show
        for pname, param in model.named_parameters():
            if pname.startswith("blocks."):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    heads = groups.group("blocks.0.attn:heads")
    assert heads.prunable, heads.reason
    assert ("blocks.0.attn.rel_pos.mlp.fc2.weight", 0) in {(m.param, m.dim) for m in heads.members}
    x = torch.randn(2, 3, 32, 32)
    slim = _slim_exactly(gm, groups, KeepPlan.from_mapping(groups, {"blocks.0.attn:heads": [1, 2]}), x)
    assert slim.get_submodule("blocks.0.attn.rel_pos.mlp.fc2").out_features == 2
    report = export_onnx(slim, x, tmp_path / "relpos.onnx", jetpack=jetpack("6.1"))
    assert report.parity_max_abs_diff <= 1e-4


ROTARY = [
    "eva02_tiny_patch14_224",  # rotate every other dim: x[..., 1::2], stack, reshape(x.shape)
    "vit_small_patch16_rope_224",
    "vit_small_patch16_dinov3",  # rotate half: chunk, cat; embedding computed at run time
    "vit_pe_core_tiny_patch16_384",
    "eva02_base_patch14_224",  # separate q, k and v projections
    "vit_small_patch16_rope_mixed_224",  # a rotary table per head, computed outside the blocks
]


@pytest.mark.parametrize("name", ROTARY)
def test_rotary_attention_prunes_heads_and_pairs_of_head_dims(name: str, tmp_path: Path) -> None:
    """A rotary embedding rotates pairs of head dims of q and k (dims 2i and 2i+1, or i and i + d/2)
    by a table computed outside the block: head_dim is pruned a pair at a time (the factor within
    a pair is a fixed selector), the heads are free, the slim graph reads only the kept rows of the
    table (per head dim, and per head for rope-mixed), and the slim model equals the hard-masked
    one, also in ONNX."""
    model = timm.create_model(name, pretrained=False, depth=1, img_size=32, patch_size=8, embed_dim=64,
                              num_heads=4).eval()  # fmt: skip
    _random_weights(model, 0.5)  # large weights (and layer scales), so a wrong slice would show
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    heads, head_dim = groups.group("blocks.0.attn:heads"), groups.group("blocks.0.attn:head_dim")
    assert heads.prunable, heads.reason
    assert head_dim.prunable and head_dim.size == 8, head_dim.reason  # 8 pairs of the 16 dims
    (pair,) = [g for g in groups if g.block == "blocks.0.attn" and g.role is Role.SELECT and g.size == 2]
    assert not pair.prunable and "at node '" in pair.reason
    keep = {"blocks.0.attn:heads": [1, 2], "blocks.0.attn:head_dim": [0, 3, 4, 7]}
    plan = KeepPlan.from_mapping(groups, keep)
    slim = p3b_fx.slim(gm, plan, groups)
    attn = slim.get_submodule("blocks.0.attn")
    linears = [getattr(attn, n, None) for n in ("qkv", "q_proj", "k_proj", "v_proj")]
    qkv = sum(m.out_features for m in linears if m is not None)
    assert (qkv, attn.proj.in_features) == (3 * 2 * 8, 2 * 8)
    sliced = ("_tensor_constant", "p3b_index.table_")  # a constant read once, or a reader's own copy
    tables = [b for k, b in slim.named_buffers() if k.startswith(sliced) and b.shape[-1] == 8]
    gathered = any(is_operand_gather(n) for n in slim.graph.nodes)
    assert gathered or tables  # a table computed at run time is gathered, a constant one sliced
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out, dense = slim(x), gm(x)
        torch.testing.assert_close(out, p3b_fx.apply_masks(gm, plan, groups)(x), atol=1e-5, rtol=0)
    scale = float(dense.abs().max())  # up to a few hundred (the Perception Encoder's pooled output)
    assert (out - dense).abs().max() > 1e-2 * scale
    atol = 1e-6 * max(scale, 100.0)
    report = export_onnx(slim, x, tmp_path / "rotary.onnx", jetpack=jetpack("6.1"), atol=atol)
    assert report.parity_max_abs_diff <= atol


def test_a_rotary_model_slimmed_twice_equals_its_masked_model(tmp_path: Path) -> None:
    """Slimming the slim model again (traced anew, which keeps no node meta, and its groups found
    anew) narrows the rotary tables' gathers it already has, rather than gathering twice; it equals
    its hard-masked model and loads with torch alone."""
    model = timm.create_model("vit_small_patch16_rope_mixed_224", pretrained=False, depth=1, img_size=32,
                              patch_size=8, embed_dim=64, num_heads=4).eval()  # fmt: skip
    _random_weights(model, 0.5)
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    first = p3b_fx.slim(gm, KeepPlan.random(groups, 0.75, seed=1), groups)
    again = p3b_fx.trace(first)
    regrouped = p3b_fx.find_groups(again)
    assert regrouped.group("blocks.0.attn:head_dim").prunable
    plan = KeepPlan.random(regrouped, 0.6, seed=2)
    second = p3b_fx.slim(again, plan, regrouped)
    gathers = [n for n in second.graph.nodes if is_operand_gather(n)]
    assert gathers and len(gathers) == len([n for n in first.graph.nodes if is_operand_gather(n)])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        masked = p3b_fx.apply_masks(again, plan, regrouped)
        torch.testing.assert_close(second(x), masked(x), atol=1e-5, rtol=0)
    assert_loads_with_torch_alone(second, x, tmp_path)


@pytest.mark.parametrize(
    ("name", "kwargs", "free"),
    [
        ("cait_xxs24_224", {"img_size": 32, "patch_size": 8},
         ["blocks.0.attn:heads", "blocks.0.attn:head_dim", "blocks.0.attn:hidden",
          "blocks_token_only.0.attn:heads", "blocks_token_only.0.attn:head_dim"]),
        ("xcit_nano_12_p16_224", {"img_size": 64},
         ["blocks.0.attn:heads", "cls_attn_blocks.0.attn:heads", "cls_attn_blocks.0.attn:head_dim"]),
    ],
)  # fmt: skip
def test_class_attention_and_cross_covariance_heads_prune_exactly(
    name: str, kwargs: dict[str, int], free: list[str]
) -> None:
    """CaiT's and XCiT's class attention takes q from the class token (``q(x[:, 0]).unsqueeze(1)``)
    and k, v from every token: the three projections share their heads and head dims. XCiT's
    cross-covariance attention normalises q and k over the tokens (heads free, head_dim fixed by
    the softmax over it); CaiT's talking heads mix the heads with a linear before the softmax
    (``proj_l``) and one after it (``proj_w``): linears between the block's first and last, gated on
    their input and output, so the heads stay free and the mixed maps between the two are a group
    of hidden neurons. Random weights, so a wrong slice would show."""
    model = timm.create_model(name, pretrained=False, depth=1, **kwargs).eval()
    _random_weights(model, 0.3)
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    for group in free:
        assert groups.group(group).prunable, groups.group(group).reason
    x = torch.randn(2, *gm.meta["p3b.input_shape"][1:])
    _assert_random_plans_exact(gm, groups, x)


def _parallel_vit(num_parallel: int = 2) -> torch.nn.Module:
    """A small timm ViT of ParallelThingsBlocks (vit_small_patch16_18x2_224's block), with layer
    scales, and large random weights so a wrong slice would show."""
    from timm.models.vision_transformer import ParallelThingsBlock, VisionTransformer  # noqa: PLC0415

    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=5,
                              init_values=0.5, block_fn=ParallelThingsBlock).eval()  # fmt: skip
    if num_parallel != 2:
        for block in model.blocks:
            block.__init__(48, 4, num_parallel=num_parallel, init_values=0.5, qkv_bias=True)  # type: ignore[misc]
        model.eval()
    _random_weights(model, 0.3)
    return model


@pytest.mark.parametrize("num_parallel", [2, 3])
def test_parallel_blocks_prune_each_lane(num_parallel: int, tmp_path: Path) -> None:
    """timm's ParallelThingsBlock sums parallel attentions (and MLPs) into one residual add,
    ``x + stack([attn_0(x), attn_1(x)]).sum(0)``. Each lane has its own heads, head dims, hidden
    neurons and read channels; the channels written are one group over every lane's projection
    and layer scale. One block for P3B (one benefit per residual add), sliced lane by lane."""
    model = _parallel_vit(num_parallel)
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    attn, mlp = groups.block("blocks.0.attns"), groups.block("blocks.0.ffns")
    assert len(attn.all_lanes()) == len(mlp.all_lanes()) == num_parallel
    lanes = ["'" * k for k in range(num_parallel)]
    for name in [f"blocks.0.attns:{r}{q}" for r in ("read", "heads", "head_dim") for q in lanes] + [
        f"blocks.0.ffns:{r}{q}" for r in ("read", "hidden") for q in lanes
    ] + ["blocks.0.attns:write", "blocks.0.ffns:write"]:  # fmt: skip
        assert groups.group(name).prunable, (name, groups.group(name).reason)
    write = {m.param for m in groups.group("blocks.0.attns:write").members}
    for k in range(num_parallel):
        assert {f"blocks.0.attns.{k}.attn.proj.weight", f"blocks.0.attns.{k}.ls.gamma"} <= write
    heads = {m.param for m in groups.group("blocks.0.attns:heads'").members}
    assert heads == {f"blocks.0.attns.1.attn.{p}" for p in ("qkv.weight", "qkv.bias", "proj.weight")}
    x = torch.randn(3, 3, 32, 32)
    plan = KeepPlan.from_mapping(groups, {
        "blocks.0.attns:heads'": [0, 3], "blocks.0.attns:head_dim": list(range(0, 12, 2)),
        "blocks.0.ffns:hidden": list(range(50)), "blocks.0.ffns:read'": list(range(1, 48, 3)),
        "blocks.0.attns:write": list(range(30)), "blocks.1.ffns:write": list(range(10, 40)),
    })  # fmt: skip
    slim = p3b_fx.slim(gm, plan, groups)
    assert slim.get_submodule("blocks.0.attns.1.attn.qkv").out_features == 3 * 2 * 12
    assert slim.get_submodule("blocks.0.attns.0.attn.qkv").out_features == 3 * 4 * 6
    assert slim.get_submodule("blocks.0.ffns.0.mlp.fc1").out_features == 50
    assert slim.get_submodule("blocks.0.ffns.1.mlp.fc1").in_features == 16
    assert slim.get_submodule(f"blocks.0.attns.{num_parallel - 1}.attn.proj").out_features == 30
    with torch.no_grad():
        out, dense = slim(x), gm(x)
        torch.testing.assert_close(out, p3b_fx.apply_masks(gm, plan, groups)(x), atol=1e-5, rtol=0)
        assert (out - dense).abs().max() > 1e-2
        for seed in range(3):  # every group at once, at random
            rand = KeepPlan.random(groups, 0.5, seed=seed)
            slim_out, masked_out = p3b_fx.slim(gm, rand, groups)(x), p3b_fx.apply_masks(gm, rand, groups)(x)
            torch.testing.assert_close(slim_out, masked_out, atol=1e-5, rtol=0)
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in model.parameters())
    report = export_onnx(slim, x, tmp_path / "parallel.onnx", jetpack=jetpack("6.1"))
    assert report.parity_max_abs_diff <= 1e-4


class _SummedLanes(torch.nn.Module):
    """Two MLP lanes joined by ``+`` (or by ``join``) before the residual add."""

    def __init__(self, join: str = "add") -> None:
        super().__init__()
        self.join = join
        self.n0, self.n1 = torch.nn.LayerNorm(8), torch.nn.LayerNorm(8)
        self.a0, self.b0 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
        self.a1, self.b1 = torch.nn.Linear(8, 12), torch.nn.Linear(12, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y0 = self.b0(torch.relu(self.a0(self.n0(x))))
        y1 = self.b1(torch.relu(self.a1(self.n1(x))))
        both = y0 + y1 if self.join == "add" else torch.stack([y0, y1]).mean(0)
        return self.head(x + both)


def test_parallel_lanes_joined_by_add_or_an_unknown_op() -> None:
    """``x + (lane_0 + lane_1)`` is a join too; a join without a channel rule (``stack(...).mean(0)``)
    keeps the written channels whole, with its reason, and the lanes' hidden neurons prunable."""
    x = torch.randn(2, 5, 8)
    for join in ("add", "mean"):
        model = _SummedLanes(join).eval()
        gm = p3b_fx.trace(model, input_shape=(2, 5, 8))
        groups = p3b_fx.find_groups(gm)
        (block,) = groups.blocks
        assert len(block.all_lanes()) == 2
        assert all(groups.group(f"{block.name}:hidden{q}").prunable for q in ("", "'"))
        write = groups.group(f"{block.name}:write")
        assert write.prunable == (join == "add"), write.reason
        if join == "mean":
            assert "parallel lanes meet" in write.reason
        for seed in range(2):
            plan = KeepPlan.random(groups, 0.5, seed=seed)
            with torch.no_grad():
                slim_out = p3b_fx.slim(gm, plan, groups)(x)
                masked_out = p3b_fx.apply_masks(gm, plan, groups)(x)
            torch.testing.assert_close(slim_out, masked_out, atol=1e-5, rtol=0)


def test_swin_heads_prune_exactly(tmp_path: Path) -> None:
    """Swin's window attention takes its softmax as an ``nn.Softmax`` module, adds a per-head bias
    gathered from a table and (in shifted blocks) a window mask: the heads and head dims are free.
    Its output goes back through a view, the window reverse, a crop and a roll: the written channels
    are free too (the view's channel size is resized). A slim Swin equals the hard-masked one.
    Random weights, so a wrong slice would show."""
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56, embed_dim=32,
                              depths=(2, 2), num_heads=(2, 4), num_classes=5).eval()  # fmt: skip
    _random_weights(model, 0.3)
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    for block in ("layers.0.blocks.0.attn", "layers.0.blocks.1.attn", "layers.1.blocks.1.attn"):
        for role in ("heads", "head_dim", "write"):  # write: through the window reverse, crop and roll
            assert groups.group(f"{block}:{role}").prunable, groups.group(f"{block}:{role}").reason
    table = "layers.0.blocks.1.attn.relative_position_bias_table"
    assert (table, 1) in {(m.param, m.dim) for m in groups.group("layers.0.blocks.1.attn:heads").members}
    x = torch.randn(2, 3, 56, 56)
    plan = KeepPlan.from_mapping(groups, {
        "layers.0.blocks.1.attn:heads": [1], "layers.1.blocks.0.attn:heads": [0, 3],
        "layers.0.blocks.1.attn:write": list(range(0, 32, 3)), "layers.1.blocks.1.attn:write": [5, 9],
    })  # fmt: skip
    slim = p3b_fx.slim(gm, plan, groups)
    assert slim.get_submodule("layers.0.blocks.1.attn.qkv").out_features == 3 * 16
    assert slim.get_submodule("layers.0.blocks.1.attn.proj").out_features == 11
    with torch.no_grad():
        out, dense = slim(x), gm(x)
        torch.testing.assert_close(out, p3b_fx.apply_masks(gm, plan, groups)(x), atol=1e-5, rtol=0)
        assert (out - dense).abs().max() > 1e-2
        for seed in range(2):
            rand = KeepPlan.random(groups, 0.5, seed=seed)
            slim_out, masked_out = p3b_fx.slim(gm, rand, groups)(x), p3b_fx.apply_masks(gm, rand, groups)(x)
            torch.testing.assert_close(slim_out, masked_out, atol=1e-5, rtol=0)
    for version in ("6.1", "4.6"):  # 4.6: the window padding's H % 7 folded, TensorRT 8.0 has no Mod
        report = export_onnx(slim, x, tmp_path / f"swin{version}.onnx", jetpack=jetpack(version))
        assert report.parity_max_abs_diff <= 1e-4
    # with a dynamic batch too: H % 7 does not depend on the batch, so it folds all the same
    report = export_onnx(slim, x, tmp_path / "swin-dyn.onnx", jetpack=jetpack("4.6"), dynamic_batch=True)
    assert "Mod" not in report.ops and report.parity_max_abs_diff <= 1e-4


def test_swin_v2_heads_follow_their_logit_scale_and_position_bias_mlp() -> None:
    """SwinV2's cosine attention scales each head by ``clamp(logit_scale).exp()`` and adds
    ``16 * sigmoid(cpb_mlp(coords))``: elementwise ops on a parameter chain, so the heads take the
    logit scale's rows and the bias MLP's last Linear with them. q and k are L2-normalised over
    head_dim, which zeros do not change, so head_dim is free; the post-norm (a LayerNorm over the
    written channels, before the residual add) is padded, so the written channels are free too, its
    weight and bias sliced with them."""
    model = timm.create_model("swinv2_tiny_window8_256", pretrained=False, img_size=64, embed_dim=32,
                              depths=(2, 2), num_heads=(2, 4), num_classes=5).eval()  # fmt: skip
    _random_weights(model, 0.3)
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    heads = groups.group("layers.1.blocks.1.attn:heads")
    assert heads.prunable, heads.reason
    params = {(m.param, m.dim) for m in heads.members}
    assert {
        ("layers.1.blocks.1.attn.logit_scale", 0),
        ("layers.1.blocks.1.attn.cpb_mlp.2.weight", 0),
    } <= params
    assert groups.group("layers.1.blocks.1.attn:head_dim").prunable
    write = groups.group("layers.1.blocks.1.attn:write")
    assert write.prunable
    assert ("layers.1.blocks.1.norm1.weight", 0) in {(m.param, m.dim) for m in write.members}
    x = torch.randn(2, 3, 64, 64)
    _assert_random_plans_exact(gm, groups, x)


@pytest.mark.parametrize(("name", "kwargs"), [("davit_tiny", {}), ("gcvit_xxtiny", {"img_size": 64})])
def test_window_reverse_on_the_write_path_keeps_the_written_channels_free(
    name: str, kwargs: dict[str, int]
) -> None:
    """DaViT's and GC ViT's window attention write back through their own ``window_reverse`` (as
    Swin's does): a layout function, so the written channels are prunable and slicing them is exact."""
    model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval()
    _random_weights(model, 0.3)
    gm = p3b_fx.trace(model, input_shape=(1, 3, 64, 64))
    groups = p3b_fx.find_groups(gm)
    windowed = [g for g in groups.groups if g.role == p3b_fx.Role.WRITE and g.block.endswith("attn")]
    assert windowed and all(g.prunable for g in windowed), [g.reason for g in windowed if not g.prunable]
    _assert_random_plans_exact(gm, groups, torch.randn(2, 3, 64, 64))


def test_q_and_k_head_dims_that_v_does_not_share_are_prunable() -> None:
    """TNT projects q and k with one linear and v with another: the q/k head dims are summed over in
    q · k and never reach the output projection. Pruning them slims the q/k projection alone, and
    is exact (q is zero there in the hard-masked model)."""
    model = timm.create_model("tnt_s_patch16_224", pretrained=False, depth=1).eval()
    _random_weights(model, 0.3)
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    head_dim = groups.group("blocks.0.attn_out:head_dim")
    assert head_dim.prunable and head_dim.size == 64, head_dim.reason
    assert {m.param for m in head_dim.members} == {"blocks.0.attn_out.qk.weight"}
    plan = KeepPlan.from_mapping(groups, {"blocks.0.attn_out:head_dim": list(range(0, 64, 2))})
    slim = _slim_exactly(gm, groups, plan, torch.randn(2, 3, 224, 224))
    assert slim.get_submodule("blocks.0.attn_out.qk").out_features == 2 * 6 * 32
    assert slim.get_submodule("blocks.0.attn_out.v").out_features == 384


def test_gc_vit_global_query_is_gathered_per_block(tmp_path: Path) -> None:
    """GC ViT's global blocks take q from a query computed once per stage from pooled features (no
    projection of the block's own), times the block's keys: q's heads and head dims are gathered
    at run time, so the block's heads and head dims are prunable; exact, also in ONNX."""
    model = timm.create_model("gcvit_xxtiny", pretrained=False, img_size=64).eval()
    _random_weights(model, 0.2)
    gm = p3b_fx.trace(model, input_shape=(1, 3, 64, 64))
    groups = p3b_fx.find_groups(gm)
    for name in ("stages.0.blocks.1.attn:heads", "stages.0.blocks.1.attn:head_dim"):
        assert groups.group(name).prunable, groups.group(name).reason
    keep = {"stages.0.blocks.1.attn:heads": [1], "stages.0.blocks.1.attn:head_dim": list(range(0, 32, 3))}
    x = torch.randn(2, 3, 64, 64)
    slim = _slim_exactly(gm, groups, KeepPlan.from_mapping(groups, keep), x)
    assert slim.get_submodule("stages.0.blocks.1.attn.qkv").out_features == 2 * 1 * 11
    assert any(is_operand_gather(n) for n in slim.graph.nodes)
    report = export_onnx(slim, x, tmp_path / "gcvit.onnx", jetpack=jetpack("6.1"))
    assert report.parity_max_abs_diff <= 1e-4


@pytest.mark.parametrize("fused", [True, False])
def test_grouped_query_attention_prunes_key_value_heads_with_their_query_heads(
    fused: bool, tmp_path: Path
) -> None:
    """Grouped-query attention (Sapiens2: timm's Eva with ``num_kv_heads``) repeats each key/value
    head for the query heads that share it (``repeat_interleave``). The query heads split into (key/
    value heads, query heads per key/value head): the first factor is pruned, taking k's and v's
    head with all its query heads; the second is fixed, so the repeat count stays valid. q/k head
    dims (rotary pairs) and v's head dims are pruned too, through SDPA and through ``q @ kᵀ``; the
    slim model equals the hard-masked one, also in ONNX. The first block has full attention."""
    model = sapiens2()
    model.blocks[1].attn.fused_attn = fused
    _random_weights(model, 0.5)
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    block = "blocks.1.attn"
    assert {n for n in gm.graph.nodes if "repeat_interleave" in str(n.target)}
    kv_heads, per_kv = groups.group(f"{block}:heads"), groups.group(f"{block}:heads'")
    assert (kv_heads.size, kv_heads.prunable) == (2, True), kv_heads.reason
    assert per_kv.size == 2 and not per_kv.prunable and "grouped-query attention" in per_kv.reason
    head_dim, v_dim = groups.group(f"{block}:head_dim"), groups.group(f"{block}:head_dim'")
    assert (head_dim.size, v_dim.size) == (8, 16) and head_dim.prunable and v_dim.prunable
    assert groups.group("blocks.0.attn:heads").size == 4  # full attention: every head on its own
    plan = KeepPlan.from_mapping(
        groups,
        {f"{block}:heads": [1], f"{block}:head_dim": [0, 3, 4, 7], v_dim.name: list(range(0, 16, 2))},
    )
    x = torch.randn(2, 3, 32, 32)
    slim = _slim_exactly(gm, groups, plan, x)
    attn = slim.get_submodule(block)
    widths = (
        attn.q_proj.out_features,
        attn.k_proj.out_features,
        attn.v_proj.out_features,
        attn.proj.in_features,
    )
    assert widths == (1 * 2 * 8, 1 * 8, 1 * 8, 1 * 2 * 8)  # kv heads × query heads per kv head × dims
    _assert_random_plans_exact(gm, groups, x)
    report = export_onnx(slim, x, tmp_path / "gqa.onnx", jetpack=jetpack("6.1"), atol=1e-4)
    assert report.parity_max_abs_diff <= 1e-4


@pytest.mark.slow
def test_the_masked_grouped_query_model_has_no_graph_break() -> None:
    """``--torch-compile`` on Sapiens2: the masked, tapped and folded model with a grouped-query
    block (its ``repeat_interleave`` included) traces into one graph."""
    gm = p3b_fx.trace(sapiens2().train())
    groups = p3b_fx.find_groups(gm)
    assert groups.group("blocks.1.attn:heads").prunable
    assert _graph_breaks(gm, groups, torch.randn(2, 3, 32, 32)) == []


def test_sam2_hiera_prunes_pooled_query_heads_and_windowed_writes(tmp_path: Path) -> None:
    """SAM 2's image encoder (Hiera): at a stage change a block max-pools its queries over the token
    grid (``q_pool``, an ``nn.MaxPool2d`` per channel), and windowed blocks unpartition their output
    (reading the batch from ``windows.shape[0]``, permuting positions) before the residual add. Both
    keep their groups: heads and head dims of the pooling blocks, written channels of the windowed
    ones. Slim equals hard-masked, also in ONNX."""
    model = timm.create_model("sam2_hiera_tiny", pretrained=False, embed_dim=32, num_heads=1,
                              stages=(1, 2, 2, 1), global_att_blocks=(2,), window_spec=(8, 4, 4, 2),
                              num_classes=5).eval()  # fmt: skip
    assert isinstance(model.blocks[1].attn.q_pool, torch.nn.MaxPool2d) and model.blocks[0].window_size[0] > 0
    _random_weights(model, 0.3)
    gm = p3b_fx.trace(model, input_shape=(1, 3, 64, 64))
    groups = p3b_fx.find_groups(gm)
    for name in (
        "blocks.1.attn:heads",
        "blocks.1.attn:head_dim",
        "blocks.0.attn:write",
        "blocks.3.attn:heads",
    ):
        assert groups.group(name).prunable, (name, groups.group(name).reason)
    x = torch.randn(2, 3, 64, 64)
    _assert_random_plans_exact(gm, groups, x)
    plan = KeepPlan.from_mapping(
        groups, {"blocks.1.attn:heads": [1], "blocks.0.attn:write": list(range(0, 32, 2))}
    )
    slim = _slim_exactly(gm, groups, plan, x)
    assert slim.get_submodule("blocks.1.attn").qkv.out_features == 3 * 32  # one head of 32 dims
    report = export_onnx(slim, x, tmp_path / "sam2.onnx", jetpack=jetpack("6.1"), atol=1e-4)
    assert report.parity_max_abs_diff <= 1e-4


@pytest.mark.parametrize(
    ("name", "block"),
    [("edgenext_xx_small", "stages.0.blocks.0.mlp"), ("fastvit_sa12", "stages.3.blocks.0.token_mixer")],
)
def test_channels_written_back_in_n_c_h_w_are_prunable(name: str, block: str, tmp_path: Path) -> None:
    """Blocks whose residual stream is (N, C, H, W): EdgeNeXt's ConvNeXt blocks permute their MLP
    output back from (N, H, W, C), FastViT's attention transposes and reshapes (N, H·W, C) into
    (N, C, H, W) and scales it by a (C, 1, 1) layer scale. Their written channels are a group (the
    layer scale sliced with it), written back along axis -3; slim equals hard-masked, also in ONNX,
    where that write-back is lowered to pad, gather and add along the same axis."""
    model = timm.create_model(name, pretrained=False, num_classes=5).eval()
    _random_weights(model, 0.3)
    gm = p3b_fx.trace(model, input_shape=(1, 3, 64, 64))
    groups = p3b_fx.find_groups(gm)
    write = groups.group(f"{block}:write")
    assert write.prunable, write.reason
    assert groups.block(block).write_dim == -3
    x = torch.randn(2, 3, 64, 64)
    plan = KeepPlan.from_mapping(groups, {write.name: list(range(0, write.size, 2))})
    slim = _slim_exactly(gm, groups, plan, x)
    adds = [n for n in slim.graph.nodes if n.target is torch.index_add]
    assert adds and all(n.args[1] == -3 for n in adds)
    with torch.no_grad():
        atol = 1e-5 * max(float(slim(x).abs().max()), 1.0)  # FastViT's random-weight outputs reach 1e6
    report = export_onnx(slim, x, tmp_path / "m.onnx", jetpack=jetpack("4.6"), atol=atol)
    assert report.parity_max_abs_diff <= atol
    # the slim model is a model like any other: its write-back is a residual add. In float64: in
    # float32 the two sides (1×1 convolutions in one, linears in the other) differ by rounding of
    # outputs near 1e5, which came within a factor 2 of ``atol`` for some inputs
    again = p3b_fx.trace(slim.double())
    regrouped = p3b_fx.find_groups(again)
    assert regrouped.group(write.name).prunable and regrouped.block(block).write_dim == -3
    plan = KeepPlan.random(regrouped, 0.75, seed=1)
    with torch.no_grad():
        x64 = x.double()
        twice, masked = (
            p3b_fx.slim(again, plan, regrouped)(x64),
            p3b_fx.apply_masks(again, plan, regrouped)(x64),
        )
    torch.testing.assert_close(twice, masked, atol=atol, rtol=0)


@pytest.mark.parametrize("fused", [True, False])
def test_sam_vit_prunes_heads_folded_into_the_batch_and_its_relative_position_tables(
    fused: bool, tmp_path: Path
) -> None:
    """SAM's image encoder (``samvit``) folds the heads into the batch (``(B·heads, N, d)``) and adds
    a decomposed relative-position bias computed from q (``einsum`` with per-head-dim tables,
    ``rel_pos_h`` / ``rel_pos_w``) to the scores. Heads and head dims are groups in both windowed
    and global blocks; the tables are sliced with the head dims; the slim graph scales its
    run-time ``B·heads`` by kept / dense, so it is exact at a batch other than the traced one, in
    eager (fused or not) and in ONNX with a dynamic batch, and for JetPack 4.6 (no ``Einsum`` in
    TensorRT 8.0: decomposed into matmuls); the masked model compiles whole."""
    model = timm.create_model("samvit_base_patch16", pretrained=False, img_size=64, embed_dim=64, depth=2,
                              num_heads=4, window_size=2, global_attn_indexes=(1,), neck_chans=16,
                              num_classes=5).eval()  # fmt: skip
    for block in model.blocks:
        block.attn.fused_attn = fused
    _random_weights(model, 0.3)
    gm = p3b_fx.trace(model, input_shape=(1, 3, 64, 64))
    groups = p3b_fx.find_groups(gm)
    for block in ("blocks.0.attn", "blocks.1.attn"):  # windowed, global
        for role in ("heads", "head_dim"):
            assert groups.group(f"{block}:{role}").prunable, groups.group(f"{block}:{role}").reason
    assert groups.unsupported == ()  # the window padding's H + pad_h is a number, not a residual add
    tables = {m.param for m in groups.group("blocks.1.attn:head_dim").members}
    assert {"blocks.1.attn.rel_pos_h", "blocks.1.attn.rel_pos_w"} <= tables
    x = torch.randn(3, 3, 64, 64)  # traced at batch 2
    _assert_random_plans_exact(gm, groups, x)
    plan = KeepPlan.from_mapping(
        groups, {"blocks.1.attn:heads": [0, 3], "blocks.1.attn:head_dim": list(range(0, 16, 2))}
    )
    slim = _slim_exactly(gm, groups, plan, x)
    attn = slim.get_submodule("blocks.1.attn")
    assert attn.qkv.out_features == 3 * 2 * 8 and tuple(attn.rel_pos_h.shape) == (7, 8)
    # the bias's two einsums count as FLOPs (per sample: heads × h × w × head dims × k), and the
    # slim model's own count is what the plan predicted
    terms = [{g for _, g in t.factors} for t in groups.block("blocks.1.attn").flops if t.coef == 1]
    assert len(terms) == (2 if fused else 4)  # unfused: q @ kᵀ and attn @ v are matmuls of their own
    assert all({"blocks.1.attn:heads", "blocks.1.attn:head_dim"} <= t for t in terms)
    assert latency.flops_of(slim, (3, 64, 64)) == plan.predicted_flops(groups)
    report = export_onnx(
        slim, x, tmp_path / "sam.onnx", jetpack=jetpack("6.1"), atol=1e-4, dynamic_batch=True
    )
    assert report.parity_max_abs_diff <= 1e-4
    old = export_onnx(slim, x, tmp_path / "sam46.onnx", jetpack=jetpack("4.6"), atol=1e-4)  # no Einsum there
    assert "Einsum" not in old.ops and "Einsum" in report.ops
    if fused:
        train_gm = p3b_fx.trace(model.train(), input_shape=(1, 3, 64, 64))
        assert _graph_breaks(train_gm, p3b_fx.find_groups(train_gm), x) == []


def test_mvitv2_pooled_attention_prunes_heads_and_head_dims(tmp_path: Path) -> None:
    """MViTv2 pools each head's q, k and v with a depthwise convolution over ``(B·heads, d, H, W)``
    (``reshape_pre_pool`` / ``reshape_post_pool``, traced into), normalises over the head dims and
    adds a spatial relative-position bias per head dim (``cal_rel_pos_type``, a leaf). Its heads and
    head dims are groups, the pooling filters, norms and ``rel_pos_h`` / ``rel_pos_w`` sliced with
    them; the pooled grid size that the next block reads leaves the block without fixing anything.
    Slim equals hard-masked, also in ONNX."""
    model = timm.create_model("mvitv2_tiny", pretrained=False, img_size=64, num_classes=5).eval()
    _random_weights(model, 0.3)
    gm = p3b_fx.trace(model, input_shape=(1, 3, 64, 64))
    groups = p3b_fx.find_groups(gm)
    transitions = [u for u in groups.unsupported if "shortcut is projected" in u]
    assert len(transitions) == 3  # stages 1-3 open with a projected, pooled shortcut: said, not skipped
    block = "stages.1.blocks.1.attn"  # a block with pooled k and v inside a stage
    for role in ("heads", "head_dim"):
        assert groups.group(f"{block}:{role}").prunable, groups.group(f"{block}:{role}").reason
    members = {m.param for m in groups.group(f"{block}:head_dim").members}
    assert {
        f"{block}.rel_pos_h",
        f"{block}.rel_pos_w",
        f"{block}.pool_k.weight",
        f"{block}.norm_k.weight",
    } <= members
    x = torch.randn(3, 3, 64, 64)
    _assert_random_plans_exact(gm, groups, x)
    plan = KeepPlan.from_mapping(groups, {f"{block}:heads": [1], f"{block}:head_dim": list(range(0, 48, 2))})
    slim = _slim_exactly(gm, groups, plan, x)
    assert slim.get_submodule(f"{block}.qkv").out_features == 3 * 24
    report = export_onnx(slim, x, tmp_path / "mvit.onnx", jetpack=jetpack("6.1"), atol=1e-4)
    assert report.parity_max_abs_diff <= 1e-4
    # TensorRT 8.0 has neither the Einsum nor the ScatterND of timm's in-place bias write
    old = export_onnx(
        slim, x, tmp_path / "mvit46.onnx", jetpack=jetpack("4.6"), atol=1e-4, dynamic_batch=True
    )
    assert not {"Einsum", "ScatterND"} & set(old.ops) and old.parity_max_abs_diff <= 1e-4


def _slim_and_export_exactly(gm: torch.fx.GraphModule, groups: p3b_fx.GroupSet, tmp_path: Path) -> None:
    """A random plan keeping half of every group at 64 px: slim equals hard-masked and moves the
    output far more than that, and its ONNX file for JetPack 4.6 matches it, each within 1e-5 of
    the output's size (random-weight hybrids reach large activations)."""
    x = torch.randn(2, 3, 64, 64)
    plan = KeepPlan.random(groups, 0.5, seed=0)
    slim = p3b_fx.slim(gm, plan, groups)
    with torch.no_grad():
        out, dense = slim(x), gm(x)
        atol = 1e-5 * max(float(dense.abs().max()), 1.0)
        torch.testing.assert_close(out, p3b_fx.apply_masks(gm, plan, groups)(x), atol=atol, rtol=0)
    assert (out - dense).abs().max() > 1e2 * atol
    report = export_onnx(slim, x, tmp_path / "m.onnx", jetpack=jetpack("4.6"), atol=atol)
    assert report.parity_max_abs_diff <= atol


def test_swiftformer_additive_attention_prunes_whole_and_exports(tmp_path: Path) -> None:
    """SwiftFormer's additive attention: a residual add inside its branch (``proj(…) + query``), a
    linear between its first and last (``proj``), a learnt vector contracted with the queries and a
    sum over the tokens. Every group of its four blocks is prunable; slim equals hard-masked, and so
    does the ONNX export for JetPack 4.6."""
    model = timm.create_model("swiftformer_xs", pretrained=False, num_classes=5).eval()
    _random_weights(model, 0.3)
    gm = p3b_fx.trace(model, input_shape=(1, 3, 64, 64))
    groups = p3b_fx.find_groups(gm)
    attentions = [b for b in groups.blocks if b.kind is p3b_fx.BlockKind.ATTENTION or b.mids]
    assert len(groups.blocks) == 24 and len(attentions) == 4  # and 20 convolution blocks (1×1 convs)
    assert all(g.prunable for g in groups), [g.reason for g in groups if not g.prunable]
    assert all(len(b.mids) == 1 for b in attentions)
    _slim_and_export_exactly(gm, groups, tmp_path)


def test_volo_outlook_attention_prunes_heads_and_value_head_dims(tmp_path: Path) -> None:
    """VOLO's outlook attention unfolds v's k × k neighbourhoods (``nn.Unfold``: channel c's entries
    are ``c·k·k + j``), weights them by attention computed from a pooled copy of the input, and folds
    them back (``F.fold``). The channels keep their groups through unfold and fold, the kernel
    positions being a factor no group runs along: its heads and v's head dims are prunable (they
    were fixed), and v's head dims are per-head dims for P3B. Slim equals hard-masked, also in ONNX
    for JetPack 4.6."""
    model = timm.create_model("volo_d1_224", pretrained=False, num_classes=5, img_size=64).eval()
    _random_weights(model, 0.3)
    gm = p3b_fx.trace(model, input_shape=(1, 3, 64, 64))
    groups = p3b_fx.find_groups(gm)
    block = "network.0.0.attn"
    heads, v_dims = groups.group(f"{block}:heads"), groups.group(f"{block}:head_dim")
    assert (heads.size, heads.prunable) == (6, True), heads.reason
    assert (v_dims.size, v_dims.prunable) == (32, True), v_dims.reason
    kernel_positions = groups.group(f"{block}:head_dim'")  # the attention's rows, summed by fold
    assert not kernel_positions.prunable and "folded as kernel positions" in kernel_positions.reason
    assert v_dims.name in {s.name for s in train.gate_specs(groups, "reference", 1)[block]}
    x = torch.randn(2, 3, 64, 64)
    _assert_random_plans_exact(gm, groups, x)
    slim = _slim_exactly(gm, groups, KeepPlan.random(groups, 0.5, seed=3), x)
    report = export_onnx(slim, x, tmp_path / "volo.onnx", jetpack=jetpack("4.6"), atol=1e-4)
    assert report.parity_max_abs_diff <= 1e-4  # its fold as a transposed convolution (no Col2Im)


def test_caformer_scaled_residuals_and_star_relu_prune_and_export(tmp_path: Path) -> None:
    """CAFormer (MetaFormer): its residual adds scale the stream (``res_scale``) or pass it through
    an ``nn.Identity``, its MLPs square a ReLU (StarReLU), and its streams are (N, C, H, W). The
    attention and MLP blocks of its last two stages, and the separable-convolution mixers and 1×1
    convolution MLPs of its first two, are blocks with every group but the q/k/v selector prunable;
    slim equals hard-masked, also in ONNX for JetPack 4.6."""
    model = timm.create_model("caformer_s18", pretrained=False, num_classes=5).eval()
    _random_weights(model, 0.1)
    gm = p3b_fx.trace(model, input_shape=(1, 3, 64, 64))
    groups = p3b_fx.find_groups(gm)
    assert len(groups.blocks) == 36
    assert all(g.prunable for g in groups if g.role is not Role.SELECT)
    _slim_and_export_exactly(gm, groups, tmp_path)


@pytest.mark.parametrize("depth", [1, 3])
def test_a_shared_relative_position_mlp_is_no_first_linear(depth: int) -> None:
    """vit_srelpos computes one relative-position bias MLP from constants before the blocks and
    hands its output to every attention. With one block that MLP lies between the stream and the
    attention in the graph, and its first linear was taken for the block's: the read group was the
    MLP's 2 coordinates, the heads were never tracked, and its hidden layer (a linear between the
    first and the last) made the plan's parameter count wrong. The first linear is now the first
    that reads the stream; the MLP's last linear is sliced with the heads (one block), or, read by
    several blocks, the first attention is kept whole and the others gather the bias. Slim equals
    hard-masked with the plan's parameter count."""
    model = timm.create_model("vit_srelpos_small_patch16_224", pretrained=False, depth=depth, img_size=64,
                              num_classes=5).eval()  # fmt: skip
    _random_weights(model, 0.3)
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    attentions = [b for b in groups.blocks if b.kind is p3b_fx.BlockKind.ATTENTION]
    assert all(b.read_node.endswith("attn_qkv") for b in attentions)
    assert groups.group(f"{attentions[0].name}:heads").prunable
    x = torch.randn(2, 3, 64, 64)
    plan = KeepPlan.random(groups, 0.5, seed=1)
    slim = _slim_exactly(gm, groups, plan, x)
    assert sum(p.numel() for p in slim.parameters()) == plan.predicted_params(groups)
