"""DecomposeRelPosPass: MViTv2's spatial relative-position bias without in-place writes or einsum.

Pattern: a ``call_function`` node of timm's ``mvitv2.cal_rel_pos_type(attn, q, has_cls_token,
q_size, k_size, rel_pos_h, rel_pos_w)`` (a leaf of the trace).
Result: a call of :func:`spatial_rel_pos_ops`, which computes the same bias (q times the tables'
rows at each query/key distance, along h and along w) with :func:`passes.decompose_einsum.einsum_ops`
and adds it to the scores padded with zeros over the class token's row and column, where timm
writes it into a slice of the scores in place.
Why: the in-place write exports as ``ScatterND`` and the products as ``Einsum``, neither of which
TensorRT 8.0 (JetPack 4.6) parses; a padded add is a ``Pad`` and an ``Add`` every release takes.
Numbers equal timm's to float rounding (the two biases are summed before they meet the scores).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from p3b_fx.core.pass_infra import ReplaceCallsPass
from passes.decompose_einsum import einsum_ops


def _distances(q: int, k: int, device: torch.device) -> torch.Tensor:
    """timm's query/key distance table along one axis (scaled where the two grids differ)."""
    q_ratio, k_ratio = max(k / q, 1.0), max(q / k, 1.0)
    dist = (
        torch.arange(q, device=device, dtype=torch.long).unsqueeze(-1) * q_ratio
        - torch.arange(k, device=device, dtype=torch.long).unsqueeze(0) * k_ratio
    )
    return (dist + (k - 1) * k_ratio).long()


def spatial_rel_pos_ops(  # noqa: PLR0917 - the positional signature of the function it replaces
    attn: torch.Tensor,
    q: torch.Tensor,
    has_cls_token: bool,
    q_size: Sequence[int],
    k_size: Sequence[int],
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
) -> torch.Tensor:
    """``cal_rel_pos_type`` as a pure function of its inputs (see the module doc)."""
    sp = 1 if has_cls_token else 0
    (q_h, q_w), (k_h, k_w) = q_size, k_size
    rel_h = rel_pos_h[_distances(q_h, k_h, q.device)]
    rel_w = rel_pos_w[_distances(q_w, k_w, q.device)]
    b, heads, _, dim = q.shape
    r_q = q[:, :, sp:].reshape(b, heads, q_h, q_w, dim)
    bias_h = einsum_ops("byhwc,hkc->byhwk", r_q, rel_h)
    bias_w = einsum_ops("byhwc,wkc->byhwk", r_q, rel_w)
    bias = (bias_h.unsqueeze(-1) + bias_w.unsqueeze(-2)).reshape(b, heads, q_h * q_w, k_h * k_w)
    return attn + F.pad(bias, (sp, 0, sp, 0))


def _targets() -> tuple[Any, ...]:
    from timm.models import mvitv2  # noqa: PLC0415 - optional timm internals

    return tuple(f for f in (getattr(mvitv2, "cal_rel_pos_type", None),) if f is not None)


def is_spatial_rel_pos(node: fx.Node) -> bool:
    return (
        node.op == "call_function" and node.target in _targets() and len(node.args) == 7 and not node.kwargs
    )


@dataclass(frozen=True)
class DecomposeRelPosPass(ReplaceCallsPass):
    """Replace every ``cal_rel_pos_type`` call by :func:`spatial_rel_pos_ops` (in place)."""

    def matches(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        return is_spatial_rel_pos(node)

    def replacement(self, gm: fx.GraphModule, node: fx.Node) -> fx.Node:
        return gm.graph.call_function(spatial_rel_pos_ops, node.args)
