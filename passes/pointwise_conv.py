"""PointwiseConvPass: a 1×1 convolution becomes a linear over the channels; SlimConvPass turns it back.

Pattern: ``call_module C`` with ``C`` exactly an ``nn.Conv2d`` of kernel 1×1, stride 1, no padding
and one group (EfficientFormerV2's and MobileViTv2's attention, FastViT's and PoolFormer's
``ConvMlp``, the MBConv of MaxViT and CoAtNet, LeViT-conv, Visformer), reading a batched NCHW input.

Result: ``x.permute(0, 2, 3, 1)`` → ``call_module C`` with ``C`` an ``nn.Linear`` (weight
``W[:, :, 0, 0]``, the same bias) → ``.permute(0, 3, 1, 2)``. Why: every later pass (blocks, groups,
masks, folding, slicing) follows ``nn.Linear`` modules and gates the last axis, so without this the
blocks of those models are either not found or kept whole. Nothing else is needed: the channel
axis of the NCHW tensors between such linears (depthwise convolutions, BatchNorm2d, a
squeeze-excite) has its own axis rules.

Same function up to rounding: a 1×1 convolution is that matmul (its kernel accumulates the same
products, possibly in another order). The Linear's weight is a new Parameter with the conv's values
(a conv weight has two more dimensions, and a Parameter cannot be a view); the traced model's conv
keeps its own, as :class:`passes.functional_linear.FunctionalLinearPass` does for BEiT's bias. Only
the GraphModule changes (its intermediate modules are its own containers).

The paths of the converted modules are kept in ``gm.meta[POINTWISE_KEY]``. :class:`SlimConvPass`,
run on the slim model, makes each such ``permute → Linear → permute`` a 1×1 ``nn.Conv2d`` again
(with the sliced weight): the deployed graph is the convolution network that was traced, narrower,
with no transposes that TensorRT would have to run around a MatMul.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch
from torch import fx, nn

from p3b_fx.core import meta
from p3b_fx.core.pass_infra import GraphPass, PassResult, param_copy, replace_node
from passes.axis_rules import permute_dims

POINTWISE_KEY = meta.POINTWISE_CONVS
_TO_LAST = (0, 2, 3, 1)
_TO_CHANNELS = (0, 3, 1, 2)


def is_pointwise(module: nn.Module) -> bool:
    """A plain ``nn.Conv2d`` that is a matmul over the channels at every pixel."""
    if type(module) is not nn.Conv2d:
        return False
    padding = module.padding
    no_pad = padding in ("valid", "same") or tuple(padding) == (0, 0)
    return module.kernel_size == (1, 1) and module.stride == (1, 1) and no_pad and module.groups == 1


_VIEW_METHODS = frozenset({"view", "reshape", "permute", "transpose", "flatten", "unflatten", "contiguous",
                           "squeeze", "unsqueeze", "expand", "view_as", "reshape_as", "detach"})  # fmt: skip


def _aliases(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """The nodes that may receive ``node``'s output itself or a view of it: its users, and theirs
    through views and modules that may return their input (``nn.Identity``, dropout; NeXt-ViT's MLP
    runs ``act(norm(conv(x)))`` with an ``nn.Identity`` norm)."""
    found: list[fx.Node] = []
    stack = list(node.users)
    while stack:
        user = stack.pop()
        if user in found:
            continue
        found.append(user)
        passes_through = (user.op == "call_method" and user.target in _VIEW_METHODS) or (
            user.op == "call_module"
            and isinstance(gm.get_submodule(str(user.target)), (nn.Identity, nn.modules.dropout._DropoutNd))
        )
        if passes_through or user.target is operator.getitem:
            stack.extend(user.users)
    return found


def _out_of_place(gm: fx.GraphModule, node: fx.Node) -> None:
    """Make ``node`` compute out of place if it writes into its input (NeXt-ViT's
    ``nn.ReLU(inplace=True)`` after a 1×1 conv). Its input is now a permuted view of the linear's
    output, and while training that linear is a custom autograd Function (``passes.fold_masks``),
    whose output views autograd refuses to modify in place. Same values either way."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if getattr(module, "inplace", False) is True:
            fresh = copy.copy(module)  # gm's own: the traced model keeps its in-place module
            setattr(fresh, "inplace", False)  # noqa: B010 - nn.Module types attributes as tensors
            gm.set_submodule(str(node.target), fresh)
    elif node.op == "call_method" and str(node.target).endswith("_") and not str(node.target).startswith("_"):
        name = str(node.target)[:-1]
        if hasattr(torch.Tensor, name):
            node.target = name
    elif node.op == "call_function" and node.kwargs.get("inplace") is True:
        node.kwargs = {**node.kwargs, "inplace": False}


