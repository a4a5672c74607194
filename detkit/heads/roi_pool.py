"""Fast R-CNN RoI max pooling over FPN levels (torchvision only ships the single-level ``roi_pool``).

Each RoI is pooled from one pyramid level, chosen with the FPN paper's rule
``k = floor(k0 + log2(sqrt(w * h) / s0))`` clamped to the available levels (``k0 = 4``, ``s0 = 224``, the
same mapping torchvision's ``MultiScaleRoIAlign`` uses), then max-pooled into an ``output_size`` grid by
:func:`torchvision.ops.roi_pool` at that level's scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import roi_pool


def map_levels(boxes: Tensor, k_min: int, k_max: int, canonical_scale: int = 224, canonical_level: int = 4,
               eps: float = 1e-6) -> Tensor:
    """The pyramid level index (0 = ``k_min``) of each box (K x 4, xyxy)."""
    size = torch.sqrt((boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0))
    k = torch.floor(canonical_level + torch.log2(size / canonical_scale + eps))
    return (k.clamp(k_min, k_max) - k_min).to(torch.int64)


class MultiScaleRoIPool(nn.Module):
    """RoI max pooling from the level each box maps to; same call signature as ``MultiScaleRoIAlign``.

    ``strides`` gives each level's stride (powers of two), so no scale has to be inferred from shapes.
    """

    def __init__(self, featmap_names: Sequence[str], output_size: int | Sequence[int], strides: Sequence[int],
                 canonical_scale: int = 224, canonical_level: int = 4) -> None:
        super().__init__()
        self.featmap_names = list(featmap_names)
        self.output_size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        self.scales = [1.0 / s for s in strides]
        self.k_min, self.k_max = int(math.log2(strides[0])), int(math.log2(strides[-1]))
        self.canonical_scale, self.canonical_level = canonical_scale, canonical_level

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = [x[name] for name in self.featmap_names]
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
        first = features[0]
        out = first.new_zeros((rois.shape[0], first.shape[1], *self.output_size))
        if len(features) == 1:
            return roi_pool(first, rois, self.output_size, self.scales[0])
        levels = map_levels(rois[:, 1:], self.k_min, self.k_max, self.canonical_scale, self.canonical_level)
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            idx = torch.where(levels == level)[0]
            if idx.numel():
                out[idx] = roi_pool(feature, rois[idx], self.output_size, scale).to(out.dtype)
        return out
