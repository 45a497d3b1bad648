"""Squared first-order Taylor gate scores (p3b_fx/criteria.py), and the shared distributed sum."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from p3b_fx.criteria import TaylorAccumulator, all_reduce_window
from p3b_fx.errors import CheckpointError, TrainingError

W = torch.tensor([1.0, -2.0, 0.5, 3.0])
M = torch.tensor([0.5, 1.0, 2.0, 0.0])


def linear_step(x: torch.Tensor, gate: torch.Tensor) -> np.ndarray:
    """y = (w · (x ⊙ m)).sum() over the batch: ∂y/∂m_e = w_e · Σ_n x_ne, so s_e = (m_e · w_e · Σ_n x_ne)²."""
    (W * (x * gate)).sum().backward()
    return ((M * W * x.sum(0)) ** 2).double().numpy()


def gate() -> torch.Tensor:
    return M.clone().requires_grad_(True)


def test_scores_equal_squared_taylor_on_linear_example() -> None:
    m = gate()
    acc = TaylorAccumulator()
    x1 = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 1.0, 2.0]])
    x2 = torch.tensor([[-1.0, 0.0, 2.0, 1.0]])
    expected1 = linear_step(x1, m)
    np.testing.assert_allclose(m.grad.numpy(), (W * x1.sum(0)).numpy())  # type: ignore[union-attr]
    acc.accumulate({"g": m})
    assert m.grad is None
    expected2 = linear_step(x2, m)
    acc.accumulate({"g": m})
    scores = acc.scores()
    assert scores["g"].dtype == np.float64
    np.testing.assert_allclose(scores["g"], (expected1 + expected2) / 2, rtol=1e-12)
    assert scores["g"][3] == 0.0  # a closed gate scores 0
    assert acc.counts() == {"g": 2}


def test_batch_gradient_is_squared_not_per_sample() -> None:
    """Reference batching: square of the summed gradient, which differs from a sum of per-sample squares."""
    m = gate()
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0]])
    linear_step(x, m)
    acc = TaylorAccumulator()
    acc.accumulate({"g": m})
    np.testing.assert_array_equal(acc.scores()["g"], np.zeros(4))


def test_grad_scale_and_missing_grads() -> None:
    a, b = gate(), gate()
    x = torch.ones(1, 4)
    expected = linear_step(x, a)
    acc = TaylorAccumulator({"a": 4, "b": 4})
    assert a.grad is not None
    a.grad.mul_(8.0)  # as under an AMP loss scale of 8
    acc.accumulate({"a": a, "b": b}, grad_scale=8.0)
    assert acc.counts() == {"a": 1, "b": 0}
    with pytest.raises(TrainingError, match=r"1 group\(s\).*'b'"):
        acc.scores()
    linear_step(x, b)
    acc.accumulate({"b": b})
    np.testing.assert_allclose(acc.scores()["a"], expected)


def test_nonfinite_step_is_skipped() -> None:
    m = gate()
    acc = TaylorAccumulator()
    m.grad = torch.tensor([1.0, float("inf"), 0.0, 0.0])
    acc.accumulate({"g": m})
    expected = linear_step(torch.ones(1, 4), m)
    acc.accumulate({"g": m})
    assert acc.counts() == {"g": 1}
    np.testing.assert_allclose(acc.scores()["g"], expected)


def test_all_groups_at_once_equal_each_group_on_its_own() -> None:
    """One step over many groups of different sizes (one overflowing, one without a gradient, a 0-d
    tensor loss scale): bit for bit what scoring each group alone gives."""
    g = torch.Generator().manual_seed(0)
    sizes = {f"g{i}": n for i, n in enumerate([3, 1, 7, 4, 12])}
    gates = {name: torch.rand(n, generator=g).requires_grad_(True) for name, n in sizes.items()}
    for name, gate_ in gates.items():
        gate_.grad = torch.randn(sizes[name], generator=g) * 64.0
    gates["g2"].grad[3] = float("nan")  # type: ignore[index]
    gates["g3"].grad = None
    expected = {
        name: (gate_.detach().double() * gate_.grad.double() / 64.0).square().numpy()
        for name, gate_ in gates.items()
        if gate_.grad is not None and name != "g2"
    }
    acc = TaylorAccumulator(sizes)
    acc.accumulate(gates, grad_scale=torch.tensor(64.0))
    assert acc.counts() == {"g0": 1, "g1": 1, "g2": 0, "g3": 0, "g4": 1}
    assert all(gate_.grad is None for gate_ in gates.values())
    sums = acc.state_dict()["sums"]
    for name, want in expected.items():
        np.testing.assert_array_equal(sums[name].numpy(), want)
    assert not sums["g2"].any() and not sums["g3"].any()


def test_reset_keeps_groups() -> None:
    m = gate()
    acc = TaylorAccumulator()
    linear_step(torch.ones(1, 4), m)
    acc.accumulate({"g": m})
    acc.reset()
    assert acc.names == ("g",) and acc.counts() == {"g": 0}
    with pytest.raises(TrainingError, match="since the last reset"):
        acc.scores()


@pytest.mark.parametrize(
    ("sizes", "gates", "match"),
    [
        ({"g": 4}, {"other": gate()}, "unknown gate group 'other'"),
        ({"g": 3}, {"g": gate()}, "has 4 elements but was registered with 3"),
        (None, {"g": torch.ones(2, 2, requires_grad=True)}, "must be 1-D"),
    ],
)
def test_bad_gates_raise(sizes: dict[str, int] | None, gates: dict[str, torch.Tensor], match: str) -> None:
    for g in gates.values():
        g.grad = torch.ones_like(g)
    with pytest.raises(TrainingError, match=match):
        TaylorAccumulator(sizes).accumulate(gates)


def test_state_dict_round_trip() -> None:
    m = gate()
    acc = TaylorAccumulator({"g": 4})
    linear_step(torch.ones(2, 4), m)
    acc.accumulate({"g": m})
    restored = TaylorAccumulator({"g": 4})
    restored.load_state_dict(acc.state_dict())
    np.testing.assert_array_equal(restored.scores()["g"], acc.scores()["g"])
    for a in (acc, restored):
        linear_step(torch.full((1, 4), 3.0), m)
        a.accumulate({"g": m})
    np.testing.assert_array_equal(restored.scores()["g"], acc.scores()["g"])
    lazy = TaylorAccumulator()
    lazy.load_state_dict(acc.state_dict())
    assert lazy.counts() == {"g": 2}


@pytest.mark.parametrize(
    ("sizes", "state", "match"),
    [
        ({"g": 4}, {"sums": {"h": torch.zeros(4)}, "counts": {"h": 1}}, "do not match"),
        ({"g": 4}, {"sums": {"g": torch.zeros(3)}, "counts": {"g": 1}}, "3 saved scores"),
        ({"g": 4}, {"counts": {"g": 1}}, "malformed"),
    ],
)
def test_load_state_dict_rejects_other_model(
    sizes: dict[str, int], state: dict[str, object], match: str
) -> None:
    with pytest.raises(CheckpointError, match=match):
        TaylorAccumulator(sizes).load_state_dict(state)


def test_all_reduce_is_noop_without_distributed() -> None:
    assert not torch.distributed.is_initialized()
    m = gate()
    acc = TaylorAccumulator()
    expected = linear_step(torch.ones(1, 4), m)
    acc.accumulate({"g": m})
    acc.all_reduce_()
    assert all_reduce_window([torch.ones(2)], "x") is None
    np.testing.assert_allclose(acc.scores()["g"], expected)
    assert acc.counts() == {"g": 1}


WORKER = textwrap.dedent(
    """
    import json, sys
    import torch, torch.distributed as dist
    from p3b_fx.benefit import BenefitAccumulator, ProbeOutput
    from p3b_fx.criteria import TaylorAccumulator
    from p3b_fx.errors import TrainingError

    rank, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
    taylor = TaylorAccumulator({"a": 2, "b": 3})
    for _ in range(rank + 1):  # rank 0 counts one step, rank 1 two
        gates = {"a": torch.ones(2, requires_grad=True), "b": torch.ones(3, requires_grad=True)}
        for g in gates.values():
            g.grad = torch.full_like(g, float(rank + 1))
        taylor.accumulate(gates)
    taylor.all_reduce_()
    benefit = BenefitAccumulator(2, has_class_token=True)
    benefit.add(ProbeOutput(torch.zeros(()), torch.tensor([1.0, 2.0]) * (rank + 1), torch.tensor([0.0, 4.0])))
    benefit.all_reduce_()
    cls, patch = benefit.mean()
    try:
        TaylorAccumulator({"a": 2 + rank}).all_reduce_()
        mismatch = "no error"
    except TrainingError as exc:
        mismatch = str(exc)
    result = {"scores": {k: v.tolist() for k, v in taylor.scores().items()}, "counts": taylor.counts(),
              "cls": cls.tolist(), "patch": patch.tolist(), "mismatch": mismatch}
    json.dump(result, open(out, "w"))
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_all_reduce_sums_over_two_gloo_ranks(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), str(tmp_path / "store"), str(outs[r])],
            env=env,
            stderr=subprocess.PIPE,
        )
        for r in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-2000:]
    results = [json.loads(o.read_text()) for o in outs]
    mismatch = [r.pop("mismatch") for r in results]
    assert results[0] == results[1]
    res = results[0]
    # rank 0 adds 1² once, rank 1 adds 2² twice: (1 + 8) / 3 steps
    assert res["counts"] == {"a": 3, "b": 3}
    np.testing.assert_allclose(res["scores"]["a"], [3.0, 3.0])
    np.testing.assert_allclose(res["cls"], [1.5, 3.0])
    np.testing.assert_allclose(res["patch"], [0.0, 4.0])
    assert all("different layouts" in msg for msg in mismatch)  # every rank fails, none hangs
