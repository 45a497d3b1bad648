"""The transfer benchmark: statistics, table, target checks, records, resumability and the CLI (tiny runs)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from p3b_fx import transfer
from p3b_fx.errors import ConfigError, TrainingError
from p3b_fx.transfer import Row, Stat
from tools import bench_transfer as cli

TINY = '{"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 10}'
REPORT_FIELDS = (
    "method", "prune_ratio", "budget", "params_dense", "params_slim", "flops_dense", "flops_slim",
    "top1_before_pruning", "top1", "keep_ratios", "plan", "config",
)  # fmt: skip
BENCH_FIELDS = ("seed", "run", "params_counted", "macs_counted")


def tiny_argv(tmp: Path, *extra: str) -> list[str]:
    return [
        "--model", "vit_tiny_patch16_224", "--model-kwargs", TINY, "--target-data", "digits",
        "--methods", "dense", "p3b", "--ratios", "0.5", "--seeds", "0", "--epochs", "1",
        "--finetune-epochs", "0", "--max-steps-per-epoch", "3", "--batch-size", "32", "--workers", "1",
        "--device", "cpu", "--out", str(tmp / "runs"), "--doc", str(tmp / "bench.md"),
        "--plot", str(tmp / "pareto.png"), "--json", str(tmp / "transfer.json"), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """One tiny benchmark through the CLI: dense + P3B at 0.5, one seed, one epoch of 3 steps."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("bench")
    return tmp, cli.main(tiny_argv(tmp))


def stat_row(method: str, ratio: float, top1: list[float], params: float = 1e6) -> Row:
    return Row(
        method, ratio, Stat.of(top1), Stat.of([params]), Stat.of([2 * params]), tuple(range(len(top1)))
    )


def record(method: str, ratio: float, seed: int, top1: float) -> dict[str, Any]:
    return {"method": method, "prune_ratio": ratio, "seed": seed, "top1": top1,
            "params_counted": 1000 * (1 - ratio), "macs_counted": 5000 * (1 - ratio)}  # fmt: skip


# --- statistics, table, targets ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "mean", "std"),
    [([1.0, 2.0, 3.0], 2.0, 1.0), ([5.0], 5.0, 0.0), ([90.0, 92.0], 91.0, math.sqrt(2.0))],
)
def test_stat_is_mean_and_sample_std(values: list[float], mean: float, std: float) -> None:
    stat = Stat.of(values)
    assert stat.n == len(values)
    assert stat.mean == pytest.approx(mean) and stat.std == pytest.approx(std)


def test_stat_of_nothing_raises() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Stat.of([])


def test_aggregate_groups_by_method_and_ratio_dense_first() -> None:
    records = [record("p3b", 0.7, s, 0.90 + s / 100) for s in range(3)]
    records += [record("dense", 0.0, s, 0.95) for s in range(3)] + [record("uniform", 0.5, 0, 0.80)]
    rows = transfer.aggregate(records)
    assert [(r.method, r.ratio) for r in rows] == [("dense", 0.0), ("uniform", 0.5), ("p3b", 0.7)]
    assert rows[2].top1.mean == pytest.approx(91.0) and rows[2].top1.std == pytest.approx(1.0)
    assert rows[2].params.mean == pytest.approx(300.0) and rows[2].seeds == (0, 1, 2)


def test_table_shows_mean_std_gap_and_sizes() -> None:
    table = transfer.format_table([stat_row("dense", 0.0, [95.0, 97.0], 2.7e6), stat_row("p3b", 0.5, [95.5])])
    lines = table.splitlines()
    assert lines[0].startswith("| method | prune ratio | top-1 % (mean ± std)")
    assert lines[2] == "| dense | - | 96.00 ± 1.41 |  | 2.700 | 5.40 | 2 |"
    assert lines[3] == "| p3b | 0.5 | 95.50 | -0.50 | 1.000 | 2.00 | 1 |"


