"""FunctionalLinearPass: BEiT's and EVA-02's qkv, ``F.linear(x, W, cat(q_bias, k_bias, v_bias))``, as an
nn.Linear."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import p3b_fx
from p3b_fx import KeepPlan, train
from p3b_fx.config import PruneConfig
from p3b_fx.export.jetpack import jetpack
from p3b_fx.export.onnx import export_onnx
from passes.functional_linear import FunctionalLinearPass
from tests.conftest import tiny_vit

BEIT = {"name": "beit_base_patch16_224", "img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2,
        "num_heads": 4, "num_classes": 5}  # fmt: skip


def _randomise(model: nn.Module) -> nn.Module:
    """timm's BEiT init leaves each branch tiny next to the stream: larger weights, so a pruned
    attention shows in the output (and a wrong slice would too)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "attn" in name or "mlp" in name or name.startswith("head"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def test_beit_qkv_becomes_a_linear_of_the_graph_alone() -> None:
    model = _randomise(tiny_vit(**BEIT))
    q_bias = model.blocks[0].attn.q_bias
    gm = p3b_fx.trace(model)
    qkv = gm.get_submodule("blocks.0.attn.qkv")
    assert isinstance(qkv, nn.Linear) and qkv.bias is not None
    assert qkv.weight is model.blocks[0].attn.qkv.weight  # shared, as every traced weight is
    torch.testing.assert_close(qkv.bias.detach()[:48], q_bias.detach(), rtol=0, atol=0)
    assert not any(n.target is F.linear for n in gm.graph.nodes)
    # the traced model is not touched: its qkv has no bias, its q/v biases stay its parameters
    assert model.blocks[0].attn.qkv.bias is None and model.blocks[0].attn.q_bias is q_bias
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


def test_beit_attention_is_a_block_and_slims_exactly() -> None:
    model = _randomise(tiny_vit(**BEIT))
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    assert [b.name for b in groups.blocks] == [
        "blocks.0.attn",
        "blocks.0.mlp",
        "blocks.1.attn",
        "blocks.1.mlp",
    ]
    assert groups.group("blocks.0.attn:read").prunable and groups.group("blocks.0.attn:write").prunable
    plan = KeepPlan.random(groups, 0.5, 1)
    slim = p3b_fx.slim(gm, plan, groups)
    assert slim.get_submodule("blocks.0.attn.qkv").weight.shape[1] < 48  # the attention lost channels
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out, dense = slim(x), gm(x)
        torch.testing.assert_close(out, p3b_fx.apply_masks(gm, plan, groups)(x), atol=1e-5, rtol=0)
    assert (out - dense).abs().max() > 1e-3  # the check above compares outputs that pruning moved


@pytest.mark.parametrize("fused", [True, False])
def test_beit_heads_are_pruned_with_their_relative_position_bias(fused: bool, tmp_path: Path) -> None:
    """BEiT's per-head relative-position bias reaches SDPA as an attention mask computed from the
    table parameter (``table[index].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)``): the head
    axis is traced back to the table's dim 1, which the slim model slices with the heads."""
    model = _randomise(tiny_vit(**BEIT))
    with torch.no_grad():  # per-head biases far apart, so a head's bias on another head would show
        for block in model.blocks:
            table = block.attn.relative_position_bias_table
            table.copy_(torch.randn_like(table) * 3)
            block.attn.fused_attn = fused  # SDPA's attn_mask, or scores + bias before the softmax
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    heads = groups.group("blocks.0.attn:heads")
    assert heads.prunable, heads.reason
    assert ("blocks.0.attn.relative_position_bias_table", 1) in {(m.param, m.dim) for m in heads.members}
    plan = KeepPlan.from_mapping(groups, {"blocks.0.attn:heads": [0, 2], "blocks.1.attn:heads": [3]})
    slim = p3b_fx.slim(gm, plan, groups)
    table = slim.get_submodule("blocks.0.attn").relative_position_bias_table
    assert table.shape[1] == 2
    assert slim.get_submodule("blocks.1.attn").relative_position_bias_table.shape[1] == 1
    torch.testing.assert_close(table, model.blocks[0].attn.relative_position_bias_table[:, [0, 2]])
    assert slim.get_submodule("blocks.0.attn.qkv").weight.shape[0] == 3 * 2 * 12
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out, dense = slim(x), gm(x)
        torch.testing.assert_close(out, p3b_fx.apply_masks(gm, plan, groups)(x), atol=1e-5, rtol=0)
    assert (out - dense).abs().max() > 1e-3
    for version in ("6.1", "4.6"):  # opset 17 and opset 13 without fused attention
        report = export_onnx(slim, x, tmp_path / f"beit-{version}.onnx", jetpack=jetpack(version))
        assert report.parity_max_abs_diff <= 1e-4


@pytest.mark.parametrize("granularity", ["reference", "deploy"])
def test_p3b_prunes_beit_attention_end_to_end(tmp_path: Path, granularity: str) -> None:
    """P3B prunes BEiT's attention: per channel, or (deploy) by whole heads, which the relative-
    position table follows."""
    kwargs = {k: v for k, v in BEIT.items() if k not in ("name", "num_classes")}
    cfg = PruneConfig(model="beit_base_patch16_224", model_kwargs=kwargs, data="digits", num_classes=10,
                      epochs=2, batch_size=32, lr=4e-3, probe="patch_linear", max_steps_per_epoch=5,
                      updates_per_epoch=2, out=str(tmp_path / "run"), device="cpu", prune_ratio=0.5,
                      seed=3, granularity=granularity)  # fmt: skip
    report = train.run(cfg)
    assert report["budget_met"] and report["slim_max_abs_diff"] <= 1e-5
    assert report["keep_ratios"]["blocks.0.attn"] < 1.0 or report["keep_ratios"]["blocks.1.attn"] < 1.0
    if granularity == "deploy":
        keep = KeepPlan.load(report["plan"]).as_dict()
        assert any(len(keep.get(f"blocks.{i}.attn:heads", range(4))) < 4 for i in (0, 1))


def test_p3b_deploy_prunes_eva02_heads_and_swiglu_hidden_end_to_end(tmp_path: Path) -> None:
    """Deploy granularity on EVA-02 (whole heads, head_dim kept whole for fused attention, and SwiGLU
    hidden neurons in pairs): P3B meets the budget, and the slim model equals the hard-masked one."""
    kwargs = {"img_size": 16, "patch_size": 4, "depth": 1}
    cfg = PruneConfig(model="eva02_tiny_patch14_224", model_kwargs=kwargs, data="digits", num_classes=10,
                      epochs=2, batch_size=32, lr=4e-3, probe="patch_linear", max_steps_per_epoch=5,
                      updates_per_epoch=2, out=str(tmp_path / "run"), device="cpu", prune_ratio=0.3,
                      seed=3, granularity="deploy")  # fmt: skip
    report = train.run(cfg)
    assert report["budget_met"] and report["slim_max_abs_diff"] <= 1e-5
    keep = KeepPlan.load(report["plan"]).as_dict()
    assert len(keep["blocks.0.mlp:hidden"]) < 512
    assert "blocks.0.attn:heads" in keep and "blocks.0.attn:head_dim" not in keep


def _graph(bias_parts: int, dim: int = 0) -> fx.GraphModule:
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 6, bias=False)
            self.a, self.b = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            bias = torch.cat((self.a, self.b), dim=dim) if bias_parts == 2 else self.a
            return F.linear(x, self.proj.weight, bias)

    return fx.symbolic_trace(Holder())


