"""Data-parallel P3B under torchrun: process group, sharded data, DDP, rank-0 I/O, plan agreement.

Pattern: ``torchrun --nproc_per_node=N tools/prune.py …`` starts N copies of one run; each finds its
place from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
Result: one data-parallel run. Every rank trains the same masked model on its shard of every global
batch (:class:`~torch.utils.data.distributed.DistributedSampler`), DDP averages the gradients, the
gate gradients and every statistic P3B decides from are summed over the ranks before an update, so
every rank derives the same keep plan — checked by hash after each update. Rank 0 alone writes files.
Why here: the training loop keeps one code path. Without an initialised process group every
function below is a no-op (or runs its argument directly), so a single-process run is unchanged.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.distributed import DistributedSampler

from p3b_fx import errors
from p3b_fx.errors import ConfigError, P3BError, TrainingError

logger = logging.getLogger(__name__)

__all__ = [
    "DistContext", "ShardSampler", "average_gradients", "barrier", "check_same", "check_same_options",
    "check_same_plan", "gather_objects", "init_from_env", "is_active", "is_main_process", "max_over_ranks",
    "on_every_rank", "on_main", "plan_digest", "rank", "rank_device", "session", "set_epoch",
    "shard_loaders", "sum_over_ranks", "world_size", "wrap",
]  # fmt: skip

T = TypeVar("T")

_COMM_FAILURE_HINTS = (
    "connection closed",
    "connection reset",
    "broken pipe",
    "timed out waiting",
    "gloo",
    "nccl",
)
"""Substrings of the RuntimeErrors gloo raises when a peer died or stalled (NCCL raises DistError)."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands. ``owned``: this run created the process group and destroys it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    owned: bool = False

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# --- process group ---------------------------------------------------------------------------------------


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(
            f"environment variable {name}={raw!r} is not an integer; torchrun sets it: start the run "
            "with torchrun, or unset it for a single-process run"
        ) from exc


def env_ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) outside torchrun."""
    world = _env_int("WORLD_SIZE", 1)
    if world == 1:
        return 0, 1, 0  # a stray RANK without WORLD_SIZE > 1 does not make a distributed run
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(
            f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}; "
            "start the run with torchrun (it sets them), or unset them for a single-process run"
        )
    return rank, world, local


def backend_for(device: str) -> str:
    """NCCL when the run trains on CUDA GPUs, gloo on the CPU."""
    wants_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if not wants_cuda:
        return "gloo"
    if not torch.cuda.is_available():
        raise ConfigError(
            f"--device {device} under torchrun, but CUDA is not available here; use --device cpu"
        )
    if not dist.is_nccl_available():
        raise ConfigError("this torch build has no NCCL; multi-GPU runs need it (or use --device cpu: gloo)")
    return "nccl"


def init_from_env(device: str, timeout_minutes: float) -> DistContext:
    """Join the process group torchrun describes (or reuse one already initialised)."""
    if dist.is_available() and dist.is_initialized():
        r = dist.get_rank()
        return DistContext(r, dist.get_world_size(), _env_int("LOCAL_RANK", r), str(dist.get_backend()))
    r, world, local = env_ranks()
    if world == 1:
        return DistContext()
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} but {', '.join(missing)} unset; start the run with torchrun")
    backend = backend_for(device)
    device_id = None
    if backend == "nccl":
        device_id = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device_id)
    try:
        dist.init_process_group(
            backend, rank=r, world_size=world, timeout=timedelta(minutes=timeout_minutes), device_id=device_id
        )
    except (RuntimeError, ValueError) as exc:
        raise TrainingError(
            f"rank {r} of {world}: cannot join the process group at {os.environ['MASTER_ADDR']}:"
            f"{os.environ['MASTER_PORT']} ({exc}); check that every node uses the same rendezvous endpoint "
            "and that its port is open"
        ) from exc
    logger.info("rank %d of %d (local rank %d) joined the %s process group", r, world, local, backend)
    return DistContext(r, world, local, backend, owned=True)


def _is_comm_failure(exc: BaseException) -> bool:
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(hint in text for hint in _COMM_FAILURE_HINTS)


@contextmanager
def session(device: str, timeout_minutes: float, out: str) -> Iterator[DistContext]:
    """The process group for one run: joined on entry, destroyed on exit if this run created it.

    A collective that fails because another rank died or stalled longer than the timeout becomes a
    :class:`TrainingError` that says so and points at the last complete checkpoint in ``out``.
    """
    ctx = init_from_env(device, timeout_minutes)
    try:
        yield ctx
    except RuntimeError as exc:
        if not ctx.enabled or not _is_comm_failure(exc):
            raise
        raise TrainingError(
            f"rank {ctx.rank} of {ctx.world_size} lost contact with the other ranks: another rank died or "
            f"stalled for longer than --dist-timeout {timeout_minutes:g} min ({type(exc).__name__}: "
            f"{str(exc)[:300]}). Look for the first error in the other ranks' output. {out}/checkpoint.pt, "
            "if present, is the last complete checkpoint (written atomically after each epoch): fix the "
            "cause and rerun the same command with --resume"
        ) from exc
    finally:
        if ctx.owned and dist.is_initialized():
            dist.destroy_process_group()


def is_active() -> bool:
    """True when a process group is initialised (this process is one rank of a distributed run)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank; without a group, torchrun's RANK (only when WORLD_SIZE > 1), else 0."""
    if is_active():
        return dist.get_rank()
    return _env_int("RANK", 0) if _env_int("WORLD_SIZE", 1) > 1 else 0


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def is_main_process() -> bool:
    """Rank 0 (or a single process). After the group is gone, the launcher's RANK still tells."""
    return rank() == 0


