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
from dataclasses import dataclass, field
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
    InnerNorm,
    Member,
    NodeInfo,
    ParamSpec,
    Role,
    lane_name,
)  # fmt: skip
from p3b_fx.errors import UnsupportedModelError
from passes.annotate_shapes import AnnotateShapesPass
from passes.axis_labels import Labels
from passes.axis_rules import (
    batch_norm,
    channel_params,
    gate_follows,
    node_key,
    norm_kind,
    norm_params,
    normalized_shape,
    permute_dims,
)
from passes.decompose_einsum import einsum_operands, einsum_terms
from passes.find_blocks import Branch, find_blocks, is_attention_op, is_linear
from passes.track_axes import Tracker, describe, rules, unindexed

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
    owner: dict[str, str] = {}  # parameter → the first block that uses it
    shared: dict[str, str] = {}  # a block whose module is called again → where
    unsupported = list(search.unsupported)
    in_blocks: set[str] = set()
    for branch in search.branches:
        block, block_groups, block_infos = _analyse(gm, branch, names)
        first = next((owner[spec.name] for spec in block.params if spec.name in owner), None)
        if first is not None:  # CoaT's parallel blocks call one MLP at three scales
            shared.setdefault(first, branch.add_node)
            unsupported.append(
                f"residual add '{branch.add_node}': calls the module of block '{first}' again (shared "
                "parameters); both are kept whole"
            )
            continue
        owner.update({spec.name: block.name for spec in block.params})
        blocks.append(block)
        groups.extend(block_groups)
        infos.update(block_infos)
        in_blocks.update(branch.nodes)
    for node, name in _params_read_outside(gm, in_blocks):  # weights tied to code outside the blocks
        if name in owner:
            shared.setdefault(owner[name], node)
    groups = [_shared_fixed(g, shared) for g in groups]
    if not blocks:
        detail = "; ".join(search.unsupported[:3]) or "no residual add found"
        raise UnsupportedModelError(
            f"{gm.__class__.__name__}: no residual sub-block with a first and a last nn.Linear ({detail}). "
            "p3b-fx prunes transformer blocks (Attention / MLP); CNNs such as ResNet are not supported"
        )
    params_total = sum(p.numel() for p in gm.parameters())
    return GroupSet(tuple(groups), tuple(blocks), params_total, _nonblock_flops(gm, in_blocks), infos,
                    tuple(unsupported))  # fmt: skip


def _params_read_outside(gm: fx.GraphModule, in_blocks: set[str]) -> list[tuple[str, str]]:
    """(node, parameter) for every parameter a node outside the blocks reads."""
    found: list[tuple[str, str]] = []
    for n in gm.graph.nodes:
        if n.name in in_blocks:
            continue
        if n.op == "call_module":
            found += [
                (n.name, f"{n.target}.{k}") for k, _ in gm.get_submodule(str(n.target)).named_parameters()
            ]
        elif n.op == "get_attr":
            found.append((n.name, str(n.target)))
    return found


def _shared_fixed(g: Group, shared: dict[str, str]) -> Group:
    """``g``, fixed when its block's parameters are read elsewhere too (its module called again,
    a tied weight): slicing them would change that other use, which no gather or scatter of this
    block follows."""
    again = shared.get(g.block)
    if again is None or not g.prunable:
        return g
    reason = f"the block's parameters are also read at '{again}' (a module called again, or tied weights)"
    return Group(g.name, g.block, g.role, g.size, g.members, False, reason)


def _analyse(
    gm: fx.GraphModule, br: Branch, names: dict[str, fx.Node]
) -> tuple[Block, list[Group], dict[str, NodeInfo]]:
    nodes = [names[n] for n in br.nodes]
    lanes = _lanes(br, names)
    trackers: list[Tracker] = []
    inner: list[Group] = []
    leaf_group: dict[str, str] = {}
    reads: list[Group] = []
    points: set[fx.Node] = set()
    for k, ((read, write), own) in enumerate(zip(lanes, _lane_nodes(nodes, lanes), strict=True)):
        tracker = Tracker(gm, Labels(prefix=br.name if k == 0 else f"{br.name}~{k}"), lane=k)
        tracker.run(own, read, write)
        kind = _lane_kind(br, own)
        lane_groups, lane_leaves = _inner_groups(br, tracker, write, set(leaf_group.values()), kind)
        trackers.append(tracker)
        inner += lane_groups
        leaf_group.update(lane_leaves)
        if read.args[0] not in points:  # lanes of one input share its read group (the first's)
            reads.append(_read_group(gm, br, read, k))
        points.add(read.args[0])  # type: ignore[arg-type]
    write_g, path = _write_group(gm, br, [w for _, w in lanes], names[br.branch_input])
    groups = sorted([*reads, *inner, write_g], key=lambda g: _ROLE_ORDER[g.role])
    dims = _param_dims(trackers, leaf_group, [*reads, write_g])
    params = _param_specs(gm, nodes, dims)
    buffers = _buffer_specs(gm, dims)
    flops = _flop_terms(gm, nodes, trackers, leaf_group, dims)
    infos = {
        n.name: NodeInfo(
            axes=_axes(t, s, leaf_group),
            sdpa_scale=t.sdpa_scales.get(n.name),
            gathers=_gathers(t, n, leaf_group),
        )
        for t in trackers
        for n, s in t.states.items()
        if _is_state(s)
    }
    for node, dim in path.reshapes if write_g.prunable else ():  # their channel size follows the write group
        rank = len(node.meta[meta.SHAPE])
        infos[node.name] = NodeInfo(
            axes=tuple((write_g.name,) if d == dim % rank else () for d in range(rank))
        )
    (read, write), *more = lanes
    first_out = trackers[0].first_out_site
    block = Block(br.name, br.kind, tuple(g.name for g in groups), params, flops, br.input_node, br.add_node,
                  read.name, write.name, br.branch_input,
                  tuple((r.name, w.name) for r, w in more), buffers,
                  path.norm.name if path.norm is not None else "",
                  _inner_norms(trackers, leaf_group) + _write_norms(path, write_g), path.dim,
                  tuple(n.name for t in trackers for n in t.mids),
                  any(t.gate_first_out for t in trackers),
                  first_out.name if first_out is not None else "")  # fmt: skip
    return block, groups, infos


