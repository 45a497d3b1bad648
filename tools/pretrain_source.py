"""Pretrain the shipped source model: a small timm ViT on all 10 Fashion-MNIST classes.

Writes ``p3b_fx/assets/source_vit_fmnist.safetensors`` (weights) and ``source_vit_fmnist.json`` (the
card :func:`p3b_fx.source_model.load_source_model` rebuilds it from), both atomically.

Config trade-off (measured on the 2-core AMD EPYC dev box, ONE thread, batch 128, train step incl.
AdamW): depth 6 / dim 192 / 3 heads / mlp 4 with 28 px inputs runs at ~276 img/s with 7x7 patches
(16 tokens + cls; 3.6 min per 60k epoch) but only ~87 img/s with 4x4 patches (49 tokens + cls; 11.5
min per epoch). Patch 4 would not fit ten epochs in an hour, and the downstream benchmark fine-tunes
and prunes this model ~27 times in 90 minutes, so we keep depth 6 (12 residual sub-blocks, enough for
per-block allocation to matter) and use fewer, larger tokens (patch 7) instead of a shallower net.

Usage: python tools/pretrain_source.py --epochs 10 --threads 1   (see docs/source-model.md)
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import logging
import math
import pickle
import random
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from safetensors.torch import save
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from p3b_fx.core.io import atomic_write_bytes, sha256_of
from p3b_fx.data import DATASETS, Sample, build_loaders
from p3b_fx.errors import CheckpointError, ConfigError, P3BError, TrainingError
from p3b_fx.machine import describe
from p3b_fx.source_model import ASSETS_DIR, CARD_FORMAT, SOURCE_STEM, build_vit

logger = logging.getLogger("pretrain_source")

TIMM_MODEL = "vit_tiny_patch16_224"  # the registry entry whose kwargs we override (dim 192, 3 heads)
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
STORAGE_DTYPE = torch.float16  # halves the asset (2.7 M parameters: 5.4 MB); accuracy measured after rounding


@dataclass(frozen=True)
class PretrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    seed: int = 0
    threads: int = 1
    img_size: int = 28
    patch_size: int = 7
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 4.0
    crop: bool = False  # random crop (pad 2); the flip is always on. Off for the shipped weights (docs)
    train_limit: int | None = None  # use only the first N shuffled training images (smoke runs)

    def validate(self) -> None:
        positive = {"epochs": self.epochs, "batch-size": self.batch_size, "threads": self.threads,
                    "depth": self.depth, "num-heads": self.num_heads}  # fmt: skip
        problems = [f"{name} must be >= 1, got {value}" for name, value in positive.items() if value < 1]
        if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.label_smoothing < 1:
            problems.append("lr must be > 0, weight-decay >= 0 and label-smoothing in [0, 1)")
        if self.img_size % self.patch_size:
            problems.append(f"img-size {self.img_size} must be a multiple of patch-size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            problems.append(f"embed-dim {self.embed_dim} must be a multiple of num-heads {self.num_heads}")
        if self.train_limit is not None and self.train_limit < 1:
            problems.append(f"train-limit must be >= 1, got {self.train_limit}")
        if problems:
            raise ConfigError("invalid pretraining options: " + "; ".join(problems))

    def model_kwargs(self) -> dict[str, Any]:
        return {"img_size": self.img_size, "patch_size": self.patch_size, "embed_dim": self.embed_dim,
                "depth": self.depth, "num_heads": self.num_heads, "mlp_ratio": self.mlp_ratio,
                "num_classes": 10, "class_token": True, "global_pool": "token"}  # fmt: skip


def parse_args(argv: list[str] | None) -> tuple[PretrainConfig, argparse.Namespace]:
    d = PretrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads, help="torch intra-op threads (keep 1)")
    p.add_argument("--img-size", type=int, default=d.img_size)
    p.add_argument("--patch-size", type=int, default=d.patch_size)
    p.add_argument("--embed-dim", type=int, default=d.embed_dim)
    p.add_argument("--depth", type=int, default=d.depth)
    p.add_argument("--num-heads", type=int, default=d.num_heads)
    p.add_argument("--mlp-ratio", type=float, default=d.mlp_ratio)
    p.add_argument(
        "--crop", action=argparse.BooleanOptionalAction, default=d.crop, help="random-crop augmentation (off)"
    )
    p.add_argument("--train-limit", type=int, default=None, help="train on N images only (smoke run)")
    p.add_argument("--out", type=Path, default=ASSETS_DIR, help="output folder (default: p3b_fx/assets)")
    p.add_argument("--data-root", type=Path, default=None, help="torchvision data root (default: cache)")
    p.add_argument("--download", action="store_true", help="download Fashion-MNIST if not found locally")
    p.add_argument("--resume", type=Path, default=None, help="epoch checkpoint to resume from and update")
    p.add_argument("--progress-interval", type=float, default=10.0, help="seconds between tqdm updates")
    p.add_argument(
        "--speed", type=int, metavar="STEPS", default=None,
        help="train nothing: time STEPS training steps and eval batches of this config on random "
        "images (fp32 and bfloat16 autocast), print one Markdown row and exit",
    )  # fmt: skip
    ns = p.parse_args(argv)
    fields = set(PretrainConfig.__dataclass_fields__)
    cfg = PretrainConfig(**{k: v for k, v in vars(ns).items() if k in fields})
    cfg.validate()
    return cfg, ns


def seed_everything(seed: int, threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already set in this process (only possible once)
        logger.debug("inter-op threads already fixed")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def make_optimizer(model: nn.Module, cfg: PretrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms, position embedding and class token (1-D or tokens)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        (no_decay if param.ndim <= 1 or name in ("pos_embed", "cls_token") else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))


def make_schedule(opt: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup for ``warmup`` steps, then cosine decay to 1% of the peak at ``total`` steps."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    correct = total = 0
    for images, labels in loader:
        correct += int((model(images).argmax(dim=1) == labels).sum())
        total += len(labels)
    return correct / max(1, total)


@dataclass
class TrainState:
    """Everything an epoch boundary needs to resume bit-for-bit (with the global and loader RNG states)."""

    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    loader_gen: torch.Generator
    epoch: int = 0  # epochs finished
    elapsed_s: float = 0.0  # training seconds summed over (resumed) processes
    mean_loss: float = float("nan")


def save_resume(path: Path, st: TrainState, cfg: PretrainConfig) -> None:
    blob = {"cfg": asdict(cfg), "epoch": st.epoch, "elapsed_s": st.elapsed_s, "mean_loss": st.mean_loss,
            "model": st.model.state_dict(), "opt": st.opt.state_dict(), "sched": st.sched.state_dict(),
            "rng": torch.get_rng_state(), "loader_gen": st.loader_gen.get_state()}  # fmt: skip
    buffer = io.BytesIO()
    torch.save(blob, buffer)
    atomic_write(path, buffer.getvalue())


def load_resume(path: Path, st: TrainState, cfg: PretrainConfig) -> None:
    """Restore ``st`` (and the global RNG) from an epoch checkpoint written with the same options."""
    try:
        blob = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise CheckpointError(
            f"resume checkpoint {path} is unreadable ({err}); delete it to start over"
        ) from err
    if blob.get("cfg") != asdict(cfg):
        raise ConfigError(
            f"resume checkpoint {path} was written with options {blob.get('cfg')}, not {asdict(cfg)}; "
            "pass the same options or delete it to start over"
        )
    st.model.load_state_dict(blob["model"])
    st.opt.load_state_dict(blob["opt"])
    st.sched.load_state_dict(blob["sched"])
    torch.set_rng_state(blob["rng"])
    st.loader_gen.set_state(blob["loader_gen"])
    st.epoch, st.elapsed_s, st.mean_loss = (
        int(blob["epoch"]),
        float(blob["elapsed_s"]),
        float(blob["mean_loss"]),
    )
    logger.info("resumed from %s after epoch %d", path, st.epoch)


def train_epoch(st: TrainState, loader: DataLoader[Sample], criterion: nn.Module, bar: tqdm) -> float:
    """One pass over ``loader``; returns the mean training loss."""
    st.model.train()
    loss_sum, n = 0.0, 0
    for images, labels in loader:
        loss = criterion(st.model(images), labels)
        if not torch.isfinite(loss):
            raise TrainingError(f"non-finite loss {float(loss)} in epoch {st.epoch + 1}; lower --lr")
        st.opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(st.model.parameters(), 1.0)
        st.opt.step()
        st.sched.step()
        loss_sum, n = loss_sum + loss.item(), n + 1
        bar.update(1)
        bar.set_postfix(epoch=st.epoch + 1, loss=f"{loss_sum / n:.3f}", refresh=False)
    return loss_sum / max(1, n)


def train(
    model: nn.Module, cfg: PretrainConfig, loader: DataLoader[Sample], interval: float, resume: Path | None
) -> TrainState:
    """Train in place, resuming from / saving to ``resume`` at epoch boundaries when given."""
    opt = make_optimizer(model, cfg)
    steps = cfg.epochs * len(loader)
    sched = make_schedule(opt, round(cfg.warmup_epochs * len(loader)), steps)
    if loader.generator is None:
        raise ConfigError("the training loader needs a seeded generator for reproducible shuffling")
    st = TrainState(model, opt, sched, loader.generator)
    if resume is not None and resume.is_file():
        load_resume(resume, st, cfg)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    bar = tqdm(
        total=steps, initial=st.epoch * len(loader), desc="pretrain", unit="step", mininterval=interval
    )
    while st.epoch < cfg.epochs:
        start = time.perf_counter()
        st.mean_loss = train_epoch(st, loader, criterion, bar)
        st.epoch, st.elapsed_s = st.epoch + 1, st.elapsed_s + time.perf_counter() - start
        logger.info("epoch %d/%d: mean train loss %.4f", st.epoch, cfg.epochs, st.mean_loss)
        if resume is not None:
            save_resume(resume, st, cfg)
    bar.close()
    return st


def atomic_write(path: Path, data: bytes) -> None:
    """Create ``path``'s folder, then write ``data`` atomically (temp file in that folder, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)


