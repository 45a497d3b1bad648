#!/usr/bin/env python3
"""Check a TensorRT engine on the Jetson against the host's reference outputs, and time it.

Shipped as ``verify.py`` in every Jetson bundle (``p3b_fx.export.jetson``). Run it in the bundle
directory after ``bash build_engine.sh``::

    python3 verify.py [--engine model.engine] [--atol 0.05] [--min-top1 1.0] [--runs 50] [--warmup 10]

Needs only numpy, the board's ``tensorrt`` bindings, and cuda-python or pycuda (whichever is
installed). TensorRT >= 10 runs through ``execute_async_v3`` and named tensors, 8.x through
``execute_v2`` and bindings. Passes when the largest absolute difference is <= atol (an fp16
level) and, for (batch, classes) outputs, the share of samples whose top-1 class agrees is >=
min_top1 (a reference near-tie may flip in fp16: lower --min-top1 if that is expected). Exit code 0
on pass, 1 on mismatch, 2 when it cannot run; the numbers go to ``verify_result.json``.

This file runs on Python 3.6 (JetPack 4.6): no ``from __future__ import annotations``, no
dataclasses, no ``X | Y`` types, typing.List instead of list[...].
"""
# Python 3.6 on JetPack 4.6 has no builtin generics and no `X | None`; tensorrt, cuda-python and
# pycuda are imported only when the engine runs, so the comparison can be tested without them.
# ruff: noqa: UP006, UP035, UP045, PLC0415

import argparse
import json
import logging
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

logger = logging.getLogger("verify")

DEFAULT_ATOL = 5e-2
DEFAULT_MIN_TOP1 = 1.0


def compare(outputs: np.ndarray, reference: np.ndarray, atol: float, min_top1: float) -> Dict[str, Any]:
    """Max abs difference and top-1 agreement of engine ``outputs`` against ``reference``."""
    if outputs.shape != reference.shape:
        return {"passed": False, "reason": f"shape {outputs.shape} != reference {reference.shape}"}
    diff = float(np.max(np.abs(outputs.astype(np.float64) - reference.astype(np.float64))))
    result: Dict[str, Any] = {"max_abs_diff": diff, "atol": atol, "min_top1": min_top1}
    top1_ok = True
    if reference.ndim == 2 and reference.shape[1] > 1:
        agree = reference.argmax(axis=1) == outputs.argmax(axis=1)
        result["top1_agreement"] = float(np.mean(agree))
        result["top1_flipped_samples"] = [int(i) for i in np.flatnonzero(~agree)]
        top1_ok = result["top1_agreement"] >= min_top1
    result["passed"] = bool(diff <= atol) and top1_ok  # a NaN difference fails
    return result


def median_ms(run: Callable[[], None], runs: int, warmup: int) -> float:
    """Median wall time of ``run`` (which must synchronise) in milliseconds."""
    for _ in range(warmup):
        run()
    times: List[float] = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return float(statistics.median(times))