def _write_norms(path: _WritePath, write: Group) -> tuple[InnerNorm, ...]:
    """The norms over the written channels (the write gate sits after the last, ``Block.write_site``;
    the mask pass gates each one's input too)."""
    return tuple(InnerNorm(n.name, ((write.size, write.name),)) for n in path.padded)


def _inner_norms(trackers: list[Tracker], leaf_group: dict[str, str]) -> tuple[InnerNorm, ...]:
    norms = []
    for t in trackers:
        for node in t.norms:
            leaves = t.labels.axis_leaves(t.resolve(t.states[node][-1]))
            factors = tuple((t.labels.sizes[leaf], leaf_group.get(leaf)) for leaf in leaves)
            norms.append(InnerNorm(node.name, factors))
    return tuple(norms)


def _lanes(br: Branch, names: dict[str, fx.Node]) -> list[tuple[fx.Node, fx.Node]]:
    """(first linear, last linear) of each parallel lane of ``br``: the linears that read one input
    (siblings, as in ``Tracker.run``) and every linear downstream of them. One lane, the branch's
    first and last linear, unless two or more inputs are read and no linear is downstream of two
    lanes (timm's ParallelThingsBlock: ``stack([attn_0(x), attn_1(x)]).sum(0)``)."""
    linears = [names[n] for n in br.linears]
    single = [(linears[0], linears[-1])]
    inside = set(linears)
    body = {names[n] for n in br.nodes}
    upstream: dict[fx.Node, set[fx.Node]] = {}  # the linears each linear depends on, in the branch
    for lin in linears:
        seen: set[fx.Node] = set()
        stack = [i for i in lin.all_input_nodes if i in body]
        while stack:
            n = stack.pop()
            if n not in seen:
                seen.add(n)
                stack += [i for i in n.all_input_nodes if i in body]
        upstream[lin] = seen & inside
    firsts = [lin for lin in linears if not upstream[lin]]
    roots = list(dict.fromkeys(unindexed(lin.args[0]) for lin in firsts))
    if len(roots) < 2:
        return _lanes_of_one_input(linears, firsts, upstream) or single
    lanes: list[tuple[fx.Node, fx.Node]] = []
    claimed: set[fx.Node] = set()
    for root in roots:
        heads = {lin for lin in firsts if unindexed(lin.args[0]) is root}
        mine = [lin for lin in linears if lin in heads or upstream[lin] & heads]
        if claimed & set(mine):
            return single
        claimed |= set(mine)
        lanes.append((mine[0], mine[-1]))
    return lanes if claimed == inside else single


def _lane_nodes(nodes: list[fx.Node], lanes: list[tuple[fx.Node, fx.Node]]) -> list[list[fx.Node]]:
    """The branch's nodes each lane tracks: all of them, less those that only other lanes' last
    linears depend on (lanes of one input would otherwise start on each other's linears)."""
    if len(lanes) < 2 or len({unindexed(r.args[0]) for r, _ in lanes}) == len(lanes):
        return [nodes] * len(lanes)
    body = set(nodes)

    def ancestors(last: fx.Node) -> set[fx.Node]:
        seen: set[fx.Node] = {last}
        stack = [last]
        while stack:
            for i in stack.pop().all_input_nodes:
                if i in body and i not in seen:
                    seen.add(i)
                    stack.append(i)
        return seen

    owned = [ancestors(w) for _, w in lanes]
    out = []
    for k, mine in enumerate(owned):
        others = set().union(*(a for j, a in enumerate(owned) if j != k)) - mine
        out.append([n for n in nodes if n not in others])
    return out


