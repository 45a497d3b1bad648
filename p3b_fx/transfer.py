"""The transfer benchmark: one source model pruned on a target domain by every method, ratio and seed.

Pattern: a :class:`BenchSpec` (source model, target data, methods, ratios, seeds, epochs) expands into
one :class:`Job` per method x ratio x seed (``dense`` once per seed: it has no ratio), each an ordinary
:func:`p3b_fx.train.run` in its own run directory. Jobs run in worker processes (one torch thread
each); a job whose ``report.json`` was written with the same options is reused, an interrupted
P3B/uniform job resumes from its epoch checkpoint. Result: one record per job (the fields of
``report.json`` plus the benchmark's own, see :func:`make_record`), a mean +- std table, a check of
the issue's target figures, a two-panel Pareto plot and a Markdown section.
Why here and not in ``tools/``: the tool stays a thin CLI; this part is tested without a CLI.

MACs: every method's report counts its own way (P3B from its groups, the global baselines with
Torch-Pruning's counter), which differ by a few percent. The table and the plot therefore use
``macs_counted``: multiply-accumulates of one image through the saved final model, counted by
``torch.utils.flop_counter`` (matmuls, convolutions, attention) the same way for every method.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from contextlib import redirect_stderr
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from p3b_fx.config import METHODS, PruneConfig
from p3b_fx.errors import ConfigError

logger = logging.getLogger(__name__)

DENSE = "dense"
BASELINES = ("uniform", "global-taylor", "global-magnitude")

IGNORED_OPTIONS = frozenset({"out", "resume", "force", "device", "probe_impl", "torch_compile"})
"""Options that may differ between a finished run and the job that would reuse it (where and how
it ran, not what it computes)."""

DOC_BEGIN = "<!-- bench-transfer:begin (written by tools/bench_transfer.py) -->"
DOC_END = "<!-- bench-transfer:end -->"

TARGETS = ((0.5, 0.5), (0.7, 1.5))
"""(prune ratio, largest allowed drop of P3B below dense in top-1 points), from the issue."""


# --- jobs ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchSpec:
    """The benchmark's settings; ``base`` holds the options every run shares (model, data, epochs...)."""

    base: Mapping[str, Any]
    methods: tuple[str, ...]
    ratios: tuple[float, ...]
    seeds: tuple[int, ...]
    out: str

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ConfigError(f"--methods {list(self.methods)}: pick one or more of {', '.join(METHODS)}")
        if not self.seeds:
            raise ConfigError("--seeds is empty; give at least one seed")
        if any(m != DENSE for m in self.methods) and not self.ratios:
            raise ConfigError(
                "--ratios is empty; give at least one prune ratio in (0, 1) for the pruning methods"
            )
        reserved = sorted({"method", "prune_ratio", "seed", "out", "resume", "force"} & set(self.base))
        if reserved:
            raise ConfigError(f"base options {reserved} are set per job by the benchmark; remove them")


@dataclass(frozen=True)
class Job:
    """One run of the benchmark."""

    method: str
    ratio: float | None
    seed: int
    config: PruneConfig = field(compare=False)

    @property
    def name(self) -> str:
        return job_name(self.method, self.ratio, self.seed)


def job_name(method: str, ratio: float | None, seed: int) -> str:
    return f"{method}-seed{seed}" if ratio is None else f"{method}-pr{ratio:g}-seed{seed}"


def plan_jobs(spec: BenchSpec) -> list[Job]:
    """Every job, seed-major (a benchmark cut short still has whole seeds), dense first within a seed."""
    jobs: list[Job] = []
    for seed in spec.seeds:
        for method in sorted(spec.methods, key=lambda m: m != DENSE):
            for ratio in [None] if method == DENSE else list(spec.ratios):
                out = str(Path(spec.out) / job_name(method, ratio, seed))
                options = {**spec.base, "method": method, "seed": seed, "out": out}
                if ratio is not None:
                    options["prune_ratio"] = ratio
                jobs.append(Job(method, ratio, seed, PruneConfig.from_mapping(options, where="benchmark")))
    return jobs


