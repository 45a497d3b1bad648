"""PruneConfig: every option of a P3B pruning run, frozen and validated once.

Sources, lowest priority first: the defaults below, a TOML file (``load_toml``), then command-line
overrides where ``None`` means "not given" (so CLI defaults never hide a TOML value). Nothing
mutates a config during a run; a resumed run checks that its config matches the stored one.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p3b_fx.errors import ConfigError

METHODS = ("p3b", "dense", "uniform", "global-taylor", "global-magnitude")
GRANULARITIES = ("reference", "deploy")
BUDGET_UNITS = ("params", "flops")
PROBE_KINDS = ("patch_conv", "patch_linear")
PROBE_DTYPES = ("float32", "bfloat16")
PROBE_IMPLS = ("auto", "per-block", "grouped")
TORCH_COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune-no-cudagraphs")
"""``torch_compile`` values: off (eager) or a ``torch.compile`` mode."""
LR_DECAYS = ("cosine", "constant")
SOURCE_MODEL = "source"
"""``model`` value that selects the shipped Fashion-MNIST source model (the default)."""

REFERENCE_BATCH = 512
"""The base learning rate is given for this batch size and scaled linearly (method doc §5)."""

DIST_TIMEOUT_MINUTES = 30.0
"""Default time a collective waits for the other ranks before the run stops (``dist_timeout``)."""


@dataclass(frozen=True)
class PruneConfig:
    """One pruning run. ``lr`` is the base rate at batch 512; :attr:`scaled_lr` is what AdamW uses.

    The learning rate is constant while pruning (method doc §5). ``lr_decay`` shapes the fine-tuning
    epochs that follow (the slim model's ``finetune_epochs``; for ``dense``, its last
    ``finetune_epochs``): ``cosine`` decays it per step to 0, ``constant`` keeps it.

    Probe cost: ``probe`` picks the patch probe (``patch_conv`` is the reference design),
    ``probe_hidden`` the conv probe's channels (default: max(16, width // 4), see
    :mod:`p3b_fx.benefit`) and ``probe_every`` runs
    the probes (their training step and the ΔΨ sample) on every N-th step only, plus the last step
    of each update window; 1 is the reference. The block benefit is then averaged over fewer,
    equally weighted samples of the same window. ``probe_fraction`` (in (0, 1]) has the probes read
    only the first ceil(fraction · batch) samples of each mini-batch (at least 2; a random subset,
    as the loader shuffles): they still train and sample ΔΨ on every step, on fewer images; 1 is the
    reference. ``probe_dtype`` ``bfloat16`` runs the probes under
    autocast in bfloat16 (their cross-entropies and ΔΨ still in float32); ``float32`` is the
    reference, and the probes stay outside ``amp``'s float16 either way. ``probe_impl`` says how conv
    probes run: ``per-block`` (one small conv chain per block and map), ``grouped`` (all blocks in one
    grouped convolution per layer: the same function, see :mod:`p3b_fx.benefit`) or ``auto``
    (grouped on CUDA, per-block on the CPU, where each is the faster: ``docs/bench-train-step.md``).
    Models whose blocks do not share one stream layout always run per block.

    ``torch_compile``: ``off`` (eager, the default) or a ``torch.compile`` mode for the training
    steps: the masked model and the probes of a P3B / uniform run, and the model of every plain
    fine-tuning run (dense, the slim fine-tune); the global baselines' pruning phase, whose
    Torch-Pruning hooks change the model's shapes as it trains, stays eager. The same functions
    (tested against eager), compiled on first use and once more per combination of the step's
    switches (taps recording, gates scoring). ``reduce-overhead`` adds CUDA graphs to the model
    (CUDA only). ``probe_cudagraphs`` (experimental, ``reduce-overhead`` only, no CLI flag until a
    GPU has measured it: ``tools/bench_train_step.py`` variants 16 and 17) captures the probes in CUDA
    graphs too; by default they are compiled without (see :func:`p3b_fx.train.compiled`).

    ``batch_size`` is per process; ``world_size`` (the number of torchrun processes) is filled in by
    :func:`p3b_fx.train.run` from the process group, so the effective batch is their product.
    ``dist_timeout`` (minutes) bounds how long a rank waits for the others in a collective.
    """

    model: str = SOURCE_MODEL
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    pretrained: bool = False
    data: str = "fashion-mnist"
    data_root: str | None = None
    num_classes: int | None = None
    img_size: int | None = None
    prune_ratio: float = 0.5
    budget: str = "params"
    blocks_only: bool = False
    floor: float = 0.0
    method: str = "p3b"
    granularity: str = "reference"
    round_to: int = 1
    epochs: int = 10
    finetune_epochs: int = 0
    lr_decay: str = "cosine"
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    warmup_epochs: float | None = None
    sparse_epochs: float | None = None
    updates_per_epoch: int = 3
    probe: str = "patch_conv"
    probe_hidden: int | None = None
    probe_every: int = 1
    probe_fraction: float = 1.0
    probe_dtype: str = "float32"
    probe_impl: str = "auto"
    torch_compile: str = "off"
    probe_cudagraphs: bool = False
    augment: bool = True
    seed: int = 0
    out: str = "runs/p3b"
    resume: bool = False
    force: bool = False
    device: str = "auto"
    amp: bool = True
    max_steps_per_epoch: int | None = None
    world_size: int = 1
    dist_timeout: float = DIST_TIMEOUT_MINUTES

    def __post_init__(self) -> None:
        _check_types(self)
        _check_choices(self)
        _check_numbers(self)
        _check_schedule(self)

    @property
    def keep_ratio(self) -> float:
        return 1.0 - self.prune_ratio

    @property
    def effective_batch(self) -> int:
        """Samples per optimiser step over all ranks: per-process batch × world size."""
        return self.batch_size * self.world_size

    @property
    def scaled_lr(self) -> float:
        """The linear scaling rule on the effective batch: lr × effective_batch / 512."""
        return self.lr * self.effective_batch / REFERENCE_BATCH

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable values (for ``report.json`` and resume checks)."""
        out = dataclasses.asdict(self)
        out["model_kwargs"] = dict(self.model_kwargs)
        return out

    def replace(self, **changes: Any) -> PruneConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_sources(
        cls,
        toml_path: str | Path | None = None,
        overrides: Mapping[str, Any] | None = None,
        *,
        base: Mapping[str, Any] | None = None,
        file_values: Mapping[str, Any] | None = None,
    ) -> PruneConfig:
        """Defaults < ``base`` (a tool's own defaults) < TOML file < overrides whose value is not None.

        ``file_values``: the TOML file's options when the caller has already read it (then
        ``toml_path`` only names it in error messages).
        """
        values: dict[str, Any] = dict(base or {})
        if file_values is not None:
            values.update(file_values)
        elif toml_path is not None:
            values.update(load_toml(toml_path))
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.from_mapping(values, where=str(toml_path) if toml_path else "options")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str = "options") -> PruneConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            hint = ""
            if set(unknown) <= set(COMPILE_OPTIONS):
                hint = (" (those are tools/prune_and_compile.py options: put them in a [compile] table "
                        "and the pruning options in [prune] to share one file across tools)")  # fmt: skip
            raise ConfigError(
                f"{where}: unknown option(s) {unknown}{hint}; known options are {', '.join(sorted(known))}"
            )
        try:
            return cls(**dict(values))
        except TypeError as exc:
            raise ConfigError(f"{where}: {exc}") from exc


