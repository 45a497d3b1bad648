"""The P3B training loop (method doc §1-§5) and the library entry point :func:`run`.

One run: load the model and data, trace it, find its groups, insert masks and feature taps, then
fine-tune while pruning: the probes measure every block's benefit on the taps' features, the gates
collect Taylor scores, and at every scheduled update the benefits become keep ratios under one
global budget and the Taylor scores become fresh soft masks. At the end the masks become a hard
keep plan, the model is physically slimmed (checked against the hard-masked model), fine-tuned and
evaluated. Baselines (dense, uniform, torch-pruning's global criteria) run through the same data,
epochs and budget. Everything lands in the output directory: ``log.jsonl``, ``checkpoint.pt``
(every epoch, atomic), ``plan.json``, ``slim.pt``, plots and ``report.json``.

Under torchrun the same code runs data-parallel (:mod:`p3b_fx.distributed`): sharded data, DDP
around the masked model and the probes, statistics all-reduced before every update, the plan
checked identical on every rank, files written by rank 0 only. Without torchrun nothing changes.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.profiler import record_function
from torch.utils.data import DataLoader
from tqdm import tqdm

import p3b_fx
from p3b_fx import budget as budget_mod
from p3b_fx import data as data_mod
from p3b_fx import distributed
from p3b_fx.allocate import GateSpec, GateType, allocate_block
from p3b_fx.benefit import BenefitAccumulator, BenefitProbes, BlockLayout, BlockwiseProbes
from p3b_fx.config import SOURCE_MODEL, PruneConfig
from p3b_fx.core.groups import ROLE_ORDER, Block, BlockKind, GroupSet, Role
from p3b_fx.core.io import atomic_write_text
from p3b_fx.core.masks import MaskBank
from p3b_fx.core.meta import INPUT_SHAPE
from p3b_fx.core.pass_infra import known_shape
from p3b_fx.core.plan import KeepPlan
from p3b_fx.criteria import TaylorAccumulator
from p3b_fx.errors import CheckpointError, ConfigError, DataError, TrainingError
from p3b_fx.importance import ImportanceTracker
from p3b_fx.schedule import Schedule
from p3b_fx.tracing import default_input_shape
from passes.insert_taps import FeatureTaps, InsertTapsPass, feature_taps, tap_points

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]
Loaders = tuple[DataLoader[Any], DataLoader[Any]]

RUN_FILES = ("run.json", "checkpoint.pt", "finetune.pt", "log.jsonl", "report.json", "plan.json", "slim.pt",
             "dense.pt")  # fmt: skip
"""Files a run writes; an output directory holding any of them belongs to another run."""

SLIM_TOLERANCE = 1e-4
"""Max abs difference allowed between the slim and the hard-masked model on a test batch."""

BUDGET_TOLERANCE = 0.01
"""Relative distance between the final parameter count and the budget reported as 'met'."""

REALLOCATE_TOLERANCE = 0.002
"""A keep-ratio update whose blocks miss their target cost by more than this share of the blocks'
dense cost allocates once more, with the miss carried from the start (``Pruner.allocate``). Well
under :data:`BUDGET_TOLERANCE`, so updates that came within it of their targets allocate as before."""

_GATE_TYPES: Mapping[tuple[BlockKind, Role], GateType] = {
    (BlockKind.ATTENTION, Role.READ): GateType.ATTN_IN,
    (BlockKind.ATTENTION, Role.HEADS): GateType.ATTN_HEADS,
    (BlockKind.ATTENTION, Role.HEAD_DIM): GateType.ATTN_HEAD_DIM,
    (BlockKind.ATTENTION, Role.WRITE): GateType.ATTN_OUT,
    (BlockKind.ATTENTION, Role.HIDDEN): GateType.MLP_HIDDEN,  # a linear's outputs inside attention
    (BlockKind.MLP, Role.READ): GateType.MLP_IN,
    (BlockKind.MLP, Role.HEAD_DIM): GateType.ATTN_HEAD_DIM,  # contracted (SwiftFormer's additive attention)
    (BlockKind.MLP, Role.HIDDEN): GateType.MLP_HIDDEN,
    (BlockKind.MLP, Role.WRITE): GateType.MLP_OUT,
}
"""The in-block criterion's gate type of each (block kind, group role) that a granularity prunes.
Hidden neurons in an attention block are the outputs of a linear between its first and last (EdgeNeXt
runs an MLP inside its attention's residual branch); a contracted index in an MLP block is one that
meets a parameter vector (SwiftFormer's additive attention has no product of two activations)."""
_GRANULARITY_ROLES: Mapping[str, frozenset[Role]] = {
    "reference": frozenset({Role.READ, Role.HEAD_DIM, Role.WRITE, Role.HIDDEN}),
    "deploy": frozenset({Role.HEADS, Role.HIDDEN}),
}


# --- output directory and small I/O helpers ---------------------------------------------------------


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a temporary file and a rename: a crash never leaves half a file. A
    failed write (a full disk: torch raises ``RuntimeError: ... PytorchStreamWriter failed writing
    file``) removes the temporary file, keeps the previous ``path``, and says what to do."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        tmp.unlink(missing_ok=True)
        kept = "the previous one is kept" if path.exists() else "nothing was written"
        raise CheckpointError(
            f"cannot write {path} ({kept}): {str(exc).strip().splitlines()[-1][:200]}; free some disk space "
            "(or choose another --out) and rerun with --resume"
        ) from exc


PLOT_FILES = ("accuracy.png", "block_benefit.png", "keep_ratios.png")
"""The plots a run draws; removed with the run files by ``--force``."""


def check_out_dir(cfg: PruneConfig) -> list[Path]:
    """Refuse an unusable ``--out`` before anything is loaded; the files ``--force`` will replace.

    Nothing is deleted here: :func:`clear_out_dir` does that once every other check has passed, so a
    run that fails on bad input leaves the old run where it was.
    """
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a directory; choose another --out")
    existing = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write the output directory {out}: {existing} is not a writable directory; "
                          "choose another --out")  # fmt: skip
    taken = [name for name in RUN_FILES if (out / name).exists()]
    stopped_early = bool(taken) and not {"checkpoint.pt", "finetune.pt", "report.json"} & set(taken)
    if cfg.resume:
        if not (out / "checkpoint.pt").is_file():
            hint = (
                "that run stopped before its first epoch checkpoint, so there is nothing to resume; start "
                "it again with --force"
                if stopped_early
                else "start a fresh run without --resume"
            )
            raise CheckpointError(f"--resume: {out}/checkpoint.pt does not exist; {hint}")
        return []
    if taken and not cfg.force:
        if stopped_early:
            what, todo = (
                "a run that stopped before its first epoch checkpoint",
                "pass --force to start it again",
            )
        else:
            what, todo = "a run", "pass --resume to continue it, --force to overwrite it"
        files = ", ".join(taken)
        raise ConfigError(f"output directory {out} already holds {what} ({files}); {todo}, or another --out")
    return [out / name for name in (*RUN_FILES, *PLOT_FILES) if (out / name).exists()]


def clear_out_dir(cfg: PruneConfig, replaced: Sequence[Path]) -> Path:
    """Create ``--out`` and remove the files of the run ``--force`` replaces (after every check)."""
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for path in replaced:
            path.unlink(missing_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot prepare the output directory {out}: {exc}; choose another --out") from exc
    if replaced:
        logger.warning("--force: removed %s from %s", ", ".join(p.name for p in replaced), out)
    return out


def unreadable_checkpoint(path: Path, exc: BaseException) -> CheckpointError:
    """The error for a checkpoint that does not load: most likely cut short or from another version."""
    return CheckpointError(
        f"cannot resume from {path} ({type(exc).__name__}: {exc}): the file is corrupt, cut short or not a "
        "p3b-fx checkpoint; start the run again with --force (the other runs' files are not touched)"
    )


def interrupted_hint(out: str | Path) -> str:
    """What to tell a user who stopped a run in ``out`` (Ctrl-C): resume, or start again."""
    out = Path(out)
    if (out / "checkpoint.pt").is_file():
        return f"the last epoch checkpoint in {out} is kept; continue with --resume"
    return f"stopped before the first epoch checkpoint: nothing in {out} to resume; start again with --force"


def append_log(out: Path, record: Mapping[str, Any]) -> None:
    with (out / "log.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def log_lines(out: Path) -> int:
    """Records in ``out/log.jsonl`` now; a checkpoint stores it so a resume can drop what came after."""
    path = out / "log.jsonl"
    if not path.is_file():
        return 0
    with path.open("rb") as fh:
        return sum(1 for _ in fh)


def trim_log(out: Path, lines: int | None) -> None:
    """Keep the first ``lines`` records: the steps after the checkpoint being resumed run (and log) again."""
    path = out / "log.jsonl"
    if lines is None or not path.is_file() or not distributed.is_main_process():
        return
    kept = path.read_text(encoding="utf-8").splitlines(keepends=True)
    if len(kept) > lines:
        atomic_write_text(path, "".join(kept[:lines]))


# --- model and data ---------------------------------------------------------------------------------


def read_weights(path: Path, flag: str = "--checkpoint") -> dict[str, torch.Tensor]:
    """A state_dict from a safetensors or torch file; CheckpointError naming ``flag`` when it is not one."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the {flag} path")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file  # noqa: PLC0415 - only for this format

            return dict(load_file(str(path)))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors/pickle raise many types for corrupt files
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a weights file ({type(exc).__name__}: {exc}); "
            "pass a safetensors file or a torch state_dict"
        ) from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} does not hold a state_dict of tensors")
    return state


def _load_weights(model: nn.Module, path: Path) -> None:
    state = read_weights(path)
    head = getattr(model, "head", None)
    saved_head = state.get("head.weight")
    if isinstance(head, nn.Linear) and saved_head is not None and saved_head.shape[0] != head.out_features:
        model.reset_classifier(int(saved_head.shape[0]))  # type: ignore[operator]
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    reshaped = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        parts = [f"{len(names)} {what} (e.g. {', '.join(names[:3])})"
                 for names, what in ((missing, "missing"), (unexpected, "unexpected")) if names]  # fmt: skip
        if reshaped:
            k = reshaped[0]
            parts.append(f"{len(reshaped)} of another shape (e.g. {k}: {tuple(state[k].shape)} saved, "
                         f"{tuple(own[k].shape)} here)")  # fmt: skip
        raise CheckpointError(
            f"checkpoint {path} does not fit --model: tensors {'; '.join(parts)}; pass the --model and "
            "--model-kwargs it was trained as"
        )
    model.load_state_dict(state, strict=True)


def build_model(cfg: PruneConfig) -> nn.Module:
    """The model to prune: the shipped source model, or a timm model; weights from ``checkpoint``."""

    from p3b_fx.source_model import ASSETS_DIR, SOURCE_STEM, build_vit, load_source_model, read_card  # noqa: PLC0415

    if cfg.model == SOURCE_MODEL:
        if cfg.checkpoint is None:
            return load_source_model()[0]
        card = read_card(ASSETS_DIR / f"{SOURCE_STEM}.json")
        model = build_vit(str(card["timm_model"]), card["model_kwargs"], card)
    else:
        kwargs = dict(cfg.model_kwargs)
        if cfg.img_size is not None:
            kwargs.setdefault("img_size", cfg.img_size)
        try:
            model = _create_timm(cfg, kwargs)
        except (RuntimeError, ValueError, OSError, TypeError) as exc:
            hint = ""
            if cfg.pretrained and cfg.checkpoint is None:
                hint = (
                    "; --pretrained downloads the weights from the Hugging Face hub (or reads its local "
                    "cache): without network access, pass the weights as --checkpoint FILE (safetensors "
                    "or a torch state_dict) and drop --pretrained"
                )
            raise ConfigError(f"cannot build timm model {cfg.model!r} with {kwargs}: {exc}{hint}") from exc
    if cfg.checkpoint is not None:
        _load_weights(model, Path(cfg.checkpoint))
    return model


def _create_timm(cfg: PruneConfig, kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model`` with ``kwargs``; a model whose constructor takes no ``img_size`` (DaViT,
    MetaFormer, the conv-stem hierarchies) is built without the one ``--img-size`` added: it reads any input
    size, and the data still come at ``--img-size``."""
    import timm  # noqa: PLC0415 - heavy import

    pretrained = cfg.pretrained and cfg.checkpoint is None
    try:
        return timm.create_model(cfg.model, pretrained=pretrained, **kwargs)
    except TypeError as exc:
        added = cfg.img_size is not None and "img_size" not in cfg.model_kwargs
        message = str(exc)  # torch's "… argument 'img_size'", MetaFormer's "… argument(s): ['img_size']"
        if not added or "unexpected keyword argument" not in message or "'img_size'" not in message:
            raise
        rest = {k: v for k, v in kwargs.items() if k != "img_size"}
        return timm.create_model(cfg.model, pretrained=pretrained, **rest)


def model_input(model: nn.Module, cfg: PruneConfig) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """Image side, mean and std the model expects (from its patch embedding and pretrained_cfg)."""
    pcfg = getattr(model, "pretrained_cfg", None) or {}
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    traced = model.meta.get(INPUT_SHAPE) if isinstance(model, fx.GraphModule) else None
    asked = cfg.model_kwargs.get("img_size")  # what the model was built for, where it does not say
    asked = asked[-1] if isinstance(asked, (tuple, list)) else asked
    fallback = cfg.img_size or asked or pcfg.get("input_size", [None])[-1]
    known = size[0] if size is not None else traced[-1] if traced else fallback
    if known is None:
        raise ConfigError(f"cannot tell the input size of {type(model).__name__}; pass --img-size")
    side = int(known)
    mean = tuple(float(v) for v in pcfg.get("mean", (0.5, 0.5, 0.5)))
    std = tuple(float(v) for v in pcfg.get("std", (0.5, 0.5, 0.5)))
    return side, mean, std


def fit_head(model: nn.Module, data_classes: int, cfg: PruneConfig) -> None:
    """Reset the classifier when ``--num-classes`` asks; refuse a silent class-count mismatch."""
    have = int(getattr(model, "num_classes", data_classes))
    if cfg.num_classes is not None and cfg.num_classes != data_classes:
        raise DataError(
            f"--num-classes {cfg.num_classes} does not match dataset {cfg.data!r}, which has {data_classes} "
            f"classes; pass --num-classes {data_classes}"
        )
    if have == data_classes:
        return
    if cfg.num_classes is None:
        raise DataError(
            f"the model predicts {have} classes but dataset {cfg.data!r} has {data_classes}; pass "
            f"--num-classes {data_classes} to reset the classification head (it then starts untrained)"
        )
    if not hasattr(model, "reset_classifier"):
        raise ConfigError(f"{type(model).__name__} has no reset_classifier(); cannot change its head")
    model.reset_classifier(data_classes)  # type: ignore[operator]
    logger.info("classification head reset from %d to %d classes", have, data_classes)


def build_data(cfg: PruneConfig, model: nn.Module) -> tuple[Loaders, int]:
    side, mean, std = model_input(model, cfg)
    loaders = data_mod.build_loaders(
        cfg.data, img_size=side, mean=mean, std=std, batch_size=cfg.batch_size, seed=cfg.seed,
        root=cfg.data_root, augment=cfg.augment,
    )  # fmt: skip
    return loaders, data_mod.num_classes_of(cfg.data)


def pick_device(cfg: PruneConfig) -> torch.device:
    """The configured device; under torchrun with NCCL, this rank's own GPU."""
    if cfg.device == "auto":
        return distributed.rank_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"device {cfg.device!r} asked for, but CUDA is not available here; use --device cpu"
        )
    return distributed.rank_device(torch.device(cfg.device))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --- shared training pieces ---------------------------------------------------------------------------


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on norms, biases, tokens and embeddings (1-D parameters)."""
    decay: list[nn.Parameter] = []
    plain: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = p.ndim <= 1 or name.endswith(".bias") or "token" in name or "pos_embed" in name
        (plain if no_wd else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


FUSED_ADAMW_DEVICES: Final = frozenset({"cpu", "cuda"})
"""Devices where :func:`adamw` uses torch's fused AdamW kernel."""


def adamw(groups: list[dict[str, Any]], lr: float) -> torch.optim.AdamW:
    """AdamW over parameter ``groups``, fused where torch has the kernel for every parameter's device:
    one pass over all parameters instead of a loop of small operators per parameter (on the CPU
    about 4x faster for the probes' 1.3 M parameters, ``docs/bench-train-step.md``; the same update
    up to rounding)."""
    tensors: list[torch.Tensor] = [p for g in groups for p in g["params"]]
    fused = bool(tensors) and all(
        p.device.type in FUSED_ADAMW_DEVICES and p.is_floating_point() for p in tensors
    )
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)


def make_optimizer(model: nn.Module, cfg: PruneConfig) -> torch.optim.AdamW:
    return adamw(param_groups(model, cfg.weight_decay), cfg.scaled_lr)


def autocast(device: torch.device, enabled: bool) -> AbstractContextManager[Any]:
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


def probe_autocast(device: torch.device, dtype: str) -> AbstractContextManager[Any]:
    """The probes' precision: float32 (the reference), or bfloat16 autocast on any device."""
    if dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def probe_samples(batch: int, fraction: float) -> int:
    """How many samples of a ``batch`` the probes read at ``probe_fraction`` = ``fraction``: the
    first ceil(fraction · batch), at least 2 (BatchNorm in training mode needs more than one
    sample), at most the batch."""
    return min(batch, max(2, math.ceil(fraction * batch - 1e-9)))  # 0.1 · 30 is 3.0000000000000004


def probe_grouped(cfg: PruneConfig, device: torch.device) -> bool:
    """Whether conv probes run as grouped convolutions (``cfg.probe_impl``; auto: on CUDA)."""
    if cfg.probe_impl == "auto":
        return device.type == "cuda"
    return cfg.probe_impl == "grouped"


def compiled(
    module: nn.Module, cfg: PruneConfig, device: torch.device, *, cudagraphs: bool = True,
    fullgraph: bool = False,
) -> nn.Module:  # fmt: skip
    """``module`` under ``torch.compile`` in ``cfg.torch_compile``'s mode, or itself when it is off.

    The wrapper shares ``module``'s parameters and buffers: optimisers, checkpoints and evaluation
    keep using ``module``. Compilation happens on the first call (and once more per new combination
    of the guards: taps recording, gates scoring, a last batch of another size).

    ``cudagraphs=False`` turns ``reduce-overhead`` into ``default`` for this module: the probes'
    default. Calling a second CUDA-graphed module starts a new CUDAGraph-trees iteration, which frees
    the masked model's outputs (the tapped features the probes read, the logits). With
    ``probe_cudagraphs`` the step reads the logits and copies the features before the probes run
    (:meth:`Loop.train_step`); what that saves on a GPU is not measured yet (``docs/gpu-check.md``).

    ``fullgraph=True`` (the masked model and the probes) makes a graph break an error
    (:func:`compile_errors` words it) instead of a silent split: under torch 2.11 a split inside the
    masked Linears cost the heads gates their gradients. ``tests/test_vit_family.py`` checks that
    no family's masked model breaks the graph.
    """
    check_torch_compile(cfg, device)
    mode = "default" if cfg.torch_compile == "reduce-overhead" and not cudagraphs else cfg.torch_compile
    if mode == "off":
        return module
    return torch.compile(module, mode=mode, fullgraph=fullgraph)  # type: ignore[return-value]


def check_torch_compile(cfg: PruneConfig, device: torch.device) -> None:
    """Refuse a ``torch_compile`` mode this device cannot run (:func:`prepare` checks it before
    ``--out`` is touched, so a refused run replaces nothing)."""
    if cfg.torch_compile == "reduce-overhead" and device.type != "cuda":
        raise ConfigError(
            f"--torch-compile reduce-overhead captures CUDA graphs, but the run is on {device}; "
            "use --torch-compile default on the CPU"
        )
    if (
        cfg.torch_compile != "off"
        and device.type == "cpu"
        and not any(shutil.which(cxx) for cxx in ("c++", "g++", "clang++"))
    ):
        raise ConfigError(
            "--torch-compile on the CPU needs a C++ compiler (inductor builds its kernels with one), "
            "and none of c++, g++, clang++ is on PATH; install one (apt-get install g++) or use "
            "--torch-compile off"
        )


@contextmanager
def compile_errors(what: str, whole: bool = True) -> Iterator[None]:
    """A ``torch.compile`` failure inside (a graph break under ``fullgraph``, a backend error, in a
    forward or a lazily compiled backward) as a :class:`TrainingError` that names ``what`` and the
    way out; eager code raises none. ``whole``: ``what`` is compiled with ``fullgraph``, and the
    message says why."""
    try:
        yield
    except torch._dynamo.exc.TorchDynamoException as exc:
        lines = str(exc).strip().splitlines()
        why = (" P3B compiles the masked model and the probes whole, without graph breaks (a break "
               "inside them cost gates their gradients under torch 2.11);") if whole else ""  # fmt: skip
        raise TrainingError(
            f"--torch-compile could not compile {what}: {lines[0] if lines else type(exc).__name__}."
            f"{why} run with --torch-compile off"
        ) from exc


def check_loss(loss: torch.Tensor, step: int, where: str) -> None:
    if not torch.isfinite(loss.detach()).item():
        raise TrainingError(
            f"{where}: the loss became {loss.item()} at step {step}; the last good checkpoint is kept. "
            "Lower --lr, check the data, or disable --amp"
        )


def limited(loader: DataLoader[Any], limit: int) -> Iterator[Batch]:
    for i, batch in enumerate(loader):
        if i >= limit:
            return
        yield batch[0], batch[1]


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader[Any], device: torch.device, amp: bool = False) -> float:
    """Top-1 accuracy in [0, 1] on the whole loader (under torchrun: every rank's shard, counts summed)."""
    was = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        with autocast(device, amp):
            logits = model(x.to(device))
        correct += int((logits.argmax(-1).cpu() == y).sum())
        total += len(y)
    model.train(was)
    if distributed.is_active():
        correct, total = (int(v) for v in distributed.sum_over_ranks([correct, total]))
    return correct / max(total, 1)


