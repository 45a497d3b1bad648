"""slim(gm, plan): equals the hard-masked model, exact parameter count, structure, idempotence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import fx

import p3b_fx
from p3b_fx import KeepPlan
from passes.rewrite_slim import slim_passes
from tests.conftest import assert_loads_with_torch_alone, set_fused, tiny_vit
from tests.test_trace import MODEL_LIST, _real, model_id


def _check_invariant(
    model: torch.nn.Module, ratio: float, seed: int, shape: tuple[int, ...]
) -> fx.GraphModule:
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    plan = KeepPlan.random(groups, ratio, seed)
    masked, slim = p3b_fx.apply_masks(gm, plan, groups), p3b_fx.slim(gm, plan, groups)
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(slim(x), masked(x), atol=1e-5, rtol=0)
    assert sum(p.numel() for p in slim.parameters()) == plan.predicted_params(groups)
    return slim


@pytest.mark.parametrize("case", MODEL_LIST, ids=[model_id(c) for c in MODEL_LIST])
@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "unfused"])
def test_slim_equals_masked_on_the_model_list(case: tuple[str, dict[str, object]], fused: bool) -> None:
    name, kw = case
    kw = {"img_size": 64, "patch_size": 16, **_real(name), **kw, "depth": 2}
    _check_invariant(set_fused(tiny_vit(name=name, **kw), fused), 0.4, 0, (2, 3, 64, 64))


def test_slim_shares_no_tensor_with_its_input() -> None:
    gm = p3b_fx.trace(tiny_vit())
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    groups = p3b_fx.find_groups(gm)
    slim = p3b_fx.slim(gm, KeepPlan.random(groups, 0.5, 7), groups)
    ptrs = {t.data_ptr() for t in (*gm.parameters(), *gm.buffers())}
    assert not any(t.data_ptr() in ptrs for t in (*slim.parameters(), *slim.buffers()))
    assert all(torch.equal(v, gm.state_dict()[k]) for k, v in before.items())


def test_slim_shapes_follow_the_plan() -> None:
    gm = p3b_fx.trace(tiny_vit(depth=1))
    groups = p3b_fx.find_groups(gm)
    keep = {"blocks.0.attn:heads": [0, 3], "blocks.0.attn:head_dim": list(range(8)),
            "blocks.0.attn:read": list(range(0, 48, 2)), "blocks.0.attn:write": list(range(40)),
            "blocks.0.mlp:hidden": list(range(64))}  # fmt: skip
    slim = p3b_fx.slim(gm, KeepPlan.from_mapping(groups, keep), groups)
    assert tuple(slim.get_submodule("blocks.0.attn.qkv").weight.shape) == (3 * 2 * 8, 24)
    assert tuple(slim.get_submodule("blocks.0.attn.proj").weight.shape) == (40, 16)
    assert tuple(slim.get_submodule("blocks.0.mlp.fc1").weight.shape) == (64, 48)
    targets = [n.target for n in slim.graph.nodes]
    assert torch.index_select in targets and torch.index_add in targets
    reshapes = [n for n in slim.graph.nodes if n.target == "reshape"]
    assert any(2 in n.args and 8 in n.args for n in reshapes)  # heads and head_dim rewritten


def test_empty_block_is_removed_entirely() -> None:
    gm = p3b_fx.trace(tiny_vit(depth=2))
    groups = p3b_fx.find_groups(gm)
    plan = KeepPlan.from_mapping(groups, {"blocks.1.mlp:hidden": []})
    slim = p3b_fx.slim(gm, plan, groups)
    assert not any(str(n.target).startswith("blocks.1.mlp") for n in slim.graph.nodes)
    assert not any(name.startswith("blocks.1.mlp") for name, _ in slim.named_parameters())
    assert not any(name.startswith("blocks.1.norm2") for name, _ in slim.named_parameters())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(slim(x), p3b_fx.apply_masks(gm, plan, groups)(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("index", range(5))
def test_each_slim_pass_is_idempotent(index: int) -> None:
    gm = p3b_fx.trace(tiny_vit(depth=2))
    groups = p3b_fx.find_groups(gm)
    plan = KeepPlan.from_mapping(
        groups, {**KeepPlan.random(groups, 0.5, 1).as_dict(), "blocks.1.mlp:hidden": []}
    )
    passes = slim_passes(groups, plan)
    for p in passes[: index + 1]:
        gm = p(gm).graph_module
    again = passes[index](gm)
    assert again.modified is False


def test_slim_saves_and_loads_with_torch_alone(tmp_path: Path) -> None:
    gm = p3b_fx.trace(tiny_vit())
    groups = p3b_fx.find_groups(gm)
    slim = p3b_fx.slim(gm, KeepPlan.random(groups, 0.5, 2), groups)
    x = torch.randn(2, 3, 32, 32)
    assert_loads_with_torch_alone(slim, x, tmp_path)


def test_slim_retraces_to_the_same_outputs() -> None:
    gm = p3b_fx.trace(tiny_vit())
    groups = p3b_fx.find_groups(gm)
    slim = p3b_fx.slim(gm, KeepPlan.random(groups, 0.3, 4), groups)
    again = p3b_fx.trace(slim)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(again(x), slim(x))
    regrouped = p3b_fx.find_groups(again)
    assert regrouped.params_total == sum(p.numel() for p in slim.parameters())


@pytest.mark.onnx
@pytest.mark.parametrize("version", ["4.6", "6.1"])
def test_slim_exports_to_onnx_with_parity(tmp_path: Path, version: str) -> None:
    from p3b_fx.export.jetpack import jetpack  # noqa: PLC0415 - onnx tests only
    from p3b_fx.export.onnx import export_onnx  # noqa: PLC0415

    gm = p3b_fx.trace(tiny_vit())
    groups = p3b_fx.find_groups(gm)
    slim = p3b_fx.slim(gm, KeepPlan.random(groups, 0.5, 5), groups).eval()
    report = export_onnx(slim, torch.randn(1, 3, 32, 32), tmp_path / "m.onnx", jetpack=jetpack(version))
    assert report.parity_max_abs_diff <= 1e-4 and (tmp_path / "m.onnx").exists()


def test_every_pass_keeps_a_model_on_its_own_device() -> None:
    """A model on another device than the CPU (here "meta", which runs shapes only) stays wholly there.

    Stands in on this CPU-only machine for CUDA: the passes add tensors (the shape-propagation input,
    mask gates, index buffers, sliced weights) and once made them all on the CPU, which broke every
    run with ``--device cuda`` (found by tools/device_check.sh on an H200). Meta refuses to mix with
    CPU tensors in elementwise ops as CUDA does, so a forward pass checks the graph's arithmetic too.
    (Not the ONNX lowering: it reads index values, which meta tensors lack; export runs on the CPU.)
    """
    meta = torch.device("meta")
    gm = p3b_fx.trace(tiny_vit(depth=2).to(meta), input_shape=(1, 3, 32, 32))
    groups = p3b_fx.find_groups(gm)
    masked, _ = p3b_fx.insert_masks(gm, groups, share_parameters=True)
    p3b_fx.fold_masks(masked)
    slim = p3b_fx.slim(gm, KeepPlan.random(groups, 0.6, 1), groups)
    x = torch.empty(2, 3, 32, 32, device=meta)
    for name, net in {"masked": masked, "slim": slim}.items():
        where = {k: t.device for k, t in (*net.named_parameters(), *net.named_buffers())}
        assert all(d == meta for d in where.values()), (name, {k: d for k, d in where.items() if d != meta})
        with torch.no_grad():
            assert net(x).shape == gm(x).shape, name
