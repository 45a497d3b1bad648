"""DecomposeEinsumPass: a two-operand ``torch.einsum`` → permute, reshape and one batched matmul.

Pattern: a ``call_function`` node of ``torch.einsum(equation, a, b)`` (or ``(equation, [a, b])``)
whose equation names its output (``->``) and has no ``...`` and no subscript twice in one term.
Result: a call of :func:`einsum_ops`, which sums away a subscript found in one operand only and not
in the output, permutes each operand to (batch, free, contracted) / (batch, contracted, free),
flattens the free and the contracted subscripts, multiplies the two with ``matmul`` and reshapes
and permutes the product into the output's order. Sizes are read from the operands at run time,
so a dynamic batch stays dynamic.
Why: TensorRT's ONNX parser reads ``Einsum`` from TensorRT 8.5 on; JetPack 4.6 ships 8.0, and SAM's
image encoder computes its relative-position bias with two einsums per block
(``"bhwc,hkc->bhwk"``). Numbers equal ``torch.einsum`` to float rounding (the same products,
summed in another order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from p3b_fx.core.pass_infra import ReplaceCallsPass
from p3b_fx.errors import PassError


def einsum_terms(equation: str) -> tuple[str, str, str] | None:
    """(first operand's subscripts, second's, output's), or None where the pass leaves it alone."""
    eq = equation.replace(" ", "")
    if "->" not in eq or "." in eq:
        return None
    ins, out = eq.split("->")
    terms = ins.split(",")
    if len(terms) != 2 or any(len(set(t)) != len(t) for t in (*terms, out)):
        return None
    return terms[0], terms[1], out


def _sum_private(x: torch.Tensor, term: str, other: str, out: str) -> tuple[torch.Tensor, str]:
    """``x`` summed over the subscripts neither the other operand nor the output has."""
    gone = [k for k, c in enumerate(term) if c not in other and c not in out]
    if gone:
        x = x.sum(dim=gone)
    return x, "".join(c for k, c in enumerate(term) if k not in gone)


def einsum_ops(equation: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.einsum(equation, a, b)`` with permute, reshape and matmul (see the module doc)."""
    terms = einsum_terms(equation)
    if terms is None:
        raise PassError(
            f"einsum_ops: cannot decompose {equation!r} (two operands, explicit output, no '...')"
        )
    ta, tb, out = terms
    a, ta = _sum_private(a, ta, tb, out)
    b, tb = _sum_private(b, tb, ta, out)
    batch = [c for c in ta if c in tb and c in out]
    contracted = [c for c in ta if c in tb and c not in out]
    left = [c for c in ta if c not in tb]
    right = [c for c in tb if c not in ta]
    size_a = {c: a.shape[k] for k, c in enumerate(ta)}
    size_b = {c: b.shape[k] for k, c in enumerate(tb)}
    k = math.prod(size_a[c] for c in contracted)
    a2 = a.permute([ta.index(c) for c in (*batch, *left, *contracted)])
    a2 = a2.reshape(*[size_a[c] for c in batch], math.prod(size_a[c] for c in left), k)
    b2 = b.permute([tb.index(c) for c in (*batch, *contracted, *right)])
    b2 = b2.reshape(*[size_b[c] for c in batch], k, math.prod(size_b[c] for c in right))
    y = torch.matmul(a2, b2)  # batch subscripts of size 1 broadcast, as einsum's do
    y = y.reshape(*y.shape[: len(batch)], *[size_a[c] for c in left], *[size_b[c] for c in right])
    order = [*batch, *left, *right]
    return y.permute([order.index(c) for c in out])


def einsum_operands(node: fx.Node) -> tuple[Any, Any] | None:
    rest = list(node.args[1:])
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        rest = list(rest[0])
    return (rest[0], rest[1]) if len(rest) == 2 else None


def is_decomposable_einsum(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target is not torch.einsum or node.kwargs or not node.args:
        return False
    eq = node.args[0]
    return isinstance(eq, str) and einsum_terms(eq) is not None and einsum_operands(node) is not None


@dataclass(frozen=True)
class DecomposeEinsumPass(ReplaceCallsPass):
    """Replace every two-operand einsum with an explicit output by :func:`einsum_ops` (in place)."""

    def matches(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        return is_decomposable_einsum(node)

    def replacement(self, gm: fx.GraphModule, node: fx.Node) -> fx.Node:
        operands = einsum_operands(node)
        assert operands is not None
        return gm.graph.call_function(einsum_ops, (node.args[0], *operands))
