"""A YOLO-style grid head with anchors: per pyramid level, per grid cell and anchor, box offsets, objectness
and class scores; target assignment by anchor shape with neighbouring cells; CIoU/GIoU + BCE losses; decode
and class-aware batched NMS.

Box coding (YOLOv5's bounded form). For a cell ``(gx, gy)`` of a level with stride ``s`` and an anchor
``(aw, ah)`` in input pixels, the raw outputs ``t`` decode to

    cx = (2 * sigmoid(tx) - 0.5 + gx) * s        w = aw * (2 * sigmoid(tw)) ** 2

(same for y/h): a centre anywhere from half a cell left of the cell to half a cell right of the next one, a
size from 0 to 4x the anchor. :func:`encode` is the exact inverse on that range.

Target assignment (see ``docs/architecture.md``). A ground-truth box is matched to every anchor (of every
level) whose shape is close to its own, ``max(w/aw, aw/w, h/ah, ah/h) < ratio_thresh`` (``match: ratio``,
default 4 = the range the box coding can express), or whose centred IoU with it exceeds ``iou_thresh``
(``match: iou``). Each match is made in the cell holding the box centre and, with ``neighbour_cells``, in the
two adjacent cells closest to the centre (one horizontal, one vertical), which the coding can also reach.
A box that no anchor matches is given its best-fitting anchor in its centre cell (counted in
``boxes_force_matched``), so no object is silently left without a target. Why this rule: matching by shape
instead of by IoU with a placed anchor gives every object several positives across levels and cells (three
to nine per object instead of about one), which matters most with few images and from-scratch training,
and the positives are exactly the predictions that the bounded coding can move onto the box.

Losses, normalised by the number of positives P (so their scale does not depend on the image size):
``loss_box = box_weight * sum(1 - CIoU) / P`` (``box_loss: ciou | giou | diou``, torchvision's losses),
``loss_obj = obj_weight * sum_levels balance_l * BCE(obj, target) / P`` with target ``IoU(pred, gt)`` (detached,
clamped at 0) at the positives and 0 elsewhere (``obj_iou_target`` blends 1 and the IoU),
``loss_cls = cls_weight * BCE(cls, one-hot) / P`` over the positives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import (
    Conv2dNormActivation,
    complete_box_iou_loss,
    distance_box_iou_loss,
    generalized_box_iou_loss,
)

from detkit.errors import ConfigError
from detkit.heads.levels import select_levels
from detkit.heads.params import WHERE, parse_params
from detkit.heads.postprocess import Flat, batched_detections, split_per_image

BOX_LOSSES = {"ciou": complete_box_iou_loss, "giou": generalized_box_iou_loss, "diou": distance_box_iou_loss}
DEFAULT_ANCHOR_SHAPES = ((4.0, 4.0), (5.66, 2.83), (2.83, 5.66))  # x stride: area (4s)^2, aspect 1, 2, 1/2


@dataclass
class YoloParams:
    """``model.head.params`` of ``yolo``."""

    levels: list[str] | None = None  # feature levels (default: the neck's levels, or the backbone's top three)
    anchors: list[list[list[float]]] | None = None  # per level, [w, h] pairs in input px (`detkit data anchors`)
    head_convs: int = 2  # 3x3 conv-BN-SiLU layers per level before the 1x1 prediction conv
    head_channels: int | None = None  # their width (default: the level's channels)
    # target assignment
    match: str = "ratio"  # ratio (max side ratio < ratio_thresh) | iou (centred shape IoU > iou_thresh)
    ratio_thresh: float = 4.0
    iou_thresh: float = 0.3
    neighbour_cells: bool = True  # also assign the two adjacent cells nearest to the box centre
    # losses
    box_loss: str = "ciou"  # ciou | giou | diou
    box_weight: float = 5.0
    obj_weight: float = 1.0
    cls_weight: float = 1.0
    level_balance: list[float] | None = None  # objectness loss weight per level (default 1 each)
    obj_iou_target: float = 1.0  # objectness target at a positive: (1 - r) + r * IoU(pred, gt)
    label_smoothing: float = 0.0
    prior_prob: float = 0.01  # initial objectness / class probability
    # inference
    score_thresh: float = 0.001  # objectness x class probability
    nms_thresh: float = 0.6
    max_detections: int = 300
    pre_nms_topk: int = 10000  # candidates per image before NMS
    multi_label: bool = True  # a box may be kept for several classes (else: its best class only)


def default_anchors(strides: list[int]) -> list[list[list[float]]]:
    return [[[round(w * s, 1), round(h * s, 1)] for w, h in DEFAULT_ANCHOR_SHAPES] for s in strides]


def make_grid(h: int, w: int, device=None) -> Tensor:
    """``[h, w, 2]`` cell indices ``(gx, gy)``."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([xs, ys], dim=-1).float()


