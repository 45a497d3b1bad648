"""Global structured-pruning baselines with the real Torch-Pruning package (global Taylor, global magnitude).

Pattern: the eager timm model, the same data, epochs, schedule and parameter budget as a P3B run.
Result: the model pruned iteratively *during* the same fine-tuning epochs — at every P3B update
step up to full sparsity it is pruned to the ramped parameter target
``dense - (dense - budget) * r(t)`` — then trained on, fine-tuned, and reported like a P3B run.
Why: a fair comparison needs the same budget; Torch-Pruning's ``pruning_ratio`` is a channel
ratio, not a parameter ratio, so at each pruning step the ratio is found by bisection on copies of
the current model until the parameter count is nearest the target (within 1% of the budget on
models of usable size; a tiny model's coarsest channel can be larger than that).

Attention follows Torch-Pruning's ViT example: ``num_heads`` per qkv layer, head dimensions pruned
(``prune_head_dims``), whole heads kept, timm's ``Attention`` attributes updated after each step.
The residual width is pruned too (global pruning decides), the classification head never.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import p3b_fx
from p3b_fx.config import PruneConfig
from p3b_fx.errors import ConfigError, P3BError, TrainingError
from p3b_fx.machine import MemoryLimitExceeded, available_bytes, memory_limit, resident_bytes

if TYPE_CHECKING:
    from p3b_fx.train import Prepared

logger = logging.getLogger(__name__)

BISECTION_ROUNDS = 14
MAX_CHANNEL_RATIO = 0.95


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _importance(method: str) -> Any:
    import torch_pruning as tp  # noqa: PLC0415 - optional heavy dependency

    if method == "global-taylor":
        return tp.importance.GroupTaylorImportance()
    if method == "global-magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    raise ConfigError(f"method {method!r} is not a torch-pruning baseline (global-taylor, global-magnitude)")


def _attentions(model: nn.Module) -> list[Any]:
    """timm-style attention modules (duck-typed: qkv, proj, num_heads)."""
    return [
        m for m in model.modules() if hasattr(m, "qkv") and hasattr(m, "num_heads") and hasattr(m, "proj")
    ]


def _pruner(model: nn.Module, example: torch.Tensor, method: str, ratio: float) -> Any:
    import torch_pruning as tp  # noqa: PLC0415

    head = getattr(model, "head", None)
    ignored = [head] if isinstance(head, nn.Module) else []
    num_heads = {m.qkv: int(m.num_heads) for m in _attentions(model)}
    return tp.pruner.MetaPruner(
        model, example, importance=_importance(method), global_pruning=True, pruning_ratio=ratio,
        ignored_layers=ignored, num_heads=num_heads, prune_head_dims=True, prune_num_heads=False,
    )  # fmt: skip


def _fix_attention(model: nn.Module, pruner: Any) -> None:
    """Update timm Attention's head bookkeeping to the pruned qkv (as in Torch-Pruning's ViT example)."""
    for m in _attentions(model):
        heads = int(pruner.num_heads.get(m.qkv, m.num_heads))
        m.num_heads = heads
        m.head_dim = m.qkv.out_features // (3 * heads)
        if hasattr(m, "attn_dim"):
            m.attn_dim = heads * int(m.head_dim)


def prune_to(model: nn.Module, example: torch.Tensor, method: str, ratio: float) -> nn.Module:
    """Prune ``model`` in place by channel ratio ``ratio`` (one global step); grads must be set for Taylor."""
    pruner = _pruner(model, example, method, ratio)
    pruner.step()
    _fix_attention(model, pruner)
    return model


def _copy_with_grads(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model)
    for src, dst in zip(model.parameters(), twin.parameters(), strict=True):
        dst.grad = None if src.grad is None else src.grad.detach().clone()
    return twin


def find_ratio(model: nn.Module, example: torch.Tensor, method: str, target: int) -> float:
    """The channel ratio whose one-step global pruning leaves the parameter count nearest ``target``."""
    lo, hi = 0.0, MAX_CHANNEL_RATIO
    best = (abs(count_params(model) - target), 0.0)
    for _ in range(BISECTION_ROUNDS):
        mid = 0.5 * (lo + hi)
        params = count_params(prune_to(_copy_with_grads(model), example, method, mid))
        best = min(best, (abs(params - target), mid))
        lo, hi = (mid, hi) if params > target else (lo, mid)
    return best[1]


class GlobalPruningHook:
    """Called after every backward pass of the fine-tuning; prunes at the P3B update steps."""

    def __init__(
        self, model: nn.Module, example: torch.Tensor, cfg: PruneConfig, steps: dict[int, int]
    ) -> None:
        self.model, self.example, self.cfg, self.steps = model, example, cfg, steps
        self.history: list[dict[str, Any]] = []

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs besides the module: the pruning steps taken so far."""
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])

    def __call__(self, step: int) -> None:
        target = self.steps.get(step)
        if target is None or count_params(self.model) <= target:
            return
        ratio = find_ratio(self.model, self.example, self.cfg.method, target)
        if ratio > 0:
            prune_to(self.model, self.example, self.cfg.method, ratio)
            self._check_runs(step)
        params = count_params(self.model)
        self.history.append({"step": step, "target": target, "ratio": ratio, "params": params})
        logger.info("%s step %d: %d parameters (target %d)", self.cfg.method, step, params, target)

    def _check_runs(self, step: int) -> None:
        """A forward pass of the pruned model (eval mode, no grad): Torch-Pruning's dependency graph
        can leave an architecture it does not cover inconsistent at one sparsity and not at another
        (Swin: a LayerNorm pruned apart from the channels it normalises), which the dry run of
        :func:`check_prunable` may not reach."""
        training = self.model.training
        try:
            with torch.no_grad():
                self.model.eval()(self.example)
        except Exception as exc:  # torch_pruning's broken graphs raise many types
            raise TrainingError(
                f"{self.cfg.method}: Torch-Pruning's global step at step {step} left {self.cfg.model} unable "
                f"to run ({type(exc).__name__}: {exc}); its dependency graph does not cover this "
                "architecture at this sparsity. The checkpoints of earlier epochs are kept; compare with "
                "--method uniform or p3b, which prune it through p3b-fx's own groups"
            ) from exc
        finally:
            self.model.train(training)


