"""Tracker: carries group labels from a block's first linear to its last, one rule per node.

Pattern: the nodes of one residual branch (see ``find_blocks``). Result: the label state of every
tracked node, the parameter dimensions the labels run along, the pinned SDPA scales, and the
reasons any label is unprunable. Why: q, k and v heads, the per-head dimension and MLP hidden
neurons are coupled through reshapes, permutes, unbinds and contractions; following indices
through the graph finds them for any model built from these ops, and fails closed on others.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import fx

from p3b_fx.core import meta
from p3b_fx.core.groups import Role
from passes.axis_labels import Labels, State, Unsupported
from passes.axis_rules import Rule, build_rules, consumes, node_key, shape_access
from passes.find_blocks import is_linear

_RULES: dict[Any, Rule] | None = None


def rules() -> dict[Any, Rule]:
    global _RULES  # noqa: PLW0603 - built once, read-only afterwards
    if _RULES is None:
        _RULES = build_rules()
    return _RULES


def describe(gm: fx.GraphModule, node: fx.Node) -> str:
    key = node_key(gm, node)
    what = getattr(key, "__name__", str(key))
    return f"{node.op} {what}"


@dataclass
class Tracker:
    gm: fx.GraphModule
    labels: Labels
    states: dict[fx.Node, Any] = field(default_factory=dict)
    zero: dict[fx.Node, bool] = field(default_factory=dict)
    params: dict[tuple[str, int], tuple[str, ...]] = field(default_factory=dict)
    sdpa_scales: dict[str, float] = field(default_factory=dict)
    failed: set[fx.Node] = field(default_factory=set)
    secondary: set[str] = field(default_factory=set)  # roots started at a linear of its own (run)
    alias: dict[str, str] = field(default_factory=dict)  # merged label -> the label it merged into
    norms: list[fx.Node] = field(default_factory=list)  # norms over a group axis (axis_rules._norm_over_last)
    mids: list[fx.Node] = field(default_factory=list)  # linears between the first and the last (mid_linear)
    gate_first_out: bool = False  # a sum over a group axis relies on zeros at the first linear's output
    # the first linear (run), and the BatchNorm right after it that the first-out gate follows, so
    # that zeros reach what comes next (EfficientFormerV2's q = BN(conv(x))): axis_rules.batch_norm
    read: fx.Node | None = None
    first_out_site: fx.Node | None = None
    lane: int = 0  # the block's lane this tracker follows (only lane 0's first-out gate may move)
    hidden: set[str] = field(default_factory=set)  # the output labels of the linears in ``mids``
    # untracked operands the slim graph gathers at run time: node -> (operand, operand dim, group axis)
    gathers: dict[fx.Node, list[tuple[fx.Node, int, tuple[str, ...]]]] = field(default_factory=dict)
    body: set[fx.Node] = field(default_factory=set)  # the branch's nodes (run)

    def state_or_empty(self, node: fx.Node) -> State:
        if node in self.states:
            return self.states[node]  # type: ignore[no-any-return]
        return ((),) * len(node.meta[meta.SHAPE])

    def record_param(self, name: str, dim: int, axis: tuple[str, ...]) -> None:
        if self.params.setdefault((name, dim), axis) != axis:
            raise Unsupported(f"parameter '{name}' dim {dim} is reached by two different group axes")

    def unify_axis(
        self, node: fx.Node, a: tuple[str, ...], b: tuple[str, ...], size_a: int, size_b: int
    ) -> tuple[str, ...]:
        a, b = self.resolve(a), self.resolve(b)
        if self.same_axis(a, b):
            return a
        if not a and size_a == 1:
            return b
        if not b and size_b == 1:
            return a
        merged = self._merge(a, b)
        if merged is not None:
            return merged
        raise Unsupported("two different index spaces meet on one axis")

    def same_axis(self, a: tuple[str, ...], b: tuple[str, ...]) -> bool:
        """Whether axes ``a`` and ``b`` (resolved) are one index space: the same labels, or labels that
        refine to the same leaves (an axis ``D`` and the ``(D/2, 2)`` a strided slice split it into,
        merged back by a reshape)."""
        return a == b or (bool(a) and bool(b) and self.labels.axis_leaves(a) == self.labels.axis_leaves(b))

    def _merge(self, a: tuple[str, ...], b: tuple[str, ...]) -> tuple[str, ...] | None:
        """Where ``a`` and ``b`` meet element by element and one side comes from a projection of its
        own (:meth:`run`: a linear reading the block input through other ops), they are one index
        space: merge them label by label (same count, same sizes). Two axes of the first linear's own
        labels never merge (they are different parts of one output). Returns the merged axis, or None."""
        sizes = self.labels.sizes
        own = [all(self.labels.root(x) in self.secondary for x in side) for side in (a, b)]
        if not any(own) or not a or not b:
            return None
        a, b = self._align(a, b, own)
        if len(a) != len(b) or any(sizes[x] != sizes[y] for x, y in zip(a, b, strict=True)):
            return None
        keep, drop = (a, b) if not own[0] or own[1] else (b, a)
        pairs = [pair for k, d in zip(keep, drop, strict=True) for pair in self.labels.merge(k, d)]
        self._rename(pairs)  # the parts of split labels too
        merged: tuple[str, ...] = self.resolve(keep)
        return merged

    def _align(
        self, a: tuple[str, ...], b: tuple[str, ...], own: list[bool]
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """``a`` and ``b`` with a one-label side that is not its own projection's refined into the
        factor sizes of the other side, where the element counts agree: the query heads meet the
        (key/value heads, copies) that ``repeat_interleave`` made of the keys (grouped-query
        attention), so the query heads split into (key/value heads, query heads per key/value head).
        Otherwise ``a`` and ``b`` as they are."""
        sizes = self.labels.sizes
        for one, other, own_one in ((a, b, own[0]), (b, a, own[1])):
            if own_one or len(one) != 1 or len(other) < 2:
                continue
            if sizes[one[0]] != math.prod(sizes[x] for x in other):
                continue
            parts, rest = [], one[0]
            try:
                for x in other[:-1]:
                    first, rest = self.labels.split(rest, sizes[x])
                    parts.append(first)
            except Unsupported:
                return a, b
            refined = (*parts, rest)
            return (refined, b) if one is a else (a, refined)
        return a, b

    def _rename(self, pairs: Sequence[tuple[str, str]]) -> None:
        """Point each (dropped, kept) label pair's first at its second, in every state and param."""
        self.alias.update(pairs)
        self.states = {n: self.resolve(st) for n, st in self.states.items()}
        self.params = {k: self.resolve(axis) for k, axis in self.params.items()}

    def resolve(self, value: Any) -> Any:
        """``value`` (a label, an axis, a state, nested) with every merged label replaced by the one
        it merged into; rules hold copies of states taken before a merge."""
        if isinstance(value, tuple):
            return tuple(self.resolve(v) for v in value)
        while isinstance(value, str) and value in self.alias:
            value = self.alias[value]
        return value

    def unify(
        self, node: fx.Node, a: State, b: State, rank: int, sizes: tuple[Sequence[int], Sequence[int]]
    ) -> State:
        """The state of an elementwise combination of ``a`` and ``b`` (tensor sizes ``sizes``, right-
        aligned by broadcasting). Two different labels on one axis are Unsupported. A label against an
        axis no label runs along is exact only where that axis broadcasts (size 1); otherwise the other
        operand keeps every element of the axis, so the label is marked (fixed), not dropped."""
        a = ((),) * (rank - len(a)) + tuple(self.resolve(a))
        b = ((),) * (rank - len(b)) + tuple(self.resolve(b))
        size_a = (1,) * (rank - len(sizes[0])) + tuple(sizes[0])
        size_b = (1,) * (rank - len(sizes[1])) + tuple(sizes[1])
        out = []
        for x, y, sx, sy in zip(a, b, size_a, size_b, strict=True):
            x, y = self.resolve(x), self.resolve(y)  # noqa: PLW2901 - an earlier axis may have merged
            if self.same_axis(x, y):
                out.append(x)
                continue
            merged = self._merge(x, y) if x != y and x and y else None
            if merged is not None:
                out.append(merged)
                continue
            if x != y and x and y and 1 in (sx, sy) and sx != sy:  # a one-element axis broadcasts
                one = x if sx == 1 else y
                reason = f"a one-element axis broadcast against a longer one at node '{node.name}'"
                self.labels.mark((one,), reason)
                out.append(y if sx == 1 else x)
                continue
            if x != y and x and y:
                raise Unsupported("two different index spaces meet on one axis")
            if (x and not y and sy != 1) or (y and not x and sx != 1):
                self.labels.mark((x or y,), f"meets an axis no group runs along at node '{node.name}'")
            out.append(x or y)
        return tuple(out)

    def contract(self, node: fx.Node, axis: tuple[str, ...], operands: tuple[fx.Node, ...]) -> None:
        for label in axis:
            self.labels.contracted.add(label)
            self.labels.roles[label] = Role.HEAD_DIM
        # Σ_l a_l·b_l over a pruned l drops out when either operand is 0 there (the first linear's
        # output is masked; k from a separate projection is not, but q·k only needs q's zeros)
        if axis and not any(self.zero.get(op, False) for op in operands):
            self.labels.mark((axis,), f"contracted at node '{node.name}' after ops that do not keep zeros")

    def run(self, nodes: list[fx.Node], read: fx.Node, write: fx.Node) -> None:
        """Track from ``read``, the block's first linear, to ``write``, its last. Linears that read
        the same input (or tokens of it: CaiT's class attention takes q from ``x[:, 0]``) with as
        many outputs (separate q, k and v projections; a SwiGLU's gate and value) start on the same
        label: sharing a label only couples more, and where their outputs meet (q · k, gate * value)
        they must agree element by element anyway. Only the first linear's output is masked (the
        hard-masked model zeroes pruned elements there), so only it keeps zeros."""
        first = self.labels.new(int(read.meta[meta.SHAPE][-1]))
        self.read = read
        params = dict(self.gm.named_parameters())
        root = unindexed(read.args[0])
        for node in nodes[nodes.index(read) :]:
            reads = node.args[0] if node.args else None
            sibling = is_linear(self.gm, node) and unindexed(reads) is root and node is not write
            if node is read or (sibling and node.meta[meta.SHAPE][-1] == read.meta[meta.SHAPE][-1]):
                self.states[node] = ((),) * (len(node.meta[meta.SHAPE]) - 1) + ((first,),)
                self.zero[node] = node is read
                self.record_param(f"{node.target}.weight", 0, (first,))
                if f"{node.target}.bias" in params:
                    self.record_param(f"{node.target}.bias", 0, (first,))
        body = self.body = set(nodes)
        for node in nodes[nodes.index(read) + 1 :]:
            if node is not write and any(i in self.states for i in node.all_input_nodes):
                self._step(node)
            elif (
                node is not write
                and node not in self.states  # not the first linear's sibling
                and is_linear(self.gm, node)
                and self._reads_block_input(node, body, root)
            ):
                self._start(node, params)
        self._finish(write)

    def _reads_block_input(self, node: fx.Node, body: set[fx.Node], root: Any) -> bool:
        """Whether ``node`` reads the block input through ops of the branch that carry no group
        (PVT's and Twins' kv projection of a pooled copy of the input)."""
        seen: set[fx.Node] = set()
        stack = list(node.all_input_nodes)
        while stack:
            n = stack.pop()
            if n is root:
                return True
            if n in seen or n not in body:
                continue
            seen.add(n)
            stack += n.all_input_nodes
        return False

    def _start(self, node: fx.Node, params: dict[str, Any]) -> None:
        """A linear of the branch that reads the block input through other ops (not the first
        linear's sibling): its output features are a root label of their own, which merges with
        the first linear's where the two meet (q with k)."""
        label = self.labels.new(int(node.meta[meta.SHAPE][-1]))
        self.secondary.add(label)
        self.states[node] = ((),) * (len(node.meta[meta.SHAPE]) - 1) + ((label,),)
        self.zero[node] = False
        try:
            self.record_param(f"{node.target}.weight", 0, (label,))
            if f"{node.target}.bias" in params:
                self.record_param(f"{node.target}.bias", 0, (label,))
        except Unsupported as exc:
            self.labels.mark(((label,),), f"{exc} at node '{node.name}'")

    def _step(self, node: fx.Node) -> None:
        rule = rules().get(node_key(self.gm, node))
        try:
            if rule is None:
                raise Unsupported(f"no grouping rule for {describe(self.gm, node)}")
            out = rule(node, self)
            _check_rank(node, out)
        except Unsupported as exc:
            self.failed.add(node)
            for i in node.all_input_nodes:
                self._mark_any(self.states.get(i), f"{exc} at node '{node.name}'")
            return
        if out is not None:
            self.states[node] = self.resolve(out)

    def _mark_any(self, state: Any, reason: str) -> None:
        if state and isinstance(state[0], tuple) and state[0] and isinstance(state[0][0], tuple):
            for s in state:
                self.labels.mark(s, reason)
        else:
            self.labels.mark(state, reason)

    def _finish(self, write: fx.Node) -> None:
        src = write.args[0]
        state = self.states.get(src) if isinstance(src, fx.Node) else None
        if state is None:
            self.labels.mark_all(f"the block's last linear '{write.name}' does not read the tracked value")
        elif any(state[:-1]):
            self.labels.mark_all(f"group axes reach '{write.name}' on a non-feature axis")
        else:
            self.record_param(f"{write.target}.weight", 1, state[-1])
        self._check_escapes(write)

    def _check_escapes(self, write: fx.Node) -> None:
        quiet = (shape_access, consumes)
        for node in list(self.states):
            for user in node.users:
                ok = user is write or user in self.states or user in self.failed
                ok = ok or rules().get(node_key(self.gm, user)) in quiet
                if not ok:
                    self.labels.mark_all(
                        f"'{node.name}' leaves the block through '{user.name}', not its last linear"
                    )


def unindexed(node: Any) -> Any:
    """``x`` for ``x[...]`` (tokens picked from the block input), else ``node`` itself."""
    if isinstance(node, fx.Node) and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return node


def _check_rank(node: fx.Node, out: Any) -> None:
    """A rule's state must have one axis per axis of the node's tensor: a rule that miscounts (as
    ``unbind(-1)`` once did) would put labels on the wrong axes, so it fixes the groups instead."""
    shape = node.meta.get(meta.SHAPE)
    if out is None or not isinstance(shape, tuple) or not all(isinstance(d, int) for d in shape):
        return
    if len(out) != len(shape):
        raise Unsupported(
            f"the grouping rule for node '{node.name}' gave {len(out)} axes for a rank-{len(shape)} "
            "tensor (a p3b-fx bug: please report it with the model)"
        )
