"""p3b_fx.trace: exact equality with eager on the supported model list; clean failures."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import p3b_fx
from p3b_fx.errors import TraceError
from tests.conftest import set_fused, tiny_vit

# (timm name, kwargs): real widths/heads of the named models; depth cut where the full model
# would only make the test slow (tracing does not depend on depth).
MODEL_LIST = [
    ("vit_tiny_patch16_224", {}),
    ("vit_small_patch16_224", {"depth": 4}),
    ("vit_base_patch16_224", {"depth": 2}),
    ("vit_large_patch16_224", {"depth": 2}),
    ("deit_tiny_patch16_224", {}),
    ("deit_small_patch16_224", {"depth": 4}),
    ("deit_base_distilled_patch16_224", {"depth": 2}),
    ("deit3_small_patch16_224", {"depth": 4}),
    ("vit_small_patch16_224", {"depth": 3, "class_token": False, "global_pool": "avg"}),
    ("vit_small_patch16_224", {"depth": 3, "reg_tokens": 4}),
    ("vit_small_patch16_224", {"depth": 3, "qk_norm": True}),
    ("vit_small_patch16_224", {"depth": 3, "qkv_bias": False}),
]


def model_id(case: tuple[str, dict[str, object]]) -> str:
    name, kw = case
    return name + "".join(f"-{k}={v}" for k, v in kw.items())


@pytest.mark.parametrize("case", MODEL_LIST, ids=[model_id(c) for c in MODEL_LIST])
@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "unfused"])
def test_traced_equals_eager_exactly(case: tuple[str, dict[str, object]], fused: bool) -> None:
    name, kw = case
    model = set_fused(tiny_vit(name=name, **{"img_size": 224, "patch_size": 16, **_real(name), **kw}), fused)
    gm = p3b_fx.trace(model)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


def _real(name: str) -> dict[str, object]:
    """Undo tiny_vit's small defaults: keep the named model's own width, heads and classes."""
    cfg = timm.create_model(name, pretrained=False, pretrained_cfg_overlay={}, depth=1)
    return {"embed_dim": cfg.embed_dim, "num_heads": cfg.blocks[0].attn.num_heads, "num_classes": 1000}


def test_optional_forward_arguments_are_not_graph_inputs() -> None:
    gm = p3b_fx.trace(tiny_vit())
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert [p.name for p in placeholders] == ["x"]


@pytest.mark.parametrize(
    "kw",
    [
        dict(depth=5, embed_dim=40, num_heads=5, mlp_ratio=2.5, img_size=24, patch_size=6),
        dict(depth=1, embed_dim=16, num_heads=1, mlp_ratio=1.0, img_size=20, patch_size=4),
        dict(depth=3, embed_dim=64, num_heads=8, mlp_ratio=4.0, img_size=48, patch_size=16, init_values=0.1),
    ],
)
def test_custom_vits_trace_exactly(kw: dict[str, object]) -> None:
    model = tiny_vit(**kw)
    gm = p3b_fx.trace(model)
    x = torch.randn(3, 3, int(kw["img_size"]), int(kw["img_size"]))  # type: ignore[call-overload]
    assert torch.equal(gm(x), model(x))


def test_trace_keeps_train_mode_and_stochastic_modules() -> None:
    model = tiny_vit(drop_path_rate=0.5, drop_rate=0.1).train()
    gm = p3b_fx.trace(model)
    assert gm.training and model.training
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(0)
    a = gm(x)
    torch.manual_seed(1)
    b = gm(x)
    assert not torch.equal(a, b)  # DropPath / Dropout still act in train mode
    gm.eval()
    assert torch.equal(gm(x), gm(x))


def test_graph_module_retraces() -> None:
    gm = p3b_fx.trace(tiny_vit())
    again = p3b_fx.trace(gm)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(again(x), gm(x))


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: untraceable
            return self.lin(x)
        return x


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (nn.Sequential(), "no parameters"),
        ("not a model", "expected a torch.nn.Module"),
        (_DataDependent(), "cannot trace _DataDependent"),
    ],
    ids=["empty", "not-a-module", "data-dependent"],
)
def test_untraceable_inputs_raise_trace_error(model: object, message: str) -> None:
    with pytest.raises(TraceError, match=message):
        p3b_fx.trace(model, input_shape=(1, 4))  # type: ignore[arg-type]
