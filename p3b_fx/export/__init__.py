"""Deployment back end: ONNX per JetPack release, TensorRT engines, and Jetson bundles.

::

    jp = jetpack("6.1")
    report = export_onnx(slim_gm, example, "model.onnx", jetpack=jp)     # checked before it exists
    write_bundle("bundle/", onnx_report=report, jetpack=jp, ...)         # the board builds the engine
    build_engine("model.onnx", "model.engine")                           # here, if TensorRT + CUDA
"""

from __future__ import annotations

from p3b_fx.export.jetpack import DEFAULT_JETPACK, JETPACKS, Board, JetPack, jetpack, tensorrt_onnx_ops
from p3b_fx.export.jetson import BundleReport, trtexec_command, write_bundle
from p3b_fx.export.onnx import OnnxReport, export_onnx
from p3b_fx.export.tensorrt import EngineReport, build_engine, tensorrt_available

__all__ = [
    "DEFAULT_JETPACK", "JETPACKS", "Board", "BundleReport", "EngineReport", "JetPack", "OnnxReport",
    "build_engine", "export_onnx", "jetpack", "tensorrt_available", "tensorrt_onnx_ops", "trtexec_command",
    "write_bundle",
]  # fmt: skip
