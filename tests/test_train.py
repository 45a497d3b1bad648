"""The P3B training loop end to end on a tiny ViT and sklearn digits (each run a few seconds)."""

from __future__ import annotations

import copy
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import p3b_fx
from p3b_fx import benefit, train
from p3b_fx import budget as budget_mod
from p3b_fx.benefit import BenefitProbes, BlockwiseProbes
from p3b_fx.config import PruneConfig
from p3b_fx.core.plan import KeepPlan
from p3b_fx.errors import CheckpointError, ConfigError, DataError, TrainingError
from tools import prune as prune_cli

TINY = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 7}
REPORT_FIELDS = (
    "method", "prune_ratio", "budget", "params_dense", "params_slim", "flops_dense", "flops_slim",
    "top1_before_pruning", "top1", "keep_ratios", "plan",
)  # fmt: skip


def tiny_config(out: Path, **changes: Any) -> PruneConfig:
    base: dict[str, Any] = {
        "model": "vit_tiny_patch16_224", "model_kwargs": TINY, "data": "digits", "num_classes": 10,
        "epochs": 2, "batch_size": 32, "lr": 4e-3, "probe": "patch_linear", "max_steps_per_epoch": 5,
        "updates_per_epoch": 2, "out": str(out), "device": "cpu", "prune_ratio": 0.5, "seed": 3,
    }  # fmt: skip
    base.update(changes)
    return PruneConfig(**base)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def p3b_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[PruneConfig, dict[str, Any]]:
    torch.set_num_threads(1)
    cfg = tiny_config(tmp_path_factory.mktemp("p3b") / "run", finetune_epochs=1)
    return cfg, train.run(cfg)


def test_report_has_every_field_and_is_written(p3b_run: tuple[PruneConfig, dict[str, Any]]) -> None:
    cfg, report = p3b_run
    on_disk = json.loads((Path(cfg.out) / "report.json").read_text())
    assert all(key in on_disk for key in REPORT_FIELDS)
    assert on_disk["method"] == "p3b" and on_disk["params_dense"] == report["params_dense"]
    assert set(report["keep_ratios"]) == {"blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"}
    assert 0.0 <= report["top1_before_pruning"] <= 1.0 and 0.0 <= report["top1"] <= 1.0


def test_final_parameters_meet_the_budget(p3b_run: tuple[PruneConfig, dict[str, Any]]) -> None:
    cfg, report = p3b_run
    budget = cfg.keep_ratio * report["params_dense"]
    assert abs(report["params_slim"] / budget - 1) <= 0.01
    slim = torch.load(Path(cfg.out) / "slim.pt", weights_only=False)
    assert sum(p.numel() for p in slim.parameters()) == report["params_slim"]


def test_slim_equals_hard_masked_before_finetuning(p3b_run: tuple[PruneConfig, dict[str, Any]]) -> None:
    cfg, report = p3b_run
    assert report["slim_max_abs_diff"] <= train.SLIM_TOLERANCE
    events = [json.loads(line) for line in (Path(cfg.out) / "log.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events].count("slim") == 1
    assert any(e["event"] == "update" and e["phase"] == "finalize" and e["tau"] == 0.0 for e in events)


def test_log_and_plots(p3b_run: tuple[PruneConfig, dict[str, Any]]) -> None:
    cfg, _ = p3b_run
    out = Path(cfg.out)
    updates = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    updates = [u for u in updates if u["event"] == "update"]
    assert len(updates) >= 3 and all(len(u["keep_ratios"]) == 4 for u in updates)
    assert updates[-1]["sparsity"] > updates[0]["sparsity"]
    assert all(
        (out / name).stat().st_size > 0 for name in ("keep_ratios.png", "block_benefit.png", "accuracy.png")
    )


def test_resume_reaches_the_same_plan(p3b_run: tuple[PruneConfig, dict[str, Any]], tmp_path: Path) -> None:
    cfg, _ = p3b_run
    resumed_cfg = cfg.replace(out=str(tmp_path / "run"))
    partial = train.run(resumed_cfg, stop_after_epoch=1)
    assert partial["finished"] is False and not (tmp_path / "run" / "report.json").exists()
    report = train.run(resumed_cfg.replace(resume=True))
    assert KeepPlan.load(tmp_path / "run" / "plan.json") == KeepPlan.load(Path(cfg.out) / "plan.json")
    assert _events(tmp_path / "run") == _events(Path(cfg.out))  # nothing logged twice
    train.run(resumed_cfg.replace(resume=True))  # resuming a finished run redoes its end, logged once
    assert _events(tmp_path / "run") == _events(Path(cfg.out))
    assert report["params_slim"] == p3b_run[1]["params_slim"]


def test_masks_reallocate_between_updates() -> None:
    """Soft masks are rebuilt from scratch: an element dropped at one update can come back later."""
    gm = p3b_fx.trace(train.build_model(tiny_config(Path("unused"))))
    groups = p3b_fx.find_groups(gm)
    cfg = tiny_config(Path("unused"))
    pruner = _pruner(cfg, gm, groups)
    kappa = pruner.goal(torch.ones(4).numpy())
    hidden = "blocks.0.mlp:hidden"
    scores = {g: torch.rand(gate.numel()).double().numpy() for g, gate in pruner.bank.gates().items()}
    first = pruner.allocate(kappa, scores, 0.1)
    scores[hidden] = scores[hidden].max() + 1 - scores[hidden]  # reverse the order of the hidden scores
    second = pruner.allocate(kappa, scores, 0.1)
    back = ~first.hard[hidden] & second.hard[hidden]
    assert back.any()


def test_a_target_below_the_last_blocks_smallest_configuration_is_taken_up_by_the_others() -> None:
    """Deploy granularity on a two-head ViT: an attention block keeps one head or two. The last
    pruned block (the second attention; the last MLP is not pruned) gets a target nearer one head
    than none, keeps one head and overshoots, and no later block can take the difference up. The
    second pass carries it into the first pruned blocks: together the blocks meet their target cost
    within one hidden neuron, where one pass missed it by the whole overshoot."""
    cfg = tiny_config(Path("unused"), granularity="deploy", round_to=1)
    gm = p3b_fx.trace(train.build_model(cfg))
    groups = p3b_fx.find_groups(gm)
    pruner = _pruner(cfg, gm, groups)
    assert [b.name for b in groups.blocks] == [
        "blocks.0.attn",
        "blocks.0.mlp",
        "blocks.1.attn",
        "blocks.1.mlp",
    ]
    one_head = pruner.costs.block_cost("blocks.1.attn", {"blocks.1.attn:heads": 1}) / pruner.dense[2]
    kappa = np.array([one_head, 0.5, 0.6 * one_head, 1.0])
    scores = {g: torch.rand(gate.numel(), generator=torch.Generator().manual_seed(0)).double().numpy()
              for g, gate in pruner.bank.gates().items()}  # fmt: skip
    target = float((kappa * pruner.dense).sum())
    one_pass = pruner._allocate(kappa, scores, 0.1, 0.0)
    overshoot = sum(one_pass.block_cost) - target
    assert overshoot >= 0.3 * one_head * pruner.dense[2]  # the case this is about: one head kept
    alloc = pruner.allocate(kappa, scores, 0.1)
    assert alloc.block_cost[2] == one_pass.block_cost[2]  # the last pruned block still keeps its head
    neuron = float(pruner.dense[1]) / groups.group("blocks.0.mlp:hidden").size
    assert abs(sum(alloc.block_cost) - target) <= neuron < overshoot


def _pruner(cfg: PruneConfig, gm: Any, groups: Any) -> train.Pruner:
    _, bank = p3b_fx.insert_masks(gm, groups)
    model = train.build_model(cfg)
    probes = train.make_probes(model, groups, 10, cfg)
    return train.Pruner(cfg, groups, bank, train.make_schedule(cfg, 5), probes)


@pytest.mark.parametrize("method", ["uniform", "global-magnitude"])
def test_baselines_run_end_to_end(tmp_path: Path, method: str) -> None:
    report = train.run(tiny_config(tmp_path / method, method=method))
    assert report["method"] == method
    assert abs(report["params_slim"] / (0.5 * report["params_dense"]) - 1) <= 0.02
    if method == "uniform":
        ratios = list(report["keep_ratios"].values())
        assert max(ratios) - min(ratios) < 0.1


def test_budget_no_plan_can_meet_fails_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="non-block cost alone"):
        train.run(tiny_config(tmp_path / "run", prune_ratio=0.97))
    assert not any((tmp_path / "run" / name).exists() for name in train.RUN_FILES)  # rerun needs no --force


PARALLEL = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}


