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
directory records the plan next to the seconds the run took.

:class:`Budget` is all of it for one run (``engine.run.train`` holds one): the plan, the re-plan, the callbacks and
``budget.json``. The calibration's throw-away run is given to it (``trial``), so this module needs no engine."""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from detkit.engine.optim import limited, steps_per_epoch
from detkit.errors import ConfigError

log = logging.getLogger(__name__)
Trial = Callable[[DictConfig, list], None]  # fits a config with extra callbacks, in a throw-away run directory

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


def _calibrate(cfg: Any, steps: int, trial: Trial) -> dict[str, float]:
    """Two short epochs of a throw-away run through the same engine (``trial``: Lightning, callbacks, a checkpoint per
    epoch, one validation of two batches each): see :func:`costs`."""
    import copy

    short = copy.deepcopy(cfg)
    short.train.budget, short.train.total_steps = None, None
    short.trainer.update(max_steps=-1, max_time=None, limit_train_batches=steps, limit_val_batches=2,
                         check_val_every_n_epoch=1, enable_model_summary=False, num_sanity_val_steps=0)
    short.train.epochs = 2
    clock = _Clock()
    trial(short, [clock])
    return costs(clock)


def validation_batches(cfg: Any, dm: Any) -> int:
    """Batches of one validation (``trainer.limit_val_batches`` applied)."""
    val = dm.dataset("val")
    if val is None:
        return 0
    return limited(math.ceil(len(val) / int(cfg.data.batch_size)), cfg.trainer.limit_val_batches)


def plan(cfg: Any, dm: Any, budget: float, started: float, trial: Trial, steps: int = 5) -> dict[str, Any]:
    """Time a short run (:func:`_calibrate` through ``trial``) and fix ``total_steps`` so that training, its epoch
    transitions and its validations fit in what is left of ``budget`` seconds (counted from ``started``)."""
    spe = steps_per_epoch(cfg, len(dm.train_dataloader()))
    cost = _calibrate(cfg, min(steps, spe), trial)
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


class Budget:
    """``train.budget`` of one run: its plan, its one re-plan, its callbacks and ``budget.json``.

    ``Budget.of(cfg, started, resumed_from)`` (``None`` without a budget); :meth:`plan` before the model is built
    (sets ``train.total_steps``: a new run's plan, or the resumed run's own); :meth:`callbacks` when the trainer is
    built (the progress bar's minutes left, the re-plan; :attr:`max_time` is the hard stop); :meth:`record` after
    training (``budget.json``)."""

    def __init__(self, cfg: DictConfig, started: float, resumed_from: Path | None = None) -> None:
        self.cfg, self.started, self.resumed_from = cfg, started, resumed_from
        self.seconds = parse_budget(cfg.train.budget)
        self.planned: dict[str, Any] | None = None
        self.replan: BudgetReplan | None = None
        self.max_time: float | None = None

    @classmethod
    def of(cls, cfg: DictConfig, started: float, resumed_from: Path | None = None) -> Budget | None:
        return cls(cfg, started, resumed_from) if cfg.train.budget else None

    def plan(self, dm: Any, trial: Trial) -> None:
        """``train.total_steps`` (in the config, so ``config.yaml`` records it): given already (a rerun), the resumed
        run's own (its ``config.yaml``), or planned by timing a few steps through ``trial``."""
        t = self.cfg.train
        if t.total_steps is not None or self._resumed_plan():
            return
        self.planned = plan(self.cfg, dm, self.seconds, self.started, trial)
        t.total_steps = int(self.planned["total_steps"])
        # the warmup as it runs (at most a third of the plan), written down: a re-plan during it keeps it
        t.warmup_iters = min(int(t.warmup_iters), t.total_steps // 3)
        p = self.planned
        log.info("train.budget = %s: %d steps (%.3f s each, %d per epoch, %.2f s per epoch transition), about %.0f "
                 "s of validation; train.total_steps=%d is in config.yaml (a rerun with it repeats this run)",
                 t.budget, p["total_steps"], p["step_seconds"], p["steps_per_epoch"], p["epoch_transition_seconds"],
                 p["validation_seconds"], p["total_steps"])
        L.seed_everything(int(self.cfg.seed), workers=True, verbose=False)  # as a run without calibration starts

    def _resumed_plan(self) -> bool:
        from detkit.config import load_config
        from detkit.models.load import run_dir_of

        run = run_dir_of(self.resumed_from) if self.resumed_from is not None else None
        if run is None or not (run / "config.yaml").is_file():
            return False
        recorded = load_config(run / "config.yaml").train.total_steps
        if recorded:
            self.cfg.train.total_steps = int(recorded)  # resuming a budgeted run: its plan, not a new one
        return bool(recorded)

    def callbacks(self, on_replan: Callable[[L.Trainer], None]) -> list[L.Callback]:
        """The progress bar's minutes left and, for a new plan, the re-plan (which sets ``train.total_steps`` and
        the trainer's ``max_steps``, then calls ``on_replan(trainer)``). Sets :attr:`max_time`: what is left of the
        budget (a resumed run has the whole budget again), less the final validation's planned seconds."""
        reserve = self.planned["final_validation_seconds"] if self.planned else 0.0
        since = self.started if self.resumed_from is None else time.perf_counter()
        self.max_time = max(1.0, self.seconds - (time.perf_counter() - since) - reserve)
        deadline = time.perf_counter() + self.max_time
        if self.planned is None:
            return [BudgetProgress(deadline)]

        def apply(trainer: L.Trainer, total: int) -> None:
            self.cfg.train.total_steps = total  # (the schedule reads it at every step)
            trainer.fit_loop.epoch_loop.max_steps = total
            on_replan(trainer)

        self.replan = BudgetReplan(deadline, self.planned, int(self.cfg.train.warmup_iters),
                                   int(self.cfg.trainer.check_val_every_n_epoch or 0), apply)
        return [BudgetProgress(deadline), self.replan]

    def record(self, out: Path, steps: int) -> None:
        """``budget.json`` of a planned run: the plan, the re-plan, the steps trained and the seconds the run took
        (calibration and final validation included), so a plan that left time unused, or a run the hard stop
        ended early, is visible."""
        if self.planned is None:
            return
        from detkit.utils.io import write_json

        spent = time.perf_counter() - self.started
        write_json({"budget_seconds": self.seconds, "spent_seconds": round(spent, 1),
                    "used": round(spent / self.seconds, 3), "steps_planned": int(self.cfg.train.total_steps),
                    "steps_trained": int(steps), "plan": self.planned,
                    "replanned": self.replan.replanned if self.replan else None}, out / "budget.json")
        log.info("train.budget = %s: %.0f s of %.0f s used (%.0f %%), %d of %d planned steps trained",
                 self.cfg.train.budget, spent, self.seconds, 100 * spent / self.seconds, steps,
                 int(self.cfg.train.total_steps))
