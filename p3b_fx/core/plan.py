"""KeepPlan: which elements of every group survive. The contract between method and compiler.

A plan is frozen, JSON round-trippable, and validated against the ``GroupSet`` of the graph it is
applied to (same architecture fingerprint, indices in range, sorted, unique; unprunable groups
keep everything).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p3b_fx.core.groups import Block, GroupSet, Role
from p3b_fx.core.io import atomic_write_text
from p3b_fx.errors import PlanError

FORMAT_VERSION = 1


@dataclass(frozen=True)
class KeepPlan:
    """Kept indices per group name. Groups not listed keep all their elements."""

    fingerprint: str
    keep: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def from_mapping(cls, groups: GroupSet, keep: Mapping[str, Any]) -> KeepPlan:
        """Build a plan from ``{group: indices}`` (any int iterable, any order); validates it."""
        items = tuple(sorted((name, tuple(sorted(int(i) for i in idx))) for name, idx in keep.items()))
        plan = cls(groups.fingerprint(), items)
        plan.validate(groups)
        return plan

    @classmethod
    def dense(cls, groups: GroupSet) -> KeepPlan:
        return cls(groups.fingerprint(), ())

    @classmethod
    def random(cls, groups: GroupSet, keep_ratio: float, seed: int = 0) -> KeepPlan:
        """Each prunable group keeps a random ``keep_ratio`` share (at least one element)."""
        if not 0.0 < keep_ratio <= 1.0:
            raise PlanError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        rng = random.Random(seed)
        keep = {}
        for g in groups.prunable:
            n = max(1, round(g.size * keep_ratio))
            keep[g.name] = rng.sample(range(g.size), n)
        return cls.from_mapping(groups, keep)

    def as_dict(self) -> dict[str, tuple[int, ...]]:
        return dict(self.keep)

    def indices(self, groups: GroupSet, name: str) -> tuple[int, ...]:
        """Kept indices of group ``name`` (all of them when the plan does not list it)."""
        found = self.as_dict().get(name)
        return found if found is not None else tuple(range(groups.group(name).size))

    def kept_sizes(self, groups: GroupSet) -> dict[str, int]:
        return {g.name: len(self.indices(groups, g.name)) for g in groups}

    def removed_blocks(self, groups: GroupSet) -> tuple[Block, ...]:
        kept = self.kept_sizes(groups)
        return tuple(b for b in groups.blocks if groups.block_removed(b, kept))

    def effective(self, groups: GroupSet) -> dict[str, tuple[int, ...]]:
        """Kept indices of every group, with every group of a removed block emptied."""
        removed = {b.name for b in self.removed_blocks(groups)}
        return {g.name: () if g.block in removed else self.indices(groups, g.name) for g in groups}

    def predicted_params(self, groups: GroupSet) -> int:
        return groups.model_params(self.kept_sizes(groups))

    def predicted_flops(self, groups: GroupSet) -> int:
        return groups.model_flops(self.kept_sizes(groups))

    def validate(self, groups: GroupSet) -> None:
        """Raise ``PlanError`` unless this plan fits ``groups`` exactly."""
        if self.fingerprint != groups.fingerprint():
            raise PlanError(
                f"keep plan was made for architecture {self.fingerprint}, but this model is "
                f"{groups.fingerprint()}: make the plan from this model's groups (p3b_fx.find_groups); "
                "a plan from another model, or from a p3b-fx version that grouped this model differently "
                "(rotary head dims, for one, are pruned in pairs since 2026-11-28), does not fit"
            )
        seen: set[str] = set()
        for name, idx in self.keep:
            if name in seen:
                raise PlanError(f"keep plan lists group '{name}' twice")
            seen.add(name)
            if not groups.has_group(name):
                raise PlanError(f"keep plan names group '{name}', which this model does not have")
            self._check_indices(groups, name, idx)
        self._check_removals(groups)

    def _check_removals(self, groups: GroupSet) -> None:
        """An emptied group removes its block: refuse that where the removal would not be exact."""
        kept = self.kept_sizes(groups)
        for block in groups.blocks:
            empty = [g for g in block.groups if kept[g] == 0]
            if not empty or groups.block_removable(block):
                continue
            write = [groups.group(g) for g in block.groups if groups.group(g).role is Role.WRITE]
            why = f"its write group is not prunable ({write[0].reason})" if write else "it has no write group"
            raise PlanError(
                f"keep plan empties group '{empty[0]}' of block '{block.name}', which cannot be removed "
                f"exactly: {why}; keep at least one element of every group of this block"
            )

    @staticmethod
    def _check_indices(groups: GroupSet, name: str, idx: tuple[int, ...]) -> None:
        g = groups.group(name)
        bad = [i for i in idx if not 0 <= i < g.size]
        if bad:
            raise PlanError(f"group '{name}' has {g.size} elements; plan indices {bad[:5]} are out of range")
        if len(set(idx)) != len(idx):
            raise PlanError(f"group '{name}': plan indices are duplicated")
        if list(idx) != sorted(idx):
            raise PlanError(f"group '{name}': plan indices must be sorted ascending")
        if not g.prunable and len(idx) != g.size:
            raise PlanError(f"group '{name}' is not prunable ({g.reason}) but the plan drops elements of it")

    def to_json(self) -> str:
        body = {"format": FORMAT_VERSION, "fingerprint": self.fingerprint, "keep": dict(self.keep)}
        return json.dumps(body, indent=1)

    @classmethod
    def from_json(cls, text: str) -> KeepPlan:
        try:
            body = json.loads(text)
            if body.get("format") != FORMAT_VERSION:
                raise PlanError(f"keep plan format {body.get('format')!r} is not {FORMAT_VERSION}")
            keep = tuple(sorted((str(k), tuple(int(i) for i in v)) for k, v in body["keep"].items()))
            return cls(str(body["fingerprint"]), keep)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PlanError(f"not a keep plan: {exc}; expected JSON with 'fingerprint' and 'keep'") from exc

    def save(self, path: str | Path) -> None:
        """Write atomically (temporary file, then rename)."""
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> KeepPlan:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise PlanError(f"cannot read keep plan {path}: {exc.strerror}") from exc
        try:
            return cls.from_json(text)
        except PlanError as exc:
            raise PlanError(f"{path}: {exc}") from exc
