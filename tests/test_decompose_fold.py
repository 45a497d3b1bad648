"""DecomposeFoldPass: ``F.fold`` / ``nn.Fold`` become a transposed convolution that equals them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from p3b_fx.core.pass_infra import PassManager
from p3b_fx.export.jetpack import jetpack
from p3b_fx.export.onnx import export_onnx
from passes.decompose_fold import DecomposeFoldPass, fold_ops, is_fold


@pytest.mark.parametrize(
    ("size", "kernel", "padding", "stride", "dilation"),
    [((8, 8), 3, 1, 2, 1), ((7, 9), 3, 1, 2, 1), ((8, 8), 3, 0, 1, 1), ((10, 6), (3, 2), (1, 0), (2, 1), 1),
     ((9, 9), 3, 2, 1, 2), ((5, 5), 1, 0, 1, 1), ((11, 13), 3, 1, 3, 1), ((12, 12), 4, 1, 3, 2)],
)  # fmt: skip
def test_fold_ops_equals_fold(
    size: tuple[int, int], kernel: int | tuple[int, int], padding: int | tuple[int, int],
    stride: int | tuple[int, int], dilation: int,
) -> None:  # fmt: skip
    """Output sizes the windows reach exactly or fall short of (by up to stride − 1), padding,
    stride, dilation and non-square kernels: the same numbers in float64."""
    pair = lambda v: (v, v) if isinstance(v, int) else v  # noqa: E731
    (kh, kw), (ph, pw), (sh, sw) = pair(kernel), pair(padding), pair(stride)
    h = (size[0] + 2 * ph - dilation * (kh - 1) - 1) // sh + 1
    w = (size[1] + 2 * pw - dilation * (kw - 1) - 1) // sw + 1
    x = torch.randn(2, 5 * kh * kw, h * w, dtype=torch.float64)
    expected = F.fold(x, size, kernel, dilation=dilation, padding=padding, stride=stride)
    torch.testing.assert_close(fold_ops(x, size, kernel, dilation, padding, stride), expected, atol=0, rtol=0)


class _Folds(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fold = nn.Fold((6, 6), 3, padding=1, stride=2)
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fold(x) + F.fold(x * self.scale, output_size=(6, 6), kernel_size=3, padding=1, stride=2)


def test_the_module_and_the_function_are_replaced_and_export_for_jetpack_4_6(tmp_path: Path) -> None:
    """Both forms are replaced, the graph computes the same, and the ONNX file (no Col2Im) passes
    the exporter's checks for JetPack 4.6 (TensorRT 8.0, opset 13)."""
    model = _Folds().eval()
    x = torch.randn(2, 4 * 9, 9)
    gm = fx.symbolic_trace(model)
    assert sum(is_fold(gm, n) for n in gm.graph.nodes) == 2
    out = PassManager([DecomposeFoldPass()]).run(gm).graph_module
    assert not any(is_fold(out, n) for n in out.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), atol=1e-5, rtol=0)
    report = export_onnx(model, x, tmp_path / "fold.onnx", jetpack=jetpack("4.6"), atol=1e-5)
    assert report.parity_max_abs_diff <= 1e-5
