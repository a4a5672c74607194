"""The detection model: every detection head's detections, mapped back to the original image.

``Detector(images, targets=None, image_sizes=None, scales=None, orig_sizes=None)``: in training a dict of named
losses (crowd boxes are left out of the targets: they are ignored, not learned); in eval one dict per image with
``boxes`` (xyxy, pixels of the original image: divided by the pipeline's ``scale``, clipped to ``orig_size``),
``scores``, ``labels`` (1..K) and, for instance heads, ``masks`` (N x H x W bool at the original resolution).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from detkit.errors import DataError
from detkit.heads.registry import HeadTraits
from detkit.heads.two_stage import paste_masks
from detkit.models.base import Model

TRAIN_TARGET_KEYS = ("boxes", "labels", "masks")
DETECTION_OUTPUTS = ["boxes", "scores", "labels", "batch_index"]


def traits_of(head: nn.Module) -> HeadTraits:
    """Traits of a head built outside the registry (a Detector made by hand): read off the head itself."""
    masks = getattr(getattr(head, "roi_heads", None), "has_mask", lambda: False)()
    return HeadTraits("instance" if masks else "detection", "flat" if hasattr(head, "flat_detections") else "per_image")


class Detector(Model):
    """``backbone`` -> ``neck`` -> a detection ``head`` (detections in input pixels, losses)."""

    def __init__(self, backbone: nn.Module, neck: nn.Module | None, head: nn.Module, mask_threshold: float = 0.5,
                 traits: HeadTraits | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:
        super().__init__(backbone, neck, head, traits or traits_of(head), mean, std)
        self.mask_threshold = mask_threshold

    def forward(self, images: Tensor, targets: Sequence[Mapping[str, Any]] | None = None,
                image_sizes: Sequence[tuple[int, int]] | None = None, scales: Sequence[Any] | None = None,
                orig_sizes: Sequence[tuple[int, int]] | None = None):
        images = self.preprocess(images)
        image_sizes = self.input_sizes(images, image_sizes)
        if self.training:
            if targets is None:
                raise ValueError("in training mode the model needs targets (boxes, labels per image)")
            targets = train_targets(targets)
            if self.traits.masks and any("masks" not in t for t in targets):
                raise DataError("mask_rcnn needs instance masks, and this dataset has none (VOC/YOLO boxes only): "
                                "use model.head.name=faster_rcnn or a dataset with masks")
            _, losses = self.head(self.features(images), images, image_sizes, targets)
            return losses
        detections, _ = self.head(self.features(images), images, image_sizes, None)
        return [self.to_original(d, size, scales[i] if scales is not None else None,
                                 orig_sizes[i] if orig_sizes is not None else None)
                for i, (d, size) in enumerate(zip(detections, image_sizes))]

    def to_original(self, det: dict[str, Tensor], input_size: tuple[int, int], scale: Any = None,
                    orig_size: tuple[int, int] | None = None) -> dict[str, Tensor]:
        """Boxes (and masks) of one image from input pixels to the original image's pixels."""
        boxes = det["boxes"]
        if scale is not None:
            sx, sy = (float(s) for s in scale)
            boxes = boxes / boxes.new_tensor([sx, sy, sx, sy])
        h, w = (int(v) for v in orig_size) if orig_size is not None else input_size
        boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
                             boxes[:, 3].clamp(0, h)], dim=1) if len(boxes) else boxes.reshape(0, 4)
        out = {"boxes": boxes, "scores": det["scores"], "labels": det["labels"]}
        if "masks" in det:
            out["masks"] = paste_masks(det["masks"], boxes, (h, w), self.mask_threshold)
        return out

    # ----------------------------------------------------------------------------------------------- export
    @property
    def output_names(self) -> list[str]:
        return DETECTION_OUTPUTS + (["mask_probs"] if self.traits.masks else [])

    def export_outputs(self, images: Tensor) -> tuple[Tensor, ...]:
        """Float images in 0..255 -> flat ``boxes, scores, labels, batch_index`` (+ ``mask_probs`` for instance
        heads) in input pixels: what an exported graph returns."""
        x = self.normalize(images)
        features = self.features(x)
        sizes = [(int(x.shape[-2]), int(x.shape[-1]))] * int(x.shape[0])
        if self.traits.export == "flat":
            return self.head.flat_detections(features, x, sizes)
        detections, _ = self.head(features, x, sizes)  # per image (a Python loop: a fixed batch when traced)
        out = [torch.cat([d[key] for d in detections]) for key in ("boxes", "scores", "labels")]
        out.append(torch.cat([torch.full_like(d["labels"], i) for i, d in enumerate(detections)]))
        if self.traits.masks:
            out.append(torch.cat([d["masks"] for d in detections]))
        return tuple(out)


def train_targets(targets: Sequence[Mapping[str, Any]]) -> list[dict[str, Tensor]]:
    """The training targets: crowd regions left out (they are ignored, not learned), masks as uint8."""
    out = []
    for t in targets:
        keep = ~torch.as_tensor(t["iscrowd"], dtype=torch.bool) if "iscrowd" in t else None
        d = {}
        for k in TRAIN_TARGET_KEYS:
            if k in t:
                v = t[k] if keep is None or len(keep) != len(t[k]) else t[k][keep]
                d[k] = v.to(torch.uint8) if k == "masks" else v
        d["boxes"] = d["boxes"].float()
        out.append(d)
    return out
