"""Inside one block: which gate elements to keep for a target cost (P3B method doc, section 4).

Pattern: raw element scores per gate of one block (Taylor scores from the criteria module), the
block's target cost κ_i(t)·P_i, a cost function of kept counts per gate, and the temperature τ.
Result: a :class:`BlockAllocation` with soft masks sigmoid(ln 9·(rho - t)/(N·τ)), hard masks (>= 0.5),
kept counts and the hard-mask cost. Why: ranks make gates of different sizes and score scales
comparable; one joint threshold lets the block trade, say, hidden neurons against output channels;
masks are recomputed from scratch every time, so dropped elements come back when κ_i rises.

Our choices, beyond the method doc: the threshold is found by bisection over the joint sorted
list (exact, since the hard-mask cost never grows as the threshold rises); rounding keeps a
multiple of ``round_to`` per gate; a block whose target is closer to 0 than to its smallest live
configuration is removed (every gate 0); a block with target >= dense cost keeps everything with
soft masks of exactly 1 (nothing is attenuated in a block that is not pruned).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

import numpy as np
import numpy.typing as npt

from p3b_fx.errors import ConfigError, TrainingError

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

LN9 = math.log(9.0)
"""The soft mask is 0.9 one N·τ positions above the threshold and 0.1 one N·τ below it."""


class GateType(StrEnum):
    ATTN_IN = "attn_in"
    ATTN_HEADS = "attn_heads"
    ATTN_HEAD_DIM = "attn_head_dim"
    ATTN_OUT = "attn_out"
    MLP_IN = "mlp_in"
    MLP_HIDDEN = "mlp_hidden"
    MLP_OUT = "mlp_out"


DEFAULT_GATE_FACTORS: Mapping[GateType, float] = MappingProxyType(
    {
        GateType.ATTN_IN: 1.0,
        GateType.ATTN_HEADS: 1.0,
        GateType.ATTN_HEAD_DIM: 1.0,
        GateType.ATTN_OUT: 1.5,
        GateType.MLP_IN: 1.0,
        GateType.MLP_HIDDEN: 0.75,
        GateType.MLP_OUT: 1.5,
    }
)
"""Rank multipliers per gate type (the reference's): a larger factor lets a gate's elements survive longer."""


@dataclass(frozen=True)
class GateSpec:
    """One prunable gate of a block. Its kept count is a multiple of ``round_to`` unless it is full."""

    name: str
    size: int
    gate_type: GateType
    round_to: int = 1

    def __post_init__(self) -> None:
        if self.size < 1 or self.round_to < 1:
            raise ConfigError(
                f"gate {self.name!r}: size ({self.size}) and round_to ({self.round_to}) must be >= 1"
            )

    @property
    def min_keep(self) -> int:
        """The fewest elements a live gate keeps."""
        return min(self.round_to, self.size)

    def round_count(self, raw: int, least: int) -> int:
        """``raw`` rounded to the nearest multiple of ``round_to`` (or the full size), at least ``least``."""
        if raw >= self.size:
            return self.size
        rounded = min(self.size, math.floor(raw / self.round_to + 0.5) * self.round_to)
        return max(rounded, least)


@dataclass(frozen=True)
class BlockAllocation:
    """Masks of one block for one update. ``hard`` equals ``soft >= 0.5``; ``cost`` is the hard-mask cost."""

    soft: dict[str, FloatArray]
    hard: dict[str, BoolArray]
    kept: dict[str, int]
    cost: float
    threshold: float  # t, in positions of the joint sorted list (a half-integer)

    @property
    def removed(self) -> bool:
        """Some gate keeps nothing: the block computes nothing and leaves the graph."""
        return any(k == 0 for k in self.kept.values())


@dataclass(frozen=True)
class _Joint:
    """Every element's position rho in the block's joint sorted list, per gate."""

    positions: dict[str, IntArray]
    ordered: dict[str, IntArray]  # the gate's positions, ascending
    total: int

    def kept_at(self, gates: Sequence[GateSpec], pruned: int, least: Mapping[str, int]) -> dict[str, int]:
        """Kept counts when the ``pruned`` lowest positions are dropped, after rounding."""
        kept = {}
        for g in gates:
            raw = g.size - int(np.searchsorted(self.ordered[g.name], pruned, side="left"))
            kept[g.name] = g.round_count(raw, least[g.name])
        return kept


def _gate_values(scores: npt.ArrayLike, gate: GateSpec, factor: float) -> tuple[FloatArray, IntArray]:
    """Normalised ranks (rank + 1)/n times the gate factor; equal scores: the lower index ranks lower."""
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (gate.size,):
        raise ConfigError(f"gate {gate.name!r}: expected {gate.size} scores, got an array of shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise TrainingError(
            f"gate {gate.name!r}: scores contain NaN or inf; check the loss and the gradients"
        )
    rank = np.empty(gate.size, dtype=np.int64)
    rank[np.argsort(s, kind="stable")] = np.arange(gate.size)
    return (rank + 1) / gate.size * factor, rank


def _joint_positions(
    scores: Mapping[str, npt.ArrayLike], gates: Sequence[GateSpec], factors: Mapping[GateType, float]
) -> _Joint:
    """Sort all elements of the block jointly by value; ties by gate order, then by rank."""
    parts = [_gate_values(scores[g.name], g, float(factors.get(g.gate_type, 1.0))) for g in gates]
    values = np.concatenate([v for v, _ in parts])
    ranks = np.concatenate([r for _, r in parts])
    gate_of = np.concatenate([np.full(g.size, i) for i, g in enumerate(gates)])
    order = np.lexsort((ranks, gate_of, values))
    flat = np.empty(values.size, dtype=np.int64)
    flat[order] = np.arange(values.size)
    split = np.split(flat, np.cumsum([g.size for g in gates])[:-1])
    positions = {g.name: p for g, p in zip(gates, split, strict=True)}
    return _Joint(positions, {k: np.sort(p) for k, p in positions.items()}, int(values.size))


def _check_call(
    scores: Mapping[str, npt.ArrayLike],
    gates: Sequence[GateSpec],
    target_cost: float,
    tau: float,
    factors: Mapping[GateType, float],
) -> None:
    names = [g.name for g in gates]
    if len(set(names)) != len(names):
        raise ConfigError(f"gate names must be unique within a block, got {names}")
    if set(scores) != set(names):
        raise ConfigError(f"scores are for gates {sorted(scores)} but the block's gates are {sorted(names)}")
    if math.isnan(target_cost):
        raise ConfigError("target_cost is NaN; check the keep ratios")
    if not (math.isfinite(tau) and tau >= 0):
        raise ConfigError(f"tau must be a finite number >= 0, got {tau}")
    bad = {str(k): v for k, v in factors.items() if not (math.isfinite(v) and v > 0)}
    if bad:
        raise ConfigError(f"gate factors must be finite and > 0, got {bad}")


def _search(cost_at: Callable[[int], float], n: int, target: float, max_rounds: int) -> int:
    """Number of dropped positions whose cost is nearest ``target`` (bisection; cost falls with it)."""
    if cost_at(n) >= target:
        return n
    lo, hi = 0, n  # invariant: cost_at(lo) >= target > cost_at(hi)
    rounds = 0
    while hi - lo > 1 and rounds < max_rounds:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cost_at(mid) >= target else (lo, mid)
        rounds += 1
    if hi - lo > 1:
        log.warning("threshold search stopped after %d rounds, %d positions from exact", rounds, hi - lo - 1)
    return lo if cost_at(lo) - target <= target - cost_at(hi) else hi


def _gate_masks(
    pos: IntArray, ordered: IntArray, kept: int, *, t: float, total: int, tau: float
) -> tuple[FloatArray, BoolArray]:
    """Soft and hard masks of one gate keeping its ``kept`` highest positions.

    The gate's own threshold is ``t`` moved just enough to fall between its last dropped and its
    first kept element (it equals ``t`` unless rounding or the minimum keep moved the cut).
    """
    n = pos.size
    last_dropped = float(ordered[n - kept - 1]) if kept < n else -math.inf
    first_kept = float(ordered[n - kept]) if kept > 0 else math.inf
    t_gate = min(max(t, last_dropped + 0.5), first_kept - 0.5)
    hard = pos > t_gate
    if tau == 0.0:
        return hard.astype(np.float64), hard
    x = LN9 * (pos - t_gate) / (total * tau)
    return 0.5 * (1.0 + np.tanh(0.5 * x)), hard


def _result(
    joint: _Joint, gates: Sequence[GateSpec], kept: dict[str, int], *, pruned: int, cost: float, tau: float
) -> BlockAllocation:
    t = pruned - 0.5
    soft, hard = {}, {}
    for g in gates:
        soft[g.name], hard[g.name] = _gate_masks(
            joint.positions[g.name], joint.ordered[g.name], kept[g.name], t=t, total=joint.total, tau=tau
        )
    return BlockAllocation(soft, hard, kept, cost, t)


def allocate_block(
    scores: Mapping[str, npt.ArrayLike],
    gates: Sequence[GateSpec],
    target_cost: float,
    cost_fn: Callable[[Mapping[str, int]], float],
    tau: float,
    *,
    factors: Mapping[GateType, float] = DEFAULT_GATE_FACTORS,
    max_rounds: int = 30,
    removable: bool = True,
) -> BlockAllocation:
    """Masks whose hard-mask cost ``cost_fn(kept)`` is nearest ``target_cost`` (within one rounding step).

    ``cost_fn`` gives the block's cost for kept counts per gate (a gate it is not given: full size)
    and must not decrease when a count grows. Gates that cannot be pruned are simply not passed.
    ``removable=False`` (a block whose removal would not be exact, ``GroupSet.block_removable``):
    every gate keeps at least its ``min_keep``, however low the target.
    """
    _check_call(scores, gates, target_cost, tau, factors)
    full = {g.name: g.size for g in gates}
    dense = float(cost_fn(full))
    if not gates:
        return BlockAllocation({}, {}, {}, dense, -0.5)
    joint = _joint_positions(scores, gates, factors)
    if target_cost >= dense:
        ones = {g.name: np.ones(g.size) for g in gates}
        return BlockAllocation(ones, {k: v.astype(bool) for k, v in ones.items()}, full, dense, -0.5)
    least = {g.name: g.min_keep for g in gates}
    zero = {g.name: 0 for g in gates}
    if removable and target_cost - float(cost_fn(zero)) < float(cost_fn(least)) - target_cost:
        return _result(joint, gates, zero, pruned=joint.total, cost=float(cost_fn(zero)), tau=tau)
    memo: dict[int, float] = {}

    def cost_at(pruned: int) -> float:
        if pruned not in memo:
            memo[pruned] = float(cost_fn(joint.kept_at(gates, pruned, least)))
        return memo[pruned]

    pruned = _search(cost_at, joint.total, target_cost, max_rounds)
    return _result(
        joint, gates, joint.kept_at(gates, pruned, least), pruned=pruned, cost=cost_at(pruned), tau=tau
    )
