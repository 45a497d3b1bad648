"""p3b_fx.latency and tools/bench_latency.py: interleaved timing, comparison, plans, CPU/CUDA back ends."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import p3b_fx
from p3b_fx import latency
from p3b_fx.config import PruneConfig
from p3b_fx.core.groups import Role
from p3b_fx.errors import ConfigError
from p3b_fx.export.jetpack import jetpack
from p3b_fx.pipeline import CompileConfig, _latency
from p3b_fx.source_model import load_source_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import bench_latency

SHAPE = (3, 32, 32)
JP = jetpack("6.1")


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[latency.Variant], int, int]:
    """A tiny ViT, dense and slim (deploy plan, about half the parameters), exported at batch 1 and 8."""
    from conftest import tiny_vit  # noqa: PLC0415 - the shared fixture builder

    gm = p3b_fx.trace(tiny_vit(), input_shape=(1, *SHAPE))
    groups = p3b_fx.find_groups(gm)
    plan = latency.uniform_plan(groups, 0.5, "deploy", tolerance=0.05)  # hidden 192: coarse in steps of 8
    models: dict[str, nn.Module] = {"dense": gm, "slim": p3b_fx.slim(gm, plan, groups)}
    variants = latency.export_variants(models, SHAPE, (1, 8), JP, tmp_path_factory.mktemp("onnx"))
    return variants, groups.flops_total, plan.predicted_flops(groups)


def fake_clock(step: float = 1.0) -> Callable[[], float]:
    ticks: Iterator[float] = (i * step for i in range(10**6))
    return lambda: next(ticks)


def test_interleaved_runs_warmup_then_alternates() -> None:
    log: list[str] = []
    runners = [lambda: log.append("a"), lambda: log.append("b")]
    samples = latency.interleaved(runners, runs=3, warmup=2)
    assert log == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert [len(s) for s in samples] == [3, 3]
    assert all(t >= 0 for s in samples for t in s)


def test_interleaved_stops_at_budget_after_three_rounds() -> None:
    samples = latency.interleaved(
        [lambda: None, lambda: None], runs=50, warmup=0, budget_s=2, clock=fake_clock()
    )
    assert samples == [[1000.0] * 3, [1000.0] * 3]  # each run spans one tick of 1 s


@pytest.mark.parametrize(("runs", "warmup"), [(0, 1), (3, -1)])
def test_interleaved_rejects_bad_counts(runs: int, warmup: int) -> None:
    with pytest.raises(ConfigError, match="runs >= 1"):
        latency.interleaved([lambda: None], runs=runs, warmup=warmup)


def test_summarize_percentiles() -> None:
    r = latency.summarize([float(v) for v in range(1, 11)], latency.ORT_CPU, 8, 2)
    assert (r.median_ms, r.p10_ms, r.p90_ms, r.runs) == pytest.approx((5.5, 1.9, 9.1, 10))
    assert (r.backend, r.batch, r.threads) == (latency.ORT_CPU, 8, 2)


def result(ms: float, backend: str = latency.ORT_CPU, batch: int = 8) -> latency.LatencyResult:
    return latency.LatencyResult(backend, batch, 2, ms, ms, ms, 5)


@pytest.mark.parametrize(
    ("dense_ms", "slim_ms", "flops", "expected"),
    [
        (10.0, 4.0, (100, 40), (2.5, 2.5, 1.0)),
        (10.0, 8.0, (300, 100), (1.25, 3.0, 1.25 / 3.0)),
        (5.0, 10.0, (100, 100), (0.5, 1.0, 0.5)),
    ],
)
def test_compare_arithmetic(
    dense_ms: float, slim_ms: float, flops: tuple[int, int], expected: tuple[float, float, float]
) -> None:
    c = latency.compare(result(dense_ms), result(slim_ms), *flops)
    assert (c.speedup, c.flop_ratio, c.efficiency) == pytest.approx(expected)
    assert (c.dense_ms, c.slim_ms) == (dense_ms, slim_ms)


@pytest.mark.parametrize(
    ("slim", "flops", "match"),
    [
        (result(4.0, backend=latency.ORT_CUDA), (100, 40), "one back end"),
        (result(4.0, batch=1), (100, 40), "one back end"),
        (result(4.0), (100, 0), "positive"),
    ],
)
def test_compare_refuses_mismatched_or_empty(
    slim: latency.LatencyResult, flops: tuple[int, int], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        latency.compare(result(10.0), slim, *flops)


@pytest.mark.parametrize(("batch", "threads"), [(1, 1), (8, 2)])
def test_measure_ort_times_are_positive_and_ordered(
    tiny_pair: tuple[list[latency.Variant], int, int], batch: int, threads: int
) -> None:
    r = latency.measure_ort(tiny_pair[0][1].onnx[batch], batch, threads, runs=5, warmup=1)
    assert (r.backend, r.batch, r.threads, r.runs) == (latency.ORT_CPU, batch, threads, 5)
    assert all(math.isfinite(v) and v > 0 for v in (r.p10_ms, r.median_ms, r.p90_ms))
    assert r.p10_ms <= r.median_ms <= r.p90_ms


def test_measure_ort_refuses_a_file_of_another_batch(
    tiny_pair: tuple[list[latency.Variant], int, int],
) -> None:
    with pytest.raises(ConfigError, match="not batch 8"):
        latency.measure_ort(tiny_pair[0][0].onnx[1], 8, 1, runs=1, warmup=0)


def test_measure_interleaves_dense_and_slim(tiny_pair: tuple[list[latency.Variant], int, int]) -> None:
    variants, flops_dense, flops_slim = tiny_pair
    results, why = latency.measure(latency.Setting(latency.ORT_CPU, 8, 2), variants, runs=4, warmup=1)
    assert results is not None and why == ""
    assert [r.runs for r in results] == [4, 4]
    c = latency.compare(*results, flops_dense, flops_slim)
    assert c.flop_ratio > 1.5 and math.isfinite(c.speedup) and c.speedup > 0


needs_no_cuda = pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the skip path of a CPU-only host"
)


@needs_no_cuda
@pytest.mark.parametrize("backend", [latency.TORCH_CUDA, latency.ORT_CUDA, latency.TENSORRT])
def test_cuda_back_ends_skip_with_a_reason(
    tiny_pair: tuple[list[latency.Variant], int, int], backend: str, tmp_path: Path
) -> None:
    results, why = latency.measure(
        latency.Setting(backend, 1), tiny_pair[0], runs=2, warmup=0, workdir=tmp_path
    )
    assert results is None and why
    assert any(word in why for word in ("CUDA", "TensorRT", "tensorrt"))


@needs_no_cuda
def test_single_model_cuda_measurements_skip_with_a_reason(
    tiny_pair: tuple[list[latency.Variant], int, int], tmp_path: Path
) -> None:
    slim = tiny_pair[0][1]
    measured = [
        latency.measure_torch_cuda(slim.module, 1, input_shape=SHAPE, runs=2, warmup=0),
        latency.measure_ort_cuda(slim.onnx[1], 1, runs=2, warmup=0),
        latency.measure_tensorrt(slim.onnx[1], 1, workdir=tmp_path, runs=2, warmup=0),
    ]
    assert [r for r, _ in measured] == [None, None, None]
    assert all(why for _, why in measured)


@pytest.mark.gpu
def test_torch_cuda_measures_on_a_gpu(tiny_pair: tuple[list[latency.Variant], int, int]) -> None:
    r, why = latency.measure_torch_cuda(tiny_pair[0][1].module, 8, input_shape=SHAPE, runs=10, warmup=2)
    assert r is not None and why == "" and r.median_ms > 0


@pytest.fixture(scope="module")
def source_groups() -> tuple[p3b_fx.GroupSet, torch.fx.GraphModule]:
    gm = p3b_fx.trace(load_source_model()[0].eval(), input_shape=(1, 3, 28, 28))
    return p3b_fx.find_groups(gm), gm


@pytest.mark.parametrize("granularity", ["reference", "deploy"])
@pytest.mark.parametrize("reduction", [0.5, 0.7])
def test_uniform_plan_meets_the_parameter_target(
    source_groups: tuple[p3b_fx.GroupSet, torch.fx.GraphModule], granularity: str, reduction: float
) -> None:
    groups, _ = source_groups
    plan = latency.uniform_plan(groups, reduction, granularity)
    kept = plan.kept_sizes(groups)
    achieved = 1 - plan.predicted_params(groups) / groups.params_total
    assert achieved == pytest.approx(reduction, abs=latency.PLAN_TOLERANCE)
    assert not plan.removed_blocks(groups)
    pruned = (
        {Role.HEADS, Role.HIDDEN}
        if granularity == "deploy"
        else {Role.READ, Role.HEAD_DIM, Role.WRITE, Role.HIDDEN}
    )
    assert {g.role for g in groups.prunable if kept[g.name] < g.size} == pruned
    if granularity == "deploy":
        assert all(kept[g.name] % 8 == 0 for g in groups.prunable if g.role is Role.HIDDEN)


def test_uniform_plan_slims_to_the_predicted_size(
    source_groups: tuple[p3b_fx.GroupSet, torch.fx.GraphModule],
) -> None:
    groups, gm = source_groups
    plan = latency.uniform_plan(groups, 0.5, "deploy")
    slim = p3b_fx.slim(gm, plan, groups)
    assert sum(p.numel() for p in slim.parameters()) == plan.predicted_params(groups)
    assert latency.flops_of(slim, (3, 28, 28)) == plan.predicted_flops(groups)


def test_uniform_plan_says_when_the_target_is_out_of_reach(
    source_groups: tuple[p3b_fx.GroupSet, torch.fx.GraphModule],
) -> None:
    with pytest.raises(ConfigError, match="no uniform deploy plan reaches 50% fewer parameters within 0%"):
        latency.uniform_plan(source_groups[0], 0.5, "deploy", tolerance=1e-9)


@pytest.mark.parametrize("reduction", [-0.1, 1.0])
def test_uniform_plan_refuses_bad_reductions(
    source_groups: tuple[p3b_fx.GroupSet, torch.fx.GraphModule], reduction: float
) -> None:
    with pytest.raises(ConfigError, match="reduction must be in"):
        latency.uniform_plan(source_groups[0], reduction, "deploy")


def test_pipeline_latency_entry(source_groups: tuple[p3b_fx.GroupSet, torch.fx.GraphModule]) -> None:
    groups, gm = source_groups
    slim = p3b_fx.slim(gm, latency.uniform_plan(groups, 0.5, "deploy"), groups).eval()
    cfg = CompileConfig("onnx", PruneConfig(), latency_runs=3)
    entry = _latency(cfg, slim, (3, 28, 28))
    json.dumps(entry)  # goes into report.json as is
    assert entry["flop_ratio"] == pytest.approx(2.02, abs=0.01)
    cpu = entry["onnxruntime_cpu"]
    assert set(cpu) == {"b1_t1", "b8_t2"}
    for row in cpu.values():
        assert row["dense_ms"] > 0 and row["slim_ms"] > 0 and row["runs"] >= 3
        assert row["speedup"] == pytest.approx(row["dense_ms"] / row["slim_ms"], rel=1e-3)
        assert row["speedup_over_flop_ratio"] == pytest.approx(row["speedup"] / entry["flop_ratio"], rel=1e-3)


def test_bench_cli_quick_writes_doc_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "docs" / "bench.md"
    out.parent.mkdir()
    out.write_text(f"old table\n{bench_latency.NOTES}\nhand-written analysis\n")
    argv = [
        "--models",
        "source",
        "--reductions",
        "0.5",
        "--granularities",
        "deploy",
        "--quick",
        "--out",
        str(out),
    ]
    assert bench_latency.main(argv) == 0
    text = out.read_text()
    assert "old table" not in text and text.endswith(f"{bench_latency.NOTES}\nhand-written analysis\n")
    assert "| source | deploy | 50% | 2.02 | onnxruntime-cpu b1_t1 |" in text
    assert "onnxruntime-cpu b8_t2 |" in text and "Target (ONNX Runtime CPU, batch 8" in text
    assert "onnxruntime-cpu b8_t2_spin |" in text
    assert f"--out {out}" in text and "ONNX Runtime 1." in text
    if not torch.cuda.is_available():
        assert "Skipped here:" in text and "torch-cuda-fp16-graphs b1" in text
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "met by" in capsys.readouterr().out


def test_bench_cli_cuda_backends_only(tmp_path: Path) -> None:
    """``--backends cuda`` (the GPU check) times no CPU setting and claims nothing about the CPU target."""
    out = tmp_path / "bench.md"
    argv = ["--models", "source", "--reductions", "0.5", "--granularities", "deploy", "--quick",
            "--backends", "cuda", "--out", str(out)]  # fmt: skip
    assert bench_latency.main(argv) == 0
    text = out.read_text()
    assert "onnxruntime-cpu" not in text.split("Skipped here:")[0]
    assert "not measured in this run (--backends)" in text
    if not torch.cuda.is_available():
        assert "torch-cuda-fp16-graphs b8: no CUDA device" in text


def test_settings_key_names_spinning() -> None:
    assert latency.Setting(latency.ORT_CPU, 8, 2).key == "b8_t2"
    assert latency.Setting(latency.ORT_CPU, 8, 2, spin=True).key == "b8_t2_spin"
    assert latency.Setting(latency.TORCH_CUDA, 8).key == "b8"


def test_ort_op_times_split_the_run_by_op_type(tiny_pair: tuple[list[latency.Variant], int, int]) -> None:
    times = latency.ort_op_times(tiny_pair[0][0].onnx[8], 8, 1, runs=2)
    assert times and all(v >= 0 for v in times.values())
    assert list(times.values()) == sorted(times.values(), reverse=True)
    assert {"Gemm", "MatMul", "FusedMatMul"} & set(times)  # the linears and attention matmuls
    with pytest.raises(ConfigError, match="runs must be"):
        latency.ort_op_times(tiny_pair[0][0].onnx[8], 8, 1, runs=0)


def test_profile_cli_writes_a_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import profile_ort  # noqa: PLC0415

    out = tmp_path / "profile.md"
    argv = ["--model", "source", "--granularities", "reference", "--runs", "1", "--out", str(out)]
    assert profile_ort.main(argv) == 0
    text = out.read_text()
    assert "| op type (ms per inference) | dense | reference 50% |" in text
    assert "| Gather |" in text and "speed-up vs dense (FLOP ratio)" in text
    assert "Command: `python tools/profile_ort.py --model source" in text
    with pytest.raises(SystemExit):
        profile_ort.main(["--runs", "0"])
    assert "--runs must be >= 1" in capsys.readouterr().err


def test_unknown_model_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import profile_ort  # noqa: PLC0415

    out = tmp_path / "bench.md"
    assert bench_latency.main(["--models", "no_such_vit", "--quick", "--out", str(out)]) == 2
    assert profile_ort.main(["--model", "no_such_vit", "--runs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("'no_such_vit' is neither 'source' nor a timm model name") == 2
    assert not out.exists()


def test_train_step_doc_keeps_the_hand_written_notes(tmp_path: Path) -> None:
    import bench_train_step  # noqa: PLC0415 - tools/ is on sys.path above

    out = tmp_path / "bench-train-step.md"
    out.write_text(f"# old\n| old table |\n\n{bench_latency.NOTES}\n## Reading\nhand-written\n")
    bench_train_step.write_doc(out, "# new\n| new table |")
    assert out.read_text() == f"# new\n| new table |\n\n{bench_latency.NOTES}\n## Reading\nhand-written\n"
    fresh = tmp_path / "fresh.md"
    bench_train_step.write_doc(fresh, "# new\n")
    assert fresh.read_text() == "# new\n" and not list(tmp_path.glob("*.tmp"))


def test_train_step_probe_flop_share_orders_the_probes() -> None:
    """The FLOP row the GPU analysis rests on: wider conv probes cost more, the linear probe almost
    nothing, and the share depends neither on the precision nor on the compile mode."""
    import bench_train_step as b  # noqa: PLC0415

    args = b.parser().parse_args([])
    share = {k: b.probe_flop_share(args, k) for k in b.VARIANTS}
    full, quarter, eighth = share["conv, hidden = dim"], share["conv, hidden dim/4 (default)"], share[
        "conv, hidden dim/8"]  # fmt: skip
    assert full > quarter > eighth > 20 * share["linear"] > 0
    same = "conv, hidden dim/4, grouped, bf16 probes, torch.compile + CUDA graphs"
    assert share[same] == pytest.approx(quarter)


def test_train_step_bench_takes_any_timm_model(capsys: pytest.CaptureFixture[str]) -> None:
    """``--model`` times a timm model of its own input size: its probes get each stream's default
    width (a multi-stage model has no one width), and the variants that set the width as a share of
    one are refused up front."""
    import bench_train_step as b  # noqa: PLC0415

    args = b.parser().parse_args(["--model", "efficientformerv2_s0", "--img-size", "64", "--batch-size", "2"])
    cfg = b._config(args, "unused")
    assert (cfg.model, cfg.img_size, cfg.probe_hidden, cfg.model_kwargs) == (
        "efficientformerv2_s0",
        64,
        None,
        {"num_classes": 10},
    )
    assert b._batch(args, torch.device("cpu"))[0].shape == (2, 3, 64, 64)
    assert 0 < b.probe_flop_share(args, "conv, hidden dim/4 (default)") < 0.5
    with pytest.raises(SystemExit):
        b.main(["--model", "efficientformerv2_s0", "--variants", "1", "--count-ops"])
    assert "set the conv probe width as a share of embed_dim" in capsys.readouterr().err
    source = b._config(b.parser().parse_args([]), "unused")
    assert source.probe_hidden == 48 and source.model_kwargs["embed_dim"] == 192


def test_trace_overhead_bench_writes_its_table(tmp_path: Path) -> None:
    import bench_trace_overhead  # noqa: PLC0415

    out = tmp_path / "overhead.md"
    argv = ["--models", "efficientformerv2_s0", "--img-size", "64", "--batch-size", "2", "--rounds", "1"]
    assert bench_trace_overhead.main([*argv, "--out", str(out)]) == 0
    row = out.read_text().splitlines()[-1]
    assert row.startswith("| efficientformerv2_s0 | ") and row.count("x |") == 2


def test_bench_cli_checks_its_output_before_measuring(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench_latency.parse(["--quick"]).out == "runs/bench-latency-quick.md"  # never the committed doc
    assert bench_latency.parse([]).out.endswith("docs/bench-latency.md")
    (tmp_path / "afile").write_text("x")
    for argv, message in (
        (["--out", str(tmp_path)], "is a directory"),
        (["--out", str(tmp_path / "afile" / "x.md")], "is not a writable directory"),
        (["--runs", "0"], "--runs and --gpu-runs must be >= 1"),
    ):
        with pytest.raises(SystemExit):
            bench_latency.parse(argv)
        assert message in capsys.readouterr().err
