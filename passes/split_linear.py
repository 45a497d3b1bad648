"""SplitLinearPass: a linear whose output is split into unequal sections becomes one linear per section;
FuseSplitPass puts them back together in the slim model.

Pattern: ``call_module L`` (``L`` exactly an ``nn.Linear``, called once), then only permutes, then
``split([s_0, s_1, …], dim)`` into sections of unequal size along the axis that is ``L``'s output
axis, each part read through ``getitem``. MobileViTv2's separable attention projects
``[query (1), key (d), value (d)]`` with one 1×1 convolution (a linear after
:class:`passes.pointwise_conv.PointwiseConvPass`) and splits it on the channel axis; ViT-22B-style
parallel blocks (timm's ``ParallelScalingBlock``) project ``[mlp hidden, q, k, v]`` with one linear.

Result: ``L`` becomes an ``nn.ModuleList`` of linears ``L.0``, ``L.1``, … holding rows
``[o_i, o_i + s_i)`` of the weight and bias, each called on the same input and followed by the same
permutes; part ``i`` of the split is that linear's output. Why: an axis made of sections of unequal
size has no labels the group analysis can follow (``axis_rules._unequal_split`` fixes it whole), so
the key and value channels of MobileViTv2's attention, which its products couple element by
element, could not be pruned. Each section is now the output axis of a linear of its own, with
labels of its own, as separate q, k and v projections are.

Same function up to rounding: each output element is the same dot product (a smaller matmul may
sum it in another order). The new Linears hold copies of the rows (a Parameter cannot be a view);
the traced model's linear keeps its own. The split paths are kept in ``gm.meta[SPLIT_KEY]``;
:class:`FuseSplitPass`, run on the slim model, concatenates the (sliced) sections back into one
module at ``L``'s path followed by a split with the kept sizes, so the deployed graph runs one
matmul (or one 1×1 convolution) as the traced model did.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx, nn

from p3b_fx.core import meta
from p3b_fx.core.pass_infra import GraphPass, PassResult, is_split, param_copy
from passes.axis_rules import permute_dims

SPLIT_KEY = meta.SPLIT_LINEARS


def _split_args(node: fx.Node) -> tuple[fx.Node, list[int], int] | None:
    """(input, sections, dim) of a ``split`` into a list of int sections, else None."""
    if not is_split(node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    sections = node.args[1] if len(node.args) > 1 else node.kwargs.get("split_size_or_sections")
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    if not isinstance(sections, (list, tuple)) or not all(type(s) is int and s > 0 for s in sections):
        return None
    if type(dim) is not int:
        return None
    return node.args[0], [int(s) for s in sections], dim


def _parts(node: fx.Node, n: int) -> list[fx.Node] | None:
    """The ``getitem`` users of a split (any part may be read by several, or by none), or None when
    the split is used otherwise (as a whole list, or sliced)."""
    for user in node.users:
        if user.op != "call_function" or user.target is not operator.getitem:
            return None
        if type(user.args[1]) is not int or not -n <= user.args[1] < n:
            return None
    return list(node.users)


def _one_user(node: fx.Node) -> bool:
    return len(node.users) == 1


def _linear_chain(gm: fx.GraphModule, x: fx.Node, dim: int) -> tuple[fx.Node, list[fx.Node]] | None:
    """(linear call, permutes from it to ``x``) when ``x`` is ``L(...)`` followed by permutes only,
    each used once, and ``dim`` of ``x`` is ``L``'s output axis; else None."""
    chain: list[fx.Node] = []
    node = x
    while node.op == "call_method" and node.target == "permute":
        if not _one_user(node) or not isinstance(node.args[0], fx.Node):
            return None
        try:
            permute_dims(node)
        except (TypeError, ValueError):  # dims computed at run time
            return None
        chain.insert(0, node)
        node = node.args[0]
    if node.op != "call_module" or type(gm.get_submodule(str(node.target))) is not nn.Linear:
        return None
    if not _one_user(node) or len(node.args) != 1 or node.kwargs:
        return None
    if not chain:  # no permute tells the rank: the split must name the last axis itself
        return (node, chain) if dim == -1 else None
    rank = len(permute_dims(chain[0]))
    pos = rank - 1  # the linear's output axis, followed through the permutes
    for p in chain:
        dims = [d % rank for d in permute_dims(p)]
        if len(dims) != rank:
            return None
        pos = dims.index(pos)
    return (node, chain) if pos == dim % rank else None


