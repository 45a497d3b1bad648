"""RemoveBlocksPass: a block that keeps nothing becomes the identity on the residual stream.

Pattern: a block of the plan with an empty group (it would add a constant or nothing). Result:
its residual ``add(x, branch(x))`` is replaced by ``x``; dead-code elimination drops the branch
and the manager's tidy-up drops its parameters. Why: the masked model adds exactly zero there
(masks zero every gate of such a block), so removal is exact and saves all its compute.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from p3b_fx.core.pass_infra import PassResult
from passes.slim_common import PlanPass, nodes_by_name, residual_operands


@dataclass(frozen=True)
class RemoveBlocksPass(PlanPass):
    def call(self, gm: fx.GraphModule) -> PassResult:
        names = nodes_by_name(gm)
        modified = False
        for block in self.plan.removed_blocks(self.groups):
            add = names.get(block.add_node)
            if add is None:  # already removed
                continue
            stream, _ = residual_operands(add, block.output_node)
            add.replace_all_uses_with(stream)
            gm.graph.erase_node(add)
            modified = True
        return PassResult(gm, modified)
