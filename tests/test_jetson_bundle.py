"""Jetson bundle: contents and hashes, trtexec per JetPack dialect, verify.py on stub bindings,
all-or-nothing writes, and refusals."""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import py_compile
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from p3b_fx.errors import ConfigError, ExportError
from p3b_fx.export import jetson
from p3b_fx.export.jetpack import jetpack
from p3b_fx.export.jetson import TRTEXEC, trtexec_command, write_bundle
from p3b_fx.export.onnx import OnnxReport, export_onnx
from tests.conftest import tiny_vit

BUNDLE_FILES = {
    "model.onnx", "build_engine.sh", "verify.py", "reference_inputs.npy", "reference_outputs.npy",
    "manifest.json", "README.md",
}  # fmt: skip


@pytest.fixture(scope="module")
def exported(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[tuple[str, bool], tuple[OnnxReport, np.ndarray, np.ndarray]]:
    """ONNX exports of a tiny ViT (static and dynamic batch) with reference data, per JetPack."""
    out = tmp_path_factory.mktemp("onnx")
    model = tiny_vit(depth=1)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).numpy()
    result = {}
    for version, dynamic in (("6.1", False), ("6.1", True), ("4.6", False)):
        path = out / f"m-{version}-{dynamic}.onnx"
        report = export_onnx(model, x, path, jetpack=jetpack(version), dynamic_batch=dynamic)
        result[(version, dynamic)] = (report, x.numpy(), y)
    return result


def _bundle(
    exported: Any, out: Path, version: str = "6.1", dynamic: bool = False, **kw: Any
) -> jetson.BundleReport:
    report, x, y = exported[(version, dynamic)]
    kw.setdefault("manifest_extra", {"name": "tiny-vit", "params": 12345})
    return write_bundle(
        out, onnx_report=report, jetpack=jetpack(version), reference_inputs=x, reference_outputs=y,
        dynamic_batch=dynamic, **kw,
    )  # fmt: skip


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- contents -------------------------------------------------------------------------------------


