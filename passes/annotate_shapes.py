"""AnnotateShapesPass: every node → ``node.meta[SHAPE]`` (its output shape, batch 2).

Pattern: any traced graph. Result: the same graph, each tensor-valued node annotated with its
output shape (a tuple of shapes for tuple outputs, ``None`` for non-tensors). Why: the grouping
rules map indices through reshapes by comparing concrete shapes, and FLOP counts need token
counts. Shapes come from fake tensors, so no arithmetic runs (ViT-L annotates in well under 1 s).
A batch of 2 keeps the batch axis distinct from size-1 axes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from p3b_fx.core import meta
from p3b_fx.core.pass_infra import GraphPass, PassResult, module_device, module_dtype
from p3b_fx.errors import PassError


def _shape_of(val: Any) -> Any:
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape)
    if isinstance(val, (tuple, list)) and val and all(isinstance(v, torch.Tensor) for v in val):
        return tuple(tuple(int(s) for s in v.shape) for v in val)
    return None


def tensor_state(gm: nn.Module) -> dict[tuple[str, str], Any]:
    """Every module's buffers and plain tensor attributes, by (module path, name)."""
    state: dict[tuple[str, str], Any] = {}
    for path, module in gm.named_modules():
        state.update({(path, k): v for k, v in module._buffers.items()})
        state.update({(path, k): v for k, v in vars(module).items() if isinstance(v, torch.Tensor)})
    return state


def restore_tensor_state(gm: nn.Module, state: dict[tuple[str, str], Any]) -> None:
    """Undo what a module's forward stored in itself while running on fake tensors or being traced
    (ConViT caches ``self.rel_indices = self.get_rel_indices(N)``, LeViT and EfficientViT-M
    ``self.attention_bias_cache[device] = ...``: a fake tensor or a proxy there broke every later
    real run of the model)."""
    for (path, name), value in state.items():
        module = gm.get_submodule(path)
        if name in module._buffers:
            if module._buffers[name] is not value:
                module._buffers[name] = value
        elif getattr(module, name, None) is not value:
            setattr(module, name, value)
    traced = (FakeTensor, fx.Proxy)
    for path, module in gm.named_modules():  # fake tensors (or a tracer's proxies) stored under new names
        for store in (module._buffers, vars(module)):
            for name in [k for k, v in store.items() if isinstance(v, traced) and (path, k) not in state]:
                del store[name]
        for cache in [v for k, v in vars(module).items() if isinstance(v, dict) and not k.startswith("_")]:
            # EfficientViT-M's and LeViT's ``attention_bias_cache[device] = ...`` in eval mode
            for key in [k for k, v in cache.items() if isinstance(v, traced)]:
                del cache[key]


@dataclass(frozen=True)
class AnnotateShapesPass(GraphPass):
    input_shape: tuple[int, ...]
    batch: int = 2

    def call(self, gm: fx.GraphModule) -> PassResult:
        shape = (self.batch, *self.input_shape[1:])
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        example = mode.from_tensor(torch.empty(shape, device=module_device(gm), dtype=module_dtype(gm)))
        state = tensor_state(gm)
        try:
            with torch.no_grad():
                FakeTensorProp(gm, mode).propagate_dont_convert_inputs(example)
        except Exception as exc:  # shape propagation surfaces the model's own errors
            raise PassError(
                f"shape propagation with an input of shape {shape} failed: {type(exc).__name__}: {exc}. "
                "Pass the model's real input shape to p3b_fx.trace(model, input_shape=...)"
            ) from exc
        finally:
            restore_tensor_state(gm, state)
        modified = False
        for node in gm.graph.nodes:
            new = _shape_of(node.meta.pop("val", None))
            if node.meta.get(meta.SHAPE) != new:
                node.meta[meta.SHAPE] = new
                modified = True
        return PassResult(gm, modified)
