"""DecomposeRmsNormPass: RMSNorm → the few tensor ops it is made of.

Pattern: a ``call_function`` node of ``F.rms_norm(x, normalized_shape, weight=None, eps=None)``
(``torch.rms_norm`` too; timm's ``RmsNorm`` traces into it), or a ``call_module`` node of
``nn.RMSNorm``.
Result: a call of :func:`rms_norm_ops`, which computes ``x · rsqrt(mean(x², last dims) + eps) ·
weight`` from pow, mean, add, rsqrt and mul, in float32 for half-precision inputs, as torch does.
Why: the ONNX exporter has no RMSNorm below opset 23 (``RMSNormalization``), and every JetPack's
TensorRT reads an older opset; Sapiens2, the Perception Encoder's variants and other recent ViTs
normalise with it. Numbers equal ``F.rms_norm`` to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from p3b_fx.core.pass_infra import ReplaceCallsPass

_FUNCTIONS = tuple(
    f for f in (getattr(F, "rms_norm", None), getattr(torch, "rms_norm", None)) if f is not None
)
_MODULES = tuple(m for m in (getattr(nn, "RMSNorm", None),) if m is not None)


def rms_norm_ops(
    x: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
) -> torch.Tensor:
    """``F.rms_norm`` spelled out in ops every ONNX opset has (``eps=None``: the dtype's epsilon)."""
    dims = tuple(range(-len(normalized_shape), 0))
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    compute = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    out = (compute * torch.rsqrt(compute.pow(2).mean(dims, keepdim=True) + eps)).to(x.dtype)
    return out * weight if weight is not None else out


def is_rms_norm(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _FUNCTIONS
    return node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), _MODULES)


@dataclass(frozen=True)
class DecomposeRmsNormPass(ReplaceCallsPass):
    """Replace every RMSNorm (function or ``nn.RMSNorm`` module) by :func:`rms_norm_ops` (in place)."""

    def matches(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        return is_rms_norm(gm, node)

    def replacement(self, gm: fx.GraphModule, node: fx.Node) -> fx.Node:
        if node.op == "call_function":
            return gm.graph.call_function(rms_norm_ops, node.args, node.kwargs)
        mod = gm.get_submodule(str(node.target))
        assert isinstance(mod, nn.RMSNorm)
        weight = gm.graph.get_attr(f"{node.target}.weight") if mod.weight is not None else None
        return gm.graph.call_function(
            rms_norm_ops, (node.args[0], tuple(mod.normalized_shape), weight, mod.eps)
        )
