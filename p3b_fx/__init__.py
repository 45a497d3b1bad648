"""p3b-fx: prune Vision Transformers with P3B while fine-tuning, and compile the slim result.

Public facade::

    gm = p3b_fx.trace(model)                 # torch.fx GraphModule, outputs equal eager
    groups = p3b_fx.find_groups(gm)          # coupled heads / channels per residual sub-block
    plan = p3b_fx.KeepPlan.random(groups, 0.5, seed=0)
    masked = p3b_fx.apply_masks(gm, plan)    # pruned elements zeroed
    small = p3b_fx.slim(gm, plan)            # dense slim graph, small(x) == masked(x)

The facade's names are imported on first use (PEP 562): ``p3b_fx.core`` sits below ``passes`` and
the facade above them (``tests/test_layering.py``), so importing a pass first (``import
passes.find_groups``) must not pull the facade's tracer and compiler in, which import that pass.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from p3b_fx.compiler import apply_masks, find_groups, fold_masks, insert_masks, set_hard_masks, slim
    from p3b_fx.core.groups import Block, BlockKind, Group, GroupSet, Role
    from p3b_fx.core.plan import KeepPlan
    from p3b_fx.errors import P3BError
    from p3b_fx.tracing import trace

__version__ = "0.1.0"

_FACADE = {
    "apply_masks": "p3b_fx.compiler", "find_groups": "p3b_fx.compiler", "fold_masks": "p3b_fx.compiler",
    "insert_masks": "p3b_fx.compiler", "set_hard_masks": "p3b_fx.compiler", "slim": "p3b_fx.compiler",
    "Block": "p3b_fx.core.groups", "BlockKind": "p3b_fx.core.groups", "Group": "p3b_fx.core.groups",
    "GroupSet": "p3b_fx.core.groups", "Role": "p3b_fx.core.groups", "KeepPlan": "p3b_fx.core.plan",
    "P3BError": "p3b_fx.errors", "trace": "p3b_fx.tracing",
}  # fmt: skip

__all__ = [
    "Block", "BlockKind", "Group", "GroupSet", "KeepPlan", "P3BError", "Role", "apply_masks",
    "find_groups", "fold_masks", "insert_masks", "set_hard_masks", "slim", "trace",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    if name not in _FACADE:
        raise AttributeError(f"module 'p3b_fx' has no attribute {name!r}")
    value = getattr(importlib.import_module(_FACADE[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
