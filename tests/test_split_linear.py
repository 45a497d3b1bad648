"""A linear split into unequal sections (SplitLinearPass): one linear per section to the compiler, one
fused module again in the slim model (FuseSplitPass). MobileViTv2's separable attention projects
[query (1), key (d), value (d)] with one 1×1 convolution; its key and value channels are prunable."""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import fx, nn

import p3b_fx
from passes.pointwise_conv import POINTWISE_KEY
from passes.split_linear import SPLIT_KEY, SplitLinearPass
from tests.conftest import assert_gates_train, exact_slim_plans


class _TokenSepAttn(nn.Module):
    """Separable attention on tokens (B, N, C): one linear makes [q (1), k (d), v (d)], split on the
    last axis; the one-element q broadcasts against k in a product."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.dim = dim
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 1 + 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm(x)).split([1, self.dim, self.dim], dim=-1)
        context = (k * q.softmax(dim=1)).sum(dim=1, keepdim=True)
        return x + self.proj(F.relu(v) * context)


class _ImageSepAttn(nn.Module):
    """MobileViTv2's ``LinearSelfAttention`` on an image (B, C, P, N): a 1×1 conv split on the channel
    axis, the context vector repeated over the positions by ``expand_as``."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.dim = dim
        self.norm = nn.GroupNorm(1, dim)
        self.qkv = nn.Conv2d(dim, 1 + 2 * dim, 1)
        self.out = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm(x)).split([1, self.dim, self.dim], dim=1)
        context = (k * F.softmax(q, dim=-1)).sum(dim=-1, keepdim=True)
        return x + self.out(F.relu(v) * context.expand_as(v))


class _Net(nn.Module):
    def __init__(self, block: type[nn.Module], image: bool) -> None:
        super().__init__()
        self.image = image
        self.blocks = nn.Sequential(block(), block())
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.blocks(x)
        return self.head(y.mean((2, 3)) if self.image else y.mean(1))


def _model(image: bool) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = _Net(_ImageSepAttn if image else _TokenSepAttn, image).eval().double()
    x = torch.randn(3, 8, 4, 5, dtype=torch.float64) if image else torch.randn(3, 6, 8, dtype=torch.float64)
    return model, x


def test_the_pass_splits_the_linear_into_sections_computing_the_same() -> None:
    model, x = _model(image=False)
    gm = fx.symbolic_trace(model)
    assert SplitLinearPass()(gm).modified
    assert gm.meta[SPLIT_KEY] == ("blocks.0.qkv", "blocks.1.qkv")
    sections = gm.get_submodule("blocks.0.qkv")
    assert isinstance(sections, nn.ModuleList) and [m.out_features for m in sections] == [1, 8, 8]
    torch.testing.assert_close(sections[2].weight, model.blocks[0].qkv.weight[9:])
    assert not [n for n in gm.graph.nodes if n.target == "split"]
    torch.testing.assert_close(gm(x), model(x), atol=1e-12, rtol=0)
    assert not SplitLinearPass()(gm).modified


def test_a_split_pointwise_conv_becomes_its_sections_as_pointwise_linears() -> None:
    """The 1×1 conv is a linear after PointwiseConvPass, followed by the permute back to channels
    first; the split on the channel axis is that linear's output axis."""
    model, x = _model(image=True)
    gm = p3b_fx.trace(model, input_shape=(1, 8, 4, 5))
    assert gm.meta[SPLIT_KEY] == ("blocks.0.qkv", "blocks.1.qkv")
    assert {"blocks.0.qkv.0", "blocks.0.qkv.1", "blocks.0.qkv.2"} <= set(gm.meta[POINTWISE_KEY])
    assert "blocks.0.qkv" not in gm.meta[POINTWISE_KEY]
    torch.testing.assert_close(gm(x), model(x), atol=1e-12, rtol=0)


