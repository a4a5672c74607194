"""COCO metrics (AP@[.5:.95], AP50, AP75, size ranges, AR) with pycocotools or faster-coco-eval.

Both backends run the official COCOeval on an in-memory ground truth and give the same numbers. COCOeval's
-1 ("no ground-truth object of this kind", e.g. APs when no object is small, or a class without objects) is
reported as ``None`` (JSON ``null``): never -1, never NaN. Every other value is in [0, 1]; no detections give 0.
``difficult`` flags do not exist for COCOeval: difficult objects count as ordinary objects here (VOC ignores them).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from detkit.errors import ConfigError, DataError
from detkit.evaluation.ground_truth import category_names, has_segmentation
from detkit.evaluation.metrics import COCO_STATS, IOU_TYPES

log = logging.getLogger(__name__)

BACKENDS = ("pycocotools", "faster_coco_eval")


@dataclass
class CocoReport:
    """What :func:`coco_metrics` found.

    ``metrics``: flat ``{<iou type>_<stat>: value or None}`` (stats in :data:`COCO_STATS` order);
    ``per_class``: ``{iou type: {class name: AP@[.5:.95] or None}}``; ``precision``: ``{iou type: COCOeval's
    T x R x K x A x M array}`` (IoU thresholds x recall thresholds x classes x area ranges x max dets, -1 where a
    class has no objects), for PR curves; ``class_names`` follow the K axis (categories in id order).
    """

    metrics: dict[str, float | None] = field(default_factory=dict)
    per_class: dict[str, dict[str, float | None]] = field(default_factory=dict)
    precision: dict[str, np.ndarray] = field(default_factory=dict)
    iou_thresholds: np.ndarray = field(default_factory=lambda: np.linspace(0.5, 0.95, 10))
    recall_thresholds: np.ndarray = field(default_factory=lambda: np.linspace(0.0, 1.0, 101))
    class_names: list[str] = field(default_factory=list)


def coco_metrics(gt: Mapping[str, Any], results: Sequence[Mapping[str, Any]], iou_types: Sequence[str] = ("bbox",),
                 backend: str = "pycocotools", class_names: Sequence[str] | None = None) -> CocoReport:
    """COCO metrics of ``results`` (COCO results: ``image_id, category_id, bbox`` xywh, ``score``, optional
    ``segmentation`` RLE) against the ground-truth dict ``gt``. Results for images not in ``gt`` are dropped
    (counted in a warning); ``gt`` and ``results`` are not modified."""
    check_coco_options(iou_types, backend)
    names = category_names(gt, class_names)
    image_ids = {img["id"] for img in gt["images"]}
    kept = [r for r in results if r["image_id"] in image_ids]
    if len(kept) < len(results):
        log.warning("%d results for images not in the ground truth were dropped", len(results) - len(kept))
    report = CocoReport(class_names=list(names.values()))
    for iou_type in iou_types:
        if iou_type == "segm" and not has_segmentation(gt):
            raise DataError("segm AP needs ground-truth segmentations (build it with dataset_to_coco(..., "
                            "with_masks=True))")
        coco_eval = _run(gt, _results_for(kept, iou_type), iou_type, backend)
        for name, value in zip(COCO_STATS, coco_eval.stats):
            report.metrics[f"{iou_type}_{name}"] = _value(value)
        precision = np.asarray(coco_eval.eval["precision"], dtype=np.float64)
        report.precision[iou_type] = precision
        report.iou_thresholds = np.asarray(coco_eval.params.iouThrs)
        report.recall_thresholds = np.asarray(coco_eval.params.recThrs)
        cat_order = list(coco_eval.params.catIds)
        report.per_class[iou_type] = {names[c]: _mean_defined(precision[:, :, k, 0, -1])
                                      for k, c in enumerate(cat_order)}
    return report


def check_coco_options(iou_types: Sequence[str], backend: str) -> None:
    """Raise :class:`ConfigError` for an unknown IoU type or backend."""
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise ConfigError(f"iou_types: unknown {iou_type!r}; expected {' or '.join(IOU_TYPES)}")
    if backend not in BACKENDS:
        raise ConfigError(f"backend: unknown {backend!r}; expected {' or '.join(BACKENDS)}")


def _results_for(results: Sequence[Mapping[str, Any]], iou_type: str) -> list[dict[str, Any]]:
    """Copies (COCOeval writes into them). For segm: only results with a mask, without their box, so the size
    ranges use the mask area (as for the ground truth)."""
    if iou_type == "bbox":
        return [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    return [{k: v for k, v in r.items() if k != "bbox"} for r in results if "segmentation" in r]


def _gt_copy(gt: Mapping[str, Any]) -> dict[str, Any]:
    """A copy deep enough that COCOeval's in-place edits (``ignore``, masks as RLE) stay in it."""
    return {"images": [dict(i) for i in gt["images"]], "annotations": [dict(a) for a in gt.get("annotations", [])],
            "categories": [dict(c) for c in gt["categories"]]}


def _run(gt: Mapping[str, Any], results: list[dict[str, Any]], iou_type: str, backend: str) -> Any:
    if backend == "faster_coco_eval":
        return _run_faster(gt, results, iou_type)
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_gt = COCO()
        coco_gt.dataset = _gt_copy(gt)
        coco_gt.createIndex()
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:  # loadRes([]) fails: an empty result set, evaluable
            coco_dt = COCO()
            coco_dt.dataset = {"images": list(coco_gt.dataset["images"]), "annotations": [],
                               "categories": list(coco_gt.dataset["categories"])}
            coco_dt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_dt, iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


def _run_faster(gt: Mapping[str, Any], results: list[dict[str, Any]], iou_type: str) -> Any:
    try:
        from faster_coco_eval import COCO, COCOeval_faster
    except ImportError:
        raise ConfigError("backend 'faster_coco_eval' is not installed: pip install faster-coco-eval "
                          "(or use backend 'pycocotools')") from None

    def quiet(*args: Any, **kwargs: Any) -> None:
        return None

    coco_gt = COCO(_gt_copy(gt), print_function=quiet)
    coco_dt = coco_gt.loadRes(results)
    coco_eval = COCOeval_faster(coco_gt, coco_dt, iouType=iou_type, print_function=quiet)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


def _value(value: float) -> float | None:
    """COCOeval's -1 (nothing to measure) as ``None``."""
    value = float(value)
    return None if value < 0 or not np.isfinite(value) else value


def _mean_defined(values: np.ndarray) -> float | None:
    defined = values[values > -1]
    return float(defined.mean()) if defined.size else None
