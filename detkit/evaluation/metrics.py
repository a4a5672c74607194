"""Metric names, defined once; which metrics score which head; the evaluator contract.

``metrics.json`` keys: ``<iou type>_<COCO stat>`` (``bbox_AP``, ``segm_AP50``, ...), ``voc07_mAP``,
``voc12_mAP`` for detectors; :data:`SEMANTIC_STATS` for segmenters; plus ``per_class`` tables. ``eval.metrics``
picks metric families (:data:`DETECTION_METRICS` or ``semantic``), ``eval.main_metric`` one key.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from detkit.errors import ConfigError

IOU_TYPES = ("bbox", "segm")
COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
DETECTION_METRICS = ("coco", "voc07", "voc12")
SEMANTIC_METRICS = ("semantic",)
SEMANTIC_STATS = ("mIoU", "pixel_acc", "mean_class_acc", "dice")
VOC_STATS = tuple(f"{m}_mAP" for m in DETECTION_METRICS[1:])
SUMMARY_STATS = ("bbox_AP", "bbox_AP50", "segm_AP", "voc07_mAP", "mIoU", "pixel_acc")  # what `train` prints


class Evaluator(Protocol):
    """The evaluator contract (:class:`~detkit.evaluation.DetectionEvaluator`,
    :class:`~detkit.evaluation.SemanticEvaluator`): ``reset()``, then ``add_batch(predictions, targets)`` per
    batch (the model's per-image outputs in original pixels, the batch's per-image targets), ``gather()`` across
    DDP processes (each image counted once), ``compute(only_seen)`` -> the flat metrics dict,
    ``save_plots(folder)`` (PR curves or the confusion matrix)."""

    def reset(self) -> None: ...

    def add_batch(self, predictions: Sequence[dict[str, Any]], targets: Sequence[dict[str, Any]]) -> None: ...

    def gather(self) -> None: ...

    def compute(self, only_seen: bool = False) -> dict[str, Any]: ...

    def save_plots(self, folder: str | Path) -> Path: ...


def iou_types(traits: Any) -> tuple[str, ...]:
    """The COCO IoU types of a head: ``bbox``, and ``segm`` for heads with instance masks."""
    return IOU_TYPES if traits.masks else IOU_TYPES[:1]


def main_metric_names(traits: Any) -> list[str]:
    """Every key ``eval.main_metric`` may name for a head with ``traits``."""
    if traits.semantic:
        return list(SEMANTIC_STATS)
    return [f"{t}_{s}" for t in IOU_TYPES for s in COCO_STATS] + list(VOC_STATS)


def check_eval_config(eval_cfg: Any, traits: Any, head: str) -> None:
    """``eval.metrics`` / ``eval.main_metric`` against what the head (``model.head.name = head``) can be scored
    with: one :class:`ConfigError` line otherwise."""
    metrics = list(eval_cfg.metrics)
    known = DETECTION_METRICS + SEMANTIC_METRICS
    for m in metrics:
        if m not in known:
            raise ConfigError(f"eval.metrics: unknown metric {m!r} (expected {', '.join(known[:-1])} or {known[-1]})")
    if traits.semantic and metrics != list(SEMANTIC_METRICS):
        raise ConfigError(f"eval.metrics = {metrics}: model.head.name = {head} is scored with [semantic] (mIoU, "
                          f"pixel_acc, ...); set eval.metrics=[semantic]")
    if not traits.semantic and "semantic" in metrics:
        raise ConfigError(f"eval.metrics = {metrics}: 'semantic' scores segmenters (semantic heads), not {head}")
    main = eval_cfg.main_metric
    names = main_metric_names(traits)
    if main not in names:
        close = difflib.get_close_matches(main, names, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (one of: {', '.join(names)})"
        raise ConfigError(f"eval.main_metric = {main!r}: not a metric detkit computes for {head}{hint}")
    if traits.semantic:
        return
    needs = "coco" if main.startswith(tuple(f"{t}_" for t in IOU_TYPES)) else main.split("_")[0]
    if needs not in metrics:
        raise ConfigError(f"eval.main_metric = {main}: needs '{needs}' in eval.metrics (has {metrics})")
    if main.startswith("segm_") and not traits.masks:
        raise ConfigError(f"eval.main_metric = {main}: mask AP needs a head with instance masks (e.g. mask_rcnn)")