def test_p3b_prunes_parallel_blocks(tmp_path: Path) -> None:
    """Parallel blocks (``x + stack([attn_0(x), attn_1(x)]).sum(0)``): each lane's heads and hidden
    neurons are gates of the one block, the written channels one gate over both lanes. The budget
    is met and the slim model equals the hard-masked one (before lanes, only the read gate was
    prunable, and the most this model could shed was 28.7 %)."""
    cfg = tiny_config(tmp_path / "run", model="vit_small_patch16_18x2_224", model_kwargs=PARALLEL,
                      prune_ratio=0.5, finetune_epochs=0)  # fmt: skip
    report = train.run(cfg)
    assert report["budget_met"] and report["slim_max_abs_diff"] <= train.SLIM_TOLERANCE
    shrunk = p3b_fx.KeepPlan.load(tmp_path / "run" / "plan.json").as_dict()
    assert any(name.endswith("'") for name in shrunk), sorted(shrunk)  # a second lane's gate was cut


def test_a_prune_ratio_beyond_what_the_prunable_groups_can_shed_fails_before_training(tmp_path: Path) -> None:
    """XCiT's class-attention blocks cannot be removed exactly (their written channels join the
    class token back by a ``cat``, which has no channel rule), so at the deploy granularity they keep
    a head and a hidden neuron each and their read and written channels whole: a ratio the gates
    cannot reach is refused before anything is written (it can remove at most 79.3 %)."""
    xcit = {"img_size": 32, "depth": 1}
    cfg = tiny_config(tmp_path / "run", model="xcit_nano_12_p16_224", model_kwargs=xcit, prune_ratio=0.8,
                      granularity="deploy")  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"can remove at most \d+\.\d% of its params.*--prune-ratio 0\.\d\d or less"
    ):
        train.run(cfg)
    assert not any((tmp_path / "run" / name).exists() for name in train.RUN_FILES)


def test_p3b_runs_on_class_attention_blocks_with_their_own_probes(tmp_path: Path) -> None:
    """CaiT's main blocks carry the patch tokens alone and its class-attention blocks the class token
    alone: each block gets the probe its stream has, the log says which (null for the other), and
    the run ends like any other (budget met, slim model equal to the hard-masked one)."""
    cfg = tiny_config(tmp_path / "run", model="cait_xxs24_224", model_kwargs={**PARALLEL, "depth": 1},
                      prune_ratio=0.3, finetune_epochs=1)  # fmt: skip
    report = train.run(cfg)
    assert report["budget_met"] and report["slim_max_abs_diff"] <= train.SLIM_TOLERANCE
    events = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    update = next(e for e in events if e["event"] == "update")
    # blocks.0.attn, blocks.0.mlp, then the attention and MLP of CaiT's two class-attention blocks
    token_only = [i for i, name in enumerate(report["keep_ratios"]) if name.startswith("blocks_token_only")]
    assert token_only and all(update["benefit_patch"][i] is None for i in token_only)
    assert all(
        update["benefit_cls"][i] is None for i in range(len(update["benefit_cls"])) if i not in token_only
    )
    assert all(update["benefit_patch"][i] is not None for i in range(token_only[0]))
    assert (tmp_path / "run" / "block_benefit.png").is_file()


def test_p3b_runs_on_swin_spatial_streams(tmp_path: Path) -> None:
    """Swin's blocks read (batch, h, w, dim) streams, and patch merging halves the grid between
    stages: each block gets a patch probe over its own grid (no class token), every block has a
    benefit, and the run ends like any other (budget met, slim equal to hard-masked)."""
    swin = {"img_size": 56, "embed_dim": 16, "depths": [2, 2], "num_heads": [1, 2]}
    cfg = tiny_config(tmp_path / "run", model="swin_tiny_patch4_window7_224", model_kwargs=swin,
                      probe="patch_conv", prune_ratio=0.3, finetune_epochs=1)  # fmt: skip
    report = train.run(cfg)
    assert report["budget_met"] and report["slim_max_abs_diff"] <= train.SLIM_TOLERANCE
    events = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    update = next(e for e in events if e["event"] == "update")
    assert len(update["benefit_patch"]) == 8 and all(b is not None for b in update["benefit_patch"])
    assert update["benefit_cls"] is None


def test_a_stream_p3b_cannot_read_is_refused_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(train, "_token_layout", lambda *_args: None)
    with pytest.raises(
        ConfigError, match=r"cannot tell which of the \d+ tokens of block 'blocks.0.attn'.*uniform"
    ):
        train.run(tiny_config(tmp_path / "run"))
    assert not any((tmp_path / "run" / name).exists() for name in train.RUN_FILES)


@pytest.mark.parametrize(
    ("tokens", "prefix", "grid", "cls", "expected"),
    [
        (17, 1, (4, 4), True, (1, (4, 4), True)),  # a plain ViT's stream
        (16, 1, (4, 4), True, (0, (4, 4), False)),  # CaiT / XCiT main blocks: no class token yet
        (1, 1, (4, 4), True, (1, None, True)),  # CaiT class-attention blocks: the class token alone
        (5, 1, (4, 4), True, (1, (2, 2), True)),  # a PiT stage after pooling
        (4, 0, None, False, (0, (2, 2), False)),  # a LeViT stage
        (21, 5, (4, 4), True, (5, (4, 4), True)),  # class + 4 register tokens
        (7, 1, None, True, None),  # 6 or 7 tokens fill no square grid
    ],
)
def test_token_layouts(
    tokens: int, prefix: int, grid: tuple[int, int] | None, cls: bool, expected: tuple[Any, ...] | None
) -> None:
    model = torch.nn.Module()
    model.num_prefix_tokens = prefix  # type: ignore[assignment]
    model.cls_token = torch.nn.Parameter(torch.zeros(1, 1, 8)) if cls else None  # type: ignore[assignment]
    model.patch_embed = SimpleNamespace(grid_size=grid)  # type: ignore[assignment]
    layout = train._token_layout(model, tokens, 8)
    got = None if layout is None else (layout.num_prefix_tokens, layout.grid, layout.has_class_token)
    assert got == expected


