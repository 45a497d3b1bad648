"""Benchmark: one P3B training step against one plain fine-tuning step of the same model.

P3B step = masked forward with feature taps, task loss, backward, Taylor accumulation, AdamW step,
then (on probe steps) the probe loss on the detached taps, its backward, benefit accumulation and
the probe AdamW step (``p3b_fx.train.Loop.train_step``). Plain step = forward, loss, backward, AdamW
step. Variants: the probe design (``patch_conv``, the reference, or ``patch_linear``), the conv
probe's hidden width, ``probe_every`` (probes on every N-th step), ``probe_dtype`` (bf16 probes),
``probe_impl`` (conv probes per block or as grouped convolutions) and ``torch_compile`` (a compiled
variant is compared with the plain step compiled in the same mode, timed in the same rounds; its
first steps, which compile, fall in the warm-up rounds).

Time: one process holds the plain model and every variant (same initial weights, same synthetic
batch) and runs them round-robin: each round times ``probe_every`` consecutive steps of every
variant (so the amortised cost of a probe that runs every N-th step, not the cheaper median step)
right after one plain step. Reported: the median over ``--rounds`` rounds (after ``--warmup``) of
each variant's per-round ratio to the plain step of the same round, so a slow spell of the
machine hits both sides of a ratio alike. Memory: each variant in its own subprocess (so the peak
is its own): ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the process's peak RSS during the
steps (its counter reset after setup, whose one-off tracing peak is no step's) minus its RSS before
the model was built (so weights, optimiser and probe state count); and the activations the model's
forward keeps for backward while scoring (unique tensor storages seen by
``torch.autograd.graph.saved_tensors_hooks``: deterministic, unlike RSS). Also timed: one
keep-ratio re-allocation (``Pruner.update``, once per window, not per step).

Usage: ``python tools/bench_train_step.py [--threads 1] [--batch-size 64] [--write docs/bench-train-step.md]``
(``--write`` replaces the table and keeps everything from the hand-written notes marker on).
Model: the shipped source model's architecture (random weights) by default; ``--model NAME``
(with ``--img-size``, ``--model-kwargs``) times any timm model, e.g. ``--model deit_small_patch16_224
--batch-size 16 --variants 2 5 6 14``; its conv probes then take each stream's default width.
``--profile FILE`` instead profiles the plain and the default P3B step with torch.profiler: the top
operators of each and the P3B step per region of ``Loop.train_step`` (``p3b.forward``, ``.backward``,
``.taylor``, ``.optimizer``, ``.probes``). ``--count-ops`` counts the aten operators one step of each
dispatches (on CUDA, nearly one kernel launch each). ``--timing-only`` skips the memory workers
(each compiled variant would compile once more in its own process): a table of the timing rows.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import gc
import json
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import p3b_fx
from p3b_fx import train
from p3b_fx.config import PruneConfig
from p3b_fx.core.io import atomic_write_text, kept_notes
from p3b_fx.errors import ConfigError, P3BError
from p3b_fx.machine import describe


class Variant(NamedTuple):
    """One P3B step setting (the :class:`~p3b_fx.config.PruneConfig` fields of the same names)."""

    kind: str
    share: float
    every: int
    dtype: str
    impl: str
    mode: str
    fraction: float = 1.0
    probe_graphs: bool = False


VARIANTS: dict[str, Variant] = {
    "conv, hidden = dim": Variant("patch_conv", 1.0, 1, "float32", "per-block", "off"),
    "conv, hidden dim/4 (default)": Variant("patch_conv", 0.25, 1, "float32", "per-block", "off"),
    "conv, hidden dim/4, grouped": Variant("patch_conv", 0.25, 1, "float32", "grouped", "off"),
    "conv, hidden dim/4, bf16 probes": Variant("patch_conv", 0.25, 1, "bfloat16", "per-block", "off"),
    "conv, hidden dim/4, every 4th step": Variant("patch_conv", 0.25, 4, "float32", "per-block", "off"),
    "linear": Variant("patch_linear", 1.0, 1, "float32", "per-block", "off"),
    "conv, hidden dim/4, grouped, torch.compile": Variant(
        "patch_conv", 0.25, 1, "float32", "grouped", "default"),
    "conv, hidden dim/4, grouped, torch.compile + CUDA graphs": Variant(
        "patch_conv", 0.25, 1, "float32", "grouped", "reduce-overhead"),
    "conv, hidden dim/8": Variant("patch_conv", 0.125, 1, "float32", "per-block", "off"),
    "linear, torch.compile + CUDA graphs": Variant(
        "patch_linear", 1.0, 1, "float32", "per-block", "reduce-overhead"),
    "conv, hidden dim/4, grouped, every 4th step, torch.compile + CUDA graphs": Variant(
        "patch_conv", 0.25, 4, "float32", "grouped", "reduce-overhead"),
    "conv, hidden dim/4, torch.compile + CUDA graphs": Variant(
        "patch_conv", 0.25, 1, "float32", "per-block", "reduce-overhead"),
    "conv, hidden dim/4, grouped, bf16 probes, torch.compile + CUDA graphs": Variant(
        "patch_conv", 0.25, 1, "bfloat16", "grouped", "reduce-overhead"),
    "conv, hidden dim/4, probes on a quarter of each batch": Variant(
        "patch_conv", 0.25, 1, "float32", "per-block", "off", 0.25),
    "conv, hidden dim/4, grouped, probes on a quarter of each batch, torch.compile + CUDA graphs": Variant(
        "patch_conv", 0.25, 1, "float32", "grouped", "reduce-overhead", 0.25),
    "conv, hidden dim/4, grouped, torch.compile + CUDA graphs, probes graphed too": Variant(
        "patch_conv", 0.25, 1, "float32", "grouped", "reduce-overhead", 1.0, True),
    "conv, hidden dim/4, grouped, bf16 probes, torch.compile + CUDA graphs, probes graphed too": Variant(
        "patch_conv", 0.25, 1, "bfloat16", "grouped", "reduce-overhead", 1.0, True),
}  # fmt: skip
"""label → (probe kind, conv hidden width as a share of the model width, probe_every, probe_dtype,
probe_impl, torch_compile mode, probe_fraction, probe_cudagraphs). The default's conv probes run per
block on the CPU and grouped on CUDA (``probe_impl=auto``): the two columns are the default on each
device. A
compiled variant is compared with the plain step compiled in the same mode (timed in the same
rounds); CUDA graphs (``reduce-overhead``) run on CUDA only."""

SOURCE_ARCH = {
    "img_size": 28,
    "patch_size": 7,
    "embed_dim": 192,
    "depth": 6,
    "num_heads": 3,
    "num_classes": 10,
}
"""The shipped Fashion-MNIST source model's architecture (weights do not matter for timing)."""