class CudaPython:
    """Device memory and a stream through cuda-python's runtime API."""

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            from cuda import cudart  # older cuda-python
        self.rt = cudart
        self.stream = self._ok(cudart.cudaStreamCreate())
        self.stream_handle = int(self.stream)

    def _ok(self, result: Any) -> Any:
        err = result[0] if isinstance(result, tuple) else result
        if int(err) != 0:
            raise RuntimeError(f"CUDA error {err}")
        return result[1] if isinstance(result, tuple) and len(result) > 1 else None

    def malloc(self, nbytes: int) -> Any:
        return self._ok(self.rt.cudaMalloc(max(nbytes, 1)))

    def to_device(self, ptr: Any, array: np.ndarray) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._ok(self.rt.cudaMemcpy(ptr, array.ctypes.data, array.nbytes, kind))

    def to_host(self, array: np.ndarray, ptr: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._ok(self.rt.cudaMemcpy(array.ctypes.data, ptr, array.nbytes, kind))

    def synchronize(self) -> None:
        self._ok(self.rt.cudaStreamSynchronize(self.stream))


class PyCuda:
    """Device memory and a stream through pycuda (JetPack 4.6 has no cuda-python)."""

    def __init__(self) -> None:
        import pycuda.autoinit  # noqa: F401 - creates the CUDA context
        from pycuda import driver

        self.driver = driver
        self.stream = driver.Stream()
        self.stream_handle = self.stream.handle

    def malloc(self, nbytes: int) -> Any:
        return self.driver.mem_alloc(max(nbytes, 1))

    def to_device(self, ptr: Any, array: np.ndarray) -> None:
        self.driver.memcpy_htod(ptr, array)

    def to_host(self, array: np.ndarray, ptr: Any) -> None:
        self.driver.memcpy_dtoh(array, ptr)

    def synchronize(self) -> None:
        self.stream.synchronize()


def cuda_backend() -> Any:
    errors: List[str] = []
    for backend in (CudaPython, PyCuda):
        try:
            return backend()
        except ImportError as exc:
            errors.append(str(exc))
    raise RuntimeError(
        f"neither cuda-python nor pycuda is installed ({'; '.join(errors)}); `pip3 install cuda-python` "
        "(JetPack >= 5) or `pip3 install pycuda` (JetPack 4.6)"
    )


def trt_major(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


def bind_v3(trt: Any, engine: Any, context: Any, cuda: Any, inputs: np.ndarray) -> Tuple[Any, Any]:
    """TensorRT >= 10: named tensors, ``execute_async_v3``. Returns (execute, fetch_output)."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
    for name in names:
        if is_input[name] and -1 in tuple(engine.get_tensor_shape(name)):  # dynamic batch
            context.set_input_shape(name, tuple(inputs.shape))
    buffers: Dict[str, Tuple[np.ndarray, Any]] = {}
    for name in names:
        dtype = trt.nptype(engine.get_tensor_dtype(name))
        if is_input[name]:
            host = np.ascontiguousarray(inputs.astype(dtype))
        else:
            host = np.empty(tuple(context.get_tensor_shape(name)), dtype=dtype)
        ptr = cuda.malloc(host.nbytes)
        context.set_tensor_address(name, int(ptr))
        buffers[name] = (host, ptr)
        if is_input[name]:
            cuda.to_device(ptr, host)

    def execute() -> None:
        if not context.execute_async_v3(cuda.stream_handle):
            raise RuntimeError("execute_async_v3 failed")
        cuda.synchronize()

    output = next(n for n in names if not is_input[n])
    return execute, lambda: _fetch(cuda, buffers[output])


def bind_v2(trt: Any, engine: Any, context: Any, cuda: Any, inputs: np.ndarray) -> Tuple[Any, Any]:
    """TensorRT 8.x: binding indices, ``execute_v2``. Returns (execute, fetch_output)."""
    count = engine.num_bindings
    for i in range(count):
        if engine.binding_is_input(i) and -1 in tuple(engine.get_binding_shape(i)):  # dynamic batch
            context.set_binding_shape(i, tuple(inputs.shape))
    buffers: List[Tuple[np.ndarray, Any]] = []
    for i in range(count):
        dtype = trt.nptype(engine.get_binding_dtype(i))
        if engine.binding_is_input(i):
            host = np.ascontiguousarray(inputs.astype(dtype))
        else:
            host = np.empty(tuple(context.get_binding_shape(i)), dtype=dtype)
        ptr = cuda.malloc(host.nbytes)
        buffers.append((host, ptr))
        if engine.binding_is_input(i):
            cuda.to_device(ptr, host)
    bindings = [int(ptr) for _, ptr in buffers]

    def execute() -> None:
        if not context.execute_v2(bindings):
            raise RuntimeError("execute_v2 failed")

    output = next(i for i in range(count) if not engine.binding_is_input(i))
    return execute, lambda: _fetch(cuda, buffers[output])


def _fetch(cuda: Any, buffer: Tuple[np.ndarray, Any]) -> np.ndarray:
    host, ptr = buffer
    cuda.to_host(host, ptr)
    return host.copy()


def run_engine(engine_path: str, inputs: np.ndarray, runs: int, warmup: int) -> Tuple[np.ndarray, float, str]:
    """Outputs of the engine for ``inputs``, median latency (ms), TensorRT version."""
    import tensorrt as trt

    cuda = cuda_backend()
    log = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(log)
    with open(engine_path, "rb") as f:
        engine = runtime.deserialize_cuda_engine(f.read())
    if engine is None:
        raise RuntimeError(
            f"cannot load {engine_path}: built by another TensorRT or for another GPU? rebuild it"
        )
    context = engine.create_execution_context()
    bind = bind_v3 if trt_major(trt) >= 10 else bind_v2
    execute, fetch = bind(trt, engine, context, cuda, inputs)
    execute()
    outputs = fetch()
    return outputs, median_ms(execute, runs, warmup), str(trt.__version__)


def _manifest(directory: str) -> Dict[str, Any]:
    path = os.path.join(directory, "manifest.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return dict(json.load(f))


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Verify and time model.engine against the reference outputs")
    parser.add_argument("--dir", default=os.path.dirname(os.path.abspath(__file__)), help="bundle directory")
    parser.add_argument("--engine", default="model.engine")
    parser.add_argument("--atol", type=float, default=None, help="max abs difference (default: manifest)")
    parser.add_argument("--min-top1", type=float, default=None, help="top-1 agreement (default: manifest)")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    manifest = _manifest(args.dir)
    defaults = manifest.get("verify", {})
    atol = args.atol if args.atol is not None else defaults.get("atol", DEFAULT_ATOL)
    min_top1 = args.min_top1 if args.min_top1 is not None else defaults.get("min_top1", DEFAULT_MIN_TOP1)
    inputs = np.load(os.path.join(args.dir, "reference_inputs.npy"))
    reference = np.load(os.path.join(args.dir, "reference_outputs.npy"))
    try:
        outputs, ms, version = run_engine(os.path.join(args.dir, args.engine), inputs, args.runs, args.warmup)
    except (RuntimeError, OSError, ImportError) as exc:
        logger.error("cannot run the engine: %s", exc)
        return 2
    expected = manifest.get("tensorrt")
    if expected and not version.startswith(str(expected) + "."):
        logger.warning("TensorRT %s here, but the bundle was made for %s", version, expected)
    result = compare(outputs.astype(np.float32), reference, float(atol), float(min_top1))
    result.update({"median_ms": ms, "batch": int(inputs.shape[0]), "runs": args.runs, "tensorrt": version})
    with open(os.path.join(args.dir, "verify_result.json"), "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
    logger.info("%s", json.dumps(result, sort_keys=True))
    logger.info("%s: max abs diff %.3g (atol %g), median %.3f ms at batch %d",
                "PASS" if result["passed"] else "FAIL", result.get("max_abs_diff", float("nan")),
                float(atol), ms, inputs.shape[0])  # fmt: skip
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
