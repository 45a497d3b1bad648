"""Block-benefit probes and their window accumulator (p3b_fx/benefit.py)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from p3b_fx.benefit import (
    BenefitAccumulator,
    BenefitProbes,
    BlockLayout,
    BlockwiseProbes,
    ProbeKind,
    ProbeOutput,
    default_hidden,
    probe_params,
)
from p3b_fx.errors import CheckpointError, ConfigError, TrainingError

DIM, CLASSES, BATCH = 16, 4, 8


def make_probes(kind: ProbeKind = ProbeKind.PATCH_CONV, blocks: int = 3, **kw: object) -> BenefitProbes:
    cfg: dict[str, object] = {"grid_size": 3, "num_prefix_tokens": 1, "has_class_token": True, "hidden": 8}
    cfg.update(kw)
    return BenefitProbes(blocks, DIM, CLASSES, patch_kind=kind, **cfg)  # type: ignore[arg-type]


def features(blocks: int, tokens: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(BATCH, tokens, DIM, generator=g) for _ in range(blocks + 1)]


LABELS = torch.arange(BATCH) % CLASSES


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: threads only add overhead on the shared CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("kind", [ProbeKind.PATCH_CONV, ProbeKind.PATCH_LINEAR])
def test_probes_never_reach_the_backbone(kind: ProbeKind) -> None:
    torch.manual_seed(0)
    w = torch.randn(DIM, requires_grad=True)  # stand-in backbone parameter
    feats = [(w * f) for f in features(2, 10)]
    probes = make_probes(kind, blocks=2)
    out = probes(feats, LABELS)
    out.loss.backward()
    assert w.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in probes.parameters())
    assert out.benefit_cls is not None and not out.benefit_cls.requires_grad
    assert not out.benefit_patch.requires_grad


def test_same_probe_reads_input_and_output() -> None:
    """With x_i == x_{i-1} every probe sees the same map twice, so every benefit is exactly 0."""
    probes = make_probes(ProbeKind.PATCH_LINEAR, blocks=3).eval()
    same = features(0, 10)[0]
    out = probes([same] * 4, LABELS)
    assert out.benefit_cls is not None
    assert torch.equal(out.benefit_cls, torch.zeros(3))
    assert torch.equal(out.benefit_patch, torch.zeros(3))


def test_loss_is_sum_of_probe_cross_entropies() -> None:
    probes = make_probes(ProbeKind.PATCH_LINEAR, blocks=1)
    feats = features(1, 10)
    out = probes(feats, LABELS)
    ce = torch.nn.functional.cross_entropy
    cls_w, cls_b = probes.cls_probes.weight[0], probes.cls_probes.bias[0]  # type: ignore[union-attr]
    pat_w, pat_b = probes.patch_linear.weight[0], probes.patch_linear.bias[0]  # type: ignore[union-attr]
    terms = [
        ce(f[:, 0] @ cls_w + cls_b, LABELS) + ce(f[:, 1:].mean(1) @ pat_w + pat_b, LABELS) for f in feats
    ]
    torch.testing.assert_close(out.loss, terms[0] + terms[1])
    assert out.benefit_cls is not None
    torch.testing.assert_close(
        out.benefit_cls[0],
        ce(feats[0][:, 0] @ cls_w + cls_b, LABELS) - ce(feats[1][:, 0] @ cls_w + cls_b, LABELS),
    )


@pytest.mark.parametrize("kind", [ProbeKind.PATCH_CONV, ProbeKind.PATCH_LINEAR])
def test_benefit_sign_on_constructed_blocks(kind: ProbeKind) -> None:
    """Block 1 adds a class signal (more separable: ΔΨ > 0); block 2 replaces it by noise (ΔΨ < 0)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(CLASSES, DIM, generator=g)

    def batch() -> tuple[list[torch.Tensor], torch.Tensor]:
        y = torch.randint(0, CLASSES, (64,), generator=g)
        x0 = torch.randn(64, 10, DIM, generator=g)
        return [x0, x0 + 1.5 * mu[y][:, None, :], torch.randn(64, 10, DIM, generator=g)], y

    probes = make_probes(kind, blocks=2)
    opt = torch.optim.SGD(probes.parameters(), lr=0.05, momentum=0.9)
    for _ in range(60):
        feats, y = batch()
        opt.zero_grad()
        probes(feats, y).loss.backward()
        opt.step()
    out = probes(*batch())
    assert out.benefit_cls is not None
    assert out.benefit_cls[0] > 0.5 and out.benefit_cls[1] < -0.5
    assert out.benefit_patch[0] > 0.5 and out.benefit_patch[1] < -0.5