def decode(t: Tensor, grid: Tensor, anchors: Tensor, stride: float) -> Tensor:
    """Raw box outputs ``t[..., 4]`` at cells ``grid[..., 2]`` with ``anchors[..., 2]`` -> xyxy input pixels."""
    s = t.sigmoid() * 2.0
    xy = (s[..., :2] - 0.5 + grid) * stride
    wh = s[..., 2:4].square() * anchors
    return torch.cat([xy - wh / 2, xy + wh / 2], dim=-1)


def encode(boxes: Tensor, grid: Tensor, anchors: Tensor, stride: float, eps: float = 1e-7) -> Tensor:
    """The inverse of :func:`decode` (boxes must lie in the coding's range: centre offset in (-0.5, 1.5) cells
    from ``grid``, size in (0, 4) x anchor)."""
    xy = (boxes[..., :2] + boxes[..., 2:]) / 2
    wh = boxes[..., 2:] - boxes[..., :2]
    s_xy = (xy / stride - grid + 0.5) / 2
    s_wh = (wh / anchors).sqrt() / 2
    return torch.logit(torch.cat([s_xy, s_wh], dim=-1), eps=eps)


def paired_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of ``a[i]`` with ``b[i]`` (xyxy), without the N x N matrix of ``box_iou``."""
    wh = (torch.min(a[:, 2:], b[:, 2:]) - torch.max(a[:, :2], b[:, :2])).clamp(min=0)
    inter = wh.prod(1)
    union = (a[:, 2:] - a[:, :2]).prod(1) + (b[:, 2:] - b[:, :2]).prod(1) - inter
    return inter / union.clamp(min=1e-9)


def shape_match(wh: Tensor, anchors: Tensor, p: YoloParams) -> tuple[Tensor, Tensor]:
    """``[G, A]`` match mask and fit cost (lower is better) of boxes ``wh[G, 2]`` vs ``anchors[A, 2]``."""
    r = wh[:, None] / anchors[None]
    ratio = torch.max(r, 1.0 / r).amax(-1)
    inter = torch.min(wh[:, None], anchors[None]).prod(-1)
    iou = inter / (wh.prod(-1)[:, None] + anchors.prod(-1)[None] - inter)
    if p.match == "iou":
        return iou > p.iou_thresh, -iou
    return ratio < p.ratio_thresh, ratio


class YoloHead(nn.Module):
    """Per level: ``head_convs`` conv-BN-SiLU, then a 1x1 conv to ``A x (4 + 1 + K)`` (box, objectness,
    classes) per cell. ``anchors``: ``[L, A, 2]`` in input pixels."""

    def __init__(self, levels: list[str], channels: list[int], strides: list[int], anchors: Tensor,
                 num_classes: int, p: YoloParams) -> None:
        super().__init__()
        self.levels, self.strides, self.num_classes, self.p = list(levels), [int(s) for s in strides], num_classes, p
        self.register_buffer("anchors", anchors.float(), persistent=False)
        self.num_anchors = anchors.shape[1]
        self.stems = nn.ModuleList()
        self.preds = nn.ModuleList()
        outputs = self.num_anchors * (5 + num_classes)
        for ch in channels:
            width = p.head_channels or ch
            layers = [Conv2dNormActivation(ch if i == 0 else width, width, 3, activation_layer=nn.SiLU)
                      for i in range(p.head_convs)]
            self.stems.append(nn.Sequential(*layers))
            self.preds.append(nn.Conv2d(width if p.head_convs else ch, outputs, 1))
        self.balance = list(p.level_balance or [1.0] * len(levels))
        self.reset_bias()

    def reset_bias(self) -> None:
        prior = math.log(self.p.prior_prob / (1 - self.p.prior_prob))
        for conv in self.preds:
            b = conv.bias.detach().view(self.num_anchors, 5 + self.num_classes)
            b.zero_()
            b[:, 4:] = prior

    def raw_outputs(self, features: dict[str, Tensor]) -> list[Tensor]:
        """Per level ``[B, A, H, W, 5 + K]`` raw outputs."""
        outs = []
        for level, stem, pred in zip(self.levels, self.stems, self.preds):
            y = pred(stem(features[level]))
            b, _, h, w = y.shape
            outs.append(y.view(b, self.num_anchors, 5 + self.num_classes, h, w).permute(0, 1, 3, 4, 2))
        return outs

    def forward(self, features: dict[str, Tensor], images: Tensor, image_sizes: list[tuple[int, int]],
                targets: list[dict[str, Tensor]] | None = None):
        outs = self.raw_outputs(features)
        if self.training:
            if targets is None:
                raise ValueError("in training mode the yolo head needs targets")
            return [], self.loss(outs, targets)
        return self.postprocess(outs, image_sizes), {}

    # ----------------------------------------------------------------------------------------- training
    def assign(self, targets: list[dict[str, Tensor]], shapes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Per level: ``index`` (image, anchor, gy, gx) of each positive, its ``boxes`` (xyxy) and ``labels``
        (0-based). See the module docstring for the rule."""
        device = self.anchors.device
        boxes = torch.cat([t["boxes"].to(device).float() for t in targets]) if targets else torch.zeros(0, 4)
        labels = torch.cat([t["labels"].to(device).long() - 1 for t in targets]) if targets else torch.zeros(0)
        image = torch.cat([torch.full((len(t["boxes"]),), i, device=device, dtype=torch.long)
                           for i, t in enumerate(targets)]) if targets else torch.zeros(0, dtype=torch.long)
        wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1e-3)
        masks, costs = zip(*(shape_match(wh, self.anchors[i], self.p) for i in range(len(self.levels))))
        matched = torch.stack(masks, 1)  # [G, L, A]
        lonely = ~matched.flatten(1).any(1)
        if lonely.any():  # the best-fitting anchor for boxes nothing matched
            best = torch.stack(costs, 1).flatten(1).argmin(1)
            matched.view(len(boxes), -1)[lonely.nonzero()[:, 0], best[lonely]] = True
        self.boxes_force_matched = int(lonely.sum())
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2
        result = []
        for i, (stride, (h, w)) in enumerate(zip(self.strides, shapes)):
            g, a = matched[:, i].nonzero().unbind(1)
            c = centre[g] / stride
            centre_cell = torch.stack([c[:, 0].floor().clamp(0, w - 1), c[:, 1].floor().clamp(0, h - 1)], 1)
            cells, gg, aa = [centre_cell], [g], [a]
            if self.p.neighbour_cells:
                step = torch.where(c - c.floor() < 0.5, -1.0, 1.0)
                zero = torch.zeros_like(step[:, 0])
                for offset in (torch.stack([step[:, 0], zero], 1), torch.stack([zero, step[:, 1]], 1)):
                    n = centre_cell + offset
                    inside = (n[:, 0] >= 0) & (n[:, 0] < w) & (n[:, 1] >= 0) & (n[:, 1] < h)
                    cells.append(n[inside])
                    gg.append(g[inside])
                    aa.append(a[inside])
            cell, gg, aa = torch.cat(cells).long(), torch.cat(gg), torch.cat(aa)
            result.append({"index": torch.stack([image[gg], aa, cell[:, 1], cell[:, 0]], 1),
                           "cells": cell.float(), "boxes": boxes[gg], "labels": labels[gg]})
        return result

    def loss(self, outs: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        p = self.p
        assigned = self.assign(targets, [tuple(o.shape[2:4]) for o in outs])
        box_fn = BOX_LOSSES[p.box_loss]
        zero = outs[0].sum() * 0.0
        loss_box, loss_obj, loss_cls = zero, zero, zero
        num_pos = max(sum(len(a["index"]) for a in assigned), 1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            n = torch.tensor(float(num_pos), device=zero.device)
            torch.distributed.all_reduce(n)
            num_pos = max(n.item() / torch.distributed.get_world_size(), 1.0)
        for i, (out, a) in enumerate(zip(outs, assigned)):
            obj_target = torch.zeros(out.shape[:4], device=out.device, dtype=out.dtype)
            if len(a["index"]):
                b, an, gy, gx = a["index"].unbind(1)
                pred = out[b, an, gy, gx]
                pbox = decode(pred[:, :4], a["cells"], self.anchors[i][an], self.strides[i])
                loss_box = loss_box + box_fn(pbox, a["boxes"], reduction="sum")
                with torch.no_grad():
                    iou = paired_iou(pbox, a["boxes"])
                    score = (1.0 - p.obj_iou_target) + p.obj_iou_target * iou
                flat = ((b * self.num_anchors + an) * out.shape[2] + gy) * out.shape[3] + gx
                obj_target.view(-1).scatter_reduce_(0, flat, score.to(out.dtype), reduce="amax")
                cls_target = F.one_hot(a["labels"], self.num_classes).to(out.dtype)  # one class: all ones
                if p.label_smoothing > 0:
                    cls_target = cls_target * (1 - p.label_smoothing) + p.label_smoothing / self.num_classes
                loss_cls = loss_cls + F.binary_cross_entropy_with_logits(pred[:, 5:], cls_target, reduction="sum")
            loss_obj = loss_obj + self.balance[i] * F.binary_cross_entropy_with_logits(
                out[..., 4], obj_target, reduction="sum")
        return {"loss_box": p.box_weight * loss_box / num_pos, "loss_obj": p.obj_weight * loss_obj / num_pos,
                "loss_cls": p.cls_weight * loss_cls / num_pos}

    # ---------------------------------------------------------------------------------------- inference
    def decode_outputs(self, outs: list[Tensor]) -> tuple[Tensor, Tensor]:
        """All levels decoded: boxes ``[B, N, 4]`` (xyxy input px) and scores ``[B, N, K]`` (obj x class)."""
        boxes, scores = [], []
        for i, out in enumerate(outs):
            b, a, h, w, _ = out.shape
            grid = make_grid(h, w, out.device).view(1, 1, h, w, 2)
            anchors = self.anchors[i].view(1, a, 1, 1, 2)
            boxes.append(decode(out[..., :4], grid, anchors, self.strides[i]).reshape(b, -1, 4))
            scores.append((out[..., 4:5].sigmoid() * out[..., 5:].sigmoid()).reshape(b, -1, self.num_classes))
        return torch.cat(boxes, 1), torch.cat(scores, 1)

    def detect(self, outs: list[Tensor], image_sizes: list[tuple[int, int]]) -> Flat:
        """Flat detections of the batch (:func:`detkit.heads.postprocess.batched_detections`): candidates above
        ``score_thresh`` (obj x class), the ``pre_nms_topk`` best per image, class-wise NMS, ``max_detections``."""
        p = self.p
        boxes, scores = self.decode_outputs(outs)
        return batched_detections(boxes, scores, image_sizes, score_thresh=p.score_thresh, nms_thresh=p.nms_thresh,
                                  max_detections=p.max_detections, topk=p.pre_nms_topk, multi_label=p.multi_label)

    def postprocess(self, outs: list[Tensor], image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        return split_per_image(self.detect(outs, image_sizes), outs[0].shape[0])

    def flat_detections(self, features: dict[str, Tensor], images: Tensor, image_sizes: list[tuple[int, int]]) -> Flat:
        """The exported forward: features -> flat detections (boxes, scores, labels, batch index)."""
        return self.detect(self.raw_outputs(features), image_sizes)


def check_params(p: YoloParams) -> None:
    if p.match not in ("ratio", "iou"):
        raise ConfigError(f"{WHERE}.match = {p.match!r}: expected ratio or iou")
    if p.box_loss not in BOX_LOSSES:
        raise ConfigError(f"{WHERE}.box_loss = {p.box_loss!r}: expected one of {', '.join(BOX_LOSSES)}")
    if p.ratio_thresh <= 1.0:
        raise ConfigError(f"{WHERE}.ratio_thresh = {p.ratio_thresh}: expected a ratio above 1 (default 4)")
    for key in ("iou_thresh", "nms_thresh", "score_thresh", "obj_iou_target", "label_smoothing"):
        if not 0.0 <= getattr(p, key) <= 1.0:
            raise ConfigError(f"{WHERE}.{key} = {getattr(p, key)}: expected a value in [0, 1]")
    if not 0.0 < p.prior_prob < 1.0:
        raise ConfigError(f"{WHERE}.prior_prob = {p.prior_prob}: expected a probability in (0, 1)")
    for key in ("max_detections", "pre_nms_topk"):
        if getattr(p, key) < 1:
            raise ConfigError(f"{WHERE}.{key} = {getattr(p, key)}: expected at least 1")
    if p.head_convs < 0 or (p.head_channels is not None and p.head_channels < 1):
        raise ConfigError(f"{WHERE}: head_convs must be >= 0 and head_channels >= 1 "
                          f"(got {p.head_convs}, {p.head_channels})")
    for key in ("box_weight", "obj_weight", "cls_weight"):
        if getattr(p, key) < 0:
            raise ConfigError(f"{WHERE}.{key} = {getattr(p, key)}: expected a non-negative weight")


def check_anchors(anchors: list, levels: list[str]) -> Tensor:
    """``[L, A, 2]`` from the config's nested list, with one-line errors for a wrong layout."""
    if len(anchors) != len(levels):
        raise ConfigError(f"{WHERE}.anchors has {len(anchors)} entries for {len(levels)} levels {levels}: give one "
                          f"list of [w, h] pairs per level (`detkit data anchors` prints one)")
    counts = {len(level) for level in anchors}
    if len(counts) != 1 or 0 in counts:
        raise ConfigError(f"{WHERE}.anchors: every level needs the same number (>= 1) of anchors, got "
                          f"{[len(level) for level in anchors]}")
    for level in anchors:
        for pair in level:
            if len(pair) != 2 or min(pair) <= 0:
                raise ConfigError(f"{WHERE}.anchors: {pair} is not a [w, h] pair of positive sizes")
    return torch.tensor(anchors, dtype=torch.float32)


def build_yolo_head(params, channels: dict[str, int], strides: dict[str, int], num_classes: int,
                    image_size: int) -> YoloHead:
    """The registry's builder (see :data:`detkit.heads.HEADS`)."""
    p = parse_params(YoloParams, params)
    check_params(p)
    levels = select_levels("levels", p.levels, strides, list(strides)[-3:])
    ks = [strides[k] for k in levels]
    if p.level_balance is not None and len(p.level_balance) != len(levels):
        raise ConfigError(f"{WHERE}.level_balance has {len(p.level_balance)} weights for {len(levels)} levels")
    anchors = check_anchors(p.anchors if p.anchors is not None else default_anchors(ks), levels)
    return YoloHead(levels, [channels[k] for k in levels], ks, anchors, num_classes, p)
