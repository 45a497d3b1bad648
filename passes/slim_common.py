"""Helpers shared by the slim-rewrite passes: kept indices, index buffers, node lookup."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx, nn

from p3b_fx.core.groups import Factor, GroupSet
from p3b_fx.core.pass_infra import GraphPass, module_device
from p3b_fx.core.plan import KeepPlan

INDEX_MODULE = "p3b_index"


@dataclass(frozen=True)
class PlanPass(GraphPass):
    """Base of the slim-rewrite passes: configured by the groups and the keep plan. Each one alone
    leaves the graph inconsistent (shapes change), so none claims to preserve semantics; the
    whole list does (checked against the masked model by the tests)."""

    groups: GroupSet
    plan: KeepPlan
    preserves_semantics: ClassVar[bool] = False


def flat_index(factors: tuple[Factor, ...], kept: dict[str, tuple[int, ...]]) -> torch.Tensor | None:
    """Kept positions of a row-major dimension, or None when it keeps everything."""
    idx = torch.zeros(1, dtype=torch.long)
    full = True
    for size, group in factors:
        keep = kept.get(group) if group is not None else None
        if keep is None or len(keep) == size:
            part = torch.arange(size)
        else:
            part, full = torch.tensor(keep, dtype=torch.long), False
        idx = (idx[:, None] * size + part[None, :]).reshape(-1)
    return None if full else idx


def index_buffer(gm: fx.GraphModule, name: str, idx: torch.Tensor, before: fx.Node) -> fx.Node:
    """Register ``idx`` as buffer ``p3b_index.<name>`` and return a get_attr node for it."""
    if not hasattr(gm, INDEX_MODULE):
        gm.add_submodule(INDEX_MODULE, nn.Module())
    holder = gm.get_submodule(INDEX_MODULE)
    attr = "".join(c if c.isalnum() else "_" for c in name)
    holder.register_buffer(attr, idx.to(module_device(gm), copy=True))  # beside the weights
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(f"{INDEX_MODULE}.{attr}")


def nodes_by_name(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {n.name: n for n in gm.graph.nodes}


def live_blocks(groups: GroupSet, plan: KeepPlan) -> list[str]:
    removed = {b.name for b in plan.removed_blocks(groups)}
    return [b.name for b in groups.blocks if b.name not in removed]


def shrunk(groups: GroupSet, plan: KeepPlan, group: str) -> bool:
    return len(plan.indices(groups, group)) < groups.group(group).size


def compose_index(gm: fx.GraphModule, node: fx.Node, kept: tuple[int, ...]) -> bool:
    """For a graph slimmed before: narrow the index buffer read by ``node`` to ``kept`` positions.

    Returns False when the buffer already has ``len(kept)`` entries (nothing to do)."""
    target = str(node.target)
    old = gm.get_buffer(target)
    if old.numel() == len(kept):
        return False
    owner, _, attr = target.rpartition(".")
    narrowed = old[torch.tensor(kept, dtype=torch.long, device=old.device)].clone()
    gm.get_submodule(owner).register_buffer(attr, narrowed)
    return True


def residual_operands(add: fx.Node, output_node: str) -> tuple[fx.Node, fx.Node]:
    """(stream, branch output) of a residual add or index_add, robust to renamed streams."""
    args = [add.args[0], add.args[3]] if add.target is torch.index_add else list(add.args[:2])
    branch = next(a for a in args if isinstance(a, fx.Node) and a.name == output_node)
    stream = next(a for a in args if isinstance(a, fx.Node) and a is not branch)
    return stream, branch
