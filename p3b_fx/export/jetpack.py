"""JetPack releases as data: TensorRT, CUDA, boards, ONNX opset and trtexec dialect per release.

One frozen table drives every JetPack-dependent decision of the exporter (which opset to emit,
whether native LayerNormalization or fused SDPA may reach the ONNX file, which trtexec flags to
write, whether DLA exists). Sources: NVIDIA's JetPack release notes and onnx-tensorrt's
``docs/operators.md`` per release branch; see ``/work/shared/docs/deploy-jetson.md``.

Opset choice per release:

- 4.6 (TensorRT 8.0 / 8.2, parser up to opset 13): export opset 13. The ONNX exporter has no
  scaled_dot_product_attention below opset 14, so attention is decomposed first.
- 5.1 (TensorRT 8.5, opset ≤ 16 per the deployment notes, no LayerNormalization): export opset 16, where
  the exporter writes LayerNorm as ReduceMean/Sub/Pow/Sqrt/Div.
- 6.x (TensorRT 8.6 / 10.3): opset 17, native LayerNormalization.
- 7.x (TensorRT 10.13 / 10.16): opset 18.
"""

from __future__ import annotations

from dataclasses import dataclass

from p3b_fx.errors import ConfigError

DEFAULT_JETPACK = "6.1"


@dataclass(frozen=True)
class Board:
    name: str
    sm: str  # compute capability, e.g. "8.7"
    has_dla: bool


NANO = Board("Jetson Nano", "5.3", has_dla=False)
TX2 = Board("Jetson TX2", "6.2", has_dla=False)
XAVIER = Board("Jetson AGX Xavier / Xavier NX", "7.2", has_dla=True)
ORIN = Board("Jetson AGX Orin / Orin NX", "8.7", has_dla=True)
ORIN_NANO = Board("Jetson Orin Nano", "8.7", has_dla=False)  # the Orin without DLA cores
THOR = Board("Jetson Thor", "11.0", has_dla=False)


@dataclass(frozen=True)
class JetPack:
    """Facts of one JetPack release that the exporter and the bundle writer depend on."""

    version: str
    tensorrt: str  # the TensorRT release on the board, "major.minor"
    cuda: str
    boards: tuple[Board, ...]
    max_opset: int  # highest opset TensorRT's ONNX parser reads
    opset: int  # the opset we export
    sdpa_export: bool  # may aten SDPA reach the exporter (False: decompose it first)

    @property
    def tensorrt_version(self) -> tuple[int, int]:
        major, minor = self.tensorrt.split(".")[:2]
        return int(major), int(minor)

    @property
    def native_layernorm(self) -> bool:
        """ONNX LayerNormalization exists from opset 17; TensorRT parses it from 8.6."""
        return self.opset >= 17 and self.tensorrt_version >= (8, 6)

    @property
    def fused_mha_possible(self) -> bool:
        """TensorRT fuses MHA on SM >= 7.5 from 8.6.2 on: true if some board of the release can."""
        return self.tensorrt_version >= (8, 6) and any(_sm(b) >= (7, 5) for b in self.boards)

    @property
    def workspace_flag(self) -> str:
        """trtexec's workspace option prefix (TensorRT 10 removed ``--workspace``)."""
        return "--memPoolSize=workspace:" if self.tensorrt_version >= (10, 0) else "--workspace="

    @property
    def build_only_flag(self) -> str:
        return "--skipInference" if self.tensorrt_version >= (8, 6) else "--buildOnly"

    @property
    def layer_info(self) -> bool:
        """trtexec ``--exportLayerInfo`` came with the engine inspector (8.2); 4.6.0 ships 8.0."""
        return self.tensorrt_version >= (8, 2)

    @property
    def builder_optimization_level(self) -> bool:
        return self.tensorrt_version >= (8, 6)

    @property
    def fp16_flag(self) -> bool:
        """TensorRT 11 drops ``--fp16`` / ``BuilderFlag.FP16`` (strong typing)."""
        return self.tensorrt_version < (11, 0)

    @property
    def strongly_typed(self) -> bool:
        return not self.fp16_flag

    @property
    def dla(self) -> bool:
        return any(b.has_dla for b in self.boards)


def _sm(board: Board) -> tuple[int, int]:
    major, minor = board.sm.split(".")
    return int(major), int(minor)


