"""PNG plots of a pruning run (matplotlib, Agg backend: no display needed).

- ``keep_ratios.png``: heatmap of every block's kept share (blocks x updates) — shows reallocation;
- ``block_benefit.png``: the last window's block benefit ΔΨ per block (patch and class-token probes);
- ``accuracy.png``: test top-1 after every epoch (pruning, then fine-tuning).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

logger = logging.getLogger(__name__)


def keep_ratio_heatmap(
    path: Path, blocks: Sequence[str], history: Sequence[Mapping[str, Any]]
) -> Path | None:
    """Blocks x updates heatmap of the kept share of each block's dense cost."""
    if not history or not blocks:
        return None
    grid = np.array([h["keep_ratios"] for h in history], dtype=np.float64).T
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * grid.shape[1] + 2), max(3.0, 0.25 * len(blocks) + 1)))
    image = ax.imshow(grid, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(blocks)), labels=list(blocks), fontsize=6)
    ax.set_xlabel("update (step)")
    ax.set_xticks(range(len(history)), labels=[str(h["step"]) for h in history], fontsize=6, rotation=90)
    ax.set_title("kept share per block")
    fig.colorbar(image, ax=ax)
    return _save(fig, path)


def benefit_bars(path: Path, blocks: Sequence[str], history: Sequence[Mapping[str, Any]]) -> Path | None:
    """Last window's ΔΨ per block."""
    if not history or not blocks or history[-1].get("benefit_patch") is None:
        return None  # no history, or a uniform run (no probes)
    last = history[-1]
    x = np.arange(len(blocks))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.3 * len(blocks) + 2), 3.0))

    def values(key: str) -> np.ndarray:  # null: a block without that probe kind (no bar)
        return np.array([np.nan if v is None else v for v in last[key]], dtype=float)

    ax.bar(x - 0.2, values("benefit_patch"), width=0.4, label="patch probe")
    if last.get("benefit_cls") is not None:
        ax.bar(x + 0.2, values("benefit_cls"), width=0.4, label="class-token probe")
    ax.set_xticks(x, labels=list(blocks), fontsize=6, rotation=90)
    ax.set_ylabel("block benefit ΔΨ")
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.legend(fontsize=7)
    return _save(fig, path)


def accuracy_curve(path: Path, accuracy: Sequence[float]) -> Path | None:
    if not accuracy:
        return None
    fig, ax = plt.subplots(figsize=(4.5, 3.0))
    ax.plot(range(1, len(accuracy) + 1), [100 * a for a in accuracy], marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def write_all(
    out: Path, blocks: Sequence[str], history: Sequence[Mapping[str, Any]], accuracy: Sequence[float]
) -> list[Path]:
    """Every plot that has data; returns the files written."""
    made = [
        keep_ratio_heatmap(out / "keep_ratios.png", blocks, history),
        benefit_bars(out / "block_benefit.png", blocks, history),
        accuracy_curve(out / "accuracy.png", accuracy),
    ]
    return [p for p in made if p is not None]


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    logger.debug("wrote %s", path)
    return path
