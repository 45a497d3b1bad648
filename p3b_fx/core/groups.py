"""Frozen results of the dependency-graph analysis: groups of coupled parameter slices.

A *group* is a set of parameter slices that must be pruned together: element ``e`` of the group
owns, in every member parameter, the slice at index ``e`` of one axis of that parameter's
dimension viewed row-major as a small shape (``Member``). A *block* is one residual sub-block
(an Attention or an MLP) with its groups, the structure of its parameters (for exact cost
prediction) and the terms of its multiply-accumulate count.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum


class Role(StrEnum):
    """What a group's elements are, which decides its gate type in P3B."""

    READ = "read"  # residual channels read by the block (input columns of its first linear)
    WRITE = "write"  # residual channels written by the block (output rows of its last linear)
    HEADS = "heads"  # whole attention heads (q, k, v and proj input together)
    HEAD_DIM = "head_dim"  # one per-head dimension index, shared by all heads and by q, k, v
    HIDDEN = "hidden"  # MLP hidden neurons
    INNER = "inner"  # any other inner axis (no special meaning known)
    SELECT = "select"  # an axis the block indexes (e.g. the q/k/v selector): never prunable


ROLE_ORDER: tuple[Role, ...] = (Role.READ, Role.HEADS, Role.HEAD_DIM, Role.HIDDEN, Role.INNER, Role.SELECT,
                                Role.WRITE)  # fmt: skip
"""The order a block's groups are listed in (``describe()``, plans, reports): from read to write."""


class BlockKind(StrEnum):
    ATTENTION = "attention"
    MLP = "mlp"


@dataclass(frozen=True)
class Member:
    """One parameter slice of a group: dimension ``dim`` of ``param`` viewed as ``shape``."""

    param: str
    dim: int
    shape: tuple[int, ...]
    axis: int


@dataclass(frozen=True)
class Group:
    name: str
    block: str
    role: Role
    size: int
    members: tuple[Member, ...]
    prunable: bool
    reason: str = ""  # why the group is not prunable; empty when it is


Factor = tuple[int, str | None]
"""One axis of a parameter dimension (or of a FLOP term): its dense size and the group running
along it, or ``None`` when no group does."""


@dataclass(frozen=True)
class ParamSpec:
    """A parameter used by a block, each dimension written as row-major factors."""

    name: str
    dims: tuple[tuple[Factor, ...], ...]


@dataclass(frozen=True)
class InnerNorm:
    """A norm inside a block over an axis groups run along (``p3b_fx.core.padded_norm``): node
    ``node`` normalises its last axis, ``factors`` row-major. The mask pass gates its input and its
    output."""

    node: str
    factors: tuple[Factor, ...]


@dataclass(frozen=True)
class FlopTerm:
    """``coef * prod(factor sizes)`` multiply-accumulates per sample."""

    coef: int
    factors: tuple[Factor, ...]


@dataclass(frozen=True)
class Block:
    name: str
    kind: BlockKind
    groups: tuple[str, ...]
    params: tuple[ParamSpec, ...]
    flops: tuple[FlopTerm, ...]
    input_node: str  # the residual-stream node the block reads (may be renamed by a rewrite)
    add_node: str  # the residual add that writes the block's output back
    read_node: str  # the block's first linear (call_module node)
    write_node: str  # the block's last linear (call_module node)
    output_node: str = ""  # the branch output: the operand of the residual add that is not the stream
    # parallel lanes after the first (read_node, write_node): (first linear, last linear) of each
    # further branch whose outputs are summed into the same residual add (timm's ParallelThingsBlock)
    lanes: tuple[tuple[str, str], ...] = ()
    # buffers sliced with the groups but not counted as parameters: a BatchNorm's running statistics
    buffers: tuple[ParamSpec, ...] = ()
    # the node after which the write gate sits when not the last linear: the last op between it and
    # the residual add that does not keep zeros (LeViT's BatchNorm after its last linear)
    write_site: str = ""
    # norms over a group axis inside the block (EVA-02's SwiGLU norm, BEiT-3's inner attention norm)
    norms: tuple[InnerNorm, ...] = ()
    # the axis (negative) of the written channels at the residual add: -1, or -3 where a ConvNeXt-
    # style block permutes (N, H, W, C) back to (N, C, H, W) before it (EdgeNeXt)
    write_dim: int = -1
    # linears between the first and the last (SwiftFormer's proj, CaiT's talking heads): gated on
    # their input and their output (``axis_rules.mid_linear``)
    mids: tuple[str, ...] = ()
    # whether the first linear's output is gated for a sum over a group axis (``axis_rules.reduction``)
    # where no per-head dimension is prunable (the gate is there for those anyway)
    gate_first_out: bool = False
    # the node after which the first-out gate sits when not the first linear: a BatchNorm that
    # normalises the first linear's output alone (EfficientFormerV2's q), as it moves zeros
    first_out_site: str = ""

    def all_lanes(self) -> tuple[tuple[str, str], ...]:
        """(first linear, last linear) of every lane, the block's own first."""
        return ((self.read_node, self.write_node), *self.lanes)