def _lanes_of_one_input(
    linears: list[fx.Node], firsts: list[fx.Node], upstream: dict[fx.Node, set[fx.Node]]
) -> list[tuple[fx.Node, fx.Node]]:
    """Lanes whose first linears read one input: ViT-22B's parallel block (timm's
    ``ParallelScalingBlock``) projects the MLP's hidden neurons and q, k, v from one norm (one
    linear split into sections, ``passes.split_linear``) and adds ``attn_out(…) + mlp_out(…)``. First
    linears that some later linear depends on together are one lane; each lane must end in one
    linear that depends on all of its first linears. [] when that gives fewer than two lanes."""
    lanes: list[list[fx.Node]] = []
    for first in firsts:
        after = {lin for lin in linears if first in upstream[lin]}
        joined = [lane for lane in lanes if any(upstream[lin] & set(lane) for lin in after)]
        merged = [first] + [lin for lane in joined for lin in lane]
        lanes = [lane for lane in lanes if lane not in joined] + [merged]
    if len(lanes) < 2:
        return []
    out: list[tuple[fx.Node, fx.Node]] = []
    claimed: list[fx.Node] = []
    for heads in lanes:
        mine = [lin for lin in linears if lin in heads or upstream[lin] & set(heads)]
        if not set(heads) <= upstream[mine[-1]]:  # also a lane of one linear: it ends where it starts
            return []
        out.append((mine[0], mine[-1]))
        claimed += mine
    if len(claimed) != len(set(claimed)) or len(claimed) != len(linears):
        return []
    return sorted(out, key=lambda lane: linears.index(lane[0]))


def _gathers(
    t: Tracker, node: fx.Node, leaf_group: dict[str, str]
) -> tuple[tuple[str, int, tuple[Factor, ...]], ...]:
    """``Tracker.gathers`` of ``node``: (operand, its dim, that dim's factors over the groups)."""
    out = []
    for operand, dim, axis in t.gathers.get(node, ()):
        leaves = t.labels.axis_leaves(t.resolve(axis))
        out.append(
            (operand.name, dim, tuple((t.labels.sizes[leaf], leaf_group.get(leaf)) for leaf in leaves))
        )
    return tuple(out)


def _is_state(s: Any) -> bool:
    return not (s and isinstance(s[0], tuple) and s[0] and isinstance(s[0][0], tuple))


def _axes(t: Tracker, state: Any, leaf_group: dict[str, str]) -> tuple[tuple[str, ...], ...]:
    """The groups along each axis of ``state``; ``""`` for an opaque factor (``NodeInfo.axes``)."""
    return tuple(tuple(leaf_group.get(leaf, "") for leaf in t.labels.axis_leaves(axis)) for axis in state)


def _lane_kind(br: Branch, own: list[fx.Node]) -> BlockKind:
    """An attention block's lane without attention (the MLP lane of a parallel block) is an MLP: its
    first linear's outputs are hidden neurons."""
    if br.kind is not BlockKind.ATTENTION or len(own) == len(br.nodes):
        return br.kind
    return br.kind if any(is_attention_op(n) for n in own) else BlockKind.MLP


def _inner_groups(
    br: Branch, t: Tracker, write: fx.Node, taken: set[str], kind: BlockKind
) -> tuple[list[Group], dict[str, str]]:
    leaves = list(dict.fromkeys(leaf for root in t.labels.roots() for leaf in t.labels.leaves(root)))
    reaching = set(t.labels.axis_leaves(t.params.get((f"{write.target}.weight", 1), ())))
    groups: list[Group] = []
    leaf_group: dict[str, str] = {}
    for leaf in leaves:
        if leaf in t.labels.opaque:  # the batch folded into a group axis: no group of its own
            continue
        role = _role(t.labels, leaf, kind, t.hidden)
        if role is Role.INNER and _beside_heads(t, leaf, kind):
            role = Role.HEAD_DIM
        ends_well = leaf in reaching or _contracted(t.labels, leaf)
        reason = t.labels.reason(leaf) or ("" if ends_well else "does not reach the block's last linear")
        name = f"{br.name}:{role}"
        while name in leaf_group.values() or name in taken:
            name += "'"
        leaf_group[leaf] = name
        groups.append(Group(name, br.name, role, t.labels.sizes[leaf], (), not reason, reason))
    members = _members(t, leaf_group)
    return [_with_members(g, members.get(g.name, ())) for g in groups], leaf_group


def _beside_heads(t: Tracker, leaf: str, kind: BlockKind) -> bool:
    """Whether ``leaf`` is a per-head dimension that no contraction names: a factor of a parameter
    dimension whose other factor is the heads (v's own head dims, ``v.weight`` rows as (heads, d),
    where q and k have head dims of their own: TNT, NeXt-ViT, Sapiens2's grouped-query attention;
    VOLO's outlook attention, which contracts no head dim at all)."""
    for axis in t.params.values():
        leaves = list(t.labels.axis_leaves(axis))
        before = leaves[: leaves.index(leaf)] if leaf in leaves else []  # a selector before the heads is none
        if any(_role(t.labels, other, kind, t.hidden) is Role.HEADS for other in before):
            return True
    return False


def _contracted(labels: Labels, leaf: str) -> bool:
    """Whether ``leaf`` (or a label it refines) is summed over by a contraction (q · k) that keeps it
    exact (``Tracker.contract``): the per-head dims of a q/k projection of their own, which v's
    projection does not share (TNT), end there rather than at the last linear; pruning them slims
    the q/k projection and the attention scores alone."""
    name: str | None = leaf
    while name is not None:
        if name in labels.contracted:
            return True
        name = next((p for p, kids in labels.children.items() if name in kids), None)
    return False