@pytest.mark.parametrize("kind", [ProbeKind.PATCH_CONV, ProbeKind.PATCH_LINEAR])
@pytest.mark.parametrize(
    ("has_cls", "prefix", "grid"),
    [
        (True, 1, (3, 3)),  # plain ViT
        (True, 2, (2, 4)),  # class + distillation token, non-square grid
        (True, 5, (3, 3)),  # class + 4 registers
        (False, 0, (4, 4)),  # global-average-pooled, no prefix
        (False, 4, (2, 3)),  # registers only
    ],
)
def test_shapes(kind: ProbeKind, has_cls: bool, prefix: int, grid: tuple[int, int]) -> None:
    blocks = 3
    probes = make_probes(kind, blocks, grid_size=grid, num_prefix_tokens=prefix, has_class_token=has_cls)
    out = probes(features(blocks, prefix + grid[0] * grid[1]), LABELS)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.benefit_patch.shape == (blocks,)
    assert (out.benefit_cls is None) == (not has_cls)
    if out.benefit_cls is not None:
        assert out.benefit_cls.shape == (blocks,)


def test_square_grid_is_inferred_and_soft_labels_work() -> None:
    probes = make_probes(ProbeKind.PATCH_CONV, blocks=2, grid_size=None, num_prefix_tokens=2)
    soft = torch.nn.functional.one_hot(LABELS, CLASSES).float() * 0.9 + 0.1 / CLASSES
    out = probes(features(2, 2 + 16), soft)
    assert out.benefit_patch.shape == (2,) and torch.isfinite(out.loss)


def test_hard_and_one_hot_labels_agree() -> None:
    probes = make_probes(ProbeKind.PATCH_LINEAR, blocks=2)
    feats = features(2, 10)
    hard, onehot = probes(feats, LABELS), probes(feats, torch.nn.functional.one_hot(LABELS, CLASSES).float())
    torch.testing.assert_close(hard.loss, onehot.loss)
    torch.testing.assert_close(hard.benefit_patch, onehot.benefit_patch)


@pytest.mark.parametrize(
    ("feats", "labels", "match"),
    [
        (features(2, 10), LABELS, "expected 4 feature maps"),
        (features(3, 11), LABELS, "do not fill the patch grid"),
        ([*features(3, 10)[:3], torch.randn(BATCH, 10, DIM + 1)], LABELS, "x_3 is"),
        (features(3, 10), LABELS[:3], "labels"),
    ],
)
def test_bad_inputs_raise(feats: list[torch.Tensor], labels: torch.Tensor, match: str) -> None:
    with pytest.raises(TrainingError, match=match):
        make_probes(blocks=3)(feats, labels)


def test_non_square_tokens_without_grid_raise() -> None:
    with pytest.raises(TrainingError, match="inferred as square"):
        make_probes(blocks=1, grid_size=None)(features(1, 1 + 6), LABELS)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"patch_kind": ProbeKind.CLS_LINEAR}, "patch_kind"),
        ({"has_class_token": True, "num_prefix_tokens": 0}, "num_prefix_tokens"),
        ({"grid_size": (0, 3)}, "grid_size"),
    ],
)
def test_bad_config_raises(kw: dict[str, object], match: str) -> None:
    cfg: dict[str, object] = {"grid_size": 3, "num_prefix_tokens": 1, "has_class_token": True} | kw
    with pytest.raises(ConfigError, match=match):
        BenefitProbes(2, DIM, CLASSES, **cfg)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "hidden", "has_cls"),
    [
        (ProbeKind.PATCH_CONV, None, True),
        (ProbeKind.PATCH_CONV, 8, False),
        (ProbeKind.PATCH_LINEAR, None, True),
    ],
)
def test_probe_params_matches_module(kind: ProbeKind, hidden: int | None, has_cls: bool) -> None:
    probes = make_probes(kind, blocks=3, hidden=hidden, has_class_token=has_cls)
    per_block = probe_params(kind, DIM, CLASSES, hidden) + (
        probe_params("cls_linear", DIM, CLASSES) if has_cls else 0
    )
    assert probes.num_probe_params() == 3 * per_block