def test_gap_to_dense_is_paired_by_seed_with_its_standard_error() -> None:
    """Seeds that move both methods alike cancel: a constant -1 point gap has zero standard error."""
    records = [record("dense", 0.0, s, 0.90 + s / 50) for s in range(3)]
    records += [record("p3b", 0.5, s, 0.89 + s / 50) for s in range(3)]
    records += [record("uniform", 0.5, s, v) for s, v in enumerate((0.88, 0.93, 0.92))]
    rows = transfer.aggregate(records)
    by = {r.method: r for r in rows}
    paired = transfer.paired_gap(by["p3b"], by["dense"])
    assert paired is not None
    assert paired.mean == pytest.approx(-1.0) and paired.std == pytest.approx(0.0, abs=1e-9)
    lines = transfer.format_table(rows).splitlines()
    assert "| -1.00 ± 0.00 |" in lines[3]
    gaps = [-2.0, 1.0, -2.0]  # uniform minus dense per seed
    se = Stat.of(gaps).std / math.sqrt(3)
    assert f"| {sum(gaps) / 3:+.2f} ± {se:.2f} |" in lines[4]


@pytest.mark.parametrize(
    ("p3b_05", "p3b_07", "best_baseline", "expected"),
    [
        (95.6, 94.6, 94.0, [True, True, True]),
        (95.4, 94.4, 95.0, [False, False, False]),
        (96.5, 95.0, 94.9, [True, True, True]),
    ],
)
def test_target_checks(p3b_05: float, p3b_07: float, best_baseline: float, expected: list[bool]) -> None:
    rows = [
        stat_row("dense", 0.0, [96.0]),
        stat_row("p3b", 0.5, [p3b_05]),
        stat_row("p3b", 0.7, [p3b_07]),
        stat_row("uniform", 0.7, [best_baseline]),
        stat_row("global-taylor", 0.7, [best_baseline - 1]),
    ]
    assert [c.reached for c in transfer.check_targets(rows)] == expected


def test_target_checks_without_p3b_are_not_measured() -> None:
    checks = transfer.check_targets([stat_row("dense", 0.0, [96.0]), stat_row("uniform", 0.7, [90.0])])
    assert [c.reached for c in checks] == [None, None, None]
    assert "not measured" in transfer.format_checks(checks)


# --- jobs --------------------------------------------------------------------------------------------


def spec(tmp: Path, **changes: Any) -> transfer.BenchSpec:
    values: dict[str, Any] = {"base": {"data": "digits", "epochs": 2}, "methods": ("dense", "p3b", "uniform"),
                              "ratios": (0.5, 0.7), "seeds": (0, 1), "out": str(tmp)}  # fmt: skip
    values.update(changes)
    return transfer.BenchSpec(**values)


def test_jobs_are_seed_major_and_dense_runs_once_per_seed(tmp_path: Path) -> None:
    names = [job.name for job in transfer.plan_jobs(spec(tmp_path))]
    assert names[:5] == ["dense-seed0", "p3b-pr0.5-seed0", "p3b-pr0.7-seed0", "uniform-pr0.5-seed0",
                         "uniform-pr0.7-seed0"]  # fmt: skip
    assert len(names) == 2 * (1 + 2 * 2) and len(set(names)) == len(names)


