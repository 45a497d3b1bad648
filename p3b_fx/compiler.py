"""The compiler facade: find groups, mask, slim. Thin glue over the passes."""

from __future__ import annotations

import copy
import logging

from torch import fx, nn

from p3b_fx.core.groups import GroupSet
from p3b_fx.core.masks import MASK_MODULE, MaskBank
from p3b_fx.core.pass_infra import PassManager
from p3b_fx.core.plan import KeepPlan
from p3b_fx.errors import PassError, PlanError
from p3b_fx.tracing import copy_graph_module
from passes.find_groups import find_groups as _find_groups
from passes.fold_masks import FoldMasksPass
from passes.insert_masks import InsertMasksPass
from passes.rewrite_slim import slim_passes

logger = logging.getLogger(__name__)


def find_groups(gm: fx.GraphModule) -> GroupSet:
    """The groups of coupled parameter slices of a traced model (see ``passes.find_groups``)."""
    if any(n.op == "call_module" and n.target == MASK_MODULE for n in gm.graph.nodes):
        raise PlanError("this graph already carries P3B masks: find groups on the unmasked traced model")
    return _find_groups(gm)


def insert_masks(
    gm: fx.GraphModule, groups: GroupSet, *, share_parameters: bool = False
) -> tuple[fx.GraphModule, MaskBank]:
    """A copy of ``gm`` with every gate in place and open (outputs unchanged).

    ``share_parameters``: the copy uses ``gm``'s parameter and buffer tensors instead of its own, so
    training the masked model trains ``gm`` and no second copy of the weights is held (the training
    loop's choice: on ViT-B that copy is 344 MB of device memory for the whole run).
    """
    out = _share_tensors_copy(gm) if share_parameters else copy_graph_module(gm)
    InsertMasksPass(groups)(out)
    if not groups.prunable:  # no gate, so the pass's clean-up dropped the bank: an empty one, not an error
        out.add_submodule(MASK_MODULE, MaskBank({}, {}))
    bank = out.get_submodule(MASK_MODULE)
    assert isinstance(bank, MaskBank)
    return out, bank


def fold_masks(masked: fx.GraphModule) -> fx.GraphModule:
    """Fold the mask sites next to Linears into their weights, in place (see ``passes.fold_masks``).

    Same function and same dL/dm, cheaper per training step; parameter names are unchanged. Returns
    ``masked``.
    """
    FoldMasksPass()(masked)
    return masked


def set_hard_masks(bank: MaskBank, groups: GroupSet, plan: KeepPlan) -> None:
    """Gates = 1 on kept elements, 0 elsewhere (every gate of a removed block is 0)."""
    kept = plan.effective(groups)
    for name in bank.group_attrs:
        gate = bank.gate(name).detach().clone().zero_()
        gate[list(kept[name])] = 1.0
        bank.set_gate(name, gate)


def apply_masks(gm: fx.GraphModule, plan: KeepPlan, groups: GroupSet | None = None) -> fx.GraphModule:
    """The same model with every element the plan prunes zeroed by a hard mask."""
    groups = groups or find_groups(gm)
    plan.validate(groups)
    out, bank = insert_masks(gm, groups)
    set_hard_masks(bank, groups, plan)
    return out


def _share_tensors_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """Copy the module tree and graph but not the tensors (slicing makes new ones anyway)."""
    memo: dict[int, object] = {id(t): t for t in (*gm.parameters(), *gm.buffers())}
    work = copy.deepcopy(gm, memo)
    work.meta.update(copy.deepcopy(gm.meta))
    return work


def _unshare(out: fx.GraphModule, original: fx.GraphModule) -> None:
    """Give ``out`` its own copy of every tensor it still shares with ``original``."""
    shared = {id(t) for t in (*original.parameters(), *original.buffers())}
    for kind in ("parameters", "buffers"):
        for name, t in list(getattr(out, f"named_{kind}")()):
            if id(t) not in shared:
                continue
            owner_name, _, attr = name.rpartition(".")
            owner = out.get_submodule(owner_name) if owner_name else out
            if kind == "parameters":
                setattr(owner, attr, nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad))
            else:
                owner.register_buffer(attr, t.clone())


def slim(gm: fx.GraphModule, plan: KeepPlan, groups: GroupSet | None = None) -> fx.GraphModule:
    """A dense slim GraphModule computing what ``apply_masks(gm, plan)`` computes.

    Its parameter count equals ``plan.predicted_params(groups)`` exactly; it holds only torch
    modules and index buffers, so ``torch.save`` / ``torch.load`` need no p3b_fx.
    """
    groups = groups or find_groups(gm)
    plan.validate(groups)
    work = _share_tensors_copy(gm)  # the rewrite replaces what it slices; the rest is cloned below
    work = PassManager(slim_passes(groups, plan)).run(work).graph_module
    work.graph._tracer_cls = None  # pickling must not import p3b_fx's tracer
    out = fx.GraphModule(work, work.graph, class_name=type(gm).__name__.replace("Traced", "Slim"))
    out.meta.update(work.meta)
    _unshare(out, gm)
    out.train(gm.training)
    params = sum(p.numel() for p in out.parameters())
    expected = plan.predicted_params(groups)
    if params != expected:
        raise PassError(f"slim model has {params} parameters but the plan predicts {expected}: a rewrite bug")
    logger.info("slim: %d -> %d parameters", groups.params_total, params)
    return out