def progress(items: Iterator[Batch], total: int, desc: str) -> Any:
    """A tqdm bar on rank 0 (when it writes to a terminal); none on the other ranks."""
    return tqdm(items, total=total, desc=desc, disable=None if distributed.is_main_process() else True)


def _run_hook(hook: Callable[[int], None], loss: torch.Tensor, step: int, desc: str) -> None:
    """``hook(step)`` after a finite loss only: the global baselines rank channels by this step's
    gradients, so a NaN step stops the run before it prunes (one more host sync, on a path that
    syncs anyway: the hook counts parameters)."""
    if not math.isfinite(loss.item()):
        check_loss(loss, step, desc)
    hook(step)


def train_plain(
    model: nn.Module, loaders: Loaders, cfg: PruneConfig, device: torch.device, epochs: int, *,
    hook: Callable[[int], None] | None = None, desc: str = "fine-tune", first_epoch: int = 0,
    decay_epochs: int = 0, checkpoint: Path | None = None, stop_after: int | None = None,
    module_state: Callable[[], dict[str, Any]] | None = None,
) -> list[float]:  # fmt: skip
    """Ordinary fine-tuning (AdamW, label smoothing, AMP on CUDA); test top-1 after each epoch.

    ``hook(step)`` runs after every optimiser step (the global baselines prune there; not under
    torchrun). ``first_epoch`` numbers the epochs for a DistributedSampler's shuffling. The last
    ``decay_epochs`` epochs decay the learning rate per step (:func:`decay_factor`).

    ``checkpoint``: written (atomically, by rank 0) after every epoch, and continued from when it
    exists and ``cfg.resume`` is set; single-process resumes are exact (weights, optimiser, RNG and
    data order). With ``module_state`` the checkpoint also holds the whole module (pruning changes
    its shapes) and ``module_state()``; the caller restores both (:func:`load_module_checkpoint`)
    before calling again. ``stop_after``: return after that many epochs of this call (an
    interrupted run; fewer accuracies than ``epochs`` come back).
    """
    if hook is not None and distributed.is_active():
        raise ConfigError(
            f"{desc}: pruning hooks replace parameters, which DDP cannot follow; run this method "
            "single-process"
        )
    opt = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and device.type == "cuda")
    steps = steps_per_epoch(loaders[0], cfg)
    decay_start, decay_steps = (epochs - decay_epochs) * steps, decay_epochs * steps
    accs: list[float] = []
    step = start = 0
    if checkpoint is not None and cfg.resume and checkpoint.is_file():
        accs = _load_plain_checkpoint(checkpoint, model, opt, scaler, loaders=loaders, cfg=cfg)
        start, step = len(accs), len(accs) * steps
    # a pruning hook changes the model's shapes as it trains: that model stays eager
    net = distributed.wrap(model if hook is not None else compiled(model, cfg, device), device)
    for epoch in range(start, epochs):
        if stop_after is not None and epoch >= stop_after:
            break
        model.train()
        distributed.set_epoch(loaders[0], first_epoch + epoch)
        bar = progress(limited(loaders[0], steps), steps, f"{desc} {epoch + 1}/{epochs}")
        for x, y in bar:
            with autocast(device, cfg.amp), compile_errors(f"the model ({desc})", whole=False):
                loss = F.cross_entropy(net(x.to(device)), y.to(device), label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            with compile_errors(f"the model's backward ({desc})", whole=False):
                scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
            if hook is not None:
                _run_hook(hook, loss, step, desc)
                opt = _refresh_optimizer(opt, model, cfg)
            if step >= decay_start:
                for group in opt.param_groups:
                    group["lr"] = cfg.scaled_lr * decay_factor(step - decay_start, decay_steps)
            scaler.step(opt)
            scaler.update()
            value = loss.item()  # the step's one host sync of its own (see Loop.train_step)
            if not math.isfinite(value):
                check_loss(loss, step, desc)
            step += 1
            bar.set_postfix(loss=f"{value:.3f}")
        accs.append(evaluate(model, loaders[1], device, cfg.amp))
        if checkpoint is not None:
            state = _plain_state(model, opt, scaler, loaders, cfg=cfg, accs=accs)
            state["log_lines"] = log_lines(checkpoint.parent)
            if module_state is not None:
                state |= {"module": model, "hook": module_state()}
            distributed.on_main(functools.partial(atomic_save, state, checkpoint), f"writing {checkpoint}")
    return accs


def load_module_checkpoint(path: Path, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """The whole module and the ``module_state`` of a :func:`train_plain` checkpoint written with one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        module, hook = state["module"], state["hook"]
        if not isinstance(module, nn.Module) or not isinstance(hook, dict):
            raise TypeError("module/hook entries of the wrong type")
    except (OSError, RuntimeError, KeyError, TypeError, ValueError, EOFError, AttributeError) as exc:
        raise unreadable_checkpoint(path, exc) from exc
    return module.to(device), hook


def _plain_state(
    model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, loaders: Loaders, *,
    cfg: PruneConfig, accs: list[float],
) -> dict[str, Any]:  # fmt: skip
    gen = loaders[0].generator
    return {
        "format": 1, "kind": "fine-tune", "config": cfg.to_dict(), "epoch": len(accs), "accuracy": accs,
        "model": model.state_dict(), "opt": opt.state_dict(), "scaler": scaler.state_dict(),
        "rng": rng_state(), "loader_rng": None if gen is None else gen.get_state(),
    }  # fmt: skip


def _load_plain_checkpoint(
    path: Path, model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, *,
    loaders: Loaders, cfg: PruneConfig,
) -> list[float]:  # fmt: skip
    """Restore an epoch checkpoint of :func:`train_plain`; the accuracies of its finished epochs."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("kind") != "fine-tune":
            raise KeyError("kind")
        check_resume_config(state["config"], cfg, path)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        scaler.load_state_dict(state["scaler"])
        accs = [float(a) for a in state["accuracy"]]
    except (OSError, RuntimeError, KeyError, TypeError, ValueError, EOFError, AttributeError) as exc:
        raise unreadable_checkpoint(path, exc) from exc
    if not distributed.is_active():  # under torchrun every rank keeps its own streams
        set_rng_state(state["rng"])
        if state["loader_rng"] is not None and loaders[0].generator is not None:
            loaders[0].generator.set_state(state["loader_rng"])
    trim_log(path.parent, state.get("log_lines"))
    logger.info("resumed %s after epoch %d", path, len(accs))
    return accs


def decay_factor(step: int, total: int) -> float:
    """Cosine decay from 1 (at ``step`` 0) towards 0 over ``total`` steps: the share of the base lr."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def finetune_decay(cfg: PruneConfig) -> int:
    """How many of the closing fine-tuning epochs decay the learning rate (``cfg.lr_decay``)."""
    return cfg.finetune_epochs if cfg.lr_decay == "cosine" else 0


def _refresh_optimizer(opt: torch.optim.AdamW, model: nn.Module, cfg: PruneConfig) -> torch.optim.AdamW:
    """A new optimiser when pruning replaced parameters (the old state no longer fits)."""
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    if held == {id(p) for p in model.parameters() if p.requires_grad}:
        return opt
    return make_optimizer(model, cfg)


def steps_per_epoch(loader: DataLoader[Any], cfg: PruneConfig) -> int:
    n = len(loader)
    if n == 0:
        raise DataError(f"dataset {cfg.data!r} yields no training batch; check the data")
    return min(n, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else n


def make_schedule(cfg: PruneConfig, spe: int) -> Schedule:
    warm = cfg.warmup_epochs if cfg.warmup_epochs is not None else 0.1 * cfg.epochs
    sparse = cfg.sparse_epochs if cfg.sparse_epochs is not None else max(warm, 0.5 * cfg.epochs)
    return Schedule.from_epochs(spe, cfg.epochs, warm, sparse, updates_per_epoch=cfg.updates_per_epoch)


# --- the P3B pruner state ---------------------------------------------------------------------------------


@dataclass
class Allocation:
    soft: dict[str, np.ndarray]
    hard: dict[str, np.ndarray]
    kept: dict[str, int]
    block_cost: list[float]


def _json_floats(values: np.ndarray) -> list[float | None]:
    """Rounded values for the JSON log; NaN (a block without that probe kind) becomes null."""
    return [None if math.isnan(v) else v for v in values.round(5).tolist()]


@dataclass
class Pruner:
    """Budget, gates and statistics of one P3B (or uniform) run; knows nothing of the data."""

    cfg: PruneConfig
    groups: GroupSet
    bank: MaskBank
    schedule: Schedule
    probes: Probes
    costs: budget_mod.GroupCostModel = field(init=False)
    specs: dict[str, list[GateSpec]] = field(init=False)
    least: np.ndarray = field(init=False)
    taylor: TaylorAccumulator = field(init=False)
    benefit: BenefitAccumulator = field(init=False)
    tracker: ImportanceTracker = field(default_factory=ImportanceTracker)
    kept: dict[str, int] = field(default_factory=dict)
    last: Allocation | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.costs = budget_mod.cost_model_from_groups(self.groups, budget_mod.BudgetUnit(self.cfg.budget))
        self.specs = gate_specs(self.groups, self.cfg.granularity, self.cfg.round_to)
        self.least = least_keep(self.groups, self.specs, self.costs)
        self.taylor = TaylorAccumulator({g: gate.numel() for g, gate in self.bank.gates().items()})
        self.benefit = BenefitAccumulator.for_probes(self.probes)
        self.kept = {g.name: g.size for g in self.groups}
        self.goal(np.ones(len(self.groups.blocks)))  # fails fast when no plan meets the budget

    @property
    def dense(self) -> np.ndarray:
        return budget_mod.dense_costs(self.costs)

    def goal(self, importance: np.ndarray) -> np.ndarray:
        return budget_mod.keep_ratios(
            importance, self.dense, self.costs.nonblock, self.cfg.keep_ratio,
            blocks_only=self.cfg.blocks_only, floor=self.cfg.floor, least=self.least,
        )  # fmt: skip

    def kept_costs(self) -> np.ndarray:
        """Current hard-mask cost per block; a removed block counts as dense (guards step 4 of §2)."""
        out = [self.costs.block_cost(b.name, self.kept) for b in self.groups.blocks]
        return np.where(np.asarray(out) > 0, out, self.dense)

    def importance(self) -> tuple[np.ndarray, dict[str, Any]]:
        if self.cfg.method == "uniform":  # no probes run: the same keep ratio for every block
            return np.ones(len(self.groups.blocks)), {"benefit_patch": None, "benefit_cls": None}
        cls, patch = self.benefit.mean()
        info = {"benefit_patch": _json_floats(patch),
                "benefit_cls": None if cls is None else _json_floats(cls)}  # fmt: skip
        return self.tracker.update(cls, patch, self.kept_costs()), info

    def update(self, step: int, loss: float | None) -> dict[str, Any]:
        """Re-allocate before ``step``: new keep ratios, new soft masks; returns the log record.

        Under torchrun the window statistics are summed over the ranks first, and the new gates are
        checked identical on every rank afterwards (TrainingError on every rank if not).
        """
        self.taylor.all_reduce_()
        self.benefit.all_reduce_()
        importance, info = self.importance()
        kappa = budget_mod.effective_keep(self.goal(importance), self.schedule.ramp(step))
        alloc = self.allocate(kappa, self.taylor.scores(), self.schedule.tau(step))
        for name, values in alloc.soft.items():
            self.bank.set_gate(name, torch.as_tensor(values, dtype=torch.float32))
        self.kept.update(alloc.kept)
        distributed.check_same_plan(self.bank.gates(), self.kept, f"keep-ratio update before step {step}")
        self.last = alloc
        self.taylor.reset()
        self.benefit.reset()
        kept_ratio = (np.asarray(alloc.block_cost) / np.maximum(self.dense, 1e-12)).round(4)
        params = self.groups.model_params(self.kept)
        record = {
            "step": step, "phase": str(self.schedule.phase(step)), "tau": self.schedule.tau(step),
            "ramp": self.schedule.ramp(step), "keep_target": kappa.round(4).tolist(),
            "keep_ratios": kept_ratio.tolist(), "importance": importance.round(4).tolist(), **info,
            "params": params, "sparsity": round(1 - params / self.groups.params_total, 4), "loss": loss,
        }  # fmt: skip
        self.history.append(record)
        return record

    def allocate(self, kappa: np.ndarray, scores: Mapping[str, np.ndarray], tau: float) -> Allocation:
        """Per block allocation; rounding error is carried to the next pruned block (budget stays exact).

        A block whose target lies between 0 and its smallest live configuration is removed or kept
        at that configuration, and where that is one of the last pruned blocks no later block takes
        up the difference (EfficientFormerV2 before its k and v convs were tracked: 0.734 of the
        parameters kept for 0.70). Where the blocks together miss their targets by more than
        :data:`REALLOCATE_TOLERANCE` of the dense cost, the allocation runs once more with the miss
        carried into the first pruned block, and the closer of the two is taken."""
        alloc = self._allocate(kappa, scores, tau, 0.0)
        miss = self._miss(kappa, alloc)
        if abs(miss) > REALLOCATE_TOLERANCE * float(self.dense.sum()):
            again = self._allocate(kappa, scores, tau, miss)
            if abs(self._miss(kappa, again)) < abs(miss):
                return again
        return alloc

    def _miss(self, kappa: np.ndarray, alloc: Allocation) -> float:
        """The pruned blocks' target cost minus what ``alloc`` keeps of them (negative: over budget)."""
        pruned = kappa < 1.0
        return float((kappa * self.dense)[pruned].sum() - np.asarray(alloc.block_cost)[pruned].sum())

    def _allocate(
        self, kappa: np.ndarray, scores: Mapping[str, np.ndarray], tau: float, carry: float
    ) -> Allocation:
        """One pass over the blocks in order, ``carry`` (cost) added to the first pruned block's target."""
        soft: dict[str, np.ndarray] = {}
        hard: dict[str, np.ndarray] = {}
        kept: dict[str, int] = {}
        costs: list[float] = []
        for i, block in enumerate(self.groups.blocks):
            specs = self.specs[block.name]
            target = float(kappa[i] * self.dense[i]) + (carry if kappa[i] < 1.0 else 0.0)
            res = allocate_block(
                {s.name: scores[s.name] for s in specs},
                specs,
                target,
                self._cost_fn(block),
                tau,
                removable=self.groups.block_removable(block),
            )
            carry = target - res.cost if kappa[i] < 1.0 else carry
            soft.update(res.soft)
            hard.update(res.hard)
            kept.update(res.kept)
            costs.append(res.cost)
        return Allocation(soft, hard, kept, costs)

    def _cost_fn(self, block: Block) -> Callable[[Mapping[str, int]], float]:
        def cost(kept: Mapping[str, int]) -> float:
            return self.costs.block_cost(block.name, kept)

        return cost

    def plan(self) -> KeepPlan:
        if self.last is None:
            raise TrainingError("no allocation was made yet; the pruning schedule never updated")
        keep = {name: np.flatnonzero(mask).tolist() for name, mask in self.last.hard.items()}
        return KeepPlan.from_mapping(self.groups, keep)

    def state_dict(self) -> dict[str, Any]:
        return {"taylor": self.taylor.state_dict(), "benefit": self.benefit.state_dict(),
                "tracker": self.tracker.state_dict(), "kept": dict(self.kept), "history": self.history,
                "last": None if self.last is None else vars(self.last)}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.taylor.load_state_dict(state["taylor"])
        self.benefit.load_state_dict(state["benefit"])
        self.tracker.load_state_dict(state["tracker"])
        self.kept = dict(state["kept"])
        self.history = list(state["history"])
        self.last = None if state["last"] is None else Allocation(**state["last"])


def gate_specs(groups: GroupSet, granularity: str, round_to: int) -> dict[str, list[GateSpec]]:
    """The prunable gates of every block for a granularity (reference: elements; deploy: heads + hidden,
    and the contracted channels of a block without q · k, rounded like hidden neurons)."""
    roles = _GRANULARITY_ROLES[granularity]
    out: dict[str, list[GateSpec]] = {}
    for block in groups.blocks:
        specs = []
        for name in block.groups:
            g = groups.group(name)
            # deploy keeps head_dim whole for TensorRT's fused attention; a block without q · k (SwiftFormer's
            # additive attention, an MLP-kind block) runs none, and its contracted channels are plain widths
            width = granularity == "deploy" and g.role is Role.HEAD_DIM and block.kind is BlockKind.MLP
            if g.prunable and (g.role in roles or width) and (block.kind, g.role) in _GATE_TYPES:
                step = round_to if g.role is Role.HIDDEN or width else 1
                specs.append(GateSpec(name, g.size, _GATE_TYPES[(block.kind, g.role)], step))
        out[block.name] = specs
    return out


Probes = BenefitProbes | BlockwiseProbes


def make_probes(
    model: nn.Module, groups: GroupSet, num_classes: int, cfg: PruneConfig, gm: fx.GraphModule | None = None
) -> Probes:
    """The block-benefit probes of a run.

    For P3B the layouts are read off the traced shapes of ``gm`` (:func:`block_layouts`). A model whose
    blocks form one chain (each reads what the previous one wrote) on one token layout, as a plain
    ViT's do, gets :class:`BenefitProbes` (batched linear probes); any other (pooling stages,
    class-attention blocks, a residual add between two blocks that is not a block itself) gets
    :class:`BlockwiseProbes` with each block's own layout. Without ``gm``, and for uniform (which
    builds the probes but never runs them), the layout comes from the model's attributes.
    """
    common: dict[str, Any] = {
        "patch_kind": cfg.probe, "hidden": cfg.probe_hidden, "label_smoothing": cfg.label_smoothing,
    }  # fmt: skip
    raw = getattr(model, "embed_dim", 0) or getattr(model, "num_features", 0)
    widths = tuple(raw) if isinstance(raw, (tuple, list)) else (raw,)  # multi-stage models: one per stage
    if cfg.method == "p3b" and gm is not None:
        layouts, pairs = block_layouts(cfg, model, gm, groups)
        chained = pairs == [(i, i + 1) for i in range(len(pairs))]
        if not chained or len(set(layouts)) > 1 or layouts[0].spatial:
            return BlockwiseProbes(layouts, pairs, num_classes, **common)
        one = layouts[0]  # one chained stream of one layout: the batched probes
        return BenefitProbes(
            len(pairs), one.dim, num_classes, grid_size=one.grid, num_prefix_tokens=one.num_prefix_tokens,
            has_class_token=one.has_class_token, **common,
        )  # fmt: skip
    if len(set(widths)) > 1 and cfg.method == "p3b":
        raise ConfigError(
            f"{type(model).__name__} has stages of widths {widths}; pass its traced graph to make_probes "
            "so that every stage gets probes of its own width"
        )
    dim = int(widths[0])  # uniform builds the probes but never runs them
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    has_cls = getattr(model, "cls_token", None) is not None
    if dim <= 0:
        raise ConfigError(f"cannot tell the embedding width of {type(model).__name__}; P3B probes need it")
    return BenefitProbes(
        len(groups.blocks), dim, num_classes, grid_size=None if grid is None else tuple(grid),
        num_prefix_tokens=prefix, has_class_token=has_cls, **common,
    )  # fmt: skip


def _token_layout(model: nn.Module, tokens: int, dim: int) -> BlockLayout | None:
    """Which of ``tokens`` are prefix (class, register) tokens and which a patch grid, or None.

    The model's own patch grid and prefix count come first (a plain ViT's stream); then a square grid
    after the model's prefix, after the class token alone, or after nothing (pooling stages shrink the
    grid; CaiT and XCiT run their main blocks without the class token). A stream of the class token
    alone (CaiT's class-attention blocks) has no grid.
    """
    has_cls = getattr(model, "cls_token", None) is not None
    prefix = int(getattr(model, "num_prefix_tokens", int(has_cls)))
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is not None:
        gh, gw = (int(g) for g in grid)
        for k in dict.fromkeys((prefix, 0)):
            if tokens == k + gh * gw:
                return BlockLayout(dim, k, (gh, gw), has_cls and k >= 1)
    for k in dict.fromkeys((prefix, int(has_cls), 0)):
        patches = tokens - k
        if patches == 0 and k >= 1 and has_cls:
            return BlockLayout(dim, k, None, True)
        side = math.isqrt(max(patches, 0))
        if patches > 0 and side * side == patches:
            return BlockLayout(dim, k, (side, side), has_cls and k >= 1)
    return None


def _channels_first(
    gm: fx.GraphModule, names: Mapping[str, fx.Node], block: Block, shape: tuple[int, ...]
) -> bool:
    """Whether the 4-D stream ``shape`` a block reads is (N, C, H, W) rather than (N, H, W, C): its
    first linear reads C channels (``passes.pointwise_conv`` made a 1×1 conv one), or, where both
    axes are that wide, the block writes its channels on axis -3 (``Block.write_dim``)."""
    read = names.get(block.read_node)
    width = getattr(gm.get_submodule(str(read.target)), "in_features", None) if read is not None else None
    if isinstance(width, int) and (shape[1] == width) != (shape[3] == width):
        return shape[1] == width
    return block.write_dim == -3


def block_layouts(
    cfg: PruneConfig, model: nn.Module, gm: fx.GraphModule, groups: GroupSet
) -> tuple[list[BlockLayout], list[tuple[int, int]]]:
    """Per block: the token layout of the stream it reads and writes, and its (input, output) taps.

    Raises ConfigError, before any training, where a block's stream is neither (batch, tokens, dim)
    nor (batch, h, w, dim), or its tokens cannot be split into prefix tokens and a patch grid.
    """
    names = {n.name: n for n in gm.graph.nodes}
    _, pairs = tap_points(groups)
    layouts: list[BlockLayout] = []
    for block in groups.blocks:
        shape = known_shape(names.get(block.input_node))
        if shape is None or len(shape) not in (3, 4):
            raise ConfigError(
                f"P3B's probes read (batch, tokens, dim) or (batch, h, w, dim) streams, but block "
                f"'{block.name}' of {cfg.model} reads "
                f"{'an unknown shape' if shape is None else tuple(shape)}; use --method uniform, which needs "
                "no block-benefit probes"
            )
        if len(shape) == 4 and _channels_first(gm, names, block, shape):  # an image (N, C, H, W): FastViT
            grid = (int(shape[2]), int(shape[3]))
            layouts.append(BlockLayout(int(shape[1]), 0, grid, False, spatial=True, channels_first=True))
            continue
        if len(shape) == 4:  # a spatial stream (Swin): the grid, no prefix tokens
            layouts.append(BlockLayout(int(shape[3]), 0, (int(shape[1]), int(shape[2])), False, spatial=True))
            continue
        layout = _token_layout(model, int(shape[1]), int(shape[2]))
        if layout is None:
            raise ConfigError(
                f"P3B's probes cannot tell which of the {shape[1]} tokens of block '{block.name}' of "
                f"{cfg.model} are prefix tokens and which a patch grid (model prefix tokens: "
                f"{getattr(model, 'num_prefix_tokens', '?')}, patch grid: "
                f"{getattr(getattr(model, 'patch_embed', None), 'grid_size', '?')}); use --method uniform, "
                "which needs no block-benefit probes"
            )
        layouts.append(layout)
    return layouts, pairs


def tap(masked: fx.GraphModule, groups: GroupSet) -> FeatureTaps:
    InsertTapsPass(groups)(masked)
    return feature_taps(masked)


# --- the P3B loop ---------------------------------------------------------------------------------------


@dataclass
class Loop:
    """One P3B / uniform run over the masked, tapped model."""

    cfg: PruneConfig
    out: Path
    device: torch.device
    masked: fx.GraphModule
    taps: FeatureTaps
    pruner: Pruner
    loaders: Loaders
    step: int = 0
    epoch: int = 0
    accuracy: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    opt: torch.optim.AdamW = field(init=False)
    probe_opt: torch.optim.AdamW = field(init=False)
    scaler: torch.amp.GradScaler = field(init=False)
    net: nn.Module = field(init=False)
    probe_net: nn.Module = field(init=False)

    def __post_init__(self) -> None:
        # under torchrun: DDP around the masked model and around the probes (their own gradients)
        # compiled inside DDP: DDP's own forward does not trace whole (fullgraph), the module does
        self.net = distributed.wrap(compiled(self.masked, self.cfg, self.device, fullgraph=True), self.device)
        if isinstance(self.pruner.probes, BenefitProbes):  # one stream layout: grouping applies
            self.pruner.probes.grouped = probe_grouped(self.cfg, self.device)
        self.probe_net = distributed.wrap(
            compiled(
                self.pruner.probes,
                self.cfg,
                self.device,
                cudagraphs=self.cfg.probe_cudagraphs,
                fullgraph=True,
            ),
            self.device,
        )
        self.opt = make_optimizer(self.masked, self.cfg)
        self.probe_opt = adamw([{"params": list(self.pruner.probes.parameters())}], self.cfg.scaled_lr)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.cfg.amp and self.device.type == "cuda")

    @property
    def spe(self) -> int:
        return steps_per_epoch(self.loaders[0], self.cfg)

    def train(self, stop_after_epoch: int | None = None) -> bool:
        """Train until the schedule ends (True) or ``stop_after_epoch`` epochs are done (False)."""
        while self.epoch < self.cfg.epochs:
            self.run_epoch()
            self.epoch += 1
            self.accuracy.append(evaluate(self.masked, self.loaders[1], self.device, self.cfg.amp))
            self.save_checkpoint()
            logger.info("epoch %d: test top-1 %.4f", self.epoch, self.accuracy[-1])
            if (
                stop_after_epoch is not None
                and self.epoch >= stop_after_epoch
                and self.epoch < self.cfg.epochs
            ):
                return False
        return True

    def run_epoch(self) -> None:
        self.masked.train()
        self.pruner.probes.train()
        distributed.set_epoch(self.loaders[0], self.epoch)
        bar = progress(limited(self.loaders[0], self.spe), self.spe,
                       f"{self.cfg.method} {self.epoch + 1}/{self.cfg.epochs}")  # fmt: skip
        for x, y in bar:
            if self.pruner.schedule.is_update(self.step):
                self.log(self.pruner.update(self.step, self.window_loss()))
            loss, acc = self.train_step(x.to(self.device), y.to(self.device))
            self.losses.append(loss)
            sparsity = 1 - self.pruner.groups.model_params(self.pruner.kept) / self.pruner.groups.params_total
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}", sparsity=f"{sparsity:.2f}")
            self.step += 1

    def probes_run(self, step: int) -> bool:
        """Whether the probes run at ``step``: every ``probe_every``-th step and the last of a window.

        The step before every re-allocation always probes, so no update window is left without a
        block-benefit sample, whatever ``probe_every`` is.
        """
        if self.cfg.method == "uniform":  # uniform allocation reads no block benefit
            return False
        schedule = self.pruner.schedule
        last_of_window = step + 1 <= schedule.finalize and schedule.is_update(step + 1)
        return step % self.cfg.probe_every == 0 or last_of_window

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """One optimiser step of the masked model, then (on probe steps) one of the probes.

        The probes run after the model's backward pass, on the detached features, so the model's
        activations are freed before the probes build theirs: peak memory is the larger of the two,
        not their sum.
        """
        pruning = self.step >= self.pruner.schedule.warmup_end
        probing = self.probes_run(self.step)
        self.pruner.bank.scoring(pruning)
        self.taps.recording = probing
        with (
            record_function("p3b.forward"),
            autocast(self.device, self.cfg.amp),
            compile_errors("the masked model"),
        ):
            logits = self.net(x)
            loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)
        with record_function("p3b.backward"), compile_errors("the masked model's backward"):
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
        if pruning:
            with record_function("p3b.taylor"):
                distributed.average_gradients(list(self.pruner.bank.gates().values()))
                self.pruner.taylor.accumulate(self.pruner.bank.gates(), grad_scale=self._loss_scale())
        with record_function("p3b.optimizer"):
            self.scaler.step(self.opt)
            self.scaler.update()
        # read before the probes run: CUDA-graphed probes start a new CUDAGraph-trees iteration,
        # which frees the graphed model's outputs (the logits; the taps, copied below)
        acc = (logits.detach().argmax(-1) == y).float().mean()
        if probing:
            with record_function("p3b.probes"):
                n = probe_samples(y.shape[0], self.cfg.probe_fraction)
                copy = self.cfg.probe_cudagraphs  # a float32 tap is otherwise passed as a view
                feats = [f[:n].detach().to(torch.float32, copy=copy) for f in self.taps.take()]
                with probe_autocast(self.device, self.cfg.probe_dtype), compile_errors("the probes"):
                    probe_out = self.probe_net(feats, y[:n])
                self.probe_opt.zero_grad(set_to_none=True)
                with compile_errors("the probes' backward"):
                    probe_out.loss.backward()
                if pruning:
                    self.pruner.benefit.add(probe_out)
                self.probe_opt.step()
        # one host sync per step for what the progress bar shows and the NaN check (a GPU step is
        # bound by kernel launches; every sync idles the GPU while the host catches up). A NaN loss
        # has by now gone through one optimiser step in memory; the run stops here, the checkpoints
        # on disk are untouched
        loss_value, acc_value = torch.stack([loss.detach().float(), acc]).tolist()
        if not math.isfinite(loss_value):
            check_loss(loss, self.step, "P3B training")
        return loss_value, acc_value

    def _loss_scale(self) -> float | torch.Tensor:
        """The AMP loss scale of this step's backward, as a device tensor where torch offers one
        (no host sync), else as a float; 1.0 without loss scaling."""
        if not self.scaler.is_enabled():
            return 1.0
        scale_async = getattr(self.scaler, "_get_scale_async", None)  # torch's, private; get_scale syncs
        scale = scale_async() if scale_async is not None else None
        return scale if isinstance(scale, torch.Tensor) else float(self.scaler.get_scale())

    def finish(self) -> KeepPlan:
        """Last re-allocation (τ = 0), the hard plan, hard masks."""
        self.log(self.pruner.update(self.pruner.schedule.finalize, self.window_loss()))
        self.pruner.bank.scoring(False)
        self.taps.recording = False
        plan = self.pruner.plan()
        p3b_fx.set_hard_masks(self.pruner.bank, self.pruner.groups, plan)
        return plan

    def window_loss(self) -> float | None:
        """Mean task loss since the last update, over all ranks (then forget it)."""
        if distributed.is_active():
            total, count = distributed.sum_over_ranks([sum(self.losses), len(self.losses)])
            self.losses = []
            return total / count if count else None
        mean = sum(self.losses) / len(self.losses) if self.losses else None
        self.losses = []
        return mean

    def log(self, record: Mapping[str, Any]) -> None:
        if distributed.is_main_process():
            append_log(self.out, {"event": "update", "epoch": self.epoch, **record})

    # checkpoints ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        gen = self.loaders[0].generator
        return {
            "format": 1, "config": self.cfg.to_dict(), "groups": self.pruner.groups.fingerprint(),
            "epoch": self.epoch, "step": self.step,
            "accuracy": self.accuracy, "losses": self.losses, "masked": self.masked.state_dict(),
            "opt": self.opt.state_dict(),
            "probes": self.pruner.probes.state_dict(), "probe_opt": self.probe_opt.state_dict(),
            "scaler": self.scaler.state_dict(), "pruner": self.pruner.state_dict(), "rng": rng_state(),
            "loader_rng": None if gen is None else gen.get_state(),
        }  # fmt: skip

    def rank_state(self) -> dict[str, Any]:
        """What differs between ranks: RNG streams, the statistics window not yet all-reduced, losses."""
        return {"rng": rng_state(), "taylor": self.pruner.taylor.state_dict(),
                "benefit": self.pruner.benefit.state_dict(), "losses": list(self.losses)}  # fmt: skip

    def save_checkpoint(self) -> None:
        """Rank 0 writes (atomically); under torchrun the checkpoint holds every rank's :meth:`rank_state`."""
        ranks = distributed.gather_objects(self.rank_state()) if distributed.is_active() else None
        if not distributed.is_main_process():
            return
        state = self.state_dict()
        if ranks is not None:
            state["ranks"] = ranks
        state["log_lines"] = log_lines(self.out)
        atomic_save(state, self.out / "checkpoint.pt")

    def load_checkpoint(self, path: Path) -> None:
        """Every rank loads ``path``; a rank that cannot makes every rank raise."""
        distributed.on_every_rank(lambda: self._load_checkpoint(path), f"loading {path}")

    def _load_checkpoint(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
            check_resume_config(state["config"], self.cfg, path)
            check_resume_groups(state, self.pruner.groups, set(self.masked.state_dict()), path)
            self.masked.load_state_dict(state["masked"])
            self.opt.load_state_dict(state["opt"])
            self.pruner.probes.load_state_dict(state["probes"])
            self.probe_opt.load_state_dict(state["probe_opt"])
            self.scaler.load_state_dict(state["scaler"])
            self.pruner.load_state_dict(state["pruner"])
            own = state["ranks"][distributed.rank()] if distributed.is_active() else None
            if own is not None:
                self.pruner.taylor.load_state_dict(own["taylor"])
                self.pruner.benefit.load_state_dict(own["benefit"])
        except (OSError, RuntimeError, KeyError, TypeError, ValueError, EOFError) as exc:
            raise unreadable_checkpoint(path, exc) from exc
        self.epoch, self.step, self.accuracy = (
            int(state["epoch"]),
            int(state["step"]),
            list(state["accuracy"]),
        )
        self.losses = list(state["losses"] if own is None else own["losses"])
        set_rng_state(state["rng"] if own is None else own["rng"])
        if state["loader_rng"] is not None and self.loaders[0].generator is not None:
            self.loaders[0].generator.set_state(state["loader_rng"])
        trim_log(self.out, state.get("log_lines"))
        logger.info("resumed %s at epoch %d, step %d", path, self.epoch, self.step)


def check_resume_groups(state: Mapping[str, Any], groups: GroupSet, keys: set[str], path: Path) -> None:
    """Refuse a checkpoint written for other groups of the same model: a p3b-fx update can group a
    model differently (rotary head dims are pruned in pairs since 2026-11-28), and its gates and
    statistics then fit no more. A checkpoint from before the groups' fingerprint was saved in it is
    recognised by the masked model's state: gates (or other entries) this run's model lacks or has
    in excess (``keys``)."""
    saved = state.get("groups")
    if saved is None:
        masked = state.get("masked")
        if not isinstance(masked, Mapping) or set(masked) == keys:
            return
        saved = "unknown: written by an earlier p3b-fx"
    if saved != groups.fingerprint():
        raise CheckpointError(
            f"{path} was written for other groups of this model (architecture {saved}, now "
            f"{groups.fingerprint()}): p3b-fx now groups it differently (rotary head dims, for one, are "
            "pruned in pairs since 2026-11-28), so its gates and statistics do not fit; start the run "
            "again with --force (the other runs' files are not touched)"
        )


RESUME_FREE_OPTIONS = frozenset({"resume", "force", "device", "out", "dist_timeout", "world_size",
                                 "probe_impl", "torch_compile", "probe_cudagraphs"})  # fmt: skip
"""Options a resumed run may change: where and how it runs, not what it computes (``probe_impl``
picks between two implementations of the same probes, ``torch_compile`` and ``probe_cudagraphs``
between eager, compiled and graphed runs of the same step; ``world_size`` is checked on its own)."""


def check_resume_config(saved: Mapping[str, Any], cfg: PruneConfig, path: Path) -> None:
    """Refuse to resume a run written with other options. An option the checkpoint does not record
    (it predates the option) counts as its default, which is how that run behaved."""
    ranks = int(saved.get("world_size", 1))
    if ranks != cfg.world_size:
        raise CheckpointError(
            f"{path} was written by a run on {ranks} process(es), this one has {cfg.world_size}: the "
            "effective batch, the learning rate and the steps per epoch the pruning schedule counts depend "
            f"on it; resume with {ranks} process(es) in all (torchrun --nnodes × --nproc_per_node)"
        )
    now, defaults = cfg.to_dict(), PruneConfig().to_dict()
    diff = sorted(k for k in now if k not in RESUME_FREE_OPTIONS and saved.get(k, defaults.get(k)) != now[k])
    if diff:
        raise CheckpointError(
            f"{path} was written with other options "
            f"({', '.join(f'{k}={saved.get(k, defaults.get(k))!r}' for k in diff[:4])}); "
            "resume with the same options, or start a fresh run with --force"
        )


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- finalize: slim, check, fine-tune ------------------------------------------------------------------


@torch.no_grad()
def slim_difference(
    masked: nn.Module, slim: nn.Module, loader: DataLoader[Any], device: torch.device
) -> float:
    """Max abs difference of the logits of the hard-masked and the slim model on one test batch (fp32)."""
    x = next(iter(loader))[0].to(device)
    masked.eval()
    slim.eval()
    return float((masked(x) - slim(x)).abs().max())


def block_keep_ratios(groups: GroupSet, plan: KeepPlan) -> dict[str, float]:
    kept = plan.kept_sizes(groups)
    return {
        b.name: round(groups.block_params(b, kept) / max(groups.block_params(b), 1), 4) for b in groups.blocks
    }


# --- entry point -----------------------------------------------------------------------------------------


@dataclass
class Prepared:
    model: nn.Module
    gm: fx.GraphModule
    groups: GroupSet
    loaders: Loaders
    num_classes: int
    device: torch.device


def prepare(cfg: PruneConfig, model: nn.Module | None, loaders: Loaders | None) -> Prepared:
    """Seed, model, data, class check and the traced graph with its groups."""
    seed_everything(cfg.seed)
    device = pick_device(cfg)
    check_torch_compile(cfg, device)
    model = build_model(cfg) if model is None else model
    if loaders is None:
        loaders, n_data = build_data(cfg, model)
    else:
        n_data = cfg.num_classes or int(getattr(model, "num_classes", 0))
    loaders = distributed.shard_loaders(loaders, cfg.seed)  # unchanged without torchrun
    fit_head(model, n_data, cfg)
    model.to(device)
    gm, groups = trace_groups(model, cfg)
    return Prepared(model, gm, groups, loaders, n_data, device)


def trace_groups(model: nn.Module, cfg: PruneConfig) -> tuple[fx.GraphModule, GroupSet]:
    """``model`` traced at the input size it expects, and its groups."""
    side = model_input(model, cfg)[0]
    known = default_input_shape(model)  # channels; a hybrid's patch projection reads CNN features
    gm = p3b_fx.trace(model, input_shape=(1, int(known[1]) if known else 3, side, side))
    groups = p3b_fx.find_groups(gm)
    if not groups.blocks:
        raise ConfigError(f"{type(model).__name__}: no residual blocks found; P3B prunes transformer blocks")
    return gm, groups


def run(
    config: PruneConfig,
    *,
    model: nn.Module | None = None,
    loaders: Loaders | None = None,
    stop_after_epoch: int | None = None,
) -> dict[str, Any]:
    """Run one pruning job as ``config`` says; returns the report (also written to ``report.json``).

    ``model``/``loaders`` replace the configured model and data (library use, tests).
    ``stop_after_epoch`` stops after that many epochs with a checkpoint (resume later); the report
    then has ``"finished": False`` and is not written.

    Under torchrun (WORLD_SIZE > 1 in the environment) the run joins the process group first (or
    uses one already initialised) and trains data-parallel; every rank returns the same report and
    rank 0 alone writes files. See docs/distributed.md.
    """
    with distributed.session(config.device, config.dist_timeout, config.out) as ctx:
        return _run(_with_world_size(config, ctx), model, loaders, stop_after_epoch)


def _with_world_size(config: PruneConfig, ctx: distributed.DistContext) -> PruneConfig:
    if config.world_size not in (1, ctx.world_size):
        raise ConfigError(
            f"world_size {config.world_size} in the options, but {ctx.world_size} process(es) run; leave "
            "world_size out, torchrun sets it"
        )
    if ctx.enabled and config.method.startswith("global-"):
        raise ConfigError(
            f"--method {config.method} prunes parameters in place, which DDP cannot follow; run the "
            "torch-pruning baselines single-process (without torchrun)"
        )
    return config.replace(world_size=ctx.world_size) if ctx.world_size != config.world_size else config


def _run(
    config: PruneConfig, model: nn.Module | None, loaders: Loaders | None, stop_after_epoch: int | None
) -> dict[str, Any]:
    start = time.time()
    replaced = distributed.on_main(lambda: check_out_dir(config), "checking --out") or []
    distributed.check_same_options(config.to_dict())
    prep = distributed.on_every_rank(lambda: prepare(config, model, loaders), "loading the model and data")
    if config.method != "dense":
        check_budget(config, prep.groups)
    if config.method == "p3b":
        check_stream(config, prep)
    if config.method.startswith("global-"):
        from p3b_fx import baselines  # noqa: PLC0415 - torch_pruning only where it is used

        cuda = [prep.device] if prep.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):  # a check must not move the run's random stream
            example = baselines.example_input(prep)
            baselines.check_prunable(prep.model, example, config.model, config.prune_ratio)
    # only now: a run that fails on bad input leaves the directory (and a run --force would replace) as it was
    out = distributed.on_main(lambda: clear_out_dir(config, replaced), "preparing --out") or Path(config.out)
    if not config.resume:
        distributed.on_main(
            lambda: atomic_write_text(out / "run.json", json.dumps(config.to_dict(), indent=1)), "run.json"
        )
    top1_before = evaluate(prep.gm, prep.loaders[1], prep.device, config.amp)
    logger.info("top-1 before pruning: %.4f", top1_before)
    if config.method in ("p3b", "uniform"):
        report = run_p3b(config, out, prep, stop_after_epoch)
    elif config.method == "dense":
        report = run_dense(config, out, prep, stop_after_epoch)
    else:
        from p3b_fx.baselines import run_global  # noqa: PLC0415 - needs torch_pruning

        report = run_global(config, out, prep, stop_after_epoch)
    if not report.get("finished", True):
        distributed.barrier()  # the checkpoint rank 0 writes exists when every rank returns
        return report
    report.update(top1_before_pruning=top1_before, seconds=round(time.time() - start, 1))
    report = {**_report_head(config, prep.groups), **report, "config": config.to_dict()}
    text = json.dumps(report, indent=1)
    distributed.on_main(lambda: atomic_write_text(out / "report.json", text), "writing report.json")
    logger.info("report: %s", out / "report.json")
    return report