def test_class_count_mismatch_suggests_num_classes(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--num-classes 10"):
        train.run(tiny_config(tmp_path / "run", num_classes=None))


@pytest.mark.parametrize("content", [None, b"not a checkpoint at all"])
def test_missing_or_corrupt_checkpoint(tmp_path: Path, content: bytes | None) -> None:
    ckpt = tmp_path / "weights.pt"
    if content is not None:
        ckpt.write_bytes(content)
    with pytest.raises(CheckpointError, match=str(ckpt.name)):
        train.run(tiny_config(tmp_path / "run", checkpoint=str(ckpt)))


def test_output_dir_of_another_run_is_refused(p3b_run: tuple[PruneConfig, dict[str, Any]]) -> None:
    cfg, _ = p3b_run
    before = (Path(cfg.out) / "report.json").read_text()
    with pytest.raises(ConfigError, match=r"--resume.*--force"):
        train.run(cfg)
    assert (Path(cfg.out) / "report.json").read_text() == before


def test_resume_without_checkpoint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        train.run(tiny_config(tmp_path / "run", resume=True))


def test_nan_loss_stops_and_keeps_the_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    armed = {"on": False}
    real_ce: Callable[..., torch.Tensor] = train.F.cross_entropy
    real_save = train.Loop.save_checkpoint

    def ce(*args: Any, **kwargs: Any) -> torch.Tensor:
        loss = real_ce(*args, **kwargs)
        return loss * float("nan") if armed["on"] else loss

    def save(self: train.Loop) -> None:
        real_save(self)
        armed["on"] = True

    monkeypatch.setattr(train.F, "cross_entropy", ce)
    monkeypatch.setattr(train.Loop, "save_checkpoint", save)
    with pytest.raises(TrainingError, match=r"loss became nan.*checkpoint is kept"):
        train.run(tiny_config(tmp_path / "run"))
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 1


def test_nan_loss_in_plain_fine_tuning_stops_and_keeps_the_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fine-tuning loop (dense, and the slim model's fine-tuning) reads its loss once per step,
    after the optimiser step: a NaN still stops the run, and the epoch checkpoint on disk stays."""
    calls = {"n": 0}
    real_ce: Callable[..., torch.Tensor] = train.F.cross_entropy

    def ce(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        loss = real_ce(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 5 else loss  # 5 steps per epoch: epoch 2 fails

    monkeypatch.setattr(train.F, "cross_entropy", ce)
    with pytest.raises(TrainingError, match=r"loss became nan at step 5.*checkpoint is kept"):
        train.run(tiny_config(tmp_path / "run", method="dense"))
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert len(state["accuracy"]) == 1


def test_cli_help_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        prune_cli.main(["--help"])
    assert exc.value.code == 0 and "--prune-ratio" in capsys.readouterr().out
    assert prune_cli.main(["--prune-ratio", "1.2", "--out", "/nonexistent/x"]) != 0
    assert "prune ratio 1.2" in capsys.readouterr().err


def test_finetune_resume_continues_the_slim_finetuning(tmp_path: Path) -> None:
    """An interrupted slim fine-tuning resumes from its epoch checkpoint and ends like a straight run."""
    straight = train.run(tiny_config(tmp_path / "straight", finetune_epochs=2))
    cfg = tiny_config(tmp_path / "split", finetune_epochs=2)
    stopped = train.run(cfg, stop_after_epoch=cfg.epochs + 1)
    assert stopped["finished"] is False and (tmp_path / "split" / "finetune.pt").is_file()
    assert not (tmp_path / "split" / "report.json").exists()
    resumed = train.run(cfg.replace(resume=True))
    assert resumed["accuracy_curve"] == straight["accuracy_curve"]
    assert resumed["top1"] == straight["top1"] and resumed["params_slim"] == straight["params_slim"]


def test_dense_checkpoints_every_epoch_and_resumes(tmp_path: Path) -> None:
    straight = train.run(tiny_config(tmp_path / "straight", method="dense", finetune_epochs=1))
    cfg = tiny_config(tmp_path / "split", method="dense", finetune_epochs=1)
    assert train.run(cfg, stop_after_epoch=2)["finished"] is False
    resumed = train.run(cfg.replace(resume=True))
    assert resumed["accuracy_curve"] == straight["accuracy_curve"]


def test_finetune_lr_decays_to_zero() -> None:
    assert train.decay_factor(0, 10) == 1.0
    assert train.decay_factor(5, 10) == pytest.approx(0.5)
    assert train.decay_factor(10, 10) == pytest.approx(0.0)
    cfg = tiny_config(Path("unused"), finetune_epochs=3)
    assert train.finetune_decay(cfg) == 3
    assert train.finetune_decay(cfg.replace(lr_decay="constant")) == 0
    with pytest.raises(ConfigError, match="lr_decay"):
        cfg.replace(lr_decay="step")


@pytest.mark.parametrize("every", [1, 3, 7])
def test_probe_every_leaves_no_window_without_a_sample(every: int) -> None:
    cfg = tiny_config(Path("unused"), probe_every=every, epochs=4, updates_per_epoch=3)
    schedule = train.make_schedule(cfg, 5)
    fake = SimpleNamespace(cfg=cfg, pruner=SimpleNamespace(schedule=schedule))
    probed = {s for s in range(schedule.total_steps) if train.Loop.probes_run(fake, s)}  # type: ignore[arg-type]
    assert {u - 1 for u in schedule.update_steps()} <= probed
    assert set(range(0, schedule.total_steps, every)) <= probed
    if every == 1:
        assert probed == set(range(schedule.total_steps))


def test_conv_probe_every_third_step_runs_and_meets_the_budget(tmp_path: Path) -> None:
    report = train.run(tiny_config(tmp_path / "run", probe="patch_conv", probe_hidden=8, probe_every=3))
    assert report["budget_met"]
    assert abs(report["params_slim"] / (0.5 * report["params_dense"]) - 1) <= 0.01


def test_bfloat16_probes_run_in_bfloat16_and_meet_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--probe-dtype bfloat16: the probe forward runs under bf16 autocast, ΔΨ stays float32."""
    seen: list[torch.dtype] = []
    real = train.Pruner.__init__

    def spy(self: train.Pruner, *args: Any, **kwargs: Any) -> None:
        real(self, *args, **kwargs)
        conv = next(m for m in self.probes.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))

    monkeypatch.setattr(train.Pruner, "__init__", spy)
    cfg = tiny_config(tmp_path / "run", probe="patch_conv", probe_hidden=8, probe_dtype="bfloat16")
    report = train.run(cfg)
    assert report["budget_met"]
    assert seen and set(seen) == {torch.bfloat16}
    with pytest.raises(ConfigError, match="probe dtype"):
        tiny_config(tmp_path / "x", probe_dtype="float16")


def test_probe_samples_is_the_rounded_up_share_of_the_batch_and_at_least_two() -> None:
    assert train.probe_samples(64, 1.0) == 64
    assert train.probe_samples(64, 0.25) == 16
    assert train.probe_samples(30, 0.1) == 3  # 0.1 · 30 is 3.0000000000000004 in floats
    assert train.probe_samples(31, 0.1) == 4
    assert train.probe_samples(10, 0.01) == 2  # BatchNorm needs two samples
    assert train.probe_samples(1, 0.5) == 1


def test_probes_read_the_first_share_of_each_batch_and_the_run_meets_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--probe-fraction 0.25 with a batch of 32: the probes see 8 samples (features and labels) on
    every step, the model all 32; the run still meets the budget."""
    seen: list[tuple[int, int]] = []
    real = train.Pruner.__init__

    def spy(self: train.Pruner, *args: Any, **kwargs: Any) -> None:
        real(self, *args, **kwargs)
        self.probes.register_forward_pre_hook(lambda _m, a: seen.append((a[0][0].shape[0], a[1].shape[0])))

    monkeypatch.setattr(train.Pruner, "__init__", spy)
    report = train.run(tiny_config(tmp_path / "run", probe="patch_conv", probe_hidden=8, probe_fraction=0.25))
    assert report["budget_met"]
    assert seen and set(seen) == {(8, 8)}
    assert len(seen) == 2 * 5  # every step of both epochs
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="probe_fraction"):
            tiny_config(tmp_path / "x", probe_fraction=bad)


def test_resume_config_check_frees_how_and_fills_what_predates(tmp_path: Path) -> None:
    """A resumed run may switch the probe implementation (same function) or the device; an option
    its checkpoint predates counts as that option's default; any other change is refused."""
    saved = PruneConfig(probe_impl="per-block", device="cpu").to_dict()
    train.check_resume_config(saved, PruneConfig(probe_impl="grouped", device="cuda"), tmp_path)
    older = {k: v for k, v in PruneConfig().to_dict().items() if k not in ("probe_impl", "probe_dtype")}
    train.check_resume_config(older, PruneConfig(), tmp_path)
    with pytest.raises(CheckpointError, match=r"other options \(probe_dtype='float32'\)"):
        train.check_resume_config(older, PruneConfig(probe_dtype="bfloat16"), tmp_path)
    with pytest.raises(CheckpointError, match=r"other options \(epochs=10\)"):
        train.check_resume_config(saved, PruneConfig(epochs=3), tmp_path)


@pytest.mark.parametrize(("impl", "grouped"), [("auto", False), ("per-block", False), ("grouped", True)])
def test_probe_impl_picks_how_conv_probes_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, impl: str, grouped: bool
) -> None:
    """--probe-impl: auto runs per block on the CPU, grouped runs the grouped convolutions; both
    reach the budget."""
    calls: list[int] = []
    real = benefit.grouped_conv_probes

    def spy(probes: Any, maps: Any) -> Any:
        calls.append(len(probes))
        return real(probes, maps)

    monkeypatch.setattr(benefit, "grouped_conv_probes", spy)
    cfg = tiny_config(tmp_path / "run", probe="patch_conv", probe_hidden=8, probe_impl=impl)
    report = train.run(cfg)
    assert report["budget_met"]
    assert bool(calls) == grouped
    assert train.probe_grouped(cfg, torch.device("cuda")) == (impl != "per-block")
    with pytest.raises(ConfigError, match="probe implementation"):
        tiny_config(tmp_path / "x", probe_impl="fused")


