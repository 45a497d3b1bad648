"""InsertTapsPass: identity taps that record the residual stream x_0 … x_B during a forward pass.

Pattern: the blocks of a ``GroupSet`` (in order). Result: the same graph plus one ``FeatureTaps``
submodule (``p3b_taps``) called as an identity at every block's input node and after every block's
residual add, each call carrying its index (:func:`tap_points`). In a plain ViT block i reads what
block i-1 wrote, so the taps are x_0 (the first block's input) and x_i (block i's add): B + 1 of
them. Where something else sits between two blocks (a pooling stage, CaiT's class-token concat,
XCiT's local patch interaction), the block's own input gets a tap of its own. While recording, the
module keeps the last tensor seen per index. Why: P3B's benefit probes need every block's input and
output (method doc §1); reading them off the training forward pass avoids a second forward. The
features are taken where the blocks read and write the stream, hence before the final norm by
construction. Outputs are unchanged: a tap returns its input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import torch
from torch import fx, nn

from p3b_fx.core import meta
from p3b_fx.core.groups import GroupSet
from p3b_fx.core.pass_infra import GraphPass, PassResult
from p3b_fx.errors import PassError

TAP_MODULE: Final = "p3b_taps"
"""Name of the :class:`FeatureTaps` submodule in a tapped GraphModule."""

TAP_INDEX: Final = "p3b.tap_index"
"""Marks a node inserted by ``passes.insert_taps`` (value: the stream index i of x_i), so that a
second run sees the taps are there. Writer and reader: ``passes.insert_taps``."""


class FeatureTaps(nn.Module):
    """Identity on ``x``; while :attr:`recording`, remembers ``x`` as feature ``index``."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count
        self.recording = True
        self.features: dict[int, torch.Tensor] = {}

    def forward(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if self.recording:
            self.features[index] = x
        return x

    def take(self) -> list[torch.Tensor]:
        """The recorded x_0 … x_B in order (and forget them); raises if a forward pass missed one."""
        missing = [i for i in range(self.count) if i not in self.features]
        if missing:
            raise PassError(
                f"feature taps {missing[:4]} recorded nothing: run a forward pass with recording on first"
            )
        out = [self.features[i] for i in range(self.count)]
        self.features = {}
        return out


def tap_points(groups: GroupSet) -> tuple[list[str], list[tuple[int, int]]]:
    """The nodes to tap, in order, and per block the (input, output) indices into them.

    A node is tapped once however many blocks read it, so a plain ViT, where block i reads what
    block i - 1 wrote, gets x_0 … x_B and the pairs (i, i + 1).
    """
    index: dict[str, int] = {}
    pairs: list[tuple[int, int]] = []
    for block in groups.blocks:
        ends = [index.setdefault(node, len(index)) for node in (block.input_node, block.add_node)]
        pairs.append((ends[0], ends[1]))
    return list(index), pairs


@dataclass(frozen=True)
class InsertTapsPass(GraphPass):
    """Tap every block's input and its residual add, in block order (:func:`tap_points`)."""

    groups: GroupSet

    def requires(self, gm: fx.GraphModule) -> None:
        if not self.groups.blocks:
            raise PassError("InsertTapsPass: the model has no residual blocks to tap")
        names = {n.name for n in gm.graph.nodes}
        wanted, _ = tap_points(self.groups)
        absent = [w for w in wanted if w not in names]
        if absent:
            raise PassError(
                f"InsertTapsPass: nodes {absent[:4]} of the block analysis are not in this graph; "
                "find the groups on the graph you tap (or on the graph it was copied from)"
            )

    def call(self, gm: fx.GraphModule) -> PassResult:
        if any(TAP_INDEX in n.meta for n in gm.graph.nodes):
            return PassResult(gm, False)
        names = {n.name: n for n in gm.graph.nodes}
        points, _ = tap_points(self.groups)
        gm.add_submodule(TAP_MODULE, FeatureTaps(len(points)))
        for index, name in enumerate(points):
            src = names[name]
            users = list(src.users)
            with gm.graph.inserting_after(src):
                tap = gm.graph.call_module(TAP_MODULE, (src, index))
            tap.meta[TAP_INDEX] = index
            tap.meta[meta.SHAPE] = src.meta.get(meta.SHAPE)
            for user in users:
                user.replace_input_with(src, tap)
        return PassResult(gm, True)

    def ensures(self, gm: fx.GraphModule) -> None:
        taps = sorted(n.meta[TAP_INDEX] for n in gm.graph.nodes if TAP_INDEX in n.meta)
        count = len(tap_points(self.groups)[0])
        if taps != list(range(count)):
            raise PassError(f"InsertTapsPass: expected taps 0..{count - 1}, found {taps}")


def feature_taps(gm: fx.GraphModule) -> FeatureTaps:
    """The :class:`FeatureTaps` module of a tapped graph."""
    module = gm.get_submodule(TAP_MODULE)
    if not isinstance(module, FeatureTaps):
        raise PassError(f"{TAP_MODULE} is not a FeatureTaps module: run InsertTapsPass first")
    return module
