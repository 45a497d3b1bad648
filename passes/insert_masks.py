"""InsertMasksPass: a gate multiply at every place P3B masks, all gates open.

Pattern: the blocks of a ``GroupSet``. Result: the same graph plus a ``MaskBank`` submodule and, per
block, mask sites at (1) the input of every linear reading the residual (read gate), (2) the first
linear's output when a prunable index is contracted there (per-head dimension: q·k must lose it too)
or summed over (``Block.gate_first_out``); after a BatchNorm of that output alone
(``Block.first_out_site``), (3) the last linear's input (heads, head_dim, hidden),
(4) the last linear's output (write gate; after a BatchNorm that follows it, ``Block.write_site``,
as that moves zeros), and (5) around a norm over a group axis inside the block (``Block.norms``):
before it, and after it unless only the last linear reads it, and (6) around a linear between the
first and the last (``Block.mids``): its input and its output. Why: zeroing exactly there makes a
hard-masked model compute what the slim model computes; soft gate values are P3B's soft masks.
Outputs are unchanged while gates are 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from p3b_fx.core import meta
from p3b_fx.core.groups import Factor, GroupSet, Role, lane_name
from p3b_fx.core.masks import MASK_MODULE, MaskBank
from p3b_fx.core.pass_infra import GraphPass, PassResult, module_device, module_dtype
from passes.axis_rules import gate_follows


def _dims(groups: GroupSet, param: str, dim: int) -> tuple[Factor, ...] | None:
    for b in groups.blocks:
        for spec in b.params:
            if spec.name == param:
                return spec.dims[dim]
    return None


@dataclass(frozen=True)
class InsertMasksPass(GraphPass):
    groups: GroupSet

    def call(self, gm: fx.GraphModule) -> PassResult:
        if any(n.meta.get(meta.MASK_SITE) for n in gm.graph.nodes):
            return PassResult(gm, False)
        names = {n.name: n for n in gm.graph.nodes}
        sizes = {g.name: g.size for g in self.groups.prunable}
        sites: dict[str, tuple[Factor, ...]] = {}
        bank = MaskBank(sizes, {}).to(module_device(gm), module_dtype(gm))  # as the weights: device, dtype
        gm.add_submodule(MASK_MODULE, bank)
        for b in self.groups.blocks:
            roles = {self.groups.group(g).role for g in b.groups if self.groups.group(g).prunable}
            write_g = f"{b.name}:write"
            writes = {names[w] for _, w in b.all_lanes()}
            for norm in b.norms:  # before the lanes' last_in sites take the write linears' inputs
                node = names[norm.node]
                src = node.args[0]
                assert isinstance(src, fx.Node)
                self._before(gm, [node], src, f"{b.name}:{norm.node}:in", norm.factors, sites)
                if norm.node != b.write_site and not set(node.users) <= writes:  # else a gate is there
                    self._after(gm, node, f"{b.name}:{norm.node}:out", norm.factors, sites)
            for mid_name in b.mids:
                mid = names[mid_name]
                src = mid.args[0]
                assert isinstance(src, fx.Node)
                weight = f"{mid.target}.weight"
                self._before(gm, [mid], src, f"{b.name}:{mid_name}:in", _dims(self.groups, weight, 1), sites)
                self._after(gm, mid, f"{b.name}:{mid_name}:out", _dims(self.groups, weight, 0), sites)
            for lane, (read_name, write_name) in enumerate(b.all_lanes()):
                read, write = names[read_name], names[write_name]
                read_g = lane_name(f"{b.name}:read", lane)
                point = read.args[0]
                assert isinstance(point, fx.Node)
                readers = [u for u in point.users if u.op == "call_module" and u.args[0] is point]
                self._before(gm, readers, point, read_g, ((sizes.get(read_g, 1), read_g),), sites)
                if Role.HEAD_DIM in roles or b.gate_first_out:
                    first_at = names[b.first_out_site] if b.first_out_site and lane == 0 else read
                    self._after(gm, first_at, lane_name(f"{b.name}:first_out", lane),
                                _dims(self.groups, f"{read.target}.weight", 0), sites)  # fmt: skip
                win = write.args[0]
                assert isinstance(win, fx.Node)
                self._before(gm, [write], win, lane_name(f"{b.name}:last_in", lane),
                             _dims(self.groups, f"{write.target}.weight", 1), sites)  # fmt: skip
                gate_at = names[b.write_site] if b.write_site else write
                self._after(gm, gate_at, lane_name(write_g, lane), ((sizes.get(write_g, 1), write_g),), sites)
        bank.sites.update(sites)
        return PassResult(gm, True)

    @staticmethod
    def _new_site(gm: fx.GraphModule, src: fx.Node, site: str) -> fx.Node:
        """A mask site on ``src``'s last axis, or on its channel axis (1) behind a BatchNorm of an
        image (N, C, H, W): the site sees ``src.movedim(1, -1)`` and its output is moved back."""
        shape = src.meta.get(meta.SHAPE)
        on_channels = src.op == "call_module" and gate_follows(gm.get_submodule(str(src.target)))
        on_channels = on_channels and shape is not None and len(shape) > 2
        with gm.graph.inserting_after(src):
            x = gm.graph.call_method("movedim", (src, 1, -1)) if on_channels else src
        with gm.graph.inserting_after(x):
            node = gm.graph.call_module(MASK_MODULE, (x, site))
        node.meta[meta.MASK_SITE] = site
        if not on_channels:
            node.meta[meta.SHAPE] = shape
            return node
        assert shape is not None
        x.meta[meta.SHAPE] = node.meta[meta.SHAPE] = (shape[0], *shape[2:], shape[1])
        with gm.graph.inserting_after(node):
            back = gm.graph.call_method("movedim", (node, -1, 1))
        back.meta[meta.SHAPE] = shape
        return back

    def _before(  # noqa: PLR0917 - private helper
        self, gm: fx.GraphModule, users: list[fx.Node], src: fx.Node, site: str,
        factors: tuple[Factor, ...] | None, sites: dict[str, tuple[Factor, ...]],
    ) -> None:  # fmt: skip
        if factors is None or not any(g in self._prunable for _, g in factors):
            return
        sites[site] = factors
        node = self._new_site(gm, src, site)
        for u in users:
            u.replace_input_with(src, node)

    def _after(self, gm: fx.GraphModule, src: fx.Node, site: str, factors: tuple[Factor, ...] | None,
               sites: dict[str, tuple[Factor, ...]]) -> None:  # fmt: skip
        if factors is None or not any(g in self._prunable for _, g in factors):
            return
        sites[site] = factors
        users = list(src.users)
        node = self._new_site(gm, src, site)
        for u in users:
            u.replace_input_with(src, node)

    @property
    def _prunable(self) -> set[str]:
        return {g.name for g in self.groups.prunable}