@pytest.mark.parametrize("blocks_only", [False, True])
def test_flops_budget_end_to_end(tmp_path: Path, blocks_only: bool) -> None:
    """A FLOPs budget: the slim model's MACs (not its parameters) meet the keep ratio."""
    cfg = tiny_config(tmp_path / "run", budget="flops", blocks_only=blocks_only)
    report = train.run(cfg)
    assert report["budget_met"] and report["budget"] == "flops"
    groups = p3b_fx.find_groups(p3b_fx.trace(train.build_model(cfg)))
    plan = KeepPlan.load(report["plan"])
    kept = plan.kept_sizes(groups)
    blocks = sum(groups.block_flops(b, kept) for b in groups.blocks)
    dense_blocks = sum(groups.block_flops(b) for b in groups.blocks)
    if blocks_only:
        assert abs(blocks / (0.5 * dense_blocks) - 1) <= 0.01
    else:
        assert abs(report["flops_slim"] / (0.5 * report["flops_dense"]) - 1) <= 0.01


def test_a_blocks_only_report_names_the_parameters_it_aimed_at(tmp_path: Path) -> None:
    """With --blocks-only the report's parameter budget is the blocks' share at the keep ratio plus
    the parameters outside the blocks (which the run never prunes), not the keep ratio of the whole
    model; the slim model meets it."""
    cfg = tiny_config(tmp_path / "run", blocks_only=True)
    report = train.run(cfg)
    groups = p3b_fx.find_groups(p3b_fx.trace(train.build_model(cfg)))  # its head is not resized yet
    blocks = float(
        budget_mod.dense_costs(budget_mod.cost_model_from_groups(groups, budget_mod.BudgetUnit.PARAMS)).sum()
    )
    outside = report["params_dense"] - blocks  # the embedding and the head the run resized to 10 classes
    assert outside > 0.05 * blocks  # enough to tell the two budgets apart
    assert report["budget_params"] == round(0.5 * blocks + outside)
    assert report["budget_met"] and abs(report["params_slim"] / report["budget_params"] - 1) <= 0.01


def test_global_baselines_refuse_a_flops_budget() -> None:
    with pytest.raises(ConfigError, match="parameter budget"):
        tiny_config(Path("unused"), method="global-taylor", budget="flops")


def test_a_hybrid_vit_traces_with_image_channels_not_cnn_features(tmp_path: Path) -> None:
    """A hybrid's patch projection reads the CNN's features (256 channels here), not the image's 3."""
    cfg = tiny_config(tmp_path / "run", model="vit_tiny_r_s16_p8_224", model_kwargs={"img_size": 32})
    prep = train.prepare(cfg, None, None)
    assert tuple(prep.gm.meta["p3b.input_shape"]) == (1, 3, 32, 32) and prep.groups.blocks


