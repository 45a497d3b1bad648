"""Gate scores inside a block (method doc §4): the squared first-order Taylor criterion.

Every prunable group has a multiplicative gate ``m`` (a 1-D float buffer). While scoring, the
training loop sets ``m.requires_grad_(True)``, so after ``loss.backward()`` the gate's ``.grad`` holds
``∂L/∂m`` for the task loss (only the task loss may reach the gates: the probes of
:mod:`p3b_fx.benefit` read detached features). :class:`TaylorAccumulator` turns each step's gradient
into the score of Molchanov et al. (CVPR 2019, "Importance Estimation for Neural Network Pruning")

    s_e = (m_e · ∂L/∂m_e)²

and averages it over the update window (the steps since the last keep-ratio update).

Batching, as in the reference: ``∂L/∂m_e`` is the gradient of the *batch* loss, i.e. the per-sample
contributions summed (or averaged, if the loss is a batch mean) over the batch *before* squaring;
the square of the per-batch gradient is what enters the window mean. With gradient accumulation over
micro-batches the accumulated gradient is squared once, after the last micro-batch. Per-sample
squares (Molchanov's "full" variant) would need per-sample gradients and are not offered.

This module knows nothing of torch.fx: it sees named 1-D tensors only. It also hosts
:func:`all_reduce_window`, the distributed sum shared with :class:`p3b_fx.benefit.BenefitAccumulator`.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from p3b_fx.errors import CheckpointError, TrainingError

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

logger = logging.getLogger(__name__)

__all__ = ["TaylorAccumulator", "all_reduce_window"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _collective_device(tensors: Sequence[torch.Tensor], group: ProcessGroup | None) -> torch.device:
    """NCCL reduces on the current CUDA device, gloo on the CPU; other backends on the data's device."""
    backend = str(dist.get_backend(group))
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo" or not tensors:
        return torch.device("cpu")
    return tensors[0].device


def _check_same_layout(layout: str, device: torch.device, group: ProcessGroup | None) -> None:
    """Fail on every rank (instead of hanging or mixing numbers) when ranks hold different layouts."""
    crc = float(zlib.crc32(layout.encode()))
    probe = torch.tensor([crc, -crc], dtype=torch.float64, device=device)
    dist.all_reduce(probe, op=dist.ReduceOp.MAX, group=group)
    if probe[0].item() != crc or -probe[1].item() != crc:
        raise TrainingError(
            "all_reduce_: the ranks accumulate statistics of different layouts "
            f"(this rank: {layout[:200]!r}); build the accumulators from the same model and groups "
            "on every rank"
        )


def all_reduce_window(
    tensors: Sequence[torch.Tensor], layout: str, group: ProcessGroup | None = None
) -> list[torch.Tensor] | None:
    """Sum ``tensors`` over the ranks of ``group`` in one collective; ``None`` when not distributed.

    ``layout`` describes names and sizes; it must be identical on every rank (checked first, with a
    tiny collective). The data travel as one float64 vector, which holds counts exactly up to 2**53.
    Returns new tensors with the original shapes, dtypes and devices. Every rank must call this.
    """
    if not _distributed():
        return None
    device = _collective_device(tensors, group)
    _check_same_layout(layout, device, group)
    pieces = [t.detach().to(device, torch.float64).reshape(-1) for t in tensors]
    flat = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.float64, device=device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    parts = torch.split(flat, [t.numel() for t in tensors])
    return [p.view(t.shape).to(t.device, t.dtype) for p, t in zip(parts, tensors, strict=True)]


