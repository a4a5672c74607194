"""Heads: what turns pyramid features into losses (training) and detections or logits (eval).

Every head is registered once in :data:`HEADS` (:mod:`detkit.heads.registry`) with its builder and its
:class:`HeadTraits`; the :class:`Head` protocol there is the contract every head keeps.
"""

from __future__ import annotations

from detkit.heads.layout import ClassLayer, WeightLayout
from detkit.heads.levels import select_levels
from detkit.heads.params import parse_params
from detkit.heads.registry import HEADS, Head, HeadTraits, head_traits
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

__all__ = ["HEADS", "ClassLayer", "Head", "HeadTraits", "MultiScaleRoIPool", "SSDParams", "SingleShotHead",
           "TwoStageHead", "TwoStageParams", "UNetHead", "UNetParams", "WeightLayout", "YoloHead", "YoloParams",
           "build_faster_rcnn", "build_mask_rcnn", "build_ssd_head", "build_two_stage_head", "build_unet_head",
           "build_yolo_head", "dice_loss", "head_traits", "map_levels", "parse_params", "paste_masks",
           "segmentation_loss", "select_levels"]
