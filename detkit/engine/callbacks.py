"""Lightning plugins and callbacks of detkit runs: checkpoints that survive faults, ``metrics.json``.

- :class:`AtomicCheckpointIO`: a checkpoint is written next to its target, flushed to disk and renamed over it; a
  failed write (a full disk) removes the partial file, keeps the previous checkpoint and stops with one line.
  Checkpoints are read as data (``weights_only=True``).
- :class:`PartsSummary`: the model's parts and their parameters, one line (instead of Lightning's table).
- :class:`LastCheckpoint`: ``last.ckpt`` at every epoch end, every ``every_n_steps`` steps and every
  ``every_minutes`` minutes, and where training stops early (``trainer.max_steps``, ``max_time``: at the end of
  that step, so a resumed run continues mid-epoch).
  The first Ctrl-C or SIGTERM stops training at the end of the current step, after saving ``last.ckpt`` (a
  second one stops at once); :func:`detkit.engine.train` then raises :class:`Interrupted`. Under DDP the decision
  to save or stop is taken together, so every process stops at the same step.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from detkit.errors import TrainingError
from detkit.utils.io import write_json

log = logging.getLogger(__name__)


class Interrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C / SIGTERM after saving ``last.ckpt`` (``signum``: the signal)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes ``<file>.tmp`` (fsync) then renames it over ``<file>``: a crash or a full disk mid-save never leaves
    a broken or half-written checkpoint, and the previous one stays."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            raise TrainingError(f"cannot write checkpoint {path}: {e.strerror or e}; training stopped, "
                                f"{'the previous ' + path.name + ' is intact' if path.exists() else 'nothing written'}"
                                ) from None
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """A checkpoint read as data (tensors and plain containers only): see :func:`detkit.models.read_checkpoint`."""
        from detkit.models.load import read_checkpoint

        return read_checkpoint(path, map_location if map_location is not None else "cpu")


class PartsSummary(L.Callback):
    """At the start of fitting, one line: each part of the model (its config name) with its parameters, and how many
    are trained (``trainer.enable_model_summary``). Replaces Lightning's table, whose FLOPs column needs an example
    input and reads 0 for every detkit model."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        model, names = pl_module.model, pl_module.cfg.model
        parts = [f"{part} {names[part].name} {_millions(getattr(model, part))}"
                 for part in ("backbone", "neck", "head") if getattr(model, part, None) is not None]
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("model: %s; %s parameters, %.2f M trained", ", ".join(parts), _millions(model), trained / 1e6)


def _millions(module: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f} M"


def write_metrics(metrics: dict[str, Any], path: str | Path) -> Path:
    """``metrics.json``: one flat JSON object (values in [0, 1] or null, plus ``per_class``), written atomically."""
    return write_json(metrics, path)


class MetricsWriter(L.Callback):
    """After each validation (not the sanity check), rank 0 writes the module's metrics to ``metrics.json``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not getattr(pl_module, "metrics", None):
            return
        write_metrics(pl_module.metrics, self.path)


class LastCheckpoint(Checkpoint):
    """``last.ckpt``: see the module docstring. ``stopped_by``: the signal that stopped training, if any. (A
    ``Checkpoint`` subclass: Lightning runs it after the other callbacks, so a step's EMA update is saved with it.)"""

    def __init__(self, path: str | Path, every_n_steps: int | None = None, every_minutes: float | None = None) -> None:
        self.path = Path(path)
        self.every_n_steps, self.every_minutes = every_n_steps, every_minutes
        self.signal: int | None = None  # received, not yet acted on
        self.stopped_by: int | None = None
        self.saved_step = -1
        self._last_save = time.monotonic()
        self._previous: dict[int, Any] = {}

    # ---------------------------------------------------------------------------------------------- signals
    signals_seen = 0  # in this process (a study tells an interruption from a failure by it)

    def _handle(self, signum: int, frame: Any) -> None:
        type(self).signals_seen += 1
        if self.signal is not None:  # the second one: stop at once
            raise KeyboardInterrupt(f"signal {signum}")
        self.signal = signum
        log.warning("%s received: stopping after this step (last.ckpt is saved first); again to stop at once",
                    signal.Signals(signum).name)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signal = self.stopped_by = None
        self._last_save = time.monotonic()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    # ---------------------------------------------------------------------------------------------- saving
    def _decide(self, trainer: L.Trainer) -> tuple[bool, bool]:
        """(save now, stop now), the same on every process."""
        step = trainer.global_step
        due = bool(self.every_n_steps) and step > 0 and step % int(self.every_n_steps) == 0
        due |= bool(self.every_minutes) and time.monotonic() - self._last_save >= 60 * float(self.every_minutes)
        stop = self.signal is not None
        if trainer.world_size > 1:
            due = bool(trainer.strategy.broadcast(due, src=0))
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        return due or stop, stop

    def save(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)
        self.saved_step, self._last_save = trainer.global_step, time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        save, stop = self._decide(trainer)
        ending = trainer.should_stop or 0 < trainer.max_steps <= trainer.global_step  # max_time, max_steps, ...
        if (save or ending) and self.saved_step != trainer.global_step:  # saved here, mid-epoch, as it stands
            self.save(trainer)
        if stop:
            self.stopped_by = self.signal or signal.SIGTERM
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        done = trainer.fit_loop.epoch_loop.batch_progress.current.ready >= trainer.num_training_batches
        if done:  # an epoch cut short (max_steps, a signal) is saved where it stopped, not as complete
            self.save(trainer)


class ConfigWriter(L.Callback):
    """``config.yaml`` of a run. A resumed run's (with its overrides) replaces the old one only once training has
    started from the checkpoint (a resume that fails leaves the run as it was), and each resume appends a line to
    ``resumes.jsonl``: when, from which checkpoint and step, and which keys changed (old and new values)."""

    def __init__(self, out: Path, cfg: Any, resumed_from: Path | None = None) -> None:
        self.out, self.cfg, self.resumed_from = Path(out), cfg, resumed_from

    def write(self) -> None:
        from detkit.config.loader import to_yaml
        from detkit.utils.io import write_text

        write_text(to_yaml(self.cfg), self.out / "config.yaml")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.resumed_from is None or not trainer.is_global_zero:
            return
        import datetime
        import json

        from omegaconf import OmegaConf

        old_path = self.out / "config.yaml"
        old = OmegaConf.to_container(OmegaConf.load(old_path)) if old_path.is_file() else {}
        new = OmegaConf.to_container(self.cfg, resolve=True)
        changed = {k: [a, b] for k, (a, b) in _diff(old, new).items()}
        self.write()
        line = {"time": datetime.datetime.now().isoformat(timespec="seconds"), "checkpoint": str(self.resumed_from),
                "step": trainer.global_step, "changed": changed}
        with open(self.out / "resumes.jsonl", "a") as f:
            f.write(json.dumps(line, default=str) + "\n")
        if changed:
            log.info("resumed with changed settings: %s", ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in
                                                                     changed.items()))


def _diff(old: Any, new: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: dict[str, tuple[Any, Any]] = {}
        for key in sorted(set(old) | set(new), key=str):
            out.update(_diff(old.get(key), new.get(key), f"{prefix}{key}."))
        return out
    return {} if old == new else {prefix[:-1]: (old, new)}
