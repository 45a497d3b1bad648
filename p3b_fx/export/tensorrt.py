"""Build a TensorRT engine from an ONNX file with TensorRT's Python API (8.5 to 10.x, and 11).

An engine is tied to the GPU and the TensorRT release that built it, so this runs where the
engine will run: on a host with TensorRT and a CUDA GPU (for that GPU), or on the Jetson itself.
For a Jetson target the host writes a bundle instead (``p3b_fx.export.jetson``) and the board
builds with its own trtexec.

API per release (the calls this module makes):

- network: 8.x ``create_network(1 << int(NetworkDefinitionCreationFlag.EXPLICIT_BATCH))``;
  10.x ``create_network(0)`` (explicit batch is implied); 11+ strongly typed
  (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``), which has no ``BuilderFlag.FP16``: there the
  precision is the one baked into the ONNX.
- ``OnnxParser.parse_from_file``; every parser error is reported. The parser owns the weights in
  8.x, so it lives until the build is done.
- ``config.set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes)`` (8.4+; ``max_workspace_size``
  is gone in 10), ``BuilderFlag.FP16``, a timing cache read from and saved back to a file, DLA
  (``default_device_type``, ``DLA_core``, ``BuilderFlag.GPU_FALLBACK``), one optimization profile
  for a dynamic batch, and ``builder.build_serialized_network`` (``build_engine`` is gone in 10).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from p3b_fx.errors import ConfigError, ExportError, TargetUnavailableError

logger = logging.getLogger(__name__)

MIN_TENSORRT = (8, 5)
DEFAULT_WORKSPACE_MB = 1024
_JETSON_HINT = "for a Jetson, use `--target jetson`: it writes a bundle that builds the engine on the board"


@dataclass(frozen=True)
class EngineReport:
    engine_path: Path
    sha256: str
    size_bytes: int
    tensorrt_version: str
    precision: str  # "fp16", "fp32", or "strongly-typed" (as typed in the ONNX, TensorRT >= 11)
    workspace_mb: int
    dynamic_batch: tuple[int, int, int] | None
    dla_core: int | None
    dla_layer_share: float | None  # share of network layers DLA can run (the rest fall back to GPU)
    timing_cache: Path | None
    build_seconds: float


def tensorrt_available() -> tuple[bool, str]:
    """Whether an engine can be built here, and why (not)."""
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as exc:
        return False, f"the TensorRT Python package is not installed ({exc})"
    version = getattr(trt, "__version__", "?")
    if not torch.cuda.is_available():
        return False, f"TensorRT {version} is installed, but no CUDA device is visible"
    return True, f"TensorRT {version} and a CUDA device"


def build_engine(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    *,
    fp16: bool = True,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    timing_cache: str | os.PathLike[str] | None = None,
    dla_core: int | None = None,
    dynamic_batch: tuple[int, int, int] | None = None,
) -> EngineReport:
    """Build and atomically write a serialized engine for this machine's GPU.

    ``dynamic_batch`` is (min, opt, max) batch for the ONNX's symbolic batch axis. Raises
    ``TargetUnavailableError`` without TensorRT or a CUDA device, ``ExportError`` when the build fails.
    """
    _check_options(workspace_mb, dla_core, dynamic_batch)
    trt = _load_tensorrt()
    version = _version(trt)
    source, target = Path(onnx_path), Path(engine_path)
    if not source.is_file():
        raise ExportError(f"ONNX file {source} does not exist; export it first (p3b_fx.export.export_onnx)")
    cache_path = Path(timing_cache) if timing_cache is not None else None
    opts = _Options(fp16, workspace_mb, cache_path, dla_core, dynamic_batch)
    start = time.monotonic()
    data, cache, precision, share = _build(trt, source, version=version, opts=opts)
    write_atomic(target, data)
    if cache_path is not None and cache is not None:
        write_atomic(cache_path, cache)
    return EngineReport(
        engine_path=target,
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        tensorrt_version=str(trt.__version__),
        precision=precision,
        workspace_mb=workspace_mb,
        dynamic_batch=dynamic_batch,
        dla_core=dla_core,
        dla_layer_share=share,
        timing_cache=cache_path,
        build_seconds=time.monotonic() - start,
    )


@dataclass(frozen=True)
class _Options:
    fp16: bool
    workspace_mb: int
    cache_path: Path | None
    dla_core: int | None
    dynamic_batch: tuple[int, int, int] | None


def _build(
    trt: Any, source: Path, *, version: tuple[int, int], opts: _Options
) -> tuple[bytes, bytes | None, str, float | None]:
    """(serialized engine, serialized timing cache or None, precision, DLA layer share)."""
    log = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(log)
    network = builder.create_network(_network_flags(trt, version))
    parser = _parse(trt, network, log, source)
    config = builder.create_builder_config()
    precision, share = _configure(trt, builder, config, network, version=version, opts=opts)
    _add_profile(builder, config, network, opts.dynamic_batch)
    serialized = builder.build_serialized_network(network, config)
    del parser  # the parser owns the weights (8.x) until the engine is built
    if serialized is None:
        raise ExportError(
            f"TensorRT {trt.__version__} could not build an engine from {source}; its log above says why "
            "(often: workspace too small, raise workspace_mb)"
        )
    cache = bytes(memoryview(config.get_timing_cache().serialize())) if opts.cache_path is not None else None
    return bytes(memoryview(serialized)), cache, precision, share


def _configure(
    trt: Any, builder: Any, config: Any, network: Any, *, version: tuple[int, int], opts: _Options
) -> tuple[str, float | None]:
    """Memory pool, precision, timing cache and DLA; returns (precision, DLA layer share)."""
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mb << 20)
    precision = _set_precision(trt, config, version, opts.fp16)
    if opts.cache_path is not None:
        config.set_timing_cache(config.create_timing_cache(_read_or_empty(opts.cache_path)), False)
    if opts.dla_core is None:
        return precision, None
    return precision, _configure_dla(trt, builder, config, network, core=opts.dla_core, fp16=opts.fp16)


def _check_options(
    workspace_mb: int, dla_core: int | None, dynamic_batch: tuple[int, int, int] | None
) -> None:
    if workspace_mb <= 0:
        raise ConfigError(f"workspace_mb must be positive, got {workspace_mb}")
    if dla_core is not None and dla_core < 0:
        raise ConfigError(f"dla_core must be a DLA core number (0 or 1), got {dla_core}")
    if dynamic_batch is not None:
        lo, opt, hi = dynamic_batch
        if not 1 <= lo <= opt <= hi:
            raise ConfigError(
                f"dynamic_batch must be (min, opt, max) with 1 <= min <= opt <= max, got {dynamic_batch}"
            )


def _load_tensorrt() -> Any:
    ok, why = tensorrt_available()
    if not ok:
        raise TargetUnavailableError(f"cannot build a TensorRT engine here: {why}; {_JETSON_HINT}")
    return importlib.import_module("tensorrt")


def _version(trt: Any) -> tuple[int, int]:
    try:
        major, minor = (int(p) for p in str(trt.__version__).split(".")[:2])
    except ValueError as exc:
        raise TargetUnavailableError(f"cannot read the TensorRT version {trt.__version__!r}") from exc
    if (major, minor) < MIN_TENSORRT:
        raise TargetUnavailableError(
            f"TensorRT {trt.__version__} is older than {MIN_TENSORRT[0]}.{MIN_TENSORRT[1]}, which this "
            f"builder needs; build with trtexec instead ({_JETSON_HINT})"
        )
    return major, minor


def _network_flags(trt: Any, version: tuple[int, int]) -> int:
    if version >= (11, 0):
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if version >= (10, 0):
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)


def _parse(trt: Any, network: Any, log: Any, source: Path) -> Any:
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(source)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or ["(no error reported)"]
        raise ExportError(
            f"TensorRT {trt.__version__} cannot parse {source}: "
            + " | ".join(errors)
            + ". Export for this TensorRT release (p3b_fx.export.export_onnx with the matching JetPack)"
        )
    return parser


def _set_precision(trt: Any, config: Any, version: tuple[int, int], fp16: bool) -> str:
    if version >= (11, 0):
        if fp16:
            logger.warning(
                "TensorRT %d.%d builds strongly typed networks: no fp16 flag; the engine keeps the ONNX's "
                "types (convert the ONNX to fp16 for an fp16 engine)",
                *version,
            )
        return "strongly-typed"
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        return "fp16"
    return "fp32"


def _read_or_empty(path: Path) -> bytes:
    return path.read_bytes() if path.is_file() else b""


def _configure_dla(trt: Any, builder: Any, config: Any, network: Any, *, core: int, fp16: bool) -> float:
    cores = int(builder.num_DLA_cores)
    if core >= cores:
        raise TargetUnavailableError(
            f"DLA core {core} requested, but this device has {cores} DLA core(s); DLA exists on Jetson "
            "AGX/NX Orin and Xavier only: drop dla_core"
        )
    if not fp16:
        logger.warning("DLA runs fp16/int8 only: with fp32 every layer falls back to the GPU")
    config.default_device_type = trt.DeviceType.DLA
    config.DLA_core = core
    config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    share = sum(bool(config.can_run_on_DLA(layer)) for layer in layers) / max(len(layers), 1)
    logger.info("DLA core %d: %.0f%% of %d layers can run on DLA", core, 100 * share, len(layers))
    return share


def _add_profile(builder: Any, config: Any, network: Any, batch: tuple[int, int, int] | None) -> None:
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    dynamic = [inp for inp in inputs if any(int(d) < 0 for d in inp.shape)]
    if batch is None:
        if dynamic:
            raise ConfigError(
                f"the ONNX input '{dynamic[0].name}' has a dynamic shape {tuple(dynamic[0].shape)}: pass "
                "dynamic_batch=(min, opt, max), or export with a static shape"
            )
        return
    profile = builder.create_optimization_profile()
    for inp in inputs:
        shape = tuple(int(d) for d in inp.shape)
        if shape[0] >= 0 or any(d < 0 for d in shape[1:]):
            raise ConfigError(
                f"dynamic_batch given, but the ONNX input '{inp.name}' has shape {shape}: export with "
                "dynamic_batch=True (only the batch axis may be dynamic)"
            )
        lo, opt, hi = ((b, *shape[1:]) for b in batch)
        profile.set_shape(inp.name, lo, opt, hi)
    config.add_optimization_profile(profile)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path`` and rename it over ``path``."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise ExportError(f"cannot write {path}: {exc}; check the directory exists and is writable") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(name, 0o644)  # mkstemp makes it private
        os.replace(name, path)
    finally:
        Path(name).unlink(missing_ok=True)
