"""One small rule per op kind: how group labels travel through a node.

Each rule takes the node and the tracker and returns the node's output state (labels per axis),
or raises ``Unsupported`` with a reason; the tracker then marks every label on the node's inputs
unprunable with that reason and the node's name. Rules also note *zero preservation* (a pruned
element that is 0 stays 0), which contractions need so that masking equals removal.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from timm.layers.drop import DropPath
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from p3b_fx.core import meta
from p3b_fx.core.groups import Role
from passes.axis_labels import State, Unsupported, reshape_state
from passes.decompose_einsum import einsum_operands, einsum_terms
from passes.decompose_fold import as_pair

if TYPE_CHECKING:
    from passes.track_axes import Tracker

Rule = Callable[[fx.Node, "Tracker"], Any]

_ZERO_KEEPING_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.Dropout, nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Hardswish, nn.Mish, nn.LeakyReLU,
    nn.ELU, nn.ReLU6, DropPath,
)  # fmt: skip
_OTHER_UNARY_MODULES: tuple[type[nn.Module], ...] = (nn.Sigmoid, nn.Softplus, nn.Hardsigmoid)
_ZERO_KEEPING_FUNCTIONS = {
    F.gelu,
    F.relu,
    torch.relu,
    F.silu,
    torch.tanh,
    F.dropout,
    F.hardswish,
    operator.neg,
}
_OTHER_UNARY_FUNCTIONS = {torch.sigmoid, F.sigmoid, torch.exp, F.softplus}
_ZERO_KEEPING_METHODS = {"contiguous", "clone", "float", "half", "bfloat16", "detach",
                         "relu", "tanh", "neg"}  # fmt: skip
_OTHER_UNARY_METHODS = {"sigmoid", "exp"}
_MUL = {operator.mul, torch.mul, "mul"}
_DIV = {operator.truediv, torch.div, "div"}
_ADD = {operator.add, torch.add, operator.sub, torch.sub, "add", "sub"}


def node_key(gm: fx.GraphModule, node: fx.Node) -> Any:
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target)))
    return node.target


def first_state(node: fx.Node, t: Tracker) -> State:
    src = node.args[0]
    if not isinstance(src, fx.Node) or src not in t.states:
        raise Unsupported("the tracked value is not the first argument")
    for a in node.all_input_nodes[1:]:
        if a in t.states and a is not src:
            raise Unsupported("two tracked values meet in a unary op")
    state: State = t.states[src]
    return state


def unary(zero_keeping: bool) -> Rule:
    def rule(node: fx.Node, t: Tracker) -> State:
        state = first_state(node, t)
        src = node.args[0]
        assert isinstance(src, fx.Node)
        t.zero[node] = zero_keeping and t.zero.get(src, False)
        return state

    return rule


def _dim(node: fx.Node, pos: int, name: str, default: Any = None) -> Any:
    return node.args[pos] if len(node.args) > pos else node.kwargs.get(name, default)


def _norm_over_last(node: fx.Node, t: Tracker, count: int, params: tuple[Any, ...] | None = None) -> State:
    """A norm over the last ``count`` axes. Over one axis that a group runs along (a LayerNorm or
    RMSNorm inside the block: EVA-02's over the SwiGLU hidden neurons, BEiT-3's over heads ×
    head_dim, a q/k norm over head_dim), the slim model recomputes the dense statistics from the
    kept elements (:mod:`p3b_fx.core.padded_norm`): the mask pass gates the norm's input and its
    output, and the norm's weight and bias are sliced with the axis.
    ``params``: the norm's (weight, bias) parameter names (:func:`norm_params`), None when they
    cannot be sliced. Anything else normalised over a group axis is fixed."""
    state = first_state(node, t)
    axis = state[-1] if state else ()
    if count == 1 and axis and params is not None:
        for name in params:
            if name is not None:
                t.record_param(name, 0, axis)
        t.norms.append(node)
        t.zero[node] = True  # the gate after it zeroes the pruned elements again
        return state
    t.labels.mark(state[-count:], f"normalised over (its statistics would change) at node '{node.name}'")
    t.zero[node] = False
    return state


def norm_params(gm: fx.GraphModule, node: fx.Node) -> tuple[str | None, str | None] | None:
    """A norm node's (weight, bias) parameter names, None where it has none; None when one is not a
    parameter read directly (a computed tensor, which could not be sliced)."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        weight, bias = (
            f"{node.target}.{n}" if getattr(mod, n, None) is not None else None for n in ("weight", "bias")
        )
        return weight, bias
    values = [_dim(node, 2, "weight"), _dim(node, 3, "bias") if node.target is F.layer_norm else None]
    if any(isinstance(v, fx.Node) and v.op != "get_attr" for v in values):
        return None
    weight, bias = (str(v.target) if isinstance(v, fx.Node) else None for v in values)
    return weight, bias


def normalized_shape(gm: fx.GraphModule, node: fx.Node) -> tuple[int, ...]:
    """The trailing shape a norm node (``F.layer_norm``/``F.rms_norm`` or a norm module) normalises."""
    if node.op == "call_module":
        shape = getattr(gm.get_submodule(str(node.target)), "normalized_shape", (1,))
    else:
        shape = _dim(node, 1, "normalized_shape")
    return tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)


def layer_norm(node: fx.Node, t: Tracker) -> State:
    """``F.layer_norm(x, shape, weight, bias, eps)``, ``F.rms_norm(x, shape, weight, eps)``, and
    the LayerNorm and RMSNorm modules."""
    return _norm_over_last(node, t, len(normalized_shape(t.gm, node)), norm_params(t.gm, node))


