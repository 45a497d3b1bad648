"""LowerIndexAddPass: exact equality with index_add, structure, idempotence, refusals."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

from p3b_fx.core.pass_infra import PassManager
from p3b_fx.errors import PassError
from passes.annotate_shapes import AnnotateShapesPass
from passes.lower_index_add import SPREAD_PREFIX, LowerIndexAddPass, is_index_add, spread_index


class WriteBack(nn.Module):
    """Reads channels ``idx`` of the residual, transforms them, writes them back with index_add."""

    def __init__(self, width: int, idx: list[int], method: bool = False) -> None:
        super().__init__()
        self.register_buffer("idx", torch.tensor(idx, dtype=torch.int64))
        self.lin = nn.Linear(len(idx), len(idx))
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(torch.index_select(x, -1, self.idx))
        if self.method:
            return x.index_add(-1, self.idx, y)
        return torch.index_add(x, -1, self.idx, y)


def _lowered(module: nn.Module, width: int) -> tuple[fx.GraphModule, fx.GraphModule]:
    gm = fx.symbolic_trace(module.eval())
    passes = [AnnotateShapesPass(input_shape=(1, 5, width)), LowerIndexAddPass()]
    reference = fx.symbolic_trace(module.eval())
    return reference, PassManager(passes).run(gm).graph_module


@pytest.mark.parametrize("method", [False, True], ids=["function", "method"])
def test_output_is_bitwise_equal_to_index_add(method: bool) -> None:
    torch.manual_seed(0)
    reference, gm = _lowered(WriteBack(8, [6, 0, 3], method=method), 8)
    x = torch.randn(3, 5, 8)
    assert torch.equal(gm(x), reference(x))


def test_index_add_becomes_pad_gather_add_with_a_spread_buffer() -> None:
    _, gm = _lowered(WriteBack(8, [6, 0, 3]), 8)
    targets = [n.target for n in gm.graph.nodes]
    assert not any(is_index_add(n) for n in gm.graph.nodes)
    assert torch.nn.functional.pad in targets
    assert targets.count(torch.index_select) == 2  # the read, and the spread write
    assert torch.equal(getattr(gm, f"{SPREAD_PREFIX}_0"), torch.tensor([1, 3, 3, 2, 3, 3, 0, 3]))


def test_second_run_reports_unmodified() -> None:
    _, gm = _lowered(WriteBack(8, [1, 2]), 8)
    assert not LowerIndexAddPass()(gm).modified


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_any_unique_subset_lowers_exactly(data: st.DataObject) -> None:
    width = data.draw(st.integers(1, 12))
    idx = data.draw(st.lists(st.integers(0, width - 1), min_size=1, max_size=width, unique=True))
    torch.manual_seed(len(idx))
    reference, gm = _lowered(WriteBack(width, idx), width)
    x = torch.randn(2, 5, width)
    assert torch.equal(gm(x), reference(x))


def test_spread_index_points_untouched_channels_at_the_pad_column() -> None:
    assert spread_index(torch.tensor([2, 0]), 4).tolist() == [1, 2, 0, 2]
    with pytest.raises(ValueError, match="unique"):
        spread_index(torch.tensor([1, 1]), 4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        spread_index(torch.tensor([4]), 4)


def test_unknown_shape_is_refused_with_a_hint() -> None:
    gm = fx.symbolic_trace(WriteBack(8, [1, 2]))
    with pytest.raises(PassError, match="AnnotateShapesPass"):
        LowerIndexAddPass()(gm)


def test_duplicate_indices_are_refused() -> None:
    module = WriteBack(8, [1, 2])
    module.idx = torch.tensor([1, 1])
    gm = fx.symbolic_trace(module)
    AnnotateShapesPass(input_shape=(1, 5, 8))(gm)
    with pytest.raises(PassError, match="unique"):
        LowerIndexAddPass()(gm)


@pytest.mark.parametrize("dim", [1, -2, 2])  # not the batch: shape propagation runs batch 2
def test_any_axis_lowers_exactly(dim: int) -> None:
    """Channels written back along another axis than the last (a ConvNeXt-style block's (N, C, H, W)
    along -3): pad and gather along that axis give index_add's values bitwise."""

    class Rows(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("idx", torch.tensor([3, 0]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.index_add(x, dim, self.idx, x.narrow(dim, 1, 2) * 2)

    gm = fx.symbolic_trace(Rows())
    reference = fx.symbolic_trace(Rows())
    PassManager([AnnotateShapesPass(input_shape=(4, 5, 6)), LowerIndexAddPass()]).run(gm)
    assert not any(is_index_add(n) for n in gm.graph.nodes)
    x = torch.randn(4, 5, 6)
    assert torch.equal(gm(x), reference(x))


def test_a_dim_out_of_range_or_a_scaled_add_is_refused() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("idx", torch.tensor([0, 2]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.index_add(x, 1, self.idx, x[:, :2], alpha=2)

    gm = fx.symbolic_trace(Scaled())
    AnnotateShapesPass(input_shape=(1, 5, 8))(gm)
    with pytest.raises(PassError, match="alpha=2"):
        LowerIndexAddPass()(gm)
