"""``detkit eval --compare RUN_A RUN_B``: two evaluated runs side by side.

Reads each run's ``metrics.json`` and ``predictions.json`` (written by ``detkit eval``), re-scores the predictions
against run A's validation set (so both are scored on the same ground truth by the same evaluator), and writes into
``out``: ``compare.md`` (the metrics table, A, B and B - A, and per-class AP), ``per_class_ap.png`` (bars) and
``pr_overall.png`` (both runs' precision-recall curves overlaid, at IoU 0.5 and averaged over 0.5:0.95).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from detkit.errors import ConfigError
from detkit.evaluation.coco import coco_metrics
from detkit.evaluation.metrics import COCO_STATS, VOC_STATS
from detkit.evaluation.predictions import load_predictions
from detkit.utils.io import write_text

SHOWN = [f"bbox_{s}" for s in COCO_STATS[:6]] + list(VOC_STATS)


def _evaluated(run: Path) -> tuple[dict[str, Any], Path]:
    metrics, predictions = run / "metrics.json", run / "predictions.json"
    if not metrics.is_file() or not predictions.is_file():
        raise ConfigError(f"{run}: no metrics.json and predictions.json; run `detkit eval {run}` first")
    return json.loads(metrics.read_text()), predictions


def compare_runs(run_a: str | Path, run_b: str | Path, out: str | Path, ground_truth: dict[str, Any],
                 cat_to_label: dict[Any, int]) -> dict[str, Any]:
    """Write the comparison (see the module docstring); ``ground_truth``: run A's validation set as a COCO dict
    (category ids = labels), ``cat_to_label``: the dataset's own category ids -> labels."""
    out = Path(out)
    runs = [Path(run_a), Path(run_b)]
    names = [f"A: {runs[0].name}", f"B: {runs[1].name}"]
    reports, metrics = [], []
    for run in runs:
        m, predictions = _evaluated(run)
        metrics.append(m)
        results = load_predictions(predictions, ground_truth, cat_to_label=cat_to_label)
        reports.append(coco_metrics(ground_truth, results, ("bbox",)))
    lines = [f"# {names[0]} vs {names[1]}", "", "| metric | A | B | B - A |", "|---|---:|---:|---:|"]
    rows = {}
    for key in SHOWN:
        a, b = (r.metrics.get(key) if key.startswith("bbox_") else m.get(key) for r, m in zip(reports, metrics))
        rows[key] = (a, b)
        delta = f"{b - a:+.4f}" if a is not None and b is not None else "-"
        lines.append(f"| {key} | {_f(a)} | {_f(b)} | {delta} |")
    classes = reports[0].class_names
    per_class = [[r.per_class["bbox"].get(c) for c in classes] for r in reports]
    lines += ["", "| class | AP A | AP B |", "|---|---:|---:|"]
    lines += [f"| {c} | {_f(a)} | {_f(b)} |" for c, a, b in zip(classes, *per_class)]
    out.mkdir(parents=True, exist_ok=True)
    write_text("\n".join(lines) + "\n", out / "compare.md")
    _bars(classes, per_class, names, out / "per_class_ap.png")
    _pr(reports, names, out / "pr_overall.png")
    return {"metrics": rows, "per_class": dict(zip(classes, zip(*per_class))), "out": str(out)}


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}"


def _bars(classes: list[str], per_class: list[list[float | None]], names: list[str], path: Path) -> None:
    from matplotlib.figure import Figure

    shown = classes[:40]
    x = np.arange(len(shown))
    fig = Figure(figsize=(max(6, 0.3 * len(shown) + 2), 4))
    ax = fig.subplots()
    for i, (values, name) in enumerate(zip(per_class, names)):
        ax.bar(x + (i - 0.5) * 0.4, [v or 0.0 for v in values[:len(shown)]], 0.4, label=name)
    ax.set_xticks(x, shown, rotation=90, fontsize=7)
    ax.set_ylabel("AP@[.5:.95]")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _pr(reports: list, names: list[str], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.subplots()
    for report, name in zip(reports, names):
        precision = report.precision["bbox"][:, :, :, 0, -1]
        defined = (precision > -1).all(axis=(0, 1))
        if not defined.any():
            continue
        ax.plot(report.recall_thresholds, precision[0][:, defined].mean(axis=1), label=f"{name} IoU 0.50")
        ax.plot(report.recall_thresholds, precision[:, :, defined].mean(axis=(0, 2)), "--",
                label=f"{name} IoU 0.50:0.95")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title="all classes")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
