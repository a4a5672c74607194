"""Training to a time budget: the step count is planned, recorded and repeatable; the budget is a hard stop."""

from __future__ import annotations

import json
import time

import lightning as L
import pytest
import torch

import detkit
from conftest import TINY_CONFIG, tiny_detector_overrides
from detkit.config import load_config
from detkit.engine.budget import parse_budget
from detkit.errors import ConfigError

COMMON = ("trainer.limit_val_batches=1", "train.checkpoint_every_minutes=null", "trainer.check_val_every_n_epoch=2")


@pytest.mark.parametrize("text,seconds", [("10min", 600), ("2h", 7200), ("1h30min", 5400), ("90s", 90),
                                          ("0.5h", 1800), ("1d", 86400), (" 3 min ", 180)])
def test_budgets_parse(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["", "ten minutes", "10", "10 parsecs", "-5min", "0s", "nanmin", "10min!"])
def test_bad_budgets_are_one_line(text):
    with pytest.raises(ConfigError, match="train.budget"):
        parse_budget(text)


def _weights(run):
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)


class Busy(L.Callback):
    """A machine busier during the run than during its calibration: each training step ``seconds`` longer, from
    step ``after`` on."""

    def __init__(self, seconds: float, after: int = 0) -> None:
        self.seconds, self.after = seconds, after

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.after:
            time.sleep(self.seconds)


