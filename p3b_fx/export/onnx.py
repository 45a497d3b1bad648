"""Export a (slim) ViT to ONNX for one JetPack release, and prove the file before it exists.

Exporter choice (torch 2.14.1, checked on ViT graphs with index_select / index_add / SDPA): the
TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``) is used. It writes the opset
it is asked for (13, 16, 17, 18), spells LayerNorm as primitive ops below opset 17 and SDPA (with or
without an explicit scale) as MatMul/Softmax from opset 14. The dynamo exporter only builds opset 18
and down-converts afterwards; the conversion fails on LayerNormalization, and it then silently
returns an opset-18 file when 13 or 16 was asked for. The TorchScript exporter fails on
``aten::index_add`` and has no SDPA at opset 13: ``passes.lower_index_add`` and
``passes.decompose_sdpa`` rewrite those first; for TensorRT before 8.5 (JetPack 4.6), whose parser
has no ``Einsum``, ``passes.decompose_einsum`` spells SAM's einsums as matmuls, and
``passes.decompose_rel_pos`` turns MViTv2's in-place relative-position write (a ``ScatterND``) into a
padded add; ``passes.decompose_fold`` spells VOLO's ``F.fold`` (``Col2Im``, opset 18) as a transposed
convolution.
``passes.transpose_gathers`` then moves the slim graph's last-axis channel gathers onto axis 0
(bitwise the same; ONNX Runtime CPU copies an innermost-axis Gather element by element). Its effect
under TensorRT is not measured here. First of all, ``passes.fold_constants`` turns tensors computed
from the weights alone into buffers: the exporter loses the shapes of such chains, and lowered a
``chunk`` of rope-mixed ViT's rotary table to a Slice with a wrong end (off by 3.4 before any
pruning). With a static input it runs again after the shapes are folded, so a rotary table computed
from the input's grid (DINOv3), and the slim graph's gather of its kept rows, become constants as
well. With a dynamic batch the shapes that do not depend on the batch (height, width, window
padding) fold the same way.

Every file is written to a temporary path in the target directory and renamed only after all
checks passed: ``onnx.checker`` (full check), the opset actually written, every op against the
target TensorRT's ONNX parser, and ONNX Runtime (CPU) outputs against the torch model.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import fx, nn

from p3b_fx.core.io import sha256_of
from p3b_fx.core.pass_infra import GraphPass, PassManager
from p3b_fx.errors import ExportError, P3BError
from p3b_fx.export.jetpack import JetPack, tensorrt_onnx_ops
from p3b_fx.tracing import copy_graph_module, trace
from passes.annotate_shapes import AnnotateShapesPass
from passes.decompose_einsum import DecomposeEinsumPass
from passes.decompose_fold import DecomposeFoldPass
from passes.decompose_rel_pos import DecomposeRelPosPass
from passes.decompose_rms_norm import DecomposeRmsNormPass
from passes.decompose_sdpa import DecomposeSdpaPass
from passes.fold_constants import FoldConstantsPass
from passes.fold_static_shapes import FoldStaticShapesPass
from passes.lower_index_add import LowerIndexAddPass, is_index_add
from passes.transpose_gathers import TransposeGathersPass

logger = logging.getLogger(__name__)

INPUT_NAME = "input"
DEFAULT_ATOL = 1e-4


@dataclass(frozen=True)
class OnnxReport:
    path: Path
    jetpack: str
    opset: int
    parity_max_abs_diff: float  # ONNX Runtime CPU vs torch, over every output and checked batch
    ops: tuple[str, ...]  # sorted op types in the graph
    sha256: str
    input_name: str
    input_shape: tuple[int, ...]  # the example's shape (batch first)
    output_names: tuple[str, ...]
    dynamic_batch: bool
    simplified: bool


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike[str],
    *,
    jetpack: JetPack,
    dynamic_batch: bool = False,
    atol: float = DEFAULT_ATOL,
    simplify: bool = False,
) -> OnnxReport:
    """Write ``model`` as ONNX for ``jetpack`` to ``path``; raise ``ExportError`` on any failed check.

    ``model`` (an nn.Module or a GraphModule, e.g. from ``p3b_fx.slim``) is not changed. The input
    shape is static unless ``dynamic_batch``. ``simplify`` runs onnxslim (if installed) and
    repeats every check on its output. No file is left at ``path`` unless every check passed.
    """
    target = _writable_target(Path(path))
    gm = _prepare_graph(model, example, jetpack, dynamic_batch)
    examples = _parity_inputs(example, dynamic_batch)
    references = [_run_torch(model, x) for x in examples]
    output_names = _output_names(len(references[0]))
    with _temporary_file(target) as tmp:
        _torch_export(
            gm, example, tmp, opset=jetpack.opset, output_names=output_names, dynamic_batch=dynamic_batch
        )
        if simplify:
            _simplify(tmp)
        ops, diff = _check_file(tmp, jetpack, examples, references, atol)
        tmp.chmod(0o644)  # mkstemp makes it private
        os.replace(tmp, target)
    logger.info("wrote %s (opset %d, parity %.2e, JetPack %s)", target, jetpack.opset, diff, jetpack.version)
    return OnnxReport(
        path=target,
        jetpack=jetpack.version,
        opset=jetpack.opset,
        parity_max_abs_diff=diff,
        ops=ops,
        sha256=sha256_of(target),
        input_name=INPUT_NAME,
        input_shape=tuple(int(s) for s in example.shape),
        output_names=output_names,
        dynamic_batch=dynamic_batch,
        simplified=simplify,
    )


def _writable_target(path: Path) -> Path:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ExportError(
            f"cannot write the ONNX file {path}: directory {parent} does not exist or is not writable; "
            "create it or choose another output path"
        )
    if path.is_dir():
        raise ExportError(f"cannot write the ONNX file {path}: it is a directory; give a file path")
    return path


@contextlib.contextmanager
def _temporary_file(target: Path) -> Iterator[Path]:
    """A temporary path next to ``target``; removed on exit unless it was renamed onto ``target``."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise ExportError(f"cannot create a file in {target.parent}: {exc}; check its permissions") from exc
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def _prepare_graph(
    model: nn.Module, example: torch.Tensor, jp: JetPack, dynamic_batch: bool
) -> fx.GraphModule:
    """A traced copy in eval mode, rewritten into ops the exporter and TensorRT both take: tensors
    computed from the weights alone folded into buffers, the input's shape arithmetic folded into
    literals (with a dynamic batch, what does not depend on the batch), and then what only those
    literals and weights compute too."""
    try:
        gm = (
            copy_graph_module(model)
            if isinstance(model, fx.GraphModule)
            else trace(model, input_shape=(1, *example.shape[1:]))
        )
        gm.eval()
        _drop_asserts(gm)
        passes: list[GraphPass] = [
            FoldConstantsPass(),
            DecomposeRmsNormPass(),  # no RMSNorm below opset 23
            DecomposeRelPosPass(),  # MViTv2's in-place bias write: a ScatterND otherwise
            DecomposeFoldPass(),  # VOLO's fold: Col2Im (opset 18) otherwise
        ]
        gathers = any(n.op == "call_function" and n.target is torch.index_select for n in gm.graph.nodes)
        if gathers or any(is_index_add(n) for n in gm.graph.nodes):
            passes += [AnnotateShapesPass(input_shape=tuple(example.shape)), LowerIndexAddPass(),
                       TransposeGathersPass()]  # fmt: skip
        if not jp.sdpa_export:
            passes.append(DecomposeSdpaPass())
        if "Einsum" not in tensorrt_onnx_ops(jp.tensorrt_version):
            passes.append(DecomposeEinsumPass())
        # last: the passes above may probe other batch sizes. With a dynamic batch only what does not
        # depend on it folds; then a table computed from the input's height and width alone (DINOv3's
        # rotary grid) is constant too
        passes += [FoldStaticShapesPass(tuple(example.shape), dynamic_batch), FoldConstantsPass()]
        return PassManager(passes).run(gm).graph_module
    except P3BError as exc:
        raise ExportError(
            f"cannot prepare {type(model).__name__} for ONNX (JetPack {jp.version}): {exc}"
        ) from exc


