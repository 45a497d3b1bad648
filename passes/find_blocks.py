"""find_blocks: the residual sub-blocks of a graph, found from its structure alone.

Pattern: ``add(a, b)`` where ``b`` is computed from ``a`` (``a`` is an ancestor of ``b``) and both
have the same shape: ``b`` is a residual branch reading stream ``a``. Result: one frozen
``Branch`` per residual add, with its nodes, its first and last linear and its kind (attention
when it multiplies two activations, else MLP). Why: P3B scores and prunes per residual
sub-block; module names differ between models, the graph's residual structure does not.
Branches whose values escape, or that hold fewer than two linears, are reported, not guessed.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from p3b_fx.core import meta
from p3b_fx.core.groups import BlockKind

_ADD_TARGETS = (operator.add, torch.add, operator.iadd)
MATMUL_TARGETS = (operator.matmul, torch.matmul, torch.bmm)


@dataclass(frozen=True)
class Branch:
    name: str
    kind: BlockKind
    input_node: str
    add_node: str
    branch_input: str  # the add operand that is the branch output
    nodes: tuple[str, ...]  # topological order, add node excluded
    linears: tuple[str, ...]  # call_module nn.Linear nodes in order, but the first is the first computed
    # from the model's input (a bias MLP of constants may come before it: _make_branch)


@dataclass(frozen=True)
class BlockSearch:
    branches: tuple[Branch, ...]
    unsupported: tuple[str, ...]


def is_add(node: fx.Node) -> bool:
    """A residual write: ``a + b``, or a slim graph's ``torch.index_add(a, dim, idx, b)``."""
    if node.op == "call_function" and (node.target in _ADD_TARGETS or is_index_add(node)):
        return True
    return node.op == "call_method" and node.target in ("add", "add_")


def is_index_add(node: fx.Node) -> bool:
    """A slim graph's write-back of a block's kept channels: along the last axis, or along another
    (``Block.write_dim``: -3 where the stream is (N, C, H, W))."""
    dim = node.args[1] if node.target is torch.index_add and len(node.args) > 1 else None
    return isinstance(dim, int) and not isinstance(dim, bool) and dim < 0


def is_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), nn.Linear)


def is_attention_op(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
        return True
    matmul = (node.op == "call_function" and node.target in MATMUL_TARGETS) or (
        node.op == "call_method" and node.target in ("matmul", "bmm")
    )
    return matmul and all(isinstance(a, fx.Node) and a.op != "get_attr" for a in node.args[:2])


def _ancestors_in_range(start: fx.Node, lo: int, order: dict[fx.Node, int]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [start]
    while stack:
        n = stack.pop()
        for p in n.all_input_nodes:
            if p not in seen and order[p] > lo:
                seen.add(p)
                stack.append(p)
    return seen


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".")[:-1] for n in names]
    prefix: list[str] = []
    for column in zip(*parts, strict=False):
        if len(set(column)) != 1:
            break
        prefix.append(column[0])
    return ".".join(prefix)


def _residual_operands(node: fx.Node, order: dict[fx.Node, int]) -> tuple[fx.Node, fx.Node] | None:
    """(stream, branch output) of a residual add, or None. The stream is what the branch reads: the
    add's other operand, or the tensor that operand scales (:func:`residual_scaled`)."""
    if is_index_add(node):
        a, b, dim = node.args[0], node.args[3], node.args[1]
        assert isinstance(a, fx.Node) and isinstance(b, fx.Node) and isinstance(dim, int)
        shape_a, shape_b = list(a.meta[meta.SHAPE]), list(b.meta[meta.SHAPE])
        if len(shape_a) == len(shape_b):  # alike but for the written axis
            del shape_a[dim], shape_b[dim]
        streams = [x for x in (a, residual_scaled(a)) if x in _ancestors_in_range(b, order[x] - 1, order)]
        return (streams[0], b) if shape_a == shape_b and streams else None
    args = [a for a in node.args[:2] if isinstance(a, fx.Node)]
    if len(args) != 2 or not _same_tensor_shape(*args):  # numbers add too (H + pad_h): no residual
        return None
    for a, b in ((args[0], args[1]), (args[1], args[0])):
        for x in (a, residual_scaled(a)):  # the operand itself first: a block found before stays as it was
            if order[x] < order[b] and x in _ancestors_in_range(b, order[x] - 1, order):
                return x, b
    return None


