"""RetinaNet and FCOS heads on any backbone and neck (``model.head.name: retinanet | fcos``).

Both are torchvision's own detectors without their backbone and image transform: detkit builds
``torchvision.models.detection.RetinaNet`` / ``FCOS`` around a stub backbone that only declares the neck's channel
count, and calls their parts -- the head (classification and box subnets), the anchor generator, the loss
(RetinaNet: sigmoid focal loss + smooth L1 / GIoU over IoU-matched anchors; FCOS: focal loss + GIoU +
centerness over centre-sampled points) and the post-processing (per-level top-k, score threshold, class-wise NMS) --
on detkit's features and already-resized batches. Their module names stay torchvision's under ``head.net``, so
torchvision's detection weights load (:data:`WEIGHTS`, :func:`from_torchvision_dense`).

Levels: the head runs on ``levels`` (default: the neck's levels, ``p3-p7`` in the shipped configs, as torchvision's
RetinaNet and FCOS). Anchors (RetinaNet): ``anchor_sizes`` per level (default ``4 * stride`` times 2^0,
2^(1/3), 2^(2/3), truncated to integers as torchvision does: 32, 40, 50 on P3 ... 512, 645, 812 on P7) and
``aspect_ratios``. FCOS uses one point per cell. Torchvision's class 0 (background) is never a detection. The
post-processing loops over images in Python (torchvision's), so these heads export for a fixed batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial

from torch import Tensor, nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection._utils import BoxLinearCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNetHead

from detkit.errors import ConfigError
from detkit.heads.layout import FPN_BACKBONE, ClassLayer, WeightLayout, rename
from detkit.heads.levels import select_levels
from detkit.heads.params import WHERE, parse_params


@dataclass
class DenseParams:
    """``model.head.params`` of ``retinanet`` and ``fcos`` (defaults: torchvision's)."""

    levels: list[str] | None = None  # default: every level the head receives (the neck's)
    anchor_sizes: list[list[float]] | None = None  # RetinaNet: per level (default int(4 x stride x 2^(0, 1/3, 2/3)))
    aspect_ratios: list[float] | None = None  # RetinaNet: default [0.5, 1.0, 2.0]
    head_norm: str = "none"  # none | group (GroupNorm(32) in the subnets: torchvision's v2 RetinaNet, and FCOS)
    score_thresh: float = 0.05
    nms_thresh: float = 0.5  # FCOS: 0.6
    detections_per_img: int = 300
    topk_candidates: int = 1000
    fg_iou_thresh: float = 0.5  # RetinaNet anchor matching
    bg_iou_thresh: float = 0.4
    center_sampling_radius: float = 1.5  # FCOS


@dataclass
class FcosParams(DenseParams):
    """``model.head.params`` of ``fcos``: torchvision's FCOS defaults (NMS 0.6, GroupNorm in the subnets)."""

    nms_thresh: float = 0.6
    head_norm: str = "group"


def _no_norm(channels: int) -> nn.Module:  # a norm_layer factory: no normalisation
    return nn.Identity()


class _FcosHead(FCOSHead):
    """torchvision's FCOSHead (the same module names) with the subnets' norm chosen: FCOSHead itself always builds
    GroupNorm(32)."""

    def __init__(self, width: int, num_classes: int, norm_layer) -> None:
        nn.Module.__init__(self)
        self.box_coder = BoxLinearCoder(normalize_by_size=True)
        self.classification_head = FCOSClassificationHead(width, 1, num_classes, 4, norm_layer=norm_layer)
        self.regression_head = FCOSRegressionHead(width, 1, 4, norm_layer=norm_layer)


class _Stub(nn.Module):
    """The backbone slot of torchvision's detector: only its declared channel count is read."""

    def __init__(self, out_channels: int) -> None:
        super().__init__()
        self.out_channels = out_channels


class DenseHead(nn.Module):
    """A torchvision one-stage detector (``net``) on detkit's features of ``levels``."""

    def __init__(self, net: RetinaNet | FCOS, levels: list[str]) -> None:
        super().__init__()
        self.net, self.levels = net, list(levels)
        self.is_fcos = isinstance(net, FCOS)

    def forward(self, features: dict[str, Tensor], images: Tensor, image_sizes: list[tuple[int, int]],
                targets: list[dict[str, Tensor]] | None = None):
        feats = [features[k] for k in self.levels]
        image_list = ImageList(images, [tuple(s) for s in image_sizes])
        outputs = self.net.head(feats)
        anchors = self.net.anchor_generator(image_list, feats)
        per_level = [x.size(2) * x.size(3) for x in feats]
        if targets is not None:
            losses = self.net.compute_loss(targets, outputs, anchors, *([per_level] if self.is_fcos else []))
            return None, {f"loss_{k}": v for k, v in losses.items()}
        # torchvision's class 0 is the background: never a detection (and never taking a top-k slot)
        outputs["cls_logits"] = outputs["cls_logits"].clone()
        outputs["cls_logits"][..., 0] = float("-inf")
        if not self.is_fcos:  # RetinaNet: several anchors per cell
            a = outputs["cls_logits"].size(1) // sum(per_level)
            per_level = [n * a for n in per_level]
        split = {k: list(v.split(per_level, dim=1)) for k, v in outputs.items()}
        split_anchors = [list(x.split(per_level)) for x in anchors]
        return self.net.postprocess_detections(split, split_anchors, image_list.image_sizes), {}


def _norm(p: DenseParams):
    if p.head_norm not in ("none", "group"):
        raise ConfigError(f"{WHERE}.head_norm = {p.head_norm!r}: expected none or group")
    return partial(nn.GroupNorm, 32) if p.head_norm == "group" else None


def _check(p: DenseParams, channels: dict[str, int], name: str) -> int:
    for key in ("score_thresh", "nms_thresh", "fg_iou_thresh", "bg_iou_thresh"):
        if not 0.0 <= getattr(p, key) <= 1.0:
            raise ConfigError(f"{WHERE}.{key} = {getattr(p, key)}: expected a value in [0, 1]")
    if p.bg_iou_thresh > p.fg_iou_thresh:
        raise ConfigError(f"{WHERE}: bg_iou_thresh {p.bg_iou_thresh} is above fg_iou_thresh {p.fg_iou_thresh}")
    for key in ("detections_per_img", "topk_candidates"):
        if getattr(p, key) < 1:
            raise ConfigError(f"{WHERE}.{key} = {getattr(p, key)}: expected at least 1")
    if p.center_sampling_radius <= 0:
        raise ConfigError(f"{WHERE}.center_sampling_radius = {p.center_sampling_radius}: expected a positive radius")
    widths = set(channels.values())
    if len(widths) != 1:
        raise ConfigError(f"model.neck.name = none: {name} needs one channel count over its levels (use a neck)")
    width = widths.pop()
    if p.head_norm == "group" and (width % 32 or width < 64):
        # GroupNorm(32) with one channel per group has a single value per group on a 1 x 1 map (P7 of a small
        # image), which it cannot normalise
        raise ConfigError(f"{WHERE}.head_norm = group: needs at least 64 channels, a multiple of 32 "
                          f"(model.neck.out_channels = {width})")
    return width


def build_retinanet_head(params, channels: dict[str, int], strides: dict[str, int], num_classes: int,
                         image_size: int) -> DenseHead:
    """The registry's builder (see :data:`detkit.heads.HEADS`)."""
    p = parse_params(DenseParams, params)
    width = _check(p, channels, "retinanet")
    levels = select_levels("levels", p.levels, strides, list(strides))
    # torchvision's sizes, truncated as it truncates them (32, 40, 50 on P3): its weights were trained on these
    sizes = p.anchor_sizes or [[float(int(4 * strides[k] * 2 ** (i / 3))) for i in range(3)] for k in levels]
    if len(sizes) != len(levels) or len({len(s) for s in sizes}) != 1 or min(min(s) for s in sizes) <= 0:
        raise ConfigError(f"{WHERE}.anchor_sizes: give {len(levels)} lists (one per level {levels}) of positive "
                          f"sizes, the same number per level")
    ratios = p.aspect_ratios or [0.5, 1.0, 2.0]
    if min(ratios) <= 0:
        raise ConfigError(f"{WHERE}.aspect_ratios = {ratios}: expected positive ratios")
    anchors = AnchorGenerator(tuple(tuple(s) for s in sizes), tuple(tuple(ratios) for _ in sizes))
    head = RetinaNetHead(width, anchors.num_anchors_per_location()[0], num_classes + 1, norm_layer=_norm(p))
    # torchvision's RetinaNet counts background among its classes: class 0 is never predicted
    net = RetinaNet(_Stub(width), num_classes + 1, anchor_generator=anchors, head=head,
                    score_thresh=p.score_thresh, nms_thresh=p.nms_thresh, detections_per_img=p.detections_per_img,
                    fg_iou_thresh=p.fg_iou_thresh, bg_iou_thresh=p.bg_iou_thresh,
                    topk_candidates=p.topk_candidates)
    return DenseHead(net, levels)


def build_fcos_head(params, channels: dict[str, int], strides: dict[str, int], num_classes: int,
                    image_size: int) -> DenseHead:
    """The registry's builder (see :data:`detkit.heads.HEADS`)."""
    p = parse_params(FcosParams, params)
    width = _check(p, channels, "fcos")
    levels = select_levels("levels", p.levels, strides, list(strides))
    anchors = AnchorGenerator(tuple((float(strides[k]),) for k in levels), ((1.0,),) * len(levels))
    head = _FcosHead(width, num_classes + 1, _norm(p) or _no_norm)
    net = FCOS(_Stub(width), num_classes + 1, anchor_generator=anchors, head=head,
               center_sampling_radius=p.center_sampling_radius, score_thresh=p.score_thresh,
               nms_thresh=p.nms_thresh, detections_per_img=p.detections_per_img, topk_candidates=p.topk_candidates)
    return DenseHead(net, levels)


# torchvision's RetinaNet / FCOS keys -> detkit's: the P6/P7 convs (LastLevelP6P7) are the neck's extra levels, the
# rest of BackboneWithFPN as for R-CNN, and the subnets keep their names under the DenseHead's torchvision detector
DENSE_KEYS = (("backbone.fpn.extra_blocks.p6.", "neck.fpn.extra_blocks.convs.0."),
              ("backbone.fpn.extra_blocks.p7.", "neck.fpn.extra_blocks.convs.1."),
              *FPN_BACKBONE, ("head.", "head.net.head."))
WEIGHTS = WeightLayout(class_layers=(ClassLayer(r"net\.head\.classification_head\.cls_logits\.(weight|bias)"),),
                       torchvision=partial(rename, renames=DENSE_KEYS), detectors="retinanet_*, fcos_*")


def from_torchvision_dense(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A torchvision ``retinanet_*``/``fcos_*`` state dict under detkit's keys (:data:`DENSE_KEYS`), strictly: any
    other key is a ``KeyError`` (``model.weights`` uses :data:`WEIGHTS`)."""
    return rename(state_dict, DENSE_KEYS, strict=True)
