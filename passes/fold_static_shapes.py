"""FoldStaticShapesPass: shape arithmetic of a fixed input shape → literals.

Pattern: a node that reads a tensor's shape (``x.shape``, ``x.size()``, ``x.dim()``), picks from a
value such a node produced (``shape[1]``), or does integer arithmetic on such values only
(``H % 7``, ``(7 - H % 7) % 7``, ``H // 7``). Result: each use reads the value the graph computes
for ``input_shape``, as a literal; the shape reads left without users are removed. Why: with a
static ONNX input the exporter still writes these as Shape → Gather → Mod chains, and TensorRT 8.0
(JetPack 4.6) has no ``Mod``: Swin's window padding (``(ws - H % ws) % ws``) could not be parsed.
Exact for that input shape only, so the export applies it only without ``dynamic_batch``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from p3b_fx.core.pass_infra import GraphPass, PassResult, module_device, module_dtype
from passes.find_blocks import NUMBER_OPS, is_shape_read


def _literal(value: Any) -> Any:
    """``value`` as a literal an fx argument may hold (a ``torch.Size`` as a tuple), or None."""
    if isinstance(value, bool):
        return None  # a comparison's result feeds control flow, which tracing already fixed
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, (tuple, list)) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return tuple(value)
    return None


def _foldable(node: fx.Node, folded: dict[fx.Node, Any]) -> bool:
    """A shape read, or a pick or integer arithmetic over ``folded`` values only."""
    if is_shape_read(node):
        return not any(isinstance(a, fx.Node) for a in node.args[1:])
    if node.op == "call_function" and (node.target is operator.getitem or node.target in NUMBER_OPS):
        return all(a in folded for a in node.all_input_nodes)
    return False


def _static_values(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> dict[fx.Node, Any]:
    """The foldable nodes of ``gm`` and the literal each computes for an input of ``input_shape``."""
    folded: dict[fx.Node, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if _foldable(n, folded):
                value = _literal(out)
                if value is not None:
                    folded[n] = value
            return out

    with torch.no_grad():
        Recorder(gm).run(torch.zeros(input_shape, device=module_device(gm), dtype=module_dtype(gm)))
    return folded


@dataclass(frozen=True)
class FoldStaticShapesPass(GraphPass):
    input_shape: tuple[int, ...]

    def call(self, gm: fx.GraphModule) -> PassResult:
        folded = _static_values(gm, self.input_shape)

        def literal(a: fx.Node) -> Any:
            return folded.get(a, a)

        users = {u for n in folded for u in n.users if u not in folded}
        for user in users:
            user.args = fx.node.map_arg(user.args, literal)
            user.kwargs = fx.node.map_arg(user.kwargs, literal)
        if not users:
            return PassResult(gm, False)
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return PassResult(gm, True)
