"""Data-parallel P3B (p3b_fx.distributed): two gloo ranks on the CPU against one process.

One module fixture starts two ranks from a fork server that has torch, timm and p3b_fx imported
(not spawn: each rank would re-import them, ~5 s of CPU each; not a plain fork of this process:
once this process has run a backward pass, as earlier tests in it do, autograd refuses to run in
a forked child) and gives them torchrun's environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT — what ``torchrun --nproc_per_node=2`` sets), so
``train.run`` joins the gloo group from the environment as under torchrun. Meanwhile this process
runs the single-process reference. Each rank runs three P3B jobs on a tiny timm ViT and sklearn
digits (materialised here once):

1. ``tamper``: rank 1 adds 1e-3 to every gate it sets; the plan check must fail on *both* ranks;
2. ``crash``: rank 1 raises out of its run at the start of epoch 2 (its process group goes down,
   like a dead rank's); rank 0 must stop with a clear message, its epoch-1 checkpoint intact;
3. ``resume``: both ranks resume the crashed run to the end; its plan is compared with rank 1's
   and with the one-process run that sees the same global batches.

Tolerance of the comparison with one process. DistributedSampler gives rank r the samples r, r+2, …
of each epoch's permutation, so the two ranks' k-th batches of 16 together are exactly the k-th
batch of 32 that one process draws through DistributedSampler(num_replicas=1) with the same seed:
the global batches are identical (no augmentation, no dropout). What differs is float arithmetic:
DDP averages two half-batch gradient means, the gate gradients are averaged the same way, and the
evaluation runs in other batch shapes. Those float32 rounding differences (~1e-7 relative) move
the weights by ~1e-6 over the run; the keep plan is a ranking of Taylor scores, so two elements whose
scores lie that close can swap. Measured on this setup: identical plans and accuracy curves. Asserted:
per-group kept sizes within 1 element and index overlap (Jaccard) >= 0.95 over the whole plan, and
every accuracy within 1 test sample (1/360) of the one-process run.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import textwrap
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from p3b_fx import distributed, train
from p3b_fx.config import PruneConfig
from p3b_fx.core.masks import MaskBank
from p3b_fx.core.plan import KeepPlan
from p3b_fx.errors import CheckpointError, ConfigError, TrainingError

REPO = Path(__file__).resolve().parents[1]
TINY = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 7}
RANK_BATCH = 16
WORLD = 2
CONFIG: dict[str, Any] = {
    "model": "vit_tiny_patch16_224", "model_kwargs": TINY, "data": "digits", "num_classes": 10,
    "epochs": 2, "batch_size": RANK_BATCH, "lr": 5e-2, "probe": "patch_linear", "max_steps_per_epoch": 20,
    "updates_per_epoch": 2, "device": "cpu", "prune_ratio": 0.5, "seed": 3, "augment": False,
    "dist_timeout": 1.0,
}  # fmt: skip
WORKER_TIMEOUT_S = 240
_FORKSERVER = multiprocessing.get_context("forkserver")
_FORKSERVER.set_forkserver_preload(["torch", "timm", "p3b_fx.train", "tests.test_distributed"])


def _count_writes(mp: pytest.MonkeyPatch, writes: list[str]) -> None:
    """Record every file-writing call of the training module (plots are guarded inside ``_plots``)."""
    for owner, name in ((train, "atomic_save"), (train, "atomic_write_text"), (train, "append_log"),
                        (KeepPlan, "save")):  # fmt: skip
        real = getattr(owner, name)

        def counted(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            writes.append(_name)
            return _real(*args, **kwargs)

        mp.setattr(owner, name, counted)


def _capture_plans(mp: pytest.MonkeyPatch, plans: list[tuple[str, str]]) -> None:
    real_finish = train.Loop.finish

    def finish(self: train.Loop) -> KeepPlan:
        plan = real_finish(self)
        plans.append((plan.to_json(), distributed.plan_digest(self.pruner.bank.gates(), self.pruner.kept)))
        return plan

    mp.setattr(train.Loop, "finish", finish)


def _run(spec: dict[str, Any], port: int, out: Path, **changes: Any) -> dict[str, Any]:
    os.environ["MASTER_PORT"] = str(port)
    data = spec["tensors"]
    loaders = (
        DataLoader(TensorDataset(*data["train"]), batch_size=RANK_BATCH, shuffle=True),
        DataLoader(TensorDataset(*data["test"]), batch_size=64),
    )
    return train.run(PruneConfig(**{**CONFIG, "out": str(out), **changes}), loaders=loaders)


def _failure(spec: dict[str, Any], port: int, out: Path) -> str:
    try:
        _run(spec, port, out)
    except TrainingError as exc:
        return str(exc)
    except KeyboardInterrupt:
        return "crashed"
    return "no error"


def _rank_runs(rank: int, spec: dict[str, Any]) -> dict[str, Any]:
    """One rank's three runs: tamper (rank 1 offsets its gates), crash (rank 1 leaves), resume."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1")
    out, ports = Path(spec["out"]), spec["ports"]
    writes: list[str] = []
    plans: list[tuple[str, str]] = []
    result: dict[str, Any] = {"rank": rank}
    with pytest.MonkeyPatch.context() as mp:
        _count_writes(mp, writes)
        _capture_plans(mp, plans)
        with pytest.MonkeyPatch.context() as tamper:
            real_set = MaskBank.set_gate
            offset = 1e-3 if rank == 1 else 0.0
            tamper.setattr(MaskBank, "set_gate", lambda self, g, v: real_set(self, g, v + offset))
            result["tamper"] = _failure(spec, ports[0], out / "tamper")
        with pytest.MonkeyPatch.context() as crash:
            real_epoch = train.Loop.run_epoch

            def run_epoch(self: train.Loop) -> None:
                if rank == 1 and self.epoch == 1:
                    raise KeyboardInterrupt  # not a RuntimeError: leaves the run, its group goes down
                real_epoch(self)

            crash.setattr(train.Loop, "run_epoch", run_epoch)
            result["crash"] = _failure(spec, ports[1], out / "run")
        if rank == 0:
            result["checkpoint_epoch"] = torch.load(out / "run" / "checkpoint.pt", weights_only=False)[
                "epoch"
            ]
        report = _run(spec, ports[2], out / "run", resume=True)
    result.update(report={k: report[k] for k in REPORT_KEYS}, plan=plans[-1][0], digest=plans[-1][1])
    return {**result, "writes": writes}