def residual_scaled(a: fx.Node) -> fx.Node:
    """The stream ``x`` where the add's operand ``a`` is ``x`` passed through an ``nn.Identity`` or
    scaled by a parameter (MetaFormer's ``res_scale``: ``x * scale.view(C, 1, 1)``, so that
    ``x' = s·x + branch(x)``), else ``a``. The branch still reads ``x``, and writes into the sum."""
    owner = a.graph.owning_module
    if (
        a.op == "call_module"
        and owner is not None
        and isinstance(owner.get_submodule(str(a.target)), nn.Identity)
    ):
        x = a.args[0]
        return x if isinstance(x, fx.Node) else a
    if a.op == "call_function" and a.target in (operator.mul, torch.mul) and len(a.args) == 2:
        for x, s in (a.args, a.args[::-1]):
            if isinstance(x, fx.Node) and isinstance(s, fx.Node) and _from_params(s):
                return x
    return a


_VIEWS = ("view", "reshape", "unsqueeze")


def _from_params(n: fx.Node) -> bool:
    """Whether ``n`` is a parameter, or a view of one (``scale.view(C, 1, 1)``)."""
    while n.op == "call_method" and n.target in _VIEWS and isinstance(n.args[0], fx.Node):
        n = n.args[0]
    return n.op == "get_attr"


def _same_tensor_shape(a: fx.Node, b: fx.Node) -> bool:
    """Whether ``a`` and ``b`` are tensors of one shape (not numbers, whose shape meta is absent)."""
    shape = a.meta.get(meta.SHAPE)
    return isinstance(shape, tuple) and shape == b.meta.get(meta.SHAPE)


def _forked(gm: fx.GraphModule, add: fx.Node, order: dict[fx.Node, int]) -> str:
    """Why ``add`` looks like a residual write that is none, or '': both operands are computed from
    one tensor, one through a single linear (a projected shortcut), the other through two or more
    (MViTv2's and Hiera's stage transitions add a pooled, projected shortcut to the attention of the
    same normalised input). Neither operand is the stream the other reads, so there is no block to
    prune; said, not silently skipped."""
    args = [a for a in add.args[:2] if isinstance(a, fx.Node)]
    if len(args) != 2 or not _same_tensor_shape(*args):
        return ""
    lo = max(order[args[0]], order[args[1]]) - _FORK_WINDOW
    sides = [_ancestors_in_range(a, lo, order) | {a} for a in args]
    common = sides[0] & sides[1]
    if not common:
        return ""
    fork = max(common, key=order.__getitem__)
    short, long = sorted(([n for n in side - common if is_linear(gm, n)] for side in sides), key=len)
    if len(short) != 1 or len(long) < 2:  # a projected shortcut beside a branch, not two branches
        return ""
    proj = short[0]
    return (
        f"residual add '{add.name}': the shortcut is projected ('{proj.target}') from '{fork.name}', "
        "which the branch reads too, so neither operand is a stream the other reads (a stage "
        "transition)"
    )


_FORK_WINDOW = 400
"""How far back (in graph nodes) ``_forked`` looks for the tensor both operands come from."""


def _make_branch(  # noqa: PLR0917 - private helper of find_blocks
    gm: fx.GraphModule, add: fx.Node, a: fx.Node, b: fx.Node, order: dict[fx.Node, int], dynamic: set[fx.Node]
) -> Branch | str:
    body = _ancestors_in_range(b, order[a], order) | {b}
    body.discard(a)
    body |= _size_reads(body)
    nodes = sorted(body, key=order.__getitem__)
    for n in nodes:
        escapes = [u.name for u in n.users if u not in body and u is not add and not _checks_only(u)]
        if escapes and not _stream_shape(n, body):
            return f"residual add '{add.name}': '{n.name}' is also used outside the branch ({escapes[0]})"
    linears = [n for n in nodes if is_linear(gm, n)]
    if len(linears) < 2:
        return f"residual add '{add.name}': branch has {len(linears)} nn.Linear (need a first and a last)"
    first = next((n for n in linears if n in dynamic), linears[0])
    if first is not linears[0]:  # a bias MLP computed from constants before it (vit_srelpos's shared one)
        linears = [first, *(n for n in linears if n is not first)]
    name = (_common_prefix([str(n.target) for n in linears])
            or _common_prefix([str(n.target) for n in linears if n in dynamic])
            or f"branch_{add.name}")  # fmt: skip
    kind = BlockKind.ATTENTION if any(is_attention_op(n) for n in nodes) else BlockKind.MLP
    return Branch(
        name, kind, a.name, add.name, b.name, tuple(n.name for n in nodes), tuple(n.name for n in linears)
    )


