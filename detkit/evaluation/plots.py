"""Precision-recall curves as PNGs (matplotlib's Agg canvas; pyplot's global state is not touched)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from detkit.evaluation.coco import CocoReport
from detkit.evaluation.voc import VocReport

RECALL_GRID = np.linspace(0.0, 1.0, 101)


def safe_filename(name: str) -> str:
    """A class name usable in a file name: runs of other characters than letters, digits, ``.-_`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "class"


def plot_coco_pr(report: CocoReport, out_dir: str | Path, iou_type: str = "bbox") -> list[Path]:
    """``pr_overall.png`` (mean over classes with objects, at IoU 0.5 and averaged over 0.5:0.95) and one
    ``pr_<class>.png`` per class that has objects (classes without have no curve)."""
    precision = report.precision[iou_type][:, :, :, 0, -1]  # T x R x K, area "all", 100 detections
    recall = report.recall_thresholds
    defined = (precision > -1).all(axis=(0, 1))
    curves = []
    if defined.any():
        curves.append((None, {"IoU 0.50": precision[0][:, defined].mean(axis=1),
                              "IoU 0.50:0.95": precision[:, :, defined].mean(axis=(0, 2))},
                       report.metrics.get(f"{iou_type}_AP")))
    for k, name in enumerate(report.class_names):
        if defined[k]:
            curves.append((name, {"IoU 0.50": precision[0, :, k], "IoU 0.50:0.95": precision[:, :, k].mean(axis=0)},
                           report.per_class[iou_type].get(name)))
    return _write(out_dir, [(name, f"COCO {iou_type}", {k: (recall, v) for k, v in lines.items()}, ap)
                            for name, lines, ap in curves], "AP@[.5:.95]")


def plot_voc_pr(report: VocReport, out_dir: str | Path) -> list[Path]:
    """``pr_overall.png`` (the mean over classes of the interpolated precision, max precision at recall >= r) and
    one ``pr_<class>.png`` per class with ground truth (its raw curve and its envelope)."""
    curves, interpolated = [], []
    for name, n in report.num_gt.items():
        if not n:
            continue
        rec, prec = report.recall[name], report.precision[name]
        envelope = np.array([prec[rec >= r].max() if np.any(rec >= r) else 0.0 for r in RECALL_GRID])
        interpolated.append(envelope)
        curves.append((name, "VOC", {"detections": (rec, prec), "envelope": (RECALL_GRID, envelope)},
                       report.per_class["voc12"].get(name)))
    if interpolated:
        curves.insert(0, (None, "VOC", {"mean interpolated": (RECALL_GRID, np.mean(interpolated, axis=0))},
                          report.mAP.get("voc12")))
    return _write(out_dir, curves, f"AP@{report.iou_threshold:g} (voc12)")


def _write(out_dir: str | Path, curves: list[tuple], ap_label: str) -> list[Path]:
    """``curves``: ``(class name or None for the overall plot, title, {label: (recall, precision)}, AP)``."""
    from matplotlib.figure import Figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths, used = [], set()
    for name, title, lines, ap in curves:
        stem = "overall" if name is None else safe_filename(name)
        while stem in used or (name is not None and stem == "overall"):
            stem += "_"
        used.add(stem)
        fig = Figure(figsize=(5, 4.2), dpi=100)
        ax = fig.add_subplot()
        for label, (x, y) in lines.items():
            ax.plot(x, y, label=label, drawstyle="steps-post" if label in ("detections", "envelope") else "default")
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
               title=f"{title}: {'all classes' if name is None else name}\n"
                     f"{ap_label} = {'-' if ap is None else f'{ap:.3f}'}")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left")
        fig.tight_layout()
        path = out / f"pr_{stem}.png"
        fig.savefig(path)
        paths.append(path)
    return paths
