"""An anchor-free YOLO-style head of the current generation (``model.head.name: yolo_af``).

Every cell of every level is a *point* (its centre, in input pixels) that may predict one box:

- **Decoupled branches** per level: a box branch (two 3x3 conv-BN-SiLU, then a 1x1 conv to ``4 x reg_max``) and a
  class branch (the same shape, to ``K`` logits). No objectness: a class score is the detection's score.
- **Boxes as distributions over distances** (distribution focal loss, Li et al. 2020): for each side (left, top,
  right, bottom) the box branch gives ``reg_max`` logits over the distances ``0 .. reg_max - 1`` strides from the
  point; the distance is the softmax's expectation. ``loss_dfl`` is the cross entropy towards the two bins around
  the target distance, weighted by their linear interpolation, so the distribution concentrates where the target
  lies; ``loss_box`` is 1 - CIoU (torchvision) of the decoded box.
- **Task-aligned assignment** (TOOD, Feng et al. 2021): for an object, the points inside its box are ranked by
  ``t = score^alpha * IoU^beta`` (the predicted score of the object's class, and the IoU of the predicted box with
  it: both detached); its ``topk`` best are its positives (a point claimed by two objects goes to the one it
  overlaps most). Classification targets are soft: ``t`` rescaled so that each object's best point gets that
  point's IoU, so the class score learns to rank boxes by how well they are placed (which is what COCO AP, over
  IoU 0.5-0.95, rewards). Losses are normalised by the sum of the classification targets.

Inference: ``sigmoid(class logits)`` x decoded boxes through :func:`detkit.heads.postprocess.batched_detections`
(one batched graph: exports with a dynamic batch, like the anchor-based head).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation, box_iou, complete_box_iou_loss

from detkit.errors import ConfigError
from detkit.heads.layout import ClassLayer, WeightLayout
from detkit.heads.levels import select_levels
from detkit.heads.params import WHERE, parse_params
from detkit.heads.postprocess import Flat, batched_detections, split_per_image


@dataclass
class YoloAFParams:
    """``model.head.params`` of ``yolo_af`` (every key with its default)."""

    levels: list[str] | None = None  # default: the neck's levels (the backbone's top three without a neck)
    reg_max: int = 16  # distance bins per side: 0 .. reg_max - 1 strides
    box_channels: int | None = None  # width of the box branch (default max(16, C / 4, 4 * reg_max))
    cls_channels: int | None = None  # width of the class branch (default max(C, min(K, 100)))
    topk: int = 10  # positives per object (task-aligned assignment)
    alpha: float = 0.5  # alignment t = score^alpha * IoU^beta
    beta: float = 6.0
    box_weight: float = 7.5
    cls_weight: float = 0.5
    dfl_weight: float = 1.5
    prior_objects: float = 5.0  # class bias init: about this many objects per image of data.image_size
    score_thresh: float = 0.001
    nms_thresh: float = 0.6
    max_detections: int = 300
    pre_nms_topk: int = 1000
    multi_label: bool = True


def make_points(shapes: list[tuple[int, int]], strides: list[int], device: torch.device,
                dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Cell centres ``[N, 2]`` (x, y input pixels) of every level, level by level, row-major, and their strides."""
    points, point_strides = [], []
    for (h, w), s in zip(shapes, strides):
        ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=dtype),
                                torch.arange(w, device=device, dtype=dtype), indexing="ij")
        points.append((torch.stack([xs, ys], -1).reshape(-1, 2) + 0.5) * s)
        point_strides.append(torch.full((h * w,), float(s), device=device, dtype=dtype))
    return torch.cat(points), torch.cat(point_strides)


def distances_to_boxes(points: Tensor, ltrb: Tensor) -> Tensor:
    """Points ``[..., 2]`` and distances ``[..., 4]`` (left, top, right, bottom; pixels) -> boxes xyxy."""
    return torch.cat([points - ltrb[..., :2], points + ltrb[..., 2:]], -1)


def boxes_to_distances(points: Tensor, boxes: Tensor) -> Tensor:
    """The inverse of :func:`distances_to_boxes`."""
    return torch.cat([points - boxes[..., :2], boxes[..., 2:] - points], -1)