def test_probe_params_vit_b() -> None:
    """ViT-B (dim 768, 1000 classes): at full width each 3x3 conv is ~5.3 M, the probe ~11.4 M;
    the default width 192 gives ~1.9 M."""
    assert 9 * 768 * 768 == 5_308_416
    full = probe_params(ProbeKind.PATCH_CONV, 768, 1000, hidden=768)
    assert full == 2 * 5_308_416 + 4 * 768 + 768 * 1000 + 1000
    assert default_hidden(768) == 192 and default_hidden(32) == 16
    default = probe_params(ProbeKind.PATCH_CONV, 768, 1000)
    assert default == 9 * 768 * 192 + 9 * 192 * 192 + 4 * 192 + 192 * 1000 + 1000 == 1_852_648
    assert (
        probe_params(ProbeKind.PATCH_LINEAR, 768, 1000)
        == probe_params(ProbeKind.CLS_LINEAR, 768, 1000)
        == 769_000
    )


# --- accumulator ---------------------------------------------------------------------------------


def step(cls: list[float] | None, patch: list[float]) -> ProbeOutput:
    return ProbeOutput(
        loss=torch.zeros(()),
        benefit_cls=None if cls is None else torch.tensor(cls),
        benefit_patch=torch.tensor(patch),
    )


def test_accumulator_mean_and_reset() -> None:
    acc = BenefitAccumulator(3, has_class_token=True)
    acc.add(step([1.0, 2.0, 3.0], [0.5, -1.0, 0.0]))
    acc.add(step([3.0, 0.0, -3.0], [1.5, 1.0, 2.0]))
    cls, patch = acc.mean()
    assert cls is not None and cls.dtype == np.float64
    np.testing.assert_allclose(cls, [2.0, 1.0, 0.0])
    np.testing.assert_allclose(patch, [1.0, 0.0, 1.0])
    acc.reset()
    with pytest.raises(TrainingError, match="since the last reset"):
        acc.mean()
    acc.add(step([1.0, 1.0, 1.0], [7.0, 7.0, 7.0]))
    np.testing.assert_allclose(acc.mean()[1], [7.0, 7.0, 7.0])


def test_accumulator_without_class_token_and_nonfinite_steps() -> None:
    acc = BenefitAccumulator(2, has_class_token=False)
    acc.add(step(None, [1.0, math.inf]))
    acc.add(step(None, [3.0, 2.0]))
    cls, patch = acc.mean()
    assert cls is None
    np.testing.assert_allclose(patch, [2.0, 2.0])
    np.testing.assert_array_equal(acc.counts()[1], [2, 1])


@pytest.mark.parametrize(
    ("has_cls", "out"),
    [(True, step(None, [1.0, 2.0])), (False, step([1.0, 2.0], [1.0, 2.0])), (True, step([1.0], [1.0]))],
)
def test_accumulator_rejects_mismatched_output(has_cls: bool, out: ProbeOutput) -> None:
    with pytest.raises(TrainingError, match="expected ΔΨ of shape"):
        BenefitAccumulator(2, has_class_token=has_cls).add(out)


def test_accumulator_state_dict_round_trip() -> None:
    acc = BenefitAccumulator(2, has_class_token=True)
    acc.add(step([1.0, 2.0], [3.0, 4.0]))
    state = acc.state_dict()
    restored = BenefitAccumulator(2, has_class_token=True)
    restored.load_state_dict(state)
    for a, b in zip(acc.mean(), restored.mean(), strict=True):
        np.testing.assert_array_equal(a, b)
    acc.add(step([3.0, 0.0], [1.0, 0.0]))
    restored.add(step([3.0, 0.0], [1.0, 0.0]))
    np.testing.assert_array_equal(acc.mean()[1], restored.mean()[1])
    with pytest.raises(CheckpointError, match="resume with the model"):
        BenefitAccumulator(3, has_class_token=True).load_state_dict(state)
    with pytest.raises(CheckpointError, match="malformed"):
        restored.load_state_dict({"sums": state["sums"]})


