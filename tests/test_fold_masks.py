"""FoldMasksPass: a folded masked graph computes what the activation-masked one does, with the same
dL/dm and parameter gradients, keeps no more for backward than the unmasked model, and leaves
sites it cannot fold as they were."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import fx, nn

import p3b_fx
from p3b_fx.core.masks import MASK_MODULE, MaskBank
from p3b_fx.errors import P3BError
from p3b_fx.tracing import copy_graph_module
from passes.fold_masks import FoldMasksPass, _MaskedLinear
from tests.conftest import saved_bytes, tiny_vit


def _soft(bank: MaskBank, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, gate in bank.gates().items():
        bank.set_gate(name, torch.rand(gate.numel(), generator=g) * 0.9 + 0.05)


def _sites(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_module" and n.target == MASK_MODULE]


def _masked_pair(model: nn.Module) -> tuple[fx.GraphModule, MaskBank, fx.GraphModule, MaskBank]:
    gm = p3b_fx.trace(model)
    masked, bank = p3b_fx.insert_masks(gm, p3b_fx.find_groups(gm))
    _soft(bank)
    folded = p3b_fx.fold_masks(copy_graph_module(masked))
    fbank = folded.get_submodule(MASK_MODULE)
    assert isinstance(fbank, MaskBank)
    return masked, bank, folded, fbank


def _compare(model: nn.Module, x: torch.Tensor) -> None:
    """Outputs, gate gradients and parameter gradients of the folded graph equal the unfolded ones."""
    masked, bank, folded, fbank = _masked_pair(model)
    grads = []
    for net, b in ((masked, bank), (folded, fbank)):
        b.scoring(True)
        net.zero_grad(set_to_none=True)
        out = net(x)
        (out.float() ** 2).mean().backward()
        grads.append(
            (
                out.detach(),
                {k: g.grad.clone() for k, g in b.gates().items() if g.grad is not None},
                {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None},
            )
        )
    (out_a, gates_a, params_a), (out_b, gates_b, params_b) = grads
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-5)
    assert gates_a.keys() == gates_b.keys() and gates_a
    for k in gates_a:
        scale = float(gates_a[k].abs().max()) + 1e-12
        torch.testing.assert_close(gates_b[k] / scale, gates_a[k] / scale, rtol=0, atol=1e-4, msg=k)
    assert params_a.keys() == params_b.keys()
    for k in params_a:
        scale = float(params_a[k].abs().max()) + 1e-12
        torch.testing.assert_close(params_b[k] / scale, params_a[k] / scale, rtol=0, atol=1e-4, msg=k)


def test_every_site_of_a_vit_folds_and_gradients_match() -> None:
    model = tiny_vit().train()
    masked, _, folded, _ = _masked_pair(model)
    assert len(_sites(masked)) == 2 * (4 + 3)
    assert _sites(folded) == []
    assert masked.state_dict().keys() == folded.state_dict().keys()
    assert FoldMasksPass()(folded).modified is False  # nothing left to fold
    _compare(tiny_vit(), torch.randn(3, 3, 32, 32))


@pytest.mark.parametrize("name", ["vit_small_patch16_18x2_224", "cait_xxs24_224", "levit_128s"])
def test_other_vit_families_fold_what_they_can(name: str) -> None:
    """Parallel blocks (several readers per site), class attention, BatchNorm linears (not folded)."""
    try:
        model = timm.create_model(name, pretrained=False, depth=2).eval()
    except (TypeError, ValueError):
        model = timm.create_model(name, pretrained=False).eval()
    gm = p3b_fx.trace(model)
    try:
        p3b_fx.find_groups(gm)
    except P3BError:
        pytest.skip(f"{name}: no prunable groups")
    x = torch.randn(2, *gm.meta["p3b.input_shape"][1:])
    _compare(model, x)


def test_sites_next_to_other_ops_stay_activation_multiplies() -> None:
    """A site that feeds something other than a Linear (here a clone before fc2) is not folded."""
    gm = p3b_fx.trace(tiny_vit(depth=1))
    masked, bank = p3b_fx.insert_masks(gm, p3b_fx.find_groups(gm))
    _soft(bank)
    site = next(n for n in _sites(masked) if n.meta["p3b.mask_site"] == "blocks.0.mlp:last_in")
    users = list(site.users)
    with masked.graph.inserting_after(site):
        clone = masked.graph.call_function(torch.clone, (site,))
    for u in users:
        u.replace_input_with(site, clone)
    masked.recompile()
    folded = p3b_fx.fold_masks(copy_graph_module(masked))
    assert {n.meta["p3b.mask_site"] for n in _sites(folded)} == {"blocks.0.mlp:last_in"}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), masked(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("masks", ["both", "in", "out", "in-no-bias"])
def test_masked_linear_gradcheck(masks: str) -> None:
    g = torch.Generator().manual_seed(0)

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)

    x, w = t(3, 5, 6), t(4, 6)
    b = None if masks == "in-no-bias" else t(4)

    def gate(n: int) -> torch.Tensor:
        return torch.rand(n, generator=g, dtype=torch.float64).requires_grad_(True)

    m_in = None if masks == "out" else gate(6)
    m_out = gate(4) if masks in ("both", "out") else None
    assert torch.autograd.gradcheck(_MaskedLinear.apply, (x, w, b, m_in, m_out))


def test_masked_linear_under_autocast_keeps_the_low_precision_input() -> None:
    """Under CPU autocast (bf16) the matmul runs in bf16, saves the bf16 x, and grads keep their dtypes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 6, generator=g, requires_grad=True)
    w = torch.randn(4, 6, generator=g, requires_grad=True)
    m = torch.rand(6, generator=g, requires_grad=True)
    saved: list[tuple[torch.dtype, tuple[int, ...]]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        y = _MaskedLinear.apply(x, w, None, m, None)
        ref = nn.functional.linear(x * m, w)
    assert y.dtype == torch.bfloat16 == ref.dtype
    # the bf16 x and the bf16 W' (a plain Linear under autocast keeps its bf16 x and W too)
    assert (torch.bfloat16, (8, 6)) in saved and (torch.bfloat16, (4, 6)) in saved
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
    ref.float().sum().backward()
    expected = [t.grad.clone() for t in (x, w, m) if t.grad is not None]
    for t in (x, w, m):
        t.grad = None
    y.float().sum().backward()
    assert x.grad is not None and m.grad is not None and w.grad is not None
    assert (x.grad.dtype, w.grad.dtype, m.grad.dtype) == (torch.float32,) * 3
    for got, want in zip((x.grad, w.grad, m.grad), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)


def test_folded_scoring_keeps_what_the_unmasked_model_keeps() -> None:
    model = tiny_vit()
    gm = p3b_fx.trace(model)
    _, _, folded, fbank = _masked_pair(model)
    x = torch.randn(8, 3, 32, 32)
    plain = saved_bytes(gm, x)
    fbank.scoring(True)
    scoring = saved_bytes(folded, x)
    assert scoring <= 1.02 * plain, (scoring, plain)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_folded_gate_gradients_under_cuda_autocast(dtype: torch.dtype) -> None:
    """On CUDA with autocast (the training loop's AMP), folded and activation gates agree."""
    masked, bank, folded, fbank = _masked_pair(tiny_vit().train())  # traced on the CPU
    masked.cuda()
    folded.cuda()
    x = torch.randn(4, 3, 32, 32, device="cuda")
    grads = []
    for net, b in ((masked, bank), (folded, fbank)):
        b.scoring(True)
        with torch.autocast("cuda", dtype=dtype):
            out = net(x)
        (out.float() ** 2).mean().backward()
        grads.append({k: g.grad.float().clone() for k, g in b.gates().items() if g.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k in grads[0]:
        scale = float(grads[0][k].abs().max()) + 1e-12
        torch.testing.assert_close(grads[1][k] / scale, grads[0][k] / scale, rtol=0, atol=5e-2, msg=k)
