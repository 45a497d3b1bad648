"""Tests for the shipped source model: it loads, its card is complete, and its accuracy is real."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from p3b_fx import data
from p3b_fx.data import TensorImageDataset, load_dataset
from p3b_fx.errors import CheckpointError
from p3b_fx.source_model import ASSETS_DIR, SOURCE_STEM, load_source_model

HAS_DEBIAN_FMNIST = all((data.DEBIAN_FASHION_DIR / f"{name}.gz").is_file() for name in data._IDX_NAMES)
TOOL = Path(__file__).resolve().parents[1] / "tools" / "pretrain_source.py"


def test_loads_with_complete_card() -> None:
    model, card = load_source_model()
    assert isinstance(model, torch.nn.Module) and not model.training
    assert 0.0 < card["test_accuracy"] <= 1.0 and card["test_images"] == 10_000
    assert card["num_classes"] == len(card["class_names"]) == 10
    assert sum(p.numel() for p in model.parameters()) == card["parameters"]
    assert model.pretrained_cfg["mean"] == tuple(card["mean"])  # callers normalise from pretrained_cfg
    assert card["model_kwargs"]["depth"] >= 6 and "pretrain_source.py" in card["command"]
    assert (ASSETS_DIR / card["weights_file"]).stat().st_size < 8_000_000


@pytest.mark.skipif(not HAS_DEBIAN_FMNIST, reason="Debian package dataset-fashion-mnist is not installed")
def test_accuracy_on_500_test_images_matches_card(tmp_path: Path) -> None:
    model, card = load_source_model()
    size = card["input_size"][-1]
    mean, std = tuple(model.pretrained_cfg["mean"]), tuple(model.pretrained_cfg["std"])
    test = load_dataset("fashion-mnist", train=False, img_size=size, mean=mean, std=std, root=tmp_path)
    assert isinstance(test, TensorImageDataset)
    images = torch.stack([test[i][0] for i in range(500)])
    with torch.no_grad():
        logits = model(images)
    assert logits.shape == (500, 10) and bool(torch.isfinite(logits).all())
    accuracy = float((logits.argmax(dim=1) == test.labels[:500]).float().mean())
    assert abs(accuracy - card["test_accuracy"]) < 0.04  # 500 images: ~1.4 points standard error


@pytest.fixture
def asset_copy(tmp_path: Path) -> Path:
    for suffix in (".json", ".safetensors"):
        shutil.copy(ASSETS_DIR / f"{SOURCE_STEM}{suffix}", tmp_path / f"{SOURCE_STEM}{suffix}")
    return tmp_path


def test_missing_card_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"missing; regenerate them with .*pretrain_source.py"):
        load_source_model(directory=tmp_path)


def test_corrupt_weights_are_a_checkpoint_error(asset_copy: Path) -> None:
    weights = asset_copy / f"{SOURCE_STEM}.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=r"SHA-256"):
        load_source_model(directory=asset_copy)
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"weights .* are missing"):
        load_source_model(directory=asset_copy)


def test_card_without_fields_is_a_checkpoint_error(asset_copy: Path) -> None:
    card_path = asset_copy / f"{SOURCE_STEM}.json"
    card = json.loads(card_path.read_text())
    del card["model_kwargs"]
    card_path.write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match=r"lacks \['model_kwargs'\]"):
        load_source_model(directory=asset_copy)
    card_path.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"not JSON"):
        load_source_model(directory=asset_copy)


@pytest.fixture
def tool(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """tools/pretrain_source.py as a module; torch's thread count and determinism flag restored after."""
    spec = importlib.util.spec_from_file_location("pretrain_source", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "pretrain_source", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    threads, deterministic, rng = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.get_rng_state(),
    )
    yield module
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
    torch.set_rng_state(rng)


def test_pretrain_tool_rejects_bad_options(
    tool: ModuleType, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert tool.main(["--epochs", "0", "--patch-size", "5", "--out", str(tmp_path)]) == 2
    assert "epochs must be >= 1" in caplog.text and "multiple of patch-size 5" in caplog.text
    assert list(tmp_path.iterdir()) == []


def test_speed_mode_times_a_config_without_data(tool: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert tool.main(["--speed", "1", "--depth", "1", "--batch-size", "4", "--threads", "1"]) == 0
    header, row = capsys.readouterr().out.strip().splitlines()
    assert header.startswith("| config | tokens | train img/s") and row.startswith(
        "| depth 1, 28 px, patch 7 | 16 + 1 |"
    )
    assert all(float(cell) > 0 for cell in row.strip("|").split("|")[2:])
    assert tool.main(["--speed", "0"]) == 2


def test_recorded_command_drops_resume(tool: ModuleType) -> None:
    argv = ["--epochs", "10", "--resume", "/x.pt", "--threads", "1", "--resume=/y.pt", "--seed", "3"]
    assert tool.without_resume(argv) == ["--epochs", "10", "--threads", "1", "--seed", "3"]


@pytest.mark.skipif(not HAS_DEBIAN_FMNIST, reason="Debian package dataset-fashion-mnist is not installed")
def test_interrupted_pretraining_resumes_bit_for_bit(
    tool: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny = [
        "--epochs",
        "2",
        "--train-limit",
        "128",
        "--depth",
        "1",
        "--embed-dim",
        "24",
        "--batch-size",
        "64",
    ]
    tiny += ["--data-root", str(tmp_path / "data")]
    assert tool.main([*tiny, "--out", str(tmp_path / "straight")]) == 0
    original, calls = tool.train_epoch, []

    def interrupted(*args: object, **kwargs: object) -> float:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return float(original(*args, **kwargs))

    monkeypatch.setattr(tool, "train_epoch", interrupted)
    resume = ["--out", str(tmp_path / "resumed"), "--resume", str(tmp_path / "resume.pt")]
    with pytest.raises(KeyboardInterrupt):
        tool.main([*tiny, *resume])
    monkeypatch.setattr(tool, "train_epoch", original)
    assert tool.main([*tiny, *resume]) == 0
    straight = json.loads((tmp_path / "straight" / f"{SOURCE_STEM}.json").read_text())
    resumed = json.loads((tmp_path / "resumed" / f"{SOURCE_STEM}.json").read_text())
    assert resumed["weights_sha256"] == straight["weights_sha256"]
    assert resumed["command"] == straight["command"].replace(
        str(tmp_path / "straight"), str(tmp_path / "resumed")
    )