def norm_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The :func:`p3b_fx.core.padded_norm.padded_norm` kind of a norm node, ``"p"`` for a p-norm
    (``F.normalize``, which zeros do not change), None for other nodes."""
    key = node_key(gm, node)
    if key is F.normalize:
        return "p"
    if key is F.layer_norm or (isinstance(key, type) and issubclass(key, nn.LayerNorm)):
        return "layer"
    name = getattr(key, "__name__", "")
    if key is getattr(F, "rms_norm", None) or name in {"RMSNorm", "RmsNorm"}:
        return "rms"
    return "simple" if name == "SimpleNorm" else None


def normalize(node: fx.Node, t: Tracker) -> State:
    """``F.normalize(x, p, dim)``: zeros add nothing to a p-norm, so over the last axis (SwinV2's
    cosine attention normalises q and k over head_dim) a group may run along it, as for a padded
    norm, the mask pass gating its input and output (the slim model needs no change). Over another
    axis a label is fixed. Zeros stay zeros. XCiT normalises q and k over the tokens."""
    state = first_state(node, t)
    dim = int(_dim(node, 2, "dim", 1))
    if dim % len(state) == len(state) - 1 and state[-1]:
        t.norms.append(node)
        t.zero[node] = True
        return state
    t.labels.mark((state[dim],), f"normalised over (its statistics would change) at node '{node.name}'")
    src = node.args[0]
    assert isinstance(src, fx.Node)
    t.zero[node] = t.zero.get(src, False)
    return state


def channel_params(mod: nn.Module, prefix: str) -> list[str]:
    """The per-channel tensors of a BatchNorm module ``mod`` called as ``prefix``: its affine
    weight and bias and its running statistics, those it has."""
    names = ("weight", "bias", "running_mean", "running_var")
    return [f"{prefix}.{n}" for n in names if getattr(mod, n, None) is not None]


def batch_norm(node: fx.Node, t: Tracker) -> State:
    """A BatchNorm module on (N, C, ...): ``nn.BatchNorm1d`` on (N, C) or (N, C, L) (LeViT's
    ``LinearNorm``: ``bn(linear(x).flatten(0, 1)).reshape_as(...)``), ``BatchNorm2d`` / ``3d`` on
    images (the convolution blocks of EfficientFormerV2, LeViT-conv, EfficientViT, MobileViTv2 once
    their 1×1 convolutions are linears: ``passes.pointwise_conv``), timm's ``BatchNormAct2d`` (a
    BatchNorm2d, then an elementwise dropout and activation). Each channel is normalised by its own
    statistics (batch or running) and scaled by its own weight, so slicing the channel axis (dim 1)
    together with those four vectors computes the kept channels exactly. Zeros do not stay zeros
    (the bias and the mean move them)."""
    state = first_state(node, t)
    if len(state) < 2 or any(axis for k, axis in enumerate(state) if k != 1):
        raise Unsupported(f"a group axis reaches {describe_module(t, node)} off its channel axis")
    mod = t.gm.get_submodule(str(node.target))
    if _inner_params(mod):
        raise Unsupported(f"{type(mod).__name__} with an activation or dropout that has parameters")
    if state[1]:
        for name in channel_params(mod, str(node.target)):
            t.record_param(name, 0, state[1])
    t.zero[node] = _gated_after(node, t)
    return state


def _gated_after(node: fx.Node, t: Tracker) -> bool:
    """Whether BatchNorm ``node`` normalises the first linear's output and nothing else reads that
    output (directly or through a permute back to (N, C, H, W)): then the first-out gate goes after
    the BatchNorm (``Tracker.first_out_site``, ``Block.first_out_site``) and zeros leave it, so a
    contraction of its channels further on (EfficientFormerV2's q · k after q's BatchNorm) is exact."""
    src = node.args[0]
    chain = [src]
    while isinstance(chain[-1], fx.Node) and chain[-1].target in ("permute", "contiguous"):
        chain.append(chain[-1].args[0])
    if t.lane != 0 or t.first_out_site is not None or chain[-1] is not t.read:
        return False
    if not gate_follows(t.gm.get_submodule(str(node.target))):
        return False
    if any(len(n.users) != 1 for n in chain if isinstance(n, fx.Node)):
        return False
    t.first_out_site = node
    return True


def _inner_params(mod: nn.Module) -> bool:
    """Whether a BatchNorm module's submodules (timm's activation and dropout) hold parameters."""
    return any(True for child in mod.children() for _ in child.parameters())


def gate_follows(mod: nn.Module) -> bool:
    """Whether a mask gate may follow BatchNorm ``mod`` on its channel axis, axis 1: a torch
    BatchNorm (timm's ``BatchNormAct2d`` and ``SyncBatchNormAct`` are ones, its frozen one is not),
    which is what ``insert_masks`` moves that axis last for, with nothing that has parameters after
    its normalisation."""
    return isinstance(mod, _BatchNorm) and not _inner_params(mod)


def describe_module(t: Tracker, node: fx.Node) -> str:
    return type(t.gm.get_submodule(str(node.target))).__name__


def spatial_resize(node: fx.Node, t: Tracker) -> State:
    """``nn.Upsample`` / ``F.interpolate`` of (N, C, spatial...) (EfficientFormerV2's attention
    upsamples its strided output back): each channel is resized on its own, so axes 0 and 1 keep
    their groups, and a pruned channel, zero everywhere, resizes to zero. A group axis among the
    spatial ones is unsupported."""
    state: State = unary(True)(node, t)
    if len(state) < 3 or any(state[2:]):
        raise Unsupported("resizes a group axis")
    return state


def depthwise_conv(node: fx.Node, t: Tracker) -> State:
    """``nn.Conv1d/2d/3d`` with one filter per channel (``groups == in == out channels``; PVT-v2's
    and SegFormer's MLP ``DWConv``): channel c of the output reads channel c of the input alone, so
    the channel axis (dim 1) keeps its group and the filters and biases are sliced with it. The
    batch axis may carry groups too (MViTv2 pools each head's q, k and v over ``(B·heads, d, H, W)``):
    every batch entry is convolved on its own. Any other convolution mixes channels: Unsupported."""
    state = first_state(node, t)
    mod = t.gm.get_submodule(str(node.target))
    assert isinstance(mod, nn.modules.conv._ConvNd)
    if not (mod.groups == mod.in_channels == mod.out_channels):
        raise Unsupported(f"a convolution mixing channels ({type(mod).__name__}, groups={mod.groups})")
    if len(state) < 2 or any(axis for k, axis in enumerate(state) if k > 1):
        raise Unsupported("a group axis reaches a convolution off its channel axis")
    if state[1]:
        t.record_param(f"{node.target}.weight", 0, state[1])
        if mod.bias is not None:
            t.record_param(f"{node.target}.bias", 0, state[1])
    src = node.args[0]
    assert isinstance(src, fx.Node)
    t.zero[node] = mod.bias is None and t.zero.get(src, False)
    return state


def reshape_as(node: fx.Node, t: Tracker) -> State:
    """``x.reshape_as(other)``: a reshape to ``other``'s shape, read at run time (so the slim value
    is right), ``other`` read for its shape only."""
    src = node.args[0]
    if not isinstance(src, fx.Node) or src not in t.states:
        raise Unsupported("the tracked value is not the first argument")
    out = reshape_state(t.labels, t.states[src], src.meta[meta.SHAPE], node.meta[meta.SHAPE])
    other = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    if isinstance(other, fx.Node) and other in t.states and tuple(t.states[other]) != tuple(out):
        raise Unsupported(f"reshaped to the shape of '{other.name}', whose group axes differ")
    t.zero[node] = t.zero.get(src, False)
    return out


def expand_as(node: fx.Node, t: Tracker) -> State:
    """``x.expand_as(other)``: ``x``'s one-element axes repeated to ``other``'s sizes (MobileViTv2's
    context vector over the value's positions). An axis ``x`` and ``other`` both have keeps one group:
    the slim sizes must match. A repeated axis carries ``other``'s labels (its values do not vary along
    it), and a label on ``x``'s one element is fixed. A group on only one side is fixed too: the other
    side keeps every element, so the slim shapes would not match."""
    src = node.args[0]
    other = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    if not isinstance(src, fx.Node) or src not in t.states or not isinstance(other, fx.Node):
        raise Unsupported("expand_as of an untracked value or to a non-tensor")
    out_shape = tuple(node.meta[meta.SHAPE])
    rank = len(out_shape)
    src_shape = (1,) * (rank - len(src.meta[meta.SHAPE])) + tuple(src.meta[meta.SHAPE])
    state = ((),) * (rank - len(t.states[src])) + tuple(t.resolve(t.states[src]))
    theirs = tuple(t.resolve(t.states[other])) if other in t.states else ((),) * rank
    out: list[tuple[str, ...]] = []
    for x, o, size, full in zip(state, theirs, src_shape, out_shape, strict=True):
        if size != full:  # repeated
            if x:
                t.labels.mark((x,), f"repeated by expand_as at node '{node.name}'")
            out.append(o)
        elif x and o:
            out.append(t.unify_axis(node, x, o, size, full))
        else:
            if x or o:
                t.labels.mark((x or o,), f"expand_as at node '{node.name}' meets an axis no group runs along")
            out.append(x or o)
    t.zero[node] = t.zero.get(src, False)
    return tuple(out)


def unsqueeze(node: fx.Node, t: Tracker) -> State:
    state = unary(True)(node, t)
    dim = int(_dim(node, 1, "dim")) % (len(state) + 1)
    return (*state[:dim], (), *state[dim:])


def squeeze(node: fx.Node, t: Tracker) -> State:
    state = unary(True)(node, t)
    src = node.args[0]
    assert isinstance(src, fx.Node)
    shape = tuple(src.meta[meta.SHAPE])
    dims = _dim(node, 1, "dim")
    if dims is None:
        dims = [d for d, size in enumerate(shape) if size == 1]
    dropped = {int(d) % len(shape) for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
    dropped = {d for d in dropped if shape[d] == 1}
    if any(state[d] for d in dropped):
        raise Unsupported("squeezes a group axis")
    return tuple(axis for d, axis in enumerate(state) if d not in dropped)


def repeat_interleave(node: fx.Node, t: Tracker) -> State:
    """``x.repeat_interleave(g, dim)``: grouped-query attention gives each key/value head to the g
    query heads that share it. ``out[i·g + j] = x[i]`` along ``dim`` is a reshape of the axis into
    (n, g) whose g-factor copies one element: the n-factor keeps ``x``'s labels, and the g-factor is
    a new label that no parameter owns. Where it meets the query heads, the query heads split into
    (key/value heads, query heads per key/value head) and merge with it (``Tracker._align``). It is
    fixed: a key/value head is kept or dropped with all the query heads that read it, and the repeat
    count in the graph stays valid."""
    state: State = unary(True)(node, t)
    repeats, dim = _dim(node, 1, "repeats"), _dim(node, 2, "dim")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1 or dim is None:
        raise Unsupported("repeat_interleave by a tensor of counts, or over the flattened tensor")
    dim = int(dim) % len(state)
    axis = t.resolve(state[dim])
    src = node.args[0]
    single = isinstance(src, fx.Node) and tuple(src.meta[meta.SHAPE])[dim] == 1  # one key/value head
    if (not axis and not single) or repeats == 1:
        return state
    if node.kwargs.get("output_size") is not None:
        raise Unsupported("repeat_interleave with a fixed output_size")
    copies = t.labels.new(repeats)
    t.secondary.add(copies)  # free to merge, as a projection of its own is
    t.labels.roles[copies] = Role.HEADS
    t.labels.mark(
        ((copies,),),
        f"the query heads that share one key/value head (grouped-query attention) at node '{node.name}' "
        "are kept together",
    )
    return (*state[:dim], (*axis, copies), *state[dim + 1 :])


_POOLED_AXES: dict[type[nn.Module], int] = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
}  # fmt: skip
"""Pooling modules → how many trailing axes they pool over."""


def pool(node: fx.Node, t: Tracker) -> State:
    """A max or average pool module over the last 1–3 axes (SAM 2's Hiera pools its queries over the
    token grid at a stage change): each channel is pooled on its own, so the axes before the pooled
    ones keep their groups, and a pruned channel, zero at every position, pools to zero (padding
    included). A group axis among the pooled ones is unsupported."""
    state: State = unary(True)(node, t)
    mod = t.gm.get_submodule(str(node.target))
    if getattr(mod, "return_indices", False):
        raise Unsupported("a pool that returns indices")
    if any(state[-_POOLED_AXES[type(mod)] :]):
        raise Unsupported("pools over a group axis")
    return state


_REDUCTIONS: dict[Any, str] = {torch.sum: "sum", "sum": "sum", torch.mean: "mean", "mean": "mean",
                               torch.amax: "max", "amax": "max", torch.amin: "max",
                               "amin": "max"}  # fmt: skip
"""Reductions over explicit dims → how they treat pruned (zero) elements: a sum adds nothing for them;
a mean divides by the dense count and a max may pick them, so neither may run over a group axis."""


def reduction(node: fx.Node, t: Tracker) -> State:
    """``x.sum(dim, keepdim)`` / ``mean`` / ``amax`` / ``amin`` over explicit dims. Over axes no group
    runs along (SwiftFormer's additive attention sums its weighted queries over the tokens), every
    group keeps its axis. A sum over a group axis is a contraction: the pruned elements are zero
    where the input keeps zeros, so the slim sum is the masked one. A mean or max over one, or a sum
    of values that are not zero there, is fixed."""
    state = first_state(node, t)
    src = node.args[0]
    assert isinstance(src, fx.Node)
    dims = _dim(node, 1, "dim")
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        raise Unsupported("a reduction over every axis")
    keep = bool(_dim(node, 2, "keepdim", False))
    reduced = {int(d) % len(state) for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
    kind, zero = _REDUCTIONS[node.target], t.zero.get(src, False)
    for d in sorted(reduced):
        if state[d] and (kind != "sum" or not zero):
            what = "a sum of values that are not zero where pruned" if kind == "sum" else f"a {kind}"
            t.labels.mark((state[d],), f"{what} over it at node '{node.name}'")
        elif state[d]:
            t.gate_first_out = True  # its zeros come from the first linear's output: gate it there
    t.zero[node] = zero
    return tuple(() if d in reduced else axis for d, axis in enumerate(state) if keep or d not in reduced)


def mid_linear(node: fx.Node, t: Tracker) -> State:
    """An ``nn.Linear`` between the block's first and last (SwiftFormer's ``proj`` between its q/k
    projections and ``final``; CaiT's talking-heads projections over the heads axis). Its input
    features are contracted with its weight's dim 1: the mask pass gates its input, so a pruned
    input feature adds nothing. Its output features are a new index space of their own (dim 0 of
    weight and bias), gated after it, which merges with the index space it meets (``+ query``), as
    a projection of the block input does (``Tracker._start``). Only its feature axis changes; where
    another axis carries a group, its pruned elements stay zero only without a bias. A linear over
    an axis no group runs along (gMLP's spatial gating mixes the tokens) leaves every group where
    it is, and its output axis is no group either."""
    state = first_state(node, t)
    src = node.args[0]
    assert isinstance(src, fx.Node)
    mod = t.gm.get_submodule(str(node.target))
    axis = t.resolve(state[-1])
    if not axis:  # over an axis no group runs along (gMLP's token mixing): the other axes keep theirs
        t.zero[node] = mod.bias is None and t.zero.get(src, False)
        return state
    t.record_param(f"{node.target}.weight", 1, axis)
    t.labels.contracted.update(axis)  # it ends here, as a q/k head dim ends at q · k
    out = t.labels.new(int(node.meta[meta.SHAPE][-1]))
    t.secondary.add(out)
    t.record_param(f"{node.target}.weight", 0, (out,))
    if mod.bias is not None:
        t.record_param(f"{node.target}.bias", 0, (out,))
    t.mids.append(node)
    t.hidden.add(out)  # hidden neurons (find_groups._role), unless it merges into a group of other role
    t.zero[node] = not any(state[:-1]) or (mod.bias is None and t.zero.get(src, False))
    return (*state[:-1], (out,))


def _kernel_positions(node: fx.Node, t: Tracker, pos: int) -> int:
    """k·k of an unfold or fold node: its module's ``kernel_size``, or the call's (argument ``pos``)."""
    size: Any = (t.gm.get_submodule(str(node.target)).kernel_size if node.op == "call_module"
                 else _dim(node, pos, "kernel_size"))  # fmt: skip
    kh, kw = as_pair(size)
    return kh * kw


def unfold(node: fx.Node, t: Tracker) -> State:
    """``nn.Unfold`` / ``F.unfold`` of (N, C, H, W) into (N, C·k·k, L) (VOLO's outlook attention
    gathers each position's k × k neighbourhood of v): channel c's patch entries are ``c·k·k + j``,
    so the channel axis keeps its groups with the k·k kernel positions as an opaque factor after
    them, taken out again by a reshape; the positions, which no group may run along, become L.
    Zero channels unfold to zero."""
    state: State = unary(True)(node, t)
    if len(state) != 4 or any(state[2:]) or state[0]:
        raise Unsupported("unfolds an axis a group runs along, or a tensor that is not (N, C, H, W)")
    kk = _kernel_positions(node, t, 1)
    channels = (*state[1], t.labels.new_opaque(kk)) if state[1] and kk > 1 else state[1]
    return (state[0], channels, ())


def fold(node: fx.Node, t: Tracker) -> State:
    """``F.fold`` / ``nn.Fold`` of (N, C·k·k, L) back to (N, C, H, W): the inverse of :func:`unfold`,
    summing each channel's patch entries into its own positions. The channel axis' groups stay; its
    last factor must be the k·k kernel positions, which no group runs along."""
    state: State = unary(True)(node, t)
    if len(state) != 3 or state[0] or state[2]:
        raise Unsupported("folds an axis a group runs along, or a tensor that is not (N, C·k·k, L)")
    kk = _kernel_positions(node, t, 2)
    channels = t.resolve(state[1])
    if not channels:
        return (state[0], (), (), ())
    last = channels[-1]
    if kk > 1 and t.labels.sizes[last] != kk:
        raise Unsupported("folds a channel axis whose last factor is not the k·k kernel positions")
    if kk > 1 and last not in t.labels.opaque:  # a group's axis (VOLO's attention rows): summed here
        t.labels.mark(((last,),), f"folded as kernel positions at node '{node.name}'")
    return (state[0], channels[:-1] if kk > 1 else channels, (), ())


def power(node: fx.Node, t: Tracker) -> State:
    """``x ** p`` / ``torch.pow(x, p)`` of a tracked ``x`` by a number (MetaFormer's StarReLU squares
    its ReLU): elementwise, and a pruned 0 stays 0 where ``p > 0``."""
    exponent = node.args[1] if len(node.args) > 1 else node.kwargs.get("exponent")
    if isinstance(exponent, bool) or not isinstance(exponent, (int, float)):
        raise Unsupported("a power whose exponent is a tensor")
    state = first_state(node, t)
    src = node.args[0]
    assert isinstance(src, fx.Node)
    t.zero[node] = exponent > 0 and t.zero.get(src, False)
    return state


def softmax(node: fx.Node, t: Tracker) -> State:
    return _softmax_over(node, t, _dim(node, 1, "dim"))


def softmax_module(node: fx.Node, t: Tracker) -> State:
    """``nn.Softmax(dim)`` (Swin's attention): as ``softmax`` over the module's ``dim``."""
    return _softmax_over(node, t, getattr(t.gm.get_submodule(str(node.target)), "dim", None))


def _softmax_over(node: fx.Node, t: Tracker, dim: Any) -> State:
    state = first_state(node, t)
    if dim is None:
        raise Unsupported("softmax without an explicit dim")
    t.labels.mark((state[dim],), f"softmax over it at node '{node.name}'")
    t.zero[node] = False
    return state


def reshape(node: fx.Node, t: Tracker) -> State:
    state = first_state(node, t)
    src = node.args[0]
    assert isinstance(src, fx.Node)
    t.zero[node] = t.zero.get(src, False)
    return reshape_state(t.labels, state, src.meta[meta.SHAPE], node.meta[meta.SHAPE])


def permute_dims(node: fx.Node) -> list[int]:
    """The dims of a ``permute`` node (as separate arguments, one sequence, or ``dims=``)."""
    rest: list[Any] = list(node.args[1:]) or list(node.kwargs.get("dims", ()))  # type: ignore[arg-type]
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        rest = list(rest[0])
    return [int(d) for d in rest]


def permute(node: fx.Node, t: Tracker) -> State:
    state = unary(True)(node, t)
    return tuple(state[d] for d in permute_dims(node))


def transpose(node: fx.Node, t: Tracker) -> State:
    state = list(unary(True)(node, t))
    d0, d1 = (int(d) for d in node.args[1:3])  # type: ignore[arg-type]
    state[d0], state[d1] = state[d1], state[d0]
    return tuple(state)


def unbind(node: fx.Node, t: Tracker) -> tuple[State, ...]:
    state = unary(True)(node, t)
    dim = int(_dim(node, 1, "dim", 0)) % len(state)  # unbind(-1): q, k, v = qkv.unbind(-1)
    for label in state[dim]:
        t.labels.roles[label] = Role.SELECT
    t.labels.mark((state[dim],), f"indexed by unbind at node '{node.name}' (e.g. the q/k/v selector)")
    rest = state[:dim] + state[dim + 1 :]
    return tuple(rest for _ in node.meta[meta.SHAPE])


def _parts(node: fx.Node, size: int) -> int:
    """How many equal parts ``chunk`` / ``split`` cut an axis of ``size`` into (Unsupported if unequal)."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if name == "chunk":
        n = int(_dim(node, 1, "chunks"))
        if n <= 0 or size % n:
            raise Unsupported(f"chunk({n}) of an axis of {size} gives unequal parts")
        return n
    sizes = _dim(node, 1, "split_size_or_sections", _dim(node, 1, "split_size"))
    if isinstance(sizes, int) and sizes > 0 and size % sizes == 0:
        return size // sizes
    if isinstance(sizes, (list, tuple)) and sizes and len(set(sizes)) == 1 and sum(sizes) == size:
        return len(sizes)
    raise Unsupported(f"split into sections {sizes!r} of unequal size")


def chunk(node: fx.Node, t: Tracker) -> tuple[State, ...]:
    """``chunk(n, dim)`` / ``split`` into equal parts: a reshape of the axis into (n, size / n)
    followed by an unbind of the n, so part j holds elements j·size/n + i. The n-factor becomes a
    fixed selector (as q/k/v's), the size/n factor stays a group axis that every part shares: a
    gated MLP's fc1 output chunked into value and gate couples neuron i of both halves."""
    state = unary(True)(node, t)
    src = node.args[0]
    assert isinstance(src, fx.Node)
    shape = tuple(src.meta[meta.SHAPE])
    dim = int(_dim(node, 2, "dim", 0)) % len(shape)
    sections = _dim(node, 1, "split_size_or_sections", _dim(node, 1, "split_size"))
    if isinstance(sections, (list, tuple)) and len(set(sections)) > 1 and sum(sections) == shape[dim]:
        return _unequal_split(node, t, state, dim, [int(k) for k in sections])
    n = _parts(node, shape[dim])
    split = (*shape[:dim], n, shape[dim] // n, *shape[dim + 1 :])
    parted = reshape_state(t.labels, state, shape, split)
    for label in parted[dim]:
        t.labels.roles[label] = Role.SELECT
    t.labels.mark((parted[dim],), f"indexed by chunk/split at node '{node.name}' (the parts)")
    rest = parted[:dim] + parted[dim + 1 :]
    return tuple(rest for _ in range(n))


def _unequal_split(
    node: fx.Node, t: Tracker, state: State, dim: int, sections: list[int]
) -> tuple[State, ...]:
    """``split([a, b, c], dim)`` into parts of unequal size (LeViT's per-head q, k, v): the split axis
    keeps every element (fixed), and each part gets a fixed axis of its own size there, parts of one
    size sharing it (q · k contracts them element by element); the other axes keep their groups."""
    reason = f"split into sections {sections} of unequal size at node '{node.name}'"
    t.labels.mark((state[dim],), reason)
    fresh: dict[int, tuple[str, ...]] = {}
    for size in sections:
        if size not in fresh:
            fresh[size] = (t.labels.new(size),)
            t.labels.mark((fresh[size],), reason)
    return tuple(tuple(fresh[size] if k == dim else ax for k, ax in enumerate(state)) for size in sections)


def _broadcast(a: Sequence[int], b: Sequence[int]) -> tuple[int, ...]:
    return tuple(torch.broadcast_shapes(tuple(a), tuple(b)))  # type: ignore[no-untyped-call]


def _joined(node: fx.Node, t: Tracker) -> tuple[list[fx.Node], State, int, tuple[str, str] | None]:
    """The tensors ``cat`` / ``stack`` join, their state where they meet as in an add (for ``cat``
    the joined axis is left out of that: its labels are marked, it carries none), the dim, and the
    split they put back together (:func:`_permuted_parts`; then a ``cat`` marks nothing); the
    result keeps zeros when every input is tracked and keeps them."""
    tensors = _dim(node, 0, "tensors")
    if not isinstance(tensors, (list, tuple)) or not all(isinstance(x, fx.Node) for x in tensors):
        raise Unsupported("joins something other than a list of tensors")
    rank = len(tensors[0].meta[meta.SHAPE])
    concat = node.target not in ("stack", torch.stack)
    dim = int(_dim(node, 1, "dim", 0)) % (rank + int(not concat))
    state: State = ((),) * rank
    known: tuple[int, ...] = (1,) * rank
    parts = _permuted_parts(node, t, tensors, dim, concat)
    for x in tensors:
        if x not in t.states:
            continue
        own, size = t.states[x], tuple(x.meta[meta.SHAPE])
        if concat:
            if own[dim] and parts is None:
                t.labels.mark((own[dim],), f"concatenated along at node '{node.name}'")
            own, size = (*own[:dim], (), *own[dim + 1 :]), (*size[:dim], 1, *size[dim + 1 :])
        state = t.unify(node, state, own, rank, (known, size))
        known = _broadcast(known, size)
    for x in tensors:
        if x not in t.states:
            _untracked_operand(t, state, x, mark_at=node)
    t.zero[node] = all(x in t.states and t.zero.get(x, False) for x in tensors)
    return list(tensors), state, dim, parts


def _permuted_parts(
    node: fx.Node, t: Tracker, tensors: Sequence[fx.Node], dim: int, concat: bool
) -> tuple[str, str] | None:
    """(selector, group label) where ``cat`` / ``stack`` puts back together the parts a ``chunk`` or
    a strided slice took apart, in any order and each through any ops that keep its labels: rotary
    embeddings' ``cat([-x2, x1], -1)`` of a chunk's halves, or ``stack([-x[..., 1::2], x[..., ::2]],
    -1)`` of the odd and even dims (then reshaped back). Every input is tracked and carries the
    same single label L along the joined axis (``cat``) or along the axis before the new one
    (``stack``); L and a selector S with one element per input are the two factors one split made
    (S × L for a chunk, L × S for a strided slice). The result runs along S × L, or L × S, so it
    meets the unsplit axis element by element in L, while S, a fixed selector, is kept whole, and
    the order of the parts within it does not matter. None otherwise."""
    if not tensors or not all(x in t.states for x in tensors):
        return None
    at = dim if concat else dim - 1
    axes = {t.resolve(t.states[x][at]) if 0 <= at < len(t.states[x]) else () for x in tensors}
    if len(axes) != 1:
        return None
    axis: tuple[str, ...] = next(iter(axes))
    if len(axis) != 1:
        return None
    label = axis[0]
    for kids in t.labels.children.values():
        if concat and kids[1] == label and t.labels.sizes[kids[0]] == len(tensors):
            selector = kids[0]
        elif not concat and kids[0] == label and t.labels.sizes[kids[1]] == len(tensors):
            selector = kids[1]
        else:
            continue
        t.labels.roles.setdefault(selector, Role.SELECT)
        t.labels.mark(((selector,),), f"its parts are joined in another order at node '{node.name}'")
        return selector, label
    return None


def cat(node: fx.Node, t: Tracker) -> State:
    """``cat(tensors, dim)``: the other axes of every input meet as in an add; along ``dim`` the
    inputs' elements are laid end to end, so a group axis there would need its slices told apart:
    it is marked (fixed), and no group runs along the joined axis (prefix and patch tokens), except
    where the inputs are the parts of one split axis (:func:`_permuted_parts`: rotary embeddings'
    ``cat`` of the rotated halves of the head dims), which the result runs along again."""
    _, state, dim, parts = _joined(node, t)
    return state if parts is None else (*state[:dim], parts, *state[dim + 1 :])


def stack(node: fx.Node, t: Tracker) -> State:
    """``stack(tensors, dim)``: the inputs meet as in an add and a new axis, no group's, is inserted;
    where the inputs are the parts a strided slice took (:func:`_permuted_parts`), the new axis is
    that slice's selector, so a reshape that merges it back gives the unsplit axis."""
    _, state, dim, parts = _joined(node, t)
    return (*state[:dim], (parts[0],) if parts else (), *state[dim:])


def cast(node: fx.Node, t: Tracker) -> State:
    """``x.type_as(y)`` / ``x.to(y)``: ``y`` is read for its dtype (and device) only."""
    src = node.args[0]
    if not isinstance(src, fx.Node) or src not in t.states:
        raise Unsupported("the tracked value is not the tensor cast")
    t.zero[node] = t.zero.get(src, False)
    state: State = t.states[src]
    return state


def getitem(node: fx.Node, t: Tracker) -> Any:
    src, idx = node.args[0], node.args[1]
    assert isinstance(src, fx.Node)
    state = t.states[src]
    if (
        isinstance(state, tuple)
        and state
        and isinstance(state[0], tuple)
        and state[0]
        and isinstance(state[0][0], tuple)
    ):  # a tuple of states (unbind / split output)
        t.zero[node] = t.zero.get(src, False)
        return state[int(idx)]  # type: ignore[arg-type]
    return _index_tensor(node, t, state, idx)


def _index_tensor(node: fx.Node, t: Tracker, state: State, idx: Any) -> State:
    src_shape = node.args[0].meta[meta.SHAPE]  # type: ignore[union-attr]
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if Ellipsis in items:
        at = items.index(Ellipsis)
        fill = len(state) - (len(items) - 1 - items.count(None))
        items[at : at + 1] = [slice(None)] * fill
    out: list[tuple[str, ...]] = []
    axis = 0
    for it in items:
        if it is None:
            out.append(())
            continue
        if state[axis] and it != slice(None):
            if not isinstance(it, (int, slice)):
                raise Unsupported("indexes into a group axis with a tensor or a list")
            strided = _strided(node, t, state[axis], it, src_shape[axis]) if isinstance(it, slice) else None
            if strided is not None:
                out.append(strided)
                axis += 1
                continue
            # a slice or an element of a group axis: exact only while the axis keeps every element
            t.labels.mark((state[axis],), f"sliced or indexed at node '{node.name}'")
            if isinstance(it, slice):
                out.append(())
            axis += 1
            continue
        if not isinstance(it, int):
            out.append(state[axis])
        axis += 1
    out.extend(state[axis:])
    src = node.args[0]
    assert isinstance(src, fx.Node)
    t.zero[node] = t.zero.get(src, False)
    return tuple(out)


def _strided(
    node: fx.Node, t: Tracker, axis: tuple[str, ...], it: slice, size: int
) -> tuple[str, ...] | None:
    """``x[..., start::step]`` over a whole group axis (interleaved rotary embeddings take the odd and
    the even per-head dims, ``x[..., 1::2]`` and ``x[..., ::2]``): the innermost label of size n is
    a reshape into (n / step, step), and the slice picks one element of the step-factor, so the
    n / step factor stays a group axis (pairs of dims for rotary) and the step-factor becomes a fixed
    selector, as a ``chunk``'s parts do. None where the slice is not of that form (then the axis is
    fixed as for any other slice)."""
    step = 1 if it.step is None else it.step
    start = 0 if it.start is None else it.start
    last = t.resolve(axis[-1])
    if not (
        isinstance(step, int) and isinstance(start, int) and step > 1 and 0 <= start < step
        and (it.stop is None or (isinstance(it.stop, int) and it.stop >= size))
        and t.labels.sizes[last] % step == 0
    ):  # fmt: skip
        return None
    try:
        pairs, selector = t.labels.split(last, t.labels.sizes[last] // step)
    except Unsupported:
        return None
    t.labels.roles[selector] = Role.SELECT
    t.labels.mark(((selector,),), f"picked by a strided slice at node '{node.name}' (pairs kept whole)")
    return (*axis[:-1], pairs)


def shape_access(node: fx.Node, t: Tracker) -> None:
    """``x.shape`` / ``x.size()`` of a tracked tensor: free when sizes of group axes only feed reshape
    arguments inside the block (the rewrite replaces those) or the whole shape feeds a reshape (its
    value is the slim one at run time); a group axis whose size is read for anything else, or by a
    node outside the block, would bake a dense size, so that axis is marked (fixed), and the other
    axes stay free (rotary ``x.shape[-1] // 2``, MViTv2's pooled grid read by the next block)."""
    state = first_state(node, t)
    if node.op == "call_function" and node.args[1] not in _METADATA:
        raise Unsupported(f"reads the attribute '{node.args[1]}'")  # x.T, x.mT: a tensor, untracked
    inside = t.body.__contains__
    for user in node.users:
        pos = user.args[1] if user.target is operator.getitem else None
        axes = [state[pos]] if isinstance(pos, int) else state[pos] if isinstance(pos, slice) else ()
        if any(axes) and not all(_is_reshape(u) and inside(u) for u in user.users):
            reader = next(iter(user.users), user)
            t.labels.mark(tuple(axes), f"its size feeds '{reader.name}' at node '{node.name}'")
        elif pos is None and not _is_reshape(user) and node.op == "call_function" and node.args[1] == "shape":
            t.labels.mark(state, f"the whole shape feeds '{user.name}' at node '{node.name}'")
    if node.op == "call_method" and len(node.args) > 1:  # x.size(d)
        axis = state[int(node.args[1])]  # type: ignore[arg-type]
        if axis and not all(_is_reshape(u) and inside(u) for u in node.users):
            t.labels.mark((axis,), f"its size is read at node '{node.name}'")
    elif node.op == "call_method" and any(not _is_reshape(u) and u.target is not operator.getitem
                                          for u in node.users):  # fmt: skip
        t.labels.mark(state, f"the whole size feeds a node at '{node.name}'")


_METADATA = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}
"""Attributes of a tensor that are not tensors: reading them leaves the value's labels alone."""


def _is_reshape(node: fx.Node) -> bool:
    return node.target in ("reshape", "view", "unflatten", torch.reshape)


def binary(node: fx.Node, t: Tracker) -> State:
    a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    kind = "mul" if node.target in _MUL else "div" if node.target in _DIV else "add"
    out_shape = node.meta[meta.SHAPE]
    ta = isinstance(a, fx.Node) and a in t.states
    tb = isinstance(b, fx.Node) and b in t.states
    if ta and tb:
        assert isinstance(a, fx.Node) and isinstance(b, fx.Node)
        state = t.unify(
            node, t.states[a], t.states[b], len(out_shape), (a.meta[meta.SHAPE], b.meta[meta.SHAPE])
        )
        za, zb = t.zero.get(a, False), t.zero.get(b, False)
        t.zero[node] = (za or zb) if kind == "mul" else (za and zb) if kind == "add" else False
        return state
    if ta:
        return _binary_one_tracked(node, t, a, b, kind, out_shape)
    if kind == "div":
        raise Unsupported("divides by a tracked value")
    return _binary_one_tracked(node, t, b, a, kind, out_shape)


def _binary_one_tracked(  # noqa: PLR0917 - private helper of binary()
    node: fx.Node, t: Tracker, a: Any, b: Any, kind: str, out_shape: Any
) -> State:
    state = t.states[a]
    pad = len(out_shape) - len(state)
    state = ((),) * pad + tuple(state)
    _untracked_operand(t, state, b, mark_at=node)
    t.zero[node] = t.zero.get(a, False) and (kind in ("mul", "div") or b == 0)
    return state


def _untracked_operand(t: Tracker, state: State, b: Any, mark_at: fx.Node | None = None) -> None:
    """``b``, an untracked operand broadcast against a value of ``state``: an axis of it that spans a
    group axis and comes from parameters (:func:`_param_source`) is sliced by the rewrite along that
    axis; the nodes between them get that axis as their state, so the rewrite also resizes their
    reshapes. Any other such axis, with ``mark_at`` (an elementwise op, a join, an attention mask:
    ops that keep element e of the axis from element e of each operand), is gathered by the rewrite
    at run time (``Tracker.gathers``: the kept elements of ``b`` before ``mark_at``, exact since the
    op commutes with keeping a subset): a rotary table computed outside the block, per head or per
    head dim. Where ``b`` is itself computed from a tracked value (its size would already be slim),
    that axis' groups are marked unprunable instead; without ``mark_at``, the node is Unsupported."""
    if not isinstance(b, fx.Node):
        return
    other = b.meta.get(meta.SHAPE) or ()
    for i, size in enumerate(other):
        axis = state[len(state) - len(other) + i]
        if axis and size != 1:
            source = _param_source(b, i)
            if not isinstance(source, str):
                params, path = source
                for name, dim in params:
                    t.record_param(name, dim, axis)
                for node, at in path:  # merged: another axis of the operand may share the chain
                    before = t.states.get(node) or ((),) * len(node.meta[meta.SHAPE])
                    t.states[node] = tuple(axis if k == at else ax for k, ax in enumerate(before))
                continue
            reason = f"operand '{b.name}' spans a group axis and is no parameter ({source})"
            if mark_at is None:
                raise Unsupported(reason)
            if _reads_tracked(t, b):
                t.labels.mark((axis,), f"{reason} at node '{mark_at.name}'")
            else:  # the slim graph gathers the kept elements of b at run time
                t.gathers.setdefault(mark_at, []).append((b, i, axis))


def _reads_tracked(t: Tracker, b: fx.Node) -> bool:
    """Whether ``b`` is computed from a value the tracker reached (tracked, or failed on)."""
    seen: set[fx.Node] = set()
    stack = [b]
    while stack:
        n = stack.pop()
        if n in t.states or n in t.failed:
            return True
        if n not in seen:
            seen.add(n)
            stack += n.all_input_nodes
    return False


_SAME_AXES_METHODS = {"contiguous", "clone", "float", "half", "bfloat16", "to", "type_as", "detach"}
_ELEMENTWISE_FUNCTIONS = {
    *_ZERO_KEEPING_FUNCTIONS, *_OTHER_UNARY_FUNCTIONS, torch.clamp, torch.clip, torch.log, *_MUL, *_DIV,
    *_ADD,
} - {"mul", "div", "add", "sub"}  # fmt: skip
_ELEMENTWISE_METHODS = {*_ZERO_KEEPING_METHODS, *_OTHER_UNARY_METHODS, "clamp", "clip", "log", "mul", "div",
                        "add", "sub"}  # fmt: skip
"""Elementwise ops a bias chain may pass when their other operands are numbers (SwinV2's per-head
``clamp(logit_scale).exp()`` and ``16 * sigmoid(bias)``)."""
Source = tuple[list[tuple[str, int]], list[tuple[fx.Node, int]]]
"""Parameters (name, dim) an operand axis is read from, and the (node, axis) chain from them to it."""


def _param_source(node: fx.Node, axis: int) -> Source | str:
    """Where axis ``axis`` of ``node`` is read from, or why it cannot be followed.

    Follows ops that move axes without mixing them back to a ``get_attr`` (that parameter's dim) or
    to an ``nn.Linear``'s output features (its weight's and bias's dim 0). BEiT's per-head
    relative-position bias is ``table[index].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)``: the
    head axis is the table's dim 1. vit_relpos computes its table with a small MLP and reshapes it
    with the head count written out (``view(-1, 4)``): the head axis is the MLP's last Linear's
    output, and the literal 4 is resized by the rewrite like any reshape on a group axis. Every
    node on the way must feed only the next one (the chain gets the group axis as its state).
    """
    path: list[tuple[fx.Node, int]] = []
    for _ in range(64):
        if node.op == "get_attr" and _read_elsewhere(node):
            return f"'{node.target}' is no parameter and is read at another node too"
        if node.op == "get_attr":
            return [(str(node.target), axis)], path
        if len(node.users) > 1:
            return f"'{node.name}' is read by more than the bias"
        if _is_rel_pos_table(node):  # (q, k, C) rows of the (L, C) table: its channels are the table's
            if axis != 2:
                return f"'{node.name}' gathers along the axis"
            path.append((node, axis))
            node, axis = node.args[2], 1  # type: ignore[assignment]
            continue
        linear = _module(node)
        if isinstance(linear, nn.Linear) and axis == len(node.meta[meta.SHAPE]) - 1:
            params = [(f"{node.target}.weight", 0)]
            params += [(f"{node.target}.bias", 0)] if linear.bias is not None else []
            return params, [*path, (node, axis)]
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node) and len(node.all_input_nodes) == 1:  # ``16 * x``: the tensor operand
            src = node.all_input_nodes[0]
        shape = node.meta.get(meta.SHAPE)
        if not isinstance(src, fx.Node) or not isinstance(shape, tuple):
            return f"'{node.name}' reads no tensor of known shape"
        mapped = _input_axis(node, src, axis, len(shape))
        if isinstance(mapped, str):
            return mapped
        path.append((node, axis))
        node, axis = src, mapped
    return "the chain back to a parameter is too long"


def _is_rel_pos_table(node: fx.Node) -> bool:
    """timm SAM's ``get_rel_pos(q_size, k_size, rel_pos)`` (a leaf of the trace): the (L, C) table,
    resized along L only, indexed into (q_size, k_size, C), so channel c is the table's column c."""
    from timm.models import vision_transformer_sam as sam  # noqa: PLC0415 - optional timm internals

    return (
        node.op == "call_function"
        and node.target is getattr(sam, "get_rel_pos", None)
        and len(node.args) == 3
        and isinstance(node.args[2], fx.Node)
    )


def _read_elsewhere(node: fx.Node) -> bool:
    """Whether ``node`` gets a buffer or constant (not a parameter) that another node of the graph
    gets too: one rotary table read by every block (torch.fx makes a module's tensor attribute a
    constant, one per tensor), which slicing for one block would cut for the others. A parameter
    read twice is :func:`passes.find_groups._shared_fixed`'s case."""
    gm = node.graph.owning_module
    if gm is None:
        return False
    try:
        gm.get_parameter(str(node.target))
        return False
    except AttributeError:
        return sum(1 for n in node.graph.nodes if n.op == "get_attr" and n.target == node.target) > 1


def _module(node: fx.Node) -> nn.Module | None:
    """The module a ``call_module`` node calls (None for any other node)."""
    if node.op != "call_module":
        return None
    module: nn.Module = node.graph.owning_module.get_submodule(str(node.target))  # type: ignore[union-attr]
    return module


def _input_axis(node: fx.Node, src: fx.Node, axis: int, rank: int) -> int | str:
    """The axis of ``src`` (``node``'s input) that output axis ``axis`` of ``node`` is, or why none."""
    target = node.target
    if target in ("unsqueeze", torch.unsqueeze):
        d = int(_dim(node, 1, "dim")) % rank
        return f"'{node.name}' creates the axis" if axis == d else axis - int(axis > d)
    if target in ("permute", torch.permute):
        return permute_dims(node)[axis] % rank
    if target in ("transpose", torch.transpose, "swapaxes"):
        d0, d1 = (int(d) % rank for d in node.args[1:3])  # type: ignore[arg-type]
        return d1 if axis == d0 else d0 if axis == d1 else axis
    if target in _SAME_AXES_METHODS and node.op == "call_method":
        return axis
    if len(node.all_input_nodes) == 1 and isinstance(
        _module(node), _ZERO_KEEPING_MODULES + _OTHER_UNARY_MODULES
    ):
        return axis  # an elementwise module
    if len(node.all_input_nodes) == 1 and (
        target in _ELEMENTWISE_FUNCTIONS or (node.op == "call_method" and target in _ELEMENTWISE_METHODS)
    ):
        return axis  # elementwise, any other operand a number: slicing commutes with it
    if target in ("view", "reshape", torch.reshape):
        return _reshaped_axis(node, src, axis)
    if target is F.pad:  # pads the last len(pad) // 2 axes
        padded = len(_dim(node, 1, "pad") or ()) // 2
        return f"'{node.name}' pads the axis" if axis >= rank - padded else axis
    if target is operator.getitem and isinstance(node.args[1], fx.Node):
        index_rank = len(node.args[1].meta.get(meta.SHAPE) or ())
        # a gather along dim 0: the leading axes are the index's, the rest the source's
        return f"'{node.name}' gathers along the axis" if axis < index_rank else axis - index_rank + 1
    if target is operator.getitem and isinstance(node.args[1], tuple):
        # ``table[:, idx]`` (LeViT's attention biases): axes before the first index tensor, each taken
        # whole by ``:``, are the source's own
        index = node.args[1]
        first = next((k for k, i in enumerate(index) if isinstance(i, fx.Node)), None)
        if first is not None and axis < first and all(i == slice(None) for i in index[:first]):
            return axis
        return f"'{node.name}' indexes the axis"
    return f"'{node.name}' ({getattr(target, '__name__', target)}) lies between it and a parameter"


def _reshaped_axis(node: fx.Node, src: fx.Node, axis: int) -> int | str:
    """The input axis that output axis ``axis`` of reshape ``node`` keeps whole, or why none. Its
    size must be -1 or a literal (which the rewrite resizes), not a size read at run time."""
    rest: list[Any] = list(node.args[1:]) or list(node.kwargs.get("shape", ()))  # type: ignore[arg-type]
    sizes = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
    out, inp = node.meta[meta.SHAPE], src.meta.get(meta.SHAPE) or ()
    if len(sizes) != len(out) or not isinstance(sizes[axis], int):
        size = sizes[axis] if len(sizes) == len(out) else "?"
        return f"'{node.name}' sizes the axis with '{size}', read at run time"
    after = math.prod(out[axis + 1 :])
    for j, size in enumerate(inp):
        if size == out[axis] and math.prod(inp[j + 1 :]) == after:
            return j
    return f"'{node.name}' splits or merges the axis"


def maybe_add_mask(node: fx.Node, t: Tracker) -> State:
    """timm's ``scores + mask`` (mask may be None at run time): an add with an untracked operand."""
    first_state(node, t)
    return _binary_one_tracked(node, t, node.args[0], node.args[1], "add", node.meta[meta.SHAPE])


def consumes(node: fx.Node, t: Tracker) -> None:
    """Reads a tracked tensor only for its dtype/device (timm's mask resolver)."""
    return None


def matmul(node: fx.Node, t: Tracker) -> State:
    a, b = node.args[0], node.args[1]
    assert isinstance(a, fx.Node) and isinstance(b, fx.Node)
    sa, sb = t.state_or_empty(a), t.state_or_empty(b)
    if len(sa) < 2 or len(sb) < 2:
        raise Unsupported("matmul of a vector")
    if (a in t.states) != (b in t.states):
        return _matmul_one_untracked(node, t, a, b)
    try:
        k = t.unify_axis(node, sa[-1], sb[-2], a.meta[meta.SHAPE][-1], b.meta[meta.SHAPE][-2])
    except Unsupported:
        if bool(t.resolve(sa[-1])) == bool(t.resolve(sb[-2])):
            raise
        # one side's axis is a group's, the other's no group runs along (VOLO contracts its attention
        # weights' kernel positions with v's unfolded ones): that group cannot be pruned
        k = t.resolve(sa[-1]) or t.resolve(sb[-2])
        t.labels.mark((k,), f"contracted with an axis no group runs along at node '{node.name}'")
    t.contract(node, k, (a, b))
    shape_a, shape_b = a.meta[meta.SHAPE][:-2], b.meta[meta.SHAPE][:-2]
    batch = t.unify(node, sa[:-2], sb[:-2], len(node.meta[meta.SHAPE]) - 2, (shape_a, shape_b))
    for axis in batch:
        for label in axis:
            t.labels.roles.setdefault(label, Role.HEADS)
    t.zero[node] = t.zero.get(a, False) and t.zero.get(b, False)
    return (*batch, sa[-2], sb[-1])


def _matmul_one_untracked(node: fx.Node, t: Tracker, a: fx.Node, b: fx.Node) -> State:
    """``a @ b`` where one side comes from outside the block (GC ViT's global query, computed once
    per stage from pooled features, times the block's own keys): that side's batch axes and its
    contracted axis span the tracked side's groups, so the slim graph gathers their kept elements
    (:func:`_untracked_operand`); the contraction stays exact where the tracked side keeps zeros."""
    tracked, other = (a, b) if a in t.states else (b, a)
    st, rank_o = t.states[tracked], len(other.meta[meta.SHAPE])
    batch_rank = len(node.meta[meta.SHAPE]) - 2
    batch = ((),) * (batch_rank - (len(st) - 2)) + tuple(st[:-2])
    k = st[-1] if tracked is a else st[-2]
    own = (*batch[batch_rank - (rank_o - 2) :], *(((), k) if other is a else (k, ())))
    _untracked_operand(t, own, other, mark_at=node)
    t.contract(node, k, (a, b))
    for axis in batch:
        for label in axis:
            t.labels.roles.setdefault(label, Role.HEADS)
    t.zero[node] = False
    return (*batch, (), st[-1]) if other is a else (*batch, st[-2], ())


def sdpa(node: fx.Node, t: Tracker) -> State:
    q, k, v = node.args[:3]
    assert isinstance(q, fx.Node) and isinstance(k, fx.Node) and isinstance(v, fx.Node)
    mask = _dim(node, 3, "attn_mask")
    sq, sk, sv = t.state_or_empty(q), t.state_or_empty(k), t.state_or_empty(v)
    if sq[-2] or sk[-2] or sv[-2]:
        raise Unsupported("the token axis carries a group")
    if isinstance(mask, fx.Node) and mask in t.states:
        # a bias computed from q itself (SAM's decomposed relative positions): one bias per head, so
        # its head axes are q's; where q keeps zeros the slim bias is the kept heads' bias exactly
        sm = t.states[mask]
        if sm[-1] or sm[-2]:
            raise Unsupported("the attention mask carries a group axis along its token axes")
        t.unify(node, sq[:-2], sm[:-2], len(node.meta[meta.SHAPE]) - 2,
                (q.meta[meta.SHAPE][:-2], mask.meta[meta.SHAPE][:-2]))  # fmt: skip
    elif isinstance(mask, fx.Node):  # an untracked bias on the scores (batch…, heads, q tokens, k tokens)
        _untracked_operand(t, (*sq[:-2], sq[-2], sk[-2]), mask, mark_at=node)
    e = t.unify_axis(node, sq[-1], sk[-1], q.meta[meta.SHAPE][-1], k.meta[meta.SHAPE][-1])
    t.contract(node, e, (q, k))
    if e:
        scale = _dim(node, 6, "scale")
        t.sdpa_scales[node.name] = (
            float(scale) if scale is not None else 1.0 / math.sqrt(q.meta[meta.SHAPE][-1])
        )
    rank = len(node.meta[meta.SHAPE])
    shape_q, shape_k, shape_v = (n.meta[meta.SHAPE][:-2] for n in (q, k, v))
    qk = t.unify(node, sq[:-2], sk[:-2], rank - 2, (shape_q, shape_k))
    batch = t.unify(node, qk, sv[:-2], rank - 2, (_broadcast(shape_q, shape_k), shape_v))
    for axis in batch:
        for label in axis:
            t.labels.roles.setdefault(label, Role.HEADS)
    t.zero[node] = t.zero.get(v, False)
    return (*batch, sq[-2], sv[-1])


def einsum(node: fx.Node, t: Tracker) -> State:
    """``torch.einsum`` of two operands with an explicit output (SAM's ``"bhwc,hkc->bhwk"``, q times
    a relative-position table): a subscript in both operands and in the output is a batch axis (the
    operands' labels unify), one in both but not in the output is contracted (as by ``matmul``), one
    in a single operand passes through to the output. An untracked operand's axes that meet a group
    axis are sliced or gathered as any untracked operand's (:func:`_untracked_operand`)."""
    eq, ops = node.args[0], einsum_operands(node)
    parsed = einsum_terms(eq) if isinstance(eq, str) else None
    if parsed is None or ops is None or not all(isinstance(o, fx.Node) for o in ops):
        raise Unsupported("einsum other than of two tensors with an explicit output (no '...', no diagonal)")
    *terms, out = parsed
    a, b = ops
    assert isinstance(a, fx.Node) and isinstance(b, fx.Node)
    states = [t.state_or_empty(a), t.state_or_empty(b)]
    shapes = [a.meta[meta.SHAPE], b.meta[meta.SHAPE]]
    tracked = [a in t.states, b in t.states]
    axes: dict[str, tuple[str, ...]] = {}
    for letter in dict.fromkeys(terms[0] + terms[1]):
        where = [(i, term.index(letter)) for i, term in enumerate(terms) if letter in term]
        labelled = [states[i][d] for i, d in where if tracked[i]]
        if len(where) == 2 and all(tracked):
            (_, da), (_, db) = where
            axis = t.unify_axis(node, states[0][da], states[1][db], shapes[0][da], shapes[1][db])
        else:
            axis = next((x for x in labelled if x), ())
        if letter not in out:
            if len(where) == 1 and axis:
                raise Unsupported("einsum sums one operand over a group axis")
            t.contract(node, axis, (a, b))
        axes[letter] = axis
    for i, term in enumerate(terms):
        if not tracked[i]:  # its axes along the tracked side's groups come from parameters, or are gathered
            _untracked_operand(t, tuple(axes[letter] for letter in term), ops[i], mark_at=node)
    t.zero[node] = all(t.zero.get(op, False) for op, on in zip((a, b), tracked, strict=True) if on)
    return tuple(axes[letter] for letter in out)


def spatial_rel_pos(node: fx.Node, t: Tracker) -> State:
    """MViTv2's ``cal_rel_pos_type(attn, q, has_cls_token, q_size, k_size, rel_pos_h, rel_pos_w)``
    (a trace leaf): adds ``einsum(q, rel_pos_h[dist])`` and the same for w to the scores, per head.
    The scores keep their state (heads on the batch axes, no group on the token axes); q's head
    axes are the scores'; its head dims are contracted with the tables' dim 1, sliced with them."""
    attn, q = node.args[0], node.args[1]
    tables = node.args[5:7]
    if not (isinstance(attn, fx.Node) and isinstance(q, fx.Node) and attn in t.states and q in t.states):
        raise Unsupported("relative positions of scores or queries the block does not track")
    sa, sq = t.states[attn], t.states[q]
    if sa[-1] or sa[-2] or sq[-2]:
        raise Unsupported("the token axis carries a group")
    shapes = (attn.meta[meta.SHAPE][:-2], q.meta[meta.SHAPE][:-2])
    batch = t.unify(node, sa[:-2], sq[:-2], len(sa) - 2, shapes)
    for table in tables:
        if not (isinstance(table, fx.Node) and table.op == "get_attr" and len(table.users) == 1):
            raise Unsupported("a relative-position table that is no parameter of its own")
        t.record_param(str(table.target), 1, sq[-1])
    t.contract(node, sq[-1], (q,))
    t.zero[node] = False
    return (*batch, (), ())


def build_rules() -> dict[Any, Rule]:
    rules: dict[Any, Rule] = {}
    for key in (*_ZERO_KEEPING_MODULES, *_ZERO_KEEPING_FUNCTIONS, *_ZERO_KEEPING_METHODS):
        rules[key] = unary(True)
    for key in (*_OTHER_UNARY_MODULES, *_OTHER_UNARY_FUNCTIONS, *_OTHER_UNARY_METHODS):
        rules[key] = unary(False)
    for key in (*_MUL, *_DIV, *_ADD):
        rules[key] = binary
    rules.update(dict.fromkeys(_POOLED_AXES, pool))
    rules.update(dict.fromkeys(_REDUCTIONS, reduction))
    rules.update({nn.Unfold: unfold, F.unfold: unfold, nn.Fold: fold, F.fold: fold, operator.pow: power,
                  torch.pow: power, "pow": power})  # fmt: skip
    rules[nn.Linear] = mid_linear  # the first and the last linear are the tracker's own (Tracker.run)
    rules.update({F.layer_norm: layer_norm, nn.LayerNorm: layer_norm, F.softmax: softmax,
                  nn.Softmax: softmax_module, torch.softmax: softmax, "softmax": softmax,
                  "reshape": reshape, "view": reshape, "reshape_as": reshape_as, "view_as": reshape_as,
                  "expand_as": expand_as, nn.BatchNorm1d: batch_norm, nn.BatchNorm2d: batch_norm,
                  nn.BatchNorm3d: batch_norm, nn.SyncBatchNorm: batch_norm, nn.Upsample: spatial_resize,
                  F.interpolate: spatial_resize, nn.Conv1d: depthwise_conv, nn.Conv2d: depthwise_conv,
                  nn.Conv3d: depthwise_conv,
                  torch.reshape: reshape, "flatten": reshape, torch.flatten: reshape, "unflatten": reshape,
                  "permute": permute, torch.permute: permute, "transpose": transpose,
                  torch.transpose: transpose, "swapaxes": transpose, "unbind": unbind, torch.unbind: unbind,
                  "chunk": chunk, torch.chunk: chunk, "split": chunk, torch.split: chunk,
                  torch.cat: cat, torch.concat: cat, torch.stack: stack, "type_as": cast, "to": cast,
                  F.normalize: normalize, "unsqueeze": unsqueeze, torch.unsqueeze: unsqueeze,
                  "squeeze": squeeze, torch.squeeze: squeeze, "repeat_interleave": repeat_interleave,
                  torch.repeat_interleave: repeat_interleave,
                  operator.getitem: getitem, getattr: shape_access, "size": shape_access,
                  operator.matmul: matmul, torch.matmul: matmul, "matmul": matmul, torch.bmm: matmul,
                  F.scaled_dot_product_attention: sdpa, torch.einsum: einsum})  # fmt: skip
    if hasattr(nn, "RMSNorm"):
        rules[nn.RMSNorm] = layer_norm
    if hasattr(F, "rms_norm"):
        rules[F.rms_norm] = layer_norm
    _add_timm_rules(rules)
    return rules


def _add_timm_rules(rules: dict[Any, Rule]) -> None:
    from timm.layers import attention as timm_attention  # noqa: PLC0415 - optional timm internals
    from timm.layers import norm as timm_norm  # noqa: PLC0415

    if hasattr(timm_attention, "maybe_add_mask"):
        rules[timm_attention.maybe_add_mask] = maybe_add_mask
    if hasattr(timm_attention, "resolve_self_attn_mask"):
        rules[timm_attention.resolve_self_attn_mask] = consumes
    for name in ("LayerNorm", "RmsNorm", "SimpleNorm"):
        if hasattr(timm_norm, name):
            rules[getattr(timm_norm, name)] = layer_norm
    from timm.layers import norm_act  # noqa: PLC0415

    for name in ("BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d"):
        if hasattr(norm_act, name):
            rules[getattr(norm_act, name)] = batch_norm
    for name in ("GELU", "GELUTanh", "QuickGELU"):
        from timm.layers import activations  # noqa: PLC0415

        if hasattr(activations, name):
            rules[getattr(activations, name)] = unary(True)
    from timm.models import mvitv2  # noqa: PLC0415

    if hasattr(mvitv2, "cal_rel_pos_type"):
        rules[mvitv2.cal_rel_pos_type] = spatial_rel_pos