def dfl_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Distribution focal loss per side: ``logits [P, 4, R]``, ``target [P, 4]`` (bins, in [0, R - 1)) -> ``[P]``
    (mean over the four sides)."""
    left = target.floor().long()
    w_right = target - left
    ce = lambda k: F.cross_entropy(logits.reshape(-1, logits.shape[-1]), k.reshape(-1),  # noqa: E731
                                   reduction="none").view_as(target)
    return (ce(left) * (1 - w_right) + ce(left + 1) * w_right).mean(-1)


@dataclass
class Assignment:
    """Per point of one image: ``positive [N]``, the assigned object ``gt_index [N]``, ``scores [N, K]`` (soft
    classification targets) and ``boxes [N, 4]`` (the assigned object's box)."""

    positive: Tensor
    gt_index: Tensor
    scores: Tensor
    boxes: Tensor


def task_aligned_assign(scores: Tensor, boxes: Tensor, points: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
                        topk: int, alpha: float, beta: float, eps: float = 1e-9) -> Assignment:
    """The task-aligned assignment of one image (see the module docstring). ``scores [N, K]`` (probabilities) and
    ``boxes [N, 4]`` are the (detached) predictions at ``points [N, 2]``; ``gt_labels`` are 1..K."""
    n, k = scores.shape
    if len(gt_boxes) == 0:
        return Assignment(torch.zeros(n, dtype=torch.bool, device=scores.device),
                          torch.zeros(n, dtype=torch.long, device=scores.device), scores.new_zeros(n, k),
                          boxes.new_zeros(n, 4))
    x, y = points[:, 0][None], points[:, 1][None]  # [1, N]
    inside = (x > gt_boxes[:, 0:1] + eps) & (y > gt_boxes[:, 1:2] + eps) & (x < gt_boxes[:, 2:3] - eps) & \
             (y < gt_boxes[:, 3:4] - eps)  # [M, N]
    iou = box_iou(gt_boxes, boxes).clamp(min=0) * inside
    align = scores[:, gt_labels - 1].T.pow(alpha) * iou.pow(beta) * inside  # [M, N]
    top = align.topk(min(topk, n), dim=1).indices
    candidate = torch.zeros_like(inside).scatter_(1, top, True) & inside
    positive = candidate.any(0)
    gt_index = iou.masked_fill(~candidate, -1.0).argmax(0)  # a point claimed twice: the object it overlaps most
    owned = candidate & (torch.arange(len(gt_boxes), device=scores.device)[:, None] == gt_index[None])
    align, iou = align * owned, iou * owned
    scale = iou.amax(1, keepdim=True) / (align.amax(1, keepdim=True) + eps)  # each object's best: its best IoU
    strength = (align * scale).amax(0) * positive  # [N]
    target = F.one_hot(gt_labels[gt_index] - 1, k).to(scores.dtype) * strength[:, None]
    return Assignment(positive, gt_index, target, gt_boxes[gt_index])


class Branch(nn.Sequential):
    """Two 3x3 conv-BN-SiLU and a 1x1 prediction conv."""

    def __init__(self, in_channels: int, width: int, out_channels: int) -> None:
        super().__init__(Conv2dNormActivation(in_channels, width, 3, activation_layer=nn.SiLU),
                         Conv2dNormActivation(width, width, 3, activation_layer=nn.SiLU),
                         nn.Conv2d(width, out_channels, 1))


class AnchorFreeHead(nn.Module):
    """See the module docstring. ``levels``/``channels``/``strides`` fine to coarse."""

    def __init__(self, levels: list[str], channels: list[int], strides: list[int], num_classes: int,
                 p: YoloAFParams, image_size: int) -> None:
        super().__init__()
        self.levels, self.strides, self.num_classes, self.p = list(levels), [int(s) for s in strides], num_classes, p
        c = channels[0]
        box_w = p.box_channels or max(16, c // 4, 4 * p.reg_max)
        cls_w = p.cls_channels or max(c, min(num_classes, 100))
        self.box = nn.ModuleList(Branch(ch, box_w, 4 * p.reg_max) for ch in channels)
        self.cls = nn.ModuleList(Branch(ch, cls_w, num_classes) for ch in channels)
        self.register_buffer("bins", torch.arange(p.reg_max, dtype=torch.float32), persistent=False)
        for box, cls, s in zip(self.box, self.cls, self.strides):
            nn.init.constant_(box[-1].bias, 1.0)
            cells = max(1.0, (image_size / s) ** 2)
            nn.init.constant_(cls[-1].bias, math.log(min(0.5, p.prior_objects / num_classes / cells)))

    def raw_outputs(self, features: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Box logits ``[B, N, 4, reg_max]``, class logits ``[B, N, K]``, points ``[N, 2]``, strides ``[N]``."""
        box, cls, shapes = [], [], []
        for i, level in enumerate(self.levels):
            x = features[level]
            b, _, h, w = x.shape
            shapes.append((h, w))
            box.append(self.box[i](x).flatten(2).transpose(1, 2).reshape(b, h * w, 4, self.p.reg_max))
            cls.append(self.cls[i](x).flatten(2).transpose(1, 2))
        points, strides = make_points(shapes, self.strides, box[0].device, box[0].dtype)
        return torch.cat(box, 1), torch.cat(cls, 1), points, strides

    def decode(self, box_logits: Tensor, points: Tensor, strides: Tensor) -> Tensor:
        """Boxes ``[B, N, 4]`` xyxy (input pixels): each side's expected distance, in strides, times the stride."""
        ltrb = box_logits.softmax(-1) @ self.bins.to(box_logits.dtype)
        return distances_to_boxes(points, ltrb * strides[:, None])

    def forward(self, features: dict[str, Tensor], images: Tensor, image_sizes: list[tuple[int, int]],
                targets: list[dict[str, Tensor]] | None = None):
        box_logits, cls_logits, points, strides = self.raw_outputs(features)
        boxes = self.decode(box_logits, points, strides)
        if targets is None:
            return split_per_image(self.detect(boxes, cls_logits, image_sizes), len(boxes)), {}
        return None, self.loss(box_logits, cls_logits, boxes, points, strides, targets)

    def loss(self, box_logits: Tensor, cls_logits: Tensor, boxes: Tensor, points: Tensor, strides: Tensor,
             targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        p = self.p
        scores = cls_logits.detach().sigmoid()
        assigned = [task_aligned_assign(scores[i], boxes[i].detach(), points, t["boxes"].to(boxes.dtype),
                                        t["labels"].long(), p.topk, p.alpha, p.beta) for i, t in enumerate(targets)]
        target_scores = torch.stack([a.scores for a in assigned])
        normaliser = target_scores.sum().clamp(min=1.0)
        loss_cls = F.binary_cross_entropy_with_logits(cls_logits, target_scores, reduction="sum") / normaliser
        pos = torch.stack([a.positive for a in assigned])
        if not pos.any():
            zero = box_logits.sum() * 0.0
            return {"loss_box": zero, "loss_cls": p.cls_weight * loss_cls, "loss_dfl": zero}
        weight = target_scores.sum(-1)[pos]
        target_boxes = torch.stack([a.boxes for a in assigned])[pos]
        loss_box = (complete_box_iou_loss(boxes[pos], target_boxes, reduction="none") * weight).sum() / normaliser
        point_pos = points[None].expand(len(targets), -1, -1)[pos]
        stride_pos = strides[None].expand(len(targets), -1)[pos]
        target_bins = (boxes_to_distances(point_pos, target_boxes) / stride_pos[:, None]).clamp(0, p.reg_max - 1.01)
        loss_dfl = (dfl_loss(box_logits[pos], target_bins) * weight).sum() / normaliser
        return {"loss_box": p.box_weight * loss_box, "loss_cls": p.cls_weight * loss_cls,
                "loss_dfl": p.dfl_weight * loss_dfl}

    def detect(self, boxes: Tensor, cls_logits: Tensor, image_sizes: list[tuple[int, int]]) -> Flat:
        p = self.p
        return batched_detections(boxes, cls_logits.sigmoid(), image_sizes, score_thresh=p.score_thresh,
                                  nms_thresh=p.nms_thresh, max_detections=p.max_detections, topk=p.pre_nms_topk,
                                  multi_label=p.multi_label)

    def flat_detections(self, features: dict[str, Tensor], images: Tensor, image_sizes: list[tuple[int, int]]) -> Flat:
        """The exported forward: features -> flat detections (boxes, scores, labels, batch index)."""
        box_logits, cls_logits, points, strides = self.raw_outputs(features)
        return self.detect(self.decode(box_logits, points, strides), cls_logits, image_sizes)


def check_params(p: YoloAFParams) -> None:
    if p.reg_max < 2:
        raise ConfigError(f"{WHERE}.reg_max = {p.reg_max}: expected at least 2 bins")
    for key in ("nms_thresh", "score_thresh"):
        if not 0.0 <= getattr(p, key) <= 1.0:
            raise ConfigError(f"{WHERE}.{key} = {getattr(p, key)}: expected a value in [0, 1]")
    for key in ("topk", "max_detections", "pre_nms_topk"):
        if getattr(p, key) < 1:
            raise ConfigError(f"{WHERE}.{key} = {getattr(p, key)}: expected at least 1")
    for key in ("alpha", "beta", "box_weight", "cls_weight", "dfl_weight"):
        if getattr(p, key) < 0:
            raise ConfigError(f"{WHERE}.{key} = {getattr(p, key)}: expected a value >= 0")
    if p.prior_objects <= 0:
        raise ConfigError(f"{WHERE}.prior_objects = {p.prior_objects}: expected a positive count")
    for key in ("box_channels", "cls_channels"):
        if getattr(p, key) is not None and getattr(p, key) < 1:
            raise ConfigError(f"{WHERE}.{key} = {getattr(p, key)}: expected at least 1 channel")


def build_yolo_af_head(params, channels: dict[str, int], strides: dict[str, int], num_classes: int,
                       image_size: int) -> AnchorFreeHead:
    """The registry's builder (see :data:`detkit.heads.HEADS`)."""
    p = parse_params(YoloAFParams, params)
    check_params(p)
    levels = select_levels("levels", p.levels, strides, list(strides)[-3:])
    return AnchorFreeHead(levels, [channels[k] for k in levels], [strides[k] for k in levels], num_classes, p,
                          int(image_size))


# model.weights: the class branches' last convs have one output per class (no background); torchvision has no such
# detector
WEIGHTS = WeightLayout(class_layers=(ClassLayer(r"cls\.\d+\.2\.(weight|bias)", background=False),))