def _rank_main(rank: int, spec: dict[str, Any]) -> None:
    """Entry of a rank process: its results, or its traceback, land next to the other rank's."""
    torch.set_num_threads(1)
    results = Path(spec["results"])
    try:
        (results / f"rank{rank}.json").write_text(json.dumps(_rank_runs(rank, spec)))
    except BaseException:
        (results / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


REPORT_KEYS = ("keep_ratios", "accuracy_curve", "top1", "params_slim", "budget_met", "world_size",
               "effective_batch")  # fmt: skip


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [int(s.getsockname()[1]) for s in socks]
    for s in socks:
        s.close()
    return ports


def materialise(cfg: PruneConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The digits splits as tensors, exactly as the data module transforms them for the tiny ViT."""
    (train_loader, test_loader), _ = train.build_data(cfg, train.build_model(cfg))
    data = {}
    for split, loader in (("train", train_loader), ("test", test_loader)):
        ds = loader.dataset
        items = [ds[i] for i in range(len(ds))]  # type: ignore[arg-type]
        data[split] = (torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items]))
    return data


def one_process(cfg: PruneConfig, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """The reference: one process, batch 16 × 2, the same DistributedSampler permutation per epoch."""
    train_set = TensorDataset(*data["train"])
    sampler: DistributedSampler[Any] = DistributedSampler(train_set, num_replicas=1, rank=0, seed=cfg.seed)
    loaders = (
        DataLoader(train_set, batch_size=RANK_BATCH * WORLD, sampler=sampler),
        DataLoader(TensorDataset(*data["test"]), batch_size=64),
    )
    return train.run(cfg.replace(batch_size=RANK_BATCH * WORLD), loaders=loaders)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    if "forkserver" not in multiprocessing.get_all_start_methods():
        pytest.skip("the two ranks start from a fork server, which this platform does not offer")
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("dist")
    cfg = PruneConfig(**CONFIG, out=str(tmp / "single"))
    data = materialise(cfg)
    spec = {"tensors": data, "out": str(tmp / "two"), "ports": free_ports(3), "results": str(tmp)}
    procs = [_FORKSERVER.Process(target=_rank_main, args=(r, spec)) for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        reference = one_process(cfg, data)
    finally:
        for p in procs:
            p.join(WORKER_TIMEOUT_S)
            if p.is_alive():
                p.kill()
    for r, p in enumerate(procs):
        err = tmp / f"rank{r}.err"
        assert p.exitcode == 0, (
            err.read_text()[-3000:] if err.exists() else f"rank {r}: exit code {p.exitcode}"
        )
    results = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return results, {**reference, "plan_json": Path(cfg.out, "plan.json").read_text()}


def test_both_ranks_derive_the_same_plan(runs: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
    ranks, _ = runs
    assert ranks[0]["plan"] == ranks[1]["plan"] and ranks[0]["digest"] == ranks[1]["digest"]
    assert ranks[0]["report"] == ranks[1]["report"]
    report = ranks[0]["report"]
    assert report["budget_met"]
    assert (report["world_size"], report["effective_batch"]) == (WORLD, WORLD * RANK_BATCH)


def test_only_rank_0_writes(runs: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
    ranks, _ = runs
    assert ranks[1]["writes"] == []
    assert {"atomic_save", "atomic_write_text", "append_log", "save"} <= set(ranks[0]["writes"])


def _overlap(a: KeepPlan, b: KeepPlan) -> tuple[int, float]:
    """(largest kept-size difference of a group, Jaccard overlap of all kept (group, index) pairs)."""
    da, db = a.as_dict(), b.as_dict()
    size_gap = max(abs(len(da[g]) - len(db[g])) for g in da)
    sa = {(g, i) for g, idx in da.items() for i in idx}
    sb = {(g, i) for g, idx in db.items() for i in idx}
    return size_gap, len(sa & sb) / len(sa | sb)


def test_matches_one_process_with_the_same_global_batch(
    runs: tuple[list[dict[str, Any]], dict[str, Any]],
) -> None:
    ranks, reference = runs
    two = KeepPlan.from_json(ranks[0]["plan"])
    size_gap, jaccard = _overlap(two, KeepPlan.from_json(reference["plan_json"]))
    assert size_gap <= 1 and jaccard >= 0.95, (size_gap, jaccard)
    np.testing.assert_allclose(
        ranks[0]["report"]["accuracy_curve"], reference["accuracy_curve"], atol=1 / 360
    )
    assert ranks[0]["report"]["params_slim"] == pytest.approx(reference["params_slim"], rel=0.01)


def test_tampered_gates_fail_on_every_rank(runs: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
    ranks, _ = runs
    assert all("keep plan (keep-ratio update before step" in r["tamper"] for r in ranks)
    assert all("diverged across ranks: rank(s) [1] differ from rank 0" in r["tamper"] for r in ranks)


def test_dead_rank_stops_the_run_and_the_checkpoint_resumes(
    runs: tuple[list[dict[str, Any]], dict[str, Any]],
) -> None:
    ranks, _ = runs
    assert ranks[1]["crash"] == "crashed"
    message = ranks[0]["crash"]
    assert "rank 0 of 2 lost contact with the other ranks" in message and "--resume" in message
    assert ranks[0]["checkpoint_epoch"] == 1  # the last complete checkpoint, and the resume finished
    assert ranks[0]["report"]["accuracy_curve"] and ranks[0]["report"]["budget_met"]


# --- single-process pieces (no process group) ------------------------------------------------------------


@pytest.mark.parametrize(("world", "batch"), [(1, 64), (2, 32), (8, 128)])
def test_lr_scales_with_the_effective_batch(world: int, batch: int) -> None:
    cfg = PruneConfig(batch_size=batch, lr=5e-4, world_size=world)
    assert cfg.effective_batch == batch * world
    assert cfg.scaled_lr == pytest.approx(5e-4 * batch * world / 512)


def test_resume_on_another_world_size_is_refused(tmp_path: Path) -> None:
    saved = PruneConfig(world_size=4).to_dict()
    with pytest.raises(CheckpointError, match=r"4 process\(es\), this one has 2"):
        train.check_resume_config(saved, PruneConfig(world_size=2), tmp_path / "checkpoint.pt")
    train.check_resume_config(saved, PruneConfig(world_size=4, dist_timeout=5.0), tmp_path)  # timeout is free


@pytest.mark.parametrize(("size", "world"), [(10, 1), (10, 3), (7, 2), (1, 4)])
def test_evaluation_shards_cover_every_sample_once(size: int, world: int) -> None:
    shards = [list(distributed.ShardSampler(size, world, r)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(size))
    assert [len(distributed.ShardSampler(size, world, r)) for r in range(world)] == [len(s) for s in shards]


def test_without_a_process_group_everything_is_a_no_op() -> None:
    assert not distributed.is_active() and distributed.is_main_process() and distributed.world_size() == 1
    loaders = (DataLoader(TensorDataset(torch.zeros(4, 1))), DataLoader(TensorDataset(torch.zeros(2, 1))))
    assert distributed.shard_loaders(loaders, seed=0) is loaders
    assert distributed.sum_over_ranks([1, 2.5]) == [1.0, 2.5] and distributed.on_main(lambda: 7, "x") == 7
    gate = torch.ones(3, requires_grad=True)
    gate.grad = torch.full((3,), 2.0)
    distributed.average_gradients([gate])
    distributed.check_same_plan({"g": gate}, {"g": 3}, "test")
    assert gate.grad.tolist() == [2.0, 2.0, 2.0]


def test_plan_digest_sees_one_gate_value() -> None:
    gates = {"a": torch.ones(4), "b": torch.linspace(0, 1, 5)}
    before = distributed.plan_digest(gates, {"a": 4, "b": 3})
    gates["b"][2] += 1e-6
    assert distributed.plan_digest(gates, {"a": 4, "b": 3}) != before
    assert distributed.plan_digest({"a": torch.ones(4)}, {"a": 4}) != distributed.plan_digest(
        {"a": torch.ones(4)}, {"a": 3}
    )


@pytest.mark.parametrize(
    ("env", "match"),
    [({"WORLD_SIZE": "two"}, "WORLD_SIZE='two'"), ({"WORLD_SIZE": "2", "RANK": "2"}, "inconsistent")],
)
def test_a_broken_torchrun_environment_is_named(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], match: str
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=match):
        distributed.init_from_env("cpu", 1.0)


def test_a_stray_rank_variable_alone_keeps_a_single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env("cpu", 1.0) == distributed.DistContext()
    assert distributed.is_main_process() and distributed.rank() == 0


def test_global_baselines_are_refused_under_torchrun() -> None:
    ctx = distributed.DistContext(rank=0, world_size=2, backend="gloo")
    with pytest.raises(ConfigError, match="single-process"):
        train._with_world_size(PruneConfig(method="global-taylor"), ctx)
    assert train._with_world_size(PruneConfig(), ctx).world_size == 2


# --- CUDA / NCCL -----------------------------------------------------------------------------------------

GPU_WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist
    from p3b_fx import distributed, train
    from p3b_fx.config import PruneConfig

    spec = json.loads(sys.argv[1])
    if spec["self_init"]:  # one GPU: NCCL cannot hold two ranks on one device, so a group of one
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}",
                                rank=0, world_size=1, device_id=torch.device("cuda", 0))
    seen = []
    real_finish = train.Loop.finish
    def finish(self):  # inside the run, while its process group is up
        plan = real_finish(self)
        seen.append((distributed.plan_digest(self.pruner.bank.gates(), self.pruner.kept),
                     str(dist.get_backend()), type(self.net).__name__, str(self.device)))
        return plan
    train.Loop.finish = finish
    report = train.run(PruneConfig(**spec["config"]))
    digest, backend, net, device = seen[-1]
    out = {"digest": digest, "world_size": report["world_size"], "budget_met": report["budget_met"],
           "backend": backend, "net": net, "device": device}
    open(os.path.join(spec["results"], f"gpu{os.environ.get('RANK', '0')}.json"), "w").write(json.dumps(out))
    if spec["self_init"]:
        dist.destroy_process_group()
    """
)


@pytest.mark.gpu
def test_nccl_run_on_gpus(tmp_path: Path) -> None:
    """Two NCCL ranks where there are two GPUs; a group of one NCCL rank on a single GPU."""
    world = min(torch.cuda.device_count(), 2)
    config = {**CONFIG, "device": "cuda", "data": "digits", "out": str(tmp_path / "run"), "amp": True}
    spec = {"config": config, "results": str(tmp_path), "self_init": world == 1}
    env = os.environ | {"WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_ports(1)[0]), "PYTHONPATH": str(REPO)}  # fmt: skip
    if world == 1:
        env = {k: v for k, v in env.items() if k != "WORLD_SIZE"}
    procs = [
        subprocess.Popen([sys.executable, "-c", GPU_WORKER, json.dumps(spec)],
                         env=env | {"RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE)
        for r in range(world)
    ]  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=WORKER_TIMEOUT_S)
        assert p.returncode == 0, err.decode()[-3000:]
    results = [json.loads((tmp_path / f"gpu{r}.json").read_text()) for r in range(world)]
    assert all(r["backend"] == "nccl" and r["world_size"] == world and r["budget_met"] for r in results)
    assert [(r["net"], r["device"]) for r in results] == [
        ("DistributedDataParallel", f"cuda:{r}") for r in range(world)
    ]
    assert len({r["digest"] for r in results}) == 1


DDP_PROBES_WORKER = textwrap.dedent(
    """
    import copy, sys, tempfile
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from p3b_fx import distributed
    from p3b_fx.benefit import BenefitProbes

    store = dist.FileStore(tempfile.mktemp(), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    torch.manual_seed(0)
    per_block = BenefitProbes(3, 16, 5, grid_size=3, num_prefix_tokens=1, has_class_token=True, hidden=8)
    grouped = copy.deepcopy(per_block)
    grouped.grouped = True
    feats = [torch.randn(4, 10, 16) for _ in range(4)]
    labels = torch.arange(4) % 5
    grads = []
    for probes in (per_block, grouped):
        net = distributed.wrap(probes, torch.device("cpu"))
        assert isinstance(net, DistributedDataParallel), type(net)
        net(feats, labels).loss.backward()
        grads.append({n: p.grad for n, p in probes.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        assert g is not None and grads[1][n] is not None, n
        torch.testing.assert_close(grads[1][n], g, msg=n)
    dist.destroy_process_group()
    print("ok")
    """
)


def test_grouped_probes_train_under_ddp(tmp_path: Path) -> None:
    """DDP around the grouped probes (their weights are concatenated inside forward) still reduces
    every probe parameter's gradient, equal to the per-block probes' (a gloo group of one rank, in a
    subprocess so this process keeps no process group)."""
    env = os.environ | {"PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", DDP_PROBES_WORKER], env=env, capture_output=True,
                          text=True, timeout=WORKER_TIMEOUT_S, check=False, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


DDP_COMPILE_WORKER = textwrap.dedent(
    """
    import copy, tempfile
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel
    import p3b_fx
    from p3b_fx import distributed, train
    from p3b_fx.config import PruneConfig

    store = dist.FileStore(tempfile.mktemp(), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    torch.manual_seed(0)
    kwargs = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 7}
    cfg = PruneConfig(model="vit_tiny_patch16_224", model_kwargs=kwargs, data="digits", num_classes=7,
                      device="cpu", torch_compile="default")
    model = train.build_model(cfg).train()
    x, y = torch.randn(4, 3, 16, 16), torch.arange(4) % 7
    grads = []
    for mode in ("off", "default"):
        gm = p3b_fx.trace(copy.deepcopy(model))
        groups = p3b_fx.find_groups(gm)
        masked, bank = p3b_fx.insert_masks(gm, groups, share_parameters=True)
        taps = train.tap(masked, groups)
        p3b_fx.fold_masks(masked)
        bank.scoring(True)
        net = distributed.wrap(train.compiled(masked, cfg.replace(torch_compile=mode), torch.device("cpu"),
                                              fullgraph=True), torch.device("cpu"))  # as train.Loop does
        assert isinstance(net, DistributedDataParallel), type(net)
        with train.compile_errors("the masked model"):
            F.cross_entropy(net(x), y).backward()
        assert len(taps.take()) == taps.count  # the taps recorded through the compiled graph
        grads.append({**{n: p.grad for n, p in masked.named_parameters()},
                      **{n: g.grad for n, g in bank.gates().items()}})
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        assert g is not None and grads[1][n] is not None, n
        torch.testing.assert_close(grads[1][n], g, atol=1e-6, rtol=1e-4, msg=n)
    dist.destroy_process_group()
    print("ok")
    """
)


@pytest.mark.slow
def test_torch_compile_trains_the_masked_model_under_ddp(tmp_path: Path) -> None:
    """--torch-compile under torchrun: DDP around the masked model compiled whole (fullgraph; DDP's
    own forward would break the graph): its gradients, gates' included, equal eager DDP's (a gloo
    group of one rank, in a subprocess)."""
    env = os.environ | {"PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", DDP_COMPILE_WORKER], env=env, capture_output=True,
                          text=True, timeout=WORKER_TIMEOUT_S, check=False, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