def load_toml(path: str | Path, table: str = "prune") -> dict[str, Any]:
    """The options of one table of a TOML file; '-' in keys becomes '_'.

    A file either holds its options at the top level (flat), or in tables: ``[prune]`` for the
    pruning options, ``[compile]`` for ``tools/prune_and_compile.py``'s own. A flat file's options
    are returned whatever ``table`` is; the caller sorts them.
    """
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {p} does not exist; check the --config path") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"--config {p} is a directory; name the TOML file in it") from exc
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {p} is not valid TOML: {exc}") from exc
    sectioned = any(t in data for t in TOML_TABLES)
    section = data.get(table, {}) if sectioned else data
    if not isinstance(section, dict):
        raise ConfigError(f"config file {p}: [{table}] must be a table of options")
    if sectioned:
        stray = sorted(k for k in data if k not in TOML_TABLES)
        if stray:
            raise ConfigError(
                f"config file {p}: option(s) {stray} sit outside the [prune] / [compile] tables; "
                "move them into one (or drop the tables and keep every option at the top level)"
            )
    return {str(k).replace("-", "_"): v for k, v in section.items()}


TOML_TABLES = ("prune", "compile")
"""The tables a sectioned config file may hold."""


def _choice(value: str, allowed: tuple[str, ...], name: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} {value!r} is not one of {', '.join(allowed)}; pick one of those")