JETPACKS: dict[str, JetPack] = {
    jp.version: jp
    for jp in (
        # 4.6.0 ships TensorRT 8.0.1, 4.6.1+ 8.2.1: the op allow-list is 8.0's (the smaller one).
        JetPack("4.6", "8.0", "10.2", (NANO, TX2, XAVIER), max_opset=13, opset=13, sdpa_export=False),
        JetPack("5.1", "8.5", "11.4", (XAVIER, ORIN, ORIN_NANO), max_opset=16, opset=16, sdpa_export=True),
        JetPack("6.0", "8.6", "12.2", (ORIN, ORIN_NANO), max_opset=17, opset=17, sdpa_export=True),
        JetPack("6.1", "10.3", "12.6", (ORIN, ORIN_NANO), max_opset=20, opset=17, sdpa_export=True),
        JetPack("6.2", "10.3", "12.6", (ORIN, ORIN_NANO), max_opset=20, opset=17, sdpa_export=True),
        JetPack("7.0", "10.13", "13.0", (THOR,), max_opset=20, opset=18, sdpa_export=True),
        JetPack("7.2", "10.16", "13.2", (ORIN, ORIN_NANO, THOR), max_opset=24, opset=18, sdpa_export=True),
    )
}
"""Known releases. ``max_opset`` is conservative where NVIDIA's notes give a range."""


def jetpack(version: str = DEFAULT_JETPACK) -> JetPack:
    """The release ``version`` ("6.1"; "6.1.2" and "r36" style patch levels are not accepted)."""
    found = JETPACKS.get(version.strip())
    if found is None:
        known = ", ".join(JETPACKS)
        raise ConfigError(
            f"unknown JetPack version {version!r}; known: {known}. "
            "Pick the release installed on the board (`apt show nvidia-jetpack` prints it)"
        )
    return found


# --- ONNX ops TensorRT's ONNX parser accepts, per TensorRT release -------------------------------
# From onnx-tensorrt docs/operators.md of each release branch (rows marked "Y"). Only ops of the
# default ONNX domain are listed; anything else (custom domains, plugins) is refused.

_TRT_8_0_OPS = frozenset({
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh",
    "AveragePool", "BatchNormalization", "Cast", "Ceil", "Celu", "Clip", "Concat", "Constant",
    "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "DepthToSpace",
    "DequantizeLinear", "Div", "Elu", "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten", "Floor",
    "Gather", "GatherElements", "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater",
    "GreaterOrEqual", "GRU", "HardSigmoid", "Identity", "ImageScaler", "InstanceNormalization",
    "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop", "LRN", "LSTM", "LpNormalization",
    "LpPool", "MatMul", "Max", "MaxPool", "Mean", "Min", "Mul", "Neg", "Not", "Or", "Pad",
    "ParametricSoftplus", "Pow", "PRelu", "QuantizeLinear", "RandomUniform", "RandomUniformLike",
    "Range", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
    "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu", "Reshape", "Resize",
    "ReverseSequence", "RNN", "ScaledTanh", "Scan", "Selu", "Shape", "Sigmoid", "Sin", "Sinh", "Size",
    "Slice", "Softmax", "SoftmaxCrossEntropyLoss", "Softplus", "Softsign", "SpaceToDepth", "Split",
    "Sqrt", "Squeeze", "Sub", "Sum", "Tan", "Tanh", "ThresholdedRelu", "Tile", "TopK", "Transpose",
    "Unsqueeze", "Upsample", "Where",
})  # fmt: skip
_TRT_8_5_OPS = _TRT_8_0_OPS | frozenset({
    "Dropout", "Einsum", "GatherND", "GridSample", "HardSwish", "If", "IsNaN",
    "MeanVarianceNormalization", "Mod", "NonMaxSuppression", "NonZero", "OneHot", "RandomNormal",
    "RandomNormalLike", "Reciprocal", "RoiAlign", "Round", "Scatter", "ScatterElements", "ScatterND",
    "Shrink", "Sign", "Trilu", "Xor",
})  # fmt: skip
_TRT_8_6_OPS = _TRT_8_5_OPS | {"LayerNormalization"}
_TRT_10_OPS = _TRT_8_6_OPS | frozenset({"CastLike", "Gelu", "GroupNormalization", "Hardmax", "IsInf", "Mish"})

_TRT_OPS: tuple[tuple[tuple[int, int], frozenset[str]], ...] = (
    ((10, 0), _TRT_10_OPS),
    ((8, 6), _TRT_8_6_OPS),
    ((8, 5), _TRT_8_5_OPS),
    ((8, 0), _TRT_8_0_OPS),
)


def tensorrt_onnx_ops(tensorrt_version: tuple[int, int]) -> frozenset[str]:
    """ONNX op types (default domain) the ONNX parser of that TensorRT release supports."""
    for since, ops in _TRT_OPS:
        if tensorrt_version >= since:
            return ops
    raise ConfigError(
        f"TensorRT {tensorrt_version[0]}.{tensorrt_version[1]} is older than any release p3b-fx "
        "knows (8.0); target JetPack 4.6 or newer"
    )
