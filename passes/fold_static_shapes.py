"""FoldStaticShapesPass: shape arithmetic of a fixed input shape → literals.

Pattern: a node that reads a tensor's shape (``x.shape``, ``x.size()``, ``x.dim()``), picks from a
value such a node produced (``shape[1]``), or does integer arithmetic on such values only
(``H % 7``, ``(7 - H % 7) % 7``, ``H // 7``). Result: each use reads the value the graph computes
for ``input_shape``, as a literal; the shape reads left without users are removed. Why: with a
static ONNX input the exporter still writes these as Shape → Gather → Mod chains, and TensorRT 8.0
(JetPack 4.6) has no ``Mod``: Swin's window padding (``(ws - H % ws) % ws``) could not be parsed.
Exact for that input shape only. With ``dynamic_batch`` the graph runs on fake tensors (shapes
only, no arithmetic) at three batch sizes, and only a value that is the same number at all three
folds (the image's height and width, SAM's window padding); one that follows the batch (``B·heads``,
a shape tuple with the batch in it) stays computed at run time. (A symbolic batch would prove it,
but ops without a symbolic shape rule, ``F.pad`` among them, pin the symbol to the example's size.)
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode

from p3b_fx.core.pass_infra import GraphPass, PassResult, module_device, module_dtype
from passes.find_blocks import NUMBER_OPS, is_shape_read

logger = logging.getLogger(__name__)


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


def _foldable(node: fx.Node, known: dict[fx.Node, Any]) -> bool:
    """A shape read, or a pick or integer arithmetic over ``known`` values only."""
    if is_shape_read(node):
        return not any(isinstance(a, fx.Node) for a in node.args[1:])
    if node.op == "call_function" and (node.target is operator.getitem or node.target in NUMBER_OPS):
        return all(a in known for a in node.all_input_nodes)
    return False


def _static_values(
    gm: fx.GraphModule, input_shape: tuple[int, ...], dynamic_batch: bool
) -> dict[fx.Node, Any]:
    """The foldable nodes of ``gm`` and the literal each computes for an input of ``input_shape``
    (with ``dynamic_batch``: the same literal at three batch sizes; the others are left out)."""
    if not dynamic_batch:
        return _values(gm, input_shape, fake=False)
    b = input_shape[0]
    try:
        runs = [_values(gm, (size, *input_shape[1:]), fake=True) for size in (b, b + 1, b + 6)]
    except Exception:  # an op without a fake-tensor rule: fold nothing, export as traced
        logger.debug("FoldStaticShapesPass: the graph does not run on fake tensors", exc_info=True)
        return {}
    first, *others = runs
    return {n: v for n, v in first.items() if all(n in r and r[n] == v for r in others)}


def _values(gm: fx.GraphModule, input_shape: tuple[int, ...], *, fake: bool) -> dict[fx.Node, Any]:
    known: dict[fx.Node, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if _foldable(n, known):
                known[n] = out
            return out

    x = torch.zeros(input_shape, device=module_device(gm), dtype=module_dtype(gm))
    with torch.no_grad():
        if fake:
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                Recorder(gm).run(mode.from_tensor(x))
        else:
            Recorder(gm).run(x)
    literals = {n: _literal(v) for n, v in known.items()}
    return {n: v for n, v in literals.items() if v is not None}


@dataclass(frozen=True)
class FoldStaticShapesPass(GraphPass):
    input_shape: tuple[int, ...]
    dynamic_batch: bool = False

    def call(self, gm: fx.GraphModule) -> PassResult:
        folded = _static_values(gm, self.input_shape, self.dynamic_batch)

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