def _role(labels: Labels, leaf: str, kind: BlockKind, hidden: set[str]) -> Role:
    """The role ``leaf`` or a label it refines was given; else hidden for a linear's output features
    (an MLP's first linear, or a linear between the first and the last: ``hidden``), inner for
    other index spaces of an attention block."""
    name: str | None = leaf
    chain = []
    while name is not None:
        if name in labels.roles:
            return labels.roles[name]
        chain.append(name)
        name = next((p for p, kids in labels.children.items() if name in kids), None)
    return Role.HIDDEN if kind is BlockKind.MLP or hidden.intersection(chain) else Role.INNER


def _members(t: Tracker, leaf_group: dict[str, str]) -> dict[str, tuple[Member, ...]]:
    out: dict[str, list[Member]] = {}
    for (param, dim), axis in t.params.items():
        leaves = t.labels.axis_leaves(axis)
        shape = tuple(t.labels.sizes[leaf] for leaf in leaves)
        for i, leaf in enumerate(leaves):
            if leaf in leaf_group:
                out.setdefault(leaf_group[leaf], []).append(Member(param, dim, shape, i))
    return {k: tuple(v) for k, v in out.items()}


def _with_members(g: Group, members: tuple[Member, ...]) -> Group:
    return Group(g.name, g.block, g.role, g.size, members, g.prunable, g.reason)


def _read_group(gm: fx.GraphModule, br: Branch, read: fx.Node, lane: int) -> Group:
    point = read.args[0]
    assert isinstance(point, fx.Node)
    size = int(point.meta[meta.SHAPE][-1])
    readers = [u for u in point.users if is_linear(gm, u) and u.args[0] is point]
    members = tuple(Member(f"{u.target}.weight", 1, (size,), 0) for u in readers)
    return Group(lane_name(f"{br.name}:read", lane), br.name, Role.READ, size, members, True)


@dataclass
class _WritePath:
    """What :func:`_channel_path` collects between a block's last linear and its residual add."""

    members: list[Member] = field(default_factory=list)
    # reshapes and the axis (negative) of the channels in their output: that size follows the write group
    reshapes: list[tuple[fx.Node, int]] = field(default_factory=list)
    norm: fx.Node | None = None  # the last op on the way that does not keep zeros (a norm)
    padded: list[fx.Node] = field(default_factory=list)  # LayerNorms / RMSNorms over the channels
    dim: int = -1  # the channels' axis (negative) where the branch meets the residual add

    def add_param(self, found: tuple[str, int, fx.Node | None] | tuple[()], size: int) -> None:
        """Take a per-channel parameter :func:`_channel_param` found (``()``: none), and the reshape
        it is read through (MetaFormer's ``scale.view(C, 1, 1)``: resized with the channels)."""
        if found:
            self.members.append(Member(found[0], found[1], (size,), 0))
            if found[2] is not None:
                self.reshapes.append((found[2], self.dim))


def _write_group(
    gm: fx.GraphModule, br: Branch, writes: list[fx.Node], out: fx.Node
) -> tuple[Group, _WritePath]:
    """Output rows of each lane's last linear and the per-channel parameters after it, up to the
    residual add. Several lanes must meet in one ``stack(...).sum(0)`` (or one ``a + b``) first."""
    size = int(writes[0].meta[meta.SHAPE][-1])
    path = _WritePath()
    ends: list[fx.Node] = []
    reason = ""
    for write in writes:
        path.members.append(Member(f"{write.target}.weight", 0, (size,), 0))
        if getattr(gm.get_submodule(str(write.target)), "bias", None) is not None:
            path.members.append(Member(f"{write.target}.bias", 0, (size,), 0))
        end, why = _channel_path(gm, write, out if len(writes) == 1 else None, size, path)
        reason = reason or why
        ends.append(end)
    if len(writes) > 1 and not reason:
        join, reason = _join(ends, size)
        if join is not None:
            _, reason = _channel_path(gm, join, out, size, path)
    if len(writes) > 1 and path.norm is not None and not reason:
        reason = f"'{path.norm.name}' normalises a parallel lane's written channels"
    if len(writes) > 1 and path.dim != -1 and not reason:
        reason = "parallel lanes write their channels along another axis than the last"
    group = Group(f"{br.name}:write", br.name, Role.WRITE, size, tuple(path.members), not reason, reason)
    return group, path


def _channel_path(
    gm: fx.GraphModule, node: fx.Node, out: fx.Node | None, size: int, path: _WritePath
) -> tuple[fx.Node, str]:
    """Follow ``node``'s single users (besides those that read only its shape) through per-channel
    ops (their parameters and buffers into ``path.members``) and layout ops (the reshapes among them
    into ``path.reshapes``, whose channel size the slim rewrite resizes) to ``out``, or (``out``
    None) to the first op joining lanes. Returns (the last node reached, why the channels cannot be
    pruned: empty when they can)."""
    while node is not out:
        users = [u for u in node.users if not _reads_shape_only(u, node, path.dim)]
        if len(users) != 1:
            return node, f"'{node.name}' has {len(users)} users between the last linear and the residual add"
        user = users[0]
        if out is None and _joins(user):
            return node, ""
        off_last = _off_last_axis_step(gm, user, node, size, path)
        if off_last is not None:
            if off_last:
                return node, off_last
            node = user
            continue
        if _layout_op(user, node, size):
            if _is_reshape(user):
                path.reshapes.append((user, -1))
            node = user
            continue
        norm = _channel_norm(gm, user, node, size)
        if norm is not None:
            path.members += [Member(name, 0, (size,), 0) for name in norm[0]]
            path.norm = user
            if norm[1]:
                path.padded.append(user)
            node = user
            continue
        found = _channel_param(gm, user, node, size)
        if found is None:
            why = f"no channel rule for '{user.name}' ({describe(gm, user)}) after the block's last linear"
            return node, why
        path.add_param(found, size)
        node = user
    return node, ""