def example_input(prep: Prepared) -> torch.Tensor:
    side = int(prep.gm.meta.get("p3b.input_shape", (1, 3, 224, 224))[-1])
    return torch.randn(1, 3, side, side, device=prep.device)


def check_prunable(model: nn.Module, example: torch.Tensor, name: str, prune_ratio: float = 0.1) -> None:
    """Global steps on copies, at channel ratio 0.1 and at ``prune_ratio`` (a channel ratio removes
    at least that share of the prunable parameters, so this reaches the run's final sparsity), each
    followed by a forward pass: ConfigError before training, not in it.

    Torch-Pruning's dependency graph does not cover every timm ViT (per-head relative position
    biases, rotary embeddings and SwiGLU MLPs fail with an IndexError inside its importance; Swin's
    graph breaks only above a channel ratio of 0.3; MaxViT's grows past 18 GB, so the dry run stops
    at :func:`dry_run_memory_limit` rather than being killed by the kernel).
    """
    limit = dry_run_memory_limit()
    try:
        with memory_limit(limit):
            for ratio in dict.fromkeys((0.1, min(prune_ratio, MAX_CHANNEL_RATIO))):
                twin = prune_to(copy.deepcopy(model).eval(), example, "global-magnitude", ratio)
                with torch.no_grad():
                    twin(example)
    except MemoryLimitExceeded as exc:
        raise ConfigError(
            f"Torch-Pruning's dry run on {name} grew past the memory this machine can spare ({exc}): "
            "its dependency graph of this architecture does not fit here (MaxViT's grows past 18 GB); "
            "compare with --method uniform or p3b, which prune it through p3b-fx's own groups"
        ) from None
    except Exception as exc:  # torch_pruning raises many types
        raise ConfigError(
            f"Torch-Pruning cannot prune {name} ({type(exc).__name__}: {exc}): its dependency graph does "
            "not cover this architecture; compare with --method uniform or p3b, which prune it through "
            "p3b-fx's own groups"
        ) from exc


def dry_run_memory_limit() -> int | None:
    """The most resident memory the Torch-Pruning dry run may reach: what the process holds now plus
    half of what the kernel can still hand out (None where that is unknown). Half, not all: the
    kernel kills the process long before it has taken everything, if other work grows too (the
    family sweep's MaxViT run died that way, beside two other processes)."""
    now, free = resident_bytes(), available_bytes()
    return None if now is None or free is None else now + free // 2


