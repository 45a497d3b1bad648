"""Pass contract and pass manager.

A transform is a frozen dataclass with ``call(gm) -> PassResult``; it declares whether it edits
its input in place. Optional ``requires`` / ``ensures`` check pre- and post-conditions (the
post-check runs on the *result*). The manager owns graph hygiene: dead-code elimination,
``graph.lint()`` and ``recompile()`` run once after each pass that changed something, and every
error names the failing pass and the ones that ran before it. In debug mode the manager replays
fixed inputs after each semantics-preserving pass and names the pass whose output drifted.
"""

from __future__ import annotations

import abc
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from p3b_fx.core import meta
from p3b_fx.errors import PassError

logger = logging.getLogger(__name__)


def module_device(module: torch.nn.Module) -> torch.device:
    """Where ``module`` lives: the device of its first parameter or buffer (CPU when it has none).

    Tensors a pass adds to a graph (mask gates, index buffers, example inputs) are made there, so a
    model traced on a GPU stays wholly on it."""
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    return torch.device("cpu") if first is None else first.device


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    """The floating dtype ``module`` computes in: that of its first floating parameter or buffer
    (float32 when it has none). Example inputs and mask gates are made in it, so a model cast to
    bfloat16, float16 or float64 before tracing runs as it is."""
    tensors = itertools.chain(module.parameters(), module.buffers())
    first = next((t for t in tensors if t.is_floating_point()), None)
    return torch.float32 if first is None else first.dtype


@dataclass(frozen=True)
class PassResult:
    graph_module: fx.GraphModule
    modified: bool


class GraphPass(abc.ABC):
    """Base of every transform pass. Subclasses are ``@dataclass(frozen=True)``."""

    preserves_semantics: ClassVar[bool] = True  # outputs unchanged (checked in debug mode)

    def requires(self, gm: fx.GraphModule) -> None:  # noqa: B027 - optional hook
        """Raise ``PassError`` if ``gm`` does not meet this pass's precondition."""

    def ensures(self, gm: fx.GraphModule) -> None:  # noqa: B027 - optional hook
        """Raise ``PassError`` if the result does not meet this pass's postcondition."""

    @abc.abstractmethod
    def call(self, gm: fx.GraphModule) -> PassResult: ...

    @property
    def name(self) -> str:
        return type(self).__name__

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        self.requires(gm)
        result = self.call(gm)
        if result.modified:
            tidy(result.graph_module)
            self.ensures(result.graph_module)
        return result


