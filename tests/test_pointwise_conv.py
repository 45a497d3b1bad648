"""1×1 convolutions: linears to the compiler (PointwiseConvPass), convolutions again in the slim model
(SlimConvPass); the convolution blocks they make prunable (BatchNorm2d inside and after them, a
layer scale viewed from a vector, images as residual streams)."""

from __future__ import annotations

import timm
import torch
from torch import fx, nn

import p3b_fx
from p3b_fx.core.groups import Role
from p3b_fx.train import _channels_first
from passes.annotate_shapes import restore_tensor_state, tensor_state
from passes.pointwise_conv import POINTWISE_KEY, PointwiseConvPass, is_pointwise
from tests.conftest import assert_gates_train


class _ConvMlp(nn.Module):
    """A convolution MLP block on an image stream (FastViT's and PoolFormer's shape): BatchNorm2d,
    1×1 conv, GELU, depthwise 3×3, 1×1 conv, BatchNorm2d, layer scale ``gamma.view(C, 1, 1)``."""

    def __init__(self, dim: int = 8, hidden: int = 16, bias: bool = True) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(dim)
        self.fc1 = nn.Conv2d(dim, hidden, 1, bias=bias)
        self.act = nn.GELU()
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.bn = nn.BatchNorm2d(dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.fc2(self.dw(self.act(self.fc1(self.norm(x))))))
        return x + y * self.gamma.view(-1, 1, 1)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(_ConvMlp(), _ConvMlp(bias=False))
        self.proj = nn.Conv2d(8, 8, 1, stride=2)  # strided: stays a convolution
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(self.blocks(self.stem(x))).mean((2, 3)))


def _randomised(model: nn.Module) -> nn.Module:
    """Random BatchNorm statistics and affine values (fresh ones are the identity)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=gen) * 0.1)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)
                mod.weight.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)
                mod.bias.copy_(torch.randn(mod.num_features, generator=gen) * 0.3)
    return model.eval().double()


def test_which_convolutions_are_pointwise() -> None:
    assert is_pointwise(nn.Conv2d(4, 8, 1))
    assert is_pointwise(nn.Conv2d(4, 8, 1, bias=False, padding="same"))
    assert not is_pointwise(nn.Conv2d(4, 8, 3, padding=1))
    assert not is_pointwise(nn.Conv2d(4, 8, 1, stride=2))
    assert not is_pointwise(nn.Conv2d(4, 8, 1, groups=2))
    assert not is_pointwise(nn.Conv2d(4, 8, 1, padding=1))  # a 1×1 conv that pads grows the image
    assert not is_pointwise(nn.Conv1d(4, 8, 1))


def test_the_pass_computes_the_same_and_leaves_other_convolutions() -> None:
    model = _randomised(_Net())
    gm = fx.symbolic_trace(model)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    expected = model(x)
    assert PointwiseConvPass()(gm).modified
    assert sorted(gm.meta[POINTWISE_KEY]) == sorted(f"blocks.{i}.fc{j}" for i in (0, 1) for j in (1, 2))
    kinds = {
        str(n.target): type(gm.get_submodule(str(n.target))) for n in gm.graph.nodes if n.op == "call_module"
    }
    assert kinds["blocks.0.fc1"] is nn.Linear and kinds["blocks.1.fc2"] is nn.Linear
    assert kinds["stem"] is nn.Conv2d and kinds["proj"] is nn.Conv2d and kinds["blocks.0.dw"] is nn.Conv2d
    torch.testing.assert_close(gm(x), expected, atol=1e-12, rtol=0)
    assert not PointwiseConvPass()(gm).modified  # nothing left to convert


def test_conv_blocks_prune_and_slim_back_to_convolutions() -> None:
    """Both blocks are found with read, hidden and write prunable (the write group through the
    BatchNorm2d and the viewed layer scale); on random plans the slim model equals the hard-masked
    one, holds 1×1 ``nn.Conv2d`` modules where the model had them and no transposes around them."""
    model = _randomised(_Net())
    gm = p3b_fx.trace(model, input_shape=(1, 3, 6, 6))
    groups = p3b_fx.find_groups(gm)
    assert [b.name for b in groups.blocks] == ["blocks.0", "blocks.1"]
    roles = sorted(str(g.role) for g in groups.prunable)
    assert roles == sorted([str(Role.READ), str(Role.HIDDEN), str(Role.WRITE)] * 2), groups.groups
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    for seed in range(3):
        plan = p3b_fx.KeepPlan.random(groups, 0.5, seed=seed)
        slim = p3b_fx.slim(gm, plan, groups)
        with torch.no_grad():
            torch.testing.assert_close(slim(x), p3b_fx.apply_masks(gm, plan, groups)(x), atol=1e-12, rtol=0)
            assert (slim(x) - gm(x)).abs().max() > 1e-3  # the plan changes the output
        convs = {name: m for name, m in slim.named_modules() if name.startswith("blocks.") and ".fc" in name}
        assert convs and all(type(m) is nn.Conv2d and m.kernel_size == (1, 1) for m in convs.values())
        assert not [n for n in slim.graph.nodes if n.target == "permute"]
        assert not slim.meta.get(POINTWISE_KEY)


def test_an_image_stream_is_read_channels_first() -> None:
    gm = p3b_fx.trace(_randomised(_Net()), input_shape=(1, 3, 6, 6))
    groups = p3b_fx.find_groups(gm)
    block = groups.blocks[0]
    assert _channels_first(gm, {n.name: n for n in gm.graph.nodes}, block, (2, 8, 6, 6))


class _Cached(nn.Module):
    """LeViT's and EfficientViT-M's eval-mode cache: ``self.cache[key] = tensor`` in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(4))
        self.cache: dict[str, torch.Tensor] = {}
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "b" not in self.cache:
            self.cache["b"] = self.table * 2
        return self.fc(x) + self.cache["b"]


