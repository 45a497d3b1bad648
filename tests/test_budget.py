"""Section 3 of the method doc: budget target, water-filling keep ratios, ramp; and the cost models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p3b_fx.budget import (
    BudgetUnit,
    CostModel,
    LatencyTable,
    budget_target,
    cost_model_from_groups,
    dense_costs,
    effective_keep,
    keep_ratios,
    ramp,
)
from p3b_fx.core.groups import Block, BlockKind, FlopTerm, Group, GroupSet, Member, ParamSpec, Role
from p3b_fx.errors import ConfigError

# ---- water-filling -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keep", "blocks_only", "expected"), [(0.8, False, 20.0), (0.5, True, 20.0), (1.0, False, 40.0)]
)
def test_budget_target(keep: float, blocks_only: bool, expected: float) -> None:
    # blocks cost 10 + 30, non-block 60: k·100 - 60, or k·40 for a blocks-only budget
    assert budget_target(np.array([10.0, 30.0]), 60.0, keep, blocks_only) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        (([1.0, 1.0], [10.0, 30.0], 0.0, 0.5, 0.0), [0.5, 0.5]),  # uniform
        (([3.0, 1.0], [10.0, 10.0], 0.0, 0.5, 0.0), [0.75, 0.25]),  # c = 0.25
        (([4.0, 1.0], [10.0, 10.0], 0.0, 0.75, 0.0), [1.0, 0.5]),  # 1.2 -> fixed at 1, rest rescaled
        (([4.0, 1.0], [10.0, 10.0], 20.0, 0.875, 0.0), [1.0, 0.5]),  # non-block counts: 0.875·40 - 20 = 15
        (([3.0] + [0.1] * 10, [1.0] * 11, 0.0, 7 / 11, 0.5), [1.0] + [0.6] * 10),  # both bounds active
        (([1.0, 0.0], [10.0, 10.0], 0.0, 0.6, 0.2), [1.0, 0.2]),  # zero importance sits at the floor
        (([0.0, 0.0], [10.0, 30.0], 0.0, 0.5, 0.0), [0.5, 0.5]),  # no importance at all: uniform
    ],
)
def test_keep_ratios_by_hand(
    case: tuple[list[float], list[float], float, float, float], expected: list[float]
) -> None:
    importance, cost, nonblock, keep, floor = case
    got = keep_ratios(importance, cost, nonblock, keep, floor=floor)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_blocks_only_ignores_the_nonblock_cost() -> None:
    got = keep_ratios([1.0, 1.0], [10.0, 30.0], 1e9, 0.5, blocks_only=True)
    np.testing.assert_allclose(got, [0.5, 0.5])


@settings(max_examples=200, deadline=None)
@given(
    data=st.lists(st.tuples(st.floats(0.0, 100.0), st.floats(1.0, 1e6)), min_size=1, max_size=30),
    nonblock=st.floats(0.0, 1e6),
    keep=st.floats(0.01, 1.0),
    floor=st.sampled_from([0.0, 0.05, 0.2, 0.5]),
    blocks_only=st.booleans(),
)
def test_water_filling_meets_the_budget_exactly(
    data: list[tuple[float, float]], nonblock: float, keep: float, floor: float, blocks_only: bool
) -> None:
    importance = np.array([i for i, _ in data])
    cost = np.array([c for _, c in data])
    target = budget_target(cost, 0.0 if blocks_only else nonblock, keep, blocks_only)
    if target <= 0 or target < floor * cost.sum() * (1 - 1e-12):
        with pytest.raises(ConfigError):
            keep_ratios(importance, cost, nonblock, keep, floor=floor, blocks_only=blocks_only)
        return
    kappa = keep_ratios(importance, cost, nonblock, keep, floor=floor, blocks_only=blocks_only)
    assert float(kappa @ cost) == pytest.approx(target, rel=1e-6)
    assert np.all(kappa >= floor) and np.all(kappa <= 1.0)
    # water-filling shape: more important never keeps less
    order = np.argsort(importance, kind="stable")
    assert np.all(np.diff(kappa[order]) >= -1e-12)


@settings(max_examples=200, deadline=None)
@given(
    data=st.lists(
        st.tuples(st.floats(0.0, 100.0), st.floats(1.0, 1e6), st.sampled_from([0.0, 0.0, 0.3, 0.9, 1.0])),
        min_size=1, max_size=20,
    ),
    nonblock=st.floats(0.0, 1e5),
    keep=st.floats(0.01, 1.0),
    floor=st.sampled_from([0.0, 0.2]),
)  # fmt: skip
def test_blocks_that_cannot_shed_their_share_leave_it_to_the_others(
    data: list[tuple[float, float, float]], nonblock: float, keep: float, floor: float
) -> None:
    """A block whose unprunable groups keep ``least`` of its cost (1: nothing prunable at the
    granularity) stays at or above it, and the other blocks shed the rest: the budget is still met
    exactly, or ConfigError says that the blocks cannot shed enough."""
    importance = np.array([i for i, _, _ in data])
    cost = np.array([c for _, c, _ in data])
    least = np.array([m for _, _, m in data])
    target = budget_target(cost, nonblock, keep, False)
    low = np.maximum(least, floor)
    if target <= 0 or target < float(low @ cost) * (1 - 1e-12):
        with pytest.raises(ConfigError):
            keep_ratios(importance, cost, nonblock, keep, floor=floor, least=least)
        return
    kappa = keep_ratios(importance, cost, nonblock, keep, floor=floor, least=least)
    assert float(kappa @ cost) == pytest.approx(min(target, float(cost.sum())), rel=1e-6)
    assert np.all(kappa >= low - 1e-12) and np.all(kappa <= 1.0)
    free = (kappa > low + 1e-9) & (kappa < 1.0 - 1e-9)  # neither clamp binds: κ = c · I
    order = np.argsort(importance[free], kind="stable")
    assert np.all(np.diff(kappa[free][order]) >= -1e-9)


def test_the_unreachable_share_goes_to_the_prunable_blocks() -> None:
    # three equal blocks, half of the cost must go; the middle one can shed nothing
    kappa = keep_ratios([1.0, 1.0, 1.0], [10.0, 10.0, 10.0], 0.0, 0.5, least=[0.0, 1.0, 0.0])
    np.testing.assert_allclose(kappa, [0.25, 1.0, 0.25])
    with pytest.raises(ConfigError, match=r"unprunable groups and least gates keep 66\.7%"):
        keep_ratios([1.0, 1.0, 1.0], [10.0, 10.0, 10.0], 0.0, 0.5, least=[0.0, 1.0, 1.0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep_ratio": 0.0}, "keep_ratio must be in"),
        ({"keep_ratio": 1.5}, "keep_ratio must be in"),
        ({"keep_ratio": 0.3, "nonblock_cost": 50.0}, "non-block cost alone"),
        ({"keep_ratio": 0.5, "floor": 0.6}, "floor 0.6"),
        ({"keep_ratio": 0.5, "floor": 1.0}, "floor must be in"),
        ({"keep_ratio": 0.5, "importance": [1.0]}, "one entry per block"),
        ({"keep_ratio": 0.5, "importance": [1.0, -1.0]}, "importance must be finite"),
        ({"keep_ratio": 0.5, "dense_cost": [0.0, 0.0]}, "not all 0"),
        ({"keep_ratio": 0.5, "nonblock_cost": -1.0}, "non-block cost must be"),
    ],
)
def test_impossible_budgets_raise_with_a_reason(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"importance": [1.0, 2.0], "dense_cost": [30.0, 20.0], "nonblock_cost": 0.0}
    args.update(kwargs)
    with pytest.raises(ConfigError, match=message):
        keep_ratios(**args)  # type: ignore[arg-type]


# ---- ramp ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "expected"), [(0, 0.0), (9, 0.0), (10, 0.1), (14, 0.5), (18, 0.9), (19, 1.0), (40, 1.0)]
)
def test_ramp(step: int, expected: float) -> None:
    assert ramp(step, start=10, sparse=20) == pytest.approx(expected)


@pytest.mark.parametrize(("step", "expected"), [(4, 0.0), (5, 1.0), (6, 1.0)])
def test_ramp_without_sparsify_phase_is_a_step(step: int, expected: float) -> None:
    assert ramp(step, start=5, sparse=5) == expected


def test_ramp_rejects_reversed_bounds() -> None:
    with pytest.raises(ConfigError, match="before the pruning start"):
        ramp(3, start=10, sparse=5)


@pytest.mark.parametrize(
    ("r", "expected"), [(0.0, [1.0, 1.0, 1.0]), (0.5, [0.6, 0.9, 1.0]), (1.0, [0.2, 0.8, 1.0])]
)
def test_effective_keep(r: float, expected: list[float]) -> None:
    np.testing.assert_allclose(effective_keep([0.2, 0.8, 1.0], r), expected)


def test_effective_keep_rejects_ramp_outside_unit_interval() -> None:
    with pytest.raises(ConfigError, match="ramp value"):
        effective_keep([0.5], 1.5)


# ---- cost models --------------------------------------------------------------------------------

D, F, TOKENS, NONBLOCK = 8, 32, 5, 1000


def mlp_groups() -> GroupSet:
    """One MLP block (fc1 D->F, fc2 F->D) whose hidden neurons form the only prunable group."""
    hidden = (F, "b.hidden")
    params = (
        ParamSpec("fc1.weight", ((hidden,), ((D, None),))),
        ParamSpec("fc1.bias", ((hidden,),)),
        ParamSpec("fc2.weight", (((D, None),), (hidden,))),
        ParamSpec("fc2.bias", (((D, None),),)),
    )
    flops = (FlopTerm(TOKENS, ((D, None), hidden)), FlopTerm(TOKENS, (hidden, (D, None))))
    block = Block("b", BlockKind.MLP, ("b.hidden",), params, flops, "x", "add", "fc1", "fc2")
    group = Group("b.hidden", "b", Role.HIDDEN, F, (Member("fc1.weight", 0, (F,), 0),), prunable=True)
    dense_params = 2 * D * F + F + D
    return GroupSet((group,), (block,), params_total=dense_params + NONBLOCK, flops_nonblock=77)


def test_param_cost_model() -> None:
    model: CostModel = cost_model_from_groups(mlp_groups(), BudgetUnit.PARAMS)
    assert model.unit is BudgetUnit.PARAMS
    assert model.nonblock == NONBLOCK
    np.testing.assert_array_equal(dense_costs(model), [2 * D * F + F + D])
    assert model.dense_total == 2 * D * F + F + D + NONBLOCK
    assert model.block_cost("b", {"b.hidden": 4}) == 2 * D * 4 + 4 + D
    assert model.block_cost("b", {"b.hidden": 0}) == 0  # an empty group removes the block


def test_flop_cost_model() -> None:
    model = cost_model_from_groups(mlp_groups(), BudgetUnit.FLOPS)
    assert model.nonblock == 77
    assert model.blocks[0].dense == 2 * TOKENS * D * F
    assert model.block_cost("b", {"b.hidden": 4}) == 2 * TOKENS * D * 4


def test_unknown_block_and_latency_unit_raise() -> None:
    with pytest.raises(ConfigError, match="no block named 'nope'"):
        cost_model_from_groups(mlp_groups(), BudgetUnit.PARAMS).block_cost("nope", {})
    with pytest.raises(ConfigError, match="LatencyTable"):
        cost_model_from_groups(mlp_groups(), BudgetUnit.LATENCY)


def test_latency_table_is_linear_in_kept_flop_fraction(tmp_path: Path) -> None:
    path = tmp_path / "lat.json"
    path.write_text(json.dumps({"nonblock": 0.5, "blocks": {"b": {"dense": 2.0, "per_kept_fraction": 1.5}}}))
    table = LatencyTable.load(path, mlp_groups())
    assert table.unit is BudgetUnit.LATENCY
    assert table.dense_total == pytest.approx(2.5)
    assert table.block_cost("b", {}) == pytest.approx(2.0)
    assert table.block_cost("b", {"b.hidden": F // 4}) == pytest.approx(2.0 - 1.5 * 0.75)
    assert table.block_cost("b", {"b.hidden": 0}) == 0.0


def test_latency_table_accepts_a_bare_block_mapping() -> None:
    table = LatencyTable.from_mapping({"b": {"dense": 1.0}}, mlp_groups())
    assert table.nonblock == 0.0
    assert table.block_cost("b", {"b.hidden": F // 2}) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"other": {"dense": 1.0}}, "lacks blocks"),
        ({"b": {"dense": 1.0, "per_kept_fraction": 2.0}}, "exceeds dense"),
        ({"b": {"dense": -1.0}}, "finite number"),
        ({"b": 3.0}, "must be an object"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_latency_table_validation(data: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LatencyTable.from_mapping(data, mlp_groups())


def test_latency_table_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the latency table"):
        LatencyTable.load(tmp_path / "missing.json", mlp_groups())
