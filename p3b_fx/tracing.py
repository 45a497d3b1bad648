"""The one tracer: timm ViTs (and any nn.Module of that family) to a ``torch.fx.GraphModule``.

It knows timm's lists of functions FX must not trace into (autowrap) and modules it must keep
whole (leaves), and adds the stochastic modules (DropPath, PatchDropout) so that a graph traced
once still follows ``.train()`` / ``.eval()``. Optional forward arguments (timm's
``attn_mask=None, is_causal=False``) are specialised to their defaults, so they never become
graph inputs. Python-level ``if self.training`` branches are specialised to eval mode.

Python control flow on shapes (``if pad_b > 0:``, ``assert L == H * W``, ``int(N ** 0.5)``) is
specialised to the traced input shape: the tracer computes the value from fake tensors of that
shape (no arithmetic runs) and follows the branch taken, and the graph asserts the value
(``torch._assert``), so an input that would take the other branch stops with a message instead of
computing something else. This lets the tracer open timm's leaf modules that hide transformer
blocks behind such code (:data:`OPENED_LEAVES`: TinyViT's blocks, Twins' local attention and
MobileViT's blocks), and a few of timm's notrace functions (:data:`OPENED_FUNCTIONS`: MViTv2's
reshapes around its pooling); control flow on tensor values still fails to trace.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import logging
import operator
from typing import Any

import torch
from timm.layers import _fx as timm_fx
from timm.layers.drop import DropPath
from timm.layers.patch_dropout import PatchDropout
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx._symbolic_trace import _maybe_revert_all_patches

from p3b_fx.core import meta
from p3b_fx.core.pass_infra import module_device, module_dtype
from p3b_fx.errors import TraceError
from passes.annotate_shapes import restore_tensor_state, tensor_state
from passes.functional_linear import FunctionalLinearPass
from passes.pointwise_conv import PointwiseConvPass
from passes.split_linear import SplitLinearPass

logger = logging.getLogger(__name__)

INPUT_SHAPE_KEY = meta.INPUT_SHAPE

_EXTRA_LEAVES: tuple[type[nn.Module], ...] = (DropPath, PatchDropout)


def _timm_classes(*paths: str) -> tuple[type[nn.Module], ...]:
    """The classes ``module:Name`` that this timm version has."""
    found = []
    for path in paths:
        module, _, name = path.partition(":")
        cls = getattr(importlib.import_module(f"timm.models.{module}"), name, None)
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


OPENED_LEAVES: tuple[type[nn.Module], ...] = _timm_classes(
    "tiny_vit:TinyVitBlock",  # pads to whole windows: `if pad_b > 0 or pad_r > 0`
    "twins:LocallyGroupedAttn",  # the same padding
    "mobilevit:MobileVitBlock",  # resizes to whole patches: `if new_h != H or new_w != W`
    "mobilevit:MobileVitV2Block",  # the same
    "efficientvit_msra:LocalWindowAttention",  # `if H <= self.window_resolution` and window padding
)
"""timm leaf modules the tracer traces into, specialising their shape-dependent control flow (each
is tested: ``tests/test_trace.py``). Left closed: modules without an ``nn.Linear`` (convolutions,
norms); NaFlexEmbeds, whose control flow follows the patch layout of each input; ConViT's GPSA,
which writes into a tensor it builds from the token count (``rel_indices[..., 2] = ...``). Should
one of these fail to trace in another timm version, the model is traced with them closed."""


def _timm_functions(*paths: str) -> tuple[Any, ...]:
    """The functions ``module:name`` that this timm version has."""
    found = []
    for path in paths:
        module, _, name = path.partition(":")
        fn = getattr(importlib.import_module(f"timm.models.{module}"), name, None)
        if callable(fn):
            found.append(fn)
    return tuple(found)


OPENED_FUNCTIONS: tuple[Any, ...] = _timm_functions(
    "mvitv2:reshape_pre_pool",  # (B, heads, N, d) → (B·heads, d, H, W) around MViTv2's pooling convs
    "mvitv2:reshape_post_pool",
)
"""timm functions kept whole by timm's own tracer (``register_notrace_function``) that this tracer
traces into: plain reshapes, permutes and slices the grouping rules follow, where a leaf would fix
every head and head dim it reads. Their control flow tests Python values only (``if
has_cls_token``). Should one fail to trace, a model from their timm module is traced again with
them whole, as with :data:`OPENED_LEAVES`."""


class _SpecialisingProxy(fx.Proxy):
    """``int(proxy)`` specialises to the traced shape's value, as ``bool`` does (see ``to_bool``)."""

    def __int__(self) -> int:
        tracer = self.tracer
        assert isinstance(tracer, _Tracer)
        return int(tracer.specialise(self, int))


