"""TransposeGathersPass: bitwise equality, structure, ONNX export without innermost-axis Gathers."""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from torch import fx

import p3b_fx
from p3b_fx import latency
from p3b_fx.core.pass_infra import PassManager
from p3b_fx.export.jetpack import jetpack
from p3b_fx.export.onnx import export_onnx
from passes.annotate_shapes import AnnotateShapesPass
from passes.lower_index_add import LowerIndexAddPass
from passes.transpose_gathers import TransposeGathersPass, last_axis_gather
from tests.conftest import tiny_vit
from tests.test_lower_index_add import WriteBack


def _reference_slim() -> fx.GraphModule:
    gm = p3b_fx.trace(tiny_vit(), input_shape=(1, 3, 32, 32))
    groups = p3b_fx.find_groups(gm)
    return p3b_fx.slim(gm, latency.uniform_plan(groups, 0.5, "reference", tolerance=0.05), groups)


def test_rewritten_graph_is_bitwise_equal_and_has_no_last_axis_gather() -> None:
    torch.manual_seed(0)
    module = WriteBack(8, [6, 0, 3])
    reference = fx.symbolic_trace(module.eval())
    passes = [AnnotateShapesPass(input_shape=(1, 5, 8)), LowerIndexAddPass(), TransposeGathersPass()]
    gm = PassManager(passes).run(fx.symbolic_trace(module.eval())).graph_module
    x = torch.randn(3, 5, 8)
    assert torch.equal(gm(x), reference(x))
    assert not any(last_axis_gather(n) for n in gm.graph.nodes)
    selects = [n for n in gm.graph.nodes if n.target is torch.index_select]
    assert len(selects) == 2 and all(n.args[1] == 0 for n in selects)  # the read and the write-back
    assert TransposeGathersPass()(gm).modified is False


def test_unknown_rank_is_left_alone() -> None:
    gm = fx.symbolic_trace(WriteBack(8, [1, 2]).eval())  # no shapes annotated
    assert TransposeGathersPass()(gm).modified is False


def test_exported_slim_model_gathers_only_along_axis_0(tmp_path: Path) -> None:
    """A per-channel slim ViT exports without innermost-axis Gathers; the export's parity check passes."""
    slim = _reference_slim()
    example = torch.randn(2, 3, 32, 32)
    result = export_onnx(slim, example, tmp_path / "slim.onnx", jetpack=jetpack("6.1"))
    graph = onnx.load(str(result.path)).graph
    gathers = [n for n in graph.node if n.op_type == "Gather"]
    assert gathers, "a per-channel plan reads and writes channel subsets"
    axes = [next((a.i for a in n.attribute if a.name == "axis"), 0) for n in gathers]
    # channel gathers on axis 0; the one on axis 1 is the head's class-token pick, x[:, 0]
    assert axes.count(0) == len(gathers) - 1 and set(axes) == {0, 1}
    assert result.parity_max_abs_diff <= 1e-4