def check_budget(cfg: PruneConfig, groups: GroupSet) -> None:
    """Raise ConfigError before any training when no plan can meet the budget.

    For P3B and uniform also when the prunable gates cannot shed enough: a block can drop to zero
    cost only when its removal is exact (``GroupSet.block_removable``); any other block keeps at
    least ``min_keep`` of every gate of the granularity, and its unprunable groups whole.
    """
    costs = budget_mod.cost_model_from_groups(groups, budget_mod.BudgetUnit(cfg.budget))
    dense = budget_mod.dense_costs(costs)
    budget_mod.keep_ratios(
        np.ones(len(groups.blocks)), dense, costs.nonblock, cfg.keep_ratio,
        blocks_only=cfg.blocks_only, floor=cfg.floor,
    )  # fmt: skip
    if cfg.method not in {"p3b", "uniform"}:
        return
    target = budget_mod.budget_target(dense, costs.nonblock, cfg.keep_ratio, cfg.blocks_only)
    most = {g: _most_removable(cfg, groups, costs, dense, g) for g in _GRANULARITY_ROLES}
    if most[cfg.granularity][0] <= target * (1 + BUDGET_TOLERANCE):
        return
    share = most[cfg.granularity][1]
    other = max((g for g in most if g != cfg.granularity), key=lambda g: most[g][1])
    hint = (f"use --prune-ratio {math.floor(share * 100) / 100:.2f} or less" if share >= 0.01
            else "nothing is prunable at this granularity")  # fmt: skip
    if most[other][1] >= cfg.prune_ratio:
        hint += f", or --granularity {other} (which can remove up to {most[other][1]:.1%})"
    raise ConfigError(
        f"--prune-ratio {cfg.prune_ratio} cannot be met with --granularity {cfg.granularity}: the "
        f"prunable groups of this model can remove at most {share:.1%} of its {cfg.budget} (blocks whose "
        "removal would not be exact keep one element per gate; unprunable groups stay whole, see "
        f"find_groups' reasons); {hint}"
    )


