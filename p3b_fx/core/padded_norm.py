"""A norm over a pruned axis: the dense norm's statistics, computed from the kept elements alone.

A LayerNorm inside a block (EVA-02's ``scale_mlp`` over the SwiGLU hidden neurons, EVA-02-CLIP's
and BEiT-3's ``scale_attn_inner`` over heads × head_dim, a q/k norm over head_dim) normalises over
an axis P3B prunes. In the hard-masked model the pruned elements reach the norm as zeros (a gate
sits before it) and leave it as zeros (a gate sits after it, or the last linear's input gate). So
the dense norm sees ``N`` elements of which ``N - k`` are 0, and the slim model, which holds only
the ``k`` kept ones, reproduces its statistics exactly:

    mean = Σ_kept x / N
    Σ_all (x - mean)² = Σ_kept (x - mean)² + (N - k) · mean²        (the zeros' share)

``kind``: ``"layer"`` (LayerNorm: centre, biased variance, weight and bias), ``"rms"`` (RMSNorm:
mean of squares, weight), ``"simple"`` (timm's SimpleNorm: x / sqrt(unbiased variance), weight).
The statistics run in float32 whatever the input's dtype (as ``F.layer_norm`` does on CUDA), or
in float64 for a model that is float64 when it is slimmed; the result has the input's dtype. The
slim rewrite (``passes/pad_norms.py``) inlines these few tensor ops into the graph, so a slim model
still loads and runs with torch alone, and exports to ONNX as ReduceSum, Sub, Mul, Div and Sqrt,
which every opset and TensorRT take.
"""

from __future__ import annotations

import torch

__all__ = ["KINDS", "padded_norm"]

KINDS = ("layer", "rms", "simple")


def padded_norm(  # noqa: PLR0917 - F.layer_norm's arguments plus two
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    full: int,
    eps: float,
    kind: str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Norm ``kind`` over the last axis of ``x`` as if it were ``full`` wide, the missing elements 0.

    The statistics run in ``dtype`` (the slim rewrite passes float64 for a float64 model). Written
    with plain tensor ops that ``torch.fx`` traces (the slim rewrite inlines them)."""
    xf = x.to(dtype)
    missing = full - xf.shape[-1]
    if kind == "rms":
        y = xf * torch.rsqrt((xf * xf).sum(-1, keepdim=True) / full + eps)
    else:
        mean = xf.sum(-1, keepdim=True) / full
        d = xf - mean
        squares = (d * d).sum(-1, keepdim=True) + mean * mean * missing
        if kind == "layer":
            y = d * torch.rsqrt(squares / full + eps)
        elif kind == "simple":
            y = xf * torch.rsqrt(squares / (full - 1) + eps)
        else:
            raise ValueError(f"padded_norm: kind must be one of {KINDS}, got {kind!r}")
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)