def rank_device(device: torch.device) -> torch.device:
    """Under NCCL every rank trains on its own GPU (cuda:LOCAL_RANK modulo the visible GPUs)."""
    if not is_active() or device.type != "cuda":
        return device
    own = torch.device("cuda", torch.cuda.current_device())
    if device.index is not None and device.index != own.index:
        logger.warning("--device %s ignored under torchrun: rank %d trains on %s", device, rank(), own)
    return own


def _collective_device() -> torch.device:
    if str(dist.get_backend()) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --- collectives ---------------------------------------------------------------------------------------


def barrier() -> None:
    if is_active():
        dist.barrier()


def sum_over_ranks(values: Sequence[float]) -> list[float]:
    """Element-wise sum over the ranks (float64: counts stay exact); the values themselves alone."""
    if not is_active():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.tolist()]


def max_over_ranks(value: float) -> float:
    if not is_active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if not is_active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def average_gradients(tensors: Sequence[torch.Tensor]) -> None:
    """Replace every tensor's ``.grad`` by its mean over the ranks, in one collective (as DDP does).

    For leaf tensors DDP does not see (P3B's gate buffers): the Taylor score then squares the
    gradient of the *global* batch, exactly as one process with the global batch would. A missing
    ``.grad`` counts as zeros, so every rank sends the same layout.
    """
    if not is_active() or not tensors:
        return
    device = _collective_device()
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in tensors]
    flat = torch.cat([g.detach().reshape(-1).to(device, torch.float32) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    for t, part in zip(tensors, torch.split(flat, [g.numel() for g in grads]), strict=True):
        t.grad = part.view_as(t).to(t.device, t.dtype)


def _reraise_shared(error: P3BError | None, what: str) -> None:
    """Raise on every rank when ``what`` failed on any rank (so no rank waits for it forever)."""
    report = None if error is None else (type(error).__name__, str(error))
    reports = gather_objects(report)
    failed = [(r, rep) for r, rep in enumerate(reports) if rep is not None]
    if not failed:
        return
    if error is not None:
        raise error
    first, (name, message) = failed[0]
    cls = getattr(errors, name, TrainingError)
    cls = cls if isinstance(cls, type) and issubclass(cls, P3BError) else TrainingError
    raise cls(f"{what} failed on rank {first}: {message}")


def on_main(fn: Callable[[], T], what: str) -> T | None:
    """Run ``fn`` on rank 0 only (``None`` elsewhere); a :class:`P3BError` there is raised on every rank."""
    if not is_active():
        return fn()
    if dist.get_rank() != 0:
        _reraise_shared(None, what)
        return None
    return on_every_rank(fn, what)


def on_every_rank(fn: Callable[[], T], what: str) -> T:
    """Run ``fn`` on every rank; a :class:`P3BError` on any rank is raised on every rank."""
    if not is_active():
        return fn()
    try:
        result = fn()
    except P3BError as exc:
        _reraise_shared(exc, what)
        raise  # _reraise_shared raised it already
    _reraise_shared(None, what)
    return result


# --- agreement checks -------------------------------------------------------------------------------------


def plan_digest(gates: Mapping[str, torch.Tensor], kept: Mapping[str, int]) -> str:
    """SHA-256 of the gate values (float32 bytes, by group name) and the kept sizes."""
    h = hashlib.sha256()
    for name in sorted(gates):
        h.update(name.encode())
        h.update(gates[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    h.update(json.dumps(sorted((str(k), int(v)) for k, v in kept.items())).encode())
    return h.hexdigest()


def check_same(digest: str, what: str, hint: str) -> None:
    """Compare every rank's ``digest`` with rank 0's; TrainingError on every rank if any differs."""
    digests = gather_objects(digest)
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise TrainingError(
            f"{what} diverged across ranks: rank(s) {differ[:8]} differ from rank 0 (hash "
            f"{digests[0][:12]} on rank 0, {digests[differ[0]][:12]} on rank {differ[0]}). {hint}"
        )


def check_same_options(options: Mapping[str, Any]) -> None:
    """Before any work: every rank must run with the same options (no-op in a single process)."""
    if not is_active():
        return
    text = json.dumps(dict(options), sort_keys=True, default=str)
    check_same(
        hashlib.sha256(text.encode()).hexdigest(),
        "the run options",
        "Start every rank with the same command line and config file",
    )


def check_same_plan(gates: Mapping[str, torch.Tensor], kept: Mapping[str, int], where: str) -> None:
    """After an update: every rank must hold the same gates and kept sizes (no-op in a single process)."""
    if not is_active():
        return
    check_same(
        plan_digest(gates, kept),
        f"the keep plan ({where})",
        "Every rank derives it from the same all-reduced statistics, so the ranks ran different code, "
        "options or library versions, or the allocation is not deterministic. The last complete "
        "checkpoint is kept: make the ranks identical and rerun with --resume",
    )


# --- data ---------------------------------------------------------------------------------------------------


class ShardSampler(Sampler[int]):
    """Evaluation shard: rank r reads samples r, r+W, r+2W, … — no padding, every sample counted once."""

    def __init__(self, size: int, num_replicas: int, shard: int) -> None:
        super().__init__()
        self.size, self.num_replicas, self.shard = size, num_replicas, shard

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.shard, self.size, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.shard, self.size, self.num_replicas))


def _reload(loader: DataLoader[Any], sampler: Sampler[int]) -> DataLoader[Any]:
    if loader.batch_size is None:
        raise ConfigError("distributed runs need loaders with a batch_size (not a custom batch_sampler)")
    return DataLoader(
        loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
        collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
        persistent_workers=loader.persistent_workers, worker_init_fn=loader.worker_init_fn,
    )  # fmt: skip


def shard_loaders(
    loaders: tuple[DataLoader[Any], DataLoader[Any]], seed: int
) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """Per-rank loaders: training through a seeded DistributedSampler, evaluation through a ShardSampler.

    DistributedSampler gives rank r the samples r, r+W, … of each epoch's permutation, so the ranks'
    k-th batches together are exactly the k-th slice of batch × W of that permutation: the global
    batch one process with batch × W and the same sampler would see. Unchanged without a group.
    """
    if not is_active():
        return loaders
    w, r = dist.get_world_size(), dist.get_rank()
    train, test = loaders
    sampler: DistributedSampler[Any] = DistributedSampler(
        train.dataset, num_replicas=w, rank=r, shuffle=True, seed=seed
    )
    return _reload(train, sampler), _reload(test, ShardSampler(len(test.dataset), w, r))  # type: ignore[arg-type]


def set_epoch(loader: DataLoader[Any], epoch: int) -> None:
    """Tell a DistributedSampler which epoch starts (its permutation is seeded with seed + epoch)."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)


# --- models ----------------------------------------------------------------------------------------------


# torch 2.14 names it forward_sync_buffers and still accepts broadcast_buffers; torch ≤ 2.11 (the image on
# the GPU machines this was checked on) knows only broadcast_buffers
_NO_BUFFER_SYNC = (
    "forward_sync_buffers"
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else "broadcast_buffers"
)


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """DDP around ``module`` when distributed (the module itself otherwise).

    ``forward_sync_buffers=False`` (the older spelling: ``broadcast_buffers=False``): buffers are
    synchronised once, at construction, never again per forward. P3B's gates are buffers that every
    rank sets to identical values at each update (checked by :func:`check_same_plan`); re-broadcasting
    rank 0's copy every step would be wasted traffic and would hide a divergence instead of failing.
    """
    if not is_active() or not any(p.requires_grad for p in module.parameters()):
        return module
    ids = [device.index] if device.type == "cuda" else None
    no_sync: dict[str, Any] = {_NO_BUFFER_SYNC: False}
    return DistributedDataParallel(module, device_ids=ids, **no_sync)
