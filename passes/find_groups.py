"""find_groups: the dependency-graph analysis. Graph in, frozen ``GroupSet`` out.

Pattern: the residual branches ``find_blocks`` reports. Result: per branch, the groups P3B prunes
— residual channels read (input columns of every linear reading the branch's first input),
residual channels written (output rows of the last linear, and per-channel parameters between
it and the residual add), and the inner index spaces found by ``Tracker`` (heads, per-head
dimension, hidden neurons) — each with members, size, exact parameter structure and MAC terms.
Why: the scheduler prices one more element of a group from this, the rewrite slices by it.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers.drop import DropPath
from torch import fx, nn

from p3b_fx.core import meta
from p3b_fx.core.groups import (
    ROLE_ORDER,
    Block,
    BlockKind,
    Factor,
    FlopTerm,
    Group,
    GroupSet,
    Member,
    NodeInfo,
    ParamSpec,
    Role,
)  # fmt: skip
from p3b_fx.errors import UnsupportedModelError
from passes.annotate_shapes import AnnotateShapesPass
from passes.axis_labels import Labels
from passes.find_blocks import Branch, find_blocks, is_attention_op, is_linear
from passes.track_axes import Tracker, describe

_CHANNEL_MODULES = (nn.Dropout, nn.Identity, DropPath)
_ROLE_ORDER = {role: i for i, role in enumerate(ROLE_ORDER)}


def ensure_shapes(gm: fx.GraphModule) -> None:
    """Annotate shapes if the graph has none yet (uses the input shape ``trace`` recorded)."""
    if any(meta.SHAPE not in n.meta for n in gm.graph.nodes):
        shape = gm.meta.get(meta.INPUT_SHAPE)
        if shape is None:
            raise UnsupportedModelError("graph has no input shape: trace the model with p3b_fx.trace first")
        AnnotateShapesPass(tuple(shape))(gm)


def find_groups(gm: fx.GraphModule) -> GroupSet:
    """All groups of coupled parameter slices in ``gm``; raises if it has no transformer block."""
    ensure_shapes(gm)
    search = find_blocks(gm)
    blocks: list[Block] = []
    groups: list[Group] = []
    infos: dict[str, NodeInfo] = {}
    names = {n.name: n for n in gm.graph.nodes}
    for branch in search.branches:
        block, block_groups, block_infos = _analyse(gm, branch, names)
        blocks.append(block)
        groups.extend(block_groups)
        infos.update(block_infos)
    if not blocks:
        detail = "; ".join(search.unsupported[:3]) or "no residual add found"
        raise UnsupportedModelError(
            f"{gm.__class__.__name__}: no residual sub-block with a first and a last nn.Linear ({detail}). "
            "p3b-fx prunes transformer blocks (Attention / MLP); CNNs such as ResNet are not supported"
        )
    in_blocks = {n for b in search.branches for n in b.nodes}
    params_total = sum(p.numel() for p in gm.parameters())
    return GroupSet(tuple(groups), tuple(blocks), params_total, _nonblock_flops(gm, in_blocks), infos,
                    search.unsupported)  # fmt: skip


def _analyse(
    gm: fx.GraphModule, br: Branch, names: dict[str, fx.Node]
) -> tuple[Block, list[Group], dict[str, NodeInfo]]:
    nodes = [names[n] for n in br.nodes]
    read, write = names[br.linears[0]], names[br.linears[-1]]
    tracker = Tracker(gm, Labels(prefix=br.name))
    tracker.run(nodes, read, write)
    inner, leaf_group = _inner_groups(br, tracker)
    read_g = _read_group(gm, br, read, nodes)
    write_g = _write_group(gm, br, write, names[br.branch_input])
    groups = sorted([read_g, *inner, write_g], key=lambda g: _ROLE_ORDER[g.role])
    dims = _param_dims(tracker, leaf_group, read_g, write_g)
    params = _param_specs(gm, nodes, dims)
    flops = _flop_terms(gm, nodes, tracker, leaf_group, dims)
    infos = {
        n.name: NodeInfo(axes=_axes(tracker, s, leaf_group), sdpa_scale=tracker.sdpa_scales.get(n.name))
        for n, s in tracker.states.items()
        if _is_state(s)
    }
    block = Block(br.name, br.kind, tuple(g.name for g in groups), params, flops, br.input_node, br.add_node,
                  read.name, write.name, br.branch_input)  # fmt: skip
    return block, groups, infos


def _is_state(s: Any) -> bool:
    return not (s and isinstance(s[0], tuple) and s[0] and isinstance(s[0][0], tuple))


def _axes(t: Tracker, state: Any, leaf_group: dict[str, str]) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(leaf_group[leaf] for leaf in t.labels.axis_leaves(axis)) for axis in state)


def _inner_groups(br: Branch, t: Tracker) -> tuple[list[Group], dict[str, str]]:
    first = next(iter(t.labels.sizes))
    leaves = t.labels.leaves(first)
    reaching = set(t.labels.axis_leaves(t.params.get((f"{_target(t, br.linears[-1])}.weight", 1), ())))
    groups: list[Group] = []
    leaf_group: dict[str, str] = {}
    for leaf in leaves:
        role = _role(t.labels, leaf, br.kind)
        reason = t.labels.reason(leaf) or (
            "" if leaf in reaching else "does not reach the block's last linear"
        )
        name = f"{br.name}:{role}"
        while name in leaf_group.values():
            name += "'"
        leaf_group[leaf] = name
        groups.append(Group(name, br.name, role, t.labels.sizes[leaf], (), not reason, reason))
    members = _members(t, leaf_group)
    return [_with_members(g, members.get(g.name, ())) for g in groups], leaf_group


def _target(t: Tracker, node_name: str) -> str:
    return str(next(n for n in t.gm.graph.nodes if n.name == node_name).target)


def _role(labels: Labels, leaf: str, kind: BlockKind) -> Role:
    name: str | None = leaf
    while name is not None:
        if name in labels.roles:
            return labels.roles[name]
        name = next((p for p, kids in labels.children.items() if name in kids), None)
    return Role.HIDDEN if kind is BlockKind.MLP else Role.INNER


def _members(t: Tracker, leaf_group: dict[str, str]) -> dict[str, tuple[Member, ...]]:
    out: dict[str, list[Member]] = {}
    for (param, dim), axis in t.params.items():
        leaves = t.labels.axis_leaves(axis)
        shape = tuple(t.labels.sizes[leaf] for leaf in leaves)
        for i, leaf in enumerate(leaves):
            out.setdefault(leaf_group[leaf], []).append(Member(param, dim, shape, i))
    return {k: tuple(v) for k, v in out.items()}


def _with_members(g: Group, members: tuple[Member, ...]) -> Group:
    return Group(g.name, g.block, g.role, g.size, members, g.prunable, g.reason)


def _read_group(gm: fx.GraphModule, br: Branch, read: fx.Node, nodes: list[fx.Node]) -> Group:
    point = read.args[0]
    assert isinstance(point, fx.Node)
    size = int(point.meta[meta.SHAPE][-1])
    readers = [u for u in point.users if is_linear(gm, u) and u.args[0] is point]
    members = tuple(Member(f"{u.target}.weight", 1, (size,), 0) for u in readers)
    return Group(f"{br.name}:read", br.name, Role.READ, size, members, True)


def _write_group(gm: fx.GraphModule, br: Branch, write: fx.Node, out: fx.Node) -> Group:
    size = int(write.meta[meta.SHAPE][-1])
    members = [Member(f"{write.target}.weight", 0, (size,), 0)]
    if getattr(gm.get_submodule(str(write.target)), "bias", None) is not None:
        members.append(Member(f"{write.target}.bias", 0, (size,), 0))
    reason, node = "", write
    while node is not out and not reason:
        users = list(node.users)
        if len(users) != 1:
            reason = f"'{node.name}' has {len(users)} users between the last linear and the residual add"
            break
        node, found = users[0], _channel_param(gm, users[0], node, size)
        if found is None:
            reason = f"no channel rule for '{node.name}' ({describe(gm, node)}) after the block's last linear"
        elif found:
            members.append(Member(found[0], found[1], (size,), 0))
    return Group(f"{br.name}:write", br.name, Role.WRITE, size, tuple(members), not reason, reason)


def _channel_param(
    gm: fx.GraphModule, node: fx.Node, src: fx.Node, size: int
) -> tuple[str, int] | tuple[()] | None:
    """For a per-channel op after the last linear: ``()`` (no parameter), ``(param, dim)``, or None."""
    if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), _CHANNEL_MODULES):
        return ()
    if node.target not in (operator.mul, torch.mul, "mul", "mul_"):
        return None
    other = node.args[1] if node.args[0] is src else node.args[0]
    if isinstance(other, (int, float)):
        return ()
    shape = other.meta.get(meta.SHAPE) if isinstance(other, fx.Node) else None
    if (
        isinstance(other, fx.Node)
        and other.op == "get_attr"
        and shape
        and math.prod(shape) == shape[-1] == size
    ):
        return (str(other.target), len(shape) - 1)
    return None


def _param_dims(
    t: Tracker, leaf_group: dict[str, str], read_g: Group, write_g: Group
) -> dict[tuple[str, int], tuple[Factor, ...]]:
    dims: dict[tuple[str, int], tuple[Factor, ...]] = {}
    for (param, dim), axis in t.params.items():
        leaves = t.labels.axis_leaves(axis)
        dims[(param, dim)] = tuple((t.labels.sizes[leaf], leaf_group[leaf]) for leaf in leaves)
    for g in (read_g, write_g):
        for m in g.members:
            dims[(m.param, m.dim)] = ((g.size, g.name),)
    return dims


def _param_specs(
    gm: fx.GraphModule, nodes: list[fx.Node], dims: dict[tuple[str, int], tuple[Factor, ...]]
) -> tuple[ParamSpec, ...]:
    all_params = dict(gm.named_parameters())
    used: list[str] = []
    for n in nodes:
        if n.op == "call_module":
            used += [f"{n.target}.{k}" for k, _ in gm.get_submodule(str(n.target)).named_parameters()]
        elif n.op == "get_attr" and str(n.target) in all_params:
            used.append(str(n.target))
    specs = []
    for name in dict.fromkeys(used):
        shape = all_params[name].shape
        specs.append(
            ParamSpec(name, tuple(dims.get((name, d), ((int(s), None),)) for d, s in enumerate(shape)))
        )
    return tuple(specs)


def _flop_terms(gm: fx.GraphModule, nodes: list[fx.Node], t: Tracker, leaf_group: dict[str, str],
                dims: dict[tuple[str, int], tuple[Factor, ...]]) -> tuple[FlopTerm, ...]:  # fmt: skip
    terms = []
    for n in nodes:
        if is_linear(gm, n):
            src = n.args[0]
            assert isinstance(src, fx.Node)
            tokens = math.prod(src.meta[meta.SHAPE][1:-1])
            w = f"{n.target}.weight"
            shape = gm.get_parameter(w).shape
            factors = [
                *dims.get((w, 0), ((int(shape[0]), None),)),
                *dims.get((w, 1), ((int(shape[1]), None),)),
            ]
            terms.append(FlopTerm(tokens, tuple(factors)))
        elif is_attention_op(n):
            terms.extend(_attention_flops(n, t, leaf_group))
    return tuple(terms)


def _factors(t: Tracker, state: Any, shape: tuple[int, ...], leaf_group: dict[str, str]) -> list[Factor]:
    out: list[Factor] = []
    for axis, size in zip(state, shape, strict=True):
        leaves = t.labels.axis_leaves(axis)
        out.extend([(t.labels.sizes[x], leaf_group[x]) for x in leaves] if leaves else [(int(size), None)])
    return out


def _attention_flops(n: fx.Node, t: Tracker, leaf_group: dict[str, str]) -> list[FlopTerm]:
    a, b = n.args[0], n.args[1]
    assert isinstance(a, fx.Node) and isinstance(b, fx.Node)
    sa, shape_a = t.state_or_empty(a), a.meta[meta.SHAPE]
    if n.target is F.scaled_dot_product_attention:
        v = n.args[2]
        assert isinstance(v, fx.Node)
        sv, shape_v = t.state_or_empty(v), v.meta[meta.SHAPE]
        nk = int(b.meta[meta.SHAPE][-2])
        qk = _factors(t, sa[1:], shape_a[1:], leaf_group)
        av = _factors(t, (*sa[1:-1], sv[-1]), (*shape_a[1:-1], shape_v[-1]), leaf_group)
        return [FlopTerm(nk, tuple(qk)), FlopTerm(nk, tuple(av))]
    sb, shape_b = t.state_or_empty(b), b.meta[meta.SHAPE]
    left = _factors(t, sa[1:], shape_a[1:], leaf_group)
    right = _factors(t, (sb[-1],), (shape_b[-1],), leaf_group)
    return [FlopTerm(1, tuple(left + right))]


def _nonblock_flops(gm: fx.GraphModule, in_blocks: set[str]) -> int:
    total = 0
    for n in gm.graph.nodes:
        if n.name in in_blocks or n.op != "call_module":
            continue
        mod, out = gm.get_submodule(str(n.target)), n.meta.get(meta.SHAPE)
        if isinstance(mod, nn.Linear) and out:
            total += math.prod(out[1:]) * mod.in_features
        elif isinstance(mod, nn.Conv2d) and out:
            k = math.prod(mod.kernel_size) * mod.in_channels // mod.groups
            total += math.prod(out[1:]) * k
    return int(total)
