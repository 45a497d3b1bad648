"""Shared fixtures: tiny timm ViTs built offline, and auto-skips for optional back ends."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from torch import nn

from p3b_fx.core.groups import GroupSet
from p3b_fx.core.meta import POINTWISE_CONVS
from p3b_fx.core.plan import KeepPlan

torch.set_num_threads(1)


def tiny_vit(**overrides: Any) -> nn.Module:
    """A small timm VisionTransformer (pretrained=False) in eval mode; kwargs override."""
    kw: dict[str, Any] = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=5)
    kw.update(overrides)
    name = kw.pop("name", "vit_tiny_patch16_224")
    model = timm.create_model(name, pretrained=False, **kw).eval()
    _randomise_layer_scale(model)
    return model


def sapiens2() -> nn.Module:
    """A small Sapiens2 (timm's Eva: RoPE, qk RMSNorm, SwiGLU, RMSNorm) in eval mode: block 0 with
    full attention over 4 heads, block 1 with grouped-query attention (2 key/value heads)."""
    return timm.create_model("vit_base_patch16_sapiens2", pretrained=False, depth=2, num_kv_heads=(4, 2),
                             img_size=32, patch_size=8, embed_dim=64, num_heads=4).eval()  # fmt: skip


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages ``model(x)``'s autograd graph keeps for backward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(seen.values())


def _randomise_layer_scale(model: nn.Module) -> None:
    """timm inits layer scale to a tiny constant: make it non-trivial so tests see it."""
    g = torch.Generator().manual_seed(0)
    for mod in model.modules():
        if hasattr(mod, "gamma") and isinstance(mod.gamma, torch.Tensor):
            with torch.no_grad():
                mod.gamma.copy_(torch.rand(mod.gamma.shape, generator=g) + 0.5)


def set_fused(model: nn.Module, fused: bool) -> nn.Module:
    for mod in model.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = fused
    return model


@pytest.fixture
def make_vit() -> Callable[..., nn.Module]:
    return tiny_vit


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_trt = importlib.util.find_spec("tensorrt") is not None
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "tensorrt" in item.keywords and not (has_trt and has_cuda):
            item.add_marker(pytest.mark.skip(reason="needs TensorRT and a CUDA GPU (not on this machine)"))
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (not on this machine)"))


def assert_trace_matches(gm: torch.fx.GraphModule, model: nn.Module, x: torch.Tensor) -> None:
    """The traced ``gm`` computes what ``model`` computes: bit for bit, or, where the trace made 1×1
    convolutions linears (``passes.pointwise_conv``: another kernel, another summation order),
    within float rounding of the output's size."""
    with torch.no_grad():
        got, want = gm(x), model(x)
    if not gm.meta.get(POINTWISE_CONVS):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        return
    scale = max(float(want.abs().max()), 1.0)
    eps = torch.finfo(want.dtype).eps
    torch.testing.assert_close(got, want, atol=1e3 * eps * scale, rtol=0)


def exact_slim_plans(
    gm: torch.fx.GraphModule, groups: GroupSet, x: torch.Tensor, seeds: int = 3
) -> Iterator[tuple[KeepPlan, torch.fx.GraphModule]]:
    """(plan, slim model) for random half-keeping plans: each slim model computes what the
    hard-masked model does (float64 inputs: within 1e-12) and the plan changes the output."""
    import p3b_fx  # noqa: PLC0415

    for seed in range(seeds):
        plan = KeepPlan.random(groups, 0.5, seed=seed)
        slim = p3b_fx.slim(gm, plan, groups)
        with torch.no_grad():
            masked = p3b_fx.apply_masks(gm, plan, groups)(x)
            torch.testing.assert_close(slim(x), masked, atol=1e-12, rtol=0)
            assert (slim(x) - gm(x)).abs().max() > 1e-3  # the plan changes the output
        yield plan, slim


def assert_gates_train(gm: torch.fx.GraphModule, x: torch.Tensor) -> None:
    """Forward and backward through ``gm`` with every gate in place, folded into the linears and
    soft (0.9): each gate collects a finite gradient."""
    import p3b_fx  # noqa: PLC0415

    masked, bank = p3b_fx.insert_masks(gm, p3b_fx.find_groups(gm))
    p3b_fx.fold_masks(masked)
    for gate in bank.gates().values():
        gate.mul_(0.9)
    bank.scoring(True)
    masked(x).sum().backward()
    assert all(g.grad is not None and torch.isfinite(g.grad).all() for g in bank.gates().values())


def assert_loads_with_torch_alone(model: nn.Module, x: torch.Tensor, tmp_path: Path) -> None:
    """``model`` saved whole loads and computes the same in a fresh interpreter that imports neither
    p3b_fx, nor the passes, nor timm (what a deployment target has)."""
    torch.save({"model": model, "x": x, "y": model(x).detach()}, tmp_path / "slim.pt")
    code = (
        "import sys, torch\n"
        f"d = torch.load({str(tmp_path / 'slim.pt')!r}, weights_only=False)\n"
        "assert torch.allclose(d['model'](d['x']), d['y'], atol=1e-6)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('p3b_fx', 'passes', 'timm')]\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
