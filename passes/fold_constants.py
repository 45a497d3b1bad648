"""FoldConstantsPass: tensors computed from weights alone → buffers (for export).

Pattern: a node that no graph input reaches (it reads only parameters, buffers and literals),
whose value is a tensor and which feeds a node an input does reach: rope-mixed ViT's per-head
rotary tables (``sin``/``cos`` of the learnt frequencies times the token grid, chunked in each
block), and in a slim graph the kept rows gathered from a constant table. Result: each such node
reads a buffer ``p3b_const.<name>`` holding the value it computes now; the nodes only it needed
are removed. Why: the TorchScript ONNX exporter loses the shapes of such chains and lowered a
``chunk`` of rope-mixed's table to a Slice with a wrong end (the dense model's ONNX output was off
by 3.4); a constant is exported as an initializer, which TensorRT takes as is. Exact for frozen
weights: the export applies it to an eval copy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from p3b_fx.core import meta
from p3b_fx.core.pass_infra import GraphPass, PassResult

CONST_MODULE = "p3b_const"

_RANDOM = frozenset({
    "rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "randperm", "bernoulli",
    "bernoulli_", "normal", "normal_", "uniform_", "multinomial", "poisson", "dropout", "dropout1d",
    "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
})  # fmt: skip
"""Ops that draw random numbers (by name: function, method or in-place method)."""


def _dynamic(node: fx.Node, dynamic: set[fx.Node]) -> bool:
    """Whether ``node``'s value can change from one call to the next: an input reaches it, it has a
    side effect, or it draws random numbers."""
    if node.op in ("placeholder", "output") or node.is_impure():
        return True
    if node.op == "call_module":  # a module computes from its input: folded only if that is static
        return any(i in dynamic for i in node.all_input_nodes) or not node.all_input_nodes
    name = str(getattr(node.target, "__name__", node.target))
    return name in _RANDOM or any(i in dynamic for i in node.all_input_nodes)


@dataclass(frozen=True)
class FoldConstantsPass(GraphPass):
    def call(self, gm: fx.GraphModule) -> PassResult:
        dynamic: set[fx.Node] = set()
        for node in gm.graph.nodes:
            if _dynamic(node, dynamic):
                dynamic.add(node)
        frontier = [
            n for n in gm.graph.nodes
            if n not in dynamic and n.op != "get_attr" and any(u in dynamic for u in n.users)
        ]  # fmt: skip
        if not frontier:
            return PassResult(gm, False)
        values = _evaluate(gm, dynamic, set(frontier))
        if not hasattr(gm, CONST_MODULE):
            gm.add_submodule(CONST_MODULE, nn.Module())
        holder = gm.get_submodule(CONST_MODULE)
        modified = False
        for node in frontier:
            value = values.get(node)
            if not isinstance(value, torch.Tensor):
                continue  # a shape or a number: FoldStaticShapesPass's work
            attr = "".join(c if c.isalnum() else "_" for c in node.name)
            holder.register_buffer(attr, value.detach().clone())
            with gm.graph.inserting_before(node):
                const = gm.graph.get_attr(f"{CONST_MODULE}.{attr}")
            const.meta[meta.SHAPE] = tuple(value.shape)
            node.replace_all_uses_with(const)
            modified = True
        if modified:
            gm.graph.eliminate_dead_code()
            gm.recompile()
        return PassResult(gm, modified)


def _evaluate(gm: fx.GraphModule, dynamic: set[fx.Node], wanted: set[fx.Node]) -> dict[fx.Node, Any]:
    """The values of the ``wanted`` nodes, computing only nodes no input reaches."""
    interpreter = fx.Interpreter(gm)
    values: dict[fx.Node, Any] = {}
    left = set(wanted)
    with torch.no_grad():
        for node in gm.graph.nodes:
            if not left:
                break
            if node in dynamic:
                continue
            interpreter.env[node] = interpreter.run_node(node)
            if node in left:
                values[node] = interpreter.env[node]
                left.discard(node)
    return values