def test_every_job_gets_its_own_directory_and_options(tmp_path: Path) -> None:
    jobs = transfer.plan_jobs(spec(tmp_path))
    job = next(j for j in jobs if j.name == "uniform-pr0.7-seed1")
    assert job.config.out == str(tmp_path / "uniform-pr0.7-seed1")
    assert (job.config.method, job.config.prune_ratio, job.config.seed, job.config.epochs) == (
        "uniform",
        0.7,
        1,
        2,
    )


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"methods": ("p3b", "magic")}, "magic"),
        ({"seeds": ()}, "seeds"),
        ({"ratios": ()}, "ratios"),
        ({"base": {"seed": 3}}, "set per job"),
    ],
)
def test_bad_spec_says_what_to_fix(tmp_path: Path, changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        spec(tmp_path, **changes)


def test_interrupted_runs_resume_from_their_checkpoint(tmp_path: Path) -> None:
    methods = ("dense", "p3b", "global-taylor")
    jobs = {job.name: job for job in transfer.plan_jobs(spec(tmp_path, methods=methods))}
    for name in ("p3b-pr0.5-seed0", "dense-seed0", "global-taylor-pr0.5-seed0"):
        Path(jobs[name].config.out).mkdir(parents=True)
        (Path(jobs[name].config.out) / "checkpoint.pt").write_bytes(b"x")
        assert transfer.start_options(jobs[name], force=False) == {"resume": True, "force": False}
        assert transfer.start_options(jobs[name], force=True) == {"resume": False, "force": True}
    assert transfer.start_options(jobs["p3b-pr0.7-seed0"], force=False) == {"resume": False, "force": True}


# --- the CLI on a tiny configuration -------------------------------------------------------------------


def test_cli_writes_records_table_and_plot(bench: tuple[Path, int]) -> None:
    tmp, code = bench
    assert code == 0
    data = json.loads((tmp / "transfer.json").read_text())
    assert [(r["method"], r["prune_ratio"], r["seed"]) for r in data["records"]] == [
        ("dense", 0.0, 0),
        ("p3b", 0.5, 0),
    ]
    assert all(key in r for r in data["records"] for key in REPORT_FIELDS + BENCH_FIELDS)
    assert data["benchmark"]["epochs"] == 1 and data["benchmark"]["methods"] == ["dense", "p3b"]
    doc = (tmp / "bench.md").read_text()
    assert transfer.DOC_BEGIN in doc and "| p3b | 0.5 |" in doc and "P3B at 0.5 within 0.5 points" in doc
    assert (tmp / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_record_counts_the_final_model(bench: tuple[Path, int]) -> None:
    records = json.loads((bench[0] / "transfer.json").read_text())["records"]
    dense, p3b = records
    assert p3b["params_counted"] == p3b["params_slim"] and dense["params_counted"] == dense["params_dense"]
    assert 0 < p3b["macs_counted"] < dense["macs_counted"]


def test_finished_runs_are_reused_not_rerun(bench: tuple[Path, int], monkeypatch: pytest.MonkeyPatch) -> None:
    tmp, _ = bench
    calls: list[str] = []
    monkeypatch.setattr(transfer, "run_job", lambda config, threads: calls.append(config.out) or {})
    assert cli.main(tiny_argv(tmp, "--json", str(tmp / "again.json"), "--doc", "", "--plot", "")) == 0
    assert calls == []
    again = json.loads((tmp / "again.json").read_text())["records"]
    assert [r["top1"] for r in again] == [
        r["top1"] for r in json.loads((tmp / "transfer.json").read_text())["records"]
    ]


def test_finished_run_with_other_options_is_refused(
    bench: tuple[Path, int], capsys: pytest.CaptureFixture[str]
) -> None:
    tmp, _ = bench
    argv = tiny_argv(tmp, "--doc", "", "--plot", "", "--json", "")
    argv[argv.index("--epochs") + 1] = "2"
    assert cli.main(argv) == cli.EXIT_ERROR
    assert "other options (epochs=1)" in capsys.readouterr().err


def test_collect_only_reports_missing_runs(bench: tuple[Path, int]) -> None:
    tmp, _ = bench
    argv = tiny_argv(tmp, "--collect-only", "--doc", str(tmp / "partial.md"), "--plot", "", "--json", "")
    argv[argv.index("--ratios") + 1 : argv.index("--ratios") + 2] = ["0.5", "0.7"]
    assert cli.main(argv) == cli.EXIT_FAILED_RUNS
    assert "p3b-pr0.7-seed0: not run yet" in (tmp / "partial.md").read_text()


def test_doc_update_keeps_text_outside_the_markers(tmp_path: Path) -> None:
    doc = tmp_path / "bench.md"
    transfer.update_doc(doc, "first table", "# Title")
    doc.write_text(doc.read_text() + "\n## Reading\nhand-written notes\n")
    transfer.update_doc(doc, "second table", "# Title")
    text = doc.read_text()
    assert text.startswith("# Title") and "second table" in text and "first table" not in text
    assert text.endswith("hand-written notes\n")


def test_cli_rejects_a_bad_ratio(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = tiny_argv(tmp_path)
    argv[argv.index("--ratios") + 1] = "1.5"
    assert cli.main(argv) == cli.EXIT_ERROR
    assert "prune ratio 1.5" in capsys.readouterr().err


def test_a_failed_run_is_reported_and_the_others_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake_run(config: Any, threads: int) -> dict[str, Any]:
        if config.method == "p3b":
            raise TrainingError("the loss became nan")
        return {"method": config.method}

    monkeypatch.setattr(transfer, "run_job", fake_run)
    monkeypatch.setattr(transfer, "make_record", lambda job, report: {"name": job.name, **report})
    snapshots: list[int] = []
    jobs = transfer.plan_jobs(spec(tmp_path, seeds=(0,)))
    outcome = transfer.run_benchmark(jobs, workers=1, on_record=lambda recs: snapshots.append(len(recs)))
    assert [r["name"] for r in outcome.records] == [
        "dense-seed0",
        "uniform-pr0.5-seed0",
        "uniform-pr0.7-seed0",
    ]
    assert set(outcome.failures) == {"p3b-pr0.5-seed0", "p3b-pr0.7-seed0"}
    assert "TrainingError: the loss became nan" in outcome.failures["p3b-pr0.5-seed0"]
    assert snapshots == [1, 1, 1, 2, 3]


def test_own_domain_from_an_image_folder(tmp_path: Path) -> None:
    """Any source/target pair: a timm model with a 10-class head onto a 3-class ImageFolder."""
    for split in ("train", "val"):
        for label, shade in enumerate((30, 120, 220)):
            folder = tmp_path / "domain" / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (16, 16), (shade, shade + i, shade)).save(folder / f"{i}.png")
    argv = tiny_argv(tmp_path, "--target-data", str(tmp_path / "domain"), "--num-classes", "3")
    argv[argv.index("--methods") + 1 : argv.index("--methods") + 3] = ["dense", "uniform"]
    assert cli.main(argv) == 0
    records = json.loads((tmp_path / "transfer.json").read_text())["records"]
    assert [r["method"] for r in records] == ["dense", "uniform"]
    assert all(r["config"]["num_classes"] == 3 and 0.0 <= r["top1"] <= 1.0 for r in records)


def test_smoke_runs_never_rewrite_the_committed_figures(tmp_path: Path) -> None:
    """Only the full default benchmark writes docs/ and benchmarks/; anything else writes into --out."""

    def paths(*argv: str) -> tuple[str, str, str]:
        args = cli.parser().parse_args(list(argv))
        cli.output_paths(args)
        return args.doc, args.plot, args.json

    assert paths() == ("docs/bench-transfer.md", "docs/transfer_pareto.png", "benchmarks/transfer.json")
    assert paths("--quick")[0] == "runs/transfer-quick/bench-transfer.md"
    assert paths("--max-steps-per-epoch", "1")[2] == "runs/transfer/transfer.json"
    assert paths("--out", str(tmp_path))[1] == str(tmp_path / "transfer_pareto.png")
    assert paths("--out", str(tmp_path), "--doc", "x.md", "--json", "")[::2] == ("x.md", "")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--epochs", "0"], "epochs must be an integer >= 1, got 0"),
        (["--source-checkpoint", "missing.safetensors"], "check the --source-checkpoint path"),
    ],
)
def test_bad_numbers_and_checkpoints_fail_once_before_any_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    assert cli.main(tiny_argv(tmp_path, *extra)) != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    with pytest.raises(SystemExit):
        cli.main(tiny_argv(tmp_path, "--workers", "0"))