@dataclass(frozen=True)
class SplitLinearPass(GraphPass):
    """Rewrite each ``Linear → permutes → split(unequal sections)`` into one linear per section (edits
    ``gm`` in place). Equal sections are left alone: the axis rules follow them as a reshape."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        done: list[str] = list(gm.meta.get(SPLIT_KEY, ()))
        calls: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                calls[str(node.target)] = calls.get(str(node.target), 0) + 1
        read = {str(n.target).rpartition(".")[0] for n in gm.graph.nodes if n.op == "get_attr"}
        changed = False
        for node in list(gm.graph.nodes):
            found = _split_args(node)
            if found is None:
                continue
            x, sections, dim = found
            if len(set(sections)) == 1:
                continue
            parts = _parts(node, len(sections))
            chain = _linear_chain(gm, x, dim)
            if parts is None or chain is None:
                continue
            path = str(chain[0].target)
            linear = gm.get_submodule(path)
            assert isinstance(linear, nn.Linear)
            if calls[path] != 1 or path in read or sum(sections) != linear.out_features:
                continue
            self._rewrite(gm, node, chain, parts, sections)
            done.append(path)
            changed = True
        if changed:
            # the 1×1 convolutions among them (passes.pointwise_conv) are their sections now
            convs = gm.meta.get(meta.POINTWISE_CONVS, ())
            split = set(done)
            gm.meta[meta.POINTWISE_CONVS] = tuple(
                q for p in convs for q in ([f"{p}.{i}" for i in range(len(_sections(gm, p)))]
                                          if p in split else [p])
            )  # fmt: skip
            gm.meta[SPLIT_KEY] = tuple(done)
        return PassResult(gm, changed)

    @staticmethod
    def _rewrite(
        gm: fx.GraphModule, split: fx.Node, chain: tuple[fx.Node, list[fx.Node]], parts: list[fx.Node],
        sections: list[int],
    ) -> None:  # fmt: skip
        call, permutes = chain
        path = str(call.target)
        linear = gm.get_submodule(path)
        assert isinstance(linear, nn.Linear)
        sections_list = nn.ModuleList()
        start = 0
        for size in sections:
            part = nn.Linear(linear.in_features, size, bias=linear.bias is not None, device="meta")
            part.weight = param_copy(linear.weight, linear.weight[start : start + size])
            if linear.bias is not None:
                part.bias = param_copy(linear.bias, linear.bias[start : start + size])
            sections_list.append(part)
            start += size
        gm.set_submodule(path, sections_list)
        outs: list[fx.Node] = []
        with gm.graph.inserting_before(split):
            for i in range(len(sections)):
                out = gm.graph.call_module(f"{path}.{i}", call.args)
                for p in permutes:
                    out = gm.graph.call_method("permute", (out, *p.args[1:]), dict(p.kwargs))
                outs.append(out)
        n = len(sections)
        for item in parts:
            index = item.args[1]
            assert isinstance(index, int)
            item.replace_all_uses_with(outs[index % n])
            gm.graph.erase_node(item)
        gm.graph.erase_node(split)
        for node in reversed([call, *permutes]):
            gm.graph.erase_node(node)


def _section_call(gm: fx.GraphModule, node: fx.Node, path: str) -> int | None:
    """Section index when ``node`` calls module ``path.i`` on one input, else None."""
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return None
    parent, _, index = str(node.target).rpartition(".")
    return int(index) if parent == path and index.isdigit() else None


@dataclass(frozen=True)
class FuseSplitPass(GraphPass):
    """Put each split linear's sections back into one module at its path (``gm.meta[SPLIT_KEY]``):
    weights and biases concatenated along the output, then ``split`` with the kept sizes along the
    output channel axis (last for an ``nn.Linear``, 1 for a 1×1 ``nn.Conv2d``, which
    :class:`passes.pointwise_conv.SlimConvPass` made the sections of a convolution). Left as they are
    when any section is gone, called more than once, or reads another input than the others."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        paths = list(gm.meta.get(SPLIT_KEY, ()))
        fused: list[str] = []
        for path in paths:
            try:
                container = gm.get_submodule(path)
            except AttributeError:  # removed with its block
                continue
            if not isinstance(container, nn.ModuleList) or len(container) == 0:
                continue
            calls: dict[int, list[fx.Node]] = {}
            for node in gm.graph.nodes:
                i = _section_call(gm, node, path)
                if i is not None:
                    calls.setdefault(i, []).append(node)
            if sorted(calls) != list(range(len(container))) or any(len(c) != 1 for c in calls.values()):
                continue
            nodes = [calls[i][0] for i in range(len(container))]
            if len({n.args[0] for n in nodes}) != 1:
                continue
            parts = [m for m in container if type(m) in (nn.Linear, nn.Conv2d)]
            if len(parts) != len(container):
                continue
            module = self._fused(parts)  # type: ignore[arg-type]  # Linear or Conv2d, checked above
            if module is None:
                continue
            self._rewrite(gm, path, module, nodes, [_out_size(m) for m in parts])
            fused.append(path)
        if fused:
            gm.meta[SPLIT_KEY] = tuple(p for p in paths if p not in fused)
        return PassResult(gm, bool(fused))

    @staticmethod
    def _fused(parts: list[nn.Linear | nn.Conv2d]) -> nn.Linear | nn.Conv2d | None:
        if len({type(p) for p in parts}) != 1:
            return None
        weights = [p.weight for p in parts]
        biases = [p.bias for p in parts]
        if len({w.shape[1:] for w in weights}) != 1 or len({b is None for b in biases}) != 1:
            return None
        first = parts[0]
        weight = torch.cat(weights, 0)
        module: nn.Linear | nn.Conv2d
        if isinstance(first, nn.Linear):
            module = nn.Linear(first.in_features, weight.shape[0], bias=first.bias is not None, device="meta")
        else:
            assert isinstance(first, nn.Conv2d)
            has_bias = first.bias is not None
            module = nn.Conv2d(first.in_channels, weight.shape[0], 1, bias=has_bias, device="meta")
        module.weight = param_copy(first.weight, weight)
        if first.bias is not None:
            module.bias = param_copy(first.bias, torch.cat([b for b in biases if b is not None], 0))
        return module

    @staticmethod
    def _rewrite(
        gm: fx.GraphModule, path: str, module: nn.Linear | nn.Conv2d, nodes: list[fx.Node], sizes: list[int]
    ) -> None:
        gm.set_submodule(path, module)
        axis = -1 if isinstance(module, nn.Linear) else 1
        first = min(nodes, key=lambda n: list(gm.graph.nodes).index(n))
        with gm.graph.inserting_before(first):
            call = gm.graph.call_module(path, (first.args[0],))
            split = gm.graph.call_method("split", (call, sizes, axis))
            items = [gm.graph.call_function(operator.getitem, (split, i)) for i in range(len(nodes))]
        for node, item in zip(nodes, items, strict=True):
            if meta.SHAPE in node.meta:
                item.meta[meta.SHAPE] = node.meta[meta.SHAPE]
            node.replace_all_uses_with(item)
            gm.graph.erase_node(node)


def _out_size(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    assert isinstance(module, nn.Conv2d)
    return module.out_channels


def _sections(gm: fx.GraphModule, path: str) -> nn.ModuleList:
    sections = gm.get_submodule(path)
    assert isinstance(sections, nn.ModuleList)
    return sections


__all__ = ["SPLIT_KEY", "FuseSplitPass", "SplitLinearPass"]
