"""Faster R-CNN and Mask R-CNN heads, composed from torchvision's detection building blocks.

The RPN (``AnchorGenerator`` + ``RPNHead`` + ``RegionProposalNetwork``) and the RoI heads (``RoIHeads`` with
``TwoMLPHead``/``FastRCNNConvFCHead``, ``FastRCNNPredictor``, and for masks ``MaskRCNNHeads`` +
``MaskRCNNPredictor``) are torchvision's; detkit chooses the levels they run on from the neck's declared
strides, sets every threshold from ``model.head.params`` (:class:`TwoStageParams`), and adds RoI max pooling
over FPN levels (:class:`~detkit.heads.roi_pool.MultiScaleRoIPool`). Module names stay torchvision's, so its
``fasterrcnn_*``/``maskrcnn_*`` weights load (:data:`WEIGHTS`, :func:`from_torchvision_rcnn`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, paste_masks_in_image
from torchvision.models.detection.rpn import AnchorGenerator, RegionProposalNetwork, RPNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import initLevelMapper

from detkit.errors import ConfigError
from detkit.heads.layout import FPN_BACKBONE, ClassLayer, WeightLayout, rename
from detkit.heads.levels import select_levels
from detkit.heads.params import WHERE, parse_params
from detkit.heads.roi_pool import MultiScaleRoIPool


@dataclass
class TwoStageParams:
    """``model.head.params`` of ``faster_rcnn`` / ``mask_rcnn`` (defaults = torchvision's Faster R-CNN)."""

    # RPN
    rpn_levels: list[str] | None = None  # neck levels the RPN runs on (default: all)
    anchor_sizes: list[list[float]] | None = None  # per RPN level (default: 8 x stride, e.g. 32..512 on P2-P6)
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # height / width
    rpn_conv_depth: int = 1
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_pre_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_thresh: float = 0.7
    rpn_score_thresh: float = 0.0
    # RoI feature extraction
    roi_op: str = "roi_align"  # roi_align | roi_pool
    roi_levels: list[str] | None = None  # neck levels RoIs are pooled from (default: those of stride <= 32)
    roi_output_size: int = 7
    roi_sampling_ratio: int = 2  # roi_align only
    canonical_scale: int = 224  # level mapping k = floor(k0 + log2(sqrt(wh) / canonical_scale))
    canonical_level: int = 4
    # box head
    box_head: str = "2fc"  # 2fc (two fully connected layers) | conv (box_head_convs 3x3 convs + one fc)
    box_head_dim: int = 1024
    box_head_convs: int = 4
    box_fg_iou_thresh: float = 0.5
    box_bg_iou_thresh: float = 0.5
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    bbox_reg_weights: list[float] | None = None  # default (10, 10, 5, 5)
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    box_detections_per_img: int = 100
    # mask branch (mask_rcnn)
    mask_roi_output_size: int = 14
    mask_sampling_ratio: int = 2
    mask_head_layers: list[int] = field(default_factory=lambda: [256, 256, 256, 256])
    mask_head_dilation: int = 1
    mask_head_norm: str = "none"  # none | bn (BatchNorm after each mask conv: torchvision's maskrcnn_resnet50_fpn_v2)
    mask_threshold: float = 0.5  # probability above which a pasted mask pixel is on


class TwoStageHead(nn.Module):
    """RPN + RoI heads over a dict of pyramid features; boxes in the (padded) input's pixels."""

    def __init__(self, rpn: RegionProposalNetwork, roi_heads: RoIHeads, rpn_levels: list[str]) -> None:
        super().__init__()
        self.rpn, self.roi_heads, self.rpn_levels = rpn, roi_heads, rpn_levels

    def forward(self, features: dict[str, Tensor], images: Tensor, image_sizes: list[tuple[int, int]],
                targets: list[dict[str, Tensor]] | None = None):
        image_list = ImageList(images, image_sizes)
        rpn_features = {k: features[k] for k in self.rpn_levels}
        proposals, rpn_losses = self.rpn(image_list, rpn_features, targets)
        detections, roi_losses = self.roi_heads(features, proposals, image_sizes, targets)
        return detections, {**rpn_losses, **roi_losses}


def build_two_stage_head(p: TwoStageParams, channels: int, strides: dict[str, int], num_classes: int,
                         masks: bool = False) -> TwoStageHead:
    """The RPN and RoI heads for a neck with ``channels`` channels at ``strides`` (``{"p_k": 2**k}``)."""
    levels = list(strides)
    rpn_levels = select_levels("rpn_levels", p.rpn_levels, strides, levels, rule="consecutive")
    roi_levels = select_levels("roi_levels", p.roi_levels, strides,
                               [k for k in levels if strides[k] <= 32] or levels[:1], rule="consecutive")
    check_params(p, masks)
    if p.roi_op not in ("roi_align", "roi_pool"):
        raise ConfigError(f"{WHERE}.roi_op = {p.roi_op!r}: expected roi_align or roi_pool")
    if p.box_head not in ("2fc", "conv"):
        raise ConfigError(f"{WHERE}.box_head = {p.box_head!r}: expected 2fc or conv")
    sizes = p.anchor_sizes or [[8.0 * strides[k]] for k in rpn_levels]
    if len(sizes) != len(rpn_levels):
        raise ConfigError(f"{WHERE}.anchor_sizes has {len(sizes)} entries for {len(rpn_levels)} RPN "
                          f"levels {rpn_levels}: give one list of sizes per level")
    anchors = AnchorGenerator(tuple(tuple(s) for s in sizes), tuple(tuple(p.aspect_ratios) for _ in sizes))
    rpn = RegionProposalNetwork(
        anchors, RPNHead(channels, anchors.num_anchors_per_location()[0], conv_depth=p.rpn_conv_depth),
        p.rpn_fg_iou_thresh, p.rpn_bg_iou_thresh, p.rpn_batch_size_per_image, p.rpn_positive_fraction,
        {"training": p.rpn_pre_nms_top_n_train, "testing": p.rpn_pre_nms_top_n_test},
        {"training": p.rpn_post_nms_top_n_train, "testing": p.rpn_post_nms_top_n_test},
        p.rpn_nms_thresh, score_thresh=p.rpn_score_thresh,
    )
    if len({len(s) for s in sizes}) != 1:
        raise ConfigError(f"{WHERE}.anchor_sizes: every level needs the same number of sizes")
    roi_strides = [strides[k] for k in roi_levels]
    box_pool = _pooler(p.roi_op, roi_levels, roi_strides, p.roi_output_size, p.roi_sampling_ratio, p)
    if p.box_head == "2fc":
        box_head = TwoMLPHead(channels * p.roi_output_size**2, p.box_head_dim)
    else:
        box_head = FastRCNNConvFCHead((channels, p.roi_output_size, p.roi_output_size), [channels] * p.box_head_convs,
                                      [p.box_head_dim], norm_layer=nn.BatchNorm2d)
    kwargs = {}
    if masks:
        kwargs = dict(
            mask_roi_pool=_pooler("roi_align", roi_levels, roi_strides, p.mask_roi_output_size, p.mask_sampling_ratio,
                                  p),
            mask_head=MaskRCNNHeads(channels, list(p.mask_head_layers), p.mask_head_dilation,
                                    norm_layer=nn.BatchNorm2d if p.mask_head_norm == "bn" else None),
            mask_predictor=MaskRCNNPredictor(p.mask_head_layers[-1], p.mask_head_layers[-1], num_classes + 1),
        )
    roi_heads = RoIHeads(
        box_pool, box_head, FastRCNNPredictor(p.box_head_dim, num_classes + 1),
        p.box_fg_iou_thresh, p.box_bg_iou_thresh, p.box_batch_size_per_image, p.box_positive_fraction,
        tuple(p.bbox_reg_weights) if p.bbox_reg_weights else None,
        p.box_score_thresh, p.box_nms_thresh, p.box_detections_per_img, **kwargs,
    )
    return TwoStageHead(rpn, roi_heads, rpn_levels)


def build_faster_rcnn(params, channels: dict[str, int], strides: dict[str, int], num_classes: int,
                      image_size: int, masks: bool = False) -> TwoStageHead:
    """The registry's builder (see :data:`detkit.heads.HEADS`): ``model.head.params`` checked, one channel count."""
    name = "mask_rcnn" if masks else "faster_rcnn"
    p = parse_params(TwoStageParams, params)
    if len(set(channels.values())) != 1:
        raise ConfigError(f"model.neck.name = none: {name} needs one channel count over its levels "
                          f"(use model.neck.name=fpn or pan)")
    head = build_two_stage_head(p, next(iter(channels.values())), strides, num_classes, masks=masks)
    head.mask_threshold = p.mask_threshold
    return head


def build_mask_rcnn(params, channels: dict[str, int], strides: dict[str, int], num_classes: int,
                    image_size: int) -> TwoStageHead:
    return build_faster_rcnn(params, channels, strides, num_classes, image_size, masks=True)


def check_params(p: TwoStageParams, masks: bool) -> None:
    """Ranges and consistency of the settings (one-line errors instead of failures deep in torchvision)."""
    where = WHERE
    for stage in ("rpn", "box"):
        fg, bg = getattr(p, f"{stage}_fg_iou_thresh"), getattr(p, f"{stage}_bg_iou_thresh")
        if not 0.0 <= bg <= fg <= 1.0:
            raise ConfigError(f"{where}: need 0 <= {stage}_bg_iou_thresh <= {stage}_fg_iou_thresh <= 1 "
                              f"(got {bg} and {fg})")
    for key in ("rpn_positive_fraction", "box_positive_fraction", "rpn_nms_thresh", "box_nms_thresh",
                "box_score_thresh", "mask_threshold"):
        if not 0.0 <= getattr(p, key) <= 1.0:
            raise ConfigError(f"{where}.{key} = {getattr(p, key)}: expected a value in [0, 1]")
    for key in ("rpn_conv_depth", "rpn_batch_size_per_image", "rpn_pre_nms_top_n_train", "rpn_pre_nms_top_n_test",
                "rpn_post_nms_top_n_train", "rpn_post_nms_top_n_test", "roi_output_size", "box_head_dim",
                "box_batch_size_per_image", "box_detections_per_img", "mask_roi_output_size", "canonical_scale"):
        if getattr(p, key) < 1:
            raise ConfigError(f"{where}.{key} = {getattr(p, key)}: expected at least 1")
    if not p.aspect_ratios or min(p.aspect_ratios) <= 0:
        raise ConfigError(f"{where}.aspect_ratios = {p.aspect_ratios}: expected positive ratios (e.g. [0.5, 1, 2])")
    if p.anchor_sizes is not None and (not all(p.anchor_sizes) or min(min(s) for s in p.anchor_sizes) <= 0):
        raise ConfigError(f"{where}.anchor_sizes = {p.anchor_sizes}: expected positive sizes, one list per level")
    if p.mask_head_norm not in ("none", "bn"):
        raise ConfigError(f"{where}.mask_head_norm = {p.mask_head_norm!r}: expected none or bn")
    if masks and (not p.mask_head_layers or min(p.mask_head_layers) < 1):
        raise ConfigError(f"{where}.mask_head_layers = {p.mask_head_layers}: expected channel counts (e.g. [256] * 4)")


def _pooler(op: str, names: list[str], strides: list[int], size: int, sampling_ratio: int, p: TwoStageParams):
    if op == "roi_pool":
        return MultiScaleRoIPool(names, size, strides, p.canonical_scale, p.canonical_level)
    pool = MultiScaleRoIAlign(names, size, sampling_ratio, canonical_scale=p.canonical_scale,
                              canonical_level=p.canonical_level)
    # the strides are declared by the neck: set the scales instead of inferring them from the first batch
    pool.scales = [1.0 / s for s in strides]
    pool.map_levels = initLevelMapper(int(math.log2(strides[0])), int(math.log2(strides[-1])),
                                      canonical_scale=p.canonical_scale, canonical_level=p.canonical_level)
    return pool


def paste_masks(mask_probs: Tensor, boxes: Tensor, size: tuple[int, int], threshold: float) -> Tensor:
    """Per-detection 28x28 mask probabilities pasted into their boxes on an image of ``size``: N x H x W bool."""
    if mask_probs.numel() == 0:
        return torch.zeros((0, *size), dtype=torch.bool, device=boxes.device)
    return paste_masks_in_image(mask_probs, boxes, size)[:, 0] > threshold


# torchvision's Faster / Mask R-CNN keys -> detkit's: BackboneWithFPN (LastLevelMaxPool, P6, has no weights: detkit's
# model.neck.extra_op: maxpool), then the RPN and RoI heads, which keep torchvision's names under head.
RCNN_KEYS = (*FPN_BACKBONE, ("rpn.", "head.rpn."), ("roi_heads.", "head.roi_heads."))
WEIGHTS = WeightLayout(
    class_layers=(ClassLayer(r"roi_heads\.box_predictor\.cls_score\.(weight|bias)"),
                  ClassLayer(r"roi_heads\.box_predictor\.bbox_pred\.(weight|bias)", rows=4),
                  ClassLayer(r"roi_heads\.mask_predictor\.mask_fcn_logits\.(weight|bias)")),
    torchvision=partial(rename, renames=RCNN_KEYS), detectors="fasterrcnn_*, maskrcnn_*")


def from_torchvision_rcnn(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a torchvision ``fasterrcnn_*``/``maskrcnn_*`` state dict to detkit's keys, strictly (for a model
    assembled by hand; ``model.weights`` uses :data:`WEIGHTS`): ``backbone.body.*`` -> ``backbone.network.*``
    (MobileNet's numbered blocks -> ``backbone.network.features.N``), ``backbone.fpn.*`` -> ``neck.fpn.*``,
    ``rpn.*`` -> ``head.rpn.*``, ``roi_heads.*`` -> ``head.roi_heads.*``; any other key is a ``KeyError``."""
    return rename(state_dict, RCNN_KEYS, strict=True)
