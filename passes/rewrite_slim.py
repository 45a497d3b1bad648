"""The slim rewrite: the explicit list of passes that turns a graph and a plan into a slim graph.

Order matters: removed blocks go first (nothing else touches them), parameters are sliced, norms
over a shrunk axis are told the dense width, baked sizes follow, operands computed outside the
groups (rotary tables) are gathered, then reads are gathered and writes scattered, and last the
linears that were 1×1 convolutions (``passes.pointwise_conv``) become convolutions again and the
sections of a split linear one module again (``passes.split_linear``). Each pass
is idempotent; the manager tidies (dead code, unused parameters, lint, recompile) after each one
that changed something.
"""

from __future__ import annotations

from p3b_fx.core.groups import GroupSet
from p3b_fx.core.pass_infra import GraphPass
from p3b_fx.core.plan import KeepPlan
from passes.gather_operands import GatherOperandsPass
from passes.gather_reads import GatherReadsPass
from passes.pad_norms import PadNormsPass
from passes.pointwise_conv import SlimConvPass
from passes.remove_blocks import RemoveBlocksPass
from passes.rewrite_shapes import RewriteShapesPass
from passes.scatter_writes import ScatterWritesPass
from passes.slice_params import SliceParamsPass
from passes.split_linear import FuseSplitPass


def slim_passes(groups: GroupSet, plan: KeepPlan) -> list[GraphPass]:
    return [
        RemoveBlocksPass(groups, plan),
        SliceParamsPass(groups, plan),
        PadNormsPass(groups, plan),
        RewriteShapesPass(groups, plan),
        GatherOperandsPass(groups, plan),
        GatherReadsPass(groups, plan),
        ScatterWritesPass(groups, plan),
        SlimConvPass(),
        FuseSplitPass(),
    ]
