"""MaskBank: the gates of every prunable group, as buffers, and the mask sites that read them.

One module (``p3b_masks`` in a masked GraphModule) holds a 1-D gate per group (float; 1 = keep,
0 = pruned, values in between are P3B's soft masks). A *site* multiplies a tensor's last axis by
the outer product of the gates along its factors (e.g. ``qkv`` output: 3 × heads × head_dim).
Gates are buffers, never parameters: the optimiser cannot move them. For Taylor scoring the
training loop sets ``requires_grad`` on them, so ``gate.grad`` holds dL/dm after backward.

Memory while scoring: dL/dm needs the site's input x, and a plain ``x * m`` makes autograd keep x
besides the product y, which the next op (a linear, SDPA) keeps anyway. :class:`GateMul` keeps y
instead and recovers x = y / m in the backward pass when every mask value is non-zero and the dtype
has float32's exponent range (float32, float64, bfloat16; exact up to rounding), so a scoring step
stores about what a plain training step stores. With a zero in the mask (hard masks) or in float16
it keeps x, as before. Training folds every site next to an ``nn.Linear`` into that Linear's
weight instead (``passes/fold_masks.py``), which keeps no extra activation at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from p3b_fx.core.groups import Factor

MASK_MODULE = "p3b_masks"


def _attr(group: str) -> str:
    return "g_" + "".join(c if c.isalnum() else "_" for c in group)


_LEAN_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


class GateMul(torch.autograd.Function):
    """``x * mask`` (mask along the last axis) that can rebuild x from the product in backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mask: torch.Tensor, from_output: bool) -> torch.Tensor:
        y = x * mask
        ctx.from_output = from_output
        ctx.save_for_backward(y if from_output else x, mask)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        kept, mask = ctx.saved_tensors
        grad_x = grad * mask if ctx.needs_input_grad[0] else None
        grad_m = None
        if ctx.needs_input_grad[1]:
            x = kept / mask if ctx.from_output else kept
            grad_m = (grad * x).reshape(-1, mask.shape[-1]).sum(dim=0)
        return grad_x, grad_m, None


class MaskBank(nn.Module):
    def __init__(self, sizes: Mapping[str, int], sites: Mapping[str, Sequence[Factor]]) -> None:
        super().__init__()
        self._nonzero: dict[str, tuple[tuple[Any, ...], bool]] = {}
        self.group_attrs: dict[str, str] = {}
        for group, size in sizes.items():
            attr = _attr(group)
            self.group_attrs[group] = attr
            self.register_buffer(attr, torch.ones(size))
        self.sites: dict[str, tuple[Factor, ...]] = {k: tuple(v) for k, v in sites.items()}

    def gate(self, group: str) -> torch.Tensor:
        return getattr(self, self.group_attrs[group])  # type: ignore[no-any-return]

    def gates(self) -> dict[str, torch.Tensor]:
        return {g: self.gate(g) for g in self.group_attrs}

    @torch.no_grad()
    def set_gate(self, group: str, values: torch.Tensor) -> None:
        gate = self.gate(group)
        if values.shape != gate.shape:
            raise ValueError(f"gate '{group}' has shape {tuple(gate.shape)}, got {tuple(values.shape)}")
        gate.copy_(values)

    def scoring(self, enabled: bool) -> None:
        """Let (or stop) the gates collect dL/dm in ``.grad`` for the Taylor criterion."""
        for g in self.gates().values():
            g.requires_grad_(enabled)
            if not enabled:
                g.grad = None

    def site_mask(self, site: str) -> torch.Tensor:
        mask: torch.Tensor | None = None
        for size, group in self.sites[site]:
            v = self.gate(group) if group in self.group_attrs else None
            if v is None:
                first = next(iter(self.buffers()))
                v = torch.ones(size, device=first.device, dtype=first.dtype)
            mask = v if mask is None else (mask[:, None] * v[None, :]).reshape(-1)
        assert mask is not None
        return mask

    def _mask_nonzero(self, site: str, mask: torch.Tensor) -> bool:
        """Whether ``mask`` (the site's mask in x's dtype) has no zero; cached until a gate changes."""
        gates = [self.gate(g)._version for _, g in self.sites[site] if g in self.group_attrs]
        versions: tuple[Any, ...] = (*gates, mask.dtype)
        cached = self._nonzero.get(site)
        if cached is None or cached[0] != versions:
            cached = (versions, bool((mask != 0).all()))
            self._nonzero[site] = cached
        return cached[1]

    def forward(self, x: torch.Tensor, site: str) -> torch.Tensor:
        mask = self.site_mask(site).to(x.dtype)
        if not mask.requires_grad:
            return x * mask
        # under torch.compile the zero check would be a data-dependent branch (a graph break): keep x
        compiling = torch.compiler.is_compiling()
        lean = x.dtype in _LEAN_DTYPES and not compiling and self._mask_nonzero(site, mask)
        out: torch.Tensor = GateMul.apply(x, mask, lean)
        return out