@dataclass(frozen=True)
class PointwiseConvPass(GraphPass):
    """Rewrite each 1×1 ``nn.Conv2d`` call into ``permute → nn.Linear → permute`` (edits ``gm`` in place).

    A module called more than once (shared weights) is converted once and every call rewritten."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        converted: list[str] = list(gm.meta.get(POINTWISE_KEY, ()))
        calls: dict[str, list[fx.Node]] = {}
        permuted: dict[fx.Node, fx.Node] = {}
        for node in gm.graph.nodes:
            one_input = node.op == "call_module" and len(node.args) == 1 and not node.kwargs
            one_input = one_input and isinstance(node.args[0], fx.Node)
            if one_input and is_pointwise(gm.get_submodule(str(node.target))):
                calls.setdefault(str(node.target), []).append(node)
        read = {str(n.target).rpartition(".")[0] for n in gm.graph.nodes if n.op == "get_attr"}
        calls = {path: nodes for path, nodes in calls.items() if path not in read}  # weight read elsewhere
        for path, nodes in calls.items():
            conv = gm.get_submodule(path)
            assert isinstance(conv, nn.Conv2d)
            linear = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None, device="meta")
            linear.weight = param_copy(conv.weight, conv.weight.detach()[:, :, 0, 0])
            if conv.bias is not None:
                linear.bias = param_copy(conv.bias, conv.bias.detach())
            gm.set_submodule(path, linear)
            converted.append(path)
            for node in nodes:
                x = node.args[0]
                assert isinstance(x, fx.Node)
                last = self._channels_last(gm, x, permuted)
                with gm.graph.inserting_before(node):
                    call = gm.graph.call_module(path, (last,))
                    back = gm.graph.call_method("permute", (call, *_TO_CHANNELS))
                for user in _aliases(gm, node):
                    _out_of_place(gm, user)
                replace_node(gm, node, back)
        gm.meta[POINTWISE_KEY] = tuple(converted)
        return PassResult(gm, bool(calls))

    @staticmethod
    def _channels_last(gm: fx.GraphModule, x: fx.Node, permuted: dict[fx.Node, fx.Node]) -> fx.Node:
        """One ``x.permute(0, 2, 3, 1)`` for every 1×1 conv reading ``x``: EfficientFormerV2's q, k
        and v then read one node, which makes them one read group (``find_groups``) and lets them
        start on one label (``Tracker``), as three linears of one input do."""
        if x not in permuted:
            with gm.graph.inserting_after(x):
                permuted[x] = gm.graph.call_method("permute", (x, *_TO_LAST))
        return permuted[x]


def _permute_dims(node: object) -> tuple[int, ...] | None:
    """The dims of a ``permute`` method call (``axis_rules.permute_dims``), None for any other node."""
    if not (isinstance(node, fx.Node) and node.op == "call_method" and node.target == "permute"):
        return None
    try:
        return tuple(permute_dims(node))
    except (TypeError, ValueError):  # dims computed at run time
        return None


def _channels_last_source(node: object) -> tuple[fx.Node, fx.Node | None] | None:
    """(x, idx) where ``node`` is ``x.permute(0, 2, 3, 1)``, or ``index_select`` of it on the last
    axis (``passes.gather_reads``: the block reads the kept residual channels only), idx None for
    the former; else None."""
    gathered: fx.Node | None = None
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is torch.index_select:
        args = node.args
        if len(args) != 3 or args[1] != -1 or not isinstance(args[2], fx.Node):
            return None
        node, gathered = args[0], args[2]
    if not isinstance(node, fx.Node) or _permute_dims(node) != _TO_LAST:
        return None
    x = node.args[0]
    return (x, gathered) if isinstance(x, fx.Node) else None


@dataclass(frozen=True)
class SlimConvPass(GraphPass):
    """Make every ``permute(0, 2, 3, 1) → Linear → permute(0, 3, 1, 2)`` whose Linear was a 1×1 conv
    (``gm.meta[POINTWISE_KEY]``) a 1×1 ``nn.Conv2d`` again, a gather of the channels before it
    (``index_select`` on the last axis) moved to the channel axis. A Linear called otherwise (a
    mask site between, during training) is left as it is: the function is the same either way."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        paths = set(gm.meta.get(POINTWISE_KEY, ()))
        calls: dict[str, list[tuple[fx.Node, fx.Node | None, fx.Node, fx.Node]]] = {}
        other: set[str] = set()
        for node in gm.graph.nodes:
            if node.op != "call_module" or str(node.target) not in paths:
                continue
            found = _channels_last_source(node.args[0]) if len(node.args) == 1 and not node.kwargs else None
            users = list(node.users)
            if found is not None and len(users) == 1 and _permute_dims(users[0]) == _TO_CHANNELS:
                calls.setdefault(str(node.target), []).append((*found, node, users[0]))
            else:
                other.add(str(node.target))
        done = [p for p in calls if p not in other and type(gm.get_submodule(p)) is nn.Linear]
        gathers: dict[tuple[fx.Node, fx.Node], fx.Node] = {}
        for path in done:
            linear = gm.get_submodule(path)
            assert isinstance(linear, nn.Linear)
            bias = linear.bias is not None
            conv = nn.Conv2d(linear.in_features, linear.out_features, 1, bias=bias, device="meta")
            conv.weight = param_copy(linear.weight, linear.weight.detach()[:, :, None, None])
            if linear.bias is not None:
                conv.bias = param_copy(linear.bias, linear.bias.detach())
            gm.set_submodule(path, conv)
            for x, idx, node, back in calls[path]:
                src = x if idx is None else self._gathered(gm, x, idx, gathers)
                with gm.graph.inserting_before(node):
                    call = gm.graph.call_module(path, (src,))
                replace_node(gm, back, call)  # the permutes and the old gather go with the clean-up
        if done:
            gm.meta[POINTWISE_KEY] = tuple(p for p in gm.meta.get(POINTWISE_KEY, ()) if p not in done)
        return PassResult(gm, bool(done))

    @staticmethod
    def _gathered(
        gm: fx.GraphModule, x: fx.Node, idx: fx.Node, gathers: dict[tuple[fx.Node, fx.Node], fx.Node]
    ) -> fx.Node:
        """One ``index_select(x, 1, idx)`` for every convolution reading those channels of ``x``."""
        if (x, idx) not in gathers:
            anchor = max((x, idx), key=lambda n: list(gm.graph.nodes).index(n))
            with gm.graph.inserting_after(anchor):
                gathers[(x, idx)] = gm.graph.call_function(torch.index_select, (x, 1, idx))
        return gathers[(x, idx)]


__all__ = ["POINTWISE_KEY", "PointwiseConvPass", "SlimConvPass", "is_pointwise"]
