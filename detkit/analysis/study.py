"""Studies: many short training runs of one task config (*trials*), run one after another, resumable and
failure-tolerant. ``detkit transfer`` and ``detkit design-space`` are both studies.

Each trial is an ordinary run directory (``detkit train``'s layout) plus ``result.json``:

- ``status: done``: the trial's main metric (``eval.main_metric`` of its final weights), training time and the
  model's measurements (complexity, latency). A study run again skips it.
- ``status: failed``: the error in one line (``failure``; the traceback in ``error.txt``). A study run again skips
  it too, unless asked to retry failed trials; the other trials go on either way.
- no ``result.json``: the trial never finished (the study was interrupted: Ctrl-C, SIGTERM). A study run again
  resumes it from its ``checkpoints/last.ckpt`` when there is one, so no finished epoch is lost; ``train_s`` adds
  up the attempts.

``settings.json`` at the study's root records the command's settings (task, overrides, a hash of the resolved
config, ...); running a study into the same folder with different settings is a one-line error, so results of
different setups never mix.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import statistics
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from detkit.engine.callbacks import LastCheckpoint
from detkit.errors import ConfigError
from detkit.utils.io import write_json

log = logging.getLogger(__name__)
RESULT = "result.json"


@dataclass
class Trial:
    """One training run of a study: its folder (relative to the study), config overrides and report columns."""

    name: str
    overrides: list[str]
    info: dict[str, Any] = field(default_factory=dict)


def check_settings(out: Path, settings: dict[str, Any], grow: Sequence[str] = (), write: bool = True) -> None:
    """Check ``settings`` against the ones recorded in ``out/settings.json`` (keys in ``grow`` may differ: e.g. a
    larger ``n`` extends a design-space study), then record them (``write``)."""
    path = out / "settings.json"
    settings = json.loads(json.dumps(settings))  # the JSON form, as it will be compared later
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError as e:
            raise ConfigError(f"{path}: not readable JSON ({e}); fix or remove it") from None
        for key in sorted(set(old) | set(settings)):
            if key not in grow and old.get(key) != settings.get(key):
                raise ConfigError(f"{path}: this study was run with {key} = {old.get(key)!r}, not "
                                  f"{settings.get(key)!r}; use another --out, or the same settings to resume it")
    if write:
        write_json(settings, path)


def task_settings(task: str | Path, overrides: Sequence[str]) -> dict[str, Any]:
    """What identifies a study's task: the config file, the overrides, and a hash of the resolved config (so an
    edited config file is not mistaken for the one the earlier runs used). Loading it here also makes a bad task
    or override a one-line error before anything trains."""
    import hashlib

    from detkit.config import load_config
    from detkit.config.loader import to_yaml

    cfg = load_config(task, list(overrides))
    cfg.output_dir = ""  # may hold a timestamp; every trial sets its own
    return {"task": str(Path(task).resolve()), "overrides": list(overrides),
            "config_sha1": hashlib.sha1(to_yaml(cfg).encode()).hexdigest()[:16]}


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


class _Termination:
    """While a study runs, SIGTERM stops it like Ctrl-C: the running trial stays unrecorded and resumes next time.

    During training the engine's own handler takes over (it stops after the current step with ``last.ckpt`` saved
    and raises ``Interrupted``, a ``KeyboardInterrupt``); between trials this one raises ``KeyboardInterrupt``. A
    trial that fails after a signal (a data loader worker killed by the same signal) is not recorded as failed.
    """

    received = False

    def __call__(self, signum: int, frame: Any) -> None:
        type(self).received = True
        raise KeyboardInterrupt(f"signal {signum}")

    @classmethod
    @contextmanager
    def handled(cls):
        cls.received = False
        if threading.current_thread() is not threading.main_thread():  # signals go to the main thread only
            yield
            return
        previous = signal.signal(signal.SIGTERM, cls())
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)


def run_trials(task: str | Path, overrides: Sequence[str], trials: Iterable[Trial], out: Path, *,
               measure: Callable[[Path, Any], dict[str, Any]] | None = None, retry_failed: bool = False,
               remeasure: bool = False) -> list[dict[str, Any]]:
    """Run every trial not yet done (see the module docstring); returns their ``result.json`` records.
    ``remeasure``: measure the trials already done again (e.g. latency on a quiet machine), without training."""
    trials = list(trials)
    results = []
    with _Termination.handled():
        for i, trial in enumerate(trials):
            log.info("trial %d/%d: %s", i + 1, len(trials), trial.name)
            results.append(run_trial(task, overrides, trial, out, measure=measure, retry_failed=retry_failed,
                                     remeasure=remeasure))
    return results


def run_trial(task: str | Path, overrides: Sequence[str], trial: Trial, out: Path, *,
              measure: Callable[[Path, Any], dict[str, Any]] | None = None,
              retry_failed: bool = False, remeasure: bool = False) -> dict[str, Any]:
    from detkit.config import load_config
    from detkit.engine.run import train

    run_dir = out / trial.name
    result_path = run_dir / RESULT
    if result_path.is_file():
        try:
            previous = json.loads(result_path.read_text())
        except ValueError:
            log.warning("  %s: unreadable, running the trial again", result_path)
            previous = {}
        if previous.get("status") == "done" and remeasure and measure is not None:
            log.info("  %s: measuring again", trial.name)
            previous.update(measure(run_dir, load_config(run_dir / "config.yaml")))
            write_json(previous, result_path)
            return previous
        if previous.get("status") == "done" or (previous.get("status") == "failed" and not retry_failed):
            log.info("  %s already %s%s", trial.name, previous.get("status"),
                     f" ({previous.get('failure')})" if previous.get("status") == "failed" else "")
            return previous
    record: dict[str, Any] = {"trial": trial.name, **trial.info}
    last = run_dir / "checkpoints" / "last.ckpt"
    attempts_path = run_dir / "attempts.json"  # seconds spent by earlier, interrupted or failed attempts
    earlier = json.loads(attempts_path.read_text()) if attempts_path.is_file() else []
    start = time.perf_counter()
    signals = LastCheckpoint.signals_seen
    try:
        cfg = load_config(task, [*overrides, *trial.overrides])
        cfg.output_dir = str(run_dir)
        resume = last if last.is_file() else None
        if resume is not None:
            log.info("  resuming %s from %s", trial.name, last)
        train(cfg, resume=resume)
        record["train_s"] = round(sum(earlier) + time.perf_counter() - start, 2)
        record["resumed"] = resume is not None
        metric = cfg.eval.main_metric
        metrics = json.loads((run_dir / "metrics.json").read_text())
        value = metrics.get(metric)
        if value is None or not math.isfinite(value) or value < 0:  # COCO gives -1 where a metric is undefined
            raise ConfigError(f"{run_dir / 'metrics.json'}: {metric} is undefined (got {value!r})")
        record.update(metric=metric, value=float(value))
        if measure is not None:
            record.update(measure(run_dir, cfg))
        record["status"] = "done"
        (run_dir / "error.txt").unlink(missing_ok=True)
        log.info("  %s: %s = %.4f (%.0f s)", trial.name, metric, value, record["train_s"])
    except Exception as e:  # a failing trial is recorded; the study goes on
        if _Termination.received or LastCheckpoint.signals_seen > signals:
            # it failed because the study is being stopped (e.g. a worker killed by the same signal): not a failure
            raise KeyboardInterrupt("terminated") from e
        record.update(status="failed", failure=one_line(e), train_s=round(time.perf_counter() - start, 2))
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "error.txt").write_text(traceback.format_exc())
        log.error("  trial %s failed: %s (traceback: %s)", trial.name, record["failure"], run_dir / "error.txt")
    finally:  # also on Ctrl-C / SIGTERM (not caught above: the study stops, and this trial resumes next time)
        if record.get("status") != "done" and run_dir.is_dir():
            write_json([*earlier, round(time.perf_counter() - start, 2)], attempts_path)
    write_json(record, result_path)
    return record


# ------------------------------------------------------------------------------------------- measurements
def measure_model(run_dir: Path, cfg: Any, latency: bool = True, repeats: int = 10, warmup: int = 2
                  ) -> dict[str, Any]:
    """Complexity of the trained model and of its backbone (params, FLOPs, activations) on one validation image
    through the validation pipeline, and (``latency``) the :class:`~detkit.inference.Predictor`'s median time for
    that image, batch 1, in milliseconds (fast path: BatchNorms folded, channels-last)."""
    from detkit.analysis.complexity import count_complexity
    from detkit.inference.predictor import Predictor

    predictor = Predictor.from_checkpoint(run_dir, batch_size=1, fast=True)
    image = reference_image(cfg)
    batch = predictor.collate([predictor.sample(image, 0)])
    model = predictor.source  # the model as trained (the Predictor times its optimised copy)
    images = model.normalize(batch["images"])
    whole = count_complexity(model, inputs=images).as_dict()
    backbone = count_complexity(model.backbone, inputs=images).as_dict()
    record: dict[str, Any] = {"input_size": list(images.shape[-2:]),
                              **{f"backbone_{k}": v for k, v in backbone.items()},
                              **{f"model_{k}": v for k, v in whole.items()}}
    if latency:
        times = []
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            predictor(image)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        record["latency_ms"] = round(1000 * statistics.median(times), 2)
        record["threads"] = torch.get_num_threads()
    return record


def reference_image(cfg: Any):
    """The first readable validation image (a mid-grey image of ``data.image_size`` without a validation set)."""
    import numpy as np

    from detkit.data.build import build_dataset

    if cfg.data.val.format is not None:
        dataset = build_dataset(cfg.data.val, with_masks=False, key="data.val", max_pixels=cfg.data.max_image_pixels)
        for i in range(min(len(dataset), 8)):
            try:
                return dataset.load(i)["image"]
            except Exception:  # an unreadable image: try the next
                continue
    return np.full((cfg.data.image_size, cfg.data.image_size, 3), 114, np.uint8)


# --------------------------------------------------------------------------------------------- reporting
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = [float(v) for v in values]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def write_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], path_stem: Path,
                formats: dict[str, Callable[[Any], str]] | None = None) -> tuple[Path, Path]:
    """``<stem>.csv`` (raw values) and ``<stem>.md`` (a Markdown table, values formatted by ``formats``)."""
    import csv

    formats = formats or {}
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = path_stem.with_suffix(".csv"), path_stem.with_suffix(".md")
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in rows:
            writer.writerow(["" if r.get(c) is None else r.get(c) for c in columns])

    def cell(col: str, value: Any) -> str:
        if value is None or value == "":
            return ""
        text = formats[col](value) if col in formats else str(value)
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(c, r.get(c)) for c in columns) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def human(n: float | None) -> str:
    from detkit.analysis.backbone_table import human as _human

    return "" if n is None else _human(float(n))