def lane_name(name: str, lane: int) -> str:
    """The per-lane name of a group or mask site: ``name`` for the first lane, then ``name'``,
    ``name''``, … (the read group, the first-out and last-in sites, the write site of lane ``lane``)."""
    return name + "'" * lane


def _product(factors: tuple[Factor, ...], kept: Mapping[str, int]) -> int:
    return math.prod(kept.get(g, size) if g is not None else size for size, g in factors)


@dataclass(frozen=True)
class NodeInfo:
    """What the rewrite needs to know about one node inside a block."""

    axes: tuple[tuple[str, ...], ...] = ()  # leaf group names along each output axis
    sdpa_scale: float | None = None  # dense softmax scale to pin on an SDPA node
    # operands computed outside the groups that span a group axis (a rotary table): (operand node,
    # its dim, that dim's row-major factors); the slim graph reads only their kept elements
    gathers: tuple[tuple[str, int, tuple[Factor, ...]], ...] = ()


@dataclass(frozen=True)
class GroupSet:
    """Everything ``find_groups`` learned from one graph. Frozen; JSON-free (plans are JSON)."""

    groups: tuple[Group, ...]
    blocks: tuple[Block, ...]
    params_total: int
    flops_nonblock: int
    nodes: Mapping[str, NodeInfo] = field(default_factory=dict)
    unsupported: tuple[str, ...] = ()  # residual branches found but not understood, with reasons

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {g.name: g for g in self.groups})
        object.__setattr__(self, "_blocks", {b.name: b for b in self.blocks})

    def __iter__(self) -> Iterator[Group]:
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def group(self, name: str) -> Group:
        return self._by_name[name]  # type: ignore[attr-defined,no-any-return]

    def block(self, name: str) -> Block:
        return self._blocks[name]  # type: ignore[attr-defined,no-any-return]

    def has_group(self, name: str) -> bool:
        return name in self._by_name  # type: ignore[attr-defined]

    @property
    def prunable(self) -> tuple[Group, ...]:
        return tuple(g for g in self.groups if g.prunable)

    def fingerprint(self) -> str:
        """Identifies the architecture: group names, sizes and prunability."""
        desc = [(g.name, g.size, g.prunable) for g in self.groups]
        return hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:16]

    def block_removed(self, block: Block, kept: Mapping[str, int]) -> bool:
        """A block with any empty group computes nothing useful and is removed entirely."""
        return any(kept.get(g, 1) == 0 for g in block.groups)

    def block_removable(self, block: Block) -> bool:
        """Whether removing ``block`` is exact: zeroing its gates must zero its whole output.

        That takes a prunable write group (a gate on the last linear's output). Without one, an
        emptied group still leaves biases (and, in parallel blocks, whole other branches) flowing
        into the residual stream, so the masked model and the slim one would differ.
        """
        return any(self.group(g).role is Role.WRITE and self.group(g).prunable for g in block.groups)

    def block_params(self, block: Block, kept: Mapping[str, int] | None = None) -> int:
        """Parameter count of ``block`` when group ``g`` keeps ``kept[g]`` elements (default all)."""
        kept = kept or {}
        if self.block_removed(block, kept):
            return 0
        return sum(math.prod(_product(d, kept) for d in p.dims) for p in block.params)

    def block_flops(self, block: Block, kept: Mapping[str, int] | None = None) -> int:
        """Multiply-accumulates per sample of ``block`` under ``kept`` (linears, matmuls, convolutions)."""
        kept = kept or {}
        if self.block_removed(block, kept):
            return 0
        return sum(t.coef * _product(t.factors, kept) for t in block.flops)

    @property
    def params_blocks(self) -> int:
        return sum(self.block_params(b) for b in self.blocks)

    @property
    def params_nonblock(self) -> int:
        return self.params_total - self.params_blocks

    @property
    def flops_total(self) -> int:
        return self.flops_nonblock + sum(self.block_flops(b) for b in self.blocks)

    def model_params(self, kept: Mapping[str, int]) -> int:
        return self.params_nonblock + sum(self.block_params(b, kept) for b in self.blocks)

    def model_flops(self, kept: Mapping[str, int]) -> int:
        return self.flops_nonblock + sum(self.block_flops(b, kept) for b in self.blocks)

    def describe(self) -> str:
        """A human-readable table of blocks, groups and unprunable reasons (for the CLI)."""
        lines = [f"{len(self.blocks)} blocks, {len(self.prunable)}/{len(self.groups)} prunable groups"]
        for b in self.blocks:
            lines.append(f"  {b.name} ({b.kind}, {self.block_params(b):,} params)")
            for gname in b.groups:
                g = self.group(gname)
                state = "prunable" if g.prunable else f"fixed: {g.reason}"
                lane = "'" * (len(gname) - len(gname.rstrip("'")))  # a parallel lane's group: heads'
                lines.append(f"    {str(g.role) + lane:<8} size {g.size:<6} {state}")
        # residual adds that are no block: their parameters stay whole, counted outside the blocks
        lines.extend(f"  not a block (kept whole): {u}" for u in self.unsupported)
        return "\n".join(lines)
