"""``DetectionEvaluator``: collects per-image predictions (one process or DDP) and computes COCO and VOC metrics.

Usage (every rank, for DDP)::

    evaluator = DetectionEvaluator(dataset_to_coco(val_dataset, with_masks=True), iou_types=("bbox", "segm"))
    for batch in loader:
        evaluator.update(model(batch), [t["image_id"] for t in batch["targets"]])
    evaluator.gather()            # all ranks: every rank then holds every image's predictions
    metrics = evaluator.compute() # {"bbox_AP": ..., "voc07_mAP": ..., "per_class": {...}}

Predictions are kept per image id, first copy wins: an image seen twice (DistributedSampler's padding repeats
images; two ranks may process the same image) counts once. Images of the ground truth without predictions
count as images where nothing was found.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from detkit.errors import ConfigError, DataError
from detkit.evaluation.coco import CocoReport, check_coco_options, coco_metrics
from detkit.evaluation.distributed import gather_first_copy
from detkit.evaluation.ground_truth import category_names, check_ground_truth, has_segmentation
from detkit.evaluation.metrics import DETECTION_METRICS
from detkit.evaluation.plots import plot_coco_pr, plot_voc_pr
from detkit.evaluation.predictions import predictions_to_results
from detkit.evaluation.table import format_table
from detkit.evaluation.voc import VocReport, voc_metrics

log = logging.getLogger(__name__)



class DetectionEvaluator:
    """COCO (``coco``: AP, AP50, AP75, APs/m/l, AR1/10/100, ARs/m/l per IoU type) and VOC (``voc07``, ``voc12``:
    mAP at IoU 0.5, ``bbox`` only) metrics of detections against the COCO ground-truth dict ``gt`` (from
    :func:`~detkit.evaluation.ground_truth.dataset_to_coco`, or a checked COCO file). Predictions use ``gt``'s
    category ids (with ``dataset_to_coco``: the contiguous labels 1..K, as models output them)."""

    format_table = staticmethod(format_table)

    def __init__(self, gt: Mapping[str, Any], metrics: Sequence[str] = DETECTION_METRICS,
                 iou_types: Sequence[str] = ("bbox",),
                 backend: str = "pycocotools", class_names: Sequence[str] | None = None) -> None:
        metrics, iou_types = _tuple(metrics), _tuple(iou_types)
        for metric in metrics:
            if metric not in DETECTION_METRICS:
                raise ConfigError(f"metrics: unknown {metric!r}; expected some of {', '.join(DETECTION_METRICS)}")
        if not metrics:
            raise ConfigError(f"metrics: empty; expected some of {', '.join(DETECTION_METRICS)}")
        check_coco_options(iou_types, backend)
        if not iou_types:
            raise ConfigError("iou_types: empty; expected bbox and/or segm")
        self.gt = check_ground_truth(gt)
        if "segm" in iou_types and not has_segmentation(self.gt):
            raise DataError("iou_types has 'segm' but the ground truth has no segmentations (build it with "
                            "dataset_to_coco(..., with_masks=True))")
        self.metrics, self.iou_types, self.backend = metrics, iou_types, backend
        self.class_names = list(category_names(self.gt, class_names).values())
        self._image_ids = {img["id"] for img in self.gt["images"]}
        self._sizes = {img["id"]: [img["height"], img["width"]] for img in self.gt["images"]
                       if img.get("height") and img.get("width")}
        self.coco_report: CocoReport | None = None
        self.voc_report: VocReport | None = None
        self.reset()

    def reset(self) -> None:
        """Forget every prediction (and the last reports)."""
        self._results: dict[Any, list[dict[str, Any]]] = {}
        self._repeated = 0
        self._unknown = 0
        self.coco_report = self.voc_report = None

    def __len__(self) -> int:
        """Images with predictions held."""
        return len(self._results)

    def update(self, predictions: Sequence[Mapping[str, Any]], image_ids: Iterable[Any]) -> None:
        """Add one batch: per image ``boxes`` (N x 4 xyxy, original pixels), ``scores``, ``labels`` (1..K) and
        optional ``masks`` (N x H x W at the original size; encoded as RLE here)."""
        image_ids = [_plain(i) for i in image_ids]
        if len(predictions) != len(image_ids):
            raise ValueError(f"update: {len(predictions)} predictions for {len(image_ids)} image ids")
        with_masks = "segm" in self.iou_types
        for prediction, image_id in zip(predictions, image_ids):
            if self._accept(image_id):
                results = predictions_to_results(prediction, image_id, with_masks)
                size = self._sizes.get(image_id)
                if results and "segmentation" in results[0] and size and results[0]["segmentation"]["size"] != size:
                    raise ValueError(f"image {image_id}: masks are {results[0]['segmentation']['size'][::-1]} (w, h), "
                                     f"the image is {size[::-1]}: masks must be at the original resolution")
                self._results[image_id] = results

    def add_batch(self, predictions: Sequence[Mapping[str, Any]], targets: Sequence[Mapping[str, Any]]) -> None:
        """The :class:`~detkit.evaluation.metrics.Evaluator` step: a batch's detections (moved to the CPU) with its
        targets' ``image_id`` s."""
        self.update([{k: v.detach().cpu() for k, v in p.items()} for p in predictions],
                    [int(t["image_id"]) for t in targets])

    def save_plots(self, folder: str | Path) -> Path:
        """PR curves (overall and per class) into ``folder/pr_curves``."""
        out = Path(folder) / "pr_curves"
        self.plot_pr_curves(out)
        return out

    def add_results(self, results: Iterable[Mapping[str, Any]]) -> None:
        """Add COCO results (``image_id, category_id, bbox, score``, optional ``segmentation``), e.g. from
        :func:`~detkit.evaluation.predictions.load_predictions`; the per-image rules of :meth:`update` apply."""
        by_image: dict[Any, list[dict[str, Any]]] = {}
        for r in results:
            by_image.setdefault(r["image_id"], []).append(dict(r))
        for image_id, image_results in by_image.items():
            if self._accept(image_id):
                self._results[image_id] = image_results

    def _accept(self, image_id: Any) -> bool:
        if image_id not in self._image_ids:
            self._unknown += 1
            return False
        if image_id in self._results:
            self._repeated += 1
            return False
        return True

    def gather(self) -> None:
        """Under ``torch.distributed`` with more than one process, share every rank's predictions (call it on all
        ranks), keeping one copy per image (the lowest rank's). A no-op otherwise."""
        gathered = gather_first_copy(self._results, self._unknown)
        if gathered is None:
            return
        self._results, repeated, unknown = gathered
        self._repeated += repeated
        self._unknown = sum(unknown)

    def results(self) -> list[dict[str, Any]]:
        """Every held prediction as COCO results (ground-truth category ids), in image-id order."""
        return [r for image_id in sorted(self._results, key=_sort_key) for r in self._results[image_id]]

    def compute(self, only_seen: bool = False) -> dict[str, Any]:
        """One flat dict: ``<iou type>_<stat>`` (COCO), ``voc07_mAP``, ``voc12_mAP``, and ``per_class`` ({class:
        bbox AP@[.5:.95] with COCO on, else VOC AP}); values in [0, 1] or ``None`` (nothing to measure).

        ``only_seen``: score against the images that were predicted (with or without detections) only, for a
        validation limited on purpose (``trainer.limit_val_batches``); by default every ground-truth image
        counts, and an image never predicted is one where nothing was found."""
        gt = self.gt
        if only_seen and len(self._results) < len(self._image_ids):
            seen = set(self._results)
            log.info("scoring the %d of %d validation images that were evaluated", len(seen), len(self._image_ids))
            gt = {**self.gt, "images": [i for i in self.gt["images"] if i["id"] in seen],
                  "annotations": [a for a in self.gt["annotations"] if a["image_id"] in seen]}
        if self._unknown:
            log.warning("%d predicted images are not in the ground truth and were left out", self._unknown)
        results = self.results()
        categories = {c["id"] for c in self.gt["categories"]}
        stray = sum(r["category_id"] not in categories for r in results)
        if stray:
            log.warning("%d predictions have a category id that is not a ground-truth category (labels are 1..K "
                        "with dataset_to_coco): they count nowhere", stray)
        out: dict[str, Any] = {}
        per_class: dict[str, float | None] = {}
        if "coco" in self.metrics:
            self.coco_report = coco_metrics(gt, results, self.iou_types, self.backend, self.class_names)
            out.update(self.coco_report.metrics)
            per_class = self.coco_report.per_class["bbox" if "bbox" in self.iou_types else self.iou_types[0]]
        voc_methods = [m for m in self.metrics if m.startswith("voc")]
        if voc_methods:
            self.voc_report = voc_metrics(gt, results, class_names=self.class_names)
            for method in voc_methods:
                out[f"{method}_mAP"] = self.voc_report.mAP[method]
            if not per_class:
                per_class = self.voc_report.per_class["voc12" if "voc12" in voc_methods else "voc07"]
        out["per_class"] = dict(per_class)
        return out

    def plot_pr_curves(self, out_dir: str | Path) -> list[Path]:
        """PR curves as PNGs in ``out_dir``: ``pr_overall.png`` and ``pr_<class>.png`` per class with ground truth
        (COCO curves when ``coco`` is on, of ``bbox`` when asked, else VOC curves). Computes first if needed."""
        if self.coco_report is None and self.voc_report is None:
            self.compute()
        if self.coco_report is not None:
            iou_type = "bbox" if "bbox" in self.iou_types else self.iou_types[0]
            return plot_coco_pr(self.coco_report, out_dir, iou_type)
        assert self.voc_report is not None
        return plot_voc_pr(self.voc_report, out_dir)


def _tuple(value: str | Sequence[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _sort_key(value: Any) -> tuple[int, Any]:
    return (0, value) if isinstance(value, int) else (1, str(value))
