"""Global budget: block importance -> per-block keep ratios (P3B method doc, section 3).

Pattern: importance I_i per block, the blocks' dense costs P_i, the non-block cost P_nb and a model
keep ratio k. Result: goal keep ratios κ_i in [floor, 1] whose kept cost meets the budget exactly,
and the ramp that phases them in. Why: one global budget lets task-relevant blocks keep more while
the model as a whole meets its size (or FLOP, or latency) target.

The cost unit is pluggable (:class:`CostModel`): parameters (the reference), multiply-accumulates
from the graph analysis, or a latency table the user measured on the target device.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from p3b_fx.core.groups import Block, GroupSet
from p3b_fx.errors import ConfigError

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]


class BudgetUnit(StrEnum):
    PARAMS = "params"
    FLOPS = "flops"
    LATENCY = "latency"


@dataclass(frozen=True)
class BlockCost:
    """A block's name and its dense cost in the model's unit."""

    name: str
    dense: float


class CostModel(Protocol):
    """What the scheduler asks about cost: per block, under kept element counts per group."""

    @property
    def unit(self) -> BudgetUnit: ...

    @property
    def blocks(self) -> tuple[BlockCost, ...]: ...

    @property
    def nonblock(self) -> float:
        """Cost outside the blocks (patch/pos embedding, class token, final norm, head): never pruned."""
        ...

    @property
    def dense_total(self) -> float: ...

    def block_cost(self, name: str, kept: Mapping[str, int]) -> float:
        """Cost of block ``name`` when group ``g`` keeps ``kept[g]`` elements (missing: all)."""
        ...


def dense_costs(model: CostModel) -> FloatArray:
    """The blocks' dense costs in ``model.blocks`` order (the P_i of section 3)."""
    return np.array([b.dense for b in model.blocks], dtype=np.float64)


def _lookup_block(groups: GroupSet, name: str) -> Block:
    try:
        return groups.block(name)
    except KeyError:
        known = ", ".join(b.name for b in groups.blocks[:4])
        raise ConfigError(f"no block named {name!r} in the model (blocks are e.g. {known}, ...)") from None


@dataclass(frozen=True)
class GroupCostModel:
    """Parameters or multiply-accumulates, computed exactly from the graph analysis."""

    groups: GroupSet
    unit: BudgetUnit
    blocks: tuple[BlockCost, ...]
    nonblock: float

    @property
    def dense_total(self) -> float:
        return self.nonblock + sum(b.dense for b in self.blocks)

    def block_cost(self, name: str, kept: Mapping[str, int]) -> float:
        block = _lookup_block(self.groups, name)
        if self.unit is BudgetUnit.PARAMS:
            return float(self.groups.block_params(block, kept))
        return float(self.groups.block_flops(block, kept))


def cost_model_from_groups(groups: GroupSet, unit: BudgetUnit) -> GroupCostModel:
    """A parameter or FLOP cost model; latency needs a measured table (:meth:`LatencyTable.load`)."""
    unit = BudgetUnit(unit)
    if unit is BudgetUnit.LATENCY:
        raise ConfigError(
            "a latency budget needs a table measured on the target device; "
            "build it with LatencyTable.load(path, groups) instead of cost_model_from_groups"
        )
    if unit is BudgetUnit.PARAMS:
        blocks = tuple(BlockCost(b.name, float(groups.block_params(b))) for b in groups.blocks)
        return GroupCostModel(groups, unit, blocks, float(groups.params_nonblock))
    blocks = tuple(BlockCost(b.name, float(groups.block_flops(b))) for b in groups.blocks)
    return GroupCostModel(groups, unit, blocks, float(groups.flops_nonblock))


@dataclass(frozen=True)
class LatencyEntry:
    """Measured latency of one block: ``dense`` in total, ``per_kept_fraction`` of it scales with size.

    The block's latency at kept fraction f (its share of dense multiply-accumulates) is modelled as
    ``dense - per_kept_fraction * (1 - f)``: a fixed part (launches, norms) plus a linear part.
    """

    dense: float
    per_kept_fraction: float

    def at(self, fraction: float) -> float:
        return self.dense - self.per_kept_fraction * (1.0 - fraction)


