"""When P3B prunes: phases, re-allocation steps, the ramp and the soft-mask temperature (section 5).

Pattern: optimizer step counts (total, pruning start, full-sparsity step, re-allocation period).
Result: a frozen :class:`Schedule` that answers, for any step, its phase, whether keep ratios and
masks are recomputed, the ramp r(t) and the temperature τ(t). Why: everything is in optimizer
steps so the same code serves ImageNet-scale runs (epochs) and tiny tasks (a few hundred steps).

Step convention: steps are 0 .. total_steps - 1; ``finalize == total_steps`` is the step index
right after the last optimizer step, where the last re-allocation and the hard masks happen.
An update at step s uses the statistics gathered over steps [s - update_every, s), so the first
update comes one full window after the pruning start (``warmup_end``), never on an empty window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from p3b_fx import budget
from p3b_fx.errors import ConfigError


class Phase(StrEnum):
    WARMUP = "warmup"  # plain fine-tuning; probes train; no accumulation, no masks
    SPARSIFY = "sparsify"  # keep ratios ramp from dense to the goal; τ = τ0
    SHARPEN = "sharpen"  # full goal sparsity; τ falls linearly to 0
    FINALIZE = "finalize"  # last re-allocation, hard masks, physical slicing


@dataclass(frozen=True)
class Schedule:
    """A P3B schedule in optimizer steps."""

    total_steps: int
    warmup_end: int  # pruning start: statistics are gathered from this step on
    sparse_end: int  # the goal sparsity is fully reached (ramp = 1) from this step on
    finalize: int  # last re-allocation and hard masks; normally == total_steps
    update_every: int  # steps between keep-ratio / mask re-allocations
    tau0: float = 0.1  # soft-mask temperature until sparse_end

    def __post_init__(self) -> None:
        ints = (self.total_steps, self.warmup_end, self.sparse_end, self.finalize, self.update_every)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints):
            raise ConfigError(f"schedule steps must be integers, got {self}")
        if not 0 <= self.warmup_end <= self.sparse_end <= self.finalize <= self.total_steps:
            raise ConfigError(
                f"schedule needs 0 <= warmup_end ({self.warmup_end}) <= sparse_end ({self.sparse_end}) "
                f"<= finalize ({self.finalize}) <= total_steps ({self.total_steps}); fix the epochs/steps"
            )
        if self.warmup_end >= self.finalize:
            raise ConfigError(
                f"the warm-up ({self.warmup_end} steps) leaves no pruning steps before finalize "
                f"({self.finalize}); shorten the warm-up or train longer"
            )
        if self.update_every < 1:
            raise ConfigError(f"update_every must be >= 1 step, got {self.update_every}")
        if not (math.isfinite(self.tau0) and self.tau0 > 0):
            raise ConfigError(f"tau0 must be a finite number > 0, got {self.tau0}")

    @classmethod
    def from_epochs(
        cls,
        steps_per_epoch: int,
        epochs: int,
        warmup_epochs: float,
        sparse_epochs: float,
        *,
        updates_per_epoch: int = 3,
        tau0: float = 0.1,
    ) -> Schedule:
        """Epoch boundaries -> steps; re-allocate at least ``updates_per_epoch`` times per epoch."""
        if steps_per_epoch < 1 or epochs < 1 or updates_per_epoch < 1:
            raise ConfigError(
                f"steps_per_epoch ({steps_per_epoch}), epochs ({epochs}) and updates_per_epoch "
                f"({updates_per_epoch}) must all be >= 1"
            )
        total = steps_per_epoch * epochs
        return cls(
            total_steps=total,
            warmup_end=round(steps_per_epoch * warmup_epochs),
            sparse_end=round(steps_per_epoch * sparse_epochs),
            finalize=total,
            update_every=max(1, steps_per_epoch // updates_per_epoch),
            tau0=tau0,
        )

    @classmethod
    def small_task(cls, steps_per_epoch: int, epochs: int) -> Schedule:
        """Scaled-down default: warm-up 10%, sparsify until 50%, sharpen until the end.

        Re-allocates at least 3 times per epoch and at least every max(1, total // 30) steps.
        """
        if steps_per_epoch < 1 or epochs < 1:
            raise ConfigError(f"steps_per_epoch ({steps_per_epoch}) and epochs ({epochs}) must be >= 1")
        total = steps_per_epoch * epochs
        every = max(1, min(steps_per_epoch // 3, total // 30))
        return cls(total, round(0.1 * total), round(0.5 * total), total, every)

    @classmethod
    def reference(cls, steps_per_epoch: int) -> Schedule:
        """The reference ImageNet-scale schedule: 50 epochs, warm-up 5, sparse at 25, 3 updates/epoch."""
        return cls.from_epochs(steps_per_epoch, epochs=50, warmup_epochs=5, sparse_epochs=25)

    def _check_step(self, step: int) -> None:
        if step < 0:
            raise ConfigError(f"step must be >= 0, got {step}")

    def phase(self, step: int) -> Phase:
        self._check_step(step)
        if step < self.warmup_end:
            return Phase.WARMUP
        if step < self.sparse_end:
            return Phase.SPARSIFY
        if step < self.finalize:
            return Phase.SHARPEN
        return Phase.FINALIZE

    def is_update(self, step: int) -> bool:
        """Re-allocate before ``step``: every ``update_every`` steps after the start, and at finalize."""
        self._check_step(step)
        if step == self.finalize:
            return True
        since = step - self.warmup_end
        return self.warmup_end < step < self.finalize and since % self.update_every == 0

    def update_steps(self) -> tuple[int, ...]:
        """Every step at which :meth:`is_update` is True, in order (the last one is ``finalize``)."""
        regular = range(self.warmup_end + self.update_every, self.finalize, self.update_every)
        return (*regular, self.finalize)

    def tau(self, step: int) -> float:
        """τ0 until sparse_end, then linear to 0 at finalize (a step-function mask)."""
        self._check_step(step)
        if step < self.sparse_end:
            return self.tau0
        if step >= self.finalize:
            return 0.0
        return self.tau0 * (self.finalize - step) / (self.finalize - self.sparse_end)

    def ramp(self, step: int) -> float:
        """Share of the goal sparsity applied at ``step`` (:func:`p3b_fx.budget.ramp`)."""
        self._check_step(step)
        return budget.ramp(step, self.warmup_end, self.sparse_end)
