"""Helpers shared by the slim-rewrite passes: kept indices, index buffers, node lookup."""

from __future__ import annotations

import torch
from torch import fx, nn

from p3b_fx.core.groups import Factor, GroupSet
from p3b_fx.core.plan import KeepPlan

INDEX_MODULE = "p3b_index"


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
    holder.register_buffer(attr, idx.clone())
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(f"{INDEX_MODULE}.{attr}")


def nodes_by_name(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {n.name: n for n in gm.graph.nodes}


def live_blocks(groups: GroupSet, plan: KeepPlan) -> list[str]:
    removed = {b.name for b in plan.removed_blocks(groups)}
    return [b.name for b in groups.blocks if b.name not in removed]


def shrunk(groups: GroupSet, plan: KeepPlan, group: str) -> bool:
    return len(plan.indices(groups, group)) < groups.group(group).size