@pytest.mark.parametrize("method", ["global-taylor", "global-magnitude"])
def test_torch_pruning_on_an_architecture_it_cannot_follow_fails_before_training(
    tmp_path: Path, method: str
) -> None:
    """Per-head relative position biases break Torch-Pruning's graph: a clear error, nothing written."""
    cfg = tiny_config(tmp_path / "run", model="vit_relpos_small_patch16_224", model_kwargs=PARALLEL,
                      method=method, prune_ratio=0.3)  # fmt: skip
    message = r"Torch-Pruning cannot prune vit_relpos_small_patch16_224.*--method uniform"
    with pytest.raises(ConfigError, match=message):
        train.run(cfg)
    assert not any((tmp_path / "run" / name).exists() for name in train.RUN_FILES)


def test_torch_pruning_is_dry_run_at_the_runs_own_sparsity(tmp_path: Path) -> None:
    """Swin's graph breaks in Torch-Pruning only above a channel ratio of 0.3 (a LayerNorm pruned
    apart from the channels it normalises): the dry run at the prune ratio refuses it before
    training, where one small step passed and the run crashed mid-training with a RuntimeError."""
    swin = {"img_size": 56, "embed_dim": 32, "depths": [2, 2], "num_heads": [2, 4]}
    cfg = tiny_config(tmp_path / "run", model="swin_tiny_patch4_window7_224", model_kwargs=swin,
                      method="global-magnitude", prune_ratio=0.5)  # fmt: skip
    with pytest.raises(ConfigError, match=r"Torch-Pruning cannot prune swin_tiny_patch4_window7_224"):
        train.run(cfg)
    assert not any((tmp_path / "run" / name).exists() for name in train.RUN_FILES)


def _hog(*_args: Any, **_kwargs: Any) -> None:
    """Python code whose memory grows without end (what Torch-Pruning's graph of MaxViT does), for
    at most 30 s."""
    held, start = [], time.monotonic()
    while time.monotonic() - start < 30:
        held.append(bytearray(16 << 20))
        time.sleep(0.01)
    raise AssertionError("the memory limit never stopped the hog")


def test_a_memory_limit_stops_python_code_that_outgrows_it() -> None:
    from p3b_fx import machine  # noqa: PLC0415

    now = machine.resident_bytes()
    if now is None:
        pytest.skip("no /proc/self/statm: the limit cannot be read here")
    with (
        pytest.raises(machine.MemoryLimitExceeded, match="GiB held, limit"),
        machine.memory_limit(now + (300 << 20)),
    ):
        _hog()
    with machine.memory_limit(now + (300 << 20)):
        small = bytearray(1 << 20)  # within the limit: runs as usual
    with machine.memory_limit(None):
        _ = small
    errors: list[BaseException] = []

    def off_main() -> None:  # the interrupt could reach only the main thread: no watcher there
        try:
            with machine.memory_limit(1):
                time.sleep(0.5)
        except BaseException as exc:  # any escape fails the test below
            errors.append(exc)

    worker = threading.Thread(target=off_main)
    worker.start()
    worker.join()
    assert not errors


def test_a_memory_limit_works_where_sigint_is_ignored() -> None:
    """A run started in the background by a shell (``python tools/prune.py ... &``) has SIGINT
    ignored, and the watcher's interrupt did nothing there: the hog ran on. The limit puts Python's
    own handler in place while it guards, and gives the previous one back."""
    import signal  # noqa: PLC0415

    from p3b_fx import machine  # noqa: PLC0415

    now = machine.resident_bytes()
    if now is None:
        pytest.skip("no /proc/self/statm: the limit cannot be read here")
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with (
            pytest.raises(machine.MemoryLimitExceeded),
            machine.memory_limit(now + (300 << 20)),
        ):
            _hog()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_torch_pruning_dry_run_that_outgrows_the_memory_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MaxViT's Torch-Pruning graph grew past 18 GB until the kernel killed the run without a word;
    the dry run now stops at the memory the machine can spare, with the way out."""
    from p3b_fx import baselines, machine  # noqa: PLC0415

    now = machine.resident_bytes()
    if now is None:
        pytest.skip("no /proc/self/statm: the limit cannot be read here")
    monkeypatch.setattr(baselines, "dry_run_memory_limit", lambda: now + (300 << 20))
    monkeypatch.setattr(baselines, "prune_to", _hog)
    with pytest.raises(ConfigError, match=r"dry run on tiny grew past the memory .* --method uniform or p3b"):
        baselines.check_prunable(torch.nn.Linear(2, 2), torch.zeros(1, 2), "tiny")


def test_a_torch_pruning_step_that_breaks_the_model_stops_the_run_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the dry run, a global step that leaves the model unable to run is a TrainingError that
    names the step and the way out, not a RuntimeError from the next forward pass."""
    from p3b_fx import baselines  # noqa: PLC0415

    real = baselines.prune_to

    def breaking(model: torch.nn.Module, example: torch.Tensor, method: str, ratio: float) -> torch.nn.Module:
        real(model, example, method, ratio)
        model.head = torch.nn.Linear(3, 7)  # a width the features do not have
        return model

    monkeypatch.setattr(baselines, "check_prunable", lambda *_args: None)
    monkeypatch.setattr(baselines, "prune_to", breaking)
    cfg = tiny_config(tmp_path / "run", method="global-magnitude", prune_ratio=0.3)
    message = r"global step at step \d+ left vit_tiny_patch16_224 unable to run"
    with pytest.raises(TrainingError, match=message):
        train.run(cfg)


def test_a_nan_loss_stops_a_global_baseline_before_it_prunes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loss that turns NaN on a pruning step stops the run before Torch-Pruning ranks channels by
    NaN gradients (it used to prune first and report the NaN after)."""
    from p3b_fx import baselines  # noqa: PLC0415

    cfg = tiny_config(tmp_path / "run", method="global-taylor", prune_ratio=0.3)
    first = min(baselines.prune_targets(cfg, 1000, int(cfg.max_steps_per_epoch or 0)))
    pruned: list[float] = []
    monkeypatch.setattr(baselines, "prune_to", lambda *a: pruned.append(a[3]) or a[0])
    real, steps = F.cross_entropy, [0]

    def nan_from_first_target(*args: Any, **kwargs: Any) -> torch.Tensor:
        loss = real(*args, **kwargs)
        if loss.requires_grad:
            steps[0] += 1
            if steps[0] > first:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(train.F, "cross_entropy", nan_from_first_target)
    with pytest.raises(TrainingError, match=rf"loss became nan at step {first}"):
        train.run(cfg)
    assert pruned == [0.1, 0.3]  # the dry run's two copies only


@pytest.mark.parametrize("method", ["p3b", "uniform"])
def test_blocks_with_nothing_prunable_leave_the_budget_to_the_others(
    tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EVA-02 base normalises its SwiGLU hidden units (a LayerNorm before fc2). With the rule that
    fixes what a norm normalises over (as it was before such norms were padded, put back here), its
    MLP blocks have no gate at the deploy granularity: the attention blocks (whole heads) shed the
    whole budget, which is met; the MLPs stay dense. Before, water-filling gave the MLPs their share
    of the budget anyway and the run ended with it missed."""
    from passes import axis_rules, track_axes  # noqa: PLC0415

    fixing = {torch.nn.functional.layer_norm: lambda node, t: axis_rules._norm_over_last(node, t, 1)}
    monkeypatch.setattr(track_axes, "_RULES", {**track_axes.rules(), **fixing})
    kwargs = {"img_size": 16, "patch_size": 4, "depth": 2, "embed_dim": 64, "num_heads": 4}
    cfg = tiny_config(tmp_path / "run", model="eva02_base_patch14_224", granularity="deploy",
                      model_kwargs=kwargs, prune_ratio=0.2, method=method)  # fmt: skip
    report = train.run(cfg)
    assert report["budget_met"], report["params_slim"]
    assert report["keep_ratios"]["blocks.0.mlp"] == report["keep_ratios"]["blocks.1.mlp"] == 1.0
    assert max(report["keep_ratios"]["blocks.0.attn"], report["keep_ratios"]["blocks.1.attn"]) < 0.8
    assert report["slim_max_abs_diff"] <= 1e-5