MEMORY_ROUNDS = 3
"""Rounds after warm-up in a memory worker (peak memory is reached in the first probe step)."""


DEFAULT_SHARE = 0.25
"""The default conv probe width as a share of the stream width (``benefit.default_hidden``)."""


def _model(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The timm model and its kwargs: the source architecture unless ``--model`` names another."""
    if args.model is None:
        return "vit_tiny_patch16_224", json.loads(args.model_kwargs or json.dumps(SOURCE_ARCH))
    return args.model, {"num_classes": 10, **json.loads(args.model_kwargs or "{}")}


def _describe_model(args: argparse.Namespace) -> str:
    name, kwargs = _model(args)
    size = f" at {args.img_size} px" if args.img_size else ""
    if args.model is None:
        return f"timm ViT {json.dumps(kwargs)}"
    return f"timm `{name}` {json.dumps(kwargs)}{size}"


def _config(args: argparse.Namespace, out: str) -> PruneConfig:
    name, kwargs = _model(args)
    hidden: int | None = None  # the default width, per block: dim // 4, at least 16
    if "embed_dim" in kwargs:
        hidden = max(1, round(args.hidden_share * int(kwargs["embed_dim"])))
    elif args.probe == "patch_conv" and args.hidden_share != DEFAULT_SHARE:
        raise ConfigError(
            f"this variant sets the conv probe width to {args.hidden_share} of the model width, but "
            f"{name} has no embed_dim in --model-kwargs: run the variants at the default width with it"
        )
    return PruneConfig(
        model=name, model_kwargs=kwargs, img_size=args.img_size, data="digits",
        num_classes=10, epochs=10, batch_size=args.batch_size, probe=args.probe, out=out,
        device=args.device, amp=True, probe_hidden=hidden, probe_every=args.every,
        probe_fraction=args.fraction, probe_cudagraphs=args.probe_graphs,
        probe_dtype=args.probe_dtype, probe_impl=args.probe_impl, torch_compile=args.torch_compile,
    )  # fmt: skip


def _status_mib(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _rss_mib() -> float:
    """Peak RSS of this process (MiB): VmHWM, which :func:`_reset_peak_rss` can reset on Linux."""
    peak = _status_mib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mib() -> float:
    now = _status_mib("VmRSS")
    return now if now is not None else _rss_mib()


def _reset_peak_rss() -> None:
    """Free what setup left behind and restart the peak-RSS counter, so setup's transient peak
    (tracing, shape propagation) is not counted as training-step memory. Linux only; a no-op
    elsewhere."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except (OSError, AttributeError):  # not Linux / not glibc
        pass


def _plain_step(
    model: nn.Module, cfg: PruneConfig, device: torch.device, mark: Callable[[str], None] | None = None
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """Forward, loss, backward, AdamW step (the model compiled in ``cfg.torch_compile``'s mode).
    ``mark(phase)`` (``--count-ops``) is told each phase."""
    opt = train.make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    net = train.compiled(model, cfg, device)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        if mark is not None:
            mark("forward")
        with train.autocast(device, True):
            loss = F.cross_entropy(net(x), y, label_smoothing=cfg.label_smoothing)
        if mark is not None:
            mark("backward")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
        if mark is not None:
            mark("optimizer")
        scaler.step(opt)
        scaler.update()

    return step


def _trace(model: nn.Module, cfg: PruneConfig) -> torch.fx.GraphModule:
    """``p3b_fx.trace`` at the input size the run feeds (a model built for ``--img-size`` may not
    take its default size)."""
    side = train.model_input(model, cfg)[0]
    return p3b_fx.trace(model, input_shape=(1, 3, side, side))


def _p3b_step(model: nn.Module, cfg: PruneConfig, device: torch.device, out: Path) -> tuple[Any, Any]:
    gm = _trace(model, cfg)
    groups = p3b_fx.find_groups(gm)
    masked, bank = p3b_fx.insert_masks(gm, groups, share_parameters=True)
    taps = train.tap(masked, groups)
    p3b_fx.fold_masks(masked)
    probes = train.make_probes(model, groups, 10, cfg, gm).to(device)
    pruner = train.Pruner(cfg, groups, bank, train.make_schedule(cfg, 100), probes)
    loop = train.Loop(cfg, out, device, masked, taps, pruner, (None, None))  # type: ignore[arg-type]
    loop.step = pruner.schedule.warmup_end  # pruning phase: scores and benefits accumulate

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loop.train_step(x, y)
        loop.step += 1

    return step, loop


def probe_flop_share(args: argparse.Namespace, label: str) -> float:
    """FLOPs of the probes' forward and backward on one probed step, as a share of the plain step's
    forward and backward (torch's FLOP counter, on the CPU with a batch of 8: the share does not
    depend on the device, the batch or the precision, and a probe fraction of 1/4 is exact)."""
    small = _with(
        _variant_args(args, label), batch_size=8, device="cpu", torch_compile="off", probe_graphs=False
    )
    device = torch.device("cpu")
    x, y = _batch(small, device)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(small, tmp)
        model = train.build_model(cfg).train()
        with FlopCounterMode(display=False) as plain:
            F.cross_entropy(model(x), y).backward()  # type: ignore[no-untyped-call]
        gm = _trace(model, cfg)
        groups = p3b_fx.find_groups(gm)
        masked, _ = p3b_fx.insert_masks(gm, groups, share_parameters=True)
        taps = train.tap(masked, groups)
        taps.recording = True
        with torch.no_grad():
            masked(x)
        probes = train.make_probes(model, groups, 10, cfg, gm)
        n = train.probe_samples(small.batch_size, small.fraction)
        with FlopCounterMode(display=False) as probe:
            probes([f[:n].detach().float() for f in taps.take()], y[:n]).loss.backward()
    return float(probe.get_total_flops()) / max(float(plain.get_total_flops()), 1.0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _saved_mib(net: nn.Module, x: torch.Tensor, loop: Any) -> float:
    """Activations the model's forward keeps for backward (unique storages, MiB), while scoring."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    if loop is not None:
        loop.pruner.bank.scoring(True)
        loop.taps.recording = False
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x)
    return sum(seen.values()) / 2**20


def _steps(step: Callable[[torch.Tensor, torch.Tensor], None], n: int, x: torch.Tensor, y: torch.Tensor,
           device: torch.device) -> float:  # fmt: skip
    """Mean seconds per step over ``n`` consecutive steps."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step(x, y)
    _sync(device)
    return (time.perf_counter() - t0) / n


def _with(args: argparse.Namespace, **changes: Any) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **changes})


def _variant_args(args: argparse.Namespace, label: str) -> argparse.Namespace:
    v = VARIANTS[label]
    return _with(args, probe=v.kind, hidden_share=v.share, every=v.every, probe_dtype=v.dtype,
                 probe_impl=v.impl, torch_compile=v.mode, fraction=v.fraction,
                 probe_graphs=v.probe_graphs)  # fmt: skip


def _variant_flags(label: str) -> list[str]:
    """The worker flags of variant ``label``."""
    v = VARIANTS[label]
    return ["--probe", v.kind, "--hidden-share", str(v.share), "--every", str(v.every),
            "--probe-dtype", v.dtype, "--fraction", str(v.fraction), "--probe-impl", v.impl,
            "--torch-compile", v.mode, *(["--probe-graphs"] if v.probe_graphs else [])]  # fmt: skip


def _selected(args: argparse.Namespace) -> list[str]:
    """The variants to run: ``--variants`` (1-based numbers in :data:`VARIANTS` order) or all that
    run on ``--device`` (CUDA graphs need CUDA)."""
    labels = list(VARIANTS)
    if args.variants:
        return [labels[i - 1] for i in args.variants]
    on_cpu = not args.device.startswith("cuda")
    return [k for k in labels if not (on_cpu and VARIANTS[k].mode == "reduce-overhead")]


def _modes(args: argparse.Namespace) -> list[str]:
    """The compile modes the plain step runs in: eager, and each selected variant's mode."""
    return list(dict.fromkeys(["off", *(VARIANTS[k].mode for k in _selected(args))]))


def _first_variant(args: argparse.Namespace) -> str:
    """The P3B variant ``--profile`` and ``--count-ops`` look at: the first of ``--variants``, or
    the default."""
    return _selected(args)[0] if args.variants else "conv, hidden dim/4 (default)"


def _batch(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic batch of ``--batch-size`` images of the model's input size, labels in [0, 10)."""
    side = int(args.img_size or _model(args)[1].get("img_size", 224))
    x = torch.randn(args.batch_size, 3, side, side, device=device)
    return x, torch.randint(0, 10, (args.batch_size,), device=device)


def timing_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Plain and every variant in one process, round-robin; per-round ratios to the plain step."""
    torch.set_num_threads(args.threads)
    device = train.pick_device(PruneConfig(device=args.device))
    torch.manual_seed(0)
    x, y = _batch(args, device)
    with tempfile.TemporaryDirectory() as tmp:
        base = train.build_model(_config(args, tmp)).to(device).train()
        plains = {
            mode: _plain_step(copy.deepcopy(base), _config(_with(args, torch_compile=mode), tmp), device)
            for mode in _modes(args)
        }  # fmt: skip
        steps: dict[str, tuple[Callable[[torch.Tensor, torch.Tensor], None], int]] = {}
        for label in _selected(args):
            out = Path(tmp) / str(len(steps))
            out.mkdir()
            vargs = _variant_args(args, label)
            steps[label] = (
                _p3b_step(copy.deepcopy(base), _config(vargs, str(out)), device, out)[0],
                vargs.every,
            )
        plain_ms: dict[str, list[float]] = {m: [] for m in plains}
        plain_ratios: dict[str, list[float]] = {m: [] for m in plains}
        ms: dict[str, list[float]] = {k: [] for k in steps}
        ratios: dict[str, list[float]] = {k: [] for k in steps}
        eager_ratios: dict[str, list[float]] = {k: [] for k in steps}
        for i in range(args.warmup + args.rounds):
            t_plain = {mode: _steps(step, 1, x, y, device) for mode, step in plains.items()}
            for label, (step, every) in steps.items():
                t = _steps(step, every, x, y, device)
                if i >= args.warmup:
                    ms[label].append(1e3 * t)
                    ratios[label].append(t / t_plain[VARIANTS[label].mode])
                    eager_ratios[label].append(t / t_plain["off"])
            if i >= args.warmup:
                for mode, t in t_plain.items():
                    plain_ms[mode].append(1e3 * t)
                    plain_ratios[mode].append(t / t_plain["off"])
    return {
        "plain_ms": statistics.median(plain_ms["off"]),
        "plains": {m: {"median_ms": statistics.median(plain_ms[m]),
                       "ratio": statistics.median(plain_ratios[m])} for m in plains},
        "variants": {k: {"median_ms": statistics.median(ms[k]), "ratio": statistics.median(ratios[k]),
                         "ratio_min": min(ratios[k]), "ratio_max": max(ratios[k]),
                         "ratio_eager": statistics.median(eager_ratios[k])} for k in steps},
    }  # fmt: skip


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Memory of one variant (or plain) in a process of its own."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = train.pick_device(PruneConfig(device=args.device))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(args, tmp)
        rss0 = _current_rss_mib()
        model = train.build_model(cfg).to(device).train()
        x, y = _batch(args, device)
        loop = None
        if args.worker == "p3b":
            step, loop = _p3b_step(model, cfg, device, Path(tmp))
        else:
            step = _plain_step(model, cfg, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _reset_peak_rss()
        per_round = args.every if args.worker == "p3b" else 1
        for _ in range(args.warmup + MEMORY_ROUNDS):
            _steps(step, per_round, x, y, device)
        result: dict[str, Any] = {}
        if device.type == "cuda":
            result["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        else:
            result["peak_mib"] = _rss_mib() - rss0
        result["saved_mib"] = _saved_mib(loop.masked if loop is not None else model, x, loop)  # eager
        if loop is not None:
            t0 = time.perf_counter()
            loop.pruner.update(loop.pruner.schedule.update_steps()[0], None)
            result["update_ms"] = 1e3 * (time.perf_counter() - t0)
    return result


PROFILE_REGIONS = ("p3b.forward", "p3b.backward", "p3b.taylor", "p3b.optimizer", "p3b.probes")
"""The ``record_function`` regions of ``train.Loop.train_step``."""


def profile(args: argparse.Namespace) -> str:
    """Where a step's time goes: per region of the P3B step, and the top operators of each side.

    Device time per region is the time of the kernels launched inside it (on CUDA); CPU time is the
    host's. The profiler's own overhead inflates both sides alike, so read shares, not absolute ms.
    """
    from torch.profiler import ProfilerActivity  # noqa: PLC0415
    from torch.profiler import profile as torch_profile  # noqa: PLC0415

    torch.manual_seed(0)
    device = train.pick_device(PruneConfig(device=args.device))
    x, y = _batch(args, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sections = [f"# Profile of one training step ({args.rounds} steps each, batch {args.batch_size}, "
                f"{_machine(args.device)}, device {device})"]  # fmt: skip
    label = _first_variant(args)
    sections[0] += f"; P3B variant: {label}"
    vargs = _variant_args(args, label)
    with tempfile.TemporaryDirectory() as tmp:
        base = train.build_model(_config(args, tmp)).to(device).train()
        sides = {
            "plain": _plain_step(copy.deepcopy(base), _config(args, tmp), device),
            "p3b": _p3b_step(copy.deepcopy(base), _config(vargs, tmp), device, Path(tmp))[0],
        }
        for name, step in sides.items():
            _steps(step, max(args.warmup, 3), x, y, device)
            with torch_profile(activities=activities) as prof:
                _steps(step, args.rounds, x, y, device)
            events = prof.key_averages()
            dev = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
            kind = "device" if device.type == "cuda" else "CPU"
            rows = [f"\n## {name}: top operators by self {kind} time\n",
                    events.table(sort_by=dev, row_limit=20, max_name_column_width=60)]  # fmt: skip
            if name == "p3b":
                # on CUDA a region is two events of one key: the host's range and the device's
                # annotation; each carries one of the two times
                totals = {r: [0.0, 0.0] for r in PROFILE_REGIONS}
                for e in events:
                    if e.key in totals:
                        totals[e.key][0] = max(totals[e.key][0], e.cpu_time_total)
                        totals[e.key][1] = max(totals[e.key][1], getattr(e, "device_time_total", 0.0))
                rows.append("\n## p3b: per region (ms per step)\n\n| region | CPU | device |\n|---|---|---|")
                for region in PROFILE_REGIONS:
                    if any(totals[region]):
                        cpu, gpu = (t / 1e3 / args.rounds for t in totals[region])
                        rows.append(f"| {region} | {cpu:.2f} | {gpu:.2f} |")
            sections.extend(rows)
    return "\n".join(sections) + "\n"


_METADATA_OPS = {"_unsafe_view", "squeeze_", "unsqueeze_", "transpose_", "t_", "as_strided_"}
"""aten ops that are not views by schema but only rewrite a tensor's shape (no kernel on any device)."""


def count_ops(args: argparse.Namespace) -> str:
    """aten operators dispatched by one training step, plain against P3B, per phase: what a
    host-bound GPU step pays for (docs/gpu-check.md). Views and shape-only ops are counted apart;
    on CUDA nearly every other op is one kernel launch. Phases of the P3B step are the
    ``record_function`` regions of ``Loop.train_step``. On the CPU, AdamW runs parameter by
    parameter (torch picks its foreach kernels only for CUDA tensors), so the optimizer rows
    overstate what a CUDA step launches there; the model's forward and backward count the same."""
    import collections  # noqa: PLC0415
    import contextlib  # noqa: PLC0415
    from unittest import mock  # noqa: PLC0415

    from torch.utils._python_dispatch import TorchDispatchMode  # noqa: PLC0415

    class Count(TorchDispatchMode):  # type: ignore[no-untyped-call]
        def __init__(self) -> None:
            super().__init__()  # type: ignore[no-untyped-call]
            self.phase = "other"
            self.ops: collections.Counter[tuple[str, bool]] = collections.Counter()

        def __torch_dispatch__(self, func: Any, types: Any, a: Any = (), kw: Any = None) -> Any:
            view = bool(func.is_view) or func.overloadpacket.__name__ in _METADATA_OPS
            self.ops[self.phase, view] += 1
            return func(*a, **(kw or {}))

    counter = Count()

    def mark(phase: str) -> None:
        counter.phase = phase

    @contextlib.contextmanager
    def region(name: str) -> Any:  # stands in for torch.profiler.record_function in train.py
        before, counter.phase = counter.phase, name.removeprefix("p3b.")
        try:
            yield
        finally:
            counter.phase = before

    torch.manual_seed(0)
    device = train.pick_device(PruneConfig(device=args.device))
    x, y = _batch(args, device)
    label = _first_variant(args)
    vargs = _variant_args(args, label)
    counts: dict[str, collections.Counter[tuple[str, bool]]] = {}
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(train, "record_function", region):
        base = train.build_model(_config(args, tmp)).to(device).train()
        sides = {
            "plain": _plain_step(copy.deepcopy(base), _config(args, tmp), device, mark),
            f"P3B, {label}": _p3b_step(copy.deepcopy(base), _config(vargs, tmp), device, Path(tmp))[0],
        }
        for name, step in sides.items():
            step(x, y)  # first step: optimiser state, caches
            counter.ops = collections.Counter()
            mark("other")
            with counter:
                step(x, y)
            counts[name] = counter.ops
    phases = ["forward", "backward", "taylor", "optimizer", "probes", "other"]
    rows = [
        f"aten operators per training step: {_describe_model(args)}, batch {args.batch_size}, "
        f"device {device}; "
        "each cell: ops that are not views (views and shape-only ops)",
        "",
        "| phase | " + " | ".join(counts) + " |",
        "|---|" + "---|" * len(counts),
    ]
    for phase in [*phases, "**step**"]:
        cells = []
        for c in counts.values():
            keys = phases if phase == "**step**" else [phase]
            ops, views = sum(c[k, False] for k in keys), sum(c[k, True] for k in keys)
            cells.append(f"{ops} ({views})")
        if phase == "**step**" or any(not cell.startswith("0 (0)") for cell in cells):
            rows.append(f"| {phase} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def _run_worker(kind: str, argv: Sequence[str]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, *argv, "--worker", kind]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"worker {kind} failed:\n{done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _machine(device: str) -> str:
    return describe(gpu=device != "cpu")


MODE_LABELS = {"default": "torch.compile", "reduce-overhead": "torch.compile + CUDA graphs",
               "max-autotune-no-cudagraphs": "torch.compile max-autotune"}  # fmt: skip


def table(args: argparse.Namespace, timing: dict[str, Any], plain: dict[str, dict[str, Any]],
          p3b: dict[str, dict[str, Any]], flops: dict[str, float] | None = None) -> str:  # fmt: skip
    """The markdown table: one column per plain step (eager, then each compile mode) and per P3B
    variant. A variant's ratios are to the plain step run the same way (eager or compiled in the
    same mode); a compiled variant also gives its time ratio to the eager plain step. With empty
    ``plain`` and ``p3b`` (``--timing-only``) the table has the timing rows (and ``flops``: each
    variant's :func:`probe_flop_share`) only."""
    cpu_mem = "peak RSS over the pre-model baseline (MiB)"
    mem = "peak CUDA memory (MiB)" if args.device.startswith("cuda") else cpu_mem
    t, tp = timing["variants"], timing["plains"]
    kinds, modes = list(t), list(tp)

    def own(k: str) -> dict[str, Any]:
        return plain[VARIANTS[k].mode]

    def step_cell(k: str) -> str:
        cell = f"{t[k]['median_ms']:.1f} ({t[k]['ratio']:.2f}x)"
        return cell if VARIANTS[k].mode == "off" else f"{cell}; {t[k]['ratio_eager']:.2f}x eager plain"

    plain_names = ["plain fine-tuning"] + [f"plain, {MODE_LABELS.get(m, m)}" for m in modes[1:]]
    rows = [
        "| | " + " | ".join(plain_names) + " | " + " | ".join(f"P3B, {k}" for k in kinds) + " |",
        "|---|" + "---|" * (len(modes) + len(kinds)),
        "| step (ms, amortised; ratio = median per-round ratio to the plain step run the same way) | "
        + " | ".join(f"{tp[m]['median_ms']:.1f}" + ("" if m == "off" else f" ({tp[m]['ratio']:.2f}x eager)")
                     for m in modes)
        + " | " + " | ".join(step_cell(k) for k in kinds) + " |",
        "| per-round ratio, min - max | " + " | ".join("1" for _ in modes) + " | "
        + " | ".join(f"{t[k]['ratio_min']:.2f} - {t[k]['ratio_max']:.2f}" for k in kinds)
        + " |",
    ]  # fmt: skip
    if flops:
        rows.append(
            "| probe FLOPs of a probed step (share of the plain step's, forward + backward) | "
            + " | ".join("-" for _ in modes) + " | " + " | ".join(f"{flops[k]:.2f}" for k in kinds) + " |"
        )  # fmt: skip
    if not plain or not p3b:
        return "\n".join(rows)
    rows += [
        f"| {mem} | " + " | ".join(f"{plain[m]['peak_mib']:.0f}" for m in modes) + " | "
        + " | ".join(
            f"{p3b[k]['peak_mib']:.0f} ({p3b[k]['peak_mib'] / max(own(k)['peak_mib'], 1e-9):.2f}x)"
            for k in kinds
        )
        + " |",
        "| activations kept for backward (MiB; eager forward) | "
        + " | ".join(f"{plain[m]['saved_mib']:.1f}" for m in modes) + " | "
        + " | ".join(
            f"{p3b[k]['saved_mib']:.1f} ({p3b[k]['saved_mib'] / own(k)['saved_mib']:.2f}x)" for k in kinds
        )
        + " |",
        "| re-allocation (once per window, ms) | " + " | ".join("-" for _ in modes) + " | "
        + " | ".join(f"{p3b[k]['update_ms']:.1f}" for k in kinds)
        + " |",
    ]  # fmt: skip
    return "\n".join(rows)


def write_doc(path: Path, generated: str) -> None:
    """``generated``, then the hand-written notes of the file it replaces (atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    notes = kept_notes(path)
    atomic_write_text(path, generated.rstrip("\n") + "\n" + (f"\n{notes.rstrip()}\n" if notes else ""))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument(
        "--model",
        help="a timm model name (random weights, 10 classes) instead of the shipped source model's "
        "architecture; the variants that set the probe width as a share need embed_dim in --model-kwargs",
    )
    p.add_argument(
        "--model-kwargs",
        help="timm kwargs (JSON); default without --model: the source architecture "
        + json.dumps(SOURCE_ARCH),
    )
    p.add_argument("--img-size", type=int, help="input side in pixels (default: the model's own)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=12, help="measured timing rounds (every variant once each)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured rounds first")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--probe", default="patch_conv", help=argparse.SUPPRESS)
    p.add_argument("--hidden-share", type=float, default=DEFAULT_SHARE, help=argparse.SUPPRESS)
    p.add_argument("--every", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--fraction", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--probe-dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--probe-impl", default="per-block", help=argparse.SUPPRESS)
    p.add_argument("--torch-compile", default="off", help=argparse.SUPPRESS)
    p.add_argument("--probe-graphs", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--variants",
        type=int,
        nargs="+",
        metavar="N",
        help="run only these P3B variants, by number: "
        + "; ".join(f"{i} {label}" for i, label in enumerate(VARIANTS, 1)),
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--write", help="also write the table as markdown to this file")
    p.add_argument(
        "--profile",
        metavar="FILE",
        help="instead of the benchmark: profile the plain step and the default P3B step (or the first "
        "of --variants) with torch.profiler, --rounds steps each, and write where the time goes to FILE",
    )
    p.add_argument(
        "--count-ops",
        action="store_true",
        help="instead of the benchmark: count the aten operators of one plain and one P3B step (the "
        "default, or the first of --variants) and print them as a table",
    )
    p.add_argument(
        "--timing-only",
        action="store_true",
        help="time the steps only: no memory workers (each compiled variant would compile once more "
        "in its own process); the table has the timing rows only",
    )
    p.add_argument("--worker", choices=("plain", "p3b", "timing"), help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    args = p.parse_args(argv)
    if args.variants and not all(1 <= i <= len(VARIANTS) for i in args.variants):
        p.error(f"--variants: numbers run from 1 to {len(VARIANTS)}, got {args.variants}")
    if args.model is not None and "embed_dim" not in json.loads(args.model_kwargs or "{}"):
        shared = [
            label for label in _selected(args)
            if VARIANTS[label].kind == "patch_conv" and VARIANTS[label].share != DEFAULT_SHARE
        ]  # fmt: skip
        if shared:
            p.error(
                f"--model {args.model}: variant(s) {', '.join(repr(v) for v in shared)} set the conv probe "
                "width as a share of embed_dim, which --model-kwargs does not give; leave them out"
            )
    if args.worker:
        print(json.dumps(timing_worker(args) if args.worker == "timing" else worker(args)))
        return 0
    try:
        train.pick_device(PruneConfig(device=args.device))  # before any worker: one clear line
    except P3BError as exc:
        print(f"bench_train_step.py: {exc}", file=sys.stderr)
        return 2
    if args.count_ops:
        print(count_ops(args))
        return 0
    if args.profile:
        text = profile(args)
        print(text)
        atomic_write_text(Path(args.profile), text)
        return 0
    timing = _run_worker("timing", argv)
    print("timing:", json.dumps(timing), flush=True)  # kept even if a memory worker is cut off
    plain: dict[str, dict[str, Any]] = {}
    p3b: dict[str, dict[str, Any]] = {}
    if not args.timing_only:
        plain = {mode: _run_worker("plain", [*argv, "--torch-compile", mode]) for mode in _modes(args)}
        p3b = {label: _run_worker("p3b", [*argv, *_variant_flags(label)]) for label in _selected(args)}
    flops = {label: probe_flop_share(args, label) for label in timing["variants"]}
    text = table(args, timing, plain, p3b, flops)
    print(text)
    if args.write:
        when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        head = (
            "# Training-step benchmark: P3B vs plain fine-tuning\n\n"
            f"Command: `{shlex.join(['python', 'tools/bench_train_step.py', *argv])}`, run {when}; "
            f"machine: {_machine(args.device)}; "
            f"device {args.device}, {args.threads} thread(s).\n"
            f"Model: {_describe_model(args)}; batch {args.batch_size}; "
            f"timing: {args.rounds} round-robin rounds after {args.warmup} warm-up rounds in one process; "
            + (
                "memory: not measured (--timing-only).\n\n"
                if args.timing_only
                else "memory: each variant in its own process.\n\n"
            )
        )
        write_doc(Path(args.write), head + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
