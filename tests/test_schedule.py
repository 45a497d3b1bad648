"""Section 5 of the method doc: phases, re-allocation steps, τ and the ramp, all in optimizer steps."""

from __future__ import annotations

import dataclasses
import json

import pytest

from p3b_fx.errors import ConfigError
from p3b_fx.schedule import Phase, Schedule

# 30 steps/epoch, 10 epochs, warm-up 1 epoch, full sparsity at epoch 5
SCHED = Schedule.from_epochs(30, 10, warmup_epochs=1, sparse_epochs=5)


def test_from_epochs_converts_to_steps() -> None:
    assert (SCHED.total_steps, SCHED.warmup_end, SCHED.sparse_end, SCHED.finalize) == (300, 30, 150, 300)
    assert SCHED.update_every == 10
    assert SCHED.tau0 == 0.1


@pytest.mark.parametrize(
    ("step", "phase"),
    [
        (0, Phase.WARMUP),
        (29, Phase.WARMUP),
        (30, Phase.SPARSIFY),
        (149, Phase.SPARSIFY),
        (150, Phase.SHARPEN),
        (299, Phase.SHARPEN),
        (300, Phase.FINALIZE),
        (400, Phase.FINALIZE),
    ],
)
def test_phases(step: int, phase: Phase) -> None:
    assert SCHED.phase(step) is phase


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, False),
        (20, False),
        (30, False),
        (40, True),
        (45, False),
        (50, True),
        (290, True),
        (299, False),
        (300, True),
        (310, False),
    ],
)
def test_update_steps(step: int, expected: bool) -> None:
    # first update one full window after the pruning start; the last one at finalize
    assert SCHED.is_update(step) is expected


def test_update_steps_lists_exactly_the_update_steps() -> None:
    listed = SCHED.update_steps()
    assert listed == tuple(s for s in range(SCHED.total_steps + 5) if SCHED.is_update(s))
    assert listed[0] == 40 and listed[-1] == 300 and len(listed) == 27


@pytest.mark.parametrize(
    ("step", "expected"), [(0, 0.1), (149, 0.1), (150, 0.1), (225, 0.05), (270, 0.02), (300, 0.0), (350, 0.0)]
)
def test_tau_is_constant_then_linear_to_zero(step: int, expected: float) -> None:
    assert SCHED.tau(step) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("step", "expected"), [(0, 0.0), (29, 0.0), (30, 1 / 120), (89, 0.5), (149, 1.0), (200, 1.0)]
)
def test_ramp_runs_from_pruning_start_to_sparse_end(step: int, expected: float) -> None:
    assert SCHED.ramp(step) == pytest.approx(expected)


def test_reference_schedule() -> None:
    ref = Schedule.reference(steps_per_epoch=2500)
    assert (ref.total_steps, ref.warmup_end, ref.sparse_end, ref.finalize) == (
        125_000,
        12_500,
        62_500,
        125_000,
    )
    assert ref.update_every == 833  # 3 per epoch
    assert ref.phase(12_499) is Phase.WARMUP and ref.phase(62_500) is Phase.SHARPEN


@pytest.mark.parametrize(
    ("steps_per_epoch", "epochs", "warmup", "sparse", "every"),
    [(10, 5, 5, 25, 1), (100, 10, 100, 500, 33), (300, 3, 90, 450, 30), (1, 1, 0, 0, 1), (2, 20, 4, 20, 1)],
)
def test_small_task_schedule(steps_per_epoch: int, epochs: int, warmup: int, sparse: int, every: int) -> None:
    s = Schedule.small_task(steps_per_epoch, epochs)
    assert (s.total_steps, s.warmup_end, s.sparse_end, s.finalize) == (
        steps_per_epoch * epochs,
        warmup,
        sparse,
        steps_per_epoch * epochs,
    )
    assert s.update_every == every
    assert s.update_every <= max(1, steps_per_epoch // 3)  # at least 3 updates per epoch
    assert s.update_every <= max(1, s.total_steps // 30)


def test_schedule_is_frozen_and_json_serialisable() -> None:
    assert Schedule(**json.loads(json.dumps(dataclasses.asdict(SCHED)))) == SCHED
    with pytest.raises(dataclasses.FrozenInstanceError):
        SCHED.tau0 = 0.2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"warmup_end": 200, "sparse_end": 100}, "warmup_end"),
        ({"finalize": 400}, "total_steps"),
        ({"warmup_end": 300, "sparse_end": 300}, "no pruning steps"),
        ({"update_every": 0}, "update_every"),
        ({"tau0": 0.0}, "tau0"),
        ({"sparse_end": 150.5}, "integers"),
    ],
)
def test_nonsense_schedules_raise(fields: dict[str, object], message: str) -> None:
    base: dict[str, object] = dataclasses.asdict(SCHED)
    base.update(fields)
    with pytest.raises(ConfigError, match=message):
        Schedule(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("args", [(0, 10, 1, 5), (30, 0, 0, 0), (30, 10, 6, 5), (30, 10, 1, 11)])
def test_from_epochs_rejects_nonsense(args: tuple[int, int, float, float]) -> None:
    with pytest.raises(ConfigError):
        Schedule.from_epochs(*args)


def test_negative_step_raises() -> None:
    with pytest.raises(ConfigError, match="step must be >= 0"):
        SCHED.phase(-1)
