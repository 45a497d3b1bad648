"""export_onnx: opset per JetPack, ORT parity, TensorRT op checks, atomic writes, clean errors."""

from __future__ import annotations

import operator
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import fx, nn

import p3b_fx
from p3b_fx.core.io import sha256_of
from p3b_fx.errors import ExportError
from p3b_fx.export import onnx as onnx_export
from p3b_fx.export.jetpack import JETPACKS, jetpack
from p3b_fx.export.onnx import check_tensorrt_ops, export_onnx
from tests.conftest import tiny_vit

pytestmark = pytest.mark.onnx

ALL_JETPACKS = list(JETPACKS)


class SlimBlock(nn.Module):
    """The ops of a slim graph: LayerNorm, index_select read, SDPA with an explicit scale, index_add."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("idx", torch.tensor([0, 2, 5, 7]))
        self.norm = nn.LayerNorm(8)
        self.qkv = nn.Linear(4, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.index_select(self.norm(x), -1, self.idx)
        b, n, _ = y.shape
        q, k, v = self.qkv(y).reshape(b, n, 3, 2, 2).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, scale=0.37).transpose(1, 2).reshape(b, n, 4)
        return torch.index_add(x, -1, self.idx, o)


@pytest.fixture
def slim_block() -> fx.GraphModule:
    torch.manual_seed(0)
    return fx.symbolic_trace(SlimBlock().eval())


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("version", ALL_JETPACKS)
def test_slim_ops_export_at_every_jetpack_opset(
    version: str, slim_block: fx.GraphModule, tmp_path: Path
) -> None:
    jp = jetpack(version)
    path = tmp_path / "m.onnx"
    report = export_onnx(slim_block, torch.randn(2, 5, 8), path, jetpack=jp)
    model = onnx.load(str(path))
    assert {i.domain: i.version for i in model.opset_import}[""] == jp.opset == report.opset
    assert report.parity_max_abs_diff <= 1e-4
    assert ("LayerNormalization" in report.ops) == jp.native_layernorm
    assert not {"ScatterND", "ScatterElements"} & set(report.ops)  # TensorRT 8.0 has neither
    assert report.sha256 == sha256_of(path)
    assert path.stat().st_mode & 0o777 == 0o644
    assert set(report.ops) == _ops(path)


@pytest.mark.parametrize("version", ["4.6", "5.1", "6.1", "7.2"])
def test_timm_vit_module_exports(version: str, tmp_path: Path) -> None:
    model = tiny_vit(depth=1)
    report = export_onnx(model, torch.randn(2, 3, 32, 32), tmp_path / "vit.onnx", jetpack=jetpack(version))
    assert report.opset == jetpack(version).opset
    assert report.parity_max_abs_diff <= 1e-4
    assert report.output_names == ("output",)


@pytest.mark.parametrize("version", ["4.6", "6.1"])
def test_p3b_slim_graph_exports_with_a_dynamic_batch(version: str, tmp_path: Path) -> None:
    gm = p3b_fx.trace(tiny_vit())
    small = p3b_fx.slim(gm, p3b_fx.KeepPlan.random(p3b_fx.find_groups(gm), 0.5, seed=0))
    assert any(n.target is torch.index_add for n in small.graph.nodes)
    x = torch.randn(2, 3, 32, 32)
    report = export_onnx(small, x, tmp_path / "slim.onnx", jetpack=jetpack(version), dynamic_batch=True)
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    x5 = torch.randn(5, 3, 32, 32)
    got = session.run(None, {"input": x5.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, small(x5).numpy(), atol=1e-4, rtol=0)
    assert any(n.target is torch.index_add for n in small.graph.nodes)  # the caller's graph is untouched


def test_static_shape_by_default_and_symbolic_batch_on_request(
    slim_block: fx.GraphModule, tmp_path: Path
) -> None:
    jp = jetpack("6.1")
    x = torch.randn(2, 5, 8)
    static = export_onnx(slim_block, x, tmp_path / "s.onnx", jetpack=jp)
    dynamic = export_onnx(slim_block, x, tmp_path / "d.onnx", jetpack=jp, dynamic_batch=True)

    def dims(path: Path) -> list[int | str]:
        shape = onnx.load(str(path)).graph.input[0].type.tensor_type.shape
        return [d.dim_param or d.dim_value for d in shape.dim]

    assert dims(static.path) == [2, 5, 8]
    assert dims(dynamic.path) == ["batch", 5, 8]
    assert not static.dynamic_batch and dynamic.dynamic_batch


def test_parity_failure_leaves_no_file(
    slim_block: fx.GraphModule, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = onnx_export._run_torch
    monkeypatch.setattr(onnx_export, "_run_torch", lambda m, x: [o + 1.0 for o in real(m, x)])
    path = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match=r"differs from torch by 1 .*atol"):
        export_onnx(slim_block, torch.randn(2, 5, 8), path, jetpack=jetpack("6.1"))
    assert list(tmp_path.iterdir()) == []


def test_failed_export_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous")

    class Sign(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sign(self.lin(x)) * x

    with pytest.raises(
        ExportError, match=r"TensorRT 8\.0 \(JetPack 4\.6\) cannot parse: node '.*' uses 'Sign'"
    ):
        export_onnx(Sign(), torch.randn(2, 4), path, jetpack=jetpack("4.6"))
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def _model_with(op: str, domain: str = "", opset: int = 17) -> onnx.ModelProto:
    node = helper.make_node(op, ["x"], ["y"], name="the_node", domain=domain)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize(
    ("version", "op", "allowed"),
    [
        ("4.6", "ScatterND", False),
        ("5.1", "ScatterND", True),
        ("5.1", "LayerNormalization", False),
        ("6.0", "LayerNormalization", True),
        ("6.1", "Gelu", True),
        ("6.0", "Gelu", False),
        ("7.2", "Erf", True),
    ],
)
def test_op_allow_list_follows_the_tensorrt_release(version: str, op: str, allowed: bool) -> None:
    jp = jetpack(version)
    model = _model_with(op)
    if allowed:
        assert check_tensorrt_ops(model, jp) == (op,)
    else:
        with pytest.raises(ExportError, match=rf"TensorRT {jp.tensorrt} .*node 'the_node' uses '{op}'"):
            check_tensorrt_ops(model, jp)


def test_custom_domain_op_is_refused() -> None:
    with pytest.raises(ExportError, match=r"com\.example::Relu"):
        check_tensorrt_ops(_model_with("Relu", domain="com.example"), jetpack("7.2"))


def test_missing_directory_is_an_export_error(slim_block: fx.GraphModule, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="does not exist or is not writable"):
        export_onnx(slim_block, torch.randn(2, 5, 8), tmp_path / "no" / "m.onnx", jetpack=jetpack("6.1"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="does not exist or is not writable"):
        export_onnx(slim_block, torch.randn(2, 5, 8), tmp_path / "file" / "m.onnx", jetpack=jetpack("6.1"))


def test_simplify_without_onnxslim_says_how_to_get_it(
    slim_block: fx.GraphModule, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxslim", None)
    with pytest.raises(ExportError, match="pip install onnxslim"):
        export_onnx(
            slim_block, torch.randn(2, 5, 8), tmp_path / "m.onnx", jetpack=jetpack("6.1"), simplify=True
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("version", ["4.6", "6.1"])
def test_simplified_model_is_checked_again(version: str, tmp_path: Path) -> None:
    pytest.importorskip("onnxslim", reason="onnxslim is installed by tools/setup.sh (extra 'simplify')")
    jp = jetpack(version)
    report = export_onnx(
        tiny_vit(depth=1), torch.randn(2, 3, 32, 32), tmp_path / "m.onnx", jetpack=jp, simplify=True
    )
    assert report.simplified and report.opset == jp.opset
    assert report.parity_max_abs_diff <= 1e-4
    assert "Shape" not in report.ops  # static shapes fold away


class WindowPad(nn.Module):
    """Swin's window padding: ``(ws - H % ws) % ws`` rows and columns, computed from the input's shape."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2], x.shape[3]
        pad_h, pad_w = (7 - h % 7) % 7, (7 - w % 7) % 7
        y = F.pad(x, (0, pad_w, 0, pad_h)) * self.scale
        return y.reshape(x.shape[0], -1, 7 * 7).mean(-1)