def _most_removable(
    cfg: PruneConfig, groups: GroupSet, costs: budget_mod.GroupCostModel, dense: np.ndarray, granularity: str
) -> tuple[float, float]:
    """(the least cost the blocks can reach at ``granularity``, the largest prune ratio that gives)."""
    least = float((least_keep(groups, gate_specs(groups, granularity, cfg.round_to), costs) * dense).sum())
    nonblock = 0.0 if cfg.blocks_only else costs.nonblock
    return least, 1 - (least + nonblock) / (float(dense.sum()) + nonblock)


def describe_model(cfg: PruneConfig) -> str:
    """What ``cfg``'s model offers to prune: its blocks and groups (each prunable, or fixed with the
    reason and the node), and per granularity the most of its ``cfg.budget`` the gates can remove.
    Builds the model (``--model``, ``--checkpoint``, ``--model-kwargs``, ``--img-size``), not the
    data; trains nothing and writes nothing (``tools/prune.py --describe``)."""
    model = build_model(cfg).eval()
    if cfg.num_classes is not None and hasattr(model, "reset_classifier"):
        model.reset_classifier(cfg.num_classes)  # type: ignore[operator]  # only the head's size counts
    gm, groups = trace_groups(model, cfg)
    costs = budget_mod.cost_model_from_groups(groups, budget_mod.BudgetUnit(cfg.budget))
    dense = budget_mod.dense_costs(costs)
    side = gm.meta[INPUT_SHAPE][-1]
    lines = [f"{cfg.model} at {side} px: {groups.params_total:,} parameters", groups.describe(), ""]
    for granularity in _GRANULARITY_ROLES:
        share = _most_removable(cfg, groups, costs, dense, granularity)[1]
        roles = "+".join(str(r) for r in ROLE_ORDER if r in _GRANULARITY_ROLES[granularity])
        specs = gate_specs(groups, granularity, 1).values()
        gated = {groups.group(spec.name).role for block_specs in specs for spec in block_specs}
        if Role.HEAD_DIM in gated - _GRANULARITY_ROLES[granularity]:
            roles += ", and head_dim where a block has no q · k"
        lines.append(f"--granularity {granularity} ({roles}): --prune-ratio up to {max(share, 0.0):.1%} "
                     f"of the {cfg.budget}")  # fmt: skip
    return "\n".join(lines)