class _Tracer(fx.Tracer):
    def __init__(
        self,
        input_shape: tuple[int, ...] | None = None,
        concrete: dict[str, Any] | None = None,
        *,
        open_leaves: bool = True,
    ) -> None:
        opened_fns = {id(f) for f in OPENED_FUNCTIONS} if open_leaves else set()
        super().__init__(
            autowrap_functions=tuple(f for f in timm_fx._autowrap_functions if id(f) not in opened_fns)
        )
        opened = OPENED_LEAVES if open_leaves else ()
        self._leaves = tuple(c for c in timm_fx._leaf_modules if c not in opened) + _EXTRA_LEAVES
        self._input_shape = input_shape
        self._concrete = concrete or {}
        self._env: dict[fx.Node, Any] = {}
        self._interpreter: fx.Interpreter | None = None
        self._mode: FakeTensorMode | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self._leaves):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _SpecialisingProxy(node, self)

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self.specialise(obj, bool))

    def specialise(self, obj: fx.Proxy, kind: type) -> Any:
        """The value ``obj`` has for the traced input shape, asserted in the graph."""
        value = self._value(obj.node, kind)
        # `obj == value`, not `not obj`: a graph module retraced by torch.fx may hold no `not`
        cond = self.create_proxy("call_function", operator.eq, (obj, value), {})
        shape = (2, *self._input_shape[1:]) if self._input_shape else None
        message = (
            f"p3b-fx traced this model for inputs of shape {shape}, where '{obj.node.name}' is {value!r}; "
            "this input takes another path through the model's Python code: trace it with "
            "p3b_fx.trace(model, input_shape=...) of this input"
        )
        self.create_proxy("call_function", torch._assert, (cond, message), {})
        return value

    def _value(self, node: fx.Node, kind: type) -> Any:
        """``kind`` of ``node``'s value: the graph traced so far runs on fake tensors of the input shape
        up to ``node`` (each node once per trace), outside the tracer's patches so modules run."""
        if self._input_shape is None:
            raise TraceError(f"control flow on '{node.name}' needs the input shape to specialise")
        if self._interpreter is None:
            self._mode = FakeTensorMode(allow_non_fake_inputs=True)
            self._interpreter = fx.Interpreter(self.root, garbage_collect_values=False, graph=self.graph)
            self._interpreter.env = self._env
        assert self._mode is not None
        first = True
        try:
            with torch.no_grad(), _maybe_revert_all_patches(), self._mode:
                for n in self.graph.nodes:
                    if n.op == "placeholder":
                        if n not in self._env:
                            shape = (2, *self._input_shape[1:])
                            example = torch.empty(
                                shape, device=module_device(self.root), dtype=module_dtype(self.root)
                            )
                            self._env[n] = (
                                self._mode.from_tensor(example) if first else self._concrete.get(n.target)
                            )
                        first = False
                    elif n not in self._env and n.op != "output":
                        self._env[n] = self._interpreter.run_node(n)
                    if n is node:
                        break
                value = kind(self._env[node])
        except Exception as exc:  # a value that depends on the data, not on shapes
            raise TraceError(
                f"torch.fx cannot trace {type(self.root).__name__}: Python control flow at "
                f"'{node.name}' depends on tensor values, not only on shapes ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); mark the offending submodule as a "
                "leaf or export a static variant of the model"
            ) from exc
        return value


def _concrete_args(model: nn.Module) -> dict[str, Any]:
    params = list(inspect.signature(model.forward).parameters.values())
    if not params:
        raise TraceError(f"{type(model).__name__}.forward takes no input; expected forward(x, ...)")
    concrete: dict[str, Any] = {}
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty:
            raise TraceError(
                f"{type(model).__name__}.forward has a second required argument '{p.name}'; "
                "p3b-fx traces models whose forward takes one image tensor"
            )
        concrete[p.name] = p.default
    return concrete