def _dynamic(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes computed from the model's input. A branch's first linear is the first of its
    linears among them, not a linear of a bias computed from constants alone, which may come before
    it in the graph (vit_srelpos evaluates one relative-position MLP before the blocks)."""
    out: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(i in out for i in n.all_input_nodes):
            out.add(n)
    return out


def _size_reads(body: set[fx.Node]) -> set[fx.Node]:
    """The shape reads of the branch's tensors that it does not use itself (a size it hands to the
    caller), and the picks from them: part of the branch, so that the grouping rules see them
    (``axis_rules.shape_access`` fixes a group axis whose size leaves the block)."""
    reads = {u for n in body for u in n.users if u not in body and is_shape_read(u) and u.args[0] is n}
    picks = {u for r in reads for u in r.users if u.target is operator.getitem}
    return reads | picks


def _stream_shape(n: fx.Node, body: set[fx.Node]) -> bool:
    """Whether ``n`` is a number computed from shapes only: ``x.shape[1] % 7``. Of the stream or of
    tensors outside the branch, pruning changes none (MaxViT pads the stream by its own size,
    outside the attention branch); of a tensor inside it, only a group axis' size would change, and
    the grouping rules fix an axis whose size leaves the block (``axis_rules.shape_access``), so
    MViTv2's pooled grid size (``q.shape[2]``), read by the next block, may leave it too."""
    if is_shape_read(n):
        return True
    numeric = n.target is operator.getitem or n.target in NUMBER_OPS
    tensors = [i for i in n.all_input_nodes if i.meta.get(meta.SHAPE) is not None]
    return (
        n.op == "call_function" and numeric and not tensors
        and all(i not in body or _stream_shape(i, body) for i in n.all_input_nodes)
    )  # fmt: skip


def _checks_only(n: fx.Node) -> bool:
    """Whether ``n`` only feeds ``torch._assert`` (MaxViT checks ``H % 7 == 0`` on the normalised
    input, outside its attention branch): a check, not a value the model computes with."""
    if n.op == "call_function" and n.target is torch._assert:
        return True
    numeric = n.op == "call_function" and (
        n.target in NUMBER_OPS or n.target in _COMPARISONS or n.target is operator.getitem
    )
    return (is_shape_read(n) or numeric) and bool(n.users) and all(_checks_only(u) for u in n.users)


def is_shape_read(n: fx.Node) -> bool:
    """``x.shape``, ``x.size()``, ``x.size(i)`` or ``x.dim()``: a number (or tuple) from ``x``'s shape."""
    if n.op == "call_function" and n.target is getattr:
        return bool(n.args[1] == "shape")
    return n.op == "call_method" and n.target in ("size", "dim")


_COMPARISONS = (operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
                operator.and_, operator.or_, operator.not_)  # fmt: skip
NUMBER_OPS = (operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod,
              operator.neg, operator.pow)  # fmt: skip
"""Arithmetic that shape numbers go through (``(7 - H % 7) % 7``)."""


def find_blocks(gm: fx.GraphModule) -> BlockSearch:
    """All residual branches of ``gm`` (which must carry shape meta, see AnnotateShapesPass)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    dynamic = _dynamic(gm)
    branches: list[Branch] = []
    unsupported: list[str] = []
    for node in gm.graph.nodes:
        if not is_add(node):
            continue
        operands = _residual_operands(node, order)
        if operands is None:
            why = _forked(gm, node, order)
            if why:
                unsupported.append(why)
            continue
        found = _make_branch(gm, node, *operands, order, dynamic)
        (unsupported if isinstance(found, str) else branches).append(found)  # type: ignore[arg-type]
    return BlockSearch(_outermost(branches), tuple(unsupported))


def _outermost(branches: list[Branch]) -> tuple[Branch, ...]:
    """``branches`` without those whose add lies inside another branch: SwiftFormer's attention adds
    its query to its output projection (``proj(attn * key) + query``), a residual inside the block,
    whose stream is no stream of the model. The outer branch holds it whole (its nodes, its
    linears), so the inner one is part of that block, not a block of its own."""
    inside = {n for br in branches for n in br.nodes}
    return tuple(br for br in branches if br.add_node not in inside)