def least_keep(
    groups: GroupSet, specs: Mapping[str, Sequence[GateSpec]], costs: budget_mod.CostModel
) -> np.ndarray:
    """Each block's smallest reachable keep ratio (of its cost): 0 where its removal is exact, else
    what its unprunable groups and ``min_keep`` of every gate keep (1 with no gate at all)."""
    dense = budget_mod.dense_costs(costs)
    least = [
        0.0 if specs[b.name] and groups.block_removable(b)
        else costs.block_cost(b.name, {g.name: g.min_keep for g in specs[b.name]})
        for b in groups.blocks
    ]  # fmt: skip
    return np.minimum(np.asarray(least, dtype=np.float64) / np.maximum(dense, 1e-12), 1.0)


def check_stream(cfg: PruneConfig, prep: Prepared) -> None:
    """Raise ConfigError before any training when P3B cannot place its probes on some block.

    P3B's probes read every block's input and output (method doc §1); models whose stream changes
    between blocks get each block's own layout (:func:`block_layouts`), so only a stream that is not
    (batch, tokens, dim), or whose tokens do not split into prefix tokens and a grid, is refused.
    """
    block_layouts(cfg, prep.model, prep.gm, prep.groups)


def _report_head(cfg: PruneConfig, groups: GroupSet) -> dict[str, Any]:
    # the whole model's parameters at the keep ratio: with --blocks-only the blocks' share of it, plus
    # the parameters outside the blocks, which that run never prunes
    params = budget_mod.cost_model_from_groups(groups, budget_mod.BudgetUnit.PARAMS)
    blocks = budget_mod.budget_target(budget_mod.dense_costs(params), params.nonblock, cfg.keep_ratio,
                                      cfg.blocks_only)  # fmt: skip
    return {
        "method": cfg.method, "prune_ratio": 0.0 if cfg.method == "dense" else cfg.prune_ratio,
        "budget": cfg.budget,
        "granularity": cfg.granularity, "params_dense": groups.params_total,
        "flops_dense": groups.flops_total,
        "budget_params": round(blocks + params.nonblock),
        "world_size": cfg.world_size, "effective_batch": cfg.effective_batch,
    }  # fmt: skip