class _Leave(nn.Module):
    """Splits the pass must leave: equal sections, the parts used as a list, a split of another axis,
    a linear output used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(4, 6), nn.Linear(4, 5), nn.Linear(4, 5), nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a1, a2 = self.a(x).split([3, 3], dim=-1)
        parts = self.b(x).split([2, 3], dim=-1)
        c1, c2 = self.c(x).split([1, 2], dim=1)  # the token axis
        d = self.d(x)
        d1, _ = d.split([2, 3], dim=-1)
        return torch.cat([a1 + a2, torch.cat(parts, -1), c1 + c2.sum(1, keepdim=True) + d, d1, d], -1)


def test_splits_that_are_not_a_linear_output_in_sections_are_left() -> None:
    model = _Leave().eval()
    gm = fx.symbolic_trace(model)
    assert not SplitLinearPass()(gm).modified
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(gm(x), model(x), atol=0, rtol=0)


def test_key_value_channels_prune_and_the_slim_model_fuses_the_sections_back() -> None:
    """Read, key/value channels (hidden) and written channels are prunable in both shapes; the
    one-element query is fixed. On random plans the slim model equals the hard-masked one and holds
    one module at the split path (a 1×1 conv for the image), split into the kept sizes."""
    for image in (False, True):
        model, x = _model(image)
        gm = p3b_fx.trace(model, input_shape=(1, *x.shape[1:]))
        groups = p3b_fx.find_groups(gm)
        hidden = groups.group("blocks.0:hidden'")
        assert hidden.size == 8 and hidden.prunable, hidden.reason
        one = groups.group("blocks.0:hidden")
        assert one.size == 1 and not one.prunable and "one-element axis" in one.reason
        for plan, slim in exact_slim_plans(gm, groups, x):
            fused = slim.get_submodule("blocks.0.qkv")
            assert type(fused) is (nn.Conv2d if image else nn.Linear)
            kept = len(plan.effective(groups)["blocks.0:hidden'"])
            splits = [n for n in slim.graph.nodes if n.target == "split"]
            assert splits and splits[0].args[1] == [1, kept, kept]
            assert not slim.meta.get(SPLIT_KEY) and not slim.meta.get(POINTWISE_KEY)


def test_split_sections_train_with_folded_masks() -> None:
    model, x = _model(image=True)
    assert_gates_train(p3b_fx.trace(model.float().train(), input_shape=(1, 8, 4, 5)), x.float())


def test_mobilevitv2_attention_prunes_its_key_value_channels() -> None:
    """timm's MobileViTv2-0.5: every separable attention's key/value channels are a prunable group
    (they were fixed by the unequal split before), and the slim model is exact and holds one
    ``qkv_proj`` convolution per attention."""
    model = timm.create_model("mobilevitv2_050", pretrained=False, num_classes=5).eval().double()
    gm = p3b_fx.trace(model, input_shape=(1, 3, 64, 64))
    groups = p3b_fx.find_groups(gm)
    attn = [b for b in groups.blocks if b.name.endswith(".attn")]
    assert len(attn) == 9
    for block in attn:
        kv = groups.group(f"{block.name}:hidden'")
        assert kv.prunable and kv.size in (64, 96, 128), kv.reason
    plan = p3b_fx.KeepPlan.random(groups, 0.5, seed=0)
    slim = p3b_fx.slim(gm, plan, groups)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        masked = p3b_fx.apply_masks(gm, plan, groups)(x)
        torch.testing.assert_close(slim(x), masked, atol=1e-9 * float(masked.abs().max()), rtol=0)
    assert type(slim.get_submodule(f"{attn[0].name}.qkv_proj")) is nn.Conv2d


def _parallel_vit() -> nn.Module:
    """timm's ViT-22B-style parallel block, small: ``[MLP hidden, q, k, v]`` from one linear of one
    norm (RMSNorm, q/k norms), ``attn_out(…) + mlp_out(…)`` added to the stream."""
    return timm.create_model(
        "vit_base_patch16_xp_224", pretrained=False, depth=2, embed_dim=64, num_heads=4, img_size=32,
        patch_size=8, num_classes=5,
    ).eval().double()  # fmt: skip


def test_a_parallel_block_of_one_input_is_two_lanes_with_every_group_prunable() -> None:
    """Before: one lane (its first linear's output split in unequal sections, the two last linears
    added), so only the read group was prunable. Now the MLP lane (``in_proj.0 → mlp_out_proj``)
    and the attention lane (``in_proj.1–3 → attn_out_proj``) share one read group, the MLP lane's
    outputs are hidden neurons, and the slim model, exact on random plans, has one ``in_proj``."""
    gm = p3b_fx.trace(_parallel_vit())
    groups = p3b_fx.find_groups(gm)
    block = groups.block("blocks.0")
    assert block.all_lanes() == (("blocks_0_in_proj_0", "blocks_0_mlp_out_proj"),
                                 ("blocks_0_in_proj_1", "blocks_0_attn_out_proj"))  # fmt: skip
    roles = {str(groups.group(g).role): groups.group(g) for g in block.groups}
    assert sorted(roles) == ["head_dim", "heads", "hidden", "read", "write"]
    assert all(g.prunable for g in roles.values()), {g.name: g.reason for g in roles.values()}
    assert roles["hidden"].size == 256 and roles["heads"].size == 4
    for plan, slim in exact_slim_plans(gm, groups, torch.randn(2, 3, 32, 32, dtype=torch.float64)):
        assert type(slim.get_submodule("blocks.0.in_proj")) is nn.Linear
        assert sum(p.numel() for p in slim.parameters()) == groups.model_params(plan.kept_sizes(groups))