def test_a_granularity_with_nothing_prunable_points_to_the_one_that_has(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the chunk rule EVA-02's SwiGLU hidden units would be fixed, and without the cast rule
    its heads would be (``type_as(v)`` after the rotary embedding would join q to v): deploy (heads +
    hidden) could prune nothing, and says which granularity can."""
    from passes import axis_rules, track_axes  # noqa: PLC0415

    dropped = (axis_rules.chunk, axis_rules.cast)
    rules = {k: v for k, v in track_axes.rules().items() if v not in dropped}
    monkeypatch.setattr(track_axes, "_RULES", rules)
    kwargs = {"img_size": 16, "patch_size": 4, "depth": 1}
    cfg = tiny_config(tmp_path / "run", model="eva02_tiny_patch14_224", granularity="deploy",
                      model_kwargs=kwargs, prune_ratio=0.3)  # fmt: skip
    message = r"nothing is prunable at this granularity, or --granularity reference \(which can remove up to"
    with pytest.raises(ConfigError, match=message):
        train.run(cfg)


def test_pretrained_without_the_hub_says_to_pass_a_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(*_args: Any, **_kwargs: Any) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr("timm.create_model", offline)
    with pytest.raises(ConfigError, match=r"pass the weights as --checkpoint FILE.*drop --pretrained"):
        train.build_model(tiny_config(tmp_path / "run", pretrained=True))


def test_multi_stage_models_get_probes_of_every_stage_width(tmp_path: Path) -> None:
    """LeViT's stages change width and tokens: P3B gives each block probes for its own stream (given
    the traced graph), uniform (no probes run) builds them at the first width."""
    cfg = tiny_config(tmp_path / "run", model="levit_128s", model_kwargs={"img_size": 64}, method="uniform")
    prep = train.prepare(cfg, None, None)
    assert train.make_probes(prep.model, prep.groups, 10, cfg).num_blocks == len(prep.groups.blocks)
    p3b = cfg.replace(method="p3b")
    probes = train.make_probes(prep.model, prep.groups, 10, p3b, prep.gm)
    assert isinstance(probes, BlockwiseProbes) and probes.num_blocks == len(prep.groups.blocks)
    assert sorted({lay.dim for lay in probes.layouts}) == [128, 256, 384]
    assert {lay.grid for lay in probes.layouts} == {(4, 4), (2, 2), (1, 1)}
    with pytest.raises(ConfigError, match=r"pass its traced graph"):
        train.make_probes(prep.model, prep.groups, 10, p3b)


def test_a_plain_vit_keeps_the_batched_probes(p3b_run: tuple[PruneConfig, dict[str, Any]]) -> None:
    cfg, _ = p3b_run
    prep = train.prepare(cfg, None, None)
    assert type(train.make_probes(prep.model, prep.groups, 10, cfg, prep.gm)) is BenefitProbes


@pytest.mark.parametrize("stop", [1, 3])
def test_global_baseline_resumes_while_pruning_and_while_fine_tuning(tmp_path: Path, stop: int) -> None:
    """Torch-Pruning reshapes the model as it goes: its checkpoints hold the whole module, and an
    interrupted run (after pruning epoch 1, or after fine-tuning epoch 1) ends like a straight one."""
    common = {"method": "global-magnitude", "epochs": 2, "finetune_epochs": 2}
    straight = train.run(tiny_config(tmp_path / "straight", **common))
    cfg = tiny_config(tmp_path / "split", **common)
    stopped = train.run(cfg, stop_after_epoch=stop)
    assert stopped["finished"] is False and stopped["epoch"] == stop
    assert (tmp_path / "split" / ("finetune.pt" if stop > 2 else "checkpoint.pt")).is_file()
    resumed = train.run(cfg.replace(resume=True))
    assert resumed["accuracy_curve"] == straight["accuracy_curve"]
    assert (
        resumed["params_slim"] == straight["params_slim"]
        and resumed["prune_steps"] == straight["prune_steps"]
    )
    a = torch.load(tmp_path / "straight" / "slim.pt", weights_only=False).state_dict()
    b = torch.load(tmp_path / "split" / "slim.pt", weights_only=False).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _events(tmp_path / "split") == _events(tmp_path / "straight")


def _events(out: Path) -> list[tuple[Any, ...]]:
    """(event, step, epoch) of every log record: a resumed run logs each exactly once, in order."""
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [(r.get("event"), r.get("step"), r.get("epoch")) for r in records]


def test_force_keeps_the_old_run_when_the_new_one_fails_its_checks(tmp_path: Path) -> None:
    """--force replaces a run only once the new run's inputs have passed every check."""
    out = tmp_path / "run"
    out.mkdir()
    for name in ("run.json", "report.json", "slim.pt", "keep_ratios.png"):
        (out / name).write_text("old")
    with pytest.raises(CheckpointError, match="does not exist"):
        train.run(tiny_config(out, force=True, checkpoint=str(tmp_path / "missing.pt")))
    with pytest.raises(ConfigError, match="reduce-overhead captures CUDA graphs"):  # CPU run
        train.run(tiny_config(out, force=True, torch_compile="reduce-overhead"))
    assert all(
        (out / name).read_text() == "old"
        for name in ("run.json", "report.json", "slim.pt", "keep_ratios.png")
    )


