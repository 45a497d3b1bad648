"""FunctionalLinearPass: a functional linear on a module's weight becomes a call of an ``nn.Linear``.

Pattern: ``F.linear(x, weight=<get_attr P.weight>, bias=<get_attr> | torch.cat((<get_attr>, …)))``
where ``P`` holds nothing but that weight in the traced graph, and the bias (one tensor, or the
concatenation of several along dim 0) has ``weight.shape[0]`` entries. timm's BEiT and EVA-02 build
their qkv projection so: ``F.linear(x, self.qkv.weight, torch.cat((q_bias, k_bias, v_bias)))``, with
``k_bias`` a zero buffer.

Result: ``call_module P`` with ``P`` an ``nn.Linear`` that holds the same weight Parameter and a new
bias Parameter with the concatenated values. Why: every later pass follows ``nn.Linear`` modules
(blocks, groups, masks, folding, slicing), so without this the attention of those models is not a
found block and is never pruned.

Same function, bit for bit: the same weight and bias values reach the same ``F.linear``. What
changes is what trains: the bias is one Parameter, so the key part of the bias, a fixed zero buffer
before, now trains too. It cannot change the model's function. Adding a vector b to every key adds
q·b to all of a query's scores alike, and softmax ignores a constant shift.

Only the GraphModule changes: its intermediate modules are its own containers (``fx.GraphModule``
copies the path down to each attribute it reads), and ``P`` is replaced there, never in the model
that was traced. The weight stays shared with that model, as every other parameter of the trace is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from p3b_fx.core.pass_infra import GraphPass, PassResult, replace_node


def _attr(gm: fx.GraphModule, node: object) -> torch.Tensor | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    owner, _, name = str(node.target).rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    value = getattr(module, name, None)
    return value if isinstance(value, torch.Tensor) else None


def _bias_parts(gm: fx.GraphModule, bias: object) -> list[torch.Tensor] | None:
    """The 1-D tensors a bias argument concatenates (one get_attr, or torch.cat of them on dim 0)."""
    single = _attr(gm, bias)
    if single is not None:
        return [single] if single.dim() == 1 else None
    if not (isinstance(bias, fx.Node) and bias.op == "call_function" and bias.target is torch.cat):
        return None
    if len(bias.users) != 1 or not bias.args or not isinstance(bias.args[0], (list, tuple)):
        return None
    dim = bias.kwargs.get("dim", bias.args[1] if len(bias.args) > 1 else 0)
    parts = [_attr(gm, a) for a in bias.args[0]]
    if dim not in (0, -1) or not parts or any(p is None or p.dim() != 1 for p in parts):
        return None
    return [p for p in parts if p is not None]


def _match(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, str, nn.Parameter, list[torch.Tensor]] | None:
    if node.op != "call_function" or node.target is not F.linear:
        return None
    args = dict(zip(("input", "weight", "bias"), node.args, strict=False)) | dict(node.kwargs)
    x, weight_node, bias = args.get("input"), args.get("weight"), args.get("bias")
    weight = _attr(gm, weight_node)
    if not isinstance(x, fx.Node) or not isinstance(weight, nn.Parameter) or weight.dim() != 2:
        return None
    assert isinstance(weight_node, fx.Node)
    owner, _, field = str(weight_node.target).rpartition(".")
    if field != "weight" or not owner:
        return None
    holder = gm.get_submodule(owner)
    if type(holder) is not nn.Module or list(holder.children()) or len(list(holder.parameters())) != 1:
        return None  # a real module (maybe shared with the traced model), or one that holds more
    parts = _bias_parts(gm, bias)
    if parts is None or sum(p.numel() for p in parts) != weight.shape[0]:
        return None
    return x, owner, weight, parts


@dataclass(frozen=True)
class FunctionalLinearPass(GraphPass):
    """Rewrite each matching ``F.linear`` into a call of an ``nn.Linear`` (edits ``gm`` in place)."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in list(gm.graph.nodes):
            found = _match(gm, node)
            if found is None:
                continue
            x, owner, weight, parts = found
            linear = nn.Linear(weight.shape[1], weight.shape[0], device="meta")
            linear.weight = weight
            bias = torch.cat([p.detach() for p in parts]).to(weight.dtype)  # a new tensor: cat copies
            linear.bias = nn.Parameter(bias, requires_grad=weight.requires_grad)
            parent, _, name = owner.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, name, linear)
            with gm.graph.inserting_before(node):
                call = gm.graph.call_module(owner, (x,))
            replace_node(gm, node, call)
            modified = True
        return PassResult(gm, modified)
