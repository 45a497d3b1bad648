"""FoldMasksPass: a mask site next to a Linear becomes a mask on that Linear's weight.

Pattern: a mask site (``passes.insert_masks``) whose users are all ``nn.Linear`` calls reading it
(read gate, the last linear's input), or that is the only user of an ``nn.Linear`` call (per-head
dimensions at the first linear's output, write gate). Result: each such Linear call becomes
:func:`masked_linear`, ``F.linear(x, W · m_out[:, None] · m_in[None, :], b · m_out)``, and the site
node disappears. Sites next to anything else (a Conv, a mask axis that is not the Linear's feature
axis) stay activation multiplies. The Linear modules stay in the module tree, so parameter names
and ``state_dict`` keys do not change; only their call nodes are replaced.

Why: the function is the same (up to rounding) and so is dL/dm (chain rule through W' = W · m), but
every multiply is weight-sized (out × in) instead of activation-sized (batch · tokens × features):
fc1's output at batch 64 is 5.7x fc1's weight with 17 tokens and 66x with 197. An activation
site costs a multiply in forward and two multiplies and a reduction in backward, all bound by
memory bandwidth; folded, the backward only touches the weight gradient the Linear computes
anyway, and autograd keeps no extra activation (the Linear keeps its input, as in plain training).
Measured: ``docs/bench-train-step.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from p3b_fx.core import meta
from p3b_fx.core.masks import MASK_MODULE, MaskBank
from p3b_fx.core.pass_infra import GraphPass, PassResult

__all__ = ["FoldMasksPass", "masked_linear"]


class _MaskedLinear(torch.autograd.Function):
    """``F.linear(x, W · (m_out ⊗ m_in), b · m_out)`` that keeps only x, W, b and the masks for backward.

    Plain autograd would also keep the masked weight (and the half-masked one): weight-sized copies
    per Linear. Here backward rebuilds W' = W · (m_out ⊗ m_in) and derives every gradient from
    dL/dW' = gᵀx, which the Linear's weight gradient needs anyway:
    dL/dW = dL/dW' · (m_out ⊗ m_in), dL/dm_in = m_outᵀ (dL/dW' · W),
    dL/dm_out = (dL/dW' · W) m_in + dL/db' · b.
    Under autocast it casts x, W' and b' to autocast's dtype itself (as autocast would) and keeps the
    cast x and the cast W', as a plain Linear under autocast keeps its cast x and W; backward's
    matmuls run in that dtype too. In full precision it keeps x and W only and rebuilds W'.
    """

    @staticmethod
    def forward(  # noqa: PLR0917 - autograd.Function's positional signature
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        m_in: torch.Tensor | None,
        m_out: torch.Tensor | None,
    ) -> torch.Tensor:
        dt = _compute_dtype(x)
        w = _effective(weight, m_in, m_out).to(dt)
        b = None if bias is None else (bias if m_out is None else bias * m_out).to(dt)
        xc = x.to(dt)
        # under autocast a plain Linear keeps its weight cast to the low dtype, so keeping the cast
        # W' costs no more memory than it does and spares backward rebuilding it; in full
        # precision W' would be a copy a plain Linear does not keep, so backward rebuilds it
        low = w if dt != weight.dtype else None
        ctx.save_for_backward(xc, weight, bias, m_in, m_out, low)
        ctx.x_dtype = x.dtype
        return F.linear(xc, w, b)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, bias, m_in, m_out, low = ctx.saved_tensors
        need_x, need_w, need_b, need_in, need_out = ctx.needs_input_grad
        dt = x.dtype  # the dtype the forward's matmul ran in
        g = grad.to(dt)
        mask = _weight_mask(m_in, m_out)  # built once for W' and dL/dW
        grad_x = None
        if need_x:
            w = low if low is not None else (weight if mask is None else weight * mask).to(dt)
            grad_x = (g @ w).to(ctx.x_dtype)
        if not (need_w or need_b or need_in or need_out):
            return grad_x, None, None, None, None
        g2 = g.reshape(-1, g.shape[-1])
        grad_weff = (g2.t() @ x.reshape(-1, x.shape[-1])).to(weight.dtype)
        grad_beff = g2.sum(dim=0, dtype=torch.float32).to(weight.dtype) if bias is not None else None
        grad_w = (grad_weff if mask is None else grad_weff * mask) if need_w else None
        grad_b = None
        if need_b and grad_beff is not None:
            grad_b = grad_beff if m_out is None else grad_beff * m_out
        grad_in = grad_out = None
        if need_in or need_out:
            gw = grad_weff * weight
            if need_in:
                grad_in = gw.sum(dim=0) if m_out is None else m_out @ gw
            if need_out:
                grad_out = gw.sum(dim=1) if m_in is None else gw @ m_in
                if bias is not None and grad_beff is not None:
                    grad_out = grad_out + grad_beff * bias
        return grad_x, grad_w, grad_b, grad_in, grad_out


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear`` would compute in: autocast's where it is on (as autocast casts), else x's."""
    device = x.device.type  # autocast exists for cpu, cuda, xpu, …, not for every device type (meta)
    # under torch.compile the device is a real one; is_autocast_available is not traceable in every
    # torch release (torch 2.11's dynamo breaks the graph at it, in every masked Linear)
    available = torch.compiler.is_compiling() or torch.amp.is_autocast_available(device)
    if x.is_floating_point() and available and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _weight_mask(m_in: torch.Tensor | None, m_out: torch.Tensor | None) -> torch.Tensor | None:
    """m_out ⊗ m_in, broadcastable to the weight (out, in); None without masks."""
    if m_out is None:
        return m_in
    return m_out[:, None] if m_in is None else m_out[:, None] * m_in


def _effective(weight: torch.Tensor, m_in: torch.Tensor | None, m_out: torch.Tensor | None) -> torch.Tensor:
    if m_out is not None:
        weight = weight * m_out[:, None] if m_in is None else weight * (m_out[:, None] * m_in)
    elif m_in is not None:
        weight = weight * m_in
    return weight


def masked_linear(  # noqa: PLR0917 - an fx call_function node passes its arguments by position
    x: torch.Tensor,
    bank: MaskBank,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    in_site: str | None,
    out_site: str | None,
) -> torch.Tensor:
    """``F.linear`` with the inputs scaled by site ``in_site``'s mask and the outputs by ``out_site``'s."""
    m_in = None if in_site is None else bank.site_mask(in_site).to(weight.dtype)
    m_out = None if out_site is None else bank.site_mask(out_site).to(weight.dtype)
    out: torch.Tensor = _MaskedLinear.apply(x, weight, bias, m_in, m_out)
    return out


def _site(node: object) -> str | None:
    if isinstance(node, fx.Node) and node.op == "call_module" and node.target == MASK_MODULE:
        site = node.meta.get(meta.MASK_SITE)
        return site if isinstance(site, str) else None
    return None


@dataclass(frozen=True)
class FoldMasksPass(GraphPass):
    """Fold every foldable mask site of a masked graph into its Linear's weight (see module doc)."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        if MASK_MODULE not in dict(gm.named_children()):
            return PassResult(gm, False)
        bank = gm.get_submodule(MASK_MODULE)
        assert isinstance(bank, MaskBank)
        linears = [n for n in gm.graph.nodes if self._linear(gm, n) is not None]
        folds: dict[fx.Node, tuple[str | None, str | None]] = {}
        for node in linears:
            module = self._linear(gm, node)
            assert module is not None
            in_site = self._in_site(gm, bank, node, module.in_features)
            out_site = self._out_site(bank, node, module.out_features)
            if in_site or out_site:
                folds[node] = (in_site, out_site)
        if not folds:
            return PassResult(gm, False)
        first = next(n for n in gm.graph.nodes if n.op != "placeholder")
        with gm.graph.inserting_before(first):
            bank_node = gm.graph.get_attr(MASK_MODULE)
        for node, (in_site, out_site) in folds.items():
            self._replace(gm, node, bank_node, in_site, out_site)
        for node in list(gm.graph.nodes):
            if _site(node) is not None and not node.users:
                gm.graph.erase_node(node)
        return PassResult(gm, True)

    @staticmethod
    def _linear(gm: fx.GraphModule, node: fx.Node) -> nn.Linear | None:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            return None
        assert isinstance(node.target, str)
        module = gm.get_submodule(node.target)
        return module if type(module) is nn.Linear else None

    def _in_site(self, gm: fx.GraphModule, bank: MaskBank, node: fx.Node, features: int) -> str | None:
        src = node.args[0]
        site = _site(src)
        if site is None or _mask_size(bank, site) != features:
            return None
        assert isinstance(src, fx.Node)
        return site if all(self._linear(gm, u) is not None for u in src.users) else None

    @staticmethod
    def _out_site(bank: MaskBank, node: fx.Node, features: int) -> str | None:
        if len(node.users) != 1:
            return None
        user = next(iter(node.users))
        site = _site(user)
        if site is None or user.args[0] is not node or _mask_size(bank, site) != features:
            return None
        return site

    @staticmethod
    def _replace(
        gm: fx.GraphModule, node: fx.Node, bank_node: fx.Node, in_site: str | None, out_site: str | None
    ) -> None:
        target = node.target
        assert isinstance(target, str)
        src = node.args[0]
        assert isinstance(src, fx.Node)
        x = src.args[0] if in_site else src
        has_bias = gm.get_submodule(target).bias is not None
        with gm.graph.inserting_before(node):
            weight = gm.graph.get_attr(f"{target}.weight")
            bias = gm.graph.get_attr(f"{target}.bias") if has_bias else None
            new = gm.graph.call_function(masked_linear, (x, bank_node, weight, bias, in_site, out_site))
        site_node = next(iter(node.users)) if out_site else None
        replaced = site_node if site_node is not None else node
        new.meta.update(node.meta)  # the Linear's output shape and block: the folded call's too
        replaced.replace_all_uses_with(new)
        if site_node is not None:
            gm.graph.erase_node(site_node)
        gm.graph.erase_node(node)


def _mask_size(bank: MaskBank, site: str) -> int:
    return math.prod(size for size, _ in bank.sites[site]) if site in bank.sites else -1
