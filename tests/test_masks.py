"""InsertMasksPass / apply_masks: open gates change nothing; hard gates zero exactly; buffers."""

from __future__ import annotations

import torch

import p3b_fx
from p3b_fx.core.masks import MASK_MODULE
from passes.insert_masks import InsertMasksPass
from tests.conftest import tiny_vit


def test_open_masks_leave_outputs_unchanged_and_pass_is_idempotent() -> None:
    gm = p3b_fx.trace(tiny_vit())
    groups = p3b_fx.find_groups(gm)
    masked, bank = p3b_fx.insert_masks(gm, groups)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(masked(x), gm(x))
    assert InsertMasksPass(groups)(masked).modified is False
    sites = [n for n in masked.graph.nodes if n.op == "call_module" and n.target == MASK_MODULE]
    # per attention block: read, first_out, last_in, write; per MLP block: read, last_in, write
    assert len(sites) == 2 * (4 + 3)
    assert set(bank.gates()) == {g.name for g in groups.prunable}


def test_gates_are_buffers_not_parameters_and_collect_gradients() -> None:
    gm = p3b_fx.trace(tiny_vit())
    masked, bank = p3b_fx.insert_masks(gm, p3b_fx.find_groups(gm))
    assert not any(name.startswith(MASK_MODULE) for name, _ in masked.named_parameters())
    bank.scoring(True)
    masked(torch.randn(2, 3, 32, 32)).sum().backward()
    grads = {k: g.grad for k, g in bank.gates().items()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    bank.scoring(False)
    assert all(g.grad is None and not g.requires_grad for g in bank.gates().values())


def test_hard_masks_equal_zeroed_weights_for_an_mlp_hidden_unit() -> None:
    model = tiny_vit(depth=1)
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    keep = [i for i in range(groups.group("blocks.0.mlp:hidden").size) if i != 5]
    plan = p3b_fx.KeepPlan.from_mapping(groups, {"blocks.0.mlp:hidden": keep})
    masked = p3b_fx.apply_masks(gm, plan, groups)
    with torch.no_grad():
        model.blocks[0].mlp.fc2.weight[:, 5] = 0.0
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(masked(x), model(x), atol=1e-6, rtol=0)
