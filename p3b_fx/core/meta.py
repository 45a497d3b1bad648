"""Namespaced ``node.meta`` keys: the only channel through which passes talk to each other.

Each key names its writer and its readers. Values are plain, picklable Python objects.
"""

from __future__ import annotations

from typing import Final

SHAPE: Final = "p3b.shape"
"""Output shape (tuple of ints) of a tensor-valued node, or a tuple of shapes for tuple outputs.
Writer: ``passes.annotate_shapes``. Readers: ``passes.find_groups``, ``passes.rewrite_slim``."""

BLOCK: Final = "p3b.block"
"""Name of the residual sub-block (e.g. ``blocks.3.attn``) a node belongs to.
No pass writes it yet (blocks are carried by ``GroupSet``); ``passes.decompose_sdpa``
copies it when present."""

MASK_SITE: Final = "p3b.mask_site"
"""Marks a node inserted by ``passes.insert_masks`` (value: the site name), so that a second run
can see the masks are already there. Writer and reader: ``passes.insert_masks``."""

INPUT_SHAPE: Final = "p3b.input_shape"
"""``GraphModule.meta`` key (not node meta): the example input shape, batch 1, that the shape
analysis uses. Writer: ``p3b_fx.trace``. Readers: ``passes.find_groups``, export."""

POINTWISE_CONVS: Final = "p3b.pointwise_convs"
"""``GraphModule.meta`` key (not node meta): the module paths of the 1×1 convolutions the trace
made linears (tuple of str). Writer: ``passes.pointwise_conv.PointwiseConvPass`` (run by
``p3b_fx.trace``). Reader: ``passes.pointwise_conv.SlimConvPass``, the slim rewrite's last pass,
which makes them convolutions again and drops them from the key."""

SPLIT_LINEARS: Final = "p3b.split_linears"
"""``GraphModule.meta`` key (not node meta): the module paths of the linears whose output was split
into unequal sections, each now an ``nn.ModuleList`` of one linear per section (tuple of str).
Writer: ``passes.split_linear.SplitLinearPass`` (run by ``p3b_fx.trace``). Reader:
``passes.split_linear.FuseSplitPass``, the slim rewrite's last pass, which fuses them back and drops
them from the key."""

ALL_KEYS: Final = (SHAPE, BLOCK, MASK_SITE)
