"""Measured inference latency of dense and slim models, side by side, and how it compares with FLOPs.

Pattern: every model of a comparison gets a *runner* (one synchronous inference, inputs prepared
once); rounds run each runner once in turn (A B A B …) after a warm-up, and the result per model is
the median with p10/p90 over the rounds. Result: a frozen :class:`LatencyResult` per model.
Why interleave: on a shared machine other processes, frequency changes and cache state drift over
seconds; interleaving makes that noise hit dense and slim alike, so their ratio stays honest.

Back ends: ONNX Runtime on the CPU (``intra_op_num_threads`` = threads, one inter-op thread,
sequential execution, every graph optimisation) always; torch fp16 with CUDA graphs, ONNX Runtime's
CUDA provider and TensorRT (through :func:`p3b_fx.export.tensorrt.build_engine`, fp16) where this
machine has them. A back end that cannot run here is skipped with the reason, never silently.

Also here: :func:`uniform_plan`, a keep plan that meets a parameter reduction with the same keep
ratio in every gate of a granularity (for benchmarks: the speed of a shape, not of a method), and
:func:`ort_cpu_report`, the dense-vs-slim ONNX Runtime CPU entry of the main job's ``report.json``.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import logging
import random
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

import p3b_fx
from p3b_fx.core.groups import GroupSet
from p3b_fx.core.plan import KeepPlan
from p3b_fx.errors import ConfigError, TargetUnavailableError
from p3b_fx.export.jetpack import JetPack
from p3b_fx.export.onnx import export_onnx
from p3b_fx.export.tensorrt import build_engine, tensorrt_available
from p3b_fx.train import gate_specs

logger = logging.getLogger(__name__)

Runner = Callable[[], None]
"""One synchronous inference on inputs prepared when the runner was made."""

ORT_CPU = "onnxruntime-cpu"
ORT_CUDA = "onnxruntime-cuda"
TORCH_CUDA = "torch-cuda-fp16-graphs"
TENSORRT = "tensorrt-fp16"
BACKENDS = (ORT_CPU, ORT_CUDA, TORCH_CUDA, TENSORRT)

PLAN_TOLERANCE = 0.01
"""Relative distance from the parameter target that :func:`uniform_plan` accepts."""


class BackendUnavailableError(TargetUnavailableError):
    """A latency back end cannot run on this machine (no CUDA device, provider or TensorRT)."""


@dataclass(frozen=True)
class LatencyResult:
    """Wall-clock milliseconds of one inference of ``batch`` samples on ``backend``."""

    backend: str
    batch: int
    threads: int | None  # CPU threads (ONNX Runtime CPU); None on CUDA back ends
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


Measured = tuple[LatencyResult | None, str]
"""A result and ``""``, or ``None`` and why the back end was skipped."""


@dataclass(frozen=True)
class Comparison:
    """Dense vs slim: ``speedup`` = dense / slim time, ``flop_ratio`` = dense / slim FLOPs."""

    dense_ms: float
    slim_ms: float
    speedup: float
    flop_ratio: float
    efficiency: float  # speedup / flop_ratio: 1.0 when every saved FLOP turns into saved time


def compare(dense: LatencyResult, slim: LatencyResult, flops_dense: int, flops_slim: int) -> Comparison:
    """Speed-up, FLOP ratio and their quotient of a dense/slim pair measured on one back end."""
    if dense.backend != slim.backend or dense.batch != slim.batch:
        raise ConfigError(
            f"compare() needs one back end and batch: dense is {dense.backend}/b{dense.batch}, slim is "
            f"{slim.backend}/b{slim.batch}; measure both in one interleaved run"
        )
    if flops_dense <= 0 or flops_slim <= 0 or dense.median_ms <= 0 or slim.median_ms <= 0:
        raise ConfigError(
            f"compare() needs positive FLOPs and times, got FLOPs {flops_dense}/{flops_slim} and "
            f"{dense.median_ms}/{slim.median_ms} ms"
        )
    speedup = dense.median_ms / slim.median_ms
    flop_ratio = flops_dense / flops_slim
    return Comparison(dense.median_ms, slim.median_ms, speedup, flop_ratio, speedup / flop_ratio)


# --- timing ---------------------------------------------------------------------------------------


def interleaved(
    runners: Sequence[Runner],
    *,
    runs: int,
    warmup: int,
    budget_s: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> list[list[float]]:
    """Milliseconds per run of every runner, measured in rounds (r0 r1 … r0 r1 …) after ``warmup`` each.

    With ``budget_s`` the rounds stop once that many seconds have passed, after at least 3 rounds.
    """
    if runs < 1 or warmup < 0 or not runners:
        raise ConfigError(f"need runs >= 1, warmup >= 0 and a runner; got runs={runs}, warmup={warmup}")
    for run in runners:
        for _ in range(warmup):
            run()
    samples: list[list[float]] = [[] for _ in runners]
    start = clock()
    for done in range(runs):
        if budget_s is not None and done >= 3 and clock() - start > budget_s:
            break
        for run, times in zip(runners, samples, strict=True):
            t0 = clock()
            run()
            times.append((clock() - t0) * 1e3)
    return samples


def summarize(samples_ms: Sequence[float], backend: str, batch: int, threads: int | None) -> LatencyResult:
    ms = np.asarray(samples_ms, dtype=np.float64)
    p10, median, p90 = (float(v) for v in np.percentile(ms, [10, 50, 90]))
    return LatencyResult(backend, batch, threads, median, p10, p90, len(ms))


@dataclass(frozen=True)
class Setting:
    """Where and how to measure: back end, batch size, CPU threads and whether ONNX Runtime's idle
    intra-op threads spin (ONNX Runtime CPU only; see :func:`ort_session`)."""

    backend: str
    batch: int
    threads: int | None = None
    spin: bool = False

    @property
    def key(self) -> str:
        if self.threads is None:
            return f"b{self.batch}"
        return f"b{self.batch}_t{self.threads}" + ("_spin" if self.spin else "")


@dataclass(frozen=True)
class Variant:
    """One model to time: its torch module and a static-batch ONNX file per batch size."""

    name: str
    module: nn.Module
    input_shape: tuple[int, ...]  # one sample, without the batch axis
    onnx: Mapping[int, Path] = field(default_factory=dict)


def measure(
    setting: Setting,
    variants: Sequence[Variant],
    *,
    runs: int,
    warmup: int,
    workdir: Path | None = None,
    budget_s: float | None = None,
) -> tuple[tuple[LatencyResult, ...] | None, str]:
    """Every variant timed interleaved on ``setting``; ``(None, reason)`` where the back end cannot run."""
    try:
        runners = [make_runner(setting, v, workdir) for v in variants]
    except BackendUnavailableError as exc:
        logger.info("skipping %s: %s", setting.backend, exc)
        return None, str(exc)
    samples = interleaved(runners, runs=runs, warmup=warmup, budget_s=budget_s)
    return tuple(summarize(s, setting.backend, setting.batch, setting.threads) for s in samples), ""


def make_runner(setting: Setting, variant: Variant, workdir: Path | None = None) -> Runner:
    if setting.backend == TORCH_CUDA:
        return torch_cuda_runner(variant.module, setting.batch, variant.input_shape)
    path = variant.onnx.get(setting.batch)
    if path is None:
        raise ConfigError(f"variant {variant.name!r} has no ONNX file for batch {setting.batch}; export one")
    if setting.backend == ORT_CPU:
        return ort_runner(path, setting.batch, setting.threads or 1, spin=setting.spin)
    if setting.backend == ORT_CUDA:
        return ort_cuda_runner(path, setting.batch)
    if setting.backend == TENSORRT:
        return tensorrt_runner(path, setting.batch, workdir or path.parent)
    raise ConfigError(f"unknown latency back end {setting.backend!r}; choose one of {', '.join(BACKENDS)}")


# --- back ends --------------------------------------------------------------------------------------


def ort_op_times(path: str | Path, batch: int, threads: int, *, runs: int = 5) -> dict[str, float]:
    """Milliseconds per inference spent in each ONNX op type (ONNX Runtime CPU's own profiler).

    One warm-up run, then ``runs`` profiled runs; kernel time per op type, averaged per run, largest
    first. Op types are those of the *optimised* graph ORT executes (fusions such as
    ``FusedMatMul`` or ``SkipLayerNormalization`` show up under their own names).
    """
    if runs < 1:
        raise ConfigError(f"runs must be >= 1, got {runs}")
    with tempfile.TemporaryDirectory() as tmp:
        session = ort_session(Path(path), threads, ["CPUExecutionProvider"], profile=Path(tmp) / "ort")
        name, x = _ort_input(session, Path(path), batch)
        session.run(None, {name: x})  # warm-up: profiled too, left out below
        for _ in range(runs):
            session.run(None, {name: x})
        events = json.loads(Path(session.end_profiling()).read_text(encoding="utf-8"))
    model_runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    windows = [(e["ts"], e["ts"] + e["dur"]) for e in model_runs[1:]]
    totals: dict[str, float] = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        if not any(lo <= e["ts"] <= hi for lo, hi in windows):
            continue
        op = str(e.get("args", {}).get("op_name", "?"))
        totals[op] = totals.get(op, 0.0) + e["dur"] / 1000.0
    return dict(sorted(((k, v / runs) for k, v in totals.items()), key=lambda kv: -kv[1]))


def ort_session(
    path: Path, threads: int, providers: Sequence[str], *, profile: Path | None = None, spin: bool = False
) -> ort.InferenceSession:
    """A sequential session with every graph optimisation and ``threads`` intra-op threads.

    ``spin``: ONNX Runtime's default lets idle intra-op threads spin-wait for the next op. Off here
    (``session.intra_op.allow_spinning = 0``) unless asked: on this 2-core machine spinning made the
    2-thread runs slower for dense and slim alike, and more so for the slim models' shorter ops
    (``docs/bench-latency.md`` measures both).
    """
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if profile is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(profile)
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=list(providers))


def _ort_input(session: ort.InferenceSession, path: Path, batch: int) -> tuple[str, np.ndarray]:
    meta = session.get_inputs()[0]
    dims = [batch if i == 0 and not isinstance(d, int) else d for i, d in enumerate(meta.shape)]
    if dims[0] != batch or not all(isinstance(d, int) for d in dims):
        raise ConfigError(
            f"{path}: input {meta.name!r} has shape {meta.shape}, not batch {batch} with a static sample "
            "shape; export the model at this batch size"
        )
    x = np.random.default_rng(0).standard_normal(dims, dtype=np.float32)
    return str(meta.name), x


def ort_runner(path: Path, batch: int, threads: int, *, spin: bool = False) -> Runner:
    """ONNX Runtime CPU: ``threads`` intra-op threads, sequential, all graph optimisations."""
    session = ort_session(path, threads, ["CPUExecutionProvider"], spin=spin)
    name, x = _ort_input(session, path, batch)
    feeds = {name: x}

    def run() -> None:
        session.run(None, feeds)

    return run


def ort_cuda_available() -> tuple[bool, str]:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, f"ONNX Runtime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu)"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible"
    return True, ""


def ort_cuda_runner(path: Path, batch: int) -> Runner:
    """ONNX Runtime's CUDA provider, input and output bound on the device (no host copies timed)."""
    ok, why = ort_cuda_available()
    if not ok:
        raise BackendUnavailableError(why)
    session = ort_session(path, 1, ["CUDAExecutionProvider"])
    name, x = _ort_input(session, path, batch)
    binding = session.io_binding()
    binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
    for out in session.get_outputs():
        binding.bind_output(out.name, "cuda")

    def run() -> None:
        session.run_with_iobinding(binding)

    return run


def torch_cuda_runner(
    model: nn.Module, batch: int, input_shape: tuple[int, ...], *, fp16: bool = True, cuda_graphs: bool = True
) -> Runner:
    """A copy of ``model`` on the GPU (fp16 if asked), replayed from a CUDA graph if asked."""
    if not torch.cuda.is_available():
        raise BackendUnavailableError("no CUDA device is visible to torch")
    dtype = torch.float16 if fp16 else torch.float32
    net = copy.deepcopy(model).eval().to(device="cuda", dtype=dtype)
    x = torch.randn((batch, *input_shape), device="cuda", dtype=dtype)
    with torch.inference_mode():
        if not cuda_graphs:
            return _synchronized(lambda: net(x))
        side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # CUDA graphs need a warmed-up side stream before capture
                net(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = net(x)
    static = (net, x, y)  # the graph replays on these addresses: they must outlive it

    def replay() -> None:
        _ = static
        graph.replay()

    return _synchronized(replay)


def _synchronized(step: Callable[[], object]) -> Runner:
    def run() -> None:
        with torch.inference_mode():
            step()
        torch.cuda.synchronize()

    return run


def tensorrt_runner(path: Path, batch: int, workdir: Path) -> Runner:
    """A TensorRT fp16 engine built here from ``path`` (static batch), run with ``execute_async_v3``."""
    ok, why = tensorrt_available()
    if not ok:
        raise BackendUnavailableError(why)
    trt = importlib.import_module("tensorrt")
    engine_path = workdir / f"{path.stem}.b{batch}.engine"
    report = build_engine(path, engine_path, fp16=True)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(report.engine_path.read_bytes())
    context = engine.create_execution_context()
    buffers = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        np_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
        dtype = torch.from_numpy(np.zeros(1, dtype=np_dtype)).dtype
        buf = torch.randn(tuple(engine.get_tensor_shape(name)), device="cuda").to(dtype)
        context.set_tensor_address(name, buf.data_ptr())
        buffers.append(buf)
    stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]

    def run() -> None:
        _ = (runtime, engine, buffers)  # keep them alive as long as the runner
        context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()

    return run


# --- single-model measurements ----------------------------------------------------------------------


def measure_ort(
    onnx_path: str | Path, batch: int, threads: int, *, runs: int = 30, warmup: int = 3
) -> LatencyResult:
    """ONNX Runtime CPU latency of one static-batch ONNX file."""
    samples = interleaved([ort_runner(Path(onnx_path), batch, threads)], runs=runs, warmup=warmup)
    return summarize(samples[0], ORT_CPU, batch, threads)


def _measure_one(backend: str, make: Callable[[], Runner], batch: int, runs: int, warmup: int) -> Measured:
    try:
        runner = make()
    except BackendUnavailableError as exc:
        return None, str(exc)
    samples = interleaved([runner], runs=runs, warmup=warmup)
    return summarize(samples[0], backend, batch, None), ""


def measure_torch_cuda(
    model: nn.Module,
    batch: int,
    *,
    input_shape: tuple[int, ...],
    fp16: bool = True,
    cuda_graphs: bool = True,
    runs: int = 100,
    warmup: int = 10,
) -> Measured:
    """torch on the GPU (fp16, CUDA graphs by default); ``(None, reason)`` without CUDA."""
    make = functools.partial(torch_cuda_runner, model, batch, input_shape, fp16=fp16, cuda_graphs=cuda_graphs)
    return _measure_one(TORCH_CUDA, make, batch, runs, warmup)


def measure_ort_cuda(onnx_path: str | Path, batch: int, *, runs: int = 100, warmup: int = 10) -> Measured:
    """ONNX Runtime's CUDA provider; ``(None, reason)`` without it or without a CUDA device."""
    make = functools.partial(ort_cuda_runner, Path(onnx_path), batch)
    return _measure_one(ORT_CUDA, make, batch, runs, warmup)


def measure_tensorrt(
    onnx_path: str | Path, batch: int, *, workdir: str | Path, runs: int = 100, warmup: int = 10
) -> Measured:
    """A TensorRT fp16 engine built here; ``(None, reason)`` without TensorRT or a CUDA device."""
    make = functools.partial(tensorrt_runner, Path(onnx_path), batch, Path(workdir))
    return _measure_one(TENSORRT, make, batch, runs, warmup)


# --- benchmark plans ----------------------------------------------------------------------------------


def uniform_plan(
    groups: GroupSet,
    reduction: float,
    granularity: str,
    *,
    round_to: int = 8,
    seed: int = 0,
    tolerance: float = PLAN_TOLERANCE,
) -> KeepPlan:
    """A plan removing ``reduction`` of the parameters (within ``tolerance``, relative) with one keep
    ratio in every gate.

    ``granularity`` is the training's (``reference``: read, head_dim, write, hidden channels;
    ``deploy``: whole heads and hidden neurons in multiples of ``round_to``). Gates too coarse for
    the target (few heads) keep the uniform ratio's count; the finer gates are then re-fitted.
    Kept elements are a seeded random subset: latency does not depend on which ones survive.
    """
    if not 0.0 <= reduction < 1.0:
        raise ConfigError(f"reduction must be in [0, 1), got {reduction}")
    specs = [s for block in gate_specs(groups, granularity, round_to).values() for s in block]
    target = (1.0 - reduction) * groups.params_total
    counts = _fit(groups, specs, {}, target)
    if abs(groups.model_params(counts) / target - 1) > tolerance:
        coarse = {s.name: counts[s.name] for s in specs if s.size // s.round_to <= 16}
        counts = _fit(groups, [s for s in specs if s.name not in coarse], coarse, target)
    got = groups.model_params(counts)
    if abs(got / target - 1) > tolerance:
        raise ConfigError(
            f"no uniform {granularity} plan reaches {reduction:.0%} fewer parameters within {tolerance:.0%} "
            f"(closest: {1 - got / groups.params_total:.1%}); raise the tolerance or try another granularity"
        )
    rng = random.Random(seed)
    keep = {name: sorted(rng.sample(range(groups.group(name).size), n)) for name, n in counts.items()}
    return KeepPlan.from_mapping(groups, keep)


def _fit(groups: GroupSet, specs: Sequence[Any], fixed: Mapping[str, int], target: float) -> dict[str, int]:
    """Kept counts (``fixed`` plus one ratio over ``specs``) whose parameter count is nearest ``target``."""

    def counts(ratio: float) -> dict[str, int]:
        own = {s.name: s.round_count(round(s.size * ratio), s.min_keep) for s in specs}
        return {**fixed, **own}

    lo, hi = 0.0, 1.0
    for _ in range(40):  # params(ratio) is a non-decreasing step function: find the step at target
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if groups.model_params(counts(mid)) < target else (lo, mid)
    return min((counts(lo), counts(hi)), key=lambda c: abs(groups.model_params(c) - target))


# --- the main job's report entry ----------------------------------------------------------------------

REPORT_SETTINGS = (Setting(ORT_CPU, 1, 1), Setting(ORT_CPU, 8, 2))


def export_variants(
    models: Mapping[str, nn.Module], input_shape: tuple[int, ...], batches: Sequence[int], jetpack: JetPack,
    workdir: Path, *, simplify: bool = False,
) -> list[Variant]:  # fmt: skip
    """Each model exported as static-batch ONNX for ``jetpack`` at every batch size, into ``workdir``.

    ``simplify``: run onnxslim on each export (as ``prune_and_compile.py --simplify`` does).
    """
    variants = []
    for name, model in models.items():
        files = {}
        for batch in batches:
            example = torch.randn((batch, *input_shape), generator=torch.Generator().manual_seed(batch))
            files[batch] = export_onnx(
                model, example, workdir / f"{name}.b{batch}.onnx", jetpack=jetpack, simplify=simplify
            ).path
        variants.append(Variant(name, model, input_shape, files))
    return variants


def flops_of(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates per sample of the (dense or slim) model's linears, matmuls and convolutions."""
    return p3b_fx.find_groups(p3b_fx.trace(model, input_shape=(1, *input_shape))).flops_total


def ort_cpu_report(
    dense: nn.Module,
    slim: nn.Module,
    input_shape: tuple[int, ...],
    jetpack: JetPack,
    *,
    runs: int = 20,
    budget_s: float = 5.0,
) -> dict[str, Any]:
    """``report.json``'s ``latency``: ONNX Runtime CPU medians of dense and slim at b1/t1 and b8/t2.

    Each setting stops after ``budget_s`` seconds of rounds (at least 3 rounds), so a large model
    costs seconds, not minutes, in the main job.
    """
    flops = flops_of(dense, input_shape), flops_of(slim, input_shape)
    entry: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="p3b-latency-") as tmp:
        batches = sorted({s.batch for s in REPORT_SETTINGS})
        variants = export_variants({"dense": dense, "slim": slim}, input_shape, batches, jetpack, Path(tmp))
        for setting in REPORT_SETTINGS:
            results, _ = measure(setting, variants, runs=runs, warmup=2, budget_s=budget_s)
            assert results is not None  # the CPU back end is always there
            c = compare(results[0], results[1], *flops)
            entry[setting.key] = {
                "dense_ms": round(c.dense_ms, 4), "slim_ms": round(c.slim_ms, 4),
                "speedup": round(c.speedup, 4), "speedup_over_flop_ratio": round(c.efficiency, 4),
                "runs": results[0].runs,
            }  # fmt: skip
    return {ORT_CPU.replace("-", "_"): entry, "flop_ratio": round(flops[0] / flops[1], 4)}