def test_a_run_stopped_before_its_first_checkpoint_says_force(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text("{}")
    (out / "log.jsonl").write_text("")
    with pytest.raises(
        ConfigError, match=r"stopped before its first epoch checkpoint \(run.json, log.jsonl\); pass --force"
    ):
        train.check_out_dir(tiny_config(out))
    with pytest.raises(CheckpointError, match="nothing to resume; start it again with --force"):
        train.check_out_dir(tiny_config(out, resume=True))
    assert "start again with --force" in train.interrupted_hint(out)
    (out / "checkpoint.pt").write_text("x")
    assert "continue with --resume" in train.interrupted_hint(out)


def test_an_output_path_under_a_file_is_refused_before_loading(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is not a writable directory; choose another --out"):
        train.run(tiny_config(tmp_path / "afile" / "sub"))


def test_a_corrupt_checkpoint_says_start_again(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps(tiny_config(out).to_dict()))
    (out / "checkpoint.pt").write_bytes(b"garbage\n")
    with pytest.raises(
        CheckpointError, match=r"corrupt, cut short or not a p3b-fx checkpoint; start the run again"
    ):
        train.run(tiny_config(out, resume=True))


def test_a_checkpoint_of_another_model_lists_what_differs(tmp_path: Path) -> None:
    other = train.build_model(tiny_config(tmp_path, model_kwargs={**TINY, "depth": 1, "embed_dim": 24}))
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(
        CheckpointError, match=r"does not fit --model: tensors \d+ missing \(e.g. blocks.1.*of another shape"
    ):
        train.build_model(tiny_config(tmp_path, checkpoint=str(tmp_path / "other.pt")))


def test_the_torch_pruning_dry_run_does_not_move_the_random_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check before training must not change what training draws (it shifted baseline results)."""
    from p3b_fx import baselines  # noqa: PLC0415

    def config(
        out: Path,
    ) -> PruneConfig:  # the shipped model on MNIST-5k: its augmentation draws from torch's RNG
        return PruneConfig(data="mnist-5k", method="global-magnitude", epochs=2, max_steps_per_epoch=4,
                           lr=5e-3, out=str(out), seed=0, device="cpu")  # fmt: skip
        # CPU: bit-equal runs are asked for, which CUDA's non-deterministic kernels do not promise

    monkeypatch.setattr(baselines, "check_prunable", lambda *_args: None)
    quiet = train.run(config(tmp_path / "quiet"))
    monkeypatch.setattr(baselines, "check_prunable", lambda *_args: torch.rand(1000))  # a check that draws
    drawing = train.run(config(tmp_path / "drawing"))
    assert quiet["accuracy_curve"] == drawing["accuracy_curve"]
    a = torch.load(tmp_path / "quiet" / "slim.pt", weights_only=False).state_dict()
    b = torch.load(tmp_path / "drawing" / "slim.pt", weights_only=False).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _loop(cfg: PruneConfig, model: torch.nn.Module, device: torch.device) -> train.Loop:
    """A Loop over ``model`` in its pruning phase (gates scoring, benefits accumulating)."""
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    masked, bank = p3b_fx.insert_masks(gm, groups, share_parameters=True)
    taps = train.tap(masked, groups)
    p3b_fx.fold_masks(masked)
    probes = train.make_probes(model, groups, TINY["num_classes"], cfg, gm).to(device)
    pruner = train.Pruner(cfg, groups, bank, train.make_schedule(cfg, 100), probes)
    loop = train.Loop(cfg, Path(cfg.out), device, masked.to(device), taps, pruner, (None, None))  # type: ignore[arg-type]
    loop.step = pruner.schedule.warmup_end - 1  # one warm-up step (gates not scoring), then pruning
    return loop


@pytest.mark.parametrize(
    ("device", "mode", "probe_graphs"),
    [("cpu", "default", False), pytest.param("cuda", "default", False, marks=pytest.mark.gpu),
     pytest.param("cuda", "reduce-overhead", False, marks=pytest.mark.gpu),
     pytest.param("cuda", "reduce-overhead", True, marks=pytest.mark.gpu)],
)  # fmt: skip
def test_torch_compile_runs_the_same_p3b_step(
    tmp_path: Path, device: str, mode: str, probe_graphs: bool
) -> None:
    """--torch-compile: three P3B steps (a warm-up one, then two pruning ones; grouped conv probes)
    give the eager run's losses, weights, Taylor scores, block benefits, probe weights and probe
    BatchNorm statistics, up to rounding; the compiled step has no graph break. On CUDA in float32
    (no AMP), so that rounding stays small; with CUDA graphs the taps hold graph outputs that the
    probes must read before the next step overwrites them, and with ``probe_cudagraphs`` the probes'
    own graph frees them (the step copies them first)."""
    torch.manual_seed(0)
    model = train.build_model(tiny_config(tmp_path / "m"))
    dev = torch.device(device)
    loops = {}
    for m in ("off", mode):
        cfg = tiny_config(tmp_path / m, probe="patch_conv", probe_hidden=8, probe_impl="grouped",
                          torch_compile=m, device=device, amp=False,
                          probe_cudagraphs=probe_graphs and m != "off")  # fmt: skip
        torch.manual_seed(1)  # the same probe initialisation
        loops[m] = _loop(cfg, copy.deepcopy(model), dev)
    assert not isinstance(loops["off"].net, torch._dynamo.eval_frame.OptimizedModule)
    assert isinstance(loops[mode].net, torch._dynamo.eval_frame.OptimizedModule)
    gen = torch.Generator().manual_seed(1)
    classes = TINY["num_classes"]
    batches = [(torch.randn(8, 3, 16, 16, generator=gen).to(dev),
                torch.randint(0, classes, (8,), generator=gen).to(dev)) for _ in range(3)]  # fmt: skip
    losses: dict[str, list[float]] = {}
    torch._dynamo.reset()
    for m, loop in loops.items():
        losses[m] = []
        for x, y in batches:
            losses[m].append(loop.train_step(x, y)[0])
            loop.step += 1
    assert losses[mode] == pytest.approx(losses["off"], abs=1e-5)
    eager, comp = loops["off"], loops[mode]
    for states in ([eager.masked.state_dict(), comp.masked.state_dict()],
                   [eager.pruner.probes.state_dict(), comp.pruner.probes.state_dict()]):  # fmt: skip
        for name, a in states[0].items():
            torch.testing.assert_close(states[1][name], a, atol=1e-5, rtol=1e-4, msg=name)
    taylor = eager.pruner.taylor.state_dict(), comp.pruner.taylor.state_dict()
    assert taylor[0]["counts"] == taylor[1]["counts"] and any(taylor[0]["counts"].values())
    for name, a in taylor[0]["sums"].items():
        torch.testing.assert_close(taylor[1]["sums"][name], a, atol=1e-7, rtol=1e-3, msg=name)
    benefit_sums = eager.pruner.benefit.state_dict()["sums"], comp.pruner.benefit.state_dict()["sums"]
    torch.testing.assert_close(benefit_sums[1], benefit_sums[0], atol=1e-5, rtol=1e-4)
    x, y = batches[0]
    comp.taps.recording = True
    assert torch._dynamo.explain(comp.masked)(x).graph_break_count == 0
    feats = [f.detach() for f in comp.taps.take()]
    assert torch._dynamo.explain(comp.pruner.probes)(feats, y).graph_break_count == 0


def test_a_graph_break_in_the_compiled_masked_model_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The masked model compiles whole or not at all: a graph break inside it (here forced in every
    masked Linear, where torch 2.11 broke it and lost gate gradients) stops the step with a
    TrainingError that says --torch-compile off, instead of training on a split graph."""
    from passes import fold_masks  # noqa: PLC0415

    real = fold_masks._compute_dtype

    def breaking(x: torch.Tensor) -> torch.dtype:
        torch._dynamo.graph_break()
        return real(x)

    monkeypatch.setattr(fold_masks, "_compute_dtype", breaking)
    cfg = tiny_config(tmp_path / "run", torch_compile="default")
    loop = _loop(cfg, train.build_model(cfg), torch.device("cpu"))
    torch._dynamo.reset()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, TINY["num_classes"], (4,))
    with pytest.raises(TrainingError, match=r"could not compile the masked model.*--torch-compile off"):
        loop.train_step(x, y)


@pytest.mark.parametrize("whole", [True, False])
def test_compile_errors_name_what_failed_and_the_way_out(whole: bool) -> None:
    """Any torch.compile failure (dynamo's exceptions) becomes a TrainingError naming the module and
    --torch-compile off; only a fullgraph module's message explains the fullgraph rule."""
    expected = r"could not compile the thing: boom\..*--torch-compile off"
    with pytest.raises(TrainingError, match=expected) as err, train.compile_errors("the thing", whole=whole):
        raise torch._dynamo.exc.TorchDynamoException("boom\nmore detail")
    assert ("without graph breaks" in str(err.value)) == whole
    with pytest.raises(ValueError, match="not a compile error"), train.compile_errors("x"):
        raise ValueError("not a compile error")


def test_torch_compile_end_to_end_and_bad_modes(tmp_path: Path) -> None:
    """A compiled P3B run (linear probes) with a compiled slim fine-tune meets its budget; CUDA
    graphs on the CPU and unknown modes are refused."""
    report = train.run(tiny_config(tmp_path / "run", torch_compile="default", finetune_epochs=1, epochs=1))
    assert report["budget_met"] and report["params_slim"] < report["params_dense"]
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match="reduce-overhead captures CUDA graphs"):
        cfg = tiny_config(tmp_path / "x", torch_compile="reduce-overhead")
        train.compiled(torch.nn.Linear(2, 2), cfg, cpu)
    with pytest.raises(ConfigError, match="torch_compile mode"):
        tiny_config(tmp_path / "x", torch_compile="max-speed")
    for mode in ("off", "default"):  # CUDA graphs for the probes come only with those of the model
        with pytest.raises(ConfigError, match="probe_cudagraphs captures the probes in CUDA graphs"):
            tiny_config(tmp_path / "x", torch_compile=mode, probe_cudagraphs=True)
    saved = PruneConfig(torch_compile="off").to_dict()
    train.check_resume_config(saved, PruneConfig(torch_compile="default"), tmp_path)


