"""Score a COCO-results file against a ground truth (``detkit eval --predictions P.json --ground-truth GT.json``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from detkit.errors import ConfigError
from detkit.evaluation.evaluator import DetectionEvaluator
from detkit.evaluation.ground_truth import check_ground_truth, has_segmentation, load_ground_truth
from detkit.evaluation.metrics import DETECTION_METRICS
from detkit.evaluation.predictions import load_predictions

log = logging.getLogger(__name__)

METRIC_CHOICES = {"all": DETECTION_METRICS, "coco": ("coco",), "voc07": ("voc07",), "voc12": ("voc12",)}


def score_predictions(predictions_path: str | Path, ground_truth: str | Path | Mapping[str, Any], metric: str = "all",
                      iou_types: Sequence[str] | None = None, backend: str = "pycocotools",
                      cat_to_label: Mapping[Any, int] | None = None, class_names: Sequence[str] | None = None,
                      plot_dir: str | Path | None = None) -> dict[str, Any]:
    """The metrics dict of :meth:`DetectionEvaluator.compute` for a predictions file.

    ``ground_truth``: a COCO JSON path (its own category ids are used; ``difficult`` read when present) or a dict
    (e.g. from ``dataset_to_coco``; pass ``cat_to_label``, the dataset's ids -> 1..K, so the file's dataset ids
    are mapped). ``metric``: ``all``, ``coco``, ``voc07`` or ``voc12``. ``iou_types=None``: ``bbox``, plus
    ``segm`` when the predictions and the ground truth both have segmentations. ``plot_dir``: also write PR
    curves there.
    """
    if metric not in METRIC_CHOICES:
        raise ConfigError(f"metric: unknown {metric!r}; expected one of {', '.join(METRIC_CHOICES)}")
    if isinstance(ground_truth, Mapping):
        gt = check_ground_truth(ground_truth)
    else:
        gt = load_ground_truth(ground_truth)
    results = load_predictions(predictions_path, gt, cat_to_label)
    if iou_types is None:
        with_masks = any("segmentation" in r for r in results)
        iou_types = ("bbox", "segm") if with_masks and has_segmentation(gt) else ("bbox",)
        if with_masks and len(iou_types) == 1:
            log.info("%s: the ground truth has no segmentations: box metrics only", predictions_path)
    evaluator = DetectionEvaluator(gt, METRIC_CHOICES[metric], iou_types, backend, class_names)
    evaluator.add_results(results)
    metrics = evaluator.compute()
    if plot_dir is not None:
        evaluator.plot_pr_curves(plot_dir)
    return metrics
