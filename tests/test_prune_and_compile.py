"""tools/prune_and_compile.py: the whole CLI on the shipped model (a few steps), and its refusals."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import prune_and_compile


def test_tensorrt_target_refuses_cleanly_without_tensorrt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("p3b_fx.export.tensorrt")
    code = prune_and_compile.main(["--target", "tensorrt", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code != 0 and "needs TensorRT and a CUDA GPU" in err and "--target jetson" in err
    assert not (tmp_path / "o").exists()  # failed before writing anything


@pytest.mark.slow
def test_jetson_bundle_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["--target", "jetson", "--epochs", "1", "--finetune-epochs", "0", "--max-steps-per-epoch", "3",
            "--out", str(out)]  # fmt: skip
    assert prune_and_compile.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["params_slim"] < report["params_dense"]
    assert report["onnx"]["opset"] == 17 and report["onnx"]["parity_max_abs_diff"] <= 1e-4
    files = set(report["bundle"]["files"])
    assert {"model.onnx", "build_engine.sh", "verify.py", "reference_inputs.npy"} <= files
    assert "--memPoolSize=workspace" in report["bundle"]["trtexec"]


def _source_plan(tmp_path: Path, ratio: float) -> tuple[Path, int]:
    import p3b_fx  # noqa: PLC0415
    from p3b_fx.source_model import load_source_model  # noqa: PLC0415

    model, _ = load_source_model()
    groups = p3b_fx.find_groups(p3b_fx.trace(model))
    plan = p3b_fx.KeepPlan.random(groups, ratio, seed=1)
    plan.save(tmp_path / "plan.json")
    return tmp_path / "plan.json", plan.predicted_params(groups)


def test_an_existing_plan_compiles_without_pruning(tmp_path: Path) -> None:
    plan, params = _source_plan(tmp_path, 0.5)
    out = tmp_path / "run"
    assert prune_and_compile.main(["--target", "onnx", "--plan", str(plan), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["params_slim"] == params and report["onnx"]["parity_max_abs_diff"] <= 1e-4
    assert not (out / "prune").exists()  # no training ran


def test_simplify_runs_onnxslim_and_checks_again(tmp_path: Path) -> None:
    pytest.importorskip("onnxslim", reason="onnxslim is installed by tools/setup.sh")
    plan, _ = _source_plan(tmp_path, 0.5)
    out = tmp_path / "run"
    argv = ["--target", "onnx", "--plan", str(plan), "--out", str(out), "--simplify"]
    assert prune_and_compile.main(argv) == 0
    onnx = json.loads((out / "report.json").read_text())["onnx"]
    assert onnx["simplified"] is True and onnx["parity_max_abs_diff"] <= 1e-4


def test_an_existing_slim_model_compiles_and_reports_its_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch  # noqa: PLC0415

    import p3b_fx  # noqa: PLC0415
    from p3b_fx.source_model import load_source_model  # noqa: PLC0415

    model, _ = load_source_model()
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    plan = p3b_fx.KeepPlan.random(groups, 0.5, seed=2)
    torch.save(p3b_fx.slim(gm, plan, groups), tmp_path / "slim.pt")
    out = tmp_path / "run"
    argv = ["--target", "onnx", "--slim-model", str(tmp_path / "slim.pt"), "--out", str(out)]
    assert prune_and_compile.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["params_slim"] == plan.predicted_params(groups)
    assert f"done: {plan.predicted_params(groups):,} parameters; ONNX opset 17" in capsys.readouterr().out


def test_a_plan_for_another_model_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import p3b_fx  # noqa: PLC0415
    from tests.conftest import tiny_vit  # noqa: PLC0415

    groups = p3b_fx.find_groups(p3b_fx.trace(tiny_vit()))
    p3b_fx.KeepPlan.random(groups, 0.5).save(tmp_path / "other.json")
    code = prune_and_compile.main(
        ["--target", "onnx", "--plan", str(tmp_path / "other.json"), "--out", str(tmp_path)]
    )
    err = capsys.readouterr().err
    assert (
        code != 0
        and "made for architecture" in err
        and f"--plan {tmp_path / 'other.json'} does not fit" in err
    )


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The CompileConfig main() would run (nothing is trained or exported)."""
    import p3b_fx.pipeline  # noqa: PLC0415

    seen: list[object] = []

    def fake_run(cfg: object) -> dict[str, object]:
        seen.append(cfg)
        return {"params_slim": 1, "onnx": {"opset": 17, "parity_max_abs_diff": 0.0}}

    monkeypatch.setattr(p3b_fx.pipeline, "run_compile", fake_run)
    return seen