def _reads_shape_only(user: fx.Node, node: fx.Node, channels: int = -1) -> bool:
    """Whether ``user`` reads no more of ``node`` than a size pruning the channels leaves alone:
    ``x.reshape_as(node)`` (or ``view_as``) reads the shape at run time, so the slim width too; and
    ``node.shape[i]`` or ``node.size(i)`` of another axis than the channels' (``channels``, the
    last unless a permute moved them; SAM's and SAM 2's window unpartition computes the batch from
    ``windows.shape[0]``). A read of the channel count (``node.shape[-1]`` used in arithmetic)
    could let the width change values: it counts as a user, and the channels stay whole."""
    if user.op == "call_method" and user.target in ("reshape_as", "view_as"):
        return node not in user.args[:1]
    rank = len(node.meta.get(meta.SHAPE) or ())

    def other_axis(i: object) -> bool:
        return (
            isinstance(i, int)
            and not isinstance(i, bool)
            and rank > 0
            and -rank <= i < rank
            and i % rank != channels % rank
        )

    if user.op == "call_function" and user.target is getattr and user.args[1:] == ("shape",):
        return bool(user.users) and all(
            u.op == "call_function" and u.target is operator.getitem and other_axis(u.args[1])
            for u in user.users
        )
    return (
        user.op == "call_method"
        and user.target == "size"
        and len(user.args) == 2
        and other_axis(user.args[1])
    )


def _channel_norm(
    gm: fx.GraphModule, node: fx.Node, src: fx.Node, size: int
) -> tuple[list[str], bool] | None:
    """A norm of the ``size`` channels after the last linear, whose per-channel tensors are sliced
    with them and after which the write gate goes (it moves zeros): (those tensors, whether it is a
    LayerNorm or RMSNorm over the channels, whose statistics the slim model pads: SwinV2's post-norm,
    ``p3b_fx.core.padded_norm``), or (those tensors, False) for a BatchNorm1d over (N, ``size``),
    which normalises each channel alone; else None."""
    if node.args[:1] != (src,):
        return None
    shape = src.meta.get(meta.SHAPE)
    if not shape or shape[-1] != size:
        return None
    if norm_kind(gm, node) not in (None, "p"):
        params = norm_params(gm, node)
        if params is None or normalized_shape(gm, node) != (size,):
            return None
        return [p for p in params if p is not None], True
    if node.op != "call_module":
        return None
    mod = gm.get_submodule(str(node.target))
    if not isinstance(mod, nn.BatchNorm1d) or len(shape) != 2:
        return None
    return channel_params(mod, str(node.target)), False


_WINDOW_FUNCTIONS = {("timm.models.swin_transformer", "window_reverse"),
                     ("timm.models.swin_transformer_v2", "window_reverse"),
                     ("timm.models.swin_transformer_v2_cr", "window_reverse"),
                     ("timm.models.maxxvit", "window_reverse"), ("timm.models.maxxvit", "grid_reverse"),
                     ("timm.models.davit", "window_reverse"), ("timm.models.gcvit", "window_reverse"),
                     ("timm.models.hieradet_sam2", "window_unpartition"),
                     ("timm.models.vision_transformer_sam", "window_unpartition")}  # fmt: skip
"""Layout functions that move positions only and read the channel count off their input: each
views its channels-last input as windows, permutes the window axes and views it back (SAM's also
crops the padding), with ``C = windows.shape[-1]`` or ``-1`` for the channel axis (timm 1.0.31's
sources; ``tests/test_find_groups.py`` checks each keeps channel c at c and takes a narrower
channel axis)."""


_SAME_LAST_AXIS_METHODS = {"contiguous", "flatten", "reshape_as", "view_as"}
"""Methods that keep the last axis whole when it is as wide on both sides (row-major)."""


def _is_reshape(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in ("view", "reshape")) or node.target is torch.reshape


def _layout_op(node: fx.Node, src: fx.Node, size: int) -> bool:
    """Whether ``node`` moves, crops or regroups positions of ``src`` and keeps its ``size``
    channels whole on the last axis: a reshape with that last axis on both sides (row-major, so
    channel c stays channel c), ``contiguous``, ``roll`` over other axes, an index that leaves the
    last axis alone, Swin's window reverse. Zeros stay zeros and a narrower last axis passes."""
    shape_in, shape_out = src.meta.get(meta.SHAPE), node.meta.get(meta.SHAPE)
    if not shape_in or not shape_out or shape_in[-1] != size or shape_out[-1] != size:
        return False
    if not node.args or node.args[0] is not src:
        return False
    if _is_reshape(node) or (node.op == "call_method" and node.target in _SAME_LAST_AXIS_METHODS):
        return True
    if node.target is torch.roll:
        dims = node.kwargs.get("dims", node.args[2] if len(node.args) > 2 else None)
        dims = (dims,) if isinstance(dims, int) else dims
        rank = len(shape_in)
        return isinstance(dims, (tuple, list)) and all(
            isinstance(d, int) and d % rank != rank - 1 for d in dims
        )
    if node.target in ("permute", torch.permute, "transpose", torch.transpose, "swapaxes"):
        return _moved_axis(node, len(shape_in), len(shape_in) - 1) == len(shape_in) - 1  # SAM's unpartition
    if node.target is operator.getitem:
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        picks = [i for i in index if i is not None]
        if not all(isinstance(i, (int, slice)) for i in picks) or len(picks) > len(shape_in):
            return False
        return len(picks) < len(shape_in) or picks[-1] == slice(None)
    key = (getattr(node.target, "__module__", ""), getattr(node.target, "__name__", ""))
    return node.op == "call_function" and key in _WINDOW_FUNCTIONS