def run_p3b(cfg: PruneConfig, out: Path, prep: Prepared, stop_after_epoch: int | None) -> dict[str, Any]:
    masked, bank = p3b_fx.insert_masks(prep.gm, prep.groups, share_parameters=True)
    taps = tap(masked, prep.groups)
    p3b_fx.fold_masks(masked)  # same function and dL/dm, weight-sized multiplies
    probes = make_probes(prep.model, prep.groups, prep.num_classes, cfg, prep.gm).to(prep.device)
    spe = steps_per_epoch(prep.loaders[0], cfg)
    pruner = Pruner(cfg, prep.groups, bank, make_schedule(cfg, spe), probes)
    loop = Loop(cfg, out, prep.device, masked, taps, pruner, prep.loaders)
    seed_rank(cfg)
    if cfg.resume:
        loop.load_checkpoint(out / "checkpoint.pt")
    if not loop.train(stop_after_epoch):
        return {"finished": False, "epoch": loop.epoch, "step": loop.step}
    plan = loop.finish()
    return finalize(cfg, out, prep, loop, plan, stop_after_epoch=stop_after_epoch)


def seed_rank(cfg: PruneConfig) -> None:
    """Under torchrun, once every model is built: rank r draws augmentation and dropout from seed + r."""
    if distributed.is_active():
        seed_everything(cfg.seed + distributed.rank())


