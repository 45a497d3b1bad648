"""ScatterWritesPass: a block writes only the residual channels its plan keeps.

Pattern: a live block whose write group shrinks; its residual ``add(x, y)``. Result:
``torch.index_add(x, dim, idx, y)`` on the channels' axis ``dim`` (``Block.write_dim``: the last,
or -3 where a ConvNeXt-style block permutes back to (N, C, H, W)); y is already narrow (the last
linear's rows and any per-channel scale after it were sliced). Why: writing the kept channels in
place of adding a zero-padded tensor saves the padding and computes the same sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from p3b_fx.core.pass_infra import PassResult
from passes.slim_common import (
    PlanPass,
    compose_index,
    index_buffer,
    live_blocks,
    nodes_by_name,
    residual_operands,
    shrunk,
)


@dataclass(frozen=True)
class ScatterWritesPass(PlanPass):
    def call(self, gm: fx.GraphModule) -> PassResult:
        names = nodes_by_name(gm)
        modified = False
        for name in live_blocks(self.groups, self.plan):
            group = f"{name}:write"
            block = self.groups.block(name)
            add = names.get(block.add_node)
            if not shrunk(self.groups, self.plan, group) or add is None:
                continue
            idx = torch.tensor(self.plan.indices(self.groups, group), dtype=torch.long)
            if add.target is torch.index_add:  # written before (this pass, or an earlier slim)
                assert isinstance(add.args[2], fx.Node)
                modified |= compose_index(gm, add.args[2], tuple(idx.tolist()))
                continue
            stream, branch = residual_operands(add, block.output_node)
            idx_node = index_buffer(gm, group, idx, add)
            add.target, add.op = torch.index_add, "call_function"
            add.args, add.kwargs = (stream, block.write_dim, idx_node, branch), {}
            modified = True
        return PassResult(gm, modified)