def _off_last_axis_step(
    gm: fx.GraphModule, user: fx.Node, node: fx.Node, size: int, path: _WritePath
) -> str | None:
    """A step of the channel path that moves the channels off the last axis (or back), or follows
    them there (ConvNeXt-style blocks: only ops that leave them alone): "" when ``user`` is taken,
    the reason the channels stay whole when it cannot be, None when the channels are last and stay."""
    moved = _channels_moved(user, node, size, path.dim)
    if moved is not None:
        path.dim = moved
        return ""
    if path.dim == -1:
        return None
    if user.op == "call_method" and user.target == "contiguous":
        return ""
    found = _channel_param(gm, user, node, size, path.dim)  # drop path; FastViT's (C, 1, 1) layer scale
    if found is not None:
        path.add_param(found, size)
        return ""
    batch_norm = _channel_batch_norm(gm, user, node, size, path.dim)
    if batch_norm is not None:  # EfficientFormerV2, LeViT-conv, EfficientViT: a conv's BatchNorm2d
        path.members += [Member(name, 0, (size,), 0) for name in batch_norm]
        path.norm = user
        return ""
    reshaped = _reshaped_channels(user, node, size, path.dim) if _is_reshape(user) else None
    if reshaped is not None:  # (N, C, H·W) → (N, C, H, W): the channels' axis kept whole
        path.reshapes.append((user, reshaped))
        path.dim = reshaped
        return ""
    return f"no channel rule for '{user.name}' ({describe(gm, user)}) on axis {path.dim}"


def _reshaped_channels(node: fx.Node, src: fx.Node, size: int, dim: int) -> int | None:
    """The axis (negative) of the ``size`` channels (on axis ``dim`` of ``src``) in reshape ``node``'s
    output, where it keeps them whole: as many elements before them on both sides (row-major, so
    channel c stays channel c, and a narrower channel axis reshapes the same way); else None."""
    shape_in, shape_out = src.meta.get(meta.SHAPE), node.meta.get(meta.SHAPE)
    if not shape_in or not shape_out or shape_in[dim] != size:
        return None
    before = math.prod(shape_in[: dim % len(shape_in)])
    for axis, width in enumerate(shape_out):
        if width == size and math.prod(shape_out[:axis]) == before:
            return axis - len(shape_out)
    return None


def _channels_moved(node: fx.Node, src: fx.Node, size: int, dim: int) -> int | None:
    """Where permute / transpose ``node`` of ``src`` puts the ``size`` channels on axis ``dim`` (a
    negative index): the new axis, when it moves them (EdgeNeXt's ConvNeXt blocks permute
    (N, H, W, C) back to (N, C, H, W) before the residual add); else None."""
    shape = src.meta.get(meta.SHAPE)
    if not shape or shape[dim] != size or not node.args or node.args[0] is not src:
        return None
    rank, axis = len(shape), dim % len(shape)
    new = _moved_axis(node, rank, axis)
    return None if new is None or new == axis else new - rank


def _moved_axis(node: fx.Node, rank: int, axis: int) -> int | None:
    """Where permute / transpose ``node`` of a rank-``rank`` tensor puts axis ``axis`` (0-based), or
    None when ``node`` is neither or its dims are not plain ints (``axis_rules._input_axis`` maps
    the other way)."""
    try:
        if node.target in ("permute", torch.permute):
            dims = [d % rank for d in permute_dims(node)]
            return dims.index(axis) if sorted(dims) == list(range(rank)) else None
        if node.target in ("transpose", torch.transpose, "swapaxes"):
            d0, d1 = (int(d) % rank for d in node.args[1:3])  # type: ignore[arg-type]
            return d1 if axis == d0 else d0 if axis == d1 else axis
    except (TypeError, ValueError):  # dims computed at run time
        return None
    return None


def _joins(node: fx.Node) -> bool:
    return node.target in (torch.stack, operator.add, torch.add)


