"""The plots of studies (matplotlib's Agg canvas; pyplot's global state is not touched): a metric against a cost
(``detkit transfer``), error EDFs with bootstrap bands and error-vs-parameter scatters (``detkit design-space``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

MARKERS = {"scratch": "o"}


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def plot_metric_vs(rows: Sequence[dict[str, Any]], key: str, xlabel: str, metric: str, path: Path) -> Path:
    """One point per row at (``row[key]``, ``row['mean']``) with +- ``row['std']``, labelled with its backbone;
    circles train from scratch, triangles start from pretrained weights."""
    fig = _figure(7, 5)
    ax = fig.add_subplot()
    colors = {}
    for r in rows:
        color = colors.setdefault(r["backbone"], f"C{len(colors) % 10}")
        ax.errorbar(r[key], r["mean"], yerr=r["std"], fmt=MARKERS.get(r["pretrained"], "^"), color=color,
                    capsize=3, markersize=7)
        label = r.get("label", r["backbone"]) + ("" if r["pretrained"] == "scratch" else " (pretrained)")
        ax.annotate(label, (r[key], r["mean"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    values = [r[key] for r in rows]
    if key != "year" and min(values) > 0 and max(values) / min(values) > 5:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=f"{metric} (mean +- std over seeds)", title=f"{metric} vs {xlabel.split(' (')[0]}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_edfs(curves: Mapping[str, dict[str, np.ndarray]], path: Path, level: float = 0.95) -> Path:
    """Error EDFs of several design spaces on one axis; ``curves[space]`` holds ``grid, F, lo, hi`` (the band) and
    ``errors``."""
    fig = _figure(7, 5)
    ax = fig.add_subplot()
    for i, (space, c) in enumerate(curves.items()):
        color = f"C{i % 10}"
        e = np.asarray(c["errors"])
        label = f"{space} (n={e.size}, min {e.min():.3f}, median {np.median(e):.3f})"
        ax.step(c["grid"], c["F"], where="post", color=color, label=label)
        ax.fill_between(c["grid"], c["lo"], c["hi"], step="post", color=color, alpha=0.2, linewidth=0)
    errors = np.concatenate([np.asarray(c["errors"]) for c in curves.values()])
    pad = max(0.01, 0.1 * float(errors.max() - errors.min()))
    ax.set(xlabel="error (1 - main metric)", ylabel="cumulative probability",
           title=f"error EDF per design space ({level:.0%} bootstrap bands)", ylim=(0, 1.02),
           xlim=(max(0.0, errors.min() - pad), min(1.0, errors.max() + pad)))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_scatter(records: Sequence[dict[str, Any]], columns: Sequence[str], title: str, path: Path,
                 log_x: Sequence[str] = ()) -> Path:
    """Error against each of ``columns`` (one panel each) for the finished samples of one space; ``log_x`` columns
    get a log axis when their values span more than 5x."""
    ncols = min(5, len(columns))
    nrows = math.ceil(len(columns) / ncols)
    fig = _figure(3.1 * ncols, 2.6 * nrows + 0.4)
    errors = [r["error"] for r in records]
    for i, col in enumerate(columns):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        values = [r[col] for r in records]
        ax.scatter(values, errors, s=14, alpha=0.8)
        if col in log_x and min(values) > 0 and max(values) / min(values) > 5:  # a wide range: log axis
            ax.set_xscale("log")
        ax.set_xlabel(col)
        if i % ncols == 0:
            ax.set_ylabel("error")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
