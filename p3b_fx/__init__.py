"""p3b-fx: prune Vision Transformers with P3B while fine-tuning, and compile the slim result.

Public facade::

    gm = p3b_fx.trace(model)                 # torch.fx GraphModule, outputs equal eager
    groups = p3b_fx.find_groups(gm)          # coupled heads / channels per residual sub-block
    plan = p3b_fx.KeepPlan.random(groups, 0.5, seed=0)
    masked = p3b_fx.apply_masks(gm, plan)    # pruned elements zeroed
    small = p3b_fx.slim(gm, plan)            # dense slim graph, small(x) == masked(x)
"""

from __future__ import annotations

from p3b_fx.compiler import apply_masks, find_groups, fold_masks, insert_masks, set_hard_masks, slim
from p3b_fx.core.groups import Block, BlockKind, Group, GroupSet, Role
from p3b_fx.core.plan import KeepPlan
from p3b_fx.errors import P3BError
from p3b_fx.tracing import trace

__version__ = "0.1.0"

__all__ = [
    "Block", "BlockKind", "Group", "GroupSet", "KeepPlan", "P3BError", "Role", "apply_masks",
    "find_groups", "fold_masks", "insert_masks", "set_hard_masks", "slim", "trace",
]  # fmt: skip
