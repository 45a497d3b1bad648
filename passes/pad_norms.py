"""PadNormsPass: a norm over a shrunk axis computes the dense norm's statistics from the kept elements.

Pattern: the norms a block records in ``Block.norms`` (a LayerNorm, RMSNorm or SimpleNorm over an
axis groups run along) whose axis the plan shrinks. Result: each such node, whether a call of
``F.layer_norm``/``F.rms_norm`` or of a norm module, becomes a call of
:func:`p3b_fx.core.padded_norm.padded_norm` with the dense width, on the same (already sliced)
weight and bias; the node keeps its name, so a slimmed graph can be slimmed again (the dense width
stays the one the groups give). Why: in the hard-masked model the pruned elements enter the norm
as zeros and leave it gated, so they count in its mean and variance; the slim model must count
them too to compute the same values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from p3b_fx.core.padded_norm import padded_norm
from p3b_fx.core.pass_infra import PassResult, module_dtype
from passes.axis_rules import norm_kind, norm_params
from passes.slim_common import PlanPass, flat_index, live_blocks, nodes_by_name


@dataclass(frozen=True)
class PadNormsPass(PlanPass):
    def call(self, gm: fx.GraphModule) -> PassResult:
        kept = self.plan.effective(self.groups)
        names = nodes_by_name(gm)
        modified = False
        for block in live_blocks(self.groups, self.plan):
            for norm in self.groups.block(block).norms:
                node = names[norm.node]
                if norm_kind(gm, node) in (None, "p") or flat_index(norm.factors, kept) is None:
                    continue  # rewritten before, a p-norm (zeros add nothing to it), or nothing cut
                _inline(gm, node, math.prod(size for size, _ in norm.factors))
                modified = True
        return PassResult(gm, modified)


class _Padded(nn.Module):
    """``padded_norm`` with its constants bound, for tracing."""

    def __init__(  # noqa: PLR0917
        self, full: int, eps: float, kind: str, weight: bool, bias: bool, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.full, self.eps, self.kind, self.weight, self.bias = full, eps, kind, weight, bias
        self.dtype = dtype

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        w, b = (weight if self.weight else None), (bias if self.bias else None)
        return padded_norm(x, w, b, self.full, self.eps, self.kind, self.dtype)


def _inline(gm: fx.GraphModule, node: fx.Node, full: int) -> None:
    """Replace the norm ``node`` by the ops of :func:`padded_norm` on its input, weight and bias."""
    kind, params = norm_kind(gm, node), norm_params(gm, node)
    assert kind is not None and params is not None  # find_groups recorded it as a norm over an axis
    with gm.graph.inserting_before(node):
        weight, bias = (gm.graph.get_attr(p) if p is not None else None for p in params)
    if node.op == "call_module":
        eps = getattr(gm.get_submodule(str(node.target)), "eps", None)
    else:  # F.layer_norm(x, shape, weight, bias, eps) or F.rms_norm(x, shape, weight, eps)
        pos = 4 if node.target is F.layer_norm else 3
        eps = node.args[pos] if len(node.args) > pos else node.kwargs.get("eps", 1e-5 if pos == 4 else None)
    if eps is None:  # nn.RMSNorm's default: the input dtype's epsilon (float32 here)
        eps = torch.finfo(torch.float32).eps
    # float32 statistics (as F.layer_norm's on CUDA) unless the model is float64 when it is slimmed
    dtype = torch.float64 if module_dtype(gm) == torch.float64 else torch.float32
    sub = fx.Tracer().trace(_Padded(full, float(eps), kind, weight is not None, bias is not None, dtype))
    inputs = [n for n in sub.nodes if n.op == "placeholder"]
    x = node.args[0]
    unused = x  # a placeholder the traced norm does not read (no weight, no bias)
    values = {inputs[0]: x, inputs[1]: weight or unused, inputs[2]: bias or unused}
    with gm.graph.inserting_before(node):
        out = gm.graph.graph_copy(sub, values)  # type: ignore[arg-type]
    assert isinstance(out, fx.Node)
    # the norm node becomes the last op (the cast back), so it keeps its name, which the groups'
    # node infos are keyed by (the SDPA after a q norm finds its contracted head_dim through it)
    node.op, node.target, node.args, node.kwargs = out.op, out.target, out.args, out.kwargs
    gm.graph.erase_node(out)
