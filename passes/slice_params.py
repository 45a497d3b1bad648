"""SliceParamsPass: physically slice every parameter a plan shrinks.

Pattern: parameter dimensions whose factors carry a group the plan shrinks (``ParamSpec``).
Result: those parameters replaced by their kept slices (row-major flat index over the factors,
e.g. ``qkv.weight`` rows over 3 × heads × head_dim); ``nn.Linear`` feature counts updated.
Why: the slim model's weights are dense and only as large as the plan says, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from p3b_fx.core.groups import ParamSpec
from p3b_fx.core.pass_infra import PassResult
from passes.slim_common import PlanPass, flat_index, live_blocks


@dataclass(frozen=True)
class SliceParamsPass(PlanPass):
    def call(self, gm: fx.GraphModule) -> PassResult:
        kept = self.plan.effective(self.groups)
        modified = False
        for name in live_blocks(self.groups, self.plan):
            for spec in self.groups.block(name).params:
                param = gm.get_parameter(spec.name)
                new = _sliced(param.detach(), spec, kept)
                if new.shape != param.shape:
                    _replace(gm, spec.name, new, param.requires_grad)
                    modified = True
            for spec in self.groups.block(name).buffers:  # a BatchNorm's running statistics
                buffer = gm.get_buffer(spec.name)
                new = _sliced(buffer, spec, kept)
                if new.shape != buffer.shape:
                    _replace_buffer(gm, spec.name, new)
                    modified = True
        return PassResult(gm, modified)


def _sliced(value: torch.Tensor, spec: ParamSpec, kept: dict[str, tuple[int, ...]]) -> torch.Tensor:
    """``value`` keeping the plan's indices along every dimension of ``spec`` (a dimension already
    that narrow is left alone: idempotence)."""
    for dim, factors in enumerate(spec.dims):
        idx = flat_index(factors, kept)
        if idx is not None and value.shape[dim] != idx.numel():
            value = value.index_select(dim, idx.to(value.device))
    return value


def _replace_buffer(gm: fx.GraphModule, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    owner._buffers[attr] = value.contiguous()  # keeps the buffer's persistence
    if isinstance(owner, nn.modules.batchnorm._NormBase):
        owner.num_features = int(value.shape[0])


def _replace(gm: fx.GraphModule, name: str, value: torch.Tensor, requires_grad: bool) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    setattr(owner, attr, nn.Parameter(value.contiguous(), requires_grad=requires_grad))  # a fresh tensor
    if isinstance(owner, nn.Linear):
        owner.out_features, owner.in_features = (int(s) for s in owner.weight.shape)
    if isinstance(owner, nn.modules.conv._ConvNd) and attr == "weight":  # depthwise: one filter per channel
        owner.out_channels = owner.in_channels = owner.groups = int(owner.weight.shape[0])
