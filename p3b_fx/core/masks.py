"""MaskBank: the gates of every prunable group, as buffers, and the mask sites that read them.

One module (``p3b_masks`` in a masked GraphModule) holds a 1-D gate per group (float; 1 = keep,
0 = pruned, values in between are P3B's soft masks). A *site* multiplies a tensor's last axis by
the outer product of the gates along its factors (e.g. ``qkv`` output: 3 × heads × head_dim).
Gates are buffers, never parameters: the optimiser cannot move them. For Taylor scoring the
training loop sets ``requires_grad`` on them, so ``gate.grad`` holds dL/dm after backward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from p3b_fx.core.groups import Factor

MASK_MODULE = "p3b_masks"


def _attr(group: str) -> str:
    return "g_" + "".join(c if c.isalnum() else "_" for c in group)


class MaskBank(nn.Module):
    def __init__(self, sizes: Mapping[str, int], sites: Mapping[str, Sequence[Factor]]) -> None:
        super().__init__()
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
                v = torch.ones(size, device=self._device())
            mask = v if mask is None else (mask[:, None] * v[None, :]).reshape(-1)
        assert mask is not None
        return mask

    def _device(self) -> torch.device:
        return next(iter(self.buffers())).device

    def forward(self, x: torch.Tensor, site: str) -> torch.Tensor:
        return x * self.site_mask(site).to(x.dtype)
