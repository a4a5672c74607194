"""The training engine (Lightning): the LightningModule, optimizers/schedules, callbacks and runs."""

from detkit.engine.run import evaluate, load_checkpoint, train

__all__ = ["evaluate", "load_checkpoint", "train"]
