"""Section 2 of the method doc: benefit -> importance (max-rescale, soft clamp, per cost, EMA, mix)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from p3b_fx.errors import CheckpointError, ConfigError
from p3b_fx.importance import ImportanceConfig, ImportanceTracker, block_importance, soft_clamp

CFG = ImportanceConfig()


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def by_hand(benefit: list[float], kept: list[float]) -> np.ndarray:
    """Steps 2-5 written out with the default constants S = 10, slope 1.4."""
    best = max(benefit)
    g = [
        (softplus(1.4 * 10 * b / best) - softplus(1.4 * 10 * b / best - 10)) / (k + 1e-6)
        for b, k in zip(benefit, kept, strict=True)
    ]
    mean = sum(g) / len(g)
    return np.array([x / mean for x in g])


def test_hand_computed_case() -> None:
    benefit, kept = [1.0, 2.0, -0.5], [100.0, 300.0, 200.0]
    np.testing.assert_allclose(block_importance(benefit, kept, CFG), by_hand(benefit, kept), rtol=1e-12)


@pytest.mark.parametrize(
    ("a", "expected"),
    [
        (-50.0, 0.0),
        (0.0, math.log(2) - math.log1p(math.exp(-10))),
        (50.0, 10.0),
        (10.0, softplus(14) - softplus(4)),
    ],
)
def test_soft_clamp_values_and_limits(a: float, expected: float) -> None:
    assert soft_clamp(np.array([a]), 10.0, 1.4)[0] == pytest.approx(expected, abs=1e-12)


def test_soft_clamp_stays_inside_zero_and_scale() -> None:
    g = soft_clamp(np.linspace(-20, 20, 101), 10.0, 1.4)
    assert np.all(g >= 0) and np.all(g <= 10.0) and np.all(np.diff(g) > 0)


def test_best_block_is_rescaled_to_scale_whatever_the_benefit_units() -> None:
    kept = [1.0, 1.0]
    np.testing.assert_allclose(
        block_importance([0.001, 0.002], kept, CFG), block_importance([1000.0, 2000.0], kept, CFG), rtol=1e-12
    )


def test_importance_is_per_kept_parameter() -> None:
    # equal benefit, the second block keeps 3x the cost -> a third of the importance per cost
    np.testing.assert_allclose(block_importance([1.0, 1.0], [1000.0, 3000.0], CFG), [1.5, 0.5], rtol=1e-9)


def test_mean_is_one() -> None:
    rng = np.random.default_rng(0)
    out = block_importance(rng.normal(size=24), rng.uniform(1e3, 1e6, size=24), CFG)
    assert out.mean() == pytest.approx(1.0) and np.all(out > 0)


@pytest.mark.parametrize("benefit", [[0.0, 0.0, 0.0], [-1.0, -0.2, -3.0], [0.0, -1.0, 0.0]])
def test_no_positive_benefit_falls_back_to_uniform(benefit: list[float]) -> None:
    np.testing.assert_array_equal(block_importance(benefit, [10.0, 20.0, 30.0], CFG), np.ones(3))


@pytest.mark.parametrize(
    ("benefit", "kept"),
    [
        ([1.0, 2.0], [1.0]),
        ([1.0, math.inf], [1.0, 1.0]),
        ([math.nan, math.nan], [1.0, 1.0]),
        ([], []),
        ([1.0], [-1.0]),
    ],
)
def test_bad_inputs_raise(benefit: list[float], kept: list[float]) -> None:
    with pytest.raises(ConfigError):
        block_importance(benefit, kept, CFG)


@pytest.mark.parametrize(
    "field", [{"scale": 0.0}, {"ema": 0.0}, {"ema": 1.5}, {"mix_cls": -0.1}, {"clamp_slope": math.nan}]
)
def test_config_rejects_out_of_range(field: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match=next(iter(field))):
        ImportanceConfig(**field)


CLS1, PATCH1 = np.array([1.0, 2.0, 3.0]), np.array([3.0, 1.0, 0.5])
CLS2, PATCH2 = np.array([2.0, 0.5, 1.0]), np.array([0.1, 0.2, 4.0])
KEPT = np.array([100.0, 200.0, 100.0])


def test_first_update_has_no_ema_and_mixes_half_half() -> None:
    out = ImportanceTracker().update(CLS1, PATCH1, KEPT)
    expected = 0.5 * block_importance(CLS1, KEPT, CFG) + 0.5 * block_importance(PATCH1, KEPT, CFG)
    np.testing.assert_allclose(out, expected, rtol=1e-12)


def test_second_update_applies_ema_per_probe_type() -> None:
    tracker = ImportanceTracker()
    tracker.update(CLS1, PATCH1, KEPT)
    out = tracker.update(CLS2, PATCH2, KEPT)
    g_cls = 0.2 * block_importance(CLS2, KEPT, CFG) + 0.8 * block_importance(CLS1, KEPT, CFG)
    g_patch = 0.2 * block_importance(PATCH2, KEPT, CFG) + 0.8 * block_importance(PATCH1, KEPT, CFG)
    np.testing.assert_allclose(out, 0.5 * g_cls + 0.5 * g_patch, rtol=1e-12)
    assert tracker.updates == 2


def test_without_class_token_uses_patch_only() -> None:
    tracker = ImportanceTracker()
    np.testing.assert_allclose(tracker.update(None, PATCH1, KEPT), block_importance(PATCH1, KEPT, CFG))
    expected = 0.2 * block_importance(PATCH2, KEPT, CFG) + 0.8 * block_importance(PATCH1, KEPT, CFG)
    np.testing.assert_allclose(tracker.update(None, PATCH2, KEPT), expected, rtol=1e-12)


def test_custom_mix_weight() -> None:
    out = ImportanceTracker(ImportanceConfig(mix_cls=1.0)).update(CLS1, PATCH1, KEPT)
    np.testing.assert_allclose(out, block_importance(CLS1, KEPT, CFG), rtol=1e-12)


def test_update_without_any_benefit_raises() -> None:
    with pytest.raises(ConfigError, match="no benefit"):
        ImportanceTracker().update(None, None, KEPT)


def test_block_count_must_not_change() -> None:
    tracker = ImportanceTracker()
    tracker.update(None, PATCH1, KEPT)
    with pytest.raises(ConfigError, match="block list"):
        tracker.update(None, np.ones(4), np.ones(4))


def test_state_dict_round_trips_through_json_and_resumes_identically() -> None:
    original = ImportanceTracker()
    original.update(CLS1, PATCH1, KEPT)
    resumed = ImportanceTracker()
    resumed.load_state_dict(json.loads(json.dumps(original.state_dict())))
    np.testing.assert_array_equal(resumed.update(CLS2, PATCH2, KEPT), original.update(CLS2, PATCH2, KEPT))
    assert resumed.updates == original.updates == 2


@pytest.mark.parametrize("state", [{}, {"prev": {"cls": "x"}, "updates": 1}, {"prev": {}, "updates": "a"}])
def test_malformed_state_raises_checkpoint_error(state: dict[str, object]) -> None:
    with pytest.raises(CheckpointError, match="state_dict"):
        ImportanceTracker().load_state_dict(state)


def test_blocks_without_a_probe_kind_stay_nan_and_the_rest_are_scored_among_themselves() -> None:
    """BlockwiseProbes: a block with no patch (or no class-token) probe reports NaN for that kind."""
    benefit = np.array([2.0, math.nan, 1.0])
    out = block_importance(benefit, KEPT, CFG)
    assert math.isnan(out[1])
    np.testing.assert_allclose(out[[0, 2]], block_importance([2.0, 1.0], KEPT[[0, 2]], CFG), rtol=1e-12)


def test_a_block_with_one_probe_kind_takes_that_kinds_importance() -> None:
    cls = np.array([math.nan, 1.0, 2.0])
    patch = np.array([0.5, 0.25, math.nan])
    tracker = ImportanceTracker()
    out = tracker.update(cls, patch, KEPT)
    g_cls, g_patch = block_importance(cls, KEPT, CFG), block_importance(patch, KEPT, CFG)
    np.testing.assert_allclose(out, [g_patch[0], 0.5 * g_cls[1] + 0.5 * g_patch[1], g_cls[2]], rtol=1e-12)
    restored = ImportanceTracker()
    restored.load_state_dict(json.loads(json.dumps(tracker.state_dict())))  # NaN travels as null
    np.testing.assert_allclose(
        restored.update(cls, patch, KEPT), tracker.update(cls, patch, KEPT), rtol=1e-12
    )


def test_a_block_without_any_probe_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"blocks \[1\] have no benefit from any probe"):
        ImportanceTracker().update(np.array([1.0, math.nan]), np.array([1.0, math.nan]), KEPT[:2])
