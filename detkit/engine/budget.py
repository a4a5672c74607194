"""Training to a time budget (``train.budget: 10min``): the whole schedule laid over the budget, reproducibly.

Before training, a short throw-away run through the same engine (two epochs of a few steps, each ending with a
checkpoint and a validation of two batches) times a step (data loading included), an epoch transition (with the
training loader's restart), a validation batch and a validation's fixed cost, leaving warm-up out (:func:`costs`);
from those, the number of optimizer steps that fits the budget (less the epoch transitions and validations it will
run, and 5 % kept in reserve) is fixed and written into the run's ``config.yaml`` as ``train.total_steps``. The
schedule (warmup, cosine or multistep, the final no-mosaic phase, EMA) is then laid over those steps instead of over
``train.epochs``, and the run starts from the same initial weights as a run given ``train.total_steps`` directly:
a rerun with that step count repeats the run exactly, on any machine. ``trainer.max_time`` is set to what is
left of the budget, so training stops at the budget whatever happens (a slower machine stops early, with
``last.ckpt`` saved where it stopped). The progress bar shows the minutes left; ``budget.json`` in the run
directory records the plan next to the seconds the run took."""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L

from detkit.errors import ConfigError

log = logging.getLogger(__name__)

UNITS = {"s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "hr": 3600, "d": 86400}
PART = re.compile(r"(\d+(?:\.\d+)?)\s*(d|hr|h|min|m|sec|s)")


def parse_budget(text: Any) -> float:
    """``"10min"``, ``"2h"``, ``"1h30min"``, ``"90s"``, ``"0.5h"`` -> seconds; anything else is one line."""
    s = str(text).strip().lower()
    parts = PART.findall(s)
    if not s or not parts or PART.sub("", s).strip():
        raise ConfigError(f"train.budget = {text!r}: expected a duration such as 10min, 2h, 1h30min or 90s")
    seconds = sum(float(n) * UNITS[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"train.budget = {text!r}: expected a positive duration")
    return seconds


def limited(batches: int, limit: Any) -> int:
    """``batches`` after a Lightning ``limit_*_batches`` (an int caps them, a float keeps that fraction)."""
    if isinstance(limit, int) and not isinstance(limit, bool):
        return min(batches, limit)
    if isinstance(limit, float):
        return max(1, int(batches * limit)) if batches else 0
    return batches


def steps_per_epoch(cfg: Any, batches: int) -> int:
    """Optimizer steps per epoch of ``batches`` training batches (``trainer.limit_train_batches`` applied)."""
    batches = limited(batches, cfg.trainer.limit_train_batches)
    return max(1, math.ceil(batches / int(cfg.trainer.accumulate_grad_batches)))


class _Clock(L.Callback):
    """Timestamps of a calibration run: steps (batch start to batch start, data loading included) per epoch, epoch
    transitions (checkpoint, loader restart) and validations (each batch, and the whole validation up to the
    computation of its metrics)."""

    def __init__(self, with_metrics: bool = False) -> None:
        self.with_metrics = with_metrics  # a validation ends after its metrics are computed (else before)
        self.steps: list[list[float]] = []  # per epoch
        self.transitions: list[float] = []
        self.validations: list[tuple[float, list[float]]] = []  # (seconds, seconds of each batch)
        self._last: float | None = None
        self._epoch_end: float | None = None
        self._val_start = self._batch_start = 0.0
        self._timing = False

    def on_train_epoch_start(self, *args: Any) -> None:
        self.steps.append([])

    def on_train_batch_start(self, *args: Any) -> None:
        now = time.perf_counter()
        if self._epoch_end is not None:  # (the epoch's validation ran before its on_train_epoch_end)
            self.transitions.append(now - self._epoch_end)
            self._epoch_end = None
        elif self._last is not None:
            self.steps[-1].append(now - self._last)
        self._last = now

    def on_train_epoch_end(self, *args: Any) -> None:
        self._epoch_end, self._last = time.perf_counter(), None

    def on_validation_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._timing = not trainer.sanity_checking  # (a sanity check is no validation of the run)
        if self._timing:
            self._val_start = time.perf_counter()
            self.validations.append((0.0, []))

    def on_validation_batch_start(self, *args: Any) -> None:
        self._batch_start = time.perf_counter()

    def on_validation_batch_end(self, *args: Any) -> None:
        if self._timing:
            self.validations[-1][1].append(time.perf_counter() - self._batch_start)

    def on_validation_epoch_end(self, *args: Any) -> None:
        # (callbacks run before the module's epoch end, so the metrics' computation is left out: on an untrained
        # model it is dominated by hundreds of random detections per image, which the first epochs remove)
        if not self.with_metrics:
            self._end_validation()

    def on_validation_end(self, *args: Any) -> None:
        if self.with_metrics:
            self._end_validation()

    def _end_validation(self) -> None:
        if self._timing:
            self.validations[-1] = (time.perf_counter() - self._val_start, self.validations[-1][1])


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else 0.0


def costs(clock: _Clock) -> dict[str, float]:
    """Seconds per step, per epoch transition, per validation batch, per validation (its fixed part) and once for
    the first validation, from a calibration's timestamps.

    A step is the median of the steady steps (the first of each epoch left out). The first step of an epoch waits
    for the training loader's restarted workers: what it takes over a steady step is a cost per epoch and counts
    with the transition (from the first epoch on, the first one also holds the model's warm-up and is left out when
    a later epoch was timed). A validation costs a fixed part plus its batches; the first validation also starts
    the validation loader's workers (they stay), which is counted once."""
    step = _median([s for epoch in clock.steps for s in epoch[1:]] or [s for epoch in clock.steps for s in epoch])
    firsts = [epoch[0] for epoch in clock.steps if epoch]
    restart = max(0.0, _median(firsts[1:] or firsts) - step) if firsts else 0.0
    val_batch = _median([b for _, times in clock.validations for b in times[1:]]
                        or [b for _, times in clock.validations for b in times])
    fixed = [max(0.0, total - len(times) * val_batch) for total, times in clock.validations]
    steady = min(fixed[1:] or fixed or [0.0])
    return {"step": step, "transition": _median(clock.transitions) + restart, "val_batch": val_batch,
            "val_fixed": steady, "val_first": max(0.0, fixed[0] - steady) if fixed else 0.0}


def _calibrate(cfg: Any, dm: Any, steps: int) -> dict[str, float]:
    """Two short epochs of a throw-away run through the same engine (Lightning, callbacks, a checkpoint per epoch,
    one validation of two batches each): see :func:`costs`."""
    import copy
    import tempfile

    from detkit.engine.module import DetectionModule
    from detkit.engine.run import build_trainer

    trial = copy.deepcopy(cfg)
    trial.train.budget, trial.train.total_steps, trial.train.ema.enabled = None, None, cfg.train.ema.enabled
    trial.trainer.update(max_steps=-1, max_time=None, limit_train_batches=steps, limit_val_batches=2,
                         check_val_every_n_epoch=1, enable_model_summary=False, num_sanity_val_steps=0)
    trial.train.epochs = 2
    clock = _Clock()
    with tempfile.TemporaryDirectory(prefix="detkit-budget-") as tmp:
        module = DetectionModule(trial, classes=dm.classes)
        trainer = build_trainer(trial, Path(tmp), callbacks=[clock])
        trainer.fit(module, datamodule=dm)
    return costs(clock)


def validation_batches(cfg: Any, dm: Any) -> int:
    """Batches of one validation (``trainer.limit_val_batches`` applied)."""
    val = dm.dataset("val")
    if val is None:
        return 0
    return limited(math.ceil(len(val) / int(cfg.data.batch_size)), cfg.trainer.limit_val_batches)


def plan(cfg: Any, dm: Any, budget: float, started: float, steps: int = 5) -> dict[str, Any]:
    """Time a short run (:func:`_calibrate`) and fix ``total_steps`` so that training, its epoch transitions and
    its validations fit in what is left of ``budget`` seconds (counted from ``started``)."""
    spe = steps_per_epoch(cfg, len(dm.train_dataloader()))
    cost = _calibrate(cfg, dm, min(steps, spe))
    step_s = cost["step"] * int(cfg.trainer.accumulate_grad_batches)
    batches = validation_batches(cfg, dm)
    per_validation = cost["val_fixed"] + batches * cost["val_batch"] if batches else 0.0
    once = cost["val_first"] if batches else 0.0  # the validation workers' start (also the final validation's)
    left = budget - (time.perf_counter() - started)
    every = int(cfg.trainer.check_val_every_n_epoch or 0)
    # the validation workers start twice: in the first validation and in the final one
    total, val_s = fit_steps(left, step_s, spe, every, per_validation, cost["transition"], once=2 * once)
    return {"total_steps": total, "step_seconds": round(step_s, 4), "steps_per_epoch": spe,
            "epoch_transition_seconds": round(cost["transition"], 3), "validation_seconds": round(val_s, 1),
            "per_validation_seconds": round(per_validation, 2), "validation_start_seconds": round(once, 2),
            "final_validation_seconds": round(per_validation + once, 1), "left_seconds": round(left, 1)}


def fit_steps(left: float, step_s: float, spe: int, every: int, per_validation: float, transition: float, *,
              once: float = 0.0, done: int = 0, final: bool = True, reserve: float = 0.05) -> tuple[int, float]:
    """Optimizer steps after step ``done`` that fit in ``left`` seconds with the epoch transitions and the
    validations (every ``every`` epochs, and with ``final`` the final weights' one) they bring, ``reserve`` of the
    time kept for logging and the unforeseen; also the seconds of those validations (``once``: a one-time cost)."""
    total, val_s = max(1, int(left / step_s)), 0.0
    for _ in range(8):  # validations and transitions depend on the epochs, which depend on the steps
        first, last = done // spe, math.ceil((done + total) / spe)  # the epochs that end in these steps
        validations = (last // every - first // every if every else 0) + int(final)
        val_s = validations * per_validation + once
        total = max(1, int((1 - reserve) * (left - val_s - (last - first) * transition) / step_s))
    return total, val_s


def apply_budget(cfg: Any, dm: Any, started: float) -> dict[str, Any] | None:
    """With ``train.budget`` and no ``train.total_steps`` yet: plan the run and set ``train.total_steps`` (in
    ``cfg``, so ``config.yaml`` records it). Returns the plan (``None`` without a budget)."""
    if not cfg.train.budget or cfg.train.total_steps is not None:
        return None
    budget = parse_budget(cfg.train.budget)
    found = plan(cfg, dm, budget, started)
    cfg.train.total_steps = int(found["total_steps"])
    # the warmup as it runs (at most a third of the plan), written down: a re-plan during it keeps it
    cfg.train.warmup_iters = min(int(cfg.train.warmup_iters), cfg.train.total_steps // 3)
    log.info("train.budget = %s: %d steps (%.3f s each, %d per epoch, %.2f s per epoch transition), about %.0f s "
             "of validation; train.total_steps=%d is in config.yaml (a rerun with it repeats this run)",
             cfg.train.budget, found["total_steps"], found["step_seconds"], found["steps_per_epoch"],
             found["epoch_transition_seconds"], found["validation_seconds"], found["total_steps"])
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)  # the run starts as one without calibration
    return found


def time_left(cfg: Any, started: float, reserve: float = 0.0) -> float | None:
    """Seconds of ``train.budget`` left after ``started`` (less ``reserve``); ``None`` without a budget."""
    if not cfg.train.budget:
        return None
    return max(1.0, parse_budget(cfg.train.budget) - (time.perf_counter() - started) - reserve)


class BudgetProgress(L.Callback):
    """Shows the minutes of the budget left in the progress bar (``left_min``)."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline  # time.perf_counter() at which the budget ends

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        pl_module.log("left_min", max(0.0, (self.deadline - time.perf_counter()) / 60), prog_bar=True,
                      on_step=True, on_epoch=False, batch_size=1)


class BudgetReplan(_Clock):
    """Re-plans ``train.total_steps`` once, from the run's own timings, while the warmup still runs.

    The throw-away calibration times a model that has not trained yet, on a machine whose load may change; the run
    itself is the better clock. At the end of the first epoch that validated (or at the last step of the warmup,
    when that comes first), the steps that fit what is left of the budget are counted again from the run's steady
    steps and its validation (its metrics included), and ``train.total_steps`` becomes that. The learning rate
    during the warmup does not depend on the run's length (:func:`detkit.engine.optim.lr_factor`), so the steps
    already trained are those of a run given the new count from the start: ``config.yaml`` is written again and a
    rerun with it repeats the run exactly. Without a warmup (``train.warmup_iters: 0``) the plan stays as it was.
    Under DDP every process takes rank 0's count."""

    def __init__(self, deadline: float, planned: dict[str, Any], warmup: int, every: int,
                 apply: Callable[[L.Trainer, int], None]) -> None:
        super().__init__(with_metrics=True)
        self.deadline, self.planned, self.warmup, self.every, self.apply = deadline, planned, warmup, every, apply
        self.replanned: dict[str, Any] | None = None
        self.done = warmup < 1

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if not self.done and trainer.global_step >= self.warmup - 1:  # the warmup ends before a validation
            self._replan(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_end()
        if not self.done and self.validations and trainer.global_step < self.warmup:
            self._replan(trainer)

    def _replan(self, trainer: L.Trainer) -> None:
        self.done = True
        p, step = self.planned, trainer.global_step
        steady = [s for epoch in self.steps for s in epoch[1:]]
        total = int(p["total_steps"])
        if steady:
            measured = {"step_seconds": _median(steady), "per_validation_seconds": p["per_validation_seconds"]}
            if self.validations:  # the run's own, less the start of its workers (counted by the calibration)
                measured["per_validation_seconds"] = max(0.0, self.validations[0][0] - p["validation_start_seconds"])
            left = self.deadline - time.perf_counter()
            more, _ = fit_steps(left, measured["step_seconds"], int(p["steps_per_epoch"]), self.every,
                                measured["per_validation_seconds"], p["epoch_transition_seconds"], done=step,
                                final=False, reserve=0.03)
            total = max(step + more, 3 * self.warmup, step + 1)  # (3 x: the warmup stays what it was)
        total = int(trainer.strategy.broadcast(total, src=0))
        if total == int(p["total_steps"]):
            return
        self.replanned = {"at_step": step, "from": int(p["total_steps"]), "to": total,
                          **({k: round(v, 4) for k, v in measured.items()} if steady else {})}
        log.info("train.budget: re-planned from the run's own timings at step %d: %d -> %d steps "
                 "(train.total_steps in config.yaml)", step, p["total_steps"], total)
        self.apply(trainer, total)