def test_config_file_beats_the_embedded_default_and_flags_beat_the_file(
    tmp_path: Path, captured: list[object]
) -> None:
    toml = tmp_path / "job.toml"
    toml.write_text('target = "onnx"\njetpack = 4.6\nsimplify = true\nepochs = 3\ndata = "digits"\n')
    assert prune_and_compile.main(["--config", str(toml)]) == 0
    cfg = captured[-1]
    assert (cfg.target, cfg.jetpack, cfg.simplify, cfg.strict) == ("onnx", "4.6", True, False)  # type: ignore[attr-defined]
    prune = cfg.prune  # type: ignore[attr-defined]
    assert (prune.epochs, prune.data) == (3, "digits")  # the file over the embedded default (8, mnist-5k)
    assert (prune.finetune_epochs, prune.granularity) == (2, "deploy")  # embedded default where silent
    argv = ["--config", str(toml), "--epochs", "5", "--jetpack", "6.1", "--target", "jetson", "--strict"]
    assert prune_and_compile.main(argv) == 0
    cfg = captured[-1]
    assert (cfg.target, cfg.jetpack, cfg.strict, cfg.prune.epochs) == ("jetson", "6.1", True, 5)  # type: ignore[attr-defined]


def test_config_file_tables(tmp_path: Path, captured: list[object]) -> None:
    toml = tmp_path / "job.toml"
    toml.write_text('[prune]\nprune-ratio = 0.7\n\n[compile]\ntarget = "jetson"\ndynamic-batch = true\n')
    assert prune_and_compile.main(["--config", str(toml)]) == 0
    cfg = captured[-1]
    assert (cfg.target, cfg.dynamic_batch, cfg.prune.prune_ratio) == ("jetson", True, 0.7)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("epochs = 3\n", "--target is required"),
        ('target = "onnx"\nstrict = "yes"\n', r"strict = 'yes' must be a bool \(true or false\)"),
        ('target = "onnx"\njetpak = "6.1"\n', r"unknown option\(s\) \['jetpak'\].*jetpack"),
        ('epochs = 3\n[compile]\ntarget = "onnx"\n', r"\['epochs'\] sit outside the \[prune\] / \[compile\]"),
    ],
)
def test_bad_config_files_are_named(
    tmp_path: Path, captured: list[object], capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    toml = tmp_path / "job.toml"
    toml.write_text(text)
    assert prune_and_compile.main(["--config", str(toml)]) != 0
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not captured


def test_ranks_other_than_zero_end_quietly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Under torchrun, run_compile returns the training report on ranks >= 1 (no ONNX, no bundle)."""
    import p3b_fx.pipeline  # noqa: PLC0415

    monkeypatch.setattr(p3b_fx.pipeline, "run_compile", lambda cfg: {"params_slim": 1, "top1": 0.5})
    assert prune_and_compile.main(["--target", "onnx", "--out", str(tmp_path / "o")]) == 0


def test_an_out_holding_a_prune_run_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "run.json").write_text("{}")
    (tmp_path / "slim.pt").write_text("x")
    assert prune_and_compile.main(["--target", "onnx", "--force", "--out", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert (
        "holds a tools/prune.py run (run.json, slim.pt)" in err
        and f"--slim-model {tmp_path / 'slim.pt'}" in err
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json", "slim.pt"]  # nothing written or removed


@pytest.mark.parametrize("content", [b"not a torch file\n", b"PK\x03\x04 truncated zip"])
def test_a_corrupt_slim_model_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    bad = tmp_path / "slim.pt"
    bad.write_bytes(content)
    argv = ["--target", "onnx", "--slim-model", str(bad), "--out", str(tmp_path / "o")]
    assert prune_and_compile.main(argv) != 0
    assert "it is not a torch file or is cut short" in capsys.readouterr().err


def test_a_slim_model_for_other_images_names_the_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import timm  # noqa: PLC0415
    import torch  # noqa: PLC0415

    import p3b_fx  # noqa: PLC0415

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=10)
    gm = p3b_fx.trace(model.eval(), input_shape=(1, 3, 32, 32))
    groups = p3b_fx.find_groups(gm)
    torch.save(p3b_fx.slim(gm, p3b_fx.KeepPlan.random(groups, 0.5, seed=0), groups), tmp_path / "slim.pt")
    argv = ["--target", "onnx", "--slim-model", str(tmp_path / "slim.pt"), "--out", str(tmp_path / "o")]
    assert prune_and_compile.main(argv) != 0  # the default data are 28 px
    err = capsys.readouterr().err
    assert "does not take the (3, 28, 28) images" in err and "--img-size it was built from" in err


@pytest.mark.parametrize(
    ("target", "granularity", "warned"),
    [("jetson", "reference", True), ("jetson", "deploy", False), ("onnx", "reference", False)],
)
def test_per_channel_plans_for_a_gpu_target_are_warned_about(
    target: str, granularity: str, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    from p3b_fx.config import PruneConfig  # noqa: PLC0415
    from p3b_fx.pipeline import CompileConfig, check_target  # noqa: PLC0415

    with caplog.at_level("WARNING"):
        check_target(CompileConfig(target=target, prune=PruneConfig(granularity=granularity)))
    assert ("ran 2-2.7x slower than the dense model" in caplog.text) == warned
