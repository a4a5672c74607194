"""Pascal VOC mAP at one IoU threshold (0.5), matching as the VOC devkit does.

Per class, detections are taken in descending score order (stable for ties). A detection is compared with every
ground-truth box of its class in its image and takes the one of highest IoU (the devkit's rule: matched or not).
If that IoU is >= the threshold: a ``difficult`` or ``iscrowd`` box makes the detection *ignored* (neither TP nor
FP); an unmatched box makes it a TP (the box is now matched); an already matched box makes it a FP (a duplicate).
Below the threshold, or with no box of its class in the image, it is a FP. Recall is TP / (boxes that are
neither difficult nor crowd).

IoU is computed on continuous pixel coordinates (``(x2 - x1) * (y2 - y1)``, no devkit "+1"): detkit's boxes are
continuous, the devkit's were inclusive integer pixel indices.

``voc07``: 11-point interpolated AP, the mean over t in {0, 0.1, ..., 1} of the highest precision at recall >= t
(0 where no recall reaches t); the thresholds are exactly i/10 so a recall of 3/10 reaches t = 0.3.
``voc12`` (VOC2010+): the area under the monotone (non-increasing) precision envelope.

A class without ground truth to find (no boxes, or only difficult/crowd ones) has no AP: ``None`` in the
per-class table, left out of the mean (its detections are still FPs of nothing). The mean is ``None`` when no
class has ground truth.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from detkit.errors import ConfigError
from detkit.evaluation.ground_truth import category_names

METHODS = ("voc07", "voc12")


@dataclass
class VocReport:
    """What :func:`voc_metrics` found.

    ``mAP``: ``{method: mean AP over classes with ground truth, or None}``; ``per_class``: ``{method: {class name:
    AP or None}}``; ``recall`` / ``precision``: ``{class name: array}``, one point per counted (not ignored)
    detection in score order; ``num_gt``: ``{class name: boxes to find}``.
    """

    iou_threshold: float = 0.5
    mAP: dict[str, float | None] = field(default_factory=dict)
    per_class: dict[str, dict[str, float | None]] = field(default_factory=dict)
    recall: dict[str, np.ndarray] = field(default_factory=dict)
    precision: dict[str, np.ndarray] = field(default_factory=dict)
    num_gt: dict[str, int] = field(default_factory=dict)


def voc_ap(recall: np.ndarray, precision: np.ndarray, method: str = "voc12") -> float:
    """AP of one PR curve (points in score order) by the VOC2007 11-point rule or the VOC2010+ area rule."""
    recall, precision = np.asarray(recall, np.float64), np.asarray(precision, np.float64)
    if method == "voc07":
        thresholds = np.arange(11) / 10
        return float(np.mean([precision[recall >= t].max() if np.any(recall >= t) else 0.0 for t in thresholds]))
    if method != "voc12":
        raise ConfigError(f"VOC AP method {method!r}: expected voc07 or voc12")
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # the envelope: highest precision at any higher recall
    steps = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with N xyxy boxes, continuous coordinates."""
    iw = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = iw * ih
    union = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def match_detections(det_images: Sequence[Any], det_boxes: np.ndarray, scores: np.ndarray,
                     gt_by_image: Mapping[Any, tuple[np.ndarray, np.ndarray]], iou_threshold: float = 0.5
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Devkit matching of one class. ``gt_by_image``: ``{image id: (boxes N x 4 xyxy, ignore N bool)}``.
    Returns ``(order, outcome)``: detection indices in score order and +1 (TP), 0 (ignored), -1 (FP) each."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    matched = {image: np.zeros(len(boxes), bool) for image, (boxes, _) in gt_by_image.items()}
    outcome = np.full(len(order), -1, np.int8)
    for n, d in enumerate(order):
        image = det_images[d]
        if image not in gt_by_image or not len(gt_by_image[image][0]):
            continue
        boxes, ignore = gt_by_image[image]
        ious = box_iou(det_boxes[d], boxes)
        j = int(np.argmax(ious))
        if ious[j] < iou_threshold:
            continue
        if ignore[j]:
            outcome[n] = 0
        elif not matched[image][j]:
            matched[image][j] = True
            outcome[n] = 1
    return order, outcome


def voc_metrics(gt: Mapping[str, Any], results: Sequence[Mapping[str, Any]], iou_threshold: float = 0.5,
                class_names: Sequence[str] | None = None) -> VocReport:
    """VOC AP (both methods) of COCO ``results`` (``bbox`` xywh) against the COCO ground-truth dict ``gt``
    (``difficult`` and ``iscrowd`` boxes are ignored)."""
    names = category_names(gt, class_names)
    gt_boxes: dict[Any, dict[Any, list]] = defaultdict(lambda: defaultdict(list))
    for ann in gt.get("annotations", []):
        x, y, w, h = ann["bbox"]
        ignore = bool(ann.get("difficult", 0)) or bool(ann.get("iscrowd", 0))
        gt_boxes[ann["category_id"]][ann["image_id"]].append((x, y, x + w, y + h, ignore))
    dets: dict[Any, list] = defaultdict(list)
    image_ids = {img["id"] for img in gt["images"]}
    for r in results:
        if r["image_id"] in image_ids:
            x, y, w, h = r["bbox"]
            dets[r["category_id"]].append((r["image_id"], x, y, x + w, y + h, float(r["score"])))
    report = VocReport(iou_threshold=iou_threshold, per_class={m: {} for m in METHODS})
    for cat, name in names.items():
        by_image = {image: (np.asarray([b[:4] for b in boxes], np.float64), np.asarray([b[4] for b in boxes], bool))
                    for image, boxes in gt_boxes.get(cat, {}).items()}
        num_gt = int(sum((~ignore).sum() for _, ignore in by_image.values()))
        rows = dets.get(cat, [])
        det_boxes = np.asarray([row[1:5] for row in rows], np.float64).reshape(-1, 4)
        _, outcome = match_detections([row[0] for row in rows], det_boxes, np.asarray([row[5] for row in rows]),
                                      by_image, iou_threshold)
        counted = outcome[outcome != 0]
        tp, fp = np.cumsum(counted == 1), np.cumsum(counted == -1)
        recall = tp / num_gt if num_gt else np.zeros(len(counted))
        precision = tp / np.maximum(tp + fp, 1)
        report.num_gt[name], report.recall[name], report.precision[name] = num_gt, recall, precision
        for method in METHODS:
            report.per_class[method][name] = voc_ap(recall, precision, method) if num_gt else None
    for method in METHODS:
        defined = [ap for ap in report.per_class[method].values() if ap is not None]
        report.mAP[method] = float(np.mean(defined)) if defined else None
    return report