def test_a_cache_filled_while_tracing_holds_no_fake_tensor() -> None:
    model = _Cached().eval()
    gm = p3b_fx.trace(model, input_shape=(2, 4))
    assert not model.cache or not any(type(v).__name__ == "FakeTensor" for v in model.cache.values())
    x = torch.randn(2, 4)
    torch.testing.assert_close(gm(x), model(x))
    state = tensor_state(model)
    restore_tensor_state(model, state)  # idempotent on real tensors
    assert all(type(v) is torch.Tensor or isinstance(v, nn.Parameter) for v in model.cache.values())


def test_efficientvit_m0_slims_exactly() -> None:
    """EfficientViT-M0 (timm): its cascaded group attention opened, 1×1 convs as linears, an axis no
    label runs along (the heads' concatenation) counted at its size in the plan's parameters."""
    model = timm.create_model("efficientvit_m0", pretrained=False).eval().double()
    gm = p3b_fx.trace(model)
    groups = p3b_fx.find_groups(gm)
    assert len(groups.blocks) == 22 and {b.kind.value for b in groups.blocks} == {"attention", "mlp"}
    plan = p3b_fx.KeepPlan.random(groups, 0.5, seed=0)
    slim = p3b_fx.slim(gm, plan, groups)  # raises on a parameter count the plan did not predict
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(slim(x), p3b_fx.apply_masks(gm, plan, groups)(x), atol=1e-9, rtol=1e-9)


def test_efficientformerv2_q_after_its_batch_norm_keeps_head_dims_prunable() -> None:
    """EfficientFormerV2's attention: q, k and v are 1×1 convs of one input, each followed by a
    BatchNorm2d. The three read one permute of the input (one read group, one label), and q's
    first-out gate sits after q's BatchNorm (``Block.first_out_site``), so q · k contracts zeros and
    the head dims are prunable; v's head dims too. Slim equals hard-masked in float64."""
    model = timm.create_model("efficientformerv2_s0", pretrained=False, num_classes=5, img_size=64)
    gm = p3b_fx.trace(model.eval().double(), input_shape=(1, 3, 64, 64))
    groups = p3b_fx.find_groups(gm)
    block = groups.block("stages.3.blocks.3.token_mixer")
    assert block.first_out_site.endswith("q_bn")
    for name in ("head_dim", "head_dim'", "heads", "read"):
        group = groups.group(f"{block.name}:{name}")
        assert group.prunable, group.reason
    k_weight = next(p for p in block.params if p.name.endswith("token_mixer.k.conv.weight"))
    assert k_weight.dims[1] == ((176, f"{block.name}:read"),)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    plan = p3b_fx.KeepPlan.random(groups, 0.5, seed=0)
    with torch.no_grad():
        slim, masked = p3b_fx.slim(gm, plan, groups)(x), p3b_fx.apply_masks(gm, plan, groups)(x)
    torch.testing.assert_close(slim, masked, atol=1e-9 * float(masked.abs().max()), rtol=0)


def test_an_in_place_activation_after_a_pointwise_conv_trains_with_folded_masks() -> None:
    """NeXt-ViT: ``nn.ReLU(inplace=True)`` on a 1×1 conv's output, behind an ``nn.Identity`` norm.
    That output is now a permuted view of a linear, which training folds into a custom autograd
    Function, and autograd refuses to modify such a view in place: the trace makes those
    activations out of place (its own copies; the traced model keeps its in-place ReLU). Forward
    and backward with soft masks run, and the gates collect gradients."""
    model = _Net()
    model.blocks[0].act = nn.Sequential(nn.Identity(), nn.ReLU(inplace=True))
    gm = p3b_fx.trace(model.train(), input_shape=(1, 3, 6, 6))
    assert model.blocks[0].act[1].inplace and not gm.get_submodule("blocks.0.act.1").inplace
    assert_gates_train(gm, torch.randn(4, 3, 6, 6))


def test_convolutions_inside_a_block_count_in_its_flops() -> None:
    """The MACs of a block count its depthwise convolution too (output positions × channels ×
    kernel), sliced with the hidden neurons it runs on: 6×6 positions, 8 channels, 16 hidden, 3×3."""
    gm = p3b_fx.trace(_randomised(_Net()), input_shape=(1, 3, 6, 6))
    groups = p3b_fx.find_groups(gm)
    block = groups.block("blocks.0")
    linears, depthwise = 2 * 36 * 8 * 16, 36 * 16 * 9
    assert groups.block_flops(block) == linears + depthwise
    assert groups.block_flops(block, {"blocks.0:hidden": 8}) == (linears + depthwise) // 2


class _WeightRead(nn.Module):
    """A 1×1 conv whose weight another op reads too (its shape must stay the conv's)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.conv.weight.sum()


def test_a_conv_whose_weight_is_read_elsewhere_stays_a_convolution() -> None:
    model = _WeightRead().eval()
    gm = fx.symbolic_trace(model)
    assert not PointwiseConvPass()(gm).modified
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(gm(x), model(x), atol=0, rtol=0)
