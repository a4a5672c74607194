"""``detkit transfer``: how backbones transfer to one task. The same task config is trained once per backbone,
pretrained setting and seed with an identical schedule (a :mod:`study <detkit.analysis.study>`), and the results
become one report: ``report.csv`` / ``report.md`` (per backbone and pretrained setting: complexity of the backbone
and of the whole model, training time, inference latency, the main metric as mean +- std over seeds),
``trials.csv`` (every run) and ``metric_vs_{flops,latency,params}.png``.

Backbones are registry names (``resnet18``, ``regnet_x_400mf``, ...), ``tv:<model>``, ``timm:<model>``, ``lineage``
(every network of :data:`detkit.analysis.lineage.LINEAGE`, AlexNet to ConvNeXt: the report then also has each
one's year and design idea, ``lineage.md`` and ``metric_vs_year.png``), or ``efficientnet@phi=P``:
EfficientNet compound-scaled by ``phi`` (depth alpha^phi, width beta^phi) with the task's input resolution scaled
by gamma^phi (to a multiple of 32), so phi = 0, 0.5, 1 ... can be compared on the task.

Pretrained settings (``--pretrained``, comma-separated): ``none`` (from scratch), a weights name or file for every
backbone, or ``BACKBONE=WEIGHTS`` for one backbone only. Each backbone runs with every setting that applies to it,
and from scratch where none does (so without ``--pretrained`` every backbone trains from scratch).

The report covers the backbones, settings and seeds of the command; runs of earlier commands into the same folder
stay on disk and are reused (not retrained) when a command names them again.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from detkit.analysis.lineage import network_of
from detkit.analysis.study import (
    Trial,
    check_settings,
    human,
    mean_std,
    measure_model,
    run_trials,
    task_settings,
    write_table,
)
from detkit.errors import ConfigError
from detkit.utils.lock import FolderLock

log = logging.getLogger(__name__)
SCRATCH = ("none", "null", "scratch")
PHI = re.compile(r"^efficientnet@phi=(.*)$")


@dataclass(frozen=True)
class Variant:
    backbone: str  # as given on the command line
    pretrained: str | None
    overrides: tuple[str, ...]
    image_size: int

    @property
    def pretrained_label(self) -> str:
        if self.pretrained is None:
            return "scratch"
        return Path(self.pretrained).name if "/" in self.pretrained else self.pretrained


def split_list(text: str | Sequence[str] | None) -> list[str]:
    if text is None:
        return []
    items = text.split(",") if isinstance(text, str) else list(text)
    return [s.strip() for s in items if s.strip()]


def backbone_overrides(entry: str, image_size: int, gamma: float) -> tuple[list[str], int]:
    """Config overrides for one ``--backbones`` entry and the input resolution it trains at."""
    from detkit.backbones.efficientnet import compound_scaling

    m = PHI.match(entry)
    if m:
        try:
            phi = float(m.group(1))
        except ValueError:
            raise ConfigError(f"--backbones {entry!r}: phi must be a number (efficientnet@phi=0.5)") from None
        resolution = compound_scaling(phi, gamma=gamma, base_resolution=image_size)[2]
        if not -4 <= phi <= 8 or resolution < 32:
            raise ConfigError(f"--backbones {entry!r}: phi out of range (need -4 <= phi <= 8 and an input of at "
                              f"least 32 px; this gives {resolution})")
        return ["model.backbone.name=efficientnet", f"model.backbone.efficientnet.phi={phi}",
                f"data.image_size={resolution}"], resolution
    if "@" in entry:
        raise ConfigError(f"--backbones {entry!r}: the only '@' form is efficientnet@phi=<number>")
    return [f"model.backbone.name={entry}"], image_size


def variants(task: str | Path, overrides: Sequence[str], backbones: Sequence[str],
             pretrained: Sequence[str] = ()) -> list[Variant]:
    """Every (backbone, pretrained) pair to train, checked before anything runs."""
    from detkit.backbones import build_backbone
    from detkit.config import load_config

    if not backbones:
        raise ConfigError("--backbones: name at least one backbone (e.g. resnet18,mobilenet_v3_large)")
    cfg = load_config(task, list(overrides))
    generic: list[str | None] = []
    specific: dict[str, list[str]] = {}
    for item in pretrained:
        name, sep, weights = item.partition("=")
        if sep and name in backbones:
            specific.setdefault(name, []).append(weights)
        elif sep and "/" not in name:
            raise ConfigError(f"--pretrained {item!r}: {name!r} is not one of --backbones ({', '.join(backbones)})")
        else:
            generic.append(None if item.lower() in SCRATCH else item)
    out = []
    for entry in backbones:
        extra, size = backbone_overrides(entry, int(cfg.data.image_size), float(cfg.model.backbone.efficientnet.gamma))
        phi = [e.split("=", 1)[1] for e in extra if e.startswith("model.backbone.efficientnet.phi=")]
        with torch.device("meta"):  # an unknown name is a one-line error now, not a failed trial later
            build_backbone({"name": "efficientnet", "efficientnet": {"phi": float(phi[0])}} if phi else entry)
        settings = generic + [None if w.lower() in SCRATCH else w for w in specific.get(entry, [])]
        for weights in settings or [None]:
            value = "null" if weights is None else weights
            out.append(Variant(entry, weights, (*extra, f"model.backbone.pretrained={value}"), size))
    labels = [(v.backbone, v.pretrained) for v in out]
    if len(set(labels)) != len(labels):
        raise ConfigError("--backbones/--pretrained: a backbone and pretrained setting is listed twice")
    return out


def trial_name(variant: Variant, seed: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{variant.backbone}__{variant.pretrained_label}")
    return f"trials/{safe}__seed{seed}"


def run_transfer(task: str | Path, backbones: Sequence[str], *, pretrained: Sequence[str] = (),
                 seeds: Sequence[int] = (0,), out: str | Path, overrides: Sequence[str] = (),
                 retry_failed: bool = False, latency: bool = True, remeasure: bool = False) -> list[dict[str, Any]]:
    """Run the study (skipping finished trials) and write the report; returns its rows."""
    from detkit.analysis.lineage import expand

    out = Path(out)
    found = variants(task, overrides, expand(list(backbones)), pretrained)
    seeds = [int(s) for s in seeds] or [0]
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"--seeds {','.join(map(str, seeds))}: seeds must be distinct and >= 0")
    trials = [Trial(trial_name(v, s), [*v.overrides, f"seed={s}"],
                    {"backbone": v.backbone, "pretrained": v.pretrained_label, "seed": s, "image_size": v.image_size})
              for v in found for s in seeds]
    names = [t.name for t in trials]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ConfigError(f"--backbones/--pretrained: two settings would share the run folder {clash[0]} (e.g. "
                          f"weights files with the same name); rename one")
    with FolderLock(out, "transfer study"):  # a second process on this folder is refused
        check_settings(out, task_settings(task, overrides))
        results = run_trials(task, overrides, trials, out,
                             measure=lambda run_dir, cfg: measure_model(run_dir, cfg, latency=latency),
                             retry_failed=retry_failed, remeasure=remeasure)
        return write_report(results, out)


COLUMNS = ["backbone", "pretrained", "input", "runs", "backbone_params", "backbone_flops", "backbone_activations",
           "model_params", "model_flops", "model_activations", "train_s", "latency_ms", "metric", "mean", "std"]


def aggregate(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (backbone, pretrained): complexity of its first finished run, means over seeds."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["backbone"], r["pretrained"]), []).append(r)
    rows = []
    for (backbone, pretrained), runs in groups.items():
        done = [r for r in runs if r.get("status") == "done"]
        row: dict[str, Any] = {"backbone": backbone, "pretrained": pretrained, "runs": f"{len(done)}/{len(runs)}",
                               "seeds": " ".join(str(r["seed"]) for r in done)}
        network = network_of(backbone)
        if network is not None:
            row.update(network=network.name, year=network.year, label=network.name)
        if done:
            first = done[0]
            row["input"] = "x".join(str(v) for v in first.get("input_size", []))
            for key in COLUMNS[4:10]:
                row[key] = first.get(key)
            row["train_s"] = round(mean_std([r["train_s"] for r in done])[0], 1)
            if all("latency_ms" in r for r in done):
                row["latency_ms"] = round(mean_std([r["latency_ms"] for r in done])[0], 2)
            row["metric"] = first["metric"]
            row["mean"], row["std"] = (round(v, 4) for v in mean_std([r["value"] for r in done]))
        failed = [r for r in runs if r.get("status") == "failed"]
        if failed:
            row["failed"] = "; ".join(f"seed {r['seed']}: {r['failure']}" for r in failed)
        rows.append(row)
    return rows


def write_report(results: Sequence[dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    from detkit.analysis.study_plots import plot_metric_vs

    rows = aggregate(results)
    trial_cols = ["trial", "backbone", "pretrained", "seed", "status", "value", "train_s", "latency_ms", "threads",
                  "model_flops", "model_params", "failure"]
    write_table(results, trial_cols, out / "trials", {"value": lambda v: f"{v:.4f}", "model_flops": human,
                                                       "model_params": human})
    has_failures = any("failed" in r for r in rows)
    lineage = any("year" in r for r in rows)
    columns = (["network", "year"] if lineage else []) + COLUMNS + ["seeds"] + (["failed"] if has_failures else [])
    fmt = {c: human for c in COLUMNS[4:10]}
    fmt.update(mean=lambda v: f"{v:.4f}", std=lambda v: f"{v:.4f}")
    write_table(rows, columns, out / "report", fmt)
    plotted = [r for r in rows if r.get("mean") is not None]
    if plotted:
        metric = plotted[0]["metric"]
        for key, label, path in (("model_flops", "model FLOPs (multiply-adds, one image)", "metric_vs_flops.png"),
                                 ("latency_ms", "latency, batch 1 (ms)", "metric_vs_latency.png"),
                                 ("model_params", "model parameters", "metric_vs_params.png"),
                                 ("model_activations", "model activations (conv outputs, one image)",
                                  "metric_vs_activations.png"),
                                 ("year", "year of publication", "metric_vs_year.png")):
            having = [r for r in plotted if r.get(key)]  # the year: the lineage networks among the backbones
            if having and (key == "year" or len(having) == len(plotted)):
                plot_metric_vs(having, key, label, metric, out / path)
    if lineage:
        write_lineage(rows, out / "lineage.md")
    return rows


def write_lineage(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """``lineage.md``: the networks oldest first with the idea each introduced and how it did on the task."""
    from detkit.analysis.lineage import ideas_table

    ordered = sorted((r for r in rows if "year" in r), key=lambda r: (r["year"], r["backbone"], r["pretrained"]))
    metric = next((r["metric"] for r in ordered if r.get("metric")), "metric")
    lines = ["# The CNN lineage on this task", "", f"| year | network | pretrained | {metric} | model FLOPs | "
             "model params | model activations | train s |", "|---|---|---|---|---|---|---|---|"]
    for r in ordered:
        score = f"{r['mean']:.4f} +- {r['std']:.4f}" if r.get("mean") is not None else "failed"
        lines.append(f"| {r['year']} | {r['network']} | {r['pretrained']} | {score} | {human(r.get('model_flops'))} | "
                     f"{human(r.get('model_params'))} | {human(r.get('model_activations'))} | {r.get('train_s', '')} |")
    lines += ["", "## The idea each network introduced", "", ideas_table([r["backbone"] for r in ordered])]
    path.write_text("\n".join(lines))


def format_report(rows: Sequence[dict[str, Any]], out: Path) -> str:
    lines = [f"transfer report: {out / 'report.md'} (csv, plots and every run beside it)"]
    for r in rows:
        score = f"{r['metric']} {r['mean']:.4f} +- {r['std']:.4f}" if r.get("mean") is not None else "no finished run"
        extra = f", latency {r['latency_ms']} ms" if r.get("latency_ms") is not None else ""
        lines.append(f"  {r['backbone']:<32} {r['pretrained']:<24} runs {r['runs']}  {score}  "
                     f"model {human(r.get('model_flops'))} FLOPs{extra}")
        if r.get("failed"):
            lines.append(f"      failed: {r['failed']}")
    return "\n".join(lines)
