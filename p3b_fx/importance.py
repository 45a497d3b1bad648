"""Block benefit -> block importance (P3B method doc, section 2).

Pattern: per-block mean benefit ΔΨ_i of one probe type (class-token or patch probe), measured over
the window since the last keep-ratio update, plus the blocks' currently kept costs.
Result: one importance per block, mean 1, that the water-filling of :mod:`p3b_fx.budget` turns into
keep ratios. Why: a block that helps the task more *per kept parameter* deserves more of the budget;
the soft clamp stops one dominant block from taking everything, the EMA smooths noisy windows.

Pure numpy; knows nothing of torch.fx or of the probes themselves.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from p3b_fx.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]

PARAM_EPS = 1e-6
"""Added to the kept cost in step 4 so a block with nothing kept does not divide by zero."""

PROBE_TYPES = ("cls", "patch")


@dataclass(frozen=True)
class ImportanceConfig:
    """Constants of section 2 (the reference code's values are the defaults)."""

    scale: float = 10.0
    """S, step 2-3: the best block is rescaled to S and every score is soft-clamped into (0, S)."""
    clamp_slope: float = 1.4
    """Step 3: slope of the soft clamp g = softplus(slope·a) - softplus(slope·a - S)."""
    ema: float = 0.2
    """Step 6: weight of the new importance, g <- ema·g_new + (1 - ema)·g_prev (not at the first update)."""
    mix_cls: float = 0.5
    """Step 7: I = mix_cls·g_cls + (1 - mix_cls)·g_patch (patch only when the model has no class token)."""

    def __post_init__(self) -> None:
        checks = {
            "scale": self.scale > 0,
            "clamp_slope": self.clamp_slope > 0,
            "ema": 0 < self.ema <= 1,
            "mix_cls": 0 <= self.mix_cls <= 1,
        }
        for name, ok in checks.items():
            value = getattr(self, name)
            if not ok or not math.isfinite(value):
                raise ConfigError(
                    f"ImportanceConfig.{name}={value!r} is out of range "
                    "(scale, clamp_slope > 0; ema in (0, 1]; mix_cls in [0, 1]); fix the config value"
                )


def _as_vector(values: Any, what: str, n: int | None = None, *, allow_nan: bool = False) -> FloatArray:
    """A finite float vector; ``allow_nan``: NaN (or None) marks a block without this probe kind."""
    if allow_nan and isinstance(values, (list, tuple)):
        values = [np.nan if v is None else v for v in values]
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ConfigError(
            f"{what} must be a non-empty 1-D array (one value per block), got shape {arr.shape}"
        )
    if n is not None and arr.size != n:
        raise ConfigError(f"{what} has {arr.size} entries but there are {n} blocks; pass one per block")
    bad = np.isinf(arr) if allow_nan else ~np.isfinite(arr)
    if np.any(bad) or np.all(np.isnan(arr)):
        raise ConfigError(
            f"{what} contains {'inf' if allow_nan else 'NaN or inf'} at blocks {np.flatnonzero(bad).tolist()}"
            + (" or no number at all" if allow_nan else "")
        )
    return arr


def soft_clamp(a: FloatArray, scale: float, slope: float) -> FloatArray:
    """Step 3: g = softplus(slope·a) - softplus(slope·a - S), a smooth clamp into (0, S)."""
    x = slope * a
    return np.asarray(np.logaddexp(0.0, x) - np.logaddexp(0.0, x - scale), dtype=np.float64)


def block_importance(benefit: npt.ArrayLike, kept_params: npt.ArrayLike, cfg: ImportanceConfig) -> FloatArray:
    """Steps 1-5 of section 2 for one probe type: mean-1 importance per block.

    ``benefit``: mean ΔΨ_i over the window (step 1 is the caller's averaging). ``kept_params``: the
    block's currently kept cost (hard masks). If no block has a positive benefit the max-rescale
    is undefined; the importance then falls back to uniform (all ones), which the reference lacks.
    A NaN benefit marks a block without a probe of this kind: it stays NaN, and the mean-1 scaling
    runs over the measured blocks.
    """
    a = _as_vector(benefit, "benefit", allow_nan=True)
    kept = _as_vector(kept_params, "kept_params", a.size)
    if np.any(kept < 0):
        raise ConfigError(
            f"kept_params must be >= 0, got negative values at {np.flatnonzero(kept < 0).tolist()}"
        )
    measured = ~np.isnan(a)
    if not measured.all():  # blocks without this probe kind: NaN; the rest are scored among themselves
        out = np.full_like(a, np.nan)
        out[measured] = block_importance(a[measured], kept[measured], cfg)
        return out
    best = float(a.max())
    if best <= 0.0:
        log.warning("no block has a positive benefit (max %.4g); using uniform importance", best)
        return np.ones_like(a)
    a = cfg.scale * a / best
    g = soft_clamp(a, cfg.scale, cfg.clamp_slope)
    g = g / (kept + PARAM_EPS)
    return np.asarray(g / g.mean(), dtype=np.float64)


class ImportanceTracker:
    """Steps 6-7: EMA per probe type across updates, then the class/patch mix.

    State is the previous importance per probe type; ``state_dict`` is plain JSON for resume.
    """

    def __init__(self, cfg: ImportanceConfig | None = None) -> None:
        self.cfg = cfg if cfg is not None else ImportanceConfig()
        self._prev: dict[str, FloatArray | None] = dict.fromkeys(PROBE_TYPES)
        self.updates = 0

    def update(
        self,
        benefit_cls: npt.ArrayLike | None,
        benefit_patch: npt.ArrayLike | None,
        kept_params: npt.ArrayLike,
    ) -> FloatArray:
        """New importance I (mean 1) from this window's benefits; ``benefit_cls`` None: patch only."""
        if benefit_cls is None and benefit_patch is None:
            raise ConfigError(
                "ImportanceTracker.update got no benefit at all; pass at least the patch probe's"
            )
        current: dict[str, FloatArray] = {}
        for probe, benefit in zip(PROBE_TYPES, (benefit_cls, benefit_patch), strict=True):
            if benefit is not None:
                current[probe] = self._smoothed(probe, block_importance(benefit, kept_params, self.cfg))
        self._prev.update(current)
        self.updates += 1
        if len(current) == 1:
            mixed = next(iter(current.values()))
        else:
            w = self.cfg.mix_cls
            mixed = np.asarray(w * current["cls"] + (1.0 - w) * current["patch"], dtype=np.float64)
            # a block with one probe kind only (BlockwiseProbes) takes that kind's importance
            mixed = np.where(np.isnan(current["cls"]), current["patch"], mixed)
            mixed = np.where(np.isnan(current["patch"]), current["cls"], mixed)
        if np.isnan(mixed).any():
            raise ConfigError(
                f"blocks {np.flatnonzero(np.isnan(mixed)).tolist()} have no benefit from any probe; every "
                "block needs a class-token or a patch probe"
            )
        return mixed

    def _smoothed(self, probe: str, g_new: FloatArray) -> FloatArray:
        prev = self._prev[probe]
        if prev is None:
            return g_new
        if prev.shape != g_new.shape:
            raise ConfigError(
                f"the {probe} importance had {prev.size} blocks at the last update and {g_new.size} now; "
                "the block list must not change during a run"
            )
        return np.asarray(self.cfg.ema * g_new + (1.0 - self.cfg.ema) * prev, dtype=np.float64)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: previous importance per probe type and the update count."""
        prev = {
            k: (None if v is None else [None if math.isnan(x) else float(x) for x in v])
            for k, v in self._prev.items()
        }
        return {"prev": prev, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            prev = state["prev"]
            loaded = {
                k: (None if prev.get(k) is None else _as_vector(prev[k], f"prev[{k}]", allow_nan=True))
                for k in PROBE_TYPES
            }
            updates = int(state["updates"])
        except (KeyError, TypeError, AttributeError, ValueError, ConfigError) as exc:
            raise CheckpointError(
                f"importance tracker state is malformed ({exc}); expected the dict written by state_dict()"
            ) from exc
        self._prev = loaded
        self.updates = updates
