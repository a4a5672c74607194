"""The text table of an evaluation (``detkit eval``): main metrics, then per-class AP."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from detkit.evaluation.coco import IOU_TYPES, STAT_NAMES


def format_table(metrics: Mapping[str, Any], per_class_title: str = "per-class AP", columns: int = 3) -> str:
    """Rows of COCO stats per IoU type, the VOC mAPs, and the per-class AP table (``-`` for ``None``)."""
    lines = []
    rows = [(t, [metrics.get(f"{t}_{s}") for s in STAT_NAMES]) for t in IOU_TYPES
            if any(f"{t}_{s}" in metrics for s in STAT_NAMES)]
    if rows:
        lines.append(f"{'':6}" + "".join(f"{s:>8}" for s in STAT_NAMES))
        lines += [f"{t:6}" + "".join(f"{_fmt(v):>8}" for v in values) for t, values in rows]
    voc = [f"{key} {_fmt(metrics[key])}" for key in ("voc07_mAP", "voc12_mAP") if key in metrics]
    if voc:
        lines.append("   ".join(voc))
    per_class = metrics.get("per_class") or {}
    if per_class:
        width = min(max(len(str(name)) for name in per_class), 28)
        cells = [f"{str(name)[:width]:<{width}} {_fmt(ap):>6}" for name, ap in per_class.items()]
        lines += ["", per_class_title]
        lines.append("    ".join([f"{'class':<{width}} {'AP':>6}"] * min(columns, len(cells))))
        lines += ["    ".join(cells[i:i + columns]) for i in range(0, len(cells), columns)]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"
