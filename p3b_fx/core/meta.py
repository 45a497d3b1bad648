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
Writer: ``passes.find_blocks``. Readers: ``passes.find_groups``, ``passes.insert_masks``."""

AXES: Final = "p3b.axes"
"""Per output axis, the tuple of group labels whose elements run along it (row-major), or ``()``
for an axis no group runs along. Writer: ``passes.find_groups``. Reader: ``passes.rewrite_slim``
(to rewrite baked reshape sizes)."""

SDPA_SCALE: Final = "p3b.sdpa_scale"
"""For a ``scaled_dot_product_attention`` node whose head dimension is prunable: the softmax scale
of the dense model, which the slim graph must pass explicitly. Writer: ``passes.find_groups``.
Reader: ``passes.rewrite_slim``."""

MASK_SITE: Final = "p3b.mask_site"
"""Marks a node inserted by ``passes.insert_masks`` (value: the site name), so that a second run
can see the masks are already there. Writer and reader: ``passes.insert_masks``."""

INPUT_SHAPE: Final = "p3b.input_shape"
"""``GraphModule.meta`` key (not node meta): the example input shape, batch 1, that the shape
analysis uses. Writer: ``p3b_fx.trace``. Readers: ``passes.find_groups``, export."""

ALL_KEYS: Final = (SHAPE, BLOCK, AXES, SDPA_SCALE, MASK_SITE)