def test_bundle_holds_every_file_and_the_manifest_hashes_them(exported: Any, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    report = _bundle(exported, out, round_info={"round": 3, "width_multiple": 8})
    assert {p.name for p in out.iterdir()} == BUNDLE_FILES
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == BUNDLE_FILES - {"manifest.json"}
    assert all(manifest["files"][name] == _sha(out / name) for name in manifest["files"])
    assert dict(report.files) == manifest["files"]
    assert (manifest["jetpack"], manifest["tensorrt"], manifest["onnx"]["opset"]) == ("6.1", "10.3", 17)
    assert manifest["model"] == {"name": "tiny-vit", "params": 12345}
    assert manifest["round"] == {"round": 3, "width_multiple": 8}
    assert manifest["engine"]["trtexec"] == list(report.trtexec)
    onnx_report, x, y = exported[("6.1", False)]
    assert _sha(out / "model.onnx") == onnx_report.sha256
    np.testing.assert_array_equal(np.load(out / "reference_inputs.npy"), x)
    np.testing.assert_array_equal(np.load(out / "reference_outputs.npy"), y)
    assert os.access(out / "build_engine.sh", os.X_OK)
    assert out.stat().st_mode & 0o777 == 0o755
    assert "bash build_engine.sh" in (out / "README.md").read_text()


def test_dla_bundle_names_the_boards_without_dla(exported: Any, tmp_path: Path) -> None:
    """JetPack 6.1 runs on Orin AGX / NX (two DLA cores) and Orin Nano (none)."""
    out = tmp_path / "bundle"
    _bundle(exported, out, dla_core=0)
    readme = (out / "README.md").read_text()
    assert "only Jetson AGX Orin / Orin NX have DLA" in readme and "On Jetson Orin Nano, remove" in readme
    boards = {b["name"]: b["dla"] for b in json.loads((out / "manifest.json").read_text())["boards"]}
    assert boards == {"Jetson AGX Orin / Orin NX": True, "Jetson Orin Nano": False}
    _bundle(exported, tmp_path / "gpu")
    assert "DLA" not in (tmp_path / "gpu" / "README.md").read_text()


def test_verify_script_compiles_for_python_3_6(exported: Any, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    _bundle(exported, out)
    py_compile.compile(str(out / "verify.py"), cfile=str(tmp_path / "verify.pyc"), doraise=True)
    ast.parse((out / "verify.py").read_text(), feature_version=(3, 6))


@pytest.mark.parametrize(("version", "dynamic"), [("6.1", False), ("6.1", True), ("4.6", False)])
def test_build_script_runs_the_trtexec_command(
    version: str, dynamic: bool, exported: Any, tmp_path: Path
) -> None:
    out = tmp_path / "bundle"
    report = _bundle(exported, out, version=version, dynamic=dynamic)
    fake = tmp_path / "trtexec"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$PWD" "$@" > "$ARGS_FILE"\n')
    fake.chmod(0o755)
    args_file = tmp_path / "args.txt"
    env = {**os.environ, "TRTEXEC": str(fake), "ARGS_FILE": str(args_file)}
    subprocess.run(["bash", str(out / "build_engine.sh")], check=True, env=env, cwd=tmp_path, timeout=30)
    cwd, *args = args_file.read_text().splitlines()
    assert Path(cwd) == out  # the script runs trtexec inside the bundle
    assert args == list(report.trtexec[1:])
    assert report.trtexec[0] == TRTEXEC


# --- trtexec dialects -----------------------------------------------------------------------------

DIALECT = {  # JetPack: (workspace flag, build-only flag, layer info flags present)
    "4.6": ("--workspace=1024", "--buildOnly", False),
    "5.1": ("--workspace=1024", "--buildOnly", True),
    "6.0": ("--workspace=1024", "--skipInference", True),
    "6.1": ("--memPoolSize=workspace:1024M", "--skipInference", True),
    "7.0": ("--memPoolSize=workspace:1024M", "--skipInference", True),
    "7.2": ("--memPoolSize=workspace:1024M", "--skipInference", True),
}


@pytest.mark.parametrize("version", list(DIALECT))
def test_trtexec_dialect_per_jetpack(version: str) -> None:
    workspace, build_only, layer_info = DIALECT[version]
    cmd = trtexec_command(jetpack(version))
    assert cmd[:4] == [TRTEXEC, "--onnx=model.onnx", "--saveEngine=model.engine", workspace]
    assert {"--fp16", build_only, "--timingCacheFile=timing.cache"} <= set(cmd)
    assert ("--exportLayerInfo=layer_info.json" in cmd) == layer_info
    assert ("--profilingVerbosity=detailed" in cmd) == layer_info
    other = {"--skipInference", "--buildOnly"} - {build_only}
    assert not other & set(cmd)
    assert not any(a.startswith(("--useDLACore", "--allowGPUFallback", "--minShapes")) for a in cmd)


def test_trtexec_full_command_for_the_default_jetpack() -> None:
    cmd = trtexec_command(jetpack("6.1"), fp16=False, workspace_mb=2048, dynamic_batch=(1, 4, 16),
                          input_shape=(2, 3, 224, 224), dla_core=0)  # fmt: skip
    assert cmd == [
        TRTEXEC, "--onnx=model.onnx", "--saveEngine=model.engine", "--memPoolSize=workspace:2048M",
        "--minShapes=input:1x3x224x224", "--optShapes=input:4x3x224x224", "--maxShapes=input:16x3x224x224",
        "--useDLACore=0", "--allowGPUFallback", "--skipInference", "--timingCacheFile=timing.cache",
        "--exportLayerInfo=layer_info.json", "--profilingVerbosity=detailed",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("version", "kwargs", "message"),
    [
        ("7.0", {"dla_core": 0}, "Thor.*no DLA"),
        ("6.1", {"dla_core": 2}, "at most two DLA cores"),
        ("6.1", {"dynamic_batch": (1, 2, 4)}, "needs input_shape"),
        ("6.1", {"dynamic_batch": (4, 2, 8), "input_shape": (1, 3, 8, 8)}, "min <= opt <= max"),
        ("6.1", {"workspace_mb": 0}, "positive"),
    ],
)
def test_trtexec_refuses_what_the_board_cannot_do(version: str, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        trtexec_command(jetpack(version), **kwargs)


# --- verify.py on stub bindings -------------------------------------------------------------------

STUB_MEMORY = "MEMORY = {}\n"
STUB_TENSORRT = textwrap.dedent(
    """
    import os
    import numpy as np
    import stub_memory

    __version__ = os.environ["STUB_TRT_VERSION"]
    MAJOR = int(__version__.split(".")[0])  # v3 (named tensors) from 10, v2 (bindings) before

    class Logger:
        WARNING = 2
        def __init__(self, severity):
            pass

    class TensorIOMode:
        INPUT, OUTPUT = "INPUT", "OUTPUT"

    def nptype(dtype):
        return np.float32

    class Engine:
        def __init__(self):
            bundle = os.environ["STUB_BUNDLE"]
            self.inputs = np.load(os.path.join(bundle, "reference_inputs.npy"))
            self.outputs = np.load(os.path.join(bundle, "reference_outputs.npy"))
            self.outputs = self.outputs + float(os.environ["STUB_DELTA"])
            self.num_io_tensors = self.num_bindings = 2
            self.names = ["input", "output"]
            self.shapes = [(-1,) + self.inputs.shape[1:], self.outputs.shape]
        def get_tensor_name(self, i):
            return self.names[i]
        def get_tensor_mode(self, name):
            return TensorIOMode.INPUT if name == "input" else TensorIOMode.OUTPUT
        def get_tensor_dtype(self, name):
            return "FLOAT"
        def get_tensor_shape(self, name):
            return self.shapes[self.names.index(name)]
        def binding_is_input(self, i):
            return i == 0
        def get_binding_dtype(self, i):
            return "FLOAT"
        def get_binding_shape(self, i):
            return self.shapes[i]
        def create_execution_context(self):
            return Context(self)

    class Context:
        def __init__(self, engine):
            self.engine, self.addresses, self.shape = engine, {}, None
        def set_input_shape(self, name, shape):
            self.shape = tuple(shape)
            return True
        set_binding_shape = set_input_shape
        def get_tensor_shape(self, name):
            return self.shape if name == "input" else self.engine.outputs.shape
        def get_binding_shape(self, i):
            return self.get_tensor_shape(self.engine.names[i])
        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr
            return True
        def execute_async_v3(self, stream):
            assert MAJOR >= 10, "execute_async_v3 on TensorRT 8"
            return self._run(self.addresses["input"], self.addresses["output"])
        def execute_v2(self, bindings):
            assert MAJOR < 10, "execute_v2 on TensorRT 10"
            return self._run(bindings[0], bindings[1])
        def _run(self, src, dst):
            x = np.frombuffer(bytes(stub_memory.MEMORY[src]), dtype=np.float32).reshape(self.shape)
            y = self.engine.outputs if np.array_equal(x, self.engine.inputs) else self.engine.outputs * 0
            stub_memory.MEMORY[dst][:] = np.ascontiguousarray(y, dtype=np.float32).tobytes()
            return True

    class Runtime:
        def __init__(self, logger):
            pass
        def deserialize_cuda_engine(self, data):
            return Engine() if data == b"ENGINE" else None
    """
)
STUB_CUDART = textwrap.dedent(
    """
    import ctypes
    from stub_memory import MEMORY

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    def cudaStreamCreate():
        return (0, 7)

    def cudaMalloc(n):
        ptr = 4096 * (len(MEMORY) + 1)
        MEMORY[ptr] = bytearray(n)
        return (0, ptr)

    def cudaMemcpy(dst, src, count, kind):
        if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
            MEMORY[dst][:count] = ctypes.string_at(src, count)
        else:
            ctypes.memmove(dst, bytes(MEMORY[src][:count]), count)
        return (0,)

    def cudaStreamSynchronize(stream):
        return (0,)
    """
)
STUB_PYCUDA_DRIVER = textwrap.dedent(
    """
    from stub_memory import MEMORY

    class Stream:
        handle = 7
        def synchronize(self):
            pass

    class Allocation(int):
        pass

    def mem_alloc(n):
        ptr = Allocation(4096 * (len(MEMORY) + 1))
        MEMORY[int(ptr)] = bytearray(n)
        return ptr

    def memcpy_htod(ptr, array):
        MEMORY[int(ptr)][:] = array.tobytes()

    def memcpy_dtoh(array, ptr):
        data = bytes(MEMORY[int(ptr)])
        array[...] = __import__("numpy").frombuffer(data, dtype=array.dtype).reshape(array.shape)
    """
)


def _stubs(root: Path, cuda: str) -> Path:
    files = {"stub_memory.py": STUB_MEMORY, "tensorrt.py": STUB_TENSORRT}
    if cuda == "cuda-python":
        files |= {
            "cuda/__init__.py": "",
            "cuda/bindings/__init__.py": "",
            "cuda/bindings/runtime.py": STUB_CUDART,
        }
    else:  # hide the real cuda-python; pycuda it is
        files |= {"cuda/__init__.py": "raise ImportError('no cuda-python here')\n"}
        files |= {"pycuda/__init__.py": "", "pycuda/autoinit.py": "", "pycuda/driver.py": STUB_PYCUDA_DRIVER}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


BOARDS = [  # (TensorRT on the board, CUDA bindings installed, dynamic batch)
    ("10.3.0", "cuda-python", False), ("10.3.0", "cuda-python", True), ("8.5.2", "pycuda", False),
    ("8.2.1", "pycuda", True),
]  # fmt: skip
OUTCOMES = [(0.01, 0), (0.2, 1)]  # (engine output - reference, verify.py exit code)


@pytest.mark.parametrize("board", BOARDS, ids=["-".join(map(str, b)) for b in BOARDS])
@pytest.mark.parametrize("outcome", OUTCOMES, ids=["match", "mismatch"])
def test_verify_script_on_stub_bindings(
    board: tuple[str, str, bool], outcome: tuple[float, int], exported: Any, tmp_path: Path
) -> None:
    (trt_version, cuda, dynamic), (delta, code) = board, outcome
    out = tmp_path / "bundle"
    _bundle(exported, out, dynamic=dynamic)
    (out / "model.engine").write_bytes(b"ENGINE")
    stubs = _stubs(tmp_path / "stubs", cuda)
    env = {**os.environ, "PYTHONPATH": str(stubs), "STUB_TRT_VERSION": trt_version, "STUB_BUNDLE": str(out),
           "STUB_DELTA": str(delta)}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "verify.py", "--runs", "3", "--warmup", "1"], cwd=out, env=env,
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == code, done.stderr
    result = json.loads((out / "verify_result.json").read_text())
    assert result["passed"] is (code == 0)
    assert result["max_abs_diff"] == pytest.approx(delta, abs=1e-6)  # the data went through device memory
    assert result["tensorrt"] == trt_version and result["batch"] == 2 and result["median_ms"] >= 0


def test_verify_script_cannot_run_without_the_engine(exported: Any, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    _bundle(exported, out)
    env = {**os.environ, "PYTHONPATH": str(_stubs(tmp_path / "stubs", "cuda-python")),
           "STUB_TRT_VERSION": "10.3.0", "STUB_BUNDLE": str(out), "STUB_DELTA": "0"}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "verify.py"],
        cwd=out,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and "model.engine" in done.stderr


def _verify_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("bundle_verify", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REF = [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]
NEAR_TIE = [[0.52, 0.5, 0.0], [0.0, 2.0, 0.0]]


@pytest.mark.parametrize(
    "case",
    [
        (REF, REF, 1.0, True),
        (REF, [[1.04, 0.0, 0.0], [0.0, 2.0, 0.0]], 1.0, True),
        (REF, [[1.06, 0.0, 0.0], [0.0, 2.0, 0.0]], 1.0, False),  # beyond atol
        (NEAR_TIE, [[0.5, 0.52, 0.0], [0.0, 2.0, 0.0]], 1.0, False),  # top-1 flipped within atol
        (NEAR_TIE, [[0.5, 0.52, 0.0], [0.0, 2.0, 0.0]], 0.5, True),
        (REF, [[np.nan, 0.0, 0.0], [0.0, 2.0, 0.0]], 0.0, False),
        (REF, [[1.0, 0.0, 0.0]], 0.0, False),  # shape mismatch
    ],
)
def test_comparison_rule(
    case: tuple[list[list[float]], list[list[float]], float, bool], exported: Any, tmp_path: Path
) -> None:
    reference, outputs, min_top1, passed = case
    _bundle(exported, tmp_path / "bundle")
    verify = _verify_module(tmp_path / "bundle" / "verify.py")
    result = verify.compare(np.array(outputs), np.array(reference), 0.05, min_top1)
    assert result["passed"] is passed


# --- all or nothing, refusals ---------------------------------------------------------------------


def test_a_failing_step_leaves_no_half_bundle(
    exported: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> str:
        raise OSError("disk full")

    monkeypatch.setattr(jetson, "_readme", broken)
    with pytest.raises(OSError, match="disk full"):
        _bundle(exported, tmp_path / "bundle")
    assert list(tmp_path.iterdir()) == []


def test_manifest_extra_that_is_not_json_is_refused_cleanly(exported: Any, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="manifest is not JSON"):
        _bundle(exported, tmp_path / "bundle", manifest_extra={"model": object()})
    assert list(tmp_path.iterdir()) == []


def test_existing_non_empty_directory_is_refused_unless_overwrite(exported: Any, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"refusing.*overwrite=True"):
        _bundle(exported, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    _bundle(exported, out, overwrite=True)
    assert {p.name for p in out.iterdir()} == BUNDLE_FILES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no staging or old copy left


def test_existing_empty_directory_is_used(exported: Any, tmp_path: Path) -> None:
    (tmp_path / "bundle").mkdir()
    _bundle(exported, tmp_path / "bundle")
    assert {p.name for p in (tmp_path / "bundle").iterdir()} == BUNDLE_FILES


def test_dynamic_batch_bundle_writes_the_profile(exported: Any, tmp_path: Path) -> None:
    report = _bundle(exported, tmp_path / "bundle", dynamic=True)
    assert "--optShapes=input:2x3x32x32" in report.trtexec and "--maxShapes=input:8x3x32x32" in report.trtexec
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["engine"]["batch_range"] == [1, 2, 8]


def test_dynamic_batch_on_a_static_export_is_refused(exported: Any, tmp_path: Path) -> None:
    report, x, y = exported[("6.1", False)]
    with pytest.raises(ConfigError, match="static input shape"):
        write_bundle(tmp_path / "b", onnx_report=report, jetpack=jetpack("6.1"), reference_inputs=x,
                     reference_outputs=y, manifest_extra={}, dynamic_batch=True)  # fmt: skip


def test_onnx_for_another_jetpack_is_refused(exported: Any, tmp_path: Path) -> None:
    report, x, y = exported[("4.6", False)]
    with pytest.raises(ConfigError, match=r"exported for JetPack 4\.6.*jetpack\('6\.1'\)"):
        write_bundle(tmp_path / "b", onnx_report=report, jetpack=jetpack("6.1"), reference_inputs=x,
                     reference_outputs=y, manifest_extra={})  # fmt: skip


def test_changed_onnx_file_is_refused(exported: Any, tmp_path: Path) -> None:
    report, x, y = exported[("6.1", False)]
    copy = tmp_path / "copy.onnx"
    copy.write_bytes(report.path.read_bytes() + b"!")
    changed = OnnxReport(**{**report.__dict__, "path": copy})
    with pytest.raises(ExportError, match="changed since it was exported"):
        write_bundle(tmp_path / "b", onnx_report=changed, jetpack=jetpack("6.1"), reference_inputs=x,
                     reference_outputs=y, manifest_extra={})  # fmt: skip


def test_reference_inputs_of_another_shape_are_refused(exported: Any, tmp_path: Path) -> None:
    report, x, y = exported[("6.1", False)]
    with pytest.raises(ConfigError, match="reference_inputs have shape"):
        write_bundle(tmp_path / "b", onnx_report=report, jetpack=jetpack("6.1"), reference_inputs=x[:1],
                     reference_outputs=y[:1], manifest_extra={})  # fmt: skip
