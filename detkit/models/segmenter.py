"""The semantic segmentation model: a semantic head's logits as per-image label maps at the original size.

Training: ``model(images, targets)`` with ``targets`` a ``B x H x W`` tensor of class indices 0..K-1 (255
unlabeled) returns the losses. Eval: one dict per image, ``semantic`` (``H x W`` int64 class indices at the
original resolution: the logits of the image's unpadded part are resized bilinearly to ``orig_sizes`` before the
argmax) and ``scores`` (the winning class's softmax probability per pixel).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from detkit.errors import DataError
from detkit.heads.registry import HeadTraits
from detkit.models.base import Model

SEMANTIC_TRAITS = HeadTraits("semantic", "logits")


class Segmenter(Model):
    """``backbone`` ({"c_k"}) -> optional ``neck`` -> a semantic ``head`` (per-pixel logits at input resolution)."""

    def __init__(self, backbone: nn.Module, neck: nn.Module | None, head: nn.Module,
                 traits: HeadTraits = SEMANTIC_TRAITS, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:
        super().__init__(backbone, neck, head, traits, mean, std)

    def logits(self, images: Tensor) -> Tensor:
        """``B x K x H x W`` logits of a *normalised* batch at its (padded) resolution."""
        return self.head(self.features(images), images, None, None)[0]

    def training_targets(self, batch: dict[str, Any]) -> Tensor:
        if "semantic" not in batch:
            raise DataError("this batch has no semantic label maps (a semantic head needs a masks dataset)")
        return batch["semantic"].to(batch["images"].device)

    def forward(self, images: Tensor, targets: Tensor | None = None,
                image_sizes: Sequence[tuple[int, int]] | None = None, scales: Sequence[Any] | None = None,
                orig_sizes: Sequence[tuple[int, int]] | None = None):
        images = self.preprocess(images)
        if self.training:
            if targets is None:
                raise ValueError("in training mode the segmenter needs targets (B x H x W label maps)")
            _, losses = self.head(self.features(images), images, image_sizes, targets)
            return losses
        return [label_map(x) for x in self.original_logits(images, image_sizes, orig_sizes)]

    def original_logits(self, images: Tensor, image_sizes: Sequence[tuple[int, int]] | None = None,
                        orig_sizes: Sequence[tuple[int, int]] | None = None) -> list[Tensor]:
        """Per image ``K x H x W`` logits at its original size (of a *normalised* batch): what test-time
        augmentation and tiled inference average before the label map is taken."""
        logits = self.logits(images)
        out = []
        for i, (h, w) in enumerate(self.input_sizes(images, image_sizes)):
            x = logits[i:i + 1, :, :h, :w]
            size = tuple(int(v) for v in orig_sizes[i]) if orig_sizes is not None else (h, w)
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            out.append(x[0])
        return out

    # ----------------------------------------------------------------------------------------------- export
    output_names = ["logits"]

    def export_outputs(self, images: Tensor) -> Tensor:
        """Float images in 0..255 -> ``B x K x H x W`` logits (what an exported graph returns)."""
        return self.logits(self.normalize(images))


def label_map(logits: Tensor) -> dict[str, Tensor]:
    """``K x H x W`` logits -> ``{"semantic": H x W class indices, "scores": the winning probability}``."""
    scores, semantic = logits.softmax(dim=0).max(dim=0)
    return {"semantic": semantic, "scores": scores}
