"""Section 4 of the method doc: ranks, joint threshold, soft/hard masks, rounding, reactivation."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p3b_fx.allocate import DEFAULT_GATE_FACTORS, BlockAllocation, GateSpec, GateType, allocate_block
from p3b_fx.errors import ConfigError, TrainingError

CostFn = Callable[[Mapping[str, int]], float]


def total_kept(kept: Mapping[str, int]) -> float:
    return float(sum(kept.values()))


def sigmoid_ln9(x: float) -> float:
    return float(1.0 / (1.0 + 9.0 ** (-x)))


# ---- realistic block cost functions (an empty gate removes the block, as in GroupSet) --------------

D, HEADS, HEAD_DIM, HIDDEN = 48, 3, 16, 192

ATTN = (
    GateSpec("in", D, GateType.ATTN_IN),
    GateSpec("hd", HEAD_DIM, GateType.ATTN_HEAD_DIM),
    GateSpec("out", D, GateType.ATTN_OUT),
)
MLP = (
    GateSpec("in", D, GateType.MLP_IN),
    GateSpec("hidden", HIDDEN, GateType.MLP_HIDDEN),
    GateSpec("out", D, GateType.MLP_OUT),
)


def attn_cost(kept: Mapping[str, int]) -> float:
    r, d, w, h = kept.get("in", D), kept.get("hd", HEAD_DIM), kept.get("out", D), kept.get("heads", HEADS)
    if min(r, d, w, h) == 0:
        return 0.0
    return float(3 * h * d * r + 3 * h * d + w * h * d + w)


def mlp_cost(kept: Mapping[str, int]) -> float:
    r, f, w = kept.get("in", D), kept.get("hidden", HIDDEN), kept.get("out", D)
    if min(r, f, w) == 0:
        return 0.0
    return float(r * f + f + f * w + w)


BLOCKS: dict[str, tuple[tuple[GateSpec, ...], CostFn]] = {"attn": (ATTN, attn_cost), "mlp": (MLP, mlp_cost)}


def random_scores(gates: tuple[GateSpec, ...], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {g.name: rng.exponential(size=g.size) ** 2 for g in gates}


def one_step_cost(gates: tuple[GateSpec, ...], cost_fn: CostFn, kept: Mapping[str, int]) -> float:
    """The largest cost change from one rounding step more or less of any single gate."""
    here = cost_fn(kept)
    steps = [0.0]
    for g in gates:
        for delta in (-g.round_to, g.round_to):
            k = min(max(kept[g.name] + delta, g.min_keep), g.size)
            steps.append(abs(cost_fn({**kept, g.name: k}) - here))
    return max(steps)


def assert_consistent(
    alloc: BlockAllocation, gates: tuple[GateSpec, ...], scores: Mapping[str, np.ndarray]
) -> None:
    for g in gates:
        hard, soft = alloc.hard[g.name], alloc.soft[g.name]
        assert hard.dtype == bool and hard.shape == (g.size,)
        assert int(hard.sum()) == alloc.kept[g.name]
        np.testing.assert_array_equal(hard, soft >= 0.5)
        if 0 < alloc.kept[g.name] < g.size:  # the kept elements are the gate's best-scored ones
            assert scores[g.name][hard].min() >= scores[g.name][~hard].max()


# ---- hand-computed cases --------------------------------------------------------------------------


def test_single_gate_by_hand() -> None:
    gate = GateSpec("g", 4, GateType.ATTN_IN)
    scores = {"g": np.array([3.0, 1.0, 2.0, 0.0])}  # ranks (= joint positions) 3, 1, 2, 0
    alloc = allocate_block(scores, [gate], target_cost=2, cost_fn=total_kept, tau=0.1)
    assert alloc.kept == {"g": 2} and alloc.cost == 2.0 and alloc.threshold == 1.5
    np.testing.assert_array_equal(alloc.hard["g"], [True, False, True, False])
    # m = sigmoid(ln 9 · (rho - t) / (N·tau)) with N·tau = 0.4
    expected = [sigmoid_ln9((rho - 1.5) / 0.4) for rho in (3, 1, 2, 0)]
    np.testing.assert_allclose(alloc.soft["g"], expected, rtol=1e-12)


def test_soft_mask_is_point_nine_one_n_tau_above_threshold() -> None:
    gate = GateSpec("g", 20, GateType.MLP_IN)
    scores = {"g": np.arange(20.0)}
    alloc = allocate_block(scores, [gate], target_cost=10, cost_fn=total_kept, tau=0.075)  # N·tau = 1.5
    assert alloc.threshold == 9.5
    assert alloc.soft["g"][11] == pytest.approx(0.9) and alloc.soft["g"][8] == pytest.approx(0.1)


def test_tau_zero_gives_an_exact_step() -> None:
    gate = GateSpec("g", 6, GateType.MLP_IN)
    alloc = allocate_block({"g": np.arange(6.0)}, [gate], target_cost=3, cost_fn=total_kept, tau=0.0)
    np.testing.assert_array_equal(alloc.soft["g"], [0, 0, 0, 1, 1, 1])


@pytest.mark.parametrize(
    ("type_b", "kept"),
    [
        (GateType.ATTN_IN, {"a": 1, "b": 2}),  # tie at 0.5: gate order decides, a's element goes first
        (GateType.ATTN_OUT, {"a": 1, "b": 2}),  # b ranks x1.5: [0.75, 1.5], a's 0.5 is lowest
        (GateType.MLP_HIDDEN, {"a": 2, "b": 1}),  # b ranks x0.75: [0.375, 0.75], b's is lowest
    ],
)
def test_joint_sort_uses_normalised_ranks_times_gate_factor(type_b: GateType, kept: dict[str, int]) -> None:
    gates = [GateSpec("a", 2, GateType.ATTN_IN), GateSpec("b", 2, type_b)]
    scores = {"a": np.array([5.0, 9.0]), "b": np.array([0.1, 0.2])}  # raw score scales do not matter
    assert allocate_block(scores, gates, target_cost=3, cost_fn=total_kept, tau=0.1).kept == kept


def test_default_factors() -> None:
    assert DEFAULT_GATE_FACTORS[GateType.ATTN_OUT] == 1.5
    assert DEFAULT_GATE_FACTORS[GateType.MLP_HIDDEN] == 0.75
    assert DEFAULT_GATE_FACTORS[GateType.MLP_OUT] == 1.5
    assert {DEFAULT_GATE_FACTORS[t] for t in (GateType.ATTN_IN, GateType.ATTN_HEAD_DIM, GateType.MLP_IN)} == {
        1.0
    }


def test_equal_scores_drop_lower_indices_first_and_repeat_identically() -> None:
    gate = GateSpec("g", 5, GateType.MLP_IN)
    first = allocate_block({"g": np.ones(5)}, [gate], target_cost=2, cost_fn=total_kept, tau=0.1)
    second = allocate_block({"g": np.ones(5)}, [gate], target_cost=2, cost_fn=total_kept, tau=0.1)
    np.testing.assert_array_equal(first.hard["g"], [False, False, False, True, True])
    np.testing.assert_array_equal(first.soft["g"], second.soft["g"])


@pytest.mark.parametrize("target", [math.inf, 1e12, 3 * 48 * 3 * 16 + 3 * 3 * 16 + 48 * 3 * 16 + 48])
def test_target_at_or_above_dense_keeps_everything(target: float) -> None:
    scores = random_scores(ATTN, 0)
    alloc = allocate_block(scores, ATTN, target_cost=target, cost_fn=attn_cost, tau=0.1)
    assert alloc.kept == {"in": D, "hd": HEAD_DIM, "out": D} and alloc.cost == attn_cost({})
    assert all(np.all(m == 1.0) for m in alloc.soft.values()) and not alloc.removed


@pytest.mark.parametrize("target", [0.0, -5.0, 1.0])
def test_target_near_zero_removes_the_block(target: float) -> None:
    scores = random_scores(MLP, 1)
    alloc = allocate_block(scores, MLP, target_cost=target, cost_fn=mlp_cost, tau=0.1)
    assert alloc.removed and alloc.kept == {"in": 0, "hidden": 0, "out": 0} and alloc.cost == 0.0
    assert_consistent(alloc, MLP, scores)
    assert all(np.all((m > 0) & (m < 0.5)) for m in alloc.soft.values())  # attenuated, not cut, while tau > 0


@pytest.mark.parametrize("target", [0.0, 1.0])
def test_a_block_that_cannot_be_removed_keeps_its_minimal_gates(target: float) -> None:
    """removable=False (no exact removal, e.g. no prunable write gate): never an empty gate."""
    scores = random_scores(MLP, 1)
    alloc = allocate_block(scores, MLP, target_cost=target, cost_fn=mlp_cost, tau=0.1, removable=False)
    assert not alloc.removed and alloc.kept == {g.name: g.min_keep for g in MLP}
    assert_consistent(alloc, MLP, scores)


def test_small_target_keeps_the_block_alive_with_minimal_gates() -> None:
    gates = tuple(GateSpec(g.name, g.size, g.gate_type, round_to=4) for g in MLP)
    alloc = allocate_block(random_scores(gates, 2), gates, target_cost=30.0, cost_fn=mlp_cost, tau=0.1)
    assert alloc.kept == {"in": 4, "hidden": 4, "out": 4} and not alloc.removed


# ---- the threshold search --------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    block=st.sampled_from(sorted(BLOCKS)),
    seed=st.integers(0, 2**32 - 1),
    keep=st.one_of(st.floats(0.0, 0.004), st.floats(0.0, 0.999)),
    tau=st.sampled_from([0.0, 0.02, 0.1]),
)
def test_threshold_search_lands_within_one_element_of_target(
    block: str, seed: int, keep: float, tau: float
) -> None:
    gates, cost_fn = BLOCKS[block]
    scores = random_scores(gates, seed)
    target = keep * cost_fn({})
    smallest_live = cost_fn({g.name: g.min_keep for g in gates})
    alloc = allocate_block(scores, gates, target_cost=target, cost_fn=cost_fn, tau=tau)
    assert alloc.cost == cost_fn(alloc.kept)
    assert_consistent(alloc, gates, scores)
    if alloc.removed:  # only when 0 is nearer the target than the smallest live block
        assert target < smallest_live / 2
    elif target < smallest_live:  # below the grid: the smallest live block is the nearest
        assert alloc.cost == smallest_live and target >= smallest_live / 2
    else:
        assert abs(alloc.cost - target) <= one_step_cost(gates, cost_fn, alloc.kept)


@pytest.mark.parametrize("block", sorted(BLOCKS))
@pytest.mark.parametrize("round_to", [4, 8])
@pytest.mark.parametrize("keep", [0.1, 0.37, 0.8])
def test_rounding_keeps_multiples_and_stays_within_one_step(block: str, round_to: int, keep: float) -> None:
    base, cost_fn = BLOCKS[block]
    gates = tuple(GateSpec(g.name, g.size, g.gate_type, round_to=round_to) for g in base)
    scores = random_scores(gates, round_to)
    target = keep * cost_fn({})
    alloc = allocate_block(scores, gates, target_cost=target, cost_fn=cost_fn, tau=0.1)
    assert all(k % round_to == 0 or k == g.size for g, k in zip(gates, alloc.kept.values(), strict=True))
    assert abs(alloc.cost - target) <= one_step_cost(gates, cost_fn, alloc.kept)
    assert_consistent(alloc, gates, scores)


def test_rounding_to_a_size_that_does_not_divide() -> None:
    gate = GateSpec("g", 10, GateType.MLP_HIDDEN, round_to=4)
    assert [gate.round_count(raw, 4) for raw in (10, 9, 7, 6, 5, 1, 0)] == [10, 8, 8, 8, 4, 4, 4]
    assert gate.round_count(0, 0) == 0


def test_reactivation_masks_are_recomputed_from_scratch() -> None:
    scores = random_scores(MLP, 7)
    low = allocate_block(scores, MLP, target_cost=0.2 * mlp_cost({}), cost_fn=mlp_cost, tau=0.1)
    high = allocate_block(scores, MLP, target_cost=0.7 * mlp_cost({}), cost_fn=mlp_cost, tau=0.1)
    again = allocate_block(scores, MLP, target_cost=0.2 * mlp_cost({}), cost_fn=mlp_cost, tau=0.1)
    for g in MLP:
        back = high.hard[g.name] & ~low.hard[g.name]
        assert np.all(high.hard[g.name] | ~low.hard[g.name])  # nothing kept at the low target is lost
        assert np.all(high.soft[g.name][back] >= 0.5)
        np.testing.assert_array_equal(again.soft[g.name], low.soft[g.name])
    assert sum(high.kept.values()) > sum(low.kept.values())


# ---- input validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"scores": {"in": np.ones(3)}}, ConfigError, "block's gates"),
        (
            {"scores": {"in": np.ones(3), "hidden": np.ones(6), "out": np.ones(4)}},
            ConfigError,
            "expected 3 scores",
        ),
        (
            {"scores": {"in": np.ones(3), "hidden": np.full(6, np.nan), "out": np.ones(3)}},
            TrainingError,
            "NaN",
        ),
        ({"tau": -0.1}, ConfigError, "tau"),
        ({"target_cost": math.nan}, ConfigError, "NaN"),
        ({"factors": {GateType.MLP_IN: 0.0}}, ConfigError, "factors"),
        ({"gates": [GateSpec("in", 3, GateType.MLP_IN)] * 2}, ConfigError, "unique"),
    ],
)
def test_bad_calls_raise(change: dict[str, object], error: type[Exception], message: str) -> None:
    gates = [
        GateSpec("in", 3, GateType.MLP_IN),
        GateSpec("hidden", 6, GateType.MLP_HIDDEN),
        GateSpec("out", 3, GateType.MLP_OUT),
    ]
    args: dict[str, object] = {
        "scores": {g.name: np.ones(g.size) for g in gates},
        "gates": gates,
        "target_cost": 5.0,
        "cost_fn": total_kept,
        "tau": 0.1,
    }
    args.update(change)
    with pytest.raises(error, match=message):
        allocate_block(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(("size", "round_to"), [(0, 1), (4, 0)])
def test_gate_spec_validation(size: int, round_to: int) -> None:
    with pytest.raises(ConfigError, match="must be >= 1"):
        GateSpec("g", size, GateType.MLP_IN, round_to)


def test_no_gates_is_a_fixed_block() -> None:
    alloc = allocate_block({}, [], target_cost=0.0, cost_fn=lambda kept: 42.0, tau=0.1)
    assert alloc.kept == {} and alloc.cost == 42.0