def test_accumulator_all_reduce_is_noop_without_distributed() -> None:
    assert not torch.distributed.is_initialized()
    acc = BenefitAccumulator(2, has_class_token=True)
    acc.add(step([1.0, 2.0], [3.0, 4.0]))
    acc.all_reduce_()
    cls, patch = acc.mean()
    np.testing.assert_array_equal(cls, [1.0, 2.0])
    np.testing.assert_array_equal(patch, [3.0, 4.0])


# --- BlockwiseProbes: blocks on streams of their own (pooling stages, class-attention blocks) ----------

STAGED = (
    BlockLayout(DIM, 1, (3, 3), True),  # plain stream: class token + 3x3 grid
    BlockLayout(DIM, 1, None, True),  # class token alone (CaiT's class-attention blocks)
    BlockLayout(8, 0, (1, 2), False),  # a narrower stage without class token
)
STAGED_PAIRS = ((0, 1), (2, 3), (4, 5))


def staged_features(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(BATCH, lay.num_tokens, lay.dim, generator=g) for lay in STAGED for _ in range(2)]


@pytest.mark.parametrize("kind", [ProbeKind.PATCH_CONV, ProbeKind.PATCH_LINEAR])
def test_blockwise_probes_measure_what_each_block_has(kind: ProbeKind) -> None:
    probes = BlockwiseProbes(STAGED, STAGED_PAIRS, CLASSES, patch_kind=kind, hidden=8)
    w = torch.ones((), requires_grad=True)  # stand-in backbone parameter
    out = probes([w * f for f in staged_features()], LABELS)
    assert out.benefit_cls is not None
    assert [math.isnan(v) for v in out.benefit_cls.tolist()] == [False, False, True]
    assert [math.isnan(v) for v in out.benefit_patch.tolist()] == [False, True, False]
    out.loss.backward()
    assert w.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in probes.parameters())
    assert (probes.cls_blocks, probes.patch_blocks) == ((True, True, False), (True, False, True))


def test_blockwise_probes_equal_the_batched_ones_on_one_stream() -> None:
    """Same weights, one plain stream: both implementations give the same loss and ΔΨ."""
    torch.manual_seed(0)
    batched = make_probes(ProbeKind.PATCH_CONV, blocks=2)
    lay = BlockLayout(DIM, 1, (3, 3), True)
    blockwise = BlockwiseProbes([lay, lay], [(0, 1), (1, 2)], CLASSES, hidden=8)
    assert batched.cls_probes is not None and batched.patch_conv is not None
    with torch.no_grad():
        for i in range(2):
            cls = blockwise.cls[i]
            assert isinstance(cls, torch.nn.Linear)
            cls.weight.copy_(batched.cls_probes.weight[i].T)
            cls.bias.copy_(batched.cls_probes.bias[i])
            blockwise.patch[i].load_state_dict(batched.patch_conv[i].state_dict())
    feats = features(2, 10)
    a, b = batched(feats, LABELS), blockwise(feats, LABELS)
    assert a.benefit_cls is not None and b.benefit_cls is not None
    torch.testing.assert_close(b.benefit_cls, a.benefit_cls)
    torch.testing.assert_close(b.benefit_patch, a.benefit_patch)
    torch.testing.assert_close(b.loss, a.loss)


def test_blockwise_probes_refuse_bad_layouts_and_maps() -> None:
    with pytest.raises(ConfigError, match="neither a class token nor a patch grid"):
        BlockwiseProbes([BlockLayout(DIM, 0, None, False)], [(0, 1)], CLASSES)
    with pytest.raises(ConfigError, match="one layout and one"):
        BlockwiseProbes(STAGED, STAGED_PAIRS[:2], CLASSES)
    probes = BlockwiseProbes(STAGED, STAGED_PAIRS, CLASSES, hidden=8)
    feats = staged_features()
    with pytest.raises(TrainingError, match="expected 6 tapped feature maps"):
        probes(feats[:5], LABELS)
    feats[3] = torch.randn(BATCH, 2, DIM)
    with pytest.raises(TrainingError, match=r"block 1 expects \(batch, 1, 16\) maps"):
        probes(feats, LABELS)