def _check_choices(cfg: PruneConfig) -> None:
    _choice(cfg.method, METHODS, "method")
    _choice(cfg.granularity, GRANULARITIES, "granularity")
    _choice(cfg.budget, BUDGET_UNITS, "budget unit")
    _choice(cfg.probe, PROBE_KINDS, "probe kind")
    _choice(cfg.probe_dtype, PROBE_DTYPES, "probe dtype")
    _choice(cfg.probe_impl, PROBE_IMPLS, "probe implementation")
    _choice(cfg.torch_compile, TORCH_COMPILE_MODES, "torch_compile mode")
    _choice(cfg.lr_decay, LR_DECAYS, "lr_decay")
    if cfg.device not in ("auto", "cpu") and not cfg.device.startswith("cuda"):
        raise ConfigError(f"device {cfg.device!r} must be 'auto', 'cpu' or 'cuda[:N]'")
    if cfg.model == SOURCE_MODEL:
        given = {"--model-kwargs": bool(cfg.model_kwargs), "--img-size": cfg.img_size is not None,
                 "--pretrained": cfg.pretrained}  # fmt: skip
        ignored = [flag for flag, on in given.items() if on]
        if ignored:
            raise ConfigError(
                f"--model {SOURCE_MODEL} is the shipped ViT, built as its card says; {', '.join(ignored)} "
                "apply to timm models only: drop them, or name a timm model with --model"
            )
    if cfg.method.startswith("global-") and (cfg.budget != "params" or cfg.blocks_only):
        raise ConfigError(
            f"method {cfg.method} prunes to a parameter budget of the whole model; budget "
            f"{cfg.budget!r}{' with blocks_only' if cfg.blocks_only else ''} applies to p3b and uniform only"
        )
    if not isinstance(cfg.model_kwargs, Mapping):
        raise ConfigError(
            f"model_kwargs must be a table of timm constructor arguments, got {cfg.model_kwargs!r}"
        )


def _finite(value: float, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")


COMPILE_OPTIONS: dict[str, type] = {
    "target": str, "jetpack": str, "slim_model": str, "plan": str,
    "dynamic_batch": bool, "strict": bool, "simplify": bool,
}  # fmt: skip
"""``tools/prune_and_compile.py``'s own options (beside every pruning option) and their TOML types."""


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               Mapping: "a table / JSON object"}  # fmt: skip


@functools.cache
def _hints() -> dict[str, Any]:
    """PruneConfig's evaluated annotations (computed once: every config construction checks them)."""
    return typing.get_type_hints(PruneConfig)


def _check_types(cfg: PruneConfig) -> None:
    """Every option has its annotated type (TOML and library callers can pass anything): ``force =
    "false"`` must not count as true. Integers are accepted where a float is expected."""
    hints = _hints()
    for f in dataclasses.fields(cfg):
        value, hint = getattr(cfg, f.name), hints[f.name]
        members = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        if value is None and type(None) in members:
            continue
        base = [typing.get_origin(t) or t for t in members if t is not type(None)]
        ok = any(
            isinstance(value, bool) if t is bool
            else isinstance(value, (int, float)) and not isinstance(value, bool) if t is float
            else isinstance(value, t) and not isinstance(value, bool) if t is int
            else isinstance(value, t)
            for t in base
        )  # fmt: skip
        if not ok:
            want = " or ".join(_TYPE_WORDS.get(t, t.__name__) for t in base)
            raise ConfigError(f"{f.name} must be {want}, got {value!r}")