def default_input_shape(model: nn.Module) -> tuple[int, ...] | None:
    """(1, C, H, W) from timm's pretrained config or the patch embedding, if the model says."""
    if isinstance(model, fx.GraphModule) and INPUT_SHAPE_KEY in model.meta:
        return tuple(model.meta[INPUT_SHAPE_KEY])
    cfg = getattr(model, "pretrained_cfg", None) or {}
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    chans = getattr(getattr(patch_embed, "proj", None), "in_channels", None)
    if hasattr(patch_embed, "backbone") and "input_size" in cfg:  # hybrid: proj reads CNN features
        chans = cfg["input_size"][0]
    if img_size is not None and chans is not None:
        return (1, int(chans), int(img_size[0]), int(img_size[1]))
    if "input_size" in cfg:
        return (1, *(int(v) for v in cfg["input_size"]))
    return None


def trace(model: nn.Module, *, input_shape: tuple[int, ...] | None = None) -> fx.GraphModule:
    """Trace ``model`` to a GraphModule whose outputs equal eager outputs exactly (eval, fp32).

    ``input_shape`` (batch first) is recorded for the shape analyses; it defaults to what the
    model says about itself. The model is not changed (its train/eval mode is restored).
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if not any(True for _ in model.parameters()):
        raise TraceError(f"{type(model).__name__} has no parameters: nothing to prune or compile")
    shape = input_shape or default_input_shape(model)
    if shape is None:
        raise TraceError(
            f"cannot tell the input shape of {type(model).__name__}: pass input_shape=(1, C, H, W)"
        )
    was_training = model.training
    state = tensor_state(model)  # undone after: what forwards store in their modules while traced
    model.eval()
    try:
        concrete = _concrete_args(model)
        try:
            graph = _Tracer(tuple(shape), concrete).trace(model, concrete_args=concrete)
        except Exception as exc:
            opened = sorted({type(m).__name__ for m in model.modules() if isinstance(m, OPENED_LEAVES)})
            modules = {type(m).__module__ for m in model.modules()}
            opened += [f.__name__ for f in OPENED_FUNCTIONS if f.__module__ in modules]
            if not opened:
                raise
            logger.warning(
                "could not trace into %s (%s: %s); traced them as leaves, so their blocks stay whole",
                ", ".join(opened), type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "",
            )  # fmt: skip
            graph = _Tracer(tuple(shape), concrete, open_leaves=False).trace(model, concrete_args=concrete)
    except TraceError:
        raise
    except Exception as exc:  # torch.fx raises many types for untraceable code
        raise TraceError(
            f"torch.fx cannot trace {type(model).__name__}: {type(exc).__name__}: {exc}. "
            "Data-dependent Python control flow is the usual cause; mark the offending submodule "
            "as a leaf or export a static variant of the model"
        ) from exc
    finally:
        model.train(was_training)
        restore_tensor_state(model, state)
    _drop_specialised_inputs(graph)
    name = type(model).__name__
    gm = fx.GraphModule(model, graph, class_name=f"Traced{name}" if name != "GraphModule" else name)
    FunctionalLinearPass()(gm)  # BEiT / EVA-02 qkv: F.linear(x, W, cat(biases)) → an nn.Linear of gm's own
    PointwiseConvPass()(gm)  # 1×1 convolutions → permute, nn.Linear, permute (undone in the slim model)
    SplitLinearPass()(gm)  # a linear split into unequal sections → one per section (fused in the slim model)
    gm.meta[INPUT_SHAPE_KEY] = tuple(shape)
    gm.train(was_training)
    return gm


def _drop_specialised_inputs(graph: fx.Graph) -> None:
    """Remove the placeholders of specialised optional arguments and the asserts guarding them."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for ph in placeholders[1:]:
        doomed: list[fx.Node] = []
        stack = [ph]
        while stack:
            n = stack.pop()
            doomed.append(n)
            stack.extend(n.users)
        for n in reversed(doomed):
            if not n.users:
                graph.erase_node(n)
    graph.lint()


def input_shape_of(gm: fx.GraphModule) -> tuple[int, ...]:
    shape = gm.meta.get(INPUT_SHAPE_KEY)
    if shape is None:
        raise TraceError("this GraphModule was not made by p3b_fx.trace: trace the model with it first")
    return tuple(shape)


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy that keeps the GraphModule-level meta (input shape)."""
    new = copy.deepcopy(gm)
    new.meta.update(copy.deepcopy(gm.meta))
    return new