def _join(ends: list[fx.Node], size: int) -> tuple[fx.Node | None, str]:
    """The node where the lanes ``ends`` meet: ``stack(ends).sum(0)`` (returns the sum) or ``a + b``
    of two lanes, each end ``size`` channels wide; else (None, why)."""
    joins = {next(iter(e.users)) for e in ends}
    if len(joins) != 1:
        return None, "the parallel lanes meet in more than one op before the residual add"
    (join,) = joins
    shapes = {tuple(e.meta[meta.SHAPE]) for e in ends}
    if len(shapes) != 1 or next(iter(shapes))[-1] != size:
        return None, f"the parallel lanes reach '{join.name}' with different shapes"
    if join.target in (operator.add, torch.add) and set(join.args[:2]) == set(ends) and len(ends) == 2:
        return join, ""
    stacked = join.args[0] if join.args else None
    dim = join.kwargs.get("dim", join.args[1] if len(join.args) > 1 else 0)
    users = list(join.users)
    lanes_in = list(stacked) if isinstance(stacked, (list, tuple)) else None
    if join.target is torch.stack and lanes_in == ends and dim == 0 and len(users) == 1:
        total = users[0]
        total_dim = total.kwargs.get("dim", total.args[1] if len(total.args) > 1 else None)
        is_sum = total.target in ("sum", torch.sum) and total_dim in (0, (0,), [0])
        if is_sum and not total.kwargs.get("keepdim", False) and total.kwargs.get("dtype") is None:
            return total, ""
    return None, f"no channel rule for how the parallel lanes meet at '{join.name}'"


def _channel_param(
    gm: fx.GraphModule, node: fx.Node, src: fx.Node, size: int, dim: int = -1
) -> tuple[str, int, fx.Node | None] | tuple[()] | None:
    """For a per-channel op after the last linear, the channels on axis ``dim`` (negative): ``()``
    (no parameter), ``(param, dim, reshape)`` for a parameter of one value per channel there and 1 on
    every other axis it spans (a layer scale: (C,) channels last, (C, 1, 1) on (N, C, H, W)), read
    directly (``reshape`` None) or through a reshape of a (C,) parameter (MetaFormer's
    ``scale.view(C, 1, 1)``: ``reshape`` is that node, whose channel size the slim rewrite resizes),
    or None."""
    if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), _CHANNEL_MODULES):
        return ()
    if node.target not in (operator.mul, torch.mul, "mul", "mul_"):
        return None
    other = node.args[1] if node.args[0] is src else node.args[0]
    if isinstance(other, (int, float)):
        return ()
    if isinstance(other, fx.Node) and _is_reshape(other) and len(other.users) == 1:
        param = other.args[0]
        param_shape = param.meta.get(meta.SHAPE) if isinstance(param, fx.Node) else None
        if isinstance(param, fx.Node) and param.op == "get_attr" and tuple(param_shape or ()) == (size,):
            shape = other.meta.get(meta.SHAPE)
            ok = shape and len(shape) >= -dim and math.prod(shape) == shape[dim] == size
            return (str(param.target), 0, other) if ok else None
    shape = other.meta.get(meta.SHAPE) if isinstance(other, fx.Node) and other.op == "get_attr" else None
    if shape and len(shape) >= -dim and math.prod(shape) == shape[dim] == size:
        assert isinstance(other, fx.Node)
        return (str(other.target), len(shape) + dim, None)
    return None


def _channel_batch_norm(
    gm: fx.GraphModule, node: fx.Node, src: fx.Node, size: int, dim: int
) -> list[str] | None:
    """The per-channel tensors of a BatchNorm module (``nn.BatchNorm1d/2d/3d``, timm's
    ``BatchNormAct2d``: axis rule ``axis_rules.batch_norm``) that normalises the ``size`` channels
    on axis ``dim`` of ``src``, its channel axis (1), and that the write gate may follow
    (``axis_rules.gate_follows``); else None."""
    if node.op != "call_module" or node.args[:1] != (src,) or len(node.args) != 1 or node.kwargs:
        return None
    mod = gm.get_submodule(str(node.target))
    shape = src.meta.get(meta.SHAPE)
    if rules().get(node_key(gm, node)) is not batch_norm or not gate_follows(mod):
        return None
    if not shape or len(shape) < 2 or dim % len(shape) != 1 or shape[1] != size:
        return None
    return channel_params(mod, str(node.target))


def _param_dims(
    trackers: list[Tracker], leaf_group: dict[str, str], channel_groups: list[Group]
) -> dict[tuple[str, int], tuple[Factor, ...]]:
    dims: dict[tuple[str, int], tuple[Factor, ...]] = {}
    for t in trackers:
        for (param, dim), axis in t.params.items():
            leaves = t.labels.axis_leaves(axis)
            if leaves:  # an axis no label runs along (EfficientViT-M's concatenated heads): its own size
                dims[(param, dim)] = tuple((t.labels.sizes[leaf], leaf_group.get(leaf)) for leaf in leaves)
    for g in channel_groups:
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


def _buffer_specs(
    gm: fx.GraphModule, dims: dict[tuple[str, int], tuple[Factor, ...]]
) -> tuple[ParamSpec, ...]:
    """The buffers a group axis runs along (a BatchNorm's running statistics), as :class:`ParamSpec`:
    sliced with the parameters, never counted as parameters."""
    all_buffers = dict(gm.named_buffers())
    names = dict.fromkeys(name for name, _ in dims if name in all_buffers)
    return tuple(
        ParamSpec(
            name, tuple(dims.get((name, d), ((int(s), None),)) for d, s in enumerate(all_buffers[name].shape))
        )
        for name in names
    )