def finished_report(job: Job) -> dict[str, Any] | None:
    """The job's ``report.json`` when it exists and was written with the job's options, else None.

    Raises :class:`ConfigError` when the report belongs to other options (rerun with ``force``).
    """
    path = Path(job.config.out) / "report.json"
    if not path.is_file():
        return None
    try:
        report: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        logger.warning("%s is unreadable; the run is repeated", path)
        return None
    saved, now = report.get("config", {}), job.config.to_dict()
    diff = sorted(k for k in now.keys() & saved.keys() if k not in IGNORED_OPTIONS and saved[k] != now[k])
    if diff:
        raise ConfigError(
            f"{path} was written with other options ({', '.join(f'{k}={saved[k]!r}' for k in diff[:4])}); "
            "pass --force to rerun it, or another --out"
        )
    return report


def start_options(job: Job, force: bool) -> dict[str, bool]:
    """``resume``/``force`` for a job that has no finished report: resume its checkpoint (every method
    writes one per epoch), else start fresh."""
    ckpt = Path(job.config.out) / "checkpoint.pt"
    if not force and ckpt.is_file():
        return {"resume": True, "force": False}
    return {"resume": False, "force": True}


def run_job(config: PruneConfig, threads: int) -> dict[str, Any]:
    """Worker entry point: one run with ``threads`` torch threads.

    Its log, warnings and progress bars go to ``<out>/bench.log`` (parallel runs would garble a terminal).
    """
    torch.set_num_threads(threads)
    from p3b_fx.train import run  # noqa: PLC0415 - heavy import, only in the worker

    Path(config.out).mkdir(parents=True, exist_ok=True)
    with (Path(config.out) / "bench.log").open("a", encoding="utf-8") as log, redirect_stderr(log):
        handler = logging.StreamHandler(log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        level, root.level = root.level, logging.INFO
        try:
            return run(config)
        finally:
            root.removeHandler(handler)
            root.setLevel(level)


# --- records --------------------------------------------------------------------------------------------


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass on zeros of ``input_shape`` (matmul, conv, attention)."""
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    was = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(*input_shape))
    model.train(was)
    return int(counter.get_total_flops()) // 2


def final_model(job: Job, report: Mapping[str, Any]) -> nn.Module:
    """The job's final model: ``slim.pt`` of a pruning run, the rebuilt architecture for dense."""
    from p3b_fx import data as data_mod  # noqa: PLC0415
    from p3b_fx import train  # noqa: PLC0415

    if job.method != DENSE and report.get("slim"):
        model: nn.Module = torch.load(report["slim"], map_location="cpu", weights_only=False)
        return model
    model = train.build_model(job.config)
    train.fit_head(model, job.config.num_classes or data_mod.num_classes_of(job.config.data), job.config)
    return model


def input_side(config: PruneConfig) -> int:
    """Input image side of the configured model (a slim GraphModule no longer knows it)."""
    keys = ("model", "model_kwargs", "checkpoint", "img_size", "num_classes", "data")
    return _input_side(json.dumps({k: config.to_dict()[k] for k in keys}, sort_keys=True))


@functools.cache
def _input_side(key: str) -> int:
    from p3b_fx import train  # noqa: PLC0415

    config = PruneConfig.from_mapping(json.loads(key), where="benchmark")
    return train.model_input(train.build_model(config), config)[0]


def make_record(job: Job, report: Mapping[str, Any]) -> dict[str, Any]:
    """``report.json``'s fields plus ``seed``, ``run`` (directory), ``params_counted`` and ``macs_counted``.

    ``prune_ratio`` of a dense record is 0.0 (its config's ratio is unused).
    """
    model = final_model(job, report)
    side = input_side(job.config)
    record = {**report, "seed": job.seed, "run": job.config.out}
    record["prune_ratio"] = 0.0 if job.method == DENSE else job.ratio
    record["params_counted"] = sum(p.numel() for p in model.parameters())
    record["macs_counted"] = count_macs(model, (1, 3, side, side))
    return record


# --- running --------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What :func:`run_benchmark` produced: records in job order, failures by job name, reuse count."""

    records: list[dict[str, Any]]
    failures: dict[str, str]
    reused: int


def run_benchmark(
    jobs: Sequence[Job],
    *,
    workers: int,
    threads: int = 1,
    force: bool = False,
    on_record: Callable[[list[dict[str, Any]]], None] | None = None,
    progress: Callable[[int, int], Any] | None = None,
) -> Outcome:
    """Run (or reuse) every job; ``on_record(records so far)`` after each finished job.

    ``workers == 1`` runs in this process; more use spawned worker processes. ``progress(total,
    initial)`` returns an object with ``update(n)`` and ``close()`` (tqdm).
    """
    done: dict[str, dict[str, Any]] = {}
    todo: list[Job] = []
    for job in jobs:
        report = None if force else finished_report(job)
        if report is None:
            todo.append(job)
        else:
            done[job.name] = make_record(job, report)
    reused = len(done)
    bar = progress(len(jobs), reused) if progress is not None else None
    failures: dict[str, str] = {}

    def finish(job: Job, get: Callable[[], dict[str, Any]]) -> None:
        try:
            done[job.name] = make_record(job, get())
        except Exception as exc:  # a failed run must not stop the others; it is reported below
            failures[job.name] = f"{type(exc).__name__}: {exc}"
            logger.error(
                "run %s failed: %s (log: %s/bench.log)", job.name, failures[job.name], job.config.out
            )
        if bar is not None:
            bar.update(1)
        if on_record is not None:
            on_record(ordered(jobs, done))

    configs = {job.name: job.config.replace(**start_options(job, force)) for job in todo}
    if workers <= 1:
        for job in todo:
            finish(job, functools.partial(run_job, configs[job.name], threads))
    else:
        _run_pool(todo, configs, workers, threads, finish)
    if bar is not None:
        bar.close()
    return Outcome(ordered(jobs, done), failures, reused)


def collect(jobs: Sequence[Job]) -> Outcome:
    """The records of the jobs that have finished, running nothing (a table from a partial benchmark)."""
    done = {}
    for job in jobs:
        report = finished_report(job)
        if report is not None:
            done[job.name] = make_record(job, report)
    missing = {job.name: "not run yet" for job in jobs if job.name not in done}
    return Outcome(ordered(jobs, done), missing, len(done))


def _run_pool(
    todo: Sequence[Job],
    configs: Mapping[str, PruneConfig],
    workers: int,
    threads: int,
    finish: Callable[[Job, Callable[[], dict[str, Any]]], None],
) -> None:
    import multiprocessing  # noqa: PLC0415

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures: dict[Future[dict[str, Any]], Job] = {
            pool.submit(run_job, configs[job.name], threads): job for job in todo
        }
        for fut in as_completed(futures):
            finish(futures[fut], fut.result)


def ordered(jobs: Sequence[Job], done: Mapping[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [done[job.name] for job in jobs if job.name in done]


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# --- aggregation and table ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (ddof 1; 0.0 for one value) of ``n`` values."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Stat:
        xs = [float(v) for v in values]
        if not xs:
            raise ValueError("Stat.of needs at least one value")
        mean = sum(xs) / len(xs)
        var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) if len(xs) > 1 else 0.0
        return cls(mean, math.sqrt(var), len(xs))


@dataclass(frozen=True)
class Row:
    """One method at one prune ratio (0.0 for dense), over seeds: top-1 in %, params, MACs."""

    method: str
    ratio: float
    top1: Stat
    params: Stat
    macs: Stat
    seeds: tuple[int, ...]
    top1_by_seed: tuple[float, ...] = ()
    """Top-1 in % per seed, in the order of ``seeds`` (empty where unknown)."""


def paired_gap(row: Row, dense: Row) -> Stat | None:
    """``row`` minus ``dense`` in points, seed by seed (same seed, same data order): mean, std, n.

    Both sides of a seed share the split, the batch order and the augmentation draws, so the
    per-seed difference cancels what the seed does to both; its standard error,
    std / sqrt(n), is the uncertainty of the gap. None when no seed is in both rows.
    """
    theirs = dict(zip(dense.seeds, dense.top1_by_seed, strict=False))
    diffs = [v - theirs[s] for s, v in zip(row.seeds, row.top1_by_seed, strict=False) if s in theirs]
    return Stat.of(diffs) if diffs else None


def aggregate(records: Sequence[Mapping[str, Any]]) -> list[Row]:
    """One :class:`Row` per (method, ratio), dense first, then by ratio and the order of ``METHODS``."""
    keys = sorted(
        {(str(r["method"]), float(r["prune_ratio"])) for r in records},
        key=lambda k: (k[0] != DENSE, k[1], METHODS.index(k[0]) if k[0] in METHODS else len(METHODS)),
    )
    return [_row(method, ratio, records) for method, ratio in keys]


def _row(method: str, ratio: float, records: Sequence[Mapping[str, Any]]) -> Row:
    group = [r for r in records if r["method"] == method and float(r["prune_ratio"]) == ratio]
    top1 = Stat.of(100.0 * float(r["top1"]) for r in group)
    params = Stat.of(float(r["params_counted"]) for r in group)
    macs = Stat.of(float(r["macs_counted"]) for r in group)
    seeds = tuple(int(r["seed"]) for r in group)
    return Row(method, ratio, top1, params, macs, seeds, tuple(100.0 * float(r["top1"]) for r in group))


def format_stat(stat: Stat, digits: int = 2) -> str:
    return f"{stat.mean:.{digits}f} ± {stat.std:.{digits}f}" if stat.n > 1 else f"{stat.mean:.{digits}f}"


def format_table(rows: Sequence[Row]) -> str:
    """Markdown table: method, ratio, top-1 (mean ± std), gap to dense, params and MACs (millions).

    The gap is the mean of the per-seed differences to dense ± their standard error where seeds
    pair up (:func:`paired_gap`), else the difference of the means.
    """
    dense = next((r for r in rows if r.method == DENSE), None)
    lines = [
        "| method | prune ratio | top-1 % (mean ± std) | vs dense (points, paired by seed: mean ± s.e.) "
        "| params (M) | MACs/image (M) | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gap = "" if dense is None or r is dense else _gap(r, dense)
        ratio = "-" if r.method == DENSE else f"{r.ratio:g}"
        lines.append(
            f"| {r.method} | {ratio} | {format_stat(r.top1)} | {gap} | {r.params.mean / 1e6:.3f} | "
            f"{r.macs.mean / 1e6:.2f} | {r.top1.n} |"
        )
    return "\n".join(lines)


def _gap(row: Row, dense: Row) -> str:
    paired = paired_gap(row, dense)
    if paired is None or paired.n < 2:
        return f"{row.top1.mean - dense.top1.mean:+.2f}"
    return f"{paired.mean:+.2f} ± {paired.std / math.sqrt(paired.n):.2f}"


@dataclass(frozen=True)
class TargetCheck:
    """One of the issue's target figures: what it asks, the measured value, whether it is reached."""

    what: str
    measured: str
    reached: bool | None  # None: not measurable from these records


def check_targets(rows: Sequence[Row]) -> list[TargetCheck]:
    """P3B within 0.5 points of dense at 0.5 and within 1.5 at 0.7; P3B ahead of every baseline at 0.7."""
    by = {(r.method, r.ratio): r for r in rows}
    dense = next((r for r in rows if r.method == DENSE), None)
    checks = []
    for ratio, tol in TARGETS:
        p3b = by.get(("p3b", ratio))
        what = f"P3B at {ratio:g} within {tol:g} points of dense"
        if p3b is None or dense is None:
            checks.append(TargetCheck(what, "not measured", None))
            continue
        gap = p3b.top1.mean - dense.top1.mean
        checks.append(TargetCheck(what, f"{gap:+.2f} points", gap >= -tol))
    p3b = by.get(("p3b", 0.7))
    rivals = [r for r in rows if r.ratio == 0.7 and r.method in BASELINES]
    what = "P3B ahead of every baseline at 0.7"
    if p3b is None or not rivals:
        checks.append(TargetCheck(what, "not measured", None))
    else:
        best = max(rivals, key=lambda r: r.top1.mean)
        margin = p3b.top1.mean - best.top1.mean
        checks.append(TargetCheck(what, f"{margin:+.2f} points vs best baseline ({best.method})", margin > 0))
    return checks


def format_checks(checks: Sequence[TargetCheck]) -> str:
    mark = {True: "reached", False: "**not reached**", None: "not measured"}
    return "\n".join(f"- {c.what}: {c.measured} — {mark[c.reached]}" for c in checks)


# --- plot and doc ----------------------------------------------------------------------------------------


def pareto_plot(rows: Sequence[Row], path: Path, title: str = "") -> Path:
    """Two panels, top-1 vs parameters and top-1 vs MACs, mean ± std error bars, one marker per method."""
    import matplotlib  # noqa: PLC0415 - heavy import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.0), sharey=True)
    for ax, attr, label in ((axes[0], "params", "parameters (M)"), (axes[1], "macs", "MACs per image (M)")):
        for method in dict.fromkeys(r.method for r in rows):
            mine = sorted((r for r in rows if r.method == method), key=lambda r: getattr(r, attr).mean)
            _draw(ax, mine, attr, method)
        dense = next((r for r in rows if r.method == DENSE), None)
        if dense is not None:
            ax.axhline(dense.top1.mean, color="gray", linestyle="--", linewidth=0.8)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 (%)")
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _draw(ax: Any, rows: Sequence[Row], attr: str, method: str) -> None:
    """One method's points (joined when there are several ratios) with mean ± std error bars."""
    markers = dict(zip(METHODS, ("o", "*", "s", "^", "v"), strict=True))
    ax.errorbar(
        [getattr(r, attr).mean / 1e6 for r in rows],
        [r.top1.mean for r in rows],
        yerr=[r.top1.std for r in rows],
        xerr=[getattr(r, attr).std / 1e6 for r in rows],
        marker=markers.get(method, "x"),
        markersize=11 if method == DENSE else 7,
        capsize=3,
        linestyle="-" if len(rows) > 1 else "none",
        label=method,
    )


def update_doc(path: Path, generated: str, header: str) -> None:
    """Put ``generated`` between the markers of ``path`` (kept text outside them); new file: header first."""
    block = f"{DOC_BEGIN}\n{generated.rstrip()}\n{DOC_END}"
    text = (
        path.read_text(encoding="utf-8")
        if path.is_file()
        else f"{header.rstrip()}\n\n{DOC_BEGIN}\n{DOC_END}\n"
    )
    if DOC_BEGIN not in text or DOC_END not in text:
        text = f"{text.rstrip()}\n\n{DOC_BEGIN}\n{DOC_END}\n"
    pattern = re.compile(re.escape(DOC_BEGIN) + r".*?" + re.escape(DOC_END), re.DOTALL)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(pattern.sub(lambda _: block, text, count=1), encoding="utf-8")
    os.replace(tmp, path)


def spec_summary(spec: BenchSpec) -> dict[str, Any]:
    """The settings shared by every run, for the doc and the JSON file."""
    base = PruneConfig.from_mapping(spec.base, where="benchmark")
    keys = ("model", "checkpoint", "model_kwargs", "data", "num_classes", "epochs", "finetune_epochs",
            "lr_decay", "batch_size", "lr", "probe", "probe_dtype", "probe_every", "probe_fraction",
            "probe_hidden", "budget", "max_steps_per_epoch", "augment")  # fmt: skip
    out = {k: v for k, v in dataclasses.asdict(base).items() if k in keys}
    out["model_kwargs"] = dict(base.model_kwargs)
    out.update(methods=list(spec.methods), ratios=list(spec.ratios), seeds=list(spec.seeds), out=spec.out)
    return out
