"""p3b_fx.trace: exact equality with eager on the supported model list; clean failures."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import p3b_fx
from p3b_fx.errors import TraceError
from tests.conftest import assert_loads_with_torch_alone, assert_trace_matches, set_fused, tiny_vit

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


class _PadToEven(nn.Module):
    """Pads its token axis to an even count (as TinyViT pads to whole windows) and folds the tokens
    into a square grid whose side it computes with ``int()`` (as ConViT and MobileViT do)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        if n % 2:
            x = torch.nn.functional.pad(x, (0, 0, 0, 1))
        side = int((x.shape[1] // 2) ** 0.5)
        return self.lin(x).reshape(b, 2, side, side, c).sum(dim=(1, 2, 3))


def test_control_flow_on_shapes_is_specialised_to_the_traced_shape_and_guarded() -> None:
    """The branch the traced shape takes is in the graph and asserted: another input that would take
    the other branch stops with a message naming the traced shape, instead of computing wrongly."""
    model = _PadToEven().eval()
    gm = p3b_fx.trace(model, input_shape=(1, 7, 4))  # 7 tokens: padded to 8 = 2 x 2 x 2
    assert sum(n.target is torch._assert for n in gm.graph.nodes) == 2  # the `if`, the `int()`
    for batch in (1, 3):
        x = torch.randn(batch, 7, 4)
        torch.testing.assert_close(gm(x), model(x), atol=0, rtol=0)
    with pytest.raises(AssertionError, match=r"traced this model for inputs of shape \(2, 7, 4\)"):
        gm(torch.randn(2, 8, 4))  # even: eager would not pad
    assert p3b_fx.trace(model, input_shape=(1, 8, 4))(torch.randn(2, 8, 4)).shape == (2, 4)


class _CacheThenBranch(nn.Module):
    """A leaf that caches a tensor in its module, then a branch on a shape: specialising the branch
    runs the leaf on fake tensors."""

    def __init__(self) -> None:
        super().__init__()
        from tests.test_find_groups import _CachingMlp  # noqa: PLC0415 - a registered trace leaf

        self.mlp = _CachingMlp(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        if x.shape[1] % 2:
            x = x[:, :-1]
        return x.sum(dim=1)


def test_specialising_leaves_no_fake_tensor_in_the_model() -> None:
    from torch._subclasses.fake_tensor import FakeTensor  # noqa: PLC0415

    model = _CacheThenBranch().eval()
    gm = p3b_fx.trace(model, input_shape=(1, 7, 4))
    assert not isinstance(model.mlp.cache, FakeTensor)
    x = torch.randn(2, 7, 4)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), atol=0, rtol=0)


# timm leaf modules the tracer opens (p3b_fx.tracing.OPENED_LEAVES), each in a model that holds it;
# TinyViT at 64 px pads its windows (16 tokens a side, window 7), at 224 px it does not
OPENED = [
    ("tiny_vit_5m_224", 64, "TinyVitBlock"),
    ("tiny_vit_5m_224", 224, "TinyVitBlock"),
    ("twins_svt_small", 224, "LocallyGroupedAttn"),
    ("mobilevit_xxs", 256, "MobileVitBlock"),
]


@pytest.mark.parametrize("case", OPENED, ids=[f"{n}-{size}px" for n, size, _ in OPENED])
def test_opened_timm_leaves_trace_exactly_into_blocks_that_slim_exactly(case: tuple[str, int, str]) -> None:
    name, size, leaf = case
    kw = {"depths": (1, 1, 1, 1)} if name.startswith("twins") else {}
    model = timm.create_model(name, pretrained=False, **kw).eval()
    assert any(type(m).__name__ == leaf for m in model.modules())
    shape = (1, 3, size, size)
    gm = p3b_fx.trace(model, input_shape=shape)
    x = torch.randn(2, *shape[1:])
    assert_trace_matches(gm, model, x)  # bit for bit where the model has no 1×1 convolution
    groups = p3b_fx.find_groups(gm)
    parts = [b.name.split(".") for b in groups.blocks]
    inside = [
        b for b, p in zip(groups.blocks, parts, strict=True)
        if any(type(model.get_submodule(".".join(p[:i]))).__name__ == leaf for i in range(1, len(p) + 1))
    ]  # fmt: skip
    assert inside and any(groups.group(g).prunable for b in inside for g in b.groups)
    gm64 = p3b_fx.trace(model.double(), input_shape=shape)
    groups64 = p3b_fx.find_groups(gm64)
    plan = p3b_fx.KeepPlan.random(groups64, 0.5, seed=0)
    with torch.no_grad():
        out, masked = p3b_fx.slim(gm64, plan, groups64)(x.double()), p3b_fx.apply_masks(gm64, plan, groups64)
        torch.testing.assert_close(out, masked(x.double()), atol=1e-9, rtol=0)
        assert (out - gm64(x.double())).abs().max() > 1e-3


def test_a_slim_model_with_shape_guards_loads_with_torch_alone_and_exports(tmp_path: Path) -> None:
    """Unpickling a GraphModule retraces its code: the guards must retrace (no ``not``), and the
    ONNX export drops them (they hold for the exported shape)."""
    from p3b_fx.export.jetpack import jetpack  # noqa: PLC0415 - onnx only here
    from p3b_fx.export.onnx import export_onnx  # noqa: PLC0415

    gm = p3b_fx.trace(
        timm.create_model("tiny_vit_5m_224", pretrained=False).eval(), input_shape=(1, 3, 64, 64)
    )
    groups = p3b_fx.find_groups(gm)
    slim = p3b_fx.slim(gm, p3b_fx.KeepPlan.random(groups, 0.5, seed=0), groups).eval()
    assert any(n.target is torch._assert for n in slim.graph.nodes)
    x = torch.randn(2, 3, 64, 64)
    assert_loads_with_torch_alone(slim, x, tmp_path)
    report = export_onnx(slim, x[:1], tmp_path / "tiny_vit.onnx", jetpack=jetpack("6.1"))
    assert report.parity_max_abs_diff <= 1e-4


def test_an_opened_leaf_that_fails_to_trace_is_traced_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Should a timm version change an opened leaf so that it no longer traces, the model is traced
    with it as a leaf, as before it was opened (its block stays whole), with a warning."""
    from p3b_fx import tracing  # noqa: PLC0415

    model = tiny_vit(depth=1)
    attn = type(model.blocks[0].attn)
    original = attn.forward

    def untraceable(self: nn.Module, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent: no specialisation can follow it
            return original(self, x, *args, **kwargs)  # type: ignore[no-any-return]
        return original(self, x, *args, **kwargs)  # type: ignore[no-any-return]

    monkeypatch.setattr(attn, "forward", untraceable)
    monkeypatch.setattr(tracing, "OPENED_LEAVES", (attn,))
    monkeypatch.setattr(tracing.timm_fx, "_leaf_modules", {*tracing.timm_fx._leaf_modules, attn})
    gm = p3b_fx.trace(model)
    assert any(n.op == "call_module" and n.target == "blocks.0.attn" for n in gm.graph.nodes)  # a leaf
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), atol=0, rtol=0)


def test_opened_timm_functions_trace_exactly() -> None:
    """MViTv2's ``reshape_pre_pool`` / ``reshape_post_pool`` (notrace functions in timm) are traced
    into: their reshapes are graph nodes, and the graph computes what the model does."""
    from timm.models import mvitv2  # noqa: PLC0415

    model = timm.create_model("mvitv2_tiny", pretrained=False, img_size=64).eval()
    gm = p3b_fx.trace(model, input_shape=(1, 3, 64, 64))
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert mvitv2.reshape_pre_pool not in targets and mvitv2.reshape_post_pool not in targets
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), atol=0, rtol=0)


def test_an_opened_function_that_fails_to_trace_is_traced_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Should a timm version change an opened function so that it no longer traces, a model of its
    module is traced with it whole (a leaf call), with a warning."""
    from timm.models import mvitv2  # noqa: PLC0415

    from p3b_fx import tracing  # noqa: PLC0415

    original = mvitv2.reshape_pre_pool

    def untraceable(x: torch.Tensor, feat_size: list[int], has_cls_token: bool = True) -> object:
        if x.sum() > 0:  # data-dependent: no specialisation can follow it
            return original(x, feat_size, has_cls_token)
        return original(x, feat_size, has_cls_token)

    untraceable.__module__ = mvitv2.__name__
    monkeypatch.setattr(mvitv2, "reshape_pre_pool", untraceable)
    monkeypatch.setattr(tracing, "OPENED_FUNCTIONS", (untraceable,))
    monkeypatch.setattr(
        tracing.timm_fx, "_autowrap_functions", {*tracing.timm_fx._autowrap_functions, untraceable}
    )
    model = timm.create_model("mvitv2_tiny", pretrained=False, img_size=64).eval()
    gm = p3b_fx.trace(model, input_shape=(1, 3, 64, 64))
    assert any(n.target is untraceable for n in gm.graph.nodes)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), atol=0, rtol=0)
