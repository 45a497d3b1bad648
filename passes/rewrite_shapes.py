"""RewriteShapesPass: rewrite sizes baked into the graph for the slim widths.

Pattern: reshape / view / unflatten nodes whose output axes carry shrunk groups (``NodeInfo.axes``)
and SDPA nodes whose per-head dimension shrinks. Result: each such size argument (a constant such
as ``num_heads`` or ``head_dim``, or a ``x.shape[i]`` node) becomes the kept size; SDPA gets the
dense model's softmax scale pinned (its default, 1/sqrt(head_dim), would change). Why: the slim
graph must compute exactly what the masked graph computed.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from p3b_fx.core import meta
from p3b_fx.core.groups import GroupSet
from p3b_fx.core.pass_infra import PassResult, is_split
from passes.slim_common import PlanPass

_RESHAPES = ("reshape", "view")


@dataclass(frozen=True)
class RewriteShapesPass(PlanPass):
    def call(self, gm: fx.GraphModule) -> PassResult:
        kept = self.plan.kept_sizes(self.groups)
        modified = False
        for node in gm.graph.nodes:
            info = self.groups.nodes.get(node.name)
            if info is None:
                continue
            pin = info.sdpa_scale is not None and node.kwargs.get("scale") is None
            if pin and any(kept[g] < self.groups.group(g).size for g in _contracted(node, self.groups)):
                node.kwargs = {**node.kwargs, "scale": info.sdpa_scale}
                modified = True
            sizes: list[_Size] = [_size(axis, kept, self.groups) for axis in info.axes]
            modified |= _rewrite_reshape(node, sizes)
        for node in list(gm.graph.nodes):
            modified |= _rewrite_split(node, self.groups, kept)
        return PassResult(gm, modified)


def _rewrite_split(node: fx.Node, groups: GroupSet, kept: dict[str, int]) -> bool:
    """``split(sections, dim)`` with sizes baked in (TinyViT: ``split([key_dim, key_dim, val_dim],
    dim=3)`` of each head's q, k and v): each part's size becomes its kept size, read from the
    groups along ``dim`` of the ``getitem`` that takes the part."""
    if not is_split(node):
        return False
    sections = node.args[1] if len(node.args) > 1 else node.kwargs.get("split_size_or_sections")
    dim_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    shapes = node.meta.get(meta.SHAPE)
    if not isinstance(sections, (int, list, tuple)) or not isinstance(dim_arg, int) or not shapes:
        return False
    dim = dim_arg % len(shapes[0])
    parts: dict[int, tuple[str, ...]] = {}
    for user in node.users:
        info = groups.nodes.get(user.name)
        if user.target is operator.getitem and isinstance(user.args[1], int) and info and info.axes:
            parts[user.args[1]] = info.axes[dim]
    if not any(parts.values()):
        return False
    new = [
        math.prod(kept[g] for g in parts[i]) if parts.get(i) else int(shape[dim])
        for i, shape in enumerate(shapes)
    ]
    old = [sections] * len(shapes) if isinstance(sections, int) else list(sections)
    if new == old:
        return False
    value: int | list[int] = new[0] if isinstance(sections, int) and len(set(new)) == 1 else new
    args = list(node.args)
    if len(args) > 1:
        args[1] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, "split_size_or_sections": value}
    return True


def _contracted(node: fx.Node, groups: GroupSet) -> tuple[str, ...]:
    q = node.args[0]
    info = groups.nodes.get(q.name) if isinstance(q, fx.Node) else None
    return info.axes[-1] if info and info.axes else ()


_Size = int | tuple[int, int] | None
"""An output axis' slim size: a number, None (no group runs along it), or (kept, dense) where the axis
also folds in a factor no group runs along (the batch: SAM's ``B·heads``), whose size is the graph's
own argument scaled by kept / dense."""


def _size(axis: tuple[str, ...], kept: dict[str, int], groups: GroupSet) -> _Size:
    if not axis:
        return None
    named = [g for g in axis if g]
    slim = math.prod(kept[g] for g in named)
    if len(named) == len(axis):
        return slim
    return slim, math.prod(groups.group(g).size for g in named)


def _rewrite_reshape(node: fx.Node, sizes: list[_Size]) -> bool:
    is_reshape = (node.op == "call_method" and node.target in _RESHAPES) or node.target is torch.reshape
    if is_reshape:
        packed = len(node.args) == 2 and isinstance(node.args[1], (tuple, list))
        old = list(node.args[1]) if packed else list(node.args[1:])  # type: ignore[arg-type]
        if len(old) != len(sizes):  # the whole shape of another tensor (``x.shape``): slim at run time
            return False
        new = _replace(node, old, sizes)
        if new != old:
            node.args = (node.args[0], tuple(new)) if packed else (node.args[0], *new)
            return True
    elif node.op == "call_method" and node.target == "unflatten":
        dim, old = int(node.args[1]), list(node.args[2])  # type: ignore[arg-type]
        new = _replace(node, old, sizes[dim : dim + len(old)])
        if new != old:
            node.args = (node.args[0], dim, tuple(new))
            return True
    return False


def _replace(node: fx.Node, old: list[Any], sizes: list[_Size]) -> list[Any]:
    return [_scaled(node, o, s) if isinstance(s, tuple) else s if s is not None and o != -1 else o
            for o, s in zip(old, sizes, strict=True)]  # fmt: skip


def _scaled(node: fx.Node, old: Any, size: tuple[int, int]) -> Any:
    """``old`` (a literal, or a node computing ``batch · dense`` at run time) times kept / dense:
    ``B * dense`` becomes ``B * kept``, anything else ``old * kept // dense``."""
    slim, dense = size
    if old == -1 or slim == dense:
        return old
    if isinstance(old, int):
        return old // dense * slim
    if _reads_shape_of_slim(old):
        return old  # the slim tensor's own size, read at run time, is already slim
    if isinstance(old, fx.Node) and old.target is operator.mul and len(old.args) == 2:
        (a, b) = old.args
        other, factor = (a, b) if isinstance(b, int) else (b, a)
        if isinstance(factor, int) and not isinstance(factor, bool) and factor % dense == 0:
            with node.graph.inserting_before(node):  # B * heads → B * kept: no division to export
                return node.graph.call_function(operator.mul, (other, factor // dense * slim))
    with node.graph.inserting_before(node):
        times = node.graph.call_function(operator.mul, (old, slim))
        return node.graph.call_function(operator.floordiv, (times, dense))


def _reads_shape_of_slim(arg: Any) -> bool:
    """``t.shape[i]`` / ``t.size(i)`` of a tensor inside the graph: its value follows the slim sizes."""
    if not isinstance(arg, fx.Node):
        return False
    if arg.op == "call_method" and arg.target == "size":
        return True
    src = arg.args[0] if arg.target is operator.getitem and arg.args else None
    return isinstance(src, fx.Node) and (
        (src.op == "call_function" and src.target is getattr and src.args[1:] == ("shape",))
        or (src.op == "call_method" and src.target == "size")
    )
