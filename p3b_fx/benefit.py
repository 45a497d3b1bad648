"""Block benefit (method doc §1): small probes that measure how much each residual sub-block helps.

The residual stream x_0 (embeddings + pos) … x_B (before the final norm) is handed over per training
step; block i maps x_{i-1} to x_i. Block i owns a probe Ψ_i that reads *both* its input and its output:

    ΔΨ_i = CE(Ψ_i(sg(x_{i-1}))) - CE(Ψ_i(sg(x_i)))          (sg = stop-gradient)

Positive ΔΨ_i: the block made the representation more useful for the task. Two probe families:

- class token (when the model has one): ``CLS_LINEAR``, a Linear(dim, classes) on token 0;
- patch tokens: ``PATCH_CONV`` (reference: tokens → grid, 2 x [Conv3x3 no bias → BatchNorm2d →
  ReLU], global average pool, Linear) or ``PATCH_LINEAR`` (mean of the patch tokens → Linear).

The probes train on their own loss, the sum of all their cross-entropies (reference), computed from
detached features, so nothing reaches the backbone. Linear probes of all blocks run as one batched
matmul over the stacked B+1 feature maps; conv probes run on x_{i-1} and x_i in two calls, so their
BatchNorm sees each map with its own batch statistics, as in the reference. Conv probes run either
block by block (2B small conv chains per step) or ``grouped``: the B blocks' maps stacked along
channels through one grouped convolution per layer (``groups=B``), their BatchNorms as one over B·hidden
channels, their heads as one batched matmul. The grouped form computes the same function with the
same parameters, buffers and state dict (the per-block weights are concatenated on every call), so
either can resume the other's checkpoint; it trades 2B launches for two, which is what a GPU wants
(measured: ``docs/gpu-check.md``, ``tools/bench_probe_batching.py``).
Models whose stream changes between blocks (pooling stages, class-attention blocks) use
:class:`BlockwiseProbes`: the same probes and ΔΨ, block by block, each for its own token layout.

Cost (:func:`probe_params`): a conv probe holds 9·dim·hidden + 9·hidden² conv weights. The method
doc fixes the layers, not their width; with hidden = dim = 768 (ViT-B) that is two 5.3 M
convolutions, ≈ 10.6 M parameters per block plus the Linear (≈ 11.4 M with 1000 classes; ≈ 273 M
for the 24 blocks of ViT-B), and its forward pass costs ~5.7x the model's. **Our choice**: the
default width is :func:`default_hidden` = max(16, dim // 4) (ViT-B: 192 channels, ≈ 1.9 M
parameters per block, about the model's own forward cost over all 24 blocks); ``hidden`` sets any
other width. ``PATCH_LINEAR`` and ``CLS_LINEAR`` cost dim·classes + classes each.
Measured: ``docs/bench-train-step.md`` (step cost), ``docs/bench-transfer.md`` (accuracy).

This module knows nothing of torch.fx.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from p3b_fx.criteria import all_reduce_window
from p3b_fx.errors import CheckpointError, ConfigError, TrainingError

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

logger = logging.getLogger(__name__)

__all__ = [
    "BenefitAccumulator",
    "BenefitProbes",
    "BlockLayout",
    "BlockwiseProbes",
    "ProbeKind",
    "ProbeOutput",
    "default_hidden",
    "grouped_conv_probes",
    "probe_params",
]


class ProbeKind(StrEnum):
    """Probe designs. ``CLS_LINEAR`` reads the class token; the other two read the patch tokens."""

    CLS_LINEAR = "cls_linear"
    PATCH_CONV = "patch_conv"
    PATCH_LINEAR = "patch_linear"


PATCH_KINDS = (ProbeKind.PATCH_CONV, ProbeKind.PATCH_LINEAR)


def default_hidden(dim: int) -> int:
    """The conv probe's default channel count for a model of width ``dim``: max(16, dim // 4)."""
    return max(16, dim // 4)


def probe_params(kind: ProbeKind | str, dim: int, num_classes: int, hidden: int | None = None) -> int:
    """Trainable parameters of ONE probe of ``kind`` (one block); BatchNorm running stats excluded."""
    width = dim
    convs = 0
    if ProbeKind(kind) is ProbeKind.PATCH_CONV:
        width = default_hidden(dim) if hidden is None else hidden
        convs = 9 * dim * width + 9 * width * width + 2 * 2 * width  # two convs, two BatchNorm (weight, bias)
    return convs + width * num_classes + num_classes


@dataclass(frozen=True)
class ProbeOutput:
    """What one step of the probes yields.

    ``loss``: the probes' own training loss (sum of every probe's CE on its input and its output);
    backpropagate it into the probes' optimiser, it cannot reach the backbone.
    ``benefit_cls`` / ``benefit_patch``: ΔΨ per block, detached, shape (B,); ``benefit_cls`` is None
    when the model has no class token. With :class:`BlockwiseProbes`, a block without a probe of that
    kind (CaiT's class-attention blocks carry no patch tokens) has NaN there.
    """

    loss: torch.Tensor
    benefit_cls: torch.Tensor | None
    benefit_patch: torch.Tensor


def _bn_stats(bns: Sequence[nn.BatchNorm2d]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The running statistics of ``bns`` concatenated, or (None, None) when they track none."""
    if not all(bn.track_running_stats and bn.running_mean is not None for bn in bns):
        return None, None
    return torch.cat([bn.running_mean for bn in bns]), torch.cat([bn.running_var for bn in bns])  # type: ignore[misc]


class _GroupedBatchNorm:
    """B BatchNorm2d layers of one width applied to their maps stacked along channels, as one call.

    Training mode only (the probes always train). The running statistics are concatenated once,
    updated by every call as each layer's own would be, and written back by :meth:`store`.
    """

    def __init__(self, bns: Sequence[nn.BatchNorm2d]) -> None:
        first = bns[0]
        if first.momentum is None:  # cumulative averaging: ConvProbe never asks for it
            raise ConfigError("grouped conv probes need BatchNorm2d with a momentum, not None")
        self.bns, self.eps, self.momentum = bns, first.eps, float(first.momentum)
        self.weight = torch.cat([bn.weight for bn in bns]) if first.affine else None
        self.bias = torch.cat([bn.bias for bn in bns]) if first.affine else None
        self.running_mean, self.running_var = _bn_stats(bns)
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, True, self.momentum, self.eps
        )

    def store(self) -> None:
        """Write the updated running statistics back into each BatchNorm2d."""
        if self.running_mean is None or self.running_var is None or not self.calls:
            return
        width = self.bns[0].num_features
        means = [bn.running_mean for bn in self.bns]
        variances = [bn.running_var for bn in self.bns]
        # a no_grad block, not the decorator: torch.compile traces the block without a graph break
        with torch.no_grad():
            torch._foreach_copy_(means, list(torch.split(self.running_mean, width)))  # type: ignore[arg-type]
            torch._foreach_copy_(variances, list(torch.split(self.running_var, width)))  # type: ignore[arg-type]
            counters = [bn.num_batches_tracked for bn in self.bns]
            torch._foreach_add_(counters, self.calls)  # type: ignore[arg-type]


def grouped_conv_probes(probes: Sequence[ConvProbe], maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Logits (B, batch, classes) of probe i on map i, for each (batch, B·dim, h, w) stack in ``maps``.

    The same function as running each probe on its own map (``ConvProbe.forward``, training mode),
    in one grouped convolution per layer; BatchNorm statistics are each probe's own per map.
    """
    n = len(probes)
    convs = [[p.body[i] for p in probes] for i in (0, 3)]
    weights = [torch.cat([c.weight for c in layer]) for layer in convs]  # type: ignore[misc]
    norms = [_GroupedBatchNorm([p.body[i] for p in probes]) for i in (1, 4)]  # type: ignore[misc]
    fc_weight = torch.stack([p.fc.weight for p in probes]).transpose(1, 2)
    fc_bias = torch.stack([p.fc.bias for p in probes]).unsqueeze(1)
    hidden = probes[0].fc.in_features
    out = []
    for stacked in maps:
        x = stacked
        for weight, norm in zip(weights, norms, strict=True):
            x = F.relu(norm(F.conv2d(x, weight, padding=1, groups=n)))
        pooled = x.mean(dim=(2, 3)).view(x.shape[0], n, hidden).transpose(0, 1)
        out.append(torch.baddbmm(fc_bias, pooled, fc_weight))
    for norm in norms:
        norm.store()
    return out


class _BatchedLinear(nn.Module):
    """``n`` independent Linear(dim, out) layers applied to a stack (n, batch, dim) in one baddbmm."""

    def __init__(self, n: int, dim: int, out: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(dim)
        self.weight = nn.Parameter(torch.empty(n, dim, out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, out).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight)


class ConvProbe(nn.Module):
    """Reference patch probe: 2 x [Conv3x3 (no bias) → BatchNorm2d → ReLU], global average pool, Linear."""

    def __init__(self, dim: int, num_classes: int, hidden: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in in (dim, hidden):
            layers += [nn.Conv2d(c_in, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.fc(self.body(grid).mean(dim=(2, 3)))
        return logits


def _grid(grid_size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if grid_size is None:
        return None
    h, w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    if h <= 0 or w <= 0:
        raise ConfigError(f"BenefitProbes: grid_size must be positive, got {grid_size!r}")
    return int(h), int(w)


def _check_config(num_blocks: int, dim: int, num_classes: int, *, prefix: int, cls: bool, kind: str) -> None:
    if num_blocks <= 0 or dim <= 0 or num_classes <= 1:
        raise ConfigError(
            f"BenefitProbes: need num_blocks ≥ 1, dim ≥ 1 and num_classes ≥ 2, got {num_blocks}, {dim}, "
            f"{num_classes}"
        )
    if prefix < int(cls):
        raise ConfigError(
            f"BenefitProbes: has_class_token=True needs num_prefix_tokens ≥ 1, got {prefix}; "
            "pass the model's num_prefix_tokens (class + register/distillation tokens)"
        )
    if kind not in PATCH_KINDS:
        raise ConfigError(
            f"BenefitProbes: patch_kind must be one of {[str(k) for k in PATCH_KINDS]}, got {kind!r}"
        )


def _block_ce(
    logits_in: torch.Tensor, logits_out: torch.Tensor, labels: torch.Tensor, smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-mean CE per block of logits shaped (B, batch, classes); returns (ce_in, ce_out), each (B,)."""
    blocks, batch, _ = logits_in.shape
    target = labels.repeat(blocks) if labels.dim() == 1 else labels.float().repeat(blocks, 1)
    both = torch.cat([logits_in, logits_out]).float().flatten(0, 1)
    target = torch.cat([target, target])
    ce = F.cross_entropy(both, target, reduction="none", label_smoothing=smoothing)
    ce = ce.view(2, blocks, batch).mean(dim=2)
    return ce[0], ce[1]


class BenefitProbes(nn.Module):
    """The probes Ψ_1 … Ψ_B of one model; ``forward(features, labels)`` → :class:`ProbeOutput`.

    ``grid_size``: patch grid (h, w), or one int for a square grid; None infers a square grid from
    the token count. ``num_prefix_tokens``: class + register/distillation tokens at the front (the
    class token, when present, is token 0). ``hidden``: conv-probe channels (default
    :func:`default_hidden`). ``grouped``: run the conv probes as grouped convolutions (see the
    module docstring; the same function, fewer and larger kernels); an attribute, switchable at any
    time. ``label_smoothing`` is passed to the probes' cross-entropy (use the task's value).
    """

    def __init__(
        self,
        num_blocks: int,
        dim: int,
        num_classes: int,
        *,
        grid_size: int | tuple[int, int] | None,
        num_prefix_tokens: int,
        has_class_token: bool,
        patch_kind: ProbeKind | str = ProbeKind.PATCH_CONV,
        hidden: int | None = None,
        label_smoothing: float = 0.0,
        grouped: bool = False,
    ) -> None:
        super().__init__()
        _check_config(
            num_blocks, dim, num_classes, prefix=num_prefix_tokens, cls=has_class_token, kind=str(patch_kind)
        )
        self.grouped = grouped
        self.num_blocks, self.dim, self.num_classes = num_blocks, dim, num_classes
        self.grid_size = _grid(grid_size)
        self.num_prefix_tokens, self.has_class_token = num_prefix_tokens, has_class_token
        self.patch_kind = ProbeKind(patch_kind)
        self.label_smoothing = label_smoothing
        self.cls_probes = _BatchedLinear(num_blocks, dim, num_classes) if has_class_token else None
        self.patch_linear: _BatchedLinear | None = None
        self.patch_conv: nn.ModuleList | None = None
        if self.patch_kind is ProbeKind.PATCH_LINEAR:
            self.patch_linear = _BatchedLinear(num_blocks, dim, num_classes)
        else:
            width = default_hidden(dim) if hidden is None else hidden
            self.patch_conv = nn.ModuleList(ConvProbe(dim, num_classes, width) for _ in range(num_blocks))
        logger.debug(
            "benefit probes: %d blocks, patch probe %s, class-token probe %s, %d parameters",
            num_blocks,
            self.patch_kind,
            has_class_token,
            self.num_probe_params(),
        )

    def _patch_grid(self, num_tokens: int) -> tuple[int, int]:
        patches = num_tokens - self.num_prefix_tokens
        if self.grid_size is not None:
            h, w = self.grid_size
        else:
            h = w = math.isqrt(max(patches, 0))
        if patches <= 0 or h * w != patches:
            raise TrainingError(
                f"BenefitProbes: features have {num_tokens} tokens = {self.num_prefix_tokens} prefix + "
                f"{patches} patch tokens, which do not fill the patch grid "
                f"{self.grid_size or 'inferred as square'}; pass the model's grid_size (h, w) and "
                "num_prefix_tokens"
            )
        return h, w

    def _check_inputs(self, features: Sequence[torch.Tensor], labels: torch.Tensor) -> None:
        if len(features) != self.num_blocks + 1:
            raise TrainingError(
                f"BenefitProbes: expected {self.num_blocks + 1} feature maps x_0 … x_{self.num_blocks} (one "
                f"more than blocks), got {len(features)}"
            )
        shape = features[0].shape
        bad = [
            i for i, f in enumerate(features) if f.dim() != 3 or f.shape != shape or f.shape[2] != self.dim
        ]
        if bad:
            raise TrainingError(
                f"BenefitProbes: every feature map must be (batch, tokens, {self.dim}) like x_0 "
                f"{tuple(shape)}; x_{bad[0]} is {tuple(features[bad[0]].shape)}"
            )
        if shape[1] <= self.num_prefix_tokens or self.grid_size is not None:
            self._patch_grid(shape[1])
        if labels.shape[0] != shape[0] or labels.dim() not in (1, 2):
            raise TrainingError(
                f"BenefitProbes: labels {tuple(labels.shape)} must be (batch,) class indices or "
                f"(batch, classes) probabilities for a batch of {shape[0]}"
            )

    def _patch_logits(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Patch-probe logits of all B+1 maps, shaped (2, B, batch, classes): [inputs, outputs]."""
        p = self.num_prefix_tokens
        if self.patch_linear is not None:
            pooled = torch.stack([f[:, p:].mean(dim=1) for f in feats])
            return torch.stack([self.patch_linear(pooled[:-1]), self.patch_linear(pooled[1:])])
        assert self.patch_conv is not None
        h, w = self._patch_grid(feats[0].shape[1])
        if self.grouped:
            # (batch, B+1, dim, h·w) once; block i reads channels [i·dim, (i+B)·dim) of the inputs' or
            # the outputs' window of it
            stack = torch.stack([f[:, p:] for f in feats], dim=1).transpose(2, 3)
            stack = stack.reshape(feats[0].shape[0], -1, h, w)
            size = self.num_blocks * self.dim
            maps = [stack[:, :size], stack[:, self.dim :]]
            return torch.stack(grouped_conv_probes(list(self.patch_conv), maps))  # type: ignore[arg-type]
        grids = [f[:, p:].transpose(1, 2).reshape(f.shape[0], self.dim, h, w) for f in feats]
        ins = [probe(grids[i]) for i, probe in enumerate(self.patch_conv)]
        outs = [probe(grids[i + 1]) for i, probe in enumerate(self.patch_conv)]
        return torch.stack([torch.stack(ins), torch.stack(outs)])

    def forward(self, features: Sequence[torch.Tensor], labels: torch.Tensor) -> ProbeOutput:
        """Evaluate every Ψ_i on sg(x_{i-1}) and sg(x_i); see :class:`ProbeOutput`."""
        self._check_inputs(features, labels)
        feats = [f.detach() for f in features]
        patch = self._patch_logits(feats)
        ce_in, ce_out = _block_ce(patch[0], patch[1], labels, self.label_smoothing)
        loss = ce_in.sum() + ce_out.sum()
        benefit_patch = (ce_in - ce_out).detach()
        benefit_cls = None
        if self.cls_probes is not None:
            tokens = torch.stack([f[:, 0] for f in feats])
            cin, cout = _block_ce(
                self.cls_probes(tokens[:-1]), self.cls_probes(tokens[1:]), labels, self.label_smoothing
            )
            loss = loss + cin.sum() + cout.sum()
            benefit_cls = (cin - cout).detach()
        return ProbeOutput(loss=loss, benefit_cls=benefit_cls, benefit_patch=benefit_patch)

    @property
    def cls_blocks(self) -> tuple[bool, ...]:
        """Per block: whether it has a class-token probe."""
        return (self.has_class_token,) * self.num_blocks

    @property
    def patch_blocks(self) -> tuple[bool, ...]:
        """Per block: whether it has a patch-token probe."""
        return (True,) * self.num_blocks

    def num_probe_params(self) -> int:
        """Trainable parameters of all probes (what :func:`probe_params` predicts, times B)."""
        return sum(p.numel() for p in self.parameters())


@dataclass(frozen=True)
class BlockLayout:
    """The token layout of one block's input and output: (batch, prefix + grid h·w, dim).

    ``grid`` None: the block carries no patch tokens (CaiT's class-attention blocks read the class
    token alone), so it gets no patch probe. ``has_class_token``: token 0 is the class token.
    ``spatial``: the stream is (batch, h, w, dim) instead, the grid without prefix tokens (Swin's
    stages); the probes read it as its h·w tokens. ``channels_first`` (with ``spatial``): the stream
    is (batch, dim, h, w), an image (FastViT, PoolFormer, EfficientFormerV2, SwiftFormer).
    """

    dim: int
    num_prefix_tokens: int
    grid: tuple[int, int] | None
    has_class_token: bool
    spatial: bool = False
    channels_first: bool = False

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + (0 if self.grid is None else self.grid[0] * self.grid[1])

    @property
    def stream_shape(self) -> tuple[int, ...]:
        """The stream's shape after the batch axis."""
        if self.spatial and self.grid is not None:
            return (self.dim, *self.grid) if self.channels_first else (*self.grid, self.dim)
        return (self.num_tokens, self.dim)

    def tokens(self, f: torch.Tensor) -> torch.Tensor:
        """``f`` as (batch, tokens, dim)."""
        if self.channels_first:
            return f.flatten(2).transpose(1, 2)
        return f.flatten(1, 2) if self.spatial else f


class BlockwiseProbes(nn.Module):
    """Probes for models whose blocks do not all read one stream: pooling stages (PiT, LeViT) change
    tokens and width, CaiT and XCiT end with class-attention blocks on another token layout.

    Block i reads the tap ``pairs[i][0]`` and writes the tap ``pairs[i][1]`` (see
    ``passes.insert_taps.tap_points``) and has its own probes for its own :class:`BlockLayout`: a
    class-token Linear where the layout has a class token, a patch probe (conv or linear) where it
    has a patch grid. Same ΔΨ and loss as :class:`BenefitProbes`, block by block; a block without a
    probe of one kind reports NaN for it. Plain ViTs use :class:`BenefitProbes`, whose batched
    linear probes are faster.
    """

    def __init__(
        self,
        layouts: Sequence[BlockLayout],
        pairs: Sequence[tuple[int, int]],
        num_classes: int,
        *,
        patch_kind: ProbeKind | str = ProbeKind.PATCH_CONV,
        hidden: int | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if len(layouts) != len(pairs) or not layouts:
            raise ConfigError(
                f"BlockwiseProbes: need one layout and one (input, output) tap pair per block, got "
                f"{len(layouts)} layouts and {len(pairs)} pairs"
            )
        for i, lay in enumerate(layouts):
            _check_config(1, lay.dim, num_classes, prefix=lay.num_prefix_tokens, cls=lay.has_class_token,
                          kind=str(patch_kind))  # fmt: skip
            if lay.grid is None and not lay.has_class_token:
                raise ConfigError(
                    f"BlockwiseProbes: block {i} has neither a class token nor a patch grid "
                    f"({lay}); P3B cannot measure its benefit"
                )
        self.layouts, self.pairs = tuple(layouts), tuple(pairs)
        self.num_blocks, self.num_classes = len(layouts), num_classes
        self.patch_kind = ProbeKind(patch_kind)
        self.label_smoothing = label_smoothing
        self.has_class_token = any(lay.has_class_token for lay in layouts)
        self.cls = nn.ModuleList(
            nn.Linear(lay.dim, num_classes) if lay.has_class_token else nn.Identity() for lay in layouts
        )
        self.patch = nn.ModuleList(self._patch_probe(lay, hidden) for lay in layouts)

    def _patch_probe(self, lay: BlockLayout, hidden: int | None) -> nn.Module:
        if lay.grid is None:
            return nn.Identity()
        if self.patch_kind is ProbeKind.PATCH_LINEAR:
            return nn.Linear(lay.dim, self.num_classes)
        return ConvProbe(lay.dim, self.num_classes, default_hidden(lay.dim) if hidden is None else hidden)

    @property
    def cls_blocks(self) -> tuple[bool, ...]:
        return tuple(lay.has_class_token for lay in self.layouts)

    @property
    def patch_blocks(self) -> tuple[bool, ...]:
        return tuple(lay.grid is not None for lay in self.layouts)

    def _check_inputs(self, features: Sequence[torch.Tensor], labels: torch.Tensor) -> None:
        needed = 1 + max(max(p) for p in self.pairs)
        if len(features) != needed:
            raise TrainingError(
                f"BlockwiseProbes: expected {needed} tapped feature maps, got {len(features)}"
            )
        for i, (lay, (a, b)) in enumerate(zip(self.layouts, self.pairs, strict=True)):
            for f in (features[a], features[b]):
                if tuple(f.shape[1:]) != lay.stream_shape:
                    want = ", ".join(map(str, lay.stream_shape))
                    raise TrainingError(
                        f"BlockwiseProbes: block {i} expects (batch, {want}) maps, got {tuple(f.shape)}; "
                        "the probes were built for another input size"
                    )
        if labels.shape[0] != features[0].shape[0] or labels.dim() not in (1, 2):
            raise TrainingError(
                f"BlockwiseProbes: labels {tuple(labels.shape)} must be (batch,) class indices or "
                f"(batch, classes) probabilities for a batch of {features[0].shape[0]}"
            )

    def _patch_logits(self, probe: nn.Module, lay: BlockLayout, f: torch.Tensor) -> torch.Tensor:
        assert lay.grid is not None
        tokens = f[:, lay.num_prefix_tokens :]
        if self.patch_kind is ProbeKind.PATCH_LINEAR:
            out: torch.Tensor = probe(tokens.mean(dim=1))
            return out
        grid = tokens.transpose(1, 2).reshape(f.shape[0], lay.dim, *lay.grid)
        out = probe(grid)
        return out

    def forward(self, features: Sequence[torch.Tensor], labels: torch.Tensor) -> ProbeOutput:
        """Evaluate every block's probes on its detached input and output; see :class:`ProbeOutput`."""
        self._check_inputs(features, labels)
        feats = [f.detach() for f in features]
        nan = torch.full((self.num_blocks,), float("nan"), device=feats[0].device)
        benefit = {"cls": nan.clone(), "patch": nan.clone()}
        losses: list[torch.Tensor] = []
        for i, (lay, (a, b)) in enumerate(zip(self.layouts, self.pairs, strict=True)):
            heads: list[tuple[str, torch.Tensor, torch.Tensor]] = []
            f_in, f_out = lay.tokens(feats[a]), lay.tokens(feats[b])
            if lay.has_class_token:
                heads.append(("cls", self.cls[i](f_in[:, 0]), self.cls[i](f_out[:, 0])))
            if lay.grid is not None:
                heads.append(("patch", self._patch_logits(self.patch[i], lay, f_in),
                              self._patch_logits(self.patch[i], lay, f_out)))  # fmt: skip
            for kind, logits_in, logits_out in heads:
                ce_in, ce_out = _block_ce(logits_in[None], logits_out[None], labels, self.label_smoothing)
                losses += [ce_in.sum(), ce_out.sum()]
                benefit[kind][i] = (ce_in - ce_out).detach()[0]
        return ProbeOutput(
            loss=torch.stack(losses).sum(),
            benefit_cls=benefit["cls"] if self.has_class_token else None,
            benefit_patch=benefit["patch"],
        )

    def num_probe_params(self) -> int:
        """Trainable parameters of all probes."""
        return sum(p.numel() for p in self.parameters())


class BenefitAccumulator:
    """Window sums (float64) and counts of ΔΨ per block, for the class-token and the patch probes.

    Sums live on the device of the benefits (no host sync per step); :meth:`mean` syncs once per
    window. A block whose ΔΨ is not finite on a step (an AMP overflow) is not counted on that step.
    """

    def __init__(
        self, num_blocks: int, has_class_token: bool, *, probed: Sequence[Sequence[bool]] | None = None
    ) -> None:
        """``probed``: (cls, patch) rows of per-block flags, for :class:`BlockwiseProbes`, whose
        blocks may lack a probe kind; default: every block has a patch probe, and a class-token probe
        when ``has_class_token``."""
        if num_blocks <= 0:
            raise ConfigError(f"BenefitAccumulator: num_blocks must be ≥ 1, got {num_blocks}")
        self.num_blocks, self.has_class_token = num_blocks, has_class_token
        rows = probed if probed is not None else ([has_class_token] * num_blocks, [True] * num_blocks)
        self._probed = torch.tensor([list(map(bool, r)) for r in rows], dtype=torch.bool)
        if self._probed.shape != (2, num_blocks) or bool(self._probed[0].any()) != has_class_token:
            raise ConfigError(
                f"BenefitAccumulator: probed must be two rows (cls, patch) of {num_blocks} flags, with a "
                f"class-token probe somewhere exactly when has_class_token ({has_class_token})"
            )
        self._sums = torch.zeros(2, num_blocks, dtype=torch.float64)  # rows: cls, patch
        self._counts = torch.zeros(2, num_blocks, dtype=torch.int64)

    @classmethod
    def for_probes(cls, probes: BenefitProbes | BlockwiseProbes) -> BenefitAccumulator:
        """An accumulator for the blocks and probe kinds of ``probes``."""
        return cls(probes.num_blocks, probes.has_class_token, probed=(probes.cls_blocks, probes.patch_blocks))

    def add(self, output: ProbeOutput) -> None:
        """Add one step's ΔΨ (from :meth:`BenefitProbes.forward`)."""
        patch = output.benefit_patch.detach()
        if (output.benefit_cls is None) == self.has_class_token or patch.shape != (self.num_blocks,):
            raise TrainingError(
                f"BenefitAccumulator: expected ΔΨ of shape ({self.num_blocks},) with"
                f"{'' if self.has_class_token else 'out'} a class-token benefit, got patch "
                f"{tuple(patch.shape)}, cls {'None' if output.benefit_cls is None else 'present'}"
            )
        cls = output.benefit_cls.detach() if output.benefit_cls is not None else torch.zeros_like(patch)
        if self._sums.device != patch.device:
            self._sums, self._counts = self._sums.to(patch.device), self._counts.to(patch.device)
        values = torch.stack([cls, patch]).double()
        if self._probed.device != values.device:
            self._probed = self._probed.to(values.device)
        ok = torch.isfinite(values) & self._probed
        self._sums += torch.where(ok, values, torch.zeros_like(values))
        self._counts += ok.to(torch.int64)

    def counts(self) -> np.ndarray:
        """Steps counted per block, shape (2, B): row 0 class-token probes, row 1 patch probes."""
        return self._counts.cpu().numpy()

    def mean(self) -> tuple[np.ndarray | None, np.ndarray]:
        """Window mean ΔΨ per block: (cls or None without class token, patch), float64 arrays (B,);
        NaN for a block without a probe of that kind."""
        sums, counts = self._sums.cpu().numpy(), self.counts()
        probed = self._probed.cpu().numpy()
        empty = sorted({int(b) for b in np.flatnonzero((probed & (counts == 0)).any(axis=0))})
        if empty:
            raise TrainingError(
                f"BenefitAccumulator.mean: no finite block benefit was accumulated for block(s) {empty[:8]} "
                "since the last reset; call add() on training steps before asking for the mean"
            )
        means = np.full(sums.shape, np.nan)
        np.divide(sums, counts, out=means, where=probed)
        return (means[0] if self.has_class_token else None), means[1]

    def reset(self) -> None:
        """Start a new window."""
        self._sums.zero_()
        self._counts.zero_()

    def state_dict(self) -> dict[str, Any]:
        """CPU copy of the window, for checkpoints."""
        return {
            "num_blocks": self.num_blocks,
            "has_class_token": self.has_class_token,
            "probed": self._probed.cpu().clone(),
            "sums": self._sums.detach().cpu().clone(),
            "counts": self._counts.detach().cpu().clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a window saved by :meth:`state_dict` (checked against this accumulator's layout)."""
        try:
            layout = (int(state["num_blocks"]), bool(state["has_class_token"]))
            sums = torch.as_tensor(state["sums"], dtype=torch.float64)
            counts = torch.as_tensor(state["counts"], dtype=torch.int64)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"BenefitAccumulator.load_state_dict: malformed state ({exc!r}); expected the dict that "
                "state_dict() returns"
            ) from exc
        shape = (2, self.num_blocks)
        probed = state.get("probed")  # absent in checkpoints written before BlockwiseProbes
        same_probes = probed is None or torch.equal(torch.as_tensor(probed).cpu(), self._probed.cpu())
        if (
            layout != (self.num_blocks, self.has_class_token)
            or sums.shape != shape
            or counts.shape != shape
            or not same_probes
        ):
            raise CheckpointError(
                f"BenefitAccumulator.load_state_dict: checkpoint has (blocks, class token) = {layout} and "
                f"sums {tuple(sums.shape)}, this model {(self.num_blocks, self.has_class_token)}; "
                "resume with the model the checkpoint came from"
            )
        self._sums = sums.to(self._sums.device).clone()
        self._counts = counts.to(self._counts.device).clone()

    def all_reduce_(self, group: ProcessGroup | None = None) -> None:
        """Sum the window's sums and counts over all ranks (no-op when torch.distributed is not set up)."""
        layout = f"benefit:{self.num_blocks}:{int(self.has_class_token)}"
        reduced = all_reduce_window([self._sums, self._counts], layout, group)
        if reduced is not None:
            self._sums, self._counts = reduced