def test_a_failed_checkpoint_write_keeps_the_previous_file_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk makes ``torch.save`` raise a bare RuntimeError from its stream writer; the user
    gets a CheckpointError naming the file, the old checkpoint survives, no temporary file is left."""
    path = tmp_path / "checkpoint.pt"
    train.atomic_save({"step": 1}, path)

    def full_disk(_obj: Any, f: Any) -> None:
        Path(f).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\n"
                           "PytorchStreamWriter failed writing file data/0: file write failed")  # fmt: skip

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"cannot write .*checkpoint\.pt \(the previous one is kept\).*"
                                              r"file write failed; free some disk space"):  # fmt: skip
        train.atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_describe_prints_the_groups_and_the_reachable_ratios_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kwargs = json.dumps({"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 64, "num_heads": 4})
    out = tmp_path / "run"
    argv = ["--model", "vit_small_patch16_dinov3", "--model-kwargs", kwargs, "--out", str(out), "--describe"]
    assert prune_cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "blocks.0.attn" in text and "heads    size 4      prunable" in text
    assert "head_dim size 8      prunable" in text  # 8 pairs of 16 dims, rotated together
    assert "select'  size 2      fixed: indexed by chunk/split at node" in text
    assert "--granularity deploy (heads+hidden): --prune-ratio up to" in text
    assert not out.exists()
    assert prune_cli.main(["--model", "resnet18", "--describe"]) != 0
    assert "CNNs such as ResNet are not supported" in capsys.readouterr().err


def test_adamw_is_fused_on_the_cpu_and_bench_adamw_measures_the_same_update() -> None:
    """train.adamw takes torch's fused kernel on the CPU; tools/bench_adamw.py times it against the
    per-parameter loop and finds the same update up to rounding."""
    model = torch.nn.Linear(8, 4)
    opt = train.adamw(train.param_groups(model, 0.05), 1e-3)
    assert opt.defaults["fused"] is True
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import bench_adamw  # noqa: PLC0415

    loop_ms, fused_ms, diff = bench_adamw.measure(model, rounds=1, steps=2)
    assert loop_ms > 0 and fused_ms > 0 and diff < 1e-6


@pytest.mark.parametrize("name", ["davit_tiny", "caformer_s18"])
def test_img_size_reaches_a_model_without_that_argument_through_the_data_only(
    tmp_path: Path, name: str
) -> None:
    """DaViT's and MetaFormer's constructors take no ``img_size`` (MetaFormer says so in words of its
    own): ``--img-size`` then sizes the data alone (the model reads any size), where it used to stop
    the run; an ``img_size`` the user put in --model-kwargs is still refused with the constructor's
    error."""
    cfg = tiny_config(tmp_path / "run", model=name, model_kwargs={}, img_size=48)
    model = train.build_model(cfg)
    assert train.model_input(model, cfg)[0] == 48
    with pytest.raises(ConfigError, match=r"unexpected keyword argument.*'img_size'"):
        train.build_model(cfg.replace(img_size=None, model_kwargs={"img_size": 48}))


@pytest.mark.parametrize("how", ["fingerprint", "gates", "old-and-same"])
def test_a_checkpoint_for_other_groups_of_the_model_says_start_again(tmp_path: Path, how: str) -> None:
    """A p3b-fx update may group a model differently (rotary head dims in pairs since 2026-11-28):
    a checkpoint written for the old groups is refused with that reason, whether it records the
    groups' fingerprint or (written before it did) only shows other gates; a checkpoint without
    the fingerprint whose gates fit still resumes."""
    cfg = tiny_config(tmp_path / "run")
    train.run(cfg, stop_after_epoch=1)
    path = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(path, weights_only=False)
    assert state["groups"] == p3b_fx.find_groups(p3b_fx.trace(train.build_model(cfg))).fingerprint()
    if how == "fingerprint":
        state["groups"] = "0123456789abcdef"
    else:
        del state["groups"]
    if how == "gates":
        state["masked"]["p3b_masks.g_blocks_0_attn_head_dim_"] = torch.ones(2)
    torch.save(state, path)
    if how == "old-and-same":
        assert train.run(cfg.replace(resume=True))["params_slim"] > 0
        return
    before = {f.name: f.read_bytes() for f in (tmp_path / "run").iterdir()}
    with pytest.raises(CheckpointError, match=r"written for other groups of this model .* --force"):
        train.run(cfg.replace(resume=True))
    assert {f.name: f.read_bytes() for f in (tmp_path / "run").iterdir()} == before  # nothing lost
