"""LowerIndexAddPass: ``index_add`` write-backs → pad, gather, add.

Pattern: ``torch.index_add(x, dim, idx, y)`` (or ``x.index_add(dim, idx, y)``; ``dim`` the last
axis, or another: a ConvNeXt-style block writes (N, C, H, W) along -3) with ``idx`` a
constant index buffer read by a ``get_attr`` node, indices unique, and ``x``'s shape known from
``node.meta[p3b.shape]`` (``passes.annotate_shapes``) or torch's ``tensor_meta``.
Result: ``x + index_select(pad(y, (0, 1) on dim), dim, spread)`` where ``spread[c]`` is the position of
channel ``c`` in ``idx``, or the zero column appended by ``pad`` for channels ``idx`` does not
touch. ``spread`` is a new int64 buffer. Every output element is ``x[c] + y[j]`` or ``x[c] + 0``:
numerically identical to ``index_add``.
Why: the TorchScript ONNX exporter fails on ``aten::index_add`` at every opset, and the scatter
forms (ScatterElements / ScatterND) are not parsed by TensorRT 8.0 (JetPack 4.6); Pad, Gather and
Add are parsed by every TensorRT release and every opset we export.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from p3b_fx.core import meta
from p3b_fx.core.pass_infra import GraphPass, PassResult, known_shape, replace_node
from p3b_fx.errors import PassError

SPREAD_PREFIX = "p3b_index_add_spread"
"""Names of the buffers this pass adds to the GraphModule (``p3b_index_add_spread_<n>``)."""


def is_index_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is torch.index_add) or (
        node.op == "call_method" and node.target == "index_add"
    )


def _arguments(node: fx.Node) -> tuple[Any, Any, Any, Any, Any]:
    names = ("input", "dim", "index", "source", "alpha")
    args = dict(zip(names, node.args, strict=False))
    args.update(node.kwargs)
    args.setdefault("alpha", 1)
    missing = [n for n in names if n not in args]
    if missing:
        raise PassError(f"LowerIndexAddPass: node '{node.name}' lacks argument(s) {', '.join(missing)}")
    return args["input"], args["dim"], args["index"], args["source"], args["alpha"]


def _index_tensor(gm: fx.GraphModule, node: fx.Node, index: Any) -> torch.Tensor:
    if not (isinstance(index, fx.Node) and index.op == "get_attr"):
        raise PassError(
            f"LowerIndexAddPass: the index of node '{node.name}' is not a constant buffer "
            "(get_attr); only constant channel indices can be lowered"
        )
    value: Any = gm
    for part in str(index.target).split("."):
        value = getattr(value, part)
    if not isinstance(value, torch.Tensor) or value.dim() != 1:
        raise PassError(f"LowerIndexAddPass: '{index.target}' (node '{node.name}') is not a 1-D index tensor")
    return value


def spread_index(index: torch.Tensor, width: int) -> torch.Tensor:
    """``spread[c]`` = position of ``c`` in ``index``, else ``len(index)`` (the pad column)."""
    values = index.tolist()
    if len(set(values)) != len(values) or any(not 0 <= v < width for v in values):
        raise ValueError(f"indices must be unique and in [0, {width}), got {values}")
    spread = torch.full((width,), len(values), dtype=torch.int64, device=index.device)
    spread[index.to(torch.int64)] = torch.arange(len(values), dtype=torch.int64, device=index.device)
    return spread


def _spread_for(gm: fx.GraphModule, node: fx.Node) -> tuple[Any, Any, int, torch.Tensor]:
    """(x, y, the axis as a negative index, spread) of index_add ``node``."""
    x, dim, index, y, alpha = _arguments(node)
    shape = known_shape(x)
    if shape is None:
        raise PassError(
            f"LowerIndexAddPass: the shape of '{x}' (input of node '{node.name}') is unknown; "
            "run AnnotateShapesPass (or torch.fx ShapeProp) first"
        )
    if not isinstance(dim, int) or isinstance(dim, bool) or not -len(shape) <= dim < len(shape) or alpha != 1:
        raise PassError(
            f"LowerIndexAddPass: node '{node.name}' has dim={dim}, alpha={alpha}; only "
            f"index_add along one of the {len(shape)} axes with alpha=1 is lowered"
        )
    axis = dim % len(shape) - len(shape)
    try:
        spread = spread_index(_index_tensor(gm, node, index), shape[axis])
    except ValueError as exc:
        raise PassError(f"LowerIndexAddPass: node '{node.name}': {exc}") from exc
    return x, y, axis, spread


def _new_buffer_name(gm: fx.GraphModule) -> str:
    n = 0
    while hasattr(gm, f"{SPREAD_PREFIX}_{n}"):
        n += 1
    return f"{SPREAD_PREFIX}_{n}"


@dataclass(frozen=True)
class LowerIndexAddPass(GraphPass):
    """Rewrite every ``index_add`` into pad + gather + add (edits ``gm`` in place)."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in list(gm.graph.nodes):
            if not is_index_add(node):
                continue
            x, y, axis, spread = _spread_for(gm, node)
            name = _new_buffer_name(gm)
            gm.register_buffer(name, spread)
            with gm.graph.inserting_before(node):
                # F.pad lists the last axis first: (0, 0) for each axis after ``axis``, then (0, 1)
                pad = (0, 0) * (-axis - 1) + (0, 1)
                padded = gm.graph.call_function(torch.nn.functional.pad, (y, pad))
                y_shape = known_shape(y)
                if y_shape is not None:  # lets later passes (TransposeGathersPass) see the rank
                    grown = list(y_shape)
                    grown[axis] += 1
                    padded.meta[meta.SHAPE] = tuple(grown)
                spread_node = gm.graph.get_attr(name)
                spread_y = gm.graph.call_function(torch.index_select, (padded, axis, spread_node))
                out = gm.graph.call_function(operator.add, (x, spread_y))
            replace_node(gm, node, out)
            modified = True
        return PassResult(gm, modified)

    def ensures(self, gm: fx.GraphModule) -> None:
        left = [n.name for n in gm.graph.nodes if is_index_add(n)]
        if left:
            raise PassError(f"LowerIndexAddPass: index_add nodes left after the pass: {', '.join(left)}")
