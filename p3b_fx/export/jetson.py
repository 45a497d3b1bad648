"""A Jetson bundle: everything a board needs to build, check and time the engine itself.

No host can build an engine for a Jetson GPU (engines are tied to the GPU architecture and the
TensorRT release), so the host writes a directory the board finishes::

    model.onnx              exported for the board's JetPack (opset, ops checked)
    build_engine.sh         trtexec in that JetPack's dialect -> model.engine, timing.cache (+ layer info)
    verify.py               runs model.engine on reference_inputs.npy, compares, times (numpy + tensorrt)
    reference_inputs.npy    inputs, and the torch model's outputs for them
    reference_outputs.npy
    manifest.json           model info, JetPack / TensorRT / opset, sha256 of every other file
    README.md               the steps on the board

The directory is written next to ``out_dir`` under a temporary name and renamed when complete,
so a failure never leaves half a bundle.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import logging
import os
import shlex
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import p3b_fx
from p3b_fx.core.io import sha256_of
from p3b_fx.errors import ConfigError, ExportError
from p3b_fx.export.jetpack import JetPack
from p3b_fx.export.onnx import OnnxReport
from p3b_fx.export.tensorrt import DEFAULT_WORKSPACE_MB

logger = logging.getLogger(__name__)

TRTEXEC = "/usr/src/tensorrt/bin/trtexec"
VERIFY_ATOL = 5e-2  # fp16 engine vs fp32 torch: max abs difference of the outputs
VERIFY_MIN_TOP1 = 1.0  # share of reference samples whose top-1 class the engine must reproduce
DEFAULT_MAX_BATCH = 8
_BUNDLE_FILES = (
    "model.onnx", "build_engine.sh", "verify.py",
    "reference_inputs.npy", "reference_outputs.npy", "README.md",
)  # fmt: skip


@dataclass(frozen=True)
class BundleReport:
    out_dir: Path
    jetpack: str
    tensorrt: str
    trtexec: tuple[str, ...]
    files: Mapping[str, str] = field(default_factory=dict)  # file name -> sha256 (manifest.json excluded)


@dataclass(frozen=True)
class _EngineSpec:
    trtexec: tuple[str, ...]
    fp16: bool
    dla_core: int | None
    workspace_mb: int
    batch: tuple[int, int, int] | None
    reference_batch: int


def trtexec_command(
    jetpack: JetPack,
    *,
    onnx: str = "model.onnx",
    engine: str = "model.engine",
    fp16: bool = True,
    dynamic_batch: tuple[int, int, int] | None = None,
    input_name: str = "input",
    input_shape: tuple[int, ...] | None = None,
    dla_core: int | None = None,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    timing_cache: str = "timing.cache",
    layer_info: str = "layer_info.json",
) -> list[str]:
    """The trtexec command line that builds ``engine`` on a board with ``jetpack``.

    ``input_shape`` (any batch first) is needed with ``dynamic_batch`` = (min, opt, max).
    """
    _check_command_options(
        jetpack, fp16=fp16, dynamic_batch=dynamic_batch, input_shape=input_shape, dla_core=dla_core,
        workspace_mb=workspace_mb,
    )  # fmt: skip
    workspace = f"{workspace_mb}M" if jetpack.tensorrt_version >= (10, 0) else str(workspace_mb)
    cmd = [TRTEXEC, f"--onnx={onnx}", f"--saveEngine={engine}", f"{jetpack.workspace_flag}{workspace}"]
    if fp16:
        cmd.append("--fp16")
    if dynamic_batch is not None and input_shape is not None:
        rest = "x".join(str(d) for d in input_shape[1:])
        for flag, batch in zip(("min", "opt", "max"), dynamic_batch, strict=True):
            cmd.append(f"--{flag}Shapes={input_name}:{batch}x{rest}")
    if dla_core is not None:
        cmd += [f"--useDLACore={dla_core}", "--allowGPUFallback"]
    cmd += [jetpack.build_only_flag, f"--timingCacheFile={timing_cache}"]
    if jetpack.layer_info:  # with detailed verbosity the layer info names each layer's device (DLA / GPU)
        cmd += [f"--exportLayerInfo={layer_info}", "--profilingVerbosity=detailed"]
    return cmd


def _check_command_options(
    jp: JetPack,
    *,
    fp16: bool,
    dynamic_batch: tuple[int, int, int] | None,
    input_shape: tuple[int, ...] | None,
    dla_core: int | None,
    workspace_mb: int,
) -> None:
    if fp16 and not jp.fp16_flag:
        raise ConfigError(
            f"TensorRT {jp.tensorrt} (JetPack {jp.version}) has no --fp16 (strong typing): export an fp16 "
            "ONNX and pass fp16=False"
        )
    if dla_core is not None and not jp.dla:
        boards = ", ".join(b.name for b in jp.boards)
        raise ConfigError(f"JetPack {jp.version} boards ({boards}) have no DLA: drop dla_core")
    if dla_core is not None and dla_core not in (0, 1):
        raise ConfigError(
            f"dla_core must be 0 or 1 (Jetson boards have at most two DLA cores), got {dla_core}"
        )
    if dynamic_batch is not None:
        if input_shape is None:
            raise ConfigError("dynamic_batch needs input_shape to write trtexec's --min/opt/maxShapes")
        lo, opt, hi = dynamic_batch
        if not 1 <= lo <= opt <= hi:
            raise ConfigError(
                f"dynamic_batch must be (min, opt, max) with 1 <= min <= opt <= max, got {dynamic_batch}"
            )
    if workspace_mb <= 0:
        raise ConfigError(f"workspace_mb must be positive, got {workspace_mb}")


def write_bundle(
    out_dir: str | os.PathLike[str],
    *,
    onnx_report: OnnxReport,
    jetpack: JetPack,
    reference_inputs: np.ndarray,
    reference_outputs: np.ndarray,
    manifest_extra: Mapping[str, Any],
    fp16: bool = True,
    dynamic_batch: bool | tuple[int, int, int] = False,
    dla_core: int | None = None,
    round_info: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
) -> BundleReport:
    """Write the bundle for ``jetpack`` into ``out_dir`` (refuses a non-empty one unless ``overwrite``)."""
    target = Path(out_dir)
    batch = _batch_range(dynamic_batch, onnx_report, reference_inputs)
    cmd = trtexec_command(
        jetpack, fp16=fp16, dynamic_batch=batch, input_name=onnx_report.input_name,
        input_shape=tuple(reference_inputs.shape), dla_core=dla_core, workspace_mb=workspace_mb,
    )  # fmt: skip
    _check_inputs(target, onnx_report, jetpack, reference_inputs, overwrite)
    spec = _EngineSpec(tuple(cmd), fp16, dla_core, workspace_mb, batch, int(reference_inputs.shape[0]))
    with _staging_dir(target) as staging:
        _write_files(staging, onnx_report, jetpack, cmd, (reference_inputs, reference_outputs))
        files = {name: sha256_of(staging / name) for name in _BUNDLE_FILES}
        manifest = _manifest(onnx_report, jetpack, spec, files)
        manifest.update(
            model=dict(manifest_extra), round=dict(round_info) if round_info is not None else None
        )
        _write_json(staging / "manifest.json", manifest)
        _install(staging, target)
    logger.info(
        "wrote the Jetson bundle %s (JetPack %s, TensorRT %s)", target, jetpack.version, jetpack.tensorrt
    )
    return BundleReport(target, jetpack.version, jetpack.tensorrt, tuple(cmd), files)


def _batch_range(
    spec: bool | tuple[int, int, int], report: OnnxReport, inputs: np.ndarray
) -> tuple[int, int, int] | None:
    if spec is False:
        return None
    if not report.dynamic_batch:
        raise ConfigError(
            f"dynamic_batch requested, but {report.path} has a static input shape {report.input_shape}: "
            "export it with export_onnx(..., dynamic_batch=True)"
        )
    n = int(inputs.shape[0])
    batch = (1, n, max(n, DEFAULT_MAX_BATCH)) if spec is True else tuple(spec)
    if len(batch) != 3 or not batch[0] <= n <= batch[2]:
        raise ConfigError(f"dynamic_batch {batch} must be (min, opt, max) around the reference batch {n}")
    return batch[0], batch[1], batch[2]


def _check_inputs(target: Path, report: OnnxReport, jp: JetPack, inputs: np.ndarray, overwrite: bool) -> None:
    if report.jetpack != jp.version:
        raise ConfigError(
            f"{report.path} was exported for JetPack {report.jetpack}, the bundle targets {jp.version}: "
            f"export again with jetpack=jetpack('{jp.version}')"
        )
    if not report.path.is_file() or sha256_of(report.path) != report.sha256:
        raise ExportError(
            f"{report.path} is missing or changed since it was exported and checked; export again"
        )
    static = tuple(inputs.shape) if not report.dynamic_batch else tuple(inputs.shape[1:])
    expected = report.input_shape if not report.dynamic_batch else report.input_shape[1:]
    if static != expected:
        raise ConfigError(
            f"reference_inputs have shape {tuple(inputs.shape)}, the ONNX input is {report.input_shape}"
            + (" (dynamic batch)" if report.dynamic_batch else "")
        )
    if target.is_file() or (target.is_dir() and any(target.iterdir()) and not overwrite):
        raise ConfigError(
            f"refusing to write the bundle into {target}: it exists and is not an empty directory; "
            "choose a new directory or pass overwrite=True"
        )
    if not target.parent.is_dir() or not os.access(target.parent, os.W_OK):
        raise ExportError(f"cannot write the bundle: {target.parent} does not exist or is not writable")


@contextlib.contextmanager
def _staging_dir(target: Path) -> Iterator[Path]:
    """A temporary directory next to ``target``; removed on exit (renamed away on success)."""
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as exc:
        raise ExportError(f"cannot create a directory in {target.parent}: {exc}") from exc
    staging.chmod(0o755)  # mkdtemp makes it private
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_files(
    staging: Path,
    report: OnnxReport,
    jp: JetPack,
    cmd: list[str],
    references: tuple[np.ndarray, np.ndarray],
) -> None:
    shutil.copyfile(report.path, staging / "model.onnx")
    script = staging / "build_engine.sh"
    script.write_text(_build_script(jp, cmd))
    script.chmod(0o755)
    verify = importlib.resources.files("p3b_fx.export").joinpath("board_verify.py").read_text()
    (staging / "verify.py").write_text(verify)
    for name, array in zip(("reference_inputs.npy", "reference_outputs.npy"), references, strict=True):
        np.save(staging / name, np.ascontiguousarray(array, dtype=np.float32))
    (staging / "README.md").write_text(_readme(jp, report, cmd))


def _build_script(jp: JetPack, cmd: list[str]) -> str:
    args = " \\\n    ".join(shlex.quote(a) for a in cmd[1:])
    return (
        "#!/usr/bin/env bash\n"
        f"# Builds model.engine on this board with JetPack {jp.version}'s trtexec (TensorRT {jp.tensorrt}).\n"
        "# Generated by p3b-fx. An engine runs only on the GPU and TensorRT release that built it.\n"
        "set -euo pipefail\n"
        'cd "$(dirname "$0")"\n'
        f'TRTEXEC="${{TRTEXEC:-{cmd[0]}}}"\n'
        'if [ ! -x "$TRTEXEC" ]; then\n'
        "  echo \"trtexec not found at $TRTEXEC: install JetPack's TensorRT (sudo apt install "
        'nvidia-jetpack) or set TRTEXEC" >&2\n'
        "  exit 1\n"
        "fi\n"
        f'"$TRTEXEC" {args}\n'
    )


def _readme(jp: JetPack, report: OnnxReport, cmd: list[str]) -> str:
    boards = ", ".join(f"{b.name} (SM {b.sm})" for b in jp.boards)
    cuda = "pycuda (`pip3 install pycuda`)" if jp.tensorrt_version < (8, 5) else "cuda-python or pycuda"
    layers = " and `layer_info.json` (the device of each layer)" if jp.layer_info else ""
    return (
        f"# Jetson bundle: JetPack {jp.version}, TensorRT {jp.tensorrt}, ONNX opset {report.opset}\n\n"
        f"For {boards}. Made by p3b-fx; `manifest.json` lists the model and a sha256 per file.\n\n"
        f"1. Copy this directory to the board; check it runs JetPack {jp.version} "
        "(`apt show nvidia-jetpack`).\n"
        "2. Build the engine on the board (minutes): `bash build_engine.sh`. It runs\n"
        f"   `{shlex.join(cmd)}`\n"
        f"   and writes `model.engine`, `timing.cache`{layers}.\n"
        f"3. Check and time it: `python3 verify.py` (needs numpy and {cuda}). It compares the engine's\n"
        "   outputs with `reference_outputs.npy` (`--atol`, `--min-top1`; defaults in `manifest.json`),\n"
        "   prints the median latency, writes `verify_result.json` and exits 0 when the outputs match.\n"
        f"4. Optional: `{TRTEXEC} --loadEngine=model.engine --useCudaGraph` for trtexec's own timing.\n"
        + _dla_note(jp, cmd)
    )


def _dla_note(jp: JetPack, cmd: list[str]) -> str:
    """Which boards can run a DLA build; empty when the build uses the GPU only."""
    if not any(a.startswith("--useDLACore") for a in cmd):
        return ""
    with_dla = ", ".join(b.name for b in jp.boards if b.has_dla)
    without = ", ".join(b.name for b in jp.boards if not b.has_dla)
    note = f"\nDLA: this build puts the layers DLA can run on a DLA core; only {with_dla} have DLA."
    if without:
        note += f" On {without}, remove `--useDLACore=…` and `--allowGPUFallback` from build_engine.sh."
    return note + "\n"


def _manifest(report: OnnxReport, jp: JetPack, spec: _EngineSpec, files: Mapping[str, str]) -> dict[str, Any]:
    return {
        "format": "p3b-fx jetson bundle",
        "format_version": 1,
        "p3b_fx": p3b_fx.__version__,
        "jetpack": jp.version,
        "tensorrt": jp.tensorrt,
        "cuda": jp.cuda,
        "boards": [{"name": b.name, "sm": b.sm, "dla": b.has_dla} for b in jp.boards],
        "onnx": {
            "opset": report.opset,
            "input_name": report.input_name,
            "input_shape": list(report.input_shape),
            "output_names": list(report.output_names),
            "dynamic_batch": report.dynamic_batch,
            "parity_max_abs_diff": report.parity_max_abs_diff,
            "ops": list(report.ops),
        },
        "engine": {
            "trtexec": list(spec.trtexec),
            "fp16": spec.fp16,
            "dla_core": spec.dla_core,
            "workspace_mb": spec.workspace_mb,
            "batch_range": list(spec.batch) if spec.batch is not None else None,
        },
        "verify": {"atol": VERIFY_ATOL, "min_top1": VERIFY_MIN_TOP1, "reference_batch": spec.reference_batch},
        "files": dict(files),
    }


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    try:
        text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"the bundle manifest is not JSON: {exc}; pass manifest_extra / round_info with plain "
            "str, int, float, bool, list and dict values"
        ) from exc
    path.write_text(text + "\n")


def _install(staging: Path, target: Path) -> None:
    """Move the finished bundle to ``target``; an existing ``target`` is replaced only after that."""
    if not target.exists():
        os.rename(staging, target)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except OSError:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