def test_static_shape_arithmetic_is_folded_so_tensorrt_8_parses_it(tmp_path: Path) -> None:
    """With a static input, ``H % 7`` is a literal: no ``Mod`` for TensorRT 8.0 (JetPack 4.6) to
    refuse. With a dynamic batch the arithmetic stays, and is still exact on another batch size."""
    from p3b_fx.tracing import copy_graph_module  # noqa: PLC0415
    from passes.fold_static_shapes import FoldStaticShapesPass  # noqa: PLC0415

    gm = p3b_fx.trace(WindowPad(), input_shape=(2, 3, 10, 12))
    x = torch.randn(2, 3, 10, 12)
    folded = FoldStaticShapesPass((2, 3, 10, 12))(copy_graph_module(gm)).graph_module
    assert not any(n.target is operator.mod for n in folded.graph.nodes)
    assert any(n.target is operator.mod for n in gm.graph.nodes)
    torch.testing.assert_close(folded(x), gm(x), atol=0, rtol=0)
    report = export_onnx(gm, x, tmp_path / "pad46.onnx", jetpack=jetpack("4.6"))
    assert "Mod" not in report.ops and report.parity_max_abs_diff <= 1e-6
    dynamic = export_onnx(gm, x, tmp_path / "pad.onnx", jetpack=jetpack("6.1"), dynamic_batch=True)
    assert dynamic.parity_max_abs_diff <= 1e-6


