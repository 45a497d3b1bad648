"""DecomposeSdpaPass: structure, numbers (<= 1e-6 of eager SDPA), idempotence, refusals."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import p3b_fx
from p3b_fx.core.pass_infra import PassManager
from p3b_fx.errors import PassError
from passes.decompose_sdpa import DecomposeSdpaPass, is_sdpa
from tests.conftest import set_fused, tiny_vit

ATOL = 1e-6


class Attention(nn.Module):
    """q, k, v from one linear, then SDPA with the given keyword arguments."""

    def __init__(self, mask: torch.Tensor | None = None, **sdpa_kwargs: Any) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.sdpa_kwargs = sdpa_kwargs
        self.mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, **self.sdpa_kwargs)
        return out.transpose(1, 2).reshape(b, n, 16)


def _bool_mask() -> torch.Tensor:
    mask = torch.rand(1, 1, 6, 6, generator=torch.Generator().manual_seed(1)) > 0.3
    return mask | torch.eye(6, dtype=torch.bool)  # every query keeps at least one key


CASES = {
    "default-scale": Attention(),
    "explicit-scale": Attention(scale=0.37),
    "causal": Attention(is_causal=True),
    "bool-mask": Attention(mask=_bool_mask()),
    "float-mask": Attention(mask=torch.randn(1, 2, 6, 6, generator=torch.Generator().manual_seed(2))),
    "scale-and-mask": Attention(mask=_bool_mask(), scale=0.2),
}


def _traced(module: Attention) -> fx.GraphModule:
    torch.manual_seed(0)
    module.qkv.reset_parameters()
    return fx.symbolic_trace(module.eval())


@pytest.mark.parametrize("name", list(CASES))
def test_outputs_match_eager_sdpa(name: str) -> None:
    gm = _traced(CASES[name])
    x = torch.randn(2, 6, 16)
    expected = gm(x)
    result = PassManager([DecomposeSdpaPass()]).run(gm)
    assert result.modified
    torch.testing.assert_close(result.graph_module(x), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_no_sdpa_left_and_softmax_between_two_matmuls(name: str) -> None:
    gm = DecomposeSdpaPass()(_traced(CASES[name])).graph_module
    attention = [n.target for n in gm.graph.nodes if n.target in (torch.matmul, torch.softmax)]
    assert attention == [torch.matmul, torch.softmax, torch.matmul]
    assert not any(is_sdpa(n) for n in gm.graph.nodes)
    assert "scaled_dot_product_attention" not in gm.code


def test_explicit_scale_is_a_constant_and_default_scale_reads_the_head_size() -> None:
    explicit = DecomposeSdpaPass()(_traced(Attention(scale=0.37))).graph_module
    default = DecomposeSdpaPass()(_traced(Attention())).graph_module
    assert "0.37" in explicit.code and "size" not in explicit.code
    assert ".size(-1)" in default.code


def test_second_run_reports_unmodified() -> None:
    gm = DecomposeSdpaPass()(_traced(Attention(scale=0.5))).graph_module
    code = gm.code
    again = DecomposeSdpaPass()(gm)
    assert not again.modified
    assert again.graph_module.code == code


def test_graph_without_sdpa_is_unmodified() -> None:
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.GELU()))
    assert not DecomposeSdpaPass()(gm).modified


@pytest.mark.parametrize("depth", [1, 2])
def test_traced_timm_vit_matches_eager(depth: int) -> None:
    model = set_fused(tiny_vit(depth=depth), True)
    gm = p3b_fx.trace(model)
    assert any(is_sdpa(n) for n in gm.graph.nodes)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        result = PassManager([DecomposeSdpaPass()]).run(gm)
        got = result.graph_module(x)
    assert sum(is_sdpa(n) for n in result.graph_module.graph.nodes) == 0
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_dropout_in_the_graph_is_refused() -> None:
    gm = _traced(Attention(dropout_p=0.1))
    with pytest.raises(PassError, match=r"dropout_p=0\.1.*eval mode"):
        DecomposeSdpaPass()(gm)


def test_is_causal_as_a_graph_input_is_refused() -> None:
    class Free(nn.Module):
        def forward(self, q: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, q, q, is_causal=is_causal)

    gm = fx.symbolic_trace(Free())
    with pytest.raises(PassError, match="is_causal"):
        DecomposeSdpaPass()(gm)