def _flop_terms(gm: fx.GraphModule, nodes: list[fx.Node], trackers: list[Tracker], leaf_group: dict[str, str],
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
            lane = next((t for t in trackers if n.args[0] in t.states), trackers[0])
            terms.extend(_attention_flops(n, lane, leaf_group))
        elif n.op == "call_function" and n.target is torch.einsum:
            terms.extend(_einsum_flops(n, trackers, leaf_group))
        elif n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), nn.modules.conv._ConvNd):
            terms.extend(_conv_flops(gm, n, trackers, leaf_group, dims))
    return tuple(terms)


def _conv_flops(gm: fx.GraphModule, n: fx.Node, trackers: list[Tracker], leaf_group: dict[str, str],
                dims: dict[tuple[str, int], tuple[Factor, ...]]) -> list[FlopTerm]:  # fmt: skip
    """A convolution inside a block (1×1 ones are linears by now): output positions × output
    channels × input channels per group × kernel positions, the channel factors those of its
    weight (a depthwise convolution's filters are sliced with the channels it runs on; one before
    the first linear, FastViT's 7×7 in its MLPs, runs at full width), and the groups folded into
    its batch axis (MViTv2 pools each head's q, k and v)."""
    mod = gm.get_submodule(str(n.target))
    assert isinstance(mod, nn.modules.conv._ConvNd)
    out = n.meta.get(meta.SHAPE)
    if not isinstance(out, tuple) or len(out) < 3:
        return []
    w = f"{n.target}.weight"
    factors = [*dims.get((w, 0), ((mod.out_channels, None),)),
               *dims.get((w, 1), ((mod.in_channels // mod.groups, None),))]  # fmt: skip
    t = next((t for t in trackers if n in t.states), None)
    if t is not None:
        factors += _per_sample(t, t.states[n][0], leaf_group)
    return [FlopTerm(math.prod(out[2:]) * math.prod(mod.kernel_size), tuple(factors))]


def _einsum_flops(n: fx.Node, trackers: list[Tracker], leaf_group: dict[str, str]) -> list[FlopTerm]:
    """An einsum of two operands, as a product over all its subscripts (SAM's relative-position
    bias, ``"bhwc,hkc->bhwk"``: heads × h × w × head dims × k per sample); the first operand's first
    subscript, where it leads the output too, is the batch axis and counts only the groups folded
    into it. Nothing for other einsums."""
    terms, ops = (einsum_terms(n.args[0]) if isinstance(n.args[0], str) else None), einsum_operands(n)
    if (
        terms is None
        or ops is None
        or not all(isinstance(op, fx.Node) and isinstance(op.meta.get(meta.SHAPE), tuple) for op in ops)
    ):
        return []
    t = next((t for t in trackers if any(op in t.states for op in ops)), trackers[0])
    factors: list[Factor] = []
    seen: set[str] = set()
    for i, (term, op) in enumerate(zip(terms[:2], ops, strict=True)):
        state, shape = t.state_or_empty(op), op.meta[meta.SHAPE]
        for k, letter in enumerate(term):
            if letter in seen:
                continue
            seen.add(letter)
            if i == 0 and k == 0 and terms[2].startswith(letter):
                factors += _per_sample(t, state[0], leaf_group)
            else:
                factors += _factors(t, (state[k],), (shape[k],), leaf_group)
    return [FlopTerm(1, tuple(factors))]


def _factors(t: Tracker, state: Any, shape: tuple[int, ...], leaf_group: dict[str, str]) -> list[Factor]:
    out: list[Factor] = []
    for axis, size in zip(state, shape, strict=True):
        leaves = t.labels.axis_leaves(axis)
        out.extend(
            [(t.labels.sizes[x], leaf_group.get(x)) for x in leaves] if leaves else [(int(size), None)]
        )
    return out


def _per_sample(t: Tracker, axis: Any, leaf_group: dict[str, str]) -> list[Factor]:
    """The factors of a batch axis that count per sample: the groups folded into it (SAM's
    ``B·heads``), not the batch (an opaque label)."""
    return [(t.labels.sizes[x], leaf_group[x]) for x in t.labels.axis_leaves(axis) if x in leaf_group]


def _attention_flops(n: fx.Node, t: Tracker, leaf_group: dict[str, str]) -> list[FlopTerm]:
    a, b = n.args[0], n.args[1]
    assert isinstance(a, fx.Node) and isinstance(b, fx.Node)
    sa, shape_a = t.state_or_empty(a), a.meta[meta.SHAPE]
    if n.target is F.scaled_dot_product_attention:
        v = n.args[2]
        assert isinstance(v, fx.Node)
        sv, shape_v = t.state_or_empty(v), v.meta[meta.SHAPE]
        nk = int(b.meta[meta.SHAPE][-2])
        folded = _per_sample(t, sa[0], leaf_group)
        qk = folded + _factors(t, sa[1:], shape_a[1:], leaf_group)
        av = folded + _factors(t, (*sa[1:-1], sv[-1]), (*shape_a[1:-1], shape_v[-1]), leaf_group)
        return [FlopTerm(nk, tuple(qk)), FlopTerm(nk, tuple(av))]
    sb, shape_b = t.state_or_empty(b), b.meta[meta.SHAPE]
    left = _per_sample(t, sa[0], leaf_group) + _factors(t, sa[1:], shape_a[1:], leaf_group)
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
