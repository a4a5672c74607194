"""detkit.evaluation: COCO and VOC detection metrics, semantic segmentation metrics (see docs/architecture.md).

``metrics`` (metric names, the evaluator contract, which metrics score which head), ``build`` (the evaluator of a
head), ``ground_truth`` (datasets
as COCO dicts), ``coco`` (COCOeval, pycocotools or faster-coco-eval), ``voc`` (VOC07 /
VOC12 mAP), ``predictions`` (model outputs and files as COCO results), ``evaluator`` (``DetectionEvaluator``,
DDP-aware), ``score`` (a predictions file against a ground truth), ``plots`` (PR curves), ``table`` (text
tables), ``semantic`` (semantic segmentation: confusion matrix, mIoU, pixel and class accuracy, Dice;
``SemanticEvaluator``, DDP-aware).
"""

from detkit.evaluation.build import build_evaluator
from detkit.evaluation.coco import CocoReport, coco_metrics
from detkit.evaluation.evaluator import DetectionEvaluator
from detkit.evaluation.ground_truth import check_ground_truth, dataset_to_coco, load_ground_truth
from detkit.evaluation.metrics import (
    COCO_STATS,
    SEMANTIC_STATS,
    SUMMARY_STATS,
    Evaluator,
    check_eval_config,
    iou_types,
    main_metric_names,
)
from detkit.evaluation.plots import plot_coco_pr, plot_voc_pr
from detkit.evaluation.predictions import (
    load_predictions,
    predictions_to_results,
    results_to_dataset_ids,
    results_to_labels,
)
from detkit.evaluation.score import score_predictions
from detkit.evaluation.semantic import SemanticEvaluator, confusion_matrix, semantic_metrics
from detkit.evaluation.table import format_semantic_table, format_table
from detkit.evaluation.voc import VocReport, voc_ap, voc_metrics

__all__ = [
    "COCO_STATS",
    "SEMANTIC_STATS",
    "SUMMARY_STATS",
    "Evaluator",
    "build_evaluator",
    "check_eval_config",
    "iou_types",
    "main_metric_names",
    "CocoReport",
    "DetectionEvaluator",
    "SemanticEvaluator",
    "VocReport",
    "check_ground_truth",
    "coco_metrics",
    "confusion_matrix",
    "dataset_to_coco",
    "format_semantic_table",
    "format_table",
    "load_ground_truth",
    "load_predictions",
    "plot_coco_pr",
    "plot_voc_pr",
    "predictions_to_results",
    "results_to_dataset_ids",
    "results_to_labels",
    "score_predictions",
    "semantic_metrics",
    "voc_ap",
    "voc_metrics",
]