def finalize(
    cfg: PruneConfig, out: Path, prep: Prepared, loop: Loop, plan: KeepPlan, *, stop_after_epoch: int | None
) -> dict[str, Any]:
    """Hard-masked accuracy, slim model (checked), plan/slim files, fine-tuning, the report body.

    The slim fine-tuning checkpoints every epoch into ``finetune.pt``; a resumed run rebuilds the
    same slim model from the pruning checkpoint and continues from there.
    """
    groups = prep.groups
    top1_masked = evaluate(loop.masked, prep.loaders[1], prep.device, cfg.amp)
    distributed.on_main(lambda: plan.save(out / "plan.json"), "writing plan.json")
    # loop.masked shares prep.gm's tensors (insert_masks(share_parameters=True)): slim the trained weights
    slim = p3b_fx.slim(prep.gm, plan, groups)
    diff = distributed.max_over_ranks(slim_difference(loop.masked, slim, prep.loaders[1], prep.device))
    if distributed.is_main_process():
        append_log(out, {"event": "slim", "max_abs_diff": diff, "params": plan.predicted_params(groups)})
    if not diff <= SLIM_TOLERANCE:
        raise TrainingError(
            f"the slim model differs from the hard-masked model by {diff:.3g} (> {SLIM_TOLERANCE}): "
            f"a rewrite bug; the plan is saved in {out / 'plan.json'}, please report it"
        )
    distributed.on_main(lambda: atomic_save(slim, out / "slim.pt"), "writing slim.pt")
    accs: list[float] = []
    if cfg.finetune_epochs:
        accs = train_plain(
            slim, prep.loaders, cfg, prep.device, cfg.finetune_epochs, first_epoch=cfg.epochs,
            decay_epochs=finetune_decay(cfg), checkpoint=out / "finetune.pt",
            stop_after=None if stop_after_epoch is None else stop_after_epoch - cfg.epochs,
        )  # fmt: skip
        if len(accs) < cfg.finetune_epochs:
            return {"finished": False, "epoch": cfg.epochs + len(accs)}
    top1 = accs[-1] if accs else top1_masked
    if accs:
        distributed.on_main(lambda: atomic_save(slim, out / "slim.pt"), "writing slim.pt")
    params = plan.predicted_params(groups)
    _plots(out, loop.pruner, loop.accuracy + accs)
    return {
        "params_slim": params, "flops_slim": plan.predicted_flops(groups), "top1_pruned": top1_masked,
        "top1": top1, "keep_ratios": block_keep_ratios(groups, plan), "plan": str(out / "plan.json"),
        "slim": str(out / "slim.pt"), "slim_max_abs_diff": diff, "accuracy_curve": loop.accuracy + accs,
        "budget_met": budget_met(cfg, groups, plan),
        "removed_blocks": [b.name for b in plan.removed_blocks(groups)],
    }  # fmt: skip


