"""GatherReadsPass: a block reads only the residual channels its plan keeps.

Pattern: a live block whose read group shrinks; its first linear (and any other linear reading
the same normalised input) reads ``x``. Result: ``torch.index_select(x, -1, idx)`` feeds those
linears (idx an int64 buffer under ``p3b_index``); the norm before still sees the full width.
Why: LayerNorm statistics stay those of the dense model, so slim equals hard-masked exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from p3b_fx.core.groups import lane_name
from p3b_fx.core.pass_infra import PassResult
from passes.slim_common import PlanPass, compose_index, index_buffer, live_blocks, nodes_by_name, shrunk


@dataclass(frozen=True)
class GatherReadsPass(PlanPass):
    def call(self, gm: fx.GraphModule) -> PassResult:
        names = nodes_by_name(gm)
        modified = False
        for name in live_blocks(self.groups, self.plan):
            for lane, (read_name, _) in enumerate(self.groups.block(name).all_lanes()):
                group = lane_name(f"{name}:read", lane)
                # lanes of one input have no read group of their own: the first lane's gathers for all
                if not self.groups.has_group(group) or not shrunk(self.groups, self.plan, group):
                    continue
                read = names[read_name]
                point = read.args[0]
                assert isinstance(point, fx.Node)
                idx = torch.tensor(self.plan.indices(self.groups, group), dtype=torch.long)
                if point.target is torch.index_select:  # a graph slimmed before: narrow its gather
                    assert isinstance(point.args[2], fx.Node)
                    modified |= compose_index(gm, point.args[2], tuple(idx.tolist()))
                    continue
                readers = [u for u in point.users if u.op == "call_module" and u.args[0] is point]
                idx_node = index_buffer(gm, group, idx, read)
                with gm.graph.inserting_before(read):
                    gathered = gm.graph.call_function(torch.index_select, (point, -1, idx_node))
                for u in readers:
                    u.replace_input_with(point, gathered)
                modified = True
        return PassResult(gm, modified)
