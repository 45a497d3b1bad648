"""KeepPlan: JSON round trip and validation against the groups."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import p3b_fx
from p3b_fx import KeepPlan
from p3b_fx.errors import PlanError
from tests.conftest import tiny_vit


@pytest.fixture(scope="module")
def groups() -> p3b_fx.GroupSet:
    return p3b_fx.find_groups(p3b_fx.trace(tiny_vit()))


def test_json_round_trip(groups: p3b_fx.GroupSet, tmp_path: Path) -> None:
    plan = KeepPlan.random(groups, 0.5, seed=3)
    assert KeepPlan.from_json(plan.to_json()) == plan
    plan.save(tmp_path / "plan.json")
    assert KeepPlan.load(tmp_path / "plan.json") == plan
    assert not list(tmp_path.glob("*.tmp"))


def test_random_plan_keeps_the_ratio_and_skips_fixed_groups(groups: p3b_fx.GroupSet) -> None:
    plan = KeepPlan.random(groups, 0.25, seed=0)
    sizes = plan.kept_sizes(groups)
    for g in groups:
        assert sizes[g.name] == (max(1, round(g.size * 0.25)) if g.prunable else g.size)


@pytest.mark.parametrize(
    ("keep", "message"),
    [
        ({"blocks.0.attn:heads": (0, 9)}, "out of range"),
        ({"blocks.0.attn:heads": (1, 1)}, "duplicated"),
        ({"blocks.0.attn:heads": (2, 1)}, "sorted"),
        ({"blocks.7.attn:heads": (0,)}, "does not have"),
        ({"blocks.0.attn:select": (0, 1)}, "not prunable"),
    ],
)
def test_invalid_plans_are_refused(
    groups: p3b_fx.GroupSet, keep: dict[str, tuple[int, ...]], message: str
) -> None:
    plan = KeepPlan(groups.fingerprint(), tuple(sorted(keep.items())))
    with pytest.raises(PlanError, match=message):
        plan.validate(groups)


def test_plan_for_another_architecture_is_refused(groups: p3b_fx.GroupSet) -> None:
    other = p3b_fx.find_groups(p3b_fx.trace(tiny_vit(depth=3)))
    plan = KeepPlan.random(other, 0.5)
    with pytest.raises(PlanError, match=r"made for architecture .* a p3b-fx version that grouped this model"):
        p3b_fx.slim(p3b_fx.trace(tiny_vit()), plan)


@pytest.mark.parametrize("text", ["not json", json.dumps({"format": 99}), json.dumps({"format": 1})])
def test_malformed_json_is_a_plan_error(text: str) -> None:
    with pytest.raises(PlanError):
        KeepPlan.from_json(text)


def test_missing_plan_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match=r"cannot read keep plan .*nope\.json"):
        KeepPlan.load(tmp_path / "nope.json")


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_random_plan_rejects_bad_ratio(groups: p3b_fx.GroupSet, ratio: float) -> None:
    with pytest.raises(PlanError, match="keep_ratio"):
        KeepPlan.random(groups, ratio)


def test_a_plan_may_not_empty_a_block_whose_removal_is_not_exact() -> None:
    """XCiT's class-attention blocks have no prunable write gate (their output joins the class token
    back by a ``cat``): emptying their read group is refused."""
    import timm  # noqa: PLC0415

    model = timm.create_model("xcit_nano_12_p16_224", pretrained=False, img_size=32, depth=1,
                              num_classes=5).eval()  # fmt: skip
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    fixed = [b for b in groups.blocks if not groups.block_removable(b)]
    assert [b.name for b in fixed] == [f"cls_attn_blocks.{i}.{k}" for i in (0, 1) for k in ("attn", "mlp")]
    read = f"{fixed[0].name}:read"
    assert groups.group(read).prunable
    with pytest.raises(PlanError, match="cannot be removed exactly: its write group is not prunable"):
        p3b_fx.KeepPlan.from_mapping(groups, {read: []})
    vit = p3b_fx.find_groups(p3b_fx.trace(tiny_vit()))
    assert all(vit.block_removable(b) for b in vit.blocks)
