"""Whole models, composed in one place from config: backbone -> neck -> head.

Detection heads make a :class:`Detector`, semantic heads (U-Net) a :class:`Segmenter`.

:func:`build_model` reads ``model.*``; :class:`Detector` keeps the contract every detection head shares:
``model(images, targets)`` in training returns a dict of losses; in eval, one dict per image with ``boxes``
(xyxy, pixels of the original image), ``scores``, ``labels`` (1..K) and, for Mask R-CNN, ``masks``
(N x H x W bool at the original resolution). Images come in normalised and already resized by the data
pipeline; ``scales`` (sx, sy per image, original -> input) and ``orig_sizes`` map the detections back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkit.errors import ConfigError, DataError

TRAIN_TARGET_KEYS = ("boxes", "labels", "masks")


class Detector(nn.Module):
    """``backbone`` ({"c_k"}) -> ``neck`` ({"p_k"}) -> ``head`` (detections in input pixels, losses)."""

    def __init__(self, backbone: nn.Module, neck: nn.Module | None, head: nn.Module, mask_threshold: float = 0.5,
                 ) -> None:
        super().__init__()
        self.backbone, self.neck, self.head = backbone, neck, head
        self.mask_threshold = mask_threshold

    def features(self, images: Tensor) -> dict[str, Tensor]:
        feats = self.backbone(images)
        return self.neck(feats) if self.neck is not None else feats

    def forward(self, images: Tensor, targets: Sequence[Mapping[str, Any]] | None = None,
                image_sizes: Sequence[tuple[int, int]] | None = None, scales: Sequence[Any] | None = None,
                orig_sizes: Sequence[tuple[int, int]] | None = None):
        if image_sizes is None:
            image_sizes = [tuple(images.shape[-2:])] * images.shape[0]
        image_sizes = [(int(h), int(w)) for h, w in image_sizes]
        if self.training:
            if targets is None:
                raise ValueError("in training mode the model needs targets (boxes, labels per image)")
            targets = train_targets(targets)
            if getattr(getattr(self.head, "roi_heads", None), "has_mask", lambda: False)() and \
                    any("masks" not in t for t in targets):
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
            from detkit.heads import paste_masks

            out["masks"] = paste_masks(det["masks"], boxes, (h, w), self.mask_threshold)
        return out


class Segmenter(nn.Module):
    """``backbone`` ({"c_k"}) -> optional ``neck`` -> a semantic ``head`` (per-pixel logits at input resolution).

    Training: ``model(images, targets)`` with ``targets`` a ``B x H x W`` tensor of class indices 0..K-1 (255
    unlabeled) returns the losses. Eval: one dict per image, ``semantic`` (``H x W`` int64 class indices at the
    original resolution: the logits of the image's unpadded part are resized bilinearly to ``orig_sizes`` before
    the argmax) and ``scores`` (the winning class's softmax probability per pixel).
    """

    task = "semantic"

    def __init__(self, backbone: nn.Module, neck: nn.Module | None, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.neck, self.head = backbone, neck, head

    def features(self, images: Tensor) -> dict[str, Tensor]:
        feats = self.backbone(images)
        return self.neck(feats) if self.neck is not None else feats

    def logits(self, images: Tensor) -> Tensor:
        """``B x K x H x W`` logits at the input's (padded) resolution."""
        return self.head(self.features(images), images, None, None)[0]

    def forward(self, images: Tensor, targets: Tensor | None = None,
                image_sizes: Sequence[tuple[int, int]] | None = None, scales: Sequence[Any] | None = None,
                orig_sizes: Sequence[tuple[int, int]] | None = None):
        if self.training:
            if targets is None:
                raise ValueError("in training mode the segmenter needs targets (B x H x W label maps)")
            _, losses = self.head(self.features(images), images, image_sizes, targets)
            return losses
        logits = self.logits(images)
        if image_sizes is None:
            image_sizes = [tuple(images.shape[-2:])] * images.shape[0]
        out = []
        for i, (h, w) in enumerate(image_sizes):
            x = logits[i:i + 1, :, :int(h), :int(w)]
            size = tuple(int(v) for v in orig_sizes[i]) if orig_sizes is not None else (int(h), int(w))
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            scores, semantic = x[0].softmax(dim=0).max(dim=0)
            out.append({"semantic": semantic, "scores": scores})
        return out


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


def build_model(cfg: Any) -> Detector | Segmenter:
    """The model of ``cfg.model``: backbone, neck (or none), and the head ``model.head.name`` from
    :data:`detkit.heads.HEADS` with ``model.head.params``; a :class:`Segmenter` for semantic heads."""
    from detkit.backbones import build_backbone
    from detkit.heads import HEADS, SEMANTIC_HEADS
    from detkit.necks import build_neck

    m = cfg.model
    name = m.head.name
    if name not in HEADS:
        raise ConfigError(f"model.head.name = {name!r}: this head is not implemented (available: "
                          f"{', '.join(HEADS)})")
    if int(m.num_classes) < 1:
        raise ConfigError(f"model.num_classes = {m.num_classes}: expected at least 1 (background is added)")
    if name in SEMANTIC_HEADS and int(m.num_classes) < 2:
        raise ConfigError(f"model.num_classes = {m.num_classes}: semantic segmentation needs at least 2 classes "
                          f"(U-Net adds no background class: give the dataset's classes, background included)")
    backbone = build_backbone(m.backbone)
    neck = build_neck(m.neck, backbone.out_channels, backbone.strides)
    if neck is not None:
        channels = {level: int(neck.out_channels) for level in neck.strides}
        strides = dict(neck.strides)
    else:
        channels, strides = dict(backbone.out_channels), dict(backbone.strides)
    head = HEADS[name](m.head.params, channels, strides, int(m.num_classes), int(cfg.data.image_size))
    if name in SEMANTIC_HEADS:
        return Segmenter(backbone, neck, head)
    return Detector(backbone, neck, head, mask_threshold=getattr(head, "mask_threshold", 0.5))


# --------------------------------------------------------------------------------- torchvision weights
TORCHVISION_RCNN_KEYS = {"backbone.body.": "backbone.network.", "backbone.fpn.": "neck.fpn.", "rpn.": "head.rpn.",
                         "roi_heads.": "head.roi_heads."}


def from_torchvision_rcnn(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a torchvision ``fasterrcnn_*``/``maskrcnn_*`` state dict to detkit's keys.

    ``backbone.body.*`` -> ``backbone.network.*`` (the wrapped torchvision ResNet; MobileNet's numbered blocks
    ``backbone.body.N`` -> ``backbone.network.features.N``), ``backbone.fpn.*`` ->
    ``neck.fpn.*`` (torchvision's FeaturePyramidNetwork inside detkit's FPN), ``rpn.*`` -> ``head.rpn.*``,
    ``roi_heads.*`` -> ``head.roi_heads.*``. torchvision's ``LastLevelMaxPool`` (P6) has no weights: detkit's
    equivalent is ``model.neck.extra_op: maxpool``.
    """
    out = {}
    for key, value in state_dict.items():
        for old, new in TORCHVISION_RCNN_KEYS.items():
            if key.startswith(old):
                rest = key[len(old):]
                if old == "backbone.body." and rest[:1].isdigit():  # MobileNet bodies index `features` directly
                    rest = "features." + rest
                out[new + rest] = value
                break
        else:
            raise KeyError(f"unexpected torchvision key {key!r}")
    return out