class ReplaceCallsPass(GraphPass):
    """Replace every node :meth:`matches` accepts by the node :meth:`replacement` builds before it
    (a call of plain ops computing the same value), for an exporter or a TensorRT release that lacks
    the original op. Subclasses are ``@dataclass(frozen=True)``."""

    @abc.abstractmethod
    def matches(self, gm: fx.GraphModule, node: fx.Node) -> bool: ...

    @abc.abstractmethod
    def replacement(self, gm: fx.GraphModule, node: fx.Node) -> fx.Node:
        """The replacing node, inserted by the caller just before ``node``."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        found = [n for n in gm.graph.nodes if self.matches(gm, n)]
        for node in found:
            with gm.graph.inserting_before(node):
                new = self.replacement(gm, node)
            replace_node(gm, node, new)
        return PassResult(gm, bool(found))

    def ensures(self, gm: fx.GraphModule) -> None:
        left = [n.name for n in gm.graph.nodes if self.matches(gm, n)]
        if left:
            raise PassError(f"{self.name}: nodes left after the pass: {', '.join(left)}")


def known_shape(node: object) -> tuple[int, ...] | None:
    """A node's static shape from ``meta[p3b.shape]`` (AnnotateShapesPass) or torch's ``tensor_meta``."""
    if not isinstance(node, fx.Node):
        return None
    shape = node.meta.get(meta.SHAPE)
    if shape is None and "tensor_meta" in node.meta:
        shape = tuple(node.meta["tensor_meta"].shape)
    if isinstance(shape, tuple) and all(isinstance(s, int) for s in shape):
        return shape
    return None


def param_copy(param: torch.Tensor, value: torch.Tensor) -> torch.nn.Parameter:
    """A new Parameter holding a copy of ``value`` (``param``'s values, sliced or reshaped), trained as
    ``param`` is (a Parameter cannot be a view of another one's shape)."""
    return torch.nn.Parameter(value.detach().clone(), requires_grad=param.requires_grad)


def is_split(node: fx.Node) -> bool:
    """``x.split(…)``, ``torch.split(x, …)`` or ``Tensor.split(x, …)``."""
    return (node.op == "call_method" and node.target == "split") or (
        node.op == "call_function" and node.target in (torch.split, torch.Tensor.split)
    )


def replace_node(gm: fx.GraphModule, old: fx.Node, new: fx.Node) -> None:
    """Point every user of ``old`` at ``new``, then erase ``old``.

    ``new`` computes the same tensor, so it inherits what describes the output (its shape and
    block); op-specific keys (e.g. an SDPA scale) do not carry over.
    """
    for key in (meta.SHAPE, meta.BLOCK):
        if key in old.meta:
            new.meta[key] = old.meta[key]
    old.replace_all_uses_with(new)
    gm.graph.erase_node(old)


def tidy(gm: fx.GraphModule) -> None:
    """Dead-code elimination, unused submodule removal, lint and recompile."""
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    _delete_unused_attributes(gm)
    gm.graph.lint()
    gm.recompile()


def _delete_unused_attributes(gm: fx.GraphModule) -> None:
    """Drop parameters/buffers no ``get_attr`` or ``call_module`` node refers to any more."""
    used = {str(n.target) for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}

    def is_used(name: str) -> bool:
        return any(name == u or name.startswith(u + ".") for u in used)

    for kind in ("parameters", "buffers"):
        for name, _ in list(getattr(gm, f"named_{kind}")()):
            if not is_used(name):
                owner_name, _, attr = name.rpartition(".")
                owner = gm.get_submodule(owner_name) if owner_name else gm
                delattr(owner, attr)


class PassManager:
    """Runs an explicit list of passes; optional debug replay of fixed inputs."""

    def __init__(
        self,
        passes: Sequence[GraphPass],
        *,
        debug_inputs: tuple[torch.Tensor, ...] | None = None,
        atol: float = 1e-5,
    ) -> None:
        self.passes = tuple(passes)
        self.debug_inputs = debug_inputs
        self.atol = atol

    def run(self, gm: fx.GraphModule) -> PassResult:
        modified_any = False
        reference = self._replay(gm)
        for i, p in enumerate(self.passes):
            before = [q.name for q in self.passes[:i]] or ["(none)"]
            try:
                result = p(gm)
            except PassError as exc:
                raise PassError(f"pass {p.name} failed (after {', '.join(before)}): {exc}") from exc
            gm = result.graph_module
            modified_any |= result.modified
            logger.debug("pass %s: modified=%s", p.name, result.modified)
            if result.modified and p.preserves_semantics and reference is not None:
                self._check_drift(p, gm, reference)
            if result.modified and not p.preserves_semantics:
                reference = self._replay(gm)
        return PassResult(gm, modified_any)

    def _replay(self, gm: fx.GraphModule) -> torch.Tensor | None:
        if self.debug_inputs is None:
            return None
        with torch.no_grad():
            out = gm(*self.debug_inputs)
        return out if isinstance(out, torch.Tensor) else None

    def _check_drift(self, p: GraphPass, gm: fx.GraphModule, reference: torch.Tensor) -> None:
        out = self._replay(gm)
        if out is None or out.shape != reference.shape:
            raise PassError(f"debug replay: pass {p.name} changed the output structure")
        drift = (out - reference).abs().max().item()
        if drift > self.atol:
            raise PassError(f"debug replay: pass {p.name} drifted the output by {drift:.3g} (> {self.atol})")