def _check_shares(cfg: PruneConfig) -> None:
    if not 0.0 < cfg.prune_ratio < 1.0:
        raise ConfigError(
            f"prune ratio {cfg.prune_ratio} must lie strictly between 0 and 1 (0.5 removes half the "
            "parameters); for no pruning use --method dense"
        )
    if not 0.0 <= cfg.floor < 1.0:
        raise ConfigError(f"floor {cfg.floor} must be in [0, 1)")
    if not 0.0 < cfg.probe_fraction <= 1.0:
        raise ConfigError(
            f"probe_fraction {cfg.probe_fraction} must be in (0, 1]: the share of each mini-batch the "
            "probes read (1 = all of it, the reference)"
        )
    if cfg.probe_cudagraphs and cfg.torch_compile != "reduce-overhead":
        raise ConfigError(
            f"probe_cudagraphs captures the probes in CUDA graphs, which only torch_compile "
            f"'reduce-overhead' makes; got torch_compile {cfg.torch_compile!r}"
        )


def _check_numbers(cfg: PruneConfig) -> None:
    for name in ("prune_ratio", "floor", "lr", "weight_decay", "label_smoothing", "dist_timeout",
                 "probe_fraction"):  # fmt: skip
        _finite(getattr(cfg, name), name)
    if cfg.dist_timeout <= 0:
        raise ConfigError(f"dist_timeout must be > 0 minutes, got {cfg.dist_timeout}")
    _check_shares(cfg)
    positive = {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "round_to": cfg.round_to,
                "updates_per_epoch": cfg.updates_per_epoch, "world_size": cfg.world_size,
                "probe_every": cfg.probe_every}  # fmt: skip
    for name, value in positive.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    if not isinstance(cfg.finetune_epochs, int) or cfg.finetune_epochs < 0:
        raise ConfigError(f"finetune_epochs must be an integer >= 0, got {cfg.finetune_epochs!r}")
    if cfg.lr <= 0 or cfg.weight_decay < 0 or not 0 <= cfg.label_smoothing < 1:
        raise ConfigError(
            f"need lr > 0, weight_decay >= 0 and label_smoothing in [0, 1); got {cfg.lr}, "
            f"{cfg.weight_decay}, {cfg.label_smoothing}"
        )
    for name in ("num_classes", "img_size", "probe_hidden", "max_steps_per_epoch"):
        value = getattr(cfg, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be a positive integer when given, got {value!r}")
    if cfg.num_classes is not None and cfg.num_classes < 2:
        raise ConfigError(f"num_classes must be >= 2, got {cfg.num_classes}")


def _check_schedule(cfg: PruneConfig) -> None:
    warm, sparse = cfg.warmup_epochs, cfg.sparse_epochs
    for name, value in (("warmup_epochs", warm), ("sparse_epochs", sparse)):
        if value is not None:
            _finite(value, name)
            if not 0 <= value <= cfg.epochs:
                raise ConfigError(f"{name} {value} must lie in [0, epochs={cfg.epochs}]")
    if warm is not None and sparse is not None and sparse < warm:
        raise ConfigError(f"sparse_epochs {sparse} comes before warmup_epochs {warm}; swap them")
    if warm is not None and warm >= cfg.epochs:
        raise ConfigError(f"warmup_epochs {warm} leaves no pruning epochs out of {cfg.epochs}")


def json_object(text: str) -> dict[str, Any]:
    """argparse type for ``--model-kwargs``: a JSON object, with an example when it is not one."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not valid JSON ({exc.msg} at column {exc.colno}); write e.g. "
            '\'{"depth": 6, "img_size": 32}\' (double quotes, in single quotes for the shell)'
        ) from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} must be a JSON object such as '{{\"depth\": 6}}'")
    return value
