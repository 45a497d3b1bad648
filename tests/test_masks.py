"""InsertMasksPass / apply_masks: open gates change nothing; hard gates zero exactly; buffers."""

from __future__ import annotations

import pytest
import torch

import p3b_fx
from p3b_fx.core.masks import MASK_MODULE, MaskBank
from passes.insert_masks import InsertMasksPass
from tests.conftest import saved_bytes, tiny_vit


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


def _grads(
    bank: MaskBank, x: torch.Tensor, site: str, lean: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output, dL/dx and dL/dgate of ``linear(bank(x))``, by GateMul or by a plain ``x * mask``."""
    x = x.detach().clone().requires_grad_(True)
    gate = bank.gate("g")
    gate.grad = None
    weight = torch.linspace(-1, 1, x.shape[-1] * 5, dtype=x.dtype).reshape(5, x.shape[-1])
    y = bank(x, site) if lean else x * bank.site_mask(site).to(x.dtype)
    out = torch.nn.functional.linear(y, weight)
    (out.float() ** 2).sum().backward()
    assert x.grad is not None and gate.grad is not None
    return out.detach(), x.grad.clone(), gate.grad.clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_zero", [False, True])
def test_scoring_gate_gradients_equal_the_plain_product(dtype: torch.dtype, with_zero: bool) -> None:
    """GateMul (x rebuilt from y / m, or kept) gives the gradients of a plain x * m."""
    bank = MaskBank({"g": 6}, {"s": ((6, "g"),)})
    gate = torch.tensor([1.0, 0.5, 1e-9, 0.9, 0.25, 0.0 if with_zero else 1e-3])
    bank.set_gate("g", gate)
    bank.scoring(True)
    x = torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(0)).to(dtype)
    out_lean, gx_lean, gm_lean = _grads(bank, x, "s", lean=True)
    out_ref, gx_ref, gm_ref = _grads(bank, x, "s", lean=False)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    assert torch.equal(out_lean, out_ref)
    torch.testing.assert_close(gx_lean, gx_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(gm_lean, gm_ref, rtol=tol, atol=tol)


def test_scoring_keeps_no_extra_copy_of_the_masked_activations() -> None:
    """While scoring, the masked model's autograd graph holds ~ what the unmasked model's holds."""

    gm = p3b_fx.trace(tiny_vit())
    masked, bank = p3b_fx.insert_masks(gm, p3b_fx.find_groups(gm))
    for name, gate in bank.gates().items():
        bank.set_gate(name, torch.rand(gate.numel()) * 0.9 + 0.05)
    x = torch.randn(8, 3, 32, 32)
    plain = saved_bytes(gm, x)
    bank.scoring(True)
    scoring = saved_bytes(masked, x)
    assert scoring < 1.25 * plain, (scoring, plain)


def test_share_parameters_trains_the_traced_model_in_place() -> None:
    """The training loop's masked copy holds no second set of weights."""
    gm = p3b_fx.trace(tiny_vit())
    shared, _ = p3b_fx.insert_masks(gm, p3b_fx.find_groups(gm), share_parameters=True)
    copied, _ = p3b_fx.insert_masks(gm, p3b_fx.find_groups(gm))
    own = dict(gm.named_parameters())
    assert all(p is own[k] for k, p in shared.named_parameters())
    assert not any(p is own[k] for k, p in copied.named_parameters())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(shared(x), gm(x))
