"""The one tracer: timm ViTs (and any nn.Module of that family) to a ``torch.fx.GraphModule``.

It knows timm's lists of functions FX must not trace into (autowrap) and modules it must keep
whole (leaves), and adds the stochastic modules (DropPath, PatchDropout) so that a graph traced
once still follows ``.train()`` / ``.eval()``. Optional forward arguments (timm's
``attn_mask=None, is_causal=False``) are specialised to their defaults, so they never become
graph inputs. Python-level ``if self.training`` branches are specialised to eval mode.
"""

from __future__ import annotations

import copy
import inspect
import logging
from typing import Any

from timm.layers import _fx as timm_fx
from timm.layers.drop import DropPath
from timm.layers.patch_dropout import PatchDropout
from torch import fx, nn

from p3b_fx.core import meta
from p3b_fx.errors import TraceError
from passes.functional_linear import FunctionalLinearPass

logger = logging.getLogger(__name__)

INPUT_SHAPE_KEY = meta.INPUT_SHAPE

_EXTRA_LEAVES: tuple[type[nn.Module], ...] = (DropPath, PatchDropout)


class _Tracer(fx.Tracer):
    def __init__(self) -> None:
        super().__init__(autowrap_functions=tuple(timm_fx._autowrap_functions))
        self._leaves = tuple(timm_fx._leaf_modules) + _EXTRA_LEAVES

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self._leaves):
            return True
        return super().is_leaf_module(m, module_qualified_name)


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
    model.eval()
    try:
        graph = _Tracer().trace(model, concrete_args=_concrete_args(model))
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
    _drop_specialised_inputs(graph)
    name = type(model).__name__
    gm = fx.GraphModule(model, graph, class_name=f"Traced{name}" if name != "GraphModule" else name)
    FunctionalLinearPass()(gm)  # BEiT / EVA-02 qkv: F.linear(x, W, cat(biases)) → an nn.Linear of gm's own
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