def prune_targets(cfg: PruneConfig, dense: int, spe: int) -> dict[int, int]:
    """Parameter target at every P3B update step where the ramp still rises (and once at full sparsity)."""
    from p3b_fx.train import make_schedule  # noqa: PLC0415 - avoids an import cycle

    schedule = make_schedule(cfg, spe)
    budget = cfg.keep_ratio * dense
    out: dict[int, int] = {}
    for step in schedule.update_steps()[:-1]:
        r = schedule.ramp(step)
        out[step] = round(dense - (dense - budget) * r)
        if r >= 1.0:
            break
    if not out:
        raise TrainingError(
            "the schedule has no update step before the end; train longer or shorten the warm-up"
        )
    return out


def run_global(
    cfg: PruneConfig, out: Path, prep: Prepared, stop_after_epoch: int | None = None
) -> dict[str, Any]:
    """Prune-while-fine-tuning with Torch-Pruning's global criterion; the report body.

    Checkpoints every epoch like the other methods (``checkpoint.pt`` while pruning, ``finetune.pt``
    after), each with the whole module since pruning changes its shapes; ``cfg.resume`` continues
    from the later of the two. ``stop_after_epoch``: stop after that many epochs in all (tests).
    """
    import torch_pruning as tp  # noqa: PLC0415

    from p3b_fx.train import (  # noqa: PLC0415
        append_log,
        atomic_save,
        finetune_decay,
        load_module_checkpoint,
        steps_per_epoch,
        train_plain,
    )

    model = prep.model
    example = example_input(prep)
    dense = count_params(model)
    hook = GlobalPruningHook(
        model, example, cfg, prune_targets(cfg, dense, steps_per_epoch(prep.loaders[0], cfg))
    )
    prune_ckpt, finetune_ckpt = out / "checkpoint.pt", out / "finetune.pt"
    in_finetune = cfg.resume and finetune_ckpt.is_file()
    saved: dict[str, Any] = {}
    if cfg.resume:  # the pruned module, as the later checkpoint left it
        model, saved = load_module_checkpoint(finetune_ckpt if in_finetune else prune_ckpt, prep.device)
        hook.model = model
        hook.load_state_dict(saved)
    if in_finetune:  # pruning finished before the interruption: its accuracies and log are kept
        accs = [float(a) for a in saved["prune_accuracy"]]
    else:
        accs = train_plain(
            model, prep.loaders, cfg, prep.device, cfg.epochs, hook=hook, desc=cfg.method,
            checkpoint=prune_ckpt, stop_after=stop_after_epoch, module_state=hook.state_dict,
        )  # fmt: skip
        if len(accs) < cfg.epochs:
            return {"finished": False, "epoch": len(accs)}
        for record in hook.history:  # a resume trimmed the log back to its checkpoint, so none are doubled
            append_log(out, {"event": "prune", **record})
    if cfg.finetune_epochs:
        stop = None if stop_after_epoch is None else stop_after_epoch - cfg.epochs
        pruned = list(accs)
        tuned = train_plain(
            model, prep.loaders, cfg, prep.device, cfg.finetune_epochs, first_epoch=cfg.epochs,
            decay_epochs=finetune_decay(cfg), checkpoint=finetune_ckpt, stop_after=stop,
            module_state=lambda: {**hook.state_dict(), "prune_accuracy": pruned},
        )  # fmt: skip
        if len(tuned) < cfg.finetune_epochs:
            return {"finished": False, "epoch": cfg.epochs + len(tuned)}
        accs += tuned
    atomic_save(model, out / "slim.pt")
    macs_tp, params = tp.utils.count_ops_and_params(model, example)
    try:  # the same MAC counter as P3B's reports (linears, attention matmuls, convolutions), so they compare
        macs = p3b_fx.find_groups(p3b_fx.trace(model.eval(), input_shape=tuple(example.shape))).flops_total
    except P3BError as exc:
        logger.warning("counting MACs with torch_pruning's counter instead: %s", exc)
        macs = int(macs_tp)
    budget = cfg.keep_ratio * dense
    return {
        "params_slim": int(params), "flops_slim": int(macs), "top1": accs[-1], "accuracy_curve": accs,
        "keep_ratios": {}, "plan": None, "slim": str(out / "slim.pt"), "prune_steps": hook.history,
        "budget_met": abs(int(params) / budget - 1) <= 0.01,
    }  # fmt: skip