@dataclass(frozen=True)
class LatencyTable:
    """Latency cost model from a table the user measures on the deployment device.

    JSON: ``{"nonblock": ms, "blocks": {block name: {"dense": ms, "per_kept_fraction": ms}}}``
    (a bare ``{block name: entry}`` mapping is accepted too; ``nonblock`` then defaults to 0).
    Every block of the model must be listed. A removed block (some group empty) costs 0.
    """

    groups: GroupSet
    entries: Mapping[str, LatencyEntry]
    nonblock: float = 0.0
    blocks: tuple[BlockCost, ...] = field(init=False)

    def __post_init__(self) -> None:
        missing = [b.name for b in self.groups.blocks if b.name not in self.entries]
        if missing:
            raise ConfigError(
                f"the latency table lacks blocks {missing[:4]}{'...' if len(missing) > 4 else ''}; "
                "measure every block of the model and add it to the table"
            )
        costs = tuple(BlockCost(b.name, self.entries[b.name].dense) for b in self.groups.blocks)
        object.__setattr__(self, "blocks", costs)

    @property
    def unit(self) -> BudgetUnit:
        return BudgetUnit.LATENCY

    @property
    def dense_total(self) -> float:
        return self.nonblock + sum(b.dense for b in self.blocks)

    def block_cost(self, name: str, kept: Mapping[str, int]) -> float:
        block = _lookup_block(self.groups, name)
        if self.groups.block_removed(block, kept):
            return 0.0
        dense = self.groups.block_flops(block)
        fraction = self.groups.block_flops(block, kept) / dense if dense > 0 else 1.0
        return self.entries[name].at(fraction)

    @classmethod
    def load(cls, path: str | Path, groups: GroupSet) -> LatencyTable:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read the latency table {path}: {exc}") from exc
        return cls.from_mapping(data, groups, where=str(path))

    @classmethod
    def from_mapping(cls, data: Any, groups: GroupSet, where: str = "latency table") -> LatencyTable:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a JSON object of blocks, got {type(data).__name__}")
        table = data.get("blocks", data)
        nonblock = _number(data.get("nonblock", 0.0), f"{where}: nonblock")
        entries = {
            name: _entry(value, f"{where}: block {name!r}")
            for name, value in table.items()
            if name != "nonblock"
        }
        return cls(groups, entries, nonblock)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{where} must be a finite number >= 0 (milliseconds), got {value!r}")
    return float(value)


def _entry(value: Any, where: str) -> LatencyEntry:
    if not isinstance(value, Mapping) or "dense" not in value:
        raise ConfigError(
            f"{where} must be an object {{'dense': ms, 'per_kept_fraction': ms}}, got {value!r}"
        )
    dense = _number(value["dense"], f"{where}.dense")
    scaling = _number(value.get("per_kept_fraction", dense), f"{where}.per_kept_fraction")
    if scaling > dense:
        raise ConfigError(
            f"{where}: per_kept_fraction {scaling} exceeds dense {dense}; it is a part of dense"
        )
    return LatencyEntry(dense, scaling)


def budget_target(
    dense_cost: FloatArray, nonblock_cost: float, keep_ratio: float, blocks_only: bool
) -> float:
    """The blocks' kept cost Σ κ_i P_i that meets keep ratio k (section 3)."""
    if blocks_only:
        return keep_ratio * float(dense_cost.sum())
    return keep_ratio * (float(dense_cost.sum()) + nonblock_cost) - nonblock_cost


def _check_inputs(
    importance: FloatArray, cost: FloatArray, nonblock: float, keep_ratio: float, floor: float
) -> None:
    if importance.ndim != 1 or importance.shape != cost.shape or importance.size == 0:
        raise ConfigError(
            f"importance {importance.shape} and dense_cost {cost.shape} must be 1-D with one entry per block"
        )
    if not (np.all(np.isfinite(importance)) and np.all(importance >= 0)):
        raise ConfigError(f"importance must be finite and >= 0, got {importance.tolist()}")
    if not (np.all(np.isfinite(cost)) and np.all(cost >= 0) and cost.sum() > 0):
        raise ConfigError(f"dense block costs must be finite, >= 0 and not all 0, got {cost.tolist()}")
    if not (math.isfinite(nonblock) and nonblock >= 0):
        raise ConfigError(f"the non-block cost must be finite and >= 0, got {nonblock}")
    if not 0.0 < keep_ratio <= 1.0:
        raise ConfigError(f"keep_ratio must be in (0, 1] (1 - prune ratio), got {keep_ratio}")
    if not 0.0 <= floor < 1.0:
        raise ConfigError(f"the keep-ratio floor must be in [0, 1), got {floor}")


