"""The evaluator of a head: :class:`DetectionEvaluator` (COCO / VOC, masks for instance heads) or
:class:`SemanticEvaluator`, chosen by the head's traits."""

from __future__ import annotations

from typing import Any

from detkit.evaluation.evaluator import DetectionEvaluator
from detkit.evaluation.ground_truth import dataset_to_coco
from detkit.evaluation.metrics import Evaluator, iou_types
from detkit.evaluation.semantic import SemanticEvaluator


def build_evaluator(dataset: Any, eval_cfg: Any, traits: Any, num_classes: int) -> Evaluator:
    """The evaluator of a head with ``traits`` over every image of ``dataset`` (its ground truth)."""
    if traits.semantic:
        return SemanticEvaluator(int(num_classes), class_names=list(dataset.classes))
    types = iou_types(traits)
    return DetectionEvaluator(dataset_to_coco(dataset, with_masks="segm" in types), metrics=tuple(eval_cfg.metrics),
                              iou_types=types, backend=eval_cfg.backend, class_names=list(dataset.classes))
