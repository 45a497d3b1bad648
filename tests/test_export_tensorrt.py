"""build_engine: the TensorRT API calls per release (through a recording fake), and real builds.

The fake ``tensorrt`` module has only the API of the release it stands for (no ``build_engine``,
no ``max_workspace_size``; no ``BuilderFlag.FP16`` from 11 on), so a call outside that API fails.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from p3b_fx.errors import ConfigError, ExportError, TargetUnavailableError
from p3b_fx.export.jetpack import jetpack
from p3b_fx.export.onnx import export_onnx
from p3b_fx.export.tensorrt import build_engine, tensorrt_available
from tests.conftest import tiny_vit

EXPLICIT_BATCH, STRONGLY_TYPED = 0, 3  # bit positions, as in TensorRT's enum


class FakeTensorRT:
    """A ``tensorrt`` module stand-in that records every call as (name, args)."""

    def __init__(
        self,
        version: str,
        *,
        input_shape: tuple[int, ...] = (1, 3, 32, 32),
        parse_errors: tuple[str, ...] = (),
        build_ok: bool = True,
        dla_cores: int = 0,
    ) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.module = self._module(version, input_shape, parse_errors, build_ok, dla_cores)

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def args(self, name: str) -> list[tuple[Any, ...]]:
        return [args for n, args in self.calls if n == name]

    def _module(
        self, version: str, shape: tuple[int, ...], errors: tuple[str, ...], build_ok: bool, dla_cores: int
    ) -> types.ModuleType:
        rec = self.calls.append
        major = int(version.split(".", 1)[0])
        mod = types.ModuleType("tensorrt")
        mod.__version__ = version  # type: ignore[attr-defined]
        flags = {"EXPLICIT_BATCH": EXPLICIT_BATCH, "STRONGLY_TYPED": STRONGLY_TYPED}
        builder_flags = {"GPU_FALLBACK": "GPU_FALLBACK"} | ({"FP16": "FP16"} if major < 11 else {})
        mod.NetworkDefinitionCreationFlag = types.SimpleNamespace(**flags)  # type: ignore[attr-defined]
        mod.BuilderFlag = types.SimpleNamespace(**builder_flags)  # type: ignore[attr-defined]
        mod.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")  # type: ignore[attr-defined]
        mod.DeviceType = types.SimpleNamespace(DLA="DLA", GPU="GPU")  # type: ignore[attr-defined]

        class Logger:
            WARNING = "WARNING"

            def __init__(self, severity: str) -> None:
                rec(("Logger", (severity,)))

        class Network:
            num_inputs = 1
            num_layers = 4

            def get_input(self, i: int) -> Any:
                return types.SimpleNamespace(name="input", shape=shape)

            def get_layer(self, i: int) -> Any:
                return types.SimpleNamespace(on_dla=i in (0, 3))

        class OnnxParser:
            num_errors = len(errors)

            def __init__(self, network: Network, logger: Logger) -> None:
                rec(("OnnxParser", ()))

            def parse_from_file(self, path: str) -> bool:
                rec(("parse_from_file", (path,)))
                return not errors

            def get_error(self, i: int) -> str:
                return errors[i]

        class TimingCache:
            def __init__(self, data: bytes) -> None:
                self.data = data

            def serialize(self) -> bytes:
                return b"cache[" + self.data + b"]+new"

        class Config:
            def __init__(self) -> None:
                object.__setattr__(self, "cache", None)

            def __setattr__(self, name: str, value: Any) -> None:
                if name not in ("default_device_type", "DLA_core"):
                    raise AttributeError(f"IBuilderConfig has no attribute {name}")
                rec((name, (value,)))

            def set_memory_pool_limit(self, pool: str, size: int) -> None:
                rec(("set_memory_pool_limit", (pool, size)))

            def set_flag(self, flag: str) -> None:
                rec(("set_flag", (flag,)))

            def create_timing_cache(self, data: bytes) -> TimingCache:
                rec(("create_timing_cache", (data,)))
                return TimingCache(data)

            def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
                rec(("set_timing_cache", (cache.data, ignore_mismatch)))
                object.__setattr__(self, "cache", cache)
                return True

            def get_timing_cache(self) -> TimingCache:
                return self.cache

            def can_run_on_DLA(self, layer: Any) -> bool:
                return bool(layer.on_dla)

            def add_optimization_profile(self, profile: Any) -> int:
                rec(("add_optimization_profile", ()))
                return 0

        class Profile:
            def set_shape(
                self, name: str, lo: tuple[int, ...], opt: tuple[int, ...], hi: tuple[int, ...]
            ) -> None:
                rec(("set_shape", (name, lo, opt, hi)))

        class Builder:
            num_DLA_cores = dla_cores

            def __init__(self, logger: Logger) -> None:
                rec(("Builder", ()))

            def create_network(self, flags: int) -> Network:
                rec(("create_network", (flags,)))
                return Network()

            def create_builder_config(self) -> Config:
                rec(("create_builder_config", ()))
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
                rec(("build_serialized_network", ()))
                return b"ENGINE-bytes" if build_ok else None

        for cls in (Logger, OnnxParser, Builder):
            setattr(mod, cls.__name__, cls)
        return mod


@pytest.fixture
def onnx_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"onnx")  # the fake parser never reads it
    return path


def _install(monkeypatch: pytest.MonkeyPatch, fake: FakeTensorRT) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", fake.module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


RELEASES = {  # TensorRT version: (create_network flags, set_flag calls, reported precision)
    "8.5.2": (1 << EXPLICIT_BATCH, [("FP16",)], "fp16"),
    "8.6.2": (1 << EXPLICIT_BATCH, [("FP16",)], "fp16"),
    "10.3.0": (0, [("FP16",)], "fp16"),
    "10.16.1": (0, [("FP16",)], "fp16"),
    "11.0.0": (1 << STRONGLY_TYPED, [], "strongly-typed"),
}


@pytest.mark.parametrize("version", list(RELEASES))
def test_network_flags_and_precision_follow_the_release(
    version: str, onnx_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    network_flags, flags, precision = RELEASES[version]
    fake = FakeTensorRT(version)
    _install(monkeypatch, fake)
    report = build_engine(onnx_file, onnx_file.with_suffix(".engine"), fp16=True)
    assert fake.args("create_network") == [(network_flags,)]
    assert fake.args("set_flag") == flags
    assert report.precision == precision and report.tensorrt_version == version


def test_call_sequence_from_logger_to_serialized_network(
    onnx_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeTensorRT("10.3.0")
    _install(monkeypatch, fake)
    build_engine(onnx_file, onnx_file.with_suffix(".engine"), workspace_mb=512)
    assert fake.names() == [
        "Logger", "Builder", "create_network", "OnnxParser", "parse_from_file", "create_builder_config",
        "set_memory_pool_limit", "set_flag", "build_serialized_network",
    ]  # fmt: skip
    assert fake.args("Logger") == [("WARNING",)]
    assert fake.args("parse_from_file") == [(str(onnx_file),)]
    assert fake.args("set_memory_pool_limit") == [("WORKSPACE", 512 << 20)]


def test_fp32_build_sets_no_precision_flag(onnx_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTensorRT("8.6.2")
    _install(monkeypatch, fake)
    report = build_engine(onnx_file, onnx_file.with_suffix(".engine"), fp16=False)
    assert fake.args("set_flag") == [] and report.precision == "fp32"


def test_engine_is_written_atomically_and_reported(onnx_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, FakeTensorRT("10.3.0"))
    engine = onnx_file.with_suffix(".engine")
    report = build_engine(onnx_file, engine)
    assert engine.read_bytes() == b"ENGINE-bytes"
    assert engine.stat().st_mode & 0o777 == 0o644
    assert report.size_bytes == 12 and len(report.sha256) == 64
    assert sorted(p.name for p in onnx_file.parent.iterdir()) == ["model.engine", "model.onnx"]


@pytest.mark.parametrize("existing", [None, b"old"])
def test_timing_cache_is_read_and_saved_back(
    existing: bytes | None, onnx_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeTensorRT("10.3.0")
    _install(monkeypatch, fake)
    cache = onnx_file.parent / "timing.cache"
    if existing is not None:
        cache.write_bytes(existing)
    report = build_engine(onnx_file, onnx_file.with_suffix(".engine"), timing_cache=cache)
    loaded = existing or b""
    assert fake.args("create_timing_cache") == [(loaded,)]
    assert fake.args("set_timing_cache") == [(loaded, False)]
    assert fake.names().index("set_timing_cache") < fake.names().index("build_serialized_network")
    assert cache.read_bytes() == b"cache[" + loaded + b"]+new"
    assert report.timing_cache == cache


def test_every_parser_error_is_reported(onnx_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTensorRT("8.6.2", parse_errors=("node 3: UNSUPPORTED_NODE Foo", "node 7: INVALID_GRAPH"))
    _install(monkeypatch, fake)
    engine = onnx_file.with_suffix(".engine")
    with pytest.raises(ExportError, match=r"cannot parse .*UNSUPPORTED_NODE Foo \| node 7: INVALID_GRAPH"):
        build_engine(onnx_file, engine)
    assert "build_serialized_network" not in fake.names()
    assert not engine.exists()


def test_failed_build_writes_nothing(onnx_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, FakeTensorRT("10.3.0", build_ok=False))
    engine = onnx_file.with_suffix(".engine")
    with pytest.raises(ExportError, match="could not build an engine"):
        build_engine(onnx_file, engine)
    assert sorted(p.name for p in onnx_file.parent.iterdir()) == ["model.onnx"]


def test_dla_core_with_gpu_fallback_and_layer_share(onnx_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTensorRT("8.6.2", dla_cores=2)
    _install(monkeypatch, fake)
    report = build_engine(onnx_file, onnx_file.with_suffix(".engine"), dla_core=1)
    assert fake.args("default_device_type") == [("DLA",)]
    assert fake.args("DLA_core") == [(1,)]
    assert ("GPU_FALLBACK",) in fake.args("set_flag")
    assert report.dla_core == 1 and report.dla_layer_share == 0.5


def test_dla_on_a_gpu_without_dla_is_unavailable(onnx_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, FakeTensorRT("10.3.0", dla_cores=0))
    with pytest.raises(TargetUnavailableError, match="DLA core 0 requested, but this device has 0"):
        build_engine(onnx_file, onnx_file.with_suffix(".engine"), dla_core=0)


def test_dynamic_batch_adds_one_profile(onnx_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTensorRT("10.3.0", input_shape=(-1, 3, 32, 32))
    _install(monkeypatch, fake)
    report = build_engine(onnx_file, onnx_file.with_suffix(".engine"), dynamic_batch=(1, 4, 8))
    assert fake.args("set_shape") == [("input", (1, 3, 32, 32), (4, 3, 32, 32), (8, 3, 32, 32))]
    assert fake.names().count("add_optimization_profile") == 1
    assert report.dynamic_batch == (1, 4, 8)


@pytest.mark.parametrize(
    "case",
    [
        ((1, 3, 32, 32), (1, 4, 8), "export with dynamic_batch=True"),
        ((-1, 3, 32, 32), None, r"pass dynamic_batch=\(min, opt, max\)"),
        ((-1, 3, 32, 32), (4, 2, 8), "1 <= min <= opt <= max"),
    ],
)
def test_batch_profile_mismatch_is_a_config_error(
    case: tuple[tuple[int, ...], tuple[int, int, int] | None, str],
    onnx_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shape, batch, message = case
    _install(monkeypatch, FakeTensorRT("10.3.0", input_shape=shape))
    with pytest.raises(ConfigError, match=message):
        build_engine(onnx_file, onnx_file.with_suffix(".engine"), dynamic_batch=batch)


def test_tensorrt_older_than_8_5_points_to_trtexec(onnx_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, FakeTensorRT("8.2.1"))
    with pytest.raises(TargetUnavailableError, match=r"older than 8\.5.*trtexec"):
        build_engine(onnx_file, onnx_file.with_suffix(".engine"))


def test_without_tensorrt_the_build_is_unavailable(onnx_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    ok, why = tensorrt_available()
    assert not ok and "not installed" in why
    with pytest.raises(TargetUnavailableError, match=r"not installed.*--target jetson"):
        build_engine(onnx_file, onnx_file.with_suffix(".engine"))
    assert not onnx_file.with_suffix(".engine").exists()


def test_without_cuda_the_build_is_unavailable(onnx_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT("10.3.0").module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ok, why = tensorrt_available()
    assert not ok and "no CUDA device" in why
    with pytest.raises(TargetUnavailableError, match="no CUDA device"):
        build_engine(onnx_file, onnx_file.with_suffix(".engine"))


@pytest.mark.tensorrt
@pytest.mark.parametrize("dynamic", [False, True])
def test_real_engine_from_an_exported_vit(dynamic: bool, tmp_path: Path) -> None:
    x = torch.randn(2, 3, 32, 32)
    onnx_report = export_onnx(
        tiny_vit(depth=1), x, tmp_path / "m.onnx", jetpack=jetpack("6.1"), dynamic_batch=dynamic
    )
    report = build_engine(
        onnx_report.path, tmp_path / "m.engine", timing_cache=tmp_path / "t.cache",
        dynamic_batch=(1, 2, 4) if dynamic else None,
    )  # fmt: skip
    assert report.size_bytes == (tmp_path / "m.engine").stat().st_size > 0
    assert (tmp_path / "t.cache").stat().st_size > 0