class LearntRotary(nn.Module):
    """A per-head table computed from learnt angles at each call and chunked into sin and cos, as
    rope-mixed ViTs do (their export, which this fold mended, is checked in test_vit_family)."""

    def __init__(self, noise: bool = False) -> None:
        super().__init__()
        self.angles = nn.Parameter(torch.randn(2, 4, 16, 8))
        self.proj = nn.Linear(16, 16)
        self.noise = noise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sin, cos = self.angles.sin().repeat_interleave(2, -1), self.angles.cos().repeat_interleave(2, -1)
        sin, cos = torch.cat([sin, cos], -1).to(self.angles.dtype)[0].chunk(2, -1)
        q = self.proj(x).reshape(x.shape[0], 16, 4, 4).permute(0, 2, 1, 3)  # (batch, heads, tokens, dims)
        out = q * cos[..., :4] + q.flip(-1) * sin[..., :4]
        return out + torch.rand_like(self.angles).sum().mul(0) if self.noise else out  # never folded


def test_weight_only_tensors_are_folded_into_constants_for_export(tmp_path: Path) -> None:
    from p3b_fx.tracing import copy_graph_module  # noqa: PLC0415
    from passes.fold_constants import CONST_MODULE, FoldConstantsPass  # noqa: PLC0415

    x = torch.randn(2, 16, 16)
    noisy = FoldConstantsPass()(p3b_fx.trace(LearntRotary(noise=True).eval(), input_shape=(2, 16, 16)))
    assert any(n.target is torch.rand_like for n in noisy.graph_module.graph.nodes)  # random: not folded
    gm = p3b_fx.trace(LearntRotary().eval(), input_shape=(2, 16, 16))
    folded = FoldConstantsPass()(copy_graph_module(gm)).graph_module
    assert not any(n.target in ("sin", "cos", "chunk") for n in folded.graph.nodes)
    assert any(str(n.target).startswith(CONST_MODULE) for n in folded.graph.nodes if n.op == "get_attr")
    torch.testing.assert_close(folded(x), gm(x), atol=0, rtol=0)
    assert FoldConstantsPass()(folded).modified is False
    report = export_onnx(gm, x, tmp_path / "rotary.onnx", jetpack=jetpack("6.1"))
    assert report.parity_max_abs_diff <= 1e-5


class GridRotary(nn.Module):
    """A table computed from the input's token count at each call (DINOv3's rotary grid)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = torch.arange(x.shape[1])[:, None] * torch.linspace(0, 1, 16)
        return self.proj(x) * angles.cos()


class BatchTable(nn.Module):
    """A table computed from the batch size (nothing a ViT does, but a dynamic batch must keep it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.arange(x.shape[0])[:, None, None].float().cos()


def test_a_table_computed_from_the_input_shape_is_a_constant_unless_it_follows_a_dynamic_batch(
    tmp_path: Path,
) -> None:
    """The token grid does not depend on the batch, so its table folds for a static and a dynamic
    export alike; a table of the batch size folds only for a static one."""
    gm = p3b_fx.trace(GridRotary(), input_shape=(2, 8, 16))
    x = torch.randn(2, 8, 16)
    static = onnx_export._prepare_graph(gm, x, jetpack("6.1"), dynamic_batch=False)
    dynamic = onnx_export._prepare_graph(gm, x, jetpack("6.1"), dynamic_batch=True)
    assert not any(n.target == "cos" for n in (*static.graph.nodes, *dynamic.graph.nodes))
    torch.testing.assert_close(static(x), gm(x), atol=0, rtol=0)
    torch.testing.assert_close(dynamic(x[:1]), gm(x[:1]), atol=0, rtol=0)
    batch = fx.symbolic_trace(BatchTable())
    assert any(
        n.target == "cos" for n in onnx_export._prepare_graph(batch, x, jetpack("6.1"), True).graph.nodes
    )
    assert not any(
        n.target == "cos" for n in onnx_export._prepare_graph(batch, x, jetpack("6.1"), False).graph.nodes
    )
    report = export_onnx(batch, x, tmp_path / "batch.onnx", jetpack=jetpack("6.1"), dynamic_batch=True)
    assert "Cos" in report.ops and report.parity_max_abs_diff <= 1e-5
    report = export_onnx(gm, x, tmp_path / "grid.onnx", jetpack=jetpack("6.1"))
    assert "Cos" not in report.ops and report.parity_max_abs_diff <= 1e-5