def machine_description(threads: int) -> str:
    return f"{describe(gpu=False)}, {threads} torch thread(s)"


@torch.no_grad()
def round_to_storage_dtype(model: nn.Module) -> None:
    """Round float tensors to :data:`STORAGE_DTYPE` and back: the measured accuracy is the shipped one."""
    for tensor in model.state_dict().values():
        if tensor.is_floating_point():
            tensor.copy_(tensor.to(STORAGE_DTYPE))


def write_assets(model: nn.Module, card: dict[str, Any], out: Path) -> tuple[Path, Path]:
    weights = out / f"{SOURCE_STEM}.safetensors"
    state = {k: v.detach().to(STORAGE_DTYPE).contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(weights, save(state, metadata={"format": "pt"}))
    card = {**card, "weights_file": weights.name, "weights_sha256": sha256_of(weights)}
    card_path = out / f"{SOURCE_STEM}.json"
    atomic_write(card_path, (json.dumps(card, indent=2) + "\n").encode())
    return weights, card_path


def without_resume(argv: list[str]) -> list[str]:
    """``argv`` minus ``--resume PATH``: resuming restores every state, so it does not change the result."""
    kept: list[str] = []
    skip_next = False
    for arg in argv:
        if skip_next or arg.startswith("--resume="):
            skip_next = False
        elif arg == "--resume":
            skip_next = True
        else:
            kept.append(arg)
    return kept


def run(cfg: PretrainConfig, ns: argparse.Namespace, argv: list[str]) -> int:
    seed_everything(cfg.seed, cfg.threads)
    train_loader, test_loader = build_loaders(
        "fashion-mnist", img_size=cfg.img_size, mean=MEAN, std=STD, batch_size=cfg.batch_size,
        eval_batch_size=500, seed=cfg.seed, root=ns.data_root, augment=True, crop=cfg.crop,
        download=ns.download,
    )  # fmt: skip
    if cfg.train_limit is not None:
        subset = Subset(train_loader.dataset, range(min(cfg.train_limit, len(train_loader.dataset))))  # type: ignore[arg-type]
        gen = torch.Generator().manual_seed(cfg.seed)
        train_loader = DataLoader(subset, batch_size=cfg.batch_size, shuffle=True, generator=gen)
    card: dict[str, Any] = {
        "format": CARD_FORMAT, "timm_model": TIMM_MODEL, "model_kwargs": cfg.model_kwargs(),
        "input_size": [3, cfg.img_size, cfg.img_size], "mean": list(MEAN), "std": list(STD),
        "num_classes": 10, "class_names": list(DATASETS["fashion-mnist"].classes),
    }  # fmt: skip
    model = build_vit(TIMM_MODEL, cfg.model_kwargs(), card)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model %s %s: %.2f M parameters", TIMM_MODEL, cfg.model_kwargs(), n_params / 1e6)
    st = train(model, cfg, train_loader, ns.progress_interval, ns.resume)
    last_loss, train_s = st.mean_loss, st.elapsed_s
    round_to_storage_dtype(model)
    accuracy = evaluate(model, test_loader)
    logger.info("Fashion-MNIST test accuracy %.4f after %.1f min of training", accuracy, train_s / 60)
    card |= {
        "dataset": "fashion-mnist", "test_accuracy": round(accuracy, 4),
        "weights_dtype": str(STORAGE_DTYPE).removeprefix("torch."),
        "test_images": len(test_loader.dataset),  # type: ignore[arg-type]
        "train_images": len(train_loader.dataset), "parameters": n_params,  # type: ignore[arg-type]
        "final_train_loss": round(last_loss, 4), "train_seconds": round(train_s, 1),
        "train_config": asdict(cfg), "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_description(cfg.threads), "torch": torch.__version__, "timm": timm.__version__,
        "command": shlex.join(["python", "tools/pretrain_source.py", *without_resume(argv)]),
    }  # fmt: skip
    weights, card_path = write_assets(model, card, ns.out)
    logger.info("wrote %s (%.1f MB) and %s", weights, weights.stat().st_size / 1e6, card_path)
    return 0


def speed(cfg: PretrainConfig, steps: int) -> str:
    """One Markdown row: train and eval images/s of ``cfg``'s model, fp32 and bfloat16 autocast.

    A training step is forward, label-smoothed loss, backward and the AdamW step, as in
    :func:`train_epoch`; random images, so no data is needed. Medians over ``steps`` after 3
    warm-up steps, ``cfg.threads`` torch threads.
    """
    if steps < 1:
        raise ConfigError(f"--speed needs at least 1 step, got {steps}")
    seed_everything(cfg.seed, cfg.threads)
    card = {"input_size": [3, cfg.img_size, cfg.img_size], "mean": MEAN, "std": STD, "num_classes": 10}
    model = build_vit(TIMM_MODEL, cfg.model_kwargs(), card)
    opt, criterion = make_optimizer(model, cfg), nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    x = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size)
    y = torch.randint(0, 10, (cfg.batch_size,))

    def median_s(fn: Callable[[], object]) -> float:
        times = []
        for i in range(steps + 3):
            t0 = time.perf_counter()
            fn()
            if i >= 3:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def train_step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = criterion(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def eval_step() -> None:
        model.eval()(x)
        model.train()

    fp32 = median_s(lambda: train_step(False))
    bf16 = median_s(lambda: train_step(True))
    ev = median_s(eval_step)
    tokens = (cfg.img_size // cfg.patch_size) ** 2
    per_epoch = 60000 / (cfg.batch_size / fp32) / 60
    return (
        f"| depth {cfg.depth}, {cfg.img_size} px, patch {cfg.patch_size} | {tokens} + 1 | "
        f"{cfg.batch_size / fp32:.0f} | {per_epoch:.1f} | {cfg.batch_size / ev:.0f} | {fp32 / bf16:.2f} |"
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = sys.argv[1:] if argv is None else argv
    try:
        cfg, ns = parse_args(args)
        if ns.speed is not None:
            print("| config | tokens | train img/s | min per 60k epoch | eval img/s | bf16 speed-up |")
            print(speed(cfg, ns.speed))
            return 0
        return run(cfg, ns, args)
    except P3BError as err:
        logger.error("%s", err)  # the message is the report: no traceback for bad input
        return 2


if __name__ == "__main__":
    sys.exit(main())
