"""DecomposeEinsumPass: two-operand einsums become permute / reshape / matmul that equal them, and a
JetPack 4.6 export (TensorRT 8.0, no ``Einsum``) of a model that uses them goes through."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import fx, nn

from p3b_fx.core.pass_infra import PassManager
from p3b_fx.errors import PassError
from p3b_fx.export.jetpack import jetpack
from p3b_fx.export.onnx import export_onnx
from passes.decompose_einsum import DecomposeEinsumPass, einsum_ops, is_decomposable_einsum

CASES = [
    ("bhwc,hkc->bhwk", (6, 4, 5, 8), (4, 7, 8)),  # SAM's relative positions: q times a table per row
    ("bnd,bmd->bnm", (3, 5, 8), (3, 6, 8)),  # scores
    ("bnm,bmd->bnd", (3, 5, 6), (3, 6, 8)),  # values
    ("ij,jk->ki", (4, 5), (5, 3)),  # output permuted
    ("abc,ad->db", (2, 3, 4), (2, 5)),  # c summed away before the product
    ("bij,bjk->bik", (1, 4, 5), (3, 5, 2)),  # a batch subscript of size 1 broadcasts
    ("i,j->ij", (4,), (3,)),  # an outer product: nothing contracted
    ("ab,ab->a", (4, 5), (4, 5)),  # nothing free on the right
]


@pytest.mark.parametrize(("equation", "shape_a", "shape_b"), CASES)
def test_einsum_ops_equals_torch_einsum(
    equation: str, shape_a: tuple[int, ...], shape_b: tuple[int, ...]
) -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(shape_a, generator=gen, dtype=torch.float64)
    b = torch.randn(shape_b, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(einsum_ops(equation, a, b), torch.einsum(equation, a, b), atol=1e-12, rtol=0)


@pytest.mark.parametrize("equation", ["bij,bjk", "...ij,...jk->...ik", "ii,ij->j", "ij,jk,kl->il"])
def test_equations_it_cannot_spell_are_left_alone_or_refused(equation: str) -> None:
    class M(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.einsum(equation, a, b)

    gm = fx.symbolic_trace(M())
    assert not any(is_decomposable_einsum(n) for n in gm.graph.nodes)
    with pytest.raises(PassError, match="cannot decompose"):
        einsum_ops(equation, torch.zeros(2, 2), torch.zeros(2, 2))


class RelPos(nn.Module):
    """SAM's decomposed relative-position bias, as its attention computes it."""

    def __init__(self) -> None:
        super().__init__()
        self.rel_h, self.rel_w = nn.Parameter(torch.randn(4, 4, 8)), nn.Parameter(torch.randn(4, 4, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = x.reshape(x.shape[0], 4, 4, 8)
        rel_h = torch.einsum("bhwc,hkc->bhwk", q, self.rel_h)
        rel_w = torch.einsum("bhwc,wkc->bhwk", q, [self.rel_w][0])
        return (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(x.shape[0], 16, 16)


@pytest.mark.parametrize("dynamic_batch", [False, True])
def test_a_jetpack_4_6_export_spells_einsum_as_matmul(dynamic_batch: bool, tmp_path: Path) -> None:
    model = RelPos().eval()
    gm = fx.symbolic_trace(model)
    out = PassManager([DecomposeEinsumPass()]).run(gm).graph_module
    x = torch.randn(3, 16, 8)
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), atol=1e-5, rtol=0)
    report = export_onnx(model, x, tmp_path / "m.onnx", jetpack=jetpack("4.6"), atol=1e-4,
                         dynamic_batch=dynamic_batch)  # fmt: skip
    assert "Einsum" not in report.ops and "MatMul" in report.ops
    assert "Einsum" in export_onnx(model, x, tmp_path / "n.onnx", jetpack=jetpack("6.1"), atol=1e-4).ops


@pytest.mark.parametrize("has_cls_token", [True, False])
@pytest.mark.parametrize(("q_size", "k_size"), [((4, 4), (4, 4)), ((4, 4), (2, 2)), ((2, 4), (4, 2))])
def test_mvitv2_relative_positions_without_in_place_writes_equal_timm(
    has_cls_token: bool, q_size: tuple[int, int], k_size: tuple[int, int]
) -> None:
    from timm.models.mvitv2 import cal_rel_pos_type  # noqa: PLC0415

    from passes.decompose_rel_pos import spatial_rel_pos_ops  # noqa: PLC0415

    gen = torch.Generator().manual_seed(0)
    extra = int(has_cls_token)
    nq, nk = q_size[0] * q_size[1] + extra, k_size[0] * k_size[1] + extra
    attn = torch.randn(2, 3, nq, nk, generator=gen, dtype=torch.float64)
    q = torch.randn(2, 3, nq, 8, generator=gen, dtype=torch.float64)
    span = 2 * max(*q_size, *k_size) - 1
    rel_h, rel_w = (torch.randn(span, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    expected = cal_rel_pos_type(attn.clone(), q, has_cls_token, list(q_size), list(k_size), rel_h, rel_w)
    got = spatial_rel_pos_ops(attn, q, has_cls_token, q_size, k_size, rel_h, rel_w)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
