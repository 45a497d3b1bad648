"""DecomposeRmsNormPass: every RMSNorm form becomes plain ops that equal it, and exports to ONNX."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from p3b_fx.core.pass_infra import PassManager
from p3b_fx.export.jetpack import jetpack
from p3b_fx.export.onnx import export_onnx
from passes.decompose_rms_norm import DecomposeRmsNormPass, is_rms_norm, rms_norm_ops
from tests.conftest import sapiens2


class Norms(nn.Module):
    """The forms a traced model holds: the function with and without weight or eps, over one and
    over two trailing dims, and torch's module."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8))
        self.module = nn.RMSNorm(8, eps=1e-5)
        self.plain = nn.RMSNorm([4, 8], elementwise_affine=False)
        with torch.no_grad():
            self.module.weight.copy_(torch.randn(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.rms_norm(x, (8,), self.weight, 1e-6)
        b = F.rms_norm(x, (8,))  # eps=None: the dtype's epsilon
        c = F.rms_norm(x, (4, 8), eps=1e-3)
        return a + b + c + self.module(x) + self.plain(x)


def _decomposed(model: nn.Module) -> fx.GraphModule:
    gm = fx.symbolic_trace(model)
    assert sum(is_rms_norm(gm, n) for n in gm.graph.nodes) == 5
    out = PassManager([DecomposeRmsNormPass()]).run(gm).graph_module
    assert not any(is_rms_norm(out, n) for n in out.graph.nodes)
    return out


def test_every_rms_norm_form_becomes_plain_ops_that_equal_it() -> None:
    model = Norms().eval()
    x = torch.randn(3, 4, 8) * 5
    gm = _decomposed(model)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-6)
    assert not [n for n in gm.graph.nodes if n.op == "call_module"], "the nn.RMSNorm calls are gone"
    assert "module.weight" in dict(gm.named_parameters())  # read as an attribute now


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_the_ops_compute_as_torch_does_in_every_dtype(dtype: torch.dtype) -> None:
    """Half precision is normalised in float32 and cast back, as ``F.rms_norm`` does."""
    x = (torch.randn(4, 16) * 3).to(dtype)
    w = torch.randn(16).to(dtype)
    torch.testing.assert_close(rms_norm_ops(x, (16,), w), F.rms_norm(x, (16,), w))
    torch.testing.assert_close(rms_norm_ops(x, (16,), None, 0.1), F.rms_norm(x, (16,), None, 0.1))


@pytest.mark.parametrize("version", ["6.1", "4.6"])
def test_a_vit_with_rms_norm_exports_to_every_jetpack(version: str, tmp_path: Path) -> None:
    """Sapiens2 (timm's Eva with RmsNorm, qk-norm and grouped-query attention) exports where no ONNX
    opset a JetPack reads has RMSNorm; the ONNX model equals the torch one."""
    model = sapiens2()
    x = torch.randn(2, 3, 32, 32)
    report = export_onnx(model, x, tmp_path / "m.onnx", jetpack=jetpack(version), atol=1e-4)
    assert report.parity_max_abs_diff <= 1e-4