@pytest.mark.slow
@pytest.mark.serial
def test_the_plan_is_recorded_corrected_by_the_run_and_a_rerun_with_it_is_exact(shapes_dir, tmp_path):
    started = time.perf_counter()
    planned = detkit.train(TINY_CONFIG, tiny_detector_overrides(shapes_dir, tmp_path / "budget", *COMMON,
                                                                "train.budget=40s", "train.warmup_iters=30"),
                           callbacks=[Busy(0.3)])
    elapsed = time.perf_counter() - started
    cfg = load_config(planned / "config.yaml")
    steps = cfg.train.total_steps
    assert steps is not None and steps > 8
    assert elapsed < 40 * 1.25  # calibration, training, validations and the final validation within the budget
    a = _weights(planned)
    record = json.loads((planned / "budget.json").read_text())  # the plan next to what the run took
    # the calibration (without the extra 0.3 s a step) planned more steps than fit; the run re-planned during its
    # warmup from its own steps, and config.yaml holds the new count and the warmup as it ran
    assert record["replanned"]["from"] > record["replanned"]["to"] == steps
    assert record["replanned"]["at_step"] < cfg.train.warmup_iters <= steps // 3
    assert record["replanned"]["step_seconds"] > 0.3
    # on an idle machine every planned step is trained; when other work starts on the machine after the
    # re-plan, the hard stop ends the run early (never late)
    assert 0 < a["global_step"] <= steps and record["steps_trained"] == a["global_step"]
    assert record["budget_seconds"] == 40 and 0 < record["spent_seconds"] <= elapsed + 0.1
    # the run's config.yaml without the budget repeats the run exactly, step for step (stopped where it stopped)
    rerun = detkit.train(planned / "config.yaml", ["train.budget=null", f"output_dir={tmp_path / 'rerun'}",
                                                   f"trainer.max_steps={a['global_step']}"])
    b = _weights(rerun)
    assert b["global_step"] == a["global_step"]
    for k in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][k], a["state_dict"][k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.slow
@pytest.mark.serial
def test_the_budget_is_a_hard_stop(shapes_dir, tmp_path):
    started = time.perf_counter()
    # (60 s: on a machine shared with other tests a 40 s budget can leave the plan no room after its calibration)
    run = detkit.train(TINY_CONFIG, tiny_detector_overrides(shapes_dir, tmp_path / "slow", *COMMON,
                                                            "train.budget=60s"), callbacks=[Busy(1.0, after=3)])
    elapsed = time.perf_counter() - started
    planned = load_config(run / "config.yaml").train.total_steps
    assert planned > 3  # the calibration (which the busy callback does not touch) left room for a real plan
    assert _weights(run)["global_step"] < planned  # stopped by the budget, saved where it stopped
    assert elapsed < 60 * 1.3


def test_the_last_epochs_train_without_mosaic(shapes_dir):
    from detkit.engine.optim import no_mosaic_epoch
    from detkit.engine.run import build_datamodule

    cfg = load_config(TINY_CONFIG, tiny_detector_overrides(shapes_dir, "unused", "train.epochs=10",
                                                           "train.close_mosaic=0.2",
                                                           "data.transforms.train=[{name: Mosaic, p: 1.0}]"))
    dm = build_datamodule(cfg)
    dm.setup("fit")
    assert no_mosaic_epoch(cfg, len(dm.train_dataloader())) == 8
    dm.no_mosaic_from = 8
    dm.train_dataloader()
    for epoch, extra in ((0, 3), (7, 3), (8, 0), (9, 0)):
        dm.set_epoch(epoch)
        assert dm.dataset("train").transform.extra_samples == extra, epoch
    cfg.train.total_steps = 40  # 8 steps per epoch: 5 epochs, the last one without Mosaic
    assert no_mosaic_epoch(cfg, len(dm.train_dataloader())) == 4


def test_the_calibration_counts_loader_restarts_and_leaves_warm_up_out():
    """Timestamps of a calibration laid out by hand: steady steps of 1 s, an epoch's first step 3 s longer (its
    loader's workers restart), the model's first step 5 s longer, validation batches of 0.5 s after a first one of
    2 s, a validation's fixed part of 0.4 s, and 1.5 s more for the first validation (its workers start)."""
    from detkit.engine.budget import _Clock, costs

    clock = _Clock()
    clock.steps = [[6.0, 1.0, 1.1, 0.9], [4.0, 1.0, 1.0, 0.95]]
    clock.transitions = [0.2]
    clock.validations = [(0.4 + 1.5 + 2.0 + 0.5, [2.0, 0.5]), (0.4 + 2.0 + 0.5, [2.0, 0.5])]
    c = costs(clock)
    assert c["step"] == 1.0
    assert c["transition"] == pytest.approx(0.2 + 3.0)  # the loader restart is a cost of every epoch
    assert c["val_batch"] == 0.5
    assert c["val_fixed"] == pytest.approx(0.4 + 1.5)  # the first batch's warm-up is in each validation's fixed part
    assert c["val_first"] == pytest.approx(1.5)


def test_the_plan_fills_the_budget_with_what_the_calibration_measured(monkeypatch, shapes_dir):
    """The step count follows from the measured costs: steps, one transition per epoch, a validation per
    validated epoch plus the final one, the validation workers' start twice, 5 % kept in reserve."""
    from detkit.engine import budget
    from detkit.engine.run import build_datamodule

    cfg = load_config(TINY_CONFIG, tiny_detector_overrides(shapes_dir, "unused", "trainer.check_val_every_n_epoch=1"))
    dm = build_datamodule(cfg)
    dm.setup("fit")
    measured = {"step": 0.5, "transition": 1.0, "val_batch": 0.25, "val_fixed": 0.5, "val_first": 2.0}
    monkeypatch.setattr(budget, "_calibrate", lambda *a: measured)
    found = budget.plan(cfg, dm, 600.0, time.perf_counter(), trial=None)  # (not called: measured)
    spe, total = found["steps_per_epoch"], found["total_steps"]
    epochs = -(-total // spe)
    per_validation = 0.5 + budget.validation_batches(cfg, dm) * 0.25
    other = epochs * 1.0 + (epochs + 1) * per_validation + 2 * 2.0
    assert 0.95 * (600 - other) - 0.5 - 0.01 <= total * 0.5 <= 0.95 * (600 - other)  # within a step
    assert total * 0.5 + other > 0.94 * 600
    assert found["final_validation_seconds"] == pytest.approx(per_validation + 2.0, abs=0.05)


def test_the_budget_object_plans_through_the_trial_it_is_given_and_records_the_plan(shapes_dir, tmp_path):
    """Budget: the calibration runs the throw-away fit it is given (here one that only lays out a clock's timestamps:
    steps of 0.5 s, no wall-clock time spent); the plan sets train.total_steps and clips the warmup to a third of it,
    the callbacks are the progress bar and the re-plan, budget.json records the plan; a resumed budgeted run takes
    its own recorded steps instead of planning."""
    from omegaconf import OmegaConf

    from detkit.engine.budget import Budget, BudgetProgress, BudgetReplan
    from detkit.engine.run import build_datamodule

    cfg = load_config(TINY_CONFIG, tiny_detector_overrides(shapes_dir, "unused", "train.budget=2min",
                                                           "train.warmup_iters=1000"))
    dm = build_datamodule(cfg)
    dm.setup("fit")
    trials = []

    def trial(short, callbacks):
        trials.append(short)
        (clock,) = callbacks
        clock.steps = [[0.5] * 5, [0.5] * 5]
        clock.transitions, clock.validations = [0.1], [(1.0, [0.25, 0.25]), (1.0, [0.25, 0.25])]

    budget = Budget.of(cfg, time.perf_counter())
    budget.plan(dm, trial)
    (short,) = trials
    assert short.train.budget is None and short.train.epochs == 2 and short.trainer.limit_val_batches == 2
    total = cfg.train.total_steps
    assert 0.5 * 120 < 0.5 * total < 0.95 * 120 and cfg.train.warmup_iters == total // 3  # (validations take the rest)
    replanned = []
    callbacks = budget.callbacks(lambda trainer: replanned.append(trainer))
    assert [type(c) for c in callbacks] == [BudgetProgress, BudgetReplan]
    assert 0 < budget.max_time <= 120
    budget.record(tmp_path, steps=total)
    record = json.loads((tmp_path / "budget.json").read_text())
    assert record["steps_planned"] == record["steps_trained"] == total and record["plan"]["step_seconds"] == 0.5
    assert Budget.of(load_config(TINY_CONFIG), 0.0) is None  # no train.budget: no Budget

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    again = load_config(TINY_CONFIG, tiny_detector_overrides(shapes_dir, "unused", "train.budget=2min"))
    resumed = Budget.of(again, time.perf_counter(), resumed_from=run / "checkpoints" / "last.ckpt")
    resumed.plan(dm, trial=None)  # (never called: the run's own plan is taken)
    assert again.train.total_steps == total and resumed.planned is None
    assert [type(c) for c in resumed.callbacks(lambda trainer: None)] == [BudgetProgress]