class TaylorAccumulator:
    """Window sums of ``(m·∂L/∂m)²`` per gate group (float64), with per-group step counts.

    ``sizes`` (``{group name: gate length}``) fixes the groups up front; without it a group is
    registered the first time :meth:`accumulate` sees it. Sums live on the gates' device (no host
    sync per step); :meth:`scores` syncs once per window.
    """

    def __init__(self, sizes: Mapping[str, int] | None = None) -> None:
        self._fixed = sizes is not None
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, torch.Tensor] = {}
        self._segment_cache: dict[tuple[tuple[str, ...], torch.device], torch.Tensor] = {}
        for name, size in (sizes or {}).items():
            self._register(name, int(size), torch.device("cpu"))

    @property
    def names(self) -> tuple[str, ...]:
        """The registered group names, sorted."""
        return tuple(sorted(self._sums))

    def _register(self, name: str, size: int, device: torch.device) -> None:
        if size <= 0:
            raise TrainingError(
                f"TaylorAccumulator: gate group {name!r} has size {size}; gates must be 1-D, non-empty"
            )
        self._sums[name] = torch.zeros(size, dtype=torch.float64, device=device)
        self._counts[name] = torch.zeros((), dtype=torch.int64, device=device)

    def _slot(self, name: str, gate: torch.Tensor) -> None:
        """Make sure ``name`` is registered with ``gate``'s size and lives on its device."""
        if gate.dim() != 1:
            raise TrainingError(
                f"TaylorAccumulator: gate {name!r} has shape {tuple(gate.shape)}; gates must be 1-D"
            )
        if name not in self._sums:
            if self._fixed:
                raise TrainingError(
                    f"TaylorAccumulator: unknown gate group {name!r}; known groups: {list(self.names)[:8]}…; "
                    "pass every group in `sizes` when building the accumulator"
                )
            self._register(name, gate.numel(), gate.device)
        if self._sums[name].numel() != gate.numel():
            raise TrainingError(
                f"TaylorAccumulator: gate {name!r} has {gate.numel()} elements but was registered with "
                f"{self._sums[name].numel()}; rebuild the accumulator after changing the model"
            )
        if self._sums[name].device != gate.device:
            self._sums[name] = self._sums[name].to(gate.device)
            self._counts[name] = self._counts[name].to(gate.device)

    def accumulate(self, gates: Mapping[str, torch.Tensor], grad_scale: float | torch.Tensor = 1.0) -> None:
        """Add ``(m·g/grad_scale)²`` of every gate whose ``.grad`` is set, then set ``.grad`` to None.

        Gates without a gradient are skipped (not counted). A group whose score is not finite this
        step (an AMP overflow step) is skipped too. ``grad_scale`` is the loss scale in effect for the
        backward pass (1.0 without AMP loss scaling; a 0-d tensor, such as the GradScaler's own, saves
        a host sync). Resetting the grad to None (as ``zero_grad(set_to_none=True)`` does) means a step
        whose backward misses a gate is not counted.

        All groups are scored in one pass over their concatenation: a fixed number of kernels per
        step whatever the number of groups (a GPU step is bound by kernel launches), element for
        element the same arithmetic as scoring each group on its own.
        """
        named = [(name, gate) for name, gate in gates.items() if gate.grad is not None]
        if not named:
            return
        for name, gate in named:
            self._slot(name, gate)
        names = [name for name, _ in named]
        seg = self._segments(names, named[0][1].device)
        values = torch.cat([gate.detach().reshape(-1) for _, gate in named]).double()
        grads = torch.cat([gate.grad.detach().reshape(-1) for _, gate in named]).double()  # type: ignore[union-attr]
        if isinstance(grad_scale, torch.Tensor):
            grad_scale = grad_scale.detach().to(values.device, torch.float64)
        score = (values * grads / grad_scale).square()
        bad = torch.zeros(len(names), dtype=torch.float64, device=score.device)
        bad.index_add_(0, seg, (~torch.isfinite(score)).double())
        finite = bad == 0
        score = torch.where(finite[seg], score, torch.zeros_like(score))
        sizes = [self._sums[name].numel() for name in names]
        torch._foreach_add_([self._sums[n] for n in names], list(torch.split(score, sizes)))
        torch._foreach_add_([self._counts[n] for n in names], list(finite.to(torch.int64).unbind()))
        for _, gate in named:
            gate.grad = None

    def _segments(self, names: list[str], device: torch.device) -> torch.Tensor:
        """Group index of every element of the concatenated ``names`` (cached per order and device)."""
        key = (tuple(names), device)
        cached = self._segment_cache.get(key)
        if cached is None:
            sizes = torch.tensor([self._sums[name].numel() for name in names])
            cached = torch.repeat_interleave(torch.arange(len(names)), sizes).to(device)
            self._segment_cache = {key: cached}
        return cached

    def counts(self) -> dict[str, int]:
        """Steps counted per group in the current window (syncs with the device)."""
        return {name: int(self._counts[name].item()) for name in self.names}

    def scores(self) -> dict[str, np.ndarray]:
        """Window mean of the squared Taylor score per group (float64 arrays, one value per element)."""
        counts = self.counts()
        empty = [name for name, n in counts.items() if n == 0]
        if empty:
            raise TrainingError(
                "TaylorAccumulator.scores: no finite gate gradient was accumulated for "
                f"{len(empty)} group(s) since the last reset (e.g. {empty[:4]}); set requires_grad on "
                "the gates and call accumulate() after loss.backward() on training steps before asking "
                "for scores"
            )
        return {name: (self._sums[name] / counts[name]).cpu().numpy() for name in self.names}

    def reset(self) -> None:
        """Start a new window (keeps the registered groups and their devices)."""
        for name in self._sums:
            self._sums[name].zero_()
            self._counts[name].zero_()

    def state_dict(self) -> dict[str, Any]:
        """CPU copy of the window, for checkpoints."""
        return {
            "sums": {name: self._sums[name].detach().cpu().clone() for name in self.names},
            "counts": self.counts(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a window saved by :meth:`state_dict` (checked against the registered groups)."""
        try:
            sums = {str(k): torch.as_tensor(v, dtype=torch.float64) for k, v in state["sums"].items()}
            counts = {str(k): int(v) for k, v in state["counts"].items()}
        except (KeyError, AttributeError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"TaylorAccumulator.load_state_dict: malformed state ({exc!r}); expected the dict that "
                "state_dict() returns, with 'sums' and 'counts'"
            ) from exc
        if set(sums) != set(counts) or (self._fixed and set(sums) != set(self._sums)):
            raise CheckpointError(
                "TaylorAccumulator.load_state_dict: the checkpoint's gate groups do not match this model's "
                f"({len(sums)} saved, {len(self._sums)} here); resume with the model the checkpoint came from"
            )
        for name, saved in sums.items():
            here = self._sums.get(name)
            if here is not None and here.shape != saved.shape:
                raise CheckpointError(
                    f"TaylorAccumulator.load_state_dict: group {name!r} has {saved.numel()} saved scores but "
                    f"{here.numel()} gate elements here; resume with the model the checkpoint came from"
                )
            device = here.device if here is not None else torch.device("cpu")
            self._sums[name] = saved.to(device).reshape(-1).clone()
            self._counts[name] = torch.tensor(counts[name], dtype=torch.int64, device=device)
        logger.debug("Taylor window restored: %d groups", len(sums))

    def all_reduce_(self, group: ProcessGroup | None = None) -> None:
        """Sum the window's sums and counts over all ranks (no-op when torch.distributed is not set up)."""
        names = self.names
        layout = ";".join(f"{name}:{self._sums[name].numel()}" for name in names)
        tensors = [self._sums[n] for n in names] + [self._counts[n] for n in names]
        reduced = all_reduce_window(tensors, layout, group)
        if reduced is None:
            return
        for i, name in enumerate(names):
            self._sums[name] = reduced[i]
            self._counts[name] = reduced[len(names) + i]