def _drop_asserts(gm: fx.GraphModule) -> None:
    """Remove ``torch._assert`` nodes (timm's input-size checks): the TorchScript exporter cannot
    trace a comparison of a traced size with a constant, and the ONNX input shape is fixed anyway."""
    asserts = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch._assert]
    for node in asserts:
        gm.graph.erase_node(node)
    if asserts:
        gm.graph.eliminate_dead_code()
        gm.recompile()


def _parity_inputs(example: torch.Tensor, dynamic_batch: bool) -> list[torch.Tensor]:
    """The example; with a dynamic batch also a batch one larger, so a baked batch size shows."""
    if not dynamic_batch:
        return [example]
    return [example, torch.cat([example, example[:1].flip(-1)])]


@torch.no_grad()
def _run_torch(model: nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    was_training = model.training
    model.eval()
    try:
        out = model(x)
    finally:
        model.train(was_training)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    if not outs or not all(isinstance(o, torch.Tensor) for o in outs):
        raise ExportError(
            f"{type(model).__name__} returns {type(out).__name__}; ONNX export needs a tensor or a "
            "tuple of tensors as output"
        )
    return [o.detach().float().cpu().numpy() for o in outs]


def _output_names(n: int) -> tuple[str, ...]:
    return ("output",) if n == 1 else tuple(f"output_{i}" for i in range(n))


def _torch_export(
    gm: fx.GraphModule,
    example: torch.Tensor,
    tmp: Path,
    *,
    opset: int,
    output_names: Sequence[str],
    dynamic_batch: bool,
) -> None:
    axes = {name: {0: "batch"} for name in (INPUT_NAME, *output_names)} if dynamic_batch else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.onnx.export(
                gm,
                (example,),
                str(tmp),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=list(output_names),
                dynamic_axes=axes,
                do_constant_folding=True,
            )
        except Exception as exc:  # the exporter raises many types; all mean "this graph did not export"
            raise ExportError(
                f"torch.onnx.export (TorchScript exporter, opset {opset}) failed: {type(exc).__name__}: "
                f"{exc}. An op without an ONNX mapping at this opset is the usual cause: rewrite it in "
                "the graph, or target a newer JetPack"
            ) from exc
    for w in caught:
        logger.debug("torch.onnx.export: %s", w.message)


def _simplify(tmp: Path) -> None:
    try:
        onnxslim = importlib.import_module("onnxslim")  # optional: not a dependency of p3b-fx
    except ImportError as exc:
        raise ExportError(
            "simplify=True needs onnxslim, which is not installed: `pip install onnxslim`, or export "
            "without simplification"
        ) from exc
    try:
        slim = onnxslim.slim(onnx.load(str(tmp)), skip_fusion_patterns=["FusionGemm"])
    except Exception as exc:  # onnxslim raises many types
        raise ExportError(f"onnxslim failed on the exported model: {type(exc).__name__}: {exc}") from exc
    onnx.save(slim, str(tmp))


def _check_file(
    tmp: Path,
    jp: JetPack,
    examples: Sequence[torch.Tensor],
    references: Sequence[Sequence[np.ndarray]],
    atol: float,
) -> tuple[tuple[str, ...], float]:
    model = onnx.load(str(tmp))
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the exported ONNX model is invalid (onnx.checker): {exc}") from exc
    check_opset(model, jp)
    ops = check_tensorrt_ops(model, jp)
    diff = max(_parity(tmp, x, ref, atol) for x, ref in zip(examples, references, strict=True))
    return ops, diff


def check_opset(model: onnx.ModelProto, jp: JetPack) -> None:
    """The default-domain opset written must be the one JetPack ``jp`` is exported at."""
    written = {imp.domain: imp.version for imp in model.opset_import}
    got = written.get("", written.get("ai.onnx"))
    if got != jp.opset:
        raise ExportError(
            f"the exporter wrote ONNX opset {got}, but JetPack {jp.version} (TensorRT {jp.tensorrt}) "
            f"needs opset {jp.opset}; this is an exporter bug, report it with the model"
        )


def check_tensorrt_ops(model: onnx.ModelProto, jp: JetPack) -> tuple[str, ...]:
    """Every node's op must be parsed by the JetPack's TensorRT; returns the sorted op types."""
    allowed = tensorrt_onnx_ops(jp.tensorrt_version)
    bad = [
        (node.name or f"#{i}", f"{node.domain}::{node.op_type}" if node.domain else node.op_type)
        for i, node in enumerate(model.graph.node)
        if node.domain not in ("", "ai.onnx") or node.op_type not in allowed
    ]
    if bad:
        listed = "; ".join(f"node '{name}' uses '{op}'" for name, op in bad[:10])
        more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
        raise ExportError(
            f"TensorRT {jp.tensorrt} (JetPack {jp.version}) cannot parse: {listed}{more}. Rewrite those "
            "ops in the graph (see passes/), or target a newer JetPack"
        )
    return tuple(sorted({node.op_type for node in model.graph.node}))


def _parity(tmp: Path, x: torch.Tensor, reference: Sequence[np.ndarray], atol: float) -> float:
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    outs = session.run(None, {INPUT_NAME: x.detach().float().cpu().numpy()})
    diff = 0.0
    for got, ref in zip(outs, reference, strict=True):
        if got.shape != ref.shape:
            raise ExportError(
                f"ONNX Runtime output shape {got.shape} differs from torch's {ref.shape} for an input "
                f"of shape {tuple(x.shape)}; a batch size baked into the graph is the usual cause"
            )
        diff = max(diff, float(np.max(np.abs(got.astype(np.float64) - ref))))
    if not diff <= atol:
        raise ExportError(
            f"ONNX Runtime output differs from torch by {diff:.3g} (> atol {atol:g}) for an input of shape "
            f"{tuple(x.shape)}; an op exported with different semantics is the usual cause: bisect with "
            "smaller models, or raise atol if the difference is expected"
        )
    return diff
