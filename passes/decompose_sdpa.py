"""DecomposeSdpaPass: fused attention → matmul, scale, mask, softmax, matmul.

Pattern: a ``call_function`` node calling ``torch.nn.functional.scaled_dot_product_attention(q, k,
v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None)``.
Result: ``softmax((q @ k.transpose(-2, -1)) * scale [+ mask], -1) @ v`` as plain nodes, with
``scale`` the node's explicit one or ``q.size(-1) ** -0.5``.
Why: the ONNX exporter has no SDPA below opset 14, and JetPack 4.6 (TensorRT 8.0/8.2) reads only
opset 13; its boards (Nano, TX2, Xavier, SM < 7.5) have no fused multi-head attention anyway, so
nothing is lost by spelling attention out. Numbers equal eager SDPA to float rounding (≤ 1e-6).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from p3b_fx.core.pass_infra import ReplaceCallsPass
from p3b_fx.errors import PassError

_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS: dict[str, Any] = {
    "attn_mask": None,
    "dropout_p": 0.0,
    "is_causal": False,
    "scale": None,
    "enable_gqa": False,
}


def is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.nn.functional.scaled_dot_product_attention


def add_attention_mask(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA's mask rule: a boolean mask keeps ``True`` positions, a float mask is added."""
    if mask.dtype == torch.bool:
        return scores.masked_fill(mask.logical_not(), float("-inf"))
    return scores + mask


def mask_causal(scores: torch.Tensor) -> torch.Tensor:
    """``is_causal=True``: query i attends to keys j <= i (built from Range, not Trilu: opset 13)."""
    rows = torch.arange(scores.size(-2), device=scores.device).unsqueeze(-1)
    cols = torch.arange(scores.size(-1), device=scores.device).unsqueeze(0)
    return scores.masked_fill(cols > rows, float("-inf"))


def _arguments(node: fx.Node) -> dict[str, Any]:
    args = dict(_SDPA_DEFAULTS)
    args.update(zip(_SDPA_PARAMS, node.args, strict=False))
    args.update(node.kwargs)
    return args


def _check_supported(node: fx.Node, args: dict[str, Any]) -> None:
    for name, ok in (
        ("dropout_p", args["dropout_p"] == 0),
        ("is_causal", isinstance(args["is_causal"], bool)),
        ("enable_gqa", args["enable_gqa"] is False),
        ("scale", args["scale"] is None or isinstance(args["scale"], (int, float))),
    ):
        if not ok:
            raise PassError(
                f"DecomposeSdpaPass: node '{node.name}' has {name}={args[name]!r}; only dropout_p=0, a "
                "constant is_causal, enable_gqa=False and a constant scale can be decomposed. Trace the "
                "model in eval mode with p3b_fx.trace (it fixes optional arguments to their defaults)"
            )


def _decompose(graph: fx.Graph, node: fx.Node) -> fx.Node:
    args = _arguments(node)
    _check_supported(node, args)
    q, k, v = args["query"], args["key"], args["value"]
    with graph.inserting_before(node):
        key_t = graph.call_method("transpose", (k, -2, -1))
        scores = graph.call_function(torch.matmul, (q, key_t))
        scale = args["scale"]
        if scale is None:
            scale = graph.call_function(operator.pow, (graph.call_method("size", (q, -1)), -0.5))
        scores = graph.call_function(operator.mul, (scores, scale))
        if args["is_causal"]:
            scores = graph.call_function(mask_causal, (scores,))
        if args["attn_mask"] is not None:
            scores = graph.call_function(add_attention_mask, (scores, args["attn_mask"]))
        weights = graph.call_function(torch.softmax, (scores, -1))
        out = graph.call_function(torch.matmul, (weights, v))
    return out


@dataclass(frozen=True)
class DecomposeSdpaPass(ReplaceCallsPass):
    """Replace every fused SDPA call by its plain-op definition (edits ``gm`` in place)."""

    def matches(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        return is_sdpa(node)

    def replacement(self, gm: fx.GraphModule, node: fx.Node) -> fx.Node:
        return _decompose(gm.graph, node)