def test_accumulator_counts_only_the_probes_a_block_has() -> None:
    probes = BlockwiseProbes(STAGED, STAGED_PAIRS, CLASSES, hidden=8)
    acc = BenefitAccumulator.for_probes(probes)
    acc.add(step([1.0, 2.0, math.nan], [3.0, math.nan, 5.0]))
    acc.add(step([3.0, 4.0, 9.0], [1.0, 9.0, 1.0]))  # values where a block has no probe are ignored
    cls, patch = acc.mean()
    assert cls is not None
    np.testing.assert_array_equal(np.isnan(cls), [False, False, True])
    np.testing.assert_allclose(cls[:2], [2.0, 3.0])
    np.testing.assert_array_equal(np.isnan(patch), [False, True, False])
    np.testing.assert_allclose(patch[[0, 2]], [2.0, 3.0])
    restored = BenefitAccumulator.for_probes(probes)
    restored.load_state_dict(acc.state_dict())
    np.testing.assert_array_equal(restored.counts(), acc.counts())
    with pytest.raises(CheckpointError, match="resume with the model"):
        BenefitAccumulator(3, has_class_token=True).load_state_dict(acc.state_dict())


def _grouped_twin(per_block: BenefitProbes) -> BenefitProbes:
    twin = make_probes(ProbeKind.PATCH_CONV, blocks=per_block.num_blocks, grouped=True)
    twin.load_state_dict(per_block.state_dict())
    return twin


@pytest.mark.parametrize("has_cls", [True, False])
def test_grouped_conv_probes_compute_the_same_function(has_cls: bool) -> None:
    """grouped=True: logits, loss, ΔΨ, every gradient and the BatchNorm running statistics match
    the block-by-block probes over several steps; the state dicts keep the same keys."""
    torch.manual_seed(0)
    kw = {} if has_cls else {"has_class_token": False, "num_prefix_tokens": 0}
    per_block = make_probes(ProbeKind.PATCH_CONV, blocks=4, **kw)
    grouped = make_probes(ProbeKind.PATCH_CONV, blocks=4, grouped=True, **kw)
    grouped.load_state_dict(per_block.state_dict())
    opts = [torch.optim.SGD(p.parameters(), lr=0.1) for p in (per_block, grouped)]
    for step in range(3):
        feats = features(4, 9 + int(has_cls), seed=step)
        outs = [p(feats, LABELS) for p in (per_block, grouped)]
        torch.testing.assert_close(outs[1].loss, outs[0].loss)
        torch.testing.assert_close(outs[1].benefit_patch, outs[0].benefit_patch)
        for opt, out in zip(opts, outs, strict=True):
            opt.zero_grad()
            out.loss.backward()
        grads = [dict(p.named_parameters()) for p in (per_block, grouped)]
        for name, param in grads[0].items():
            assert param.grad is not None and bool(param.grad.abs().sum() > 0), name
            torch.testing.assert_close(grads[1][name].grad, param.grad, msg=name)
        for opt in opts:
            opt.step()
    a, b = per_block.state_dict(), grouped.state_dict()
    assert list(a) == list(b)
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, msg=key)
    assert int(a["patch_conv.0.body.1.num_batches_tracked"]) == 6  # two maps per step, three steps


def test_grouped_probes_can_be_switched_at_any_step() -> None:
    """The attribute flips the implementation of the same parameters (a resumed run may differ)."""
    torch.manual_seed(0)
    probes = make_probes(ProbeKind.PATCH_CONV, blocks=3)
    twin = _grouped_twin(probes)
    feats = features(3, 10)
    probes.grouped = True
    torch.testing.assert_close(probes(feats, LABELS).loss, twin(feats, LABELS).loss)
    linear = make_probes(ProbeKind.PATCH_LINEAR, blocks=3, grouped=True)  # no conv: nothing to group
    linear(feats, LABELS).loss.backward()