def test_only_a_bias_that_fits_the_output_is_folded_in() -> None:
    assert FunctionalLinearPass()(_graph(2)).modified
    assert not FunctionalLinearPass()(_graph(1)).modified  # 3 bias entries for 6 outputs


@pytest.mark.parametrize("dim", [0, -1])
def test_the_rewrite_computes_the_same(dim: int) -> None:
    gm = _graph(2, dim)
    x = torch.randn(5, 4)
    before = gm(x)
    FunctionalLinearPass()(gm)
    assert torch.equal(gm(x), before)
    assert isinstance(gm.get_submodule("proj"), nn.Linear)


def test_eva02_attention_is_a_block_and_slims_exactly() -> None:
    """EVA-02 builds qkv the same way, with rotary embeddings after it (tests/test_vit_family.py). Its
    SwiGLU MLP (timm's GluMlp: fc1's output chunked into value and gate) prunes hidden neuron i of
    both halves together: fc1 keeps 2 × the kept neurons, fc2 the kept neurons."""
    model = _randomise(tiny_vit(name="eva02_tiny_patch14_224", img_size=28, patch_size=14, depth=2))
    gm = p3b_fx.trace(model)
    assert model.blocks[0].attn.qkv.bias is None  # not touched
    groups = p3b_fx.find_groups(gm)
    assert {"blocks.0.attn", "blocks.1.attn"} <= {b.name for b in groups.blocks}
    assert groups.group("blocks.0.attn:read").prunable
    hidden = groups.group("blocks.0.mlp:hidden")
    assert hidden.prunable and hidden.size * 2 == model.blocks[0].mlp.fc1.out_features
    assert not groups.group("blocks.0.mlp:select").prunable  # value / gate halves
    plan = KeepPlan.random(groups, 0.5, 0)
    kept = len(plan.as_dict()["blocks.0.mlp:hidden"])
    slim_fc1 = p3b_fx.slim(gm, plan, groups).get_submodule("blocks.0.mlp.fc1")
    assert kept < hidden.size and slim_fc1.out_features == 2 * kept
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
        out = p3b_fx.slim(gm, plan, groups)(x)
        torch.testing.assert_close(out, p3b_fx.apply_masks(gm, plan, groups)(x), atol=1e-5, rtol=0)
        assert (out - gm(x)).abs().max() > 1e-3
