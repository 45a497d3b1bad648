"""The shipped source model: a small timm ViT pretrained on Fashion-MNIST, rebuilt from its JSON card.

``p3b_fx/assets/source_vit_fmnist.json`` names the timm architecture and constructor kwargs, the
input size, mean/std, class names and the measured test accuracy; ``source_vit_fmnist.safetensors``
holds the weights (its SHA-256 is in the card). ``tools/pretrain_source.py`` writes both; see
``docs/source-model.md``. :func:`build_vit` is shared by the writer and the reader, so the rebuilt
model is the trained one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from p3b_fx.core.io import sha256_of
from p3b_fx.errors import CheckpointError

logger = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
"""Folder of the shipped assets (package data)."""

SOURCE_STEM = "source_vit_fmnist"
"""File stem of the shipped source model: ``<stem>.json`` and ``<stem>.safetensors``."""

CARD_FORMAT = 1
"""Version of the JSON card's layout; bump it when a field changes meaning."""

_REQUIRED_KEYS = ("format", "timm_model", "model_kwargs", "input_size", "mean", "std", "num_classes",
                  "class_names", "test_accuracy", "weights_file", "weights_sha256")  # fmt: skip
_REGENERATE = "regenerate them with `python tools/pretrain_source.py` (see docs/source-model.md)"


def build_vit(timm_model: str, model_kwargs: Mapping[str, Any], card: Mapping[str, Any]) -> torch.nn.Module:
    """A randomly initialised timm model whose ``pretrained_cfg`` carries the card's input size/mean/std.

    Callers read normalisation from ``model.pretrained_cfg`` as for any timm model.
    """
    overlay = {
        "input_size": tuple(card["input_size"]),
        "mean": tuple(card["mean"]),
        "std": tuple(card["std"]),
        "num_classes": int(card["num_classes"]),
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "tag": "p3b_fmnist",
        "url": None,
        "hf_hub_id": None,
        "custom_load": False,
        "license": None,
    }
    model: torch.nn.Module = timm.create_model(
        timm_model, pretrained=False, pretrained_cfg_overlay=overlay, **dict(model_kwargs)
    )
    return model


def read_card(path: Path) -> dict[str, Any]:
    """The JSON card at ``path``, checked for the keys :func:`load_source_model` needs."""
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise CheckpointError(f"source-model card {path} is missing; {_REGENERATE}") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"source-model card {path} is unreadable or not JSON ({err}); {_REGENERATE}"
        ) from err
    if not isinstance(card, dict):
        raise CheckpointError(f"source-model card {path} must hold a JSON object; {_REGENERATE}")
    missing = [key for key in _REQUIRED_KEYS if key not in card]
    if missing:
        raise CheckpointError(f"source-model card {path} lacks {missing}; {_REGENERATE}")
    if card["format"] != CARD_FORMAT:
        raise CheckpointError(
            f"source-model card {path} has format {card['format']!r}, this p3b-fx reads {CARD_FORMAT}; "
            f"{_REGENERATE}"
        )
    return card


def load_source_model(
    *, directory: str | Path | None = None, stem: str = SOURCE_STEM
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the shipped source model and load its weights; returns ``(model in eval mode, card)``.

    Raises :class:`CheckpointError` when the card or weights are missing, corrupt (checksum), or do
    not fit the architecture the card describes.
    """
    folder = Path(directory) if directory is not None else ASSETS_DIR
    card = read_card(folder / f"{stem}.json")
    weights = folder / str(card["weights_file"])
    if not weights.is_file():
        raise CheckpointError(f"source-model weights {weights} are missing; {_REGENERATE}")
    if sha256_of(weights) != card["weights_sha256"]:
        raise CheckpointError(
            f"source-model weights {weights} do not match the SHA-256 in {folder / stem}.json (corrupt or "
            f"from another run); {_REGENERATE}"
        )
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(
            f"source-model weights {weights} are not valid safetensors ({err}); {_REGENERATE}"
        ) from err
    model = build_vit(str(card["timm_model"]), card["model_kwargs"], card)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"source-model weights {weights} do not fit {card['timm_model']} with {card['model_kwargs']} "
            f"({err}); {_REGENERATE}"
        ) from err
    logger.debug("loaded source model %s (test accuracy %.4f)", weights, card["test_accuracy"])
    return model.eval(), card
