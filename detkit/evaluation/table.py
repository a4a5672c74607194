"""The text table of an evaluation (``detkit eval``): main metrics, then per-class AP (detection) or per-class
IoU, accuracy and Dice (semantic segmentation)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from detkit.evaluation.metrics import COCO_STATS, IOU_TYPES, SEMANTIC_STATS, VOC_STATS


def format_table(metrics: Mapping[str, Any], per_class_title: str = "per-class AP", columns: int | None = None) -> str:
    """Rows of COCO stats per IoU type, the VOC mAPs, and the per-class AP table (``-`` for ``None``; ``columns``
    classes a row, 3 by default). Semantic segmentation metrics (with ``mIoU``) go to
    :func:`format_semantic_table` (``columns`` passed on, its default when ``None``)."""
    if "mIoU" in metrics:
        return format_semantic_table(metrics) if columns is None else format_semantic_table(metrics, columns)
    columns = 3 if columns is None else columns
    lines = []
    rows = [(t, [metrics.get(f"{t}_{s}") for s in COCO_STATS]) for t in IOU_TYPES
            if any(f"{t}_{s}" in metrics for s in COCO_STATS)]
    if rows:
        lines.append(f"{'':6}" + "".join(f"{s:>8}" for s in COCO_STATS))
        lines += [f"{t:6}" + "".join(f"{_fmt(v):>8}" for v in values) for t, values in rows]
    voc = [f"{key} {_fmt(metrics[key])}" for key in VOC_STATS if key in metrics]
    if voc:
        lines.append("   ".join(voc))
    errors = metrics.get("errors")
    if isinstance(errors, dict) and errors.get("dAP"):
        lost = "  ".join(f"{k} {v:+.3f} ({errors['counts'].get(k, 0)})" for k, v in errors["dAP"].items())
        lines.append(f"AP50 {_fmt(errors.get('AP50'))}; gained by fixing each kind of error (count): {lost}")
    per_class = metrics.get("per_class") or {}
    if per_class:
        width = min(max(len(str(name)) for name in per_class), 28)
        cells = [f"{str(name)[:width]:<{width}} {_fmt(ap):>6}" for name, ap in per_class.items()]
        lines += ["", per_class_title]
        lines.append("    ".join([f"{'class':<{width}} {'AP':>6}"] * min(columns, len(cells))))
        lines += ["    ".join(cells[i:i + columns]) for i in range(0, len(cells), columns)]
    return "\n".join(lines)


def format_semantic_table(metrics: Mapping[str, Any], columns: int = 2) -> str:
    """Semantic segmentation metrics (:func:`~detkit.evaluation.semantic.semantic_metrics`): a line of
    ``mIoU``, ``pixel_acc``, ``mean_class_acc`` and ``dice``, then a table of per-class IoU, accuracy and Dice,
    ``columns`` classes a row (``-`` for ``None``)."""
    lines = ["   ".join(f"{key} {_fmt(metrics.get(key))}" for key in SEMANTIC_STATS)]
    iou = metrics.get("per_class") or {}
    acc = metrics.get("per_class_acc") or {}
    dice = metrics.get("per_class_dice") or {}
    names = list(iou) + [n for n in acc if n not in iou] + [n for n in dice if n not in iou and n not in acc]
    if names:
        width = min(max(5, *(len(str(name)) for name in names)), 28)
        cells = [f"{str(name)[:width]:<{width}} {_fmt(iou.get(name)):>6} {_fmt(acc.get(name)):>6} "
                 f"{_fmt(dice.get(name)):>6}" for name in names]
        header = f"{'class':<{width}} {'IoU':>6} {'acc':>6} {'Dice':>6}"
        lines += ["", "per-class IoU / accuracy / Dice"]
        lines.append("    ".join([header] * min(columns, len(cells))))
        lines += ["    ".join(cells[i:i + columns]) for i in range(0, len(cells), columns)]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"
