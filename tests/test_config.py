"""PruneConfig: defaults, validation with clear errors, TOML + CLI overrides (None = not given)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from p3b_fx.config import PruneConfig, load_toml
from p3b_fx.errors import ConfigError


def test_defaults_are_valid_and_lr_scales_with_batch() -> None:
    cfg = PruneConfig(batch_size=256, lr=5e-4)
    assert cfg.keep_ratio == pytest.approx(0.5)
    assert cfg.scaled_lr == pytest.approx(2.5e-4)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.2, 1.5, float("nan")])
def test_prune_ratio_outside_open_interval_is_refused(ratio: float) -> None:
    with pytest.raises(ConfigError, match=r"prune ratio|finite"):
        PruneConfig(prune_ratio=ratio)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("method", "magic", "method"),
        ("granularity", "coarse", "granularity"),
        ("budget", "watts", "budget unit"),
        ("epochs", 0, "epochs"),
        ("round_to", 0, "round_to"),
        ("finetune_epochs", -1, "finetune_epochs"),
        ("num_classes", 1, "num_classes"),
        ("warmup_epochs", 20.0, "warmup_epochs"),
        ("device", "tpu", "device"),
    ],
)
def test_bad_values_name_the_option(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PruneConfig(**{field: value})  # type: ignore[arg-type]


def test_sparse_before_warmup_is_refused() -> None:
    with pytest.raises(ConfigError, match="swap"):
        PruneConfig(epochs=10, warmup_epochs=5, sparse_epochs=2)


def test_toml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('[prune]\nprune-ratio = 0.7\nepochs = 3\nmethod = "uniform"\n')
    assert load_toml(path)["prune_ratio"] == 0.7
    cfg = PruneConfig.from_sources(path, {"epochs": 5, "method": None, "seed": None})
    assert (cfg.prune_ratio, cfg.epochs, cfg.method, cfg.seed) == (0.7, 5, "uniform", 0)


def test_unknown_option_in_toml_is_named(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("prune_ratoi = 0.7\n")
    with pytest.raises(ConfigError, match="prune_ratoi"):
        PruneConfig.from_sources(path)


@pytest.mark.parametrize("text", [None, "this is = = not toml"])
def test_missing_or_broken_toml(tmp_path: Path, text: str | None) -> None:
    path = tmp_path / "run.toml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=str(path.name)):
        load_toml(path)


def test_to_dict_round_trips() -> None:
    cfg = PruneConfig(model="vit_tiny_patch16_224", model_kwargs={"depth": 2}, prune_ratio=0.3)
    assert PruneConfig.from_mapping(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('force = "false"\n', "force must be true or false, got 'false'"),
        ("device = 5\n", "device must be a string, got 5"),
        ("max_steps_per_epoch = true\n", "max_steps_per_epoch must be an integer, got True"),
        ('data = ["a"]\n', r"data must be a string, got \['a'\]"),
    ],
)
def test_toml_values_of_the_wrong_type_are_refused(tmp_path: Path, text: str, message: str) -> None:
    """A string "false" must not count as true (--force would delete a run)."""
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        PruneConfig.from_sources(path)
    assert PruneConfig(lr=1).lr == 1  # an integer where a float is expected is fine


def test_timm_options_on_the_shipped_model_are_refused() -> None:
    """The shipped ViT is built from its card: timm options would be ignored silently."""
    with pytest.raises(ConfigError, match=r"--model-kwargs, --img-size apply to timm models only"):
        PruneConfig(model_kwargs={"depth": 2}, img_size=64)
    with pytest.raises(ConfigError, match=r"--pretrained apply to timm models only"):
        PruneConfig(pretrained=True)


def test_model_kwargs_flag_explains_bad_json() -> None:
    from p3b_fx.config import json_object  # noqa: PLC0415

    assert json_object('{"depth": 2}') == {"depth": 2}
    with pytest.raises(argparse.ArgumentTypeError, match=r"not valid JSON .*double quotes"):
        json_object("{depth: 2}")
    with pytest.raises(argparse.ArgumentTypeError, match="must be a JSON object"):
        json_object("[2]")


def test_compile_options_in_a_prune_file_point_to_the_compile_table(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('target = "onnx"\nepochs = 1\n')
    with pytest.raises(ConfigError, match=r"\['target'\] \(those are tools/prune_and_compile.py options"):
        PruneConfig.from_sources(path)


def test_a_config_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory; name the TOML file"):
        load_toml(tmp_path)
