"""tools/prune_and_compile.py: the whole CLI on the shipped model (a few steps), and its refusals."""

from __future__ import annotations

import json
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
