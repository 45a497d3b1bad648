"""Tests for the shipped source model: it loads, its card is complete, and its accuracy is real."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
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


def _load_tool(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("pretrain_source", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "pretrain_source", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_pretrain_tool_rejects_bad_options(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    tool = _load_tool(monkeypatch)
    assert tool.main(["--epochs", "0", "--patch-size", "5", "--out", str(tmp_path)]) == 2
    assert "epochs must be >= 1" in caplog.text and "multiple of patch-size 5" in caplog.text
    assert list(tmp_path.iterdir()) == []