def test_compare_seeds_pairs_settings_by_seed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """tools/compare_seeds.py: per-seed top-1 of each setting, and each later setting minus the
    first on the seeds both have (mean ± s.e., seeds ahead); a malformed --set is a clear error."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import compare_seeds  # noqa: PLC0415

    def records(path: Path, method: str, tops: dict[int, float]) -> str:
        rows = [{"method": method, "prune_ratio": 0.7, "seed": s, "top1": t} for s, t in tops.items()]
        path.write_text(json.dumps({"benchmark": {}, "records": rows}))
        return str(path)

    a = records(tmp_path / "a.json", "p3b", {0: 0.90, 1: 0.92, 2: 0.94})
    b = records(tmp_path / "b.json", "uniform", {0: 0.91, 1: 0.91, 3: 0.99})
    assert compare_seeds.main(["--ratio", "0.7", "--set", f"p3b={a}:p3b", "--set", f"uni={b}:uniform"]) == 0
    out = capsys.readouterr().out
    assert "- p3b: 90.0 / 92.0 / 94.0 / - (mean 92.00, 3 seeds)" in out
    assert "- uni − p3b, paired: +0.00 ± 1.00 (s.e.), ahead on 1 of 2 seeds" in out
    with pytest.raises(SystemExit, match="LABEL=FILE"):
        compare_seeds.main(["--ratio", "0.7", "--set", "no-method"])