def budget_met(cfg: PruneConfig, groups: GroupSet, plan: KeepPlan) -> bool:
    """Whether ``plan`` meets the run's budget within 1%, in its unit (params or FLOPs) and scope."""
    costs = budget_mod.cost_model_from_groups(groups, budget_mod.BudgetUnit(cfg.budget))
    kept = plan.kept_sizes(groups)
    blocks = sum(costs.block_cost(b.name, kept) for b in groups.blocks)
    target = budget_mod.budget_target(budget_mod.dense_costs(costs), costs.nonblock, cfg.keep_ratio,
                                      cfg.blocks_only)  # fmt: skip
    scale = costs.dense_total if not cfg.blocks_only else float(budget_mod.dense_costs(costs).sum())
    return abs(blocks - target) <= BUDGET_TOLERANCE * cfg.keep_ratio * scale


def run_dense(cfg: PruneConfig, out: Path, prep: Prepared, stop_after_epoch: int | None) -> dict[str, Any]:
    """Fine-tune only, as many epochs as a pruning run plus its fine-tuning (checkpointed per epoch)."""
    seed_rank(cfg)
    epochs = cfg.epochs + cfg.finetune_epochs
    accs = train_plain(
        prep.model, prep.loaders, cfg, prep.device, epochs, decay_epochs=finetune_decay(cfg),
        checkpoint=out / "checkpoint.pt", stop_after=stop_after_epoch,
    )  # fmt: skip
    if len(accs) < epochs:
        return {"finished": False, "epoch": len(accs)}
    groups = prep.groups
    plan = KeepPlan.dense(groups)

    def write() -> None:
        atomic_save(prep.model.state_dict(), out / "dense.pt")
        plan.save(out / "plan.json")

    distributed.on_main(write, "writing dense.pt and plan.json")
    _plots(out, None, accs)
    return {
        "params_slim": groups.params_total, "flops_slim": groups.flops_total, "top1": accs[-1],
        "keep_ratios": block_keep_ratios(groups, plan), "plan": str(out / "plan.json"),
        "accuracy_curve": accs,
        "budget_met": False,
    }  # fmt: skip


def _plots(out: Path, pruner: Pruner | None, accuracy: list[float]) -> None:
    if not distributed.is_main_process():
        return
    from p3b_fx import plots  # noqa: PLC0415 - matplotlib is heavy

    history = pruner.history if pruner is not None else []
    names = [b.name for b in pruner.groups.blocks] if pruner is not None else []
    try:
        plots.write_all(out, names, history, accuracy)
    except (OSError, ValueError, RuntimeError) as exc:
        logger.warning("could not draw the plots in %s: %s", out, exc)
