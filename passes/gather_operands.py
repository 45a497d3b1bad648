"""GatherOperandsPass: operands computed outside the groups read only the kept elements.

Pattern: a node of a live block with ``NodeInfo.gathers``: an operand that spans a group axis but
is neither tracked nor read from parameters (a rotary table computed outside the block, per head
dim or per head, ``q * cos``). Result: ``torch.index_select(operand, dim, idx)`` replaces that
operand of the node (idx an int64 buffer under ``p3b_index``, row-major over the dim's factors);
an operand that is a constant (a table torch.fx folded from buffers, read by q and by k or by
every block) is replaced by this node's own sliced copy, ``p3b_index.table_…``, so the slim
forward does no gathering for it. Why: the node keeps element e of the axis from element e of each
operand, so keeping a subset commutes with it; the operand's producer stays dense (it may be shared
with other blocks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from p3b_fx.core.pass_infra import PassResult
from passes.slim_common import INDEX_MODULE, PlanPass, compose_index, flat_index, index_buffer, nodes_by_name

_PREFIX = "operand:"
"""Index buffers of this pass are named ``p3b_index.operand_…``: how a second run (or one on a
graph traced again, or loaded, which keeps no node meta) recognises its gathers."""


def is_operand_gather(node: fx.Node) -> bool:
    """Whether ``node`` is an ``index_select`` this pass inserted."""
    idx = node.args[2] if node.target is torch.index_select and len(node.args) > 2 else None
    ours = f"{INDEX_MODULE}.operand_"
    return isinstance(idx, fx.Node) and idx.op == "get_attr" and str(idx.target).startswith(ours)


@dataclass(frozen=True)
class GatherOperandsPass(PlanPass):
    def call(self, gm: fx.GraphModule) -> PassResult:
        kept = self.plan.effective(self.groups)
        names = nodes_by_name(gm)
        modified = False
        for name, info in self.groups.nodes.items():
            node = names.get(name)  # gone with a removed block
            if node is None:
                continue
            cuts: dict[str, list[tuple[int, torch.Tensor]]] = {}
            for operand_name, dim, factors in info.gathers:
                idx = flat_index(factors, kept)
                if idx is not None:
                    cuts.setdefault(operand_name, []).append((dim, idx))
            for operand_name, dims in cuts.items():
                operand = _current(node, names.get(operand_name))
                if operand is not None:
                    modified |= _restrict(gm, node, operand, dims, f"{name}:{operand_name}")
        return PassResult(gm, modified)


def _restrict(gm: fx.GraphModule, node: fx.Node, operand: fx.Node, dims: list[tuple[int, torch.Tensor]],
              key: str) -> bool:  # fmt: skip
    """Make ``node`` read only the kept elements of ``operand`` along each of ``dims``."""
    table = _constant(gm, operand)
    if table is not None:  # a constant: this node's own sliced copy, no work at run time
        for dim, idx in dims:
            table = table.index_select(dim, idx.to(table.device))
        node.replace_input_with(operand, index_buffer(gm, f"table:{key}", table, node))
        return True
    modified = False
    for dim, idx in dims:
        done = _chain(operand).get(dim)
        if done is not None:  # a graph slimmed before: narrow its gather
            source = done.args[2]
            assert isinstance(source, fx.Node)
            modified |= compose_index(gm, source, tuple(idx.tolist()))
            continue
        idx_node = index_buffer(gm, f"{_PREFIX}{key}:{dim}", idx, node)
        with gm.graph.inserting_before(node):
            gathered = gm.graph.call_function(torch.index_select, (operand, dim, idx_node))
        node.replace_input_with(operand, gathered)
        operand, modified = gathered, True
    return modified


def _constant(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """The tensor ``node`` gets when it gets a buffer or constant (not a parameter, which training
    could still change), else None."""
    if node.op != "get_attr":
        return None
    value: object = gm
    for part in str(node.target).split("."):
        value = getattr(value, part)
    return value if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) else None


def _current(node: fx.Node, operand: fx.Node | None) -> fx.Node | None:
    """What ``node`` reads in place of ``operand`` now: ``operand``, or the last of the gathers this
    pass put between them (one per dim); None when ``node`` does not read it."""
    for arg in node.all_input_nodes:
        at: fx.Node | None = arg
        while at is not None:
            if at is operand:
                return arg
            src = at.args[0] if is_operand_gather(at) else None
            at = src if isinstance(src, fx.Node) else None
    return None


def _chain(operand: fx.Node) -> dict[int, fx.Node]:
    """The gathers this pass inserted ending at ``operand``, by the dim each one selects along."""
    found: dict[int, fx.Node] = {}
    at = operand
    while is_operand_gather(at):
        found.setdefault(int(at.args[1]), at)  # type: ignore[arg-type]
        src = at.args[0]
        assert isinstance(src, fx.Node)
        at = src
    return found
