"""DecomposeFoldPass: ``F.fold`` (col2im) as one grouped transposed convolution.

Pattern: a ``call_function`` node of ``F.fold(x, output_size, kernel_size, dilation, padding,
stride)``, or a ``call_module`` node of ``nn.Fold``.
Result: a call of :func:`fold_ops`, a ``conv_transpose2d`` of ``x`` viewed as (N, C·k·k, h, w) with a
constant one-hot weight (``groups=C``: input channel ``c·k·k + j`` goes through a kernel that is 1 at
kernel position j only, into output channel c); its ``output_padding`` adds the rows and columns
past the last window that ``output_size`` asks for, zeros as fold leaves them.
Why: ``F.fold`` exports as ``Col2Im``, which ONNX has from opset 18 on and no JetPack's TensorRT
parses (VOLO's outlook attention folds its weighted neighbourhoods back with it);
``ConvTranspose`` every release takes. Each output element sums the same entries as fold's, in
another order: the numbers equal ``F.fold`` to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from p3b_fx.core.pass_infra import ReplaceCallsPass, known_shape


def as_pair(value: int | Sequence[int]) -> tuple[int, int]:
    """``k`` → ``(k, k)``; a pair as ints (torch's 2-d size arguments)."""
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def fold_ops(  # noqa: PLR0917 - the positional signature of F.fold
    x: torch.Tensor,
    output_size: int | Sequence[int],
    kernel_size: int | Sequence[int],
    dilation: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    stride: int | Sequence[int] = 1,
) -> torch.Tensor:
    """``F.fold`` of a batched (N, C·k·k, L) tensor as a grouped transposed convolution (module doc)."""
    (oh, ow), (kh, kw) = as_pair(output_size), as_pair(kernel_size)
    (dh, dw), (ph, pw), (sh, sw) = as_pair(dilation), as_pair(padding), as_pair(stride)
    h = (oh + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    w = (ow + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    n, channels, _ = x.shape
    kk = kh * kw
    weight = (
        torch.eye(kk, dtype=x.dtype, device=x.device).reshape(kk, 1, kh, kw).repeat(channels // kk, 1, 1, 1)
    )
    # the windows cover (h - 1)·s + d·(k - 1) + 1 rows of the padded output, up to s - 1 fewer than
    # it has: output_padding adds those (zeros, as fold leaves them) after the last window
    extra = ((oh + 2 * ph - dh * (kh - 1) - 1) % sh, (ow + 2 * pw - dw * (kw - 1) - 1) % sw)
    out: torch.Tensor = F.conv_transpose2d(
        x.reshape(n, channels, h, w), weight, stride=(sh, sw), padding=(ph, pw), output_padding=extra,
        groups=channels // kk, dilation=(dh, dw),
    )  # fmt: skip
    return out


def _fold_args(gm: fx.GraphModule, node: fx.Node) -> tuple[Any, ...]:
    """``F.fold``'s positional arguments at ``node`` (a function call or an ``nn.Fold`` module)."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        assert isinstance(mod, nn.Fold)
        return (node.args[0], mod.output_size, mod.kernel_size, mod.dilation, mod.padding, mod.stride)
    names = ("input", "output_size", "kernel_size", "dilation", "padding", "stride")
    given = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    return (given["input"], given["output_size"], given["kernel_size"], given.get("dilation", 1),
            given.get("padding", 0), given.get("stride", 1))  # fmt: skip


def is_fold(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A batched fold: ``F.fold`` / ``nn.Fold`` of a (N, C·k·k, L) tensor."""
    if node.op == "call_function":
        hit = node.target is F.fold
    else:
        hit = node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), nn.Fold)
    shape = known_shape(node.args[0] if node.args else node.kwargs.get("input"))
    return hit and (shape is None or len(shape) == 3)  # an unbatched one stays: the exporter names Col2Im


@dataclass(frozen=True)
class DecomposeFoldPass(ReplaceCallsPass):
    """Replace every batched fold by :func:`fold_ops` (in place)."""

    def matches(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        return is_fold(gm, node)

    def replacement(self, gm: fx.GraphModule, node: fx.Node) -> fx.Node:
        return gm.graph.call_function(fold_ops, _fold_args(gm, node))
