"""SSD and SSDlite heads on any backbone, composed from torchvision's SSD parts.

The head takes some of the levels it is given (``in_levels``: backbone ``c_k`` or neck ``p_k``), adds *extra
layers* above the coarsest one (one stride-2 block per entry of ``extra_channels``; they belong to the head
because their channel counts vary, and a neck has one), and predicts per default box on every level with
torchvision's ``SSDHead`` (3x3 convs) or, with ``lite: true``, ``SSDLiteHead`` (3x3 depthwise + 1x1, BN,
ReLU6; the extras are then depthwise-separable too, as torchvision's SSDlite).

Default boxes come from torchvision's ``DefaultBoxGenerator`` (scales from ``min_ratio``/``max_ratio`` or
``scales``, ``2 + 2 * len(aspect_ratios)`` boxes per location). Training matches them to the ground truth with
torchvision's ``SSDMatcher`` (IoU >= ``iou_thresh``, plus the best default box of every object), encodes with
``BoxCoder(bbox_reg_weights)``, and returns ``loss_box_reg`` (Smooth-L1 over the positives) and
``loss_classifier`` (cross-entropy over the positives and the hardest ``neg_to_pos_ratio`` x as many
negatives), both divided by the number of positives: torchvision's ``SSD.compute_loss``. Eval decodes, keeps
the ``topk_candidates`` best boxes per class above ``score_thresh``, and runs ``batched_nms``
(torchvision's ``SSD.postprocess_detections``, without its per-class and per-image loops).

**Padded batches.** ``DefaultBoxGenerator`` places box centres uniformly over the (padded) batch tensor -- the
grid the feature maps cover -- and sizes them relative to that tensor's width and height, so in a non-square
padded batch its "square" boxes would be stretched. detkit keeps the centres and sizes the boxes relative to
``data.image_size`` instead (the size every image was resized to, longest side): a box of scale ``s`` and
aspect ratio ``a`` is ``s * S * sqrt(a)`` wide and ``s * S / sqrt(a)`` tall in input pixels whatever the
padding. For square ``S x S`` inputs (torchvision's SSD resizes everything to a square) both agree exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder, SSDMatcher
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSDHead
from torchvision.models.detection.ssdlite import SSDLiteHead
from torchvision.ops import box_iou
from torchvision.ops.misc import Conv2dNormActivation

from detkit.errors import ConfigError
from detkit.heads.layout import ClassLayer, WeightLayout
from detkit.heads.levels import select_levels
from detkit.heads.params import WHERE, parse_params
from detkit.heads.postprocess import Flat, batched_detections, split_per_image

# torchvision's SSDlite norm layer (also used here for the plain extras' BatchNorm)
NORM = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)


@dataclass
class SSDParams:
    """``model.head.params`` of ``ssd`` (defaults: torchvision's SSD; ``configs/_base_/models/ssdlite*.yaml``
    sets torchvision's SSDlite values)."""

    # levels: the features the head predicts on, fine to coarse. Default: with a neck all its levels; without,
    # the backbone's top two (SSD's conv4_3/fc7, SSDlite's C4/C5).
    in_levels: list[str] | None = None
    # one extra stride-2 level above the coarsest in_level per entry (its channels). Default: [512, 256, 256, 256]
    # without a neck (2 + 4 = 6 levels, as SSD/SSDlite), [] with one (the neck has its own top levels).
    extra_channels: list[int] | None = None
    lite: bool = False  # SSDlite: depthwise-separable prediction heads and extras (torchvision's SSDLiteHead)
    # default boxes (torchvision's DefaultBoxGenerator): per level 2 square boxes (scale s_k and sqrt(s_k s_k+1))
    # + 2 per aspect ratio (w/h = a and 1/a). One list per level, or one list for every level.
    aspect_ratios: list[list[float]] | list[float] = field(default_factory=lambda: [2.0, 3.0])
    min_ratio: float = 0.2  # scale of the finest level, relative to data.image_size (linear up to max_ratio)
    max_ratio: float = 0.95  # scale of the coarsest level
    scales: list[float] | None = None  # explicit scales instead: one per level + 1 (the last is s_{n+1})
    steps: list[int] | None = None  # box centres at (i + 0.5) * step px; default: spread evenly over the input
    clip: bool = True  # clip default box sizes to the image size (torchvision's clip)
    # training
    iou_thresh: float = 0.5  # a default box with IoU >= this with an object is a positive (plus each object's best)
    neg_to_pos_ratio: float = 3.0  # hard negative mining: the highest-loss negatives, this many per positive
    bbox_reg_weights: list[float] = field(default_factory=lambda: [10.0, 10.0, 5.0, 5.0])  # BoxCoder (x, y, w, h)
    # inference
    score_thresh: float = 0.01  # softmax score below which a box is dropped
    nms_thresh: float = 0.45  # IoU of per-class NMS
    topk_candidates: int = 400  # best boxes per class kept before NMS
    detections_per_img: int = 200  # kept after NMS


class DefaultBoxes(nn.Module):
    """torchvision's ``DefaultBoxGenerator`` with box sizes relative to a fixed ``image_size`` (see the module
    docstring): ``forward(images, feature_maps) -> Tensor[A, 4]`` xyxy in input pixels, the same for every image
    of the batch. The last result is cached (it depends only on the grid and input shapes)."""

    def __init__(self, generator: DefaultBoxGenerator, image_size: int) -> None:
        super().__init__()
        self.generator, self.image_size = generator, int(image_size)
        self._cache: tuple[tuple, Tensor] | None = None

    def forward(self, images: Tensor, feature_maps: Sequence[Tensor]) -> Tensor:
        h, w = images.shape[-2:]
        grids = tuple(tuple(f.shape[-2:]) for f in feature_maps)
        key = (grids, h, w, images.device)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        # the generator reads only shapes, the device and the dtype: float32 stand-ins (boxes in full precision
        # under autocast too)
        stand_ins = [torch.empty((0, 0, *g), device=images.device) for g in grids]
        boxes = self.generator(ImageList(torch.empty((0, 0, h, w)), [(h, w)]), stand_ins)[0]
        if (h, w) != (self.image_size, self.image_size):
            centres, sizes = (boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]
            sizes = sizes * sizes.new_tensor([self.image_size / w, self.image_size / h])
            boxes = torch.cat([centres - sizes / 2, centres + sizes / 2], dim=1)
        self._cache = (key, boxes)
        return boxes

    def num_anchors_per_location(self) -> list[int]:
        return self.generator.num_anchors_per_location()


class SingleShotHead(nn.Module):
    """Extras + SSD/SSDlite prediction head + default boxes, matching, loss and post-processing.

    ``forward(features, images, image_sizes, targets)`` -> ``([], losses)`` in training,
    ``(detections in input pixels, {})`` in eval (the head contract of :mod:`detkit.heads`).
    """

    def __init__(self, in_levels: list[str], extras: nn.ModuleList, predictor: nn.Module, default_boxes: DefaultBoxes,
                 p: SSDParams) -> None:
        super().__init__()
        self.in_levels, self.extras, self.predictor, self.default_boxes = in_levels, extras, predictor, default_boxes
        self.box_coder = BoxCoder(weights=tuple(float(w) for w in p.bbox_reg_weights))
        self.matcher = SSDMatcher(p.iou_thresh)
        self.neg_to_pos_ratio = p.neg_to_pos_ratio
        self.score_thresh, self.nms_thresh = p.score_thresh, p.nms_thresh
        self.topk_candidates, self.detections_per_img = p.topk_candidates, p.detections_per_img

    def feature_maps(self, features: Mapping[str, Tensor]) -> list[Tensor]:
        """The maps predicted on: ``in_levels`` then the extra levels."""
        maps = [features[k] for k in self.in_levels]
        x = maps[-1]
        for block in self.extras:
            x = block(x)
            maps.append(x)
        return maps

    def forward(self, features: dict[str, Tensor], images: Tensor, image_sizes: list[tuple[int, int]],
                targets: list[dict[str, Tensor]] | None = None):
        maps = self.feature_maps(features)
        out = self.predictor(maps)  # bbox_regression [B, A, 4], cls_logits [B, A, K + 1]
        anchors = self.default_boxes(images, maps)
        if self.training:
            if targets is None:
                raise ValueError("in training mode the SSD head needs targets")
            matched = [self.match(t["boxes"], anchors) for t in targets]
            return [], self.compute_loss(targets, out, anchors, matched)
        return self.postprocess(out, anchors, image_sizes), {}

    def match(self, boxes: Tensor, anchors: Tensor) -> Tensor:
        """Index of the object each default box is assigned to, -1 for background (torchvision's SSDMatcher)."""
        if boxes.numel() == 0:
            return torch.full((len(anchors),), -1, dtype=torch.int64, device=anchors.device)
        return self.matcher(box_iou(boxes, anchors))

    def compute_loss(self, targets: list[dict[str, Tensor]], out: dict[str, Tensor], anchors: Tensor,
                     matched: list[Tensor]) -> dict[str, Tensor]:
        """Smooth-L1 over the positives + cross-entropy over positives and hard negatives, / number of positives."""
        regression, logits = out["bbox_regression"].float(), out["cls_logits"].float()
        cls_targets = torch.zeros(logits.shape[:2], dtype=torch.int64, device=logits.device)
        box_loss = regression.new_zeros(())
        for i, (t, m) in enumerate(zip(targets, matched)):
            fg = torch.where(m >= 0)[0]
            cls_targets[i, fg] = t["labels"][m[fg]].to(torch.int64)
            encoded = self.box_coder.encode_single(t["boxes"][m[fg]].float(), anchors[fg])
            box_loss = box_loss + F.smooth_l1_loss(regression[i, fg], encoded, reduction="sum")
        cls_loss = F.cross_entropy(logits.flatten(0, 1), cls_targets.flatten(), reduction="none")
        cls_loss = cls_loss.view(cls_targets.shape)
        positive = cls_targets > 0
        negative = hard_negatives(cls_loss.detach(), positive, self.neg_to_pos_ratio)
        n = positive.sum().clamp(min=1)
        return {"loss_classifier": (cls_loss[positive].sum() + cls_loss[negative].sum()) / n,
                "loss_box_reg": box_loss / n}

    def detect(self, out: dict[str, Tensor], anchors: Tensor, image_sizes: list[tuple[int, int]]) -> Flat:
        """Flat detections of the batch: decode, per class the ``topk_candidates`` best above ``score_thresh``,
        class-wise NMS, ``detections_per_img`` per image (:func:`detkit.heads.postprocess.batched_detections`)."""
        regression = out["bbox_regression"]
        scores = F.softmax(out["cls_logits"], dim=-1)[..., 1:]  # background (0) dropped: column j is label j + 1
        boxes = self.box_coder.decode_single(regression.reshape(-1, 4), anchors.repeat(regression.shape[0], 1))
        return batched_detections(boxes.view(regression.shape), scores, image_sizes, score_thresh=self.score_thresh,
                                  nms_thresh=self.nms_thresh, max_detections=self.detections_per_img,
                                  topk=self.topk_candidates, per_class_topk=True)

    def postprocess(self, out: dict[str, Tensor], anchors: Tensor,
                    image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        return split_per_image(self.detect(out, anchors, image_sizes), out["cls_logits"].shape[0])

    def flat_detections(self, features: dict[str, Tensor], images: Tensor, image_sizes: list[tuple[int, int]]) -> Flat:
        """The exported forward: features -> flat detections (boxes, scores, labels, batch index)."""
        maps = self.feature_maps(features)
        return self.detect(self.predictor(maps), self.default_boxes(images, maps), image_sizes)


def hard_negatives(cls_loss: Tensor, positive: Tensor, ratio: float) -> Tensor:
    """Hard negative mining: per image (row) the ``ratio * positives`` background boxes of highest loss.

    torchvision's ranking (sort by loss with the positives at -inf); the mask never includes a positive, even
    when an image has fewer negatives than it asks for.
    """
    num_negative = ratio * positive.sum(1, keepdim=True)
    loss = cls_loss.masked_fill(positive, -float("inf"))
    rank = loss.argsort(1, descending=True).argsort(1)
    return (rank < num_negative) & ~positive


def _init(module: nn.Module, lite: bool) -> None:
    """torchvision's initialisation: SSDlite normal(0, 0.03), SSD Xavier; biases 0."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            if lite:
                nn.init.normal_(layer.weight, mean=0.0, std=0.03)
            else:
                nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def extra_block(in_channels: int, out_channels: int, lite: bool) -> nn.Sequential:
    """One extra level (stride 2): 1x1 to ``out_channels // 2`` then a stride-2 3x3 to ``out_channels`` (SSD,
    BN + ReLU); SSDlite: 1x1, stride-2 3x3 depthwise, 1x1 to ``out_channels`` (BN + ReLU6), torchvision's."""
    mid = out_channels // 2
    if not lite:
        return nn.Sequential(
            Conv2dNormActivation(in_channels, mid, 1, norm_layer=NORM, activation_layer=nn.ReLU),
            Conv2dNormActivation(mid, out_channels, 3, stride=2, norm_layer=NORM, activation_layer=nn.ReLU))
    return nn.Sequential(
        Conv2dNormActivation(in_channels, mid, 1, norm_layer=NORM, activation_layer=nn.ReLU6),
        Conv2dNormActivation(mid, mid, 3, stride=2, groups=mid, norm_layer=NORM, activation_layer=nn.ReLU6),
        Conv2dNormActivation(mid, out_channels, 1, norm_layer=NORM, activation_layer=nn.ReLU6))


def build_ssd_head(params, channels: dict[str, int], strides: dict[str, int], num_classes: int,
                   image_size: int) -> SingleShotHead:
    """The registry's builder (see :data:`detkit.heads.HEADS`): ``model.head.params`` checked against
    :class:`SSDParams`; ``channels``/``strides`` are the levels the head receives (backbone or neck)."""
    p = parse_params(SSDParams, params)
    levels = list(strides)
    has_neck = all(k.startswith("p") for k in levels)
    in_levels = select_levels("in_levels", p.in_levels, strides, levels if has_neck else levels[-2:])
    extra = list(p.extra_channels) if p.extra_channels is not None else ([] if has_neck else [512, 256, 256, 256])
    n = len(in_levels) + len(extra)
    ratios = _aspect_ratios(p.aspect_ratios, n, in_levels, len(extra))
    check_params(p, n, extra)
    generator = DefaultBoxGenerator(ratios, p.min_ratio, p.max_ratio,
                                    scales=list(p.scales) if p.scales is not None else None,
                                    steps=list(p.steps) if p.steps is not None else None, clip=p.clip)
    extras = nn.ModuleList()
    c = channels[in_levels[-1]]
    for out in extra:
        extras.append(extra_block(c, out, p.lite))
        c = out
    _init(extras, p.lite)
    in_channels = [channels[k] for k in in_levels] + extra
    anchors = generator.num_anchors_per_location()
    predictor = (SSDLiteHead(in_channels, anchors, num_classes + 1, NORM) if p.lite
                 else SSDHead(in_channels, anchors, num_classes + 1))
    head = SingleShotHead(in_levels, extras, predictor, DefaultBoxes(generator, image_size), p)
    top = strides[in_levels[-1]]
    head.levels = in_levels + [f"extra{i + 1}" for i in range(len(extra))]
    head.strides = {**{k: strides[k] for k in in_levels},
                    **{f"extra{i + 1}": top * 2 ** (i + 1) for i in range(len(extra))}}  # nominal
    return head


def _aspect_ratios(value, n: int, in_levels: list[str], num_extra: int) -> list[list[float]]:
    if value and all(isinstance(v, int | float) for v in value):
        value = [list(value)] * n
    ratios = [[float(a) for a in r] for r in value]
    if len(ratios) != n:
        raise ConfigError(f"{WHERE}.aspect_ratios has {len(ratios)} entries for {n} levels (in_levels {in_levels} + "
                          f"{num_extra} extra): give one list per level, or one list for all (e.g. [2, 3])")
    if any(a <= 0 for r in ratios for a in r):
        raise ConfigError(f"{WHERE}.aspect_ratios = {value}: expected positive ratios (width / height, e.g. [2, 3])")
    return ratios


def check_params(p: SSDParams, n: int, extra: list[int]) -> None:
    """Ranges and consistency of the settings (one-line errors instead of failures deep in torchvision)."""
    if any(c < 2 for c in extra):
        raise ConfigError(f"{WHERE}.extra_channels = {extra}: expected channel counts >= 2 (e.g. [512, 256, 256, 256])")
    if p.scales is not None:
        if len(p.scales) != n + 1 or min(p.scales) <= 0:
            raise ConfigError(f"{WHERE}.scales = {p.scales}: expected {n + 1} positive scales ({n} levels + 1, "
                              f"relative to data.image_size)")
    elif not 0 < p.min_ratio <= p.max_ratio:
        raise ConfigError(f"{WHERE}: need 0 < min_ratio <= max_ratio (got {p.min_ratio} and {p.max_ratio})")
    if p.steps is not None and (len(p.steps) != n or min(p.steps) < 1):
        raise ConfigError(f"{WHERE}.steps = {p.steps}: expected {n} positive steps in pixels (one per level), or null")
    if not 0 < p.iou_thresh <= 1:
        raise ConfigError(f"{WHERE}.iou_thresh = {p.iou_thresh}: expected a value in (0, 1]")
    for key in ("score_thresh", "nms_thresh"):
        if not 0 <= getattr(p, key) <= 1:
            raise ConfigError(f"{WHERE}.{key} = {getattr(p, key)}: expected a value in [0, 1]")
    if p.neg_to_pos_ratio <= 0:
        raise ConfigError(f"{WHERE}.neg_to_pos_ratio = {p.neg_to_pos_ratio}: expected a positive number (SSD: 3)")
    for key in ("topk_candidates", "detections_per_img"):
        if getattr(p, key) < 1:
            raise ConfigError(f"{WHERE}.{key} = {getattr(p, key)}: expected at least 1")
    if len(p.bbox_reg_weights) != 4 or min(p.bbox_reg_weights) <= 0:
        raise ConfigError(f"{WHERE}.bbox_reg_weights = {p.bbox_reg_weights}: expected 4 positive weights "
                          f"(x, y, w, h), e.g. [10, 10, 5, 5]")


def from_torchvision_ssd(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """torchvision's ``ssd300_vgg16`` or ``ssdlite320_mobilenet_v3_large`` state dict under detkit's keys.

    SSD300 (it has ``backbone.scale_weight``): ``backbone.*`` -> ``backbone.network.*`` (the ``ssd_vgg16`` backbone
    is torchvision's extractor), ``head.*`` -> ``head.predictor.*`` (torchvision's ``SSDHead``). SSDlite:
    :func:`from_torchvision_ssdlite`, with the block torchvision cuts inside read from the keys."""
    if "backbone.scale_weight" in state_dict:
        out = {}
        for key, value in state_dict.items():
            if key.startswith("backbone."):
                out["backbone.network." + key[len("backbone."):]] = value
            elif key.startswith("head."):
                out["head.predictor." + key[len("head."):]] = value
            else:
                raise KeyError(f"unexpected torchvision key {key!r}")
        return out
    blocks = [int(k.split(".")[3]) for k in state_dict if k.startswith("backbone.features.0.")]
    if not blocks:
        raise KeyError("neither torchvision's SSD300 (backbone.scale_weight) nor its SSDlite (backbone.features.0.*)")
    return from_torchvision_ssdlite(state_dict, max(blocks))


def from_torchvision_ssdlite(state_dict: Mapping[str, Tensor], c4_block: int = 13) -> dict[str, Tensor]:
    """Rename torchvision's ``ssdlite320_mobilenet_v3_large`` state dict to a detkit model with the same network.

    torchvision's extractor splits MobileNetV3's ``features`` inside block ``c4_block`` (C4 = the output of its
    expansion conv): ``backbone.features.0.{i}`` (i < c4_block) -> ``backbone.network.features.{i}``,
    ``backbone.features.0.{c4_block}`` -> ``...features.{c4_block}.block.0``, ``backbone.features.1.0.{j}`` (j >= 1) ->
    ``...features.{c4_block}.block.{j}``, ``backbone.features.1.{i}`` -> ``...features.{c4_block + i}``;
    ``backbone.extra.*`` -> ``head.extras.*``, ``head.*`` -> ``head.predictor.*``. The detkit backbone must have
    the same taps (a level plan with ``c4`` ending after ``features.{c4_block}.block.0``; detkit's MobileNetV3
    plan ends ``c4`` at the last stride-16 block instead).
    """
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if key.startswith("backbone.features.0."):
            i, rest = int(parts[3]), parts[4:]
            new = [f"features.{i}"] if i < c4_block else [f"features.{c4_block}.block.0"]
            out[".".join(["backbone.network", *new, *rest])] = value
        elif key.startswith("backbone.features.1."):
            i = int(parts[3])
            if i == 0:
                new, rest = [f"features.{c4_block}.block.{parts[4]}"], parts[5:]  # the slice keeps its keys
            else:
                new, rest = [f"features.{c4_block + i}"], parts[4:]
            out[".".join(["backbone.network", *new, *rest])] = value
        elif key.startswith("backbone.extra."):
            out["head.extras." + key[len("backbone.extra."):]] = value
        elif key.startswith("head."):
            out["head.predictor." + key[len("head."):]] = value
        else:
            raise KeyError(f"unexpected torchvision key {key!r}")
    return out


# SSD300 (the conv itself) and SSDlite (the 1x1 after the depthwise conv): (anchors x (background + classes)) outputs
WEIGHTS = WeightLayout(
    class_layers=(ClassLayer(r"predictor\.classification_head\.module_list\.\d+\.(1\.)?(weight|bias)"),),
    torchvision=from_torchvision_ssd, detectors="ssd300_vgg16, ssdlite320_mobilenet_v3_large")