def _check_feasible(  # noqa: PLR0917 - private helper of keep_ratios()
    target: float, cost: FloatArray, nonblock: float, keep_ratio: float, floor: float, least: FloatArray
) -> None:
    if target <= 0.0:
        share = nonblock / (nonblock + float(cost.sum()))
        raise ConfigError(
            f"keep_ratio {keep_ratio} cannot be met: the non-block cost alone (embeddings, head) is "
            f"{share:.1%} of the model; raise keep_ratio above {share:.3f} or budget the blocks only"
        )
    if target < floor * float(cost.sum()) * (1 - 1e-12):
        share = target / float(cost.sum())
        raise ConfigError(
            f"keep-ratio floor {floor} keeps more than keep_ratio {keep_ratio} allows (the blocks may keep "
            f"{share:.3f} of their cost on average); lower the floor or raise keep_ratio"
        )
    if target < float((np.maximum(least, floor) * cost).sum()) * (1 - 1e-12):
        raise ConfigError(
            f"keep_ratio {keep_ratio} cannot be met: the blocks' unprunable groups and least gates keep "
            f"{float((least * cost).sum()) / float(cost.sum()):.1%} of their cost; raise keep_ratio or "
            "pick a granularity that prunes more groups"
        )


def _water_level(importance: FloatArray, cost: FloatArray, target: float, floor: FloatArray) -> float:
    """The scalar c with Σ clip(c·I_i, floor_i, 1)·P_i == target (exact, piecewise linear in c); I > 0."""
    knots = np.unique(np.concatenate([floor / importance, 1.0 / importance]))
    filled = (np.clip(np.outer(knots, importance), floor, 1.0) * cost).sum(axis=1)
    j = int(np.searchsorted(filled, target, side="left"))
    if j >= knots.size:  # only by rounding: at the last knot every block is full
        return float(knots[-1])
    if j == 0 or filled[j] == filled[j - 1]:
        return float(knots[j])
    frac = (target - filled[j - 1]) / (filled[j] - filled[j - 1])
    return float(knots[j - 1] + frac * (knots[j] - knots[j - 1]))


def keep_ratios(
    importance: npt.ArrayLike,
    dense_cost: npt.ArrayLike,
    nonblock_cost: float,
    keep_ratio: float,
    *,
    blocks_only: bool = False,
    floor: float = 0.0,
    least: npt.ArrayLike | None = None,
) -> FloatArray:
    """Goal keep ratios κ_i = clip(c·I_i, max(floor, least_i), 1) with Σ κ_i·P_i == budget_target exactly.

    This is the fixed point of the reference's water-filling ("fix blocks >= 1 at 1, rescale the
    rest"), solved exactly on the sorted breakpoints instead of by at most 20 rounds: with a floor,
    fixing both sides in the same round can miss the budget. ``least`` is each block's smallest
    reachable keep ratio (its unprunable groups and least gates; 1 where nothing of it is prunable
    at the granularity): the reference assumes every block can reach any κ, and where one cannot,
    the cost it must keep is taken from the blocks that can shed it, so the budget is still met.
    Raises ConfigError when no plan meets the budget.
    """
    imp = np.asarray(importance, dtype=np.float64)
    cost = np.asarray(dense_cost, dtype=np.float64)
    nonblock = 0.0 if blocks_only else float(nonblock_cost)
    _check_inputs(imp, cost, nonblock, keep_ratio, floor)
    low = np.zeros_like(cost) if least is None else np.clip(np.asarray(least, dtype=np.float64), 0.0, 1.0)
    if low.shape != cost.shape:
        raise ConfigError(f"least keep ratios {low.shape} must have one entry per block, like {cost.shape}")
    target = budget_target(cost, nonblock, keep_ratio, blocks_only)
    _check_feasible(target, cost, nonblock, keep_ratio, floor, low)
    low = np.maximum(low, floor)
    if not np.any(imp > 0):
        log.warning("no block has a positive importance; keep ratios fall back to uniform")
        imp = np.ones_like(imp)
    imp = np.maximum(imp / float(imp.max()), 1e-12)  # scale-free (no overflow); every block can fill to 1
    level = _water_level(imp, cost, min(target, float(cost.sum())), low)
    return np.asarray(np.clip(level * imp, low, 1.0), dtype=np.float64)


def ramp(step: int, start: int, sparse: int) -> float:
    """r(t) = clip((t + 1 - t_start) / (t_sparse - t_start), 0, 1); a step at t_start when they are equal."""
    if sparse < start:
        raise ConfigError(
            f"the sparse step {sparse} comes before the pruning start {start}; swap or fix them"
        )
    if sparse == start:
        return 1.0 if step >= start else 0.0
    return float(min(max((step + 1 - start) / (sparse - start), 0.0), 1.0))


def effective_keep(goal: npt.ArrayLike, r: float) -> FloatArray:
    """κ_i(t) = 1 - (1 - κ_i^goal)·r(t): sparsity grows linearly from dense to the goal."""
    if not 0.0 <= r <= 1.0:
        raise ConfigError(f"ramp value must be in [0, 1], got {r}")
    return np.asarray(1.0 - (1.0 - np.asarray(goal, dtype=np.float64)) * r, dtype=np.float64)
