"""Heads: what turns pyramid features into losses (training) and detections (eval).

``HEADS`` maps ``model.head.name`` to its builder ``build(params, channels, strides, num_classes, image_size)``:
``params`` is the config's ``model.head.params`` (checked against the head's parameter dataclass),
``channels``/``strides`` the ``{level: int}`` maps of the features it receives (the neck's, or the backbone's
with ``model.neck.name=none``) and ``image_size`` is ``data.image_size``. Every head's
``forward(features, images, image_sizes, targets)`` returns ``(detections, losses)``: detections per image in
the (padded) input's pixels (``boxes`` xyxy, ``scores``, ``labels`` 1..K, ``masks`` for Mask R-CNN), losses a
dict of named scalars in training. Semantic heads (:data:`SEMANTIC_HEADS`, ``task = "semantic"``) return
``(logits B x K x H x W at the input's resolution, losses)`` and take ``B x H x W`` label maps as targets.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from detkit.heads.params import parse_params
from detkit.heads.roi_pool import MultiScaleRoIPool, map_levels
from detkit.heads.ssd import SingleShotHead, SSDParams, build_ssd_head
from detkit.heads.two_stage import (
                                    TwoStageHead,
                                    TwoStageParams,
                                    build_faster_rcnn,
                                    build_mask_rcnn,
                                    build_two_stage_head,
                                    paste_masks,
)
from detkit.heads.unet import UNetHead, UNetParams, build_unet_head, dice_loss, segmentation_loss
from detkit.heads.yolo import YoloHead, YoloParams, build_yolo_head

HEADS: dict[str, Callable[..., nn.Module]] = {
    "faster_rcnn": build_faster_rcnn,
    "mask_rcnn": build_mask_rcnn,
    "ssd": build_ssd_head,
    "yolo": build_yolo_head,
    "unet": build_unet_head,
}
SEMANTIC_HEADS = ("unet",)  # heads whose model is a Segmenter (per-pixel logits), not a Detector

__all__ = ["HEADS", "SEMANTIC_HEADS", "MultiScaleRoIPool", "SSDParams", "SingleShotHead", "TwoStageHead",
           "TwoStageParams", "UNetHead", "UNetParams", "YoloHead", "YoloParams", "build_two_stage_head", "dice_loss",
           "map_levels", "parse_params", "paste_masks", "segmentation_loss"]
