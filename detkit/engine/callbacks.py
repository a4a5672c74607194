"""Lightning plugins and callbacks of detkit runs: atomic checkpoint files and ``metrics.json``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.plugins.io import TorchCheckpointIO

from detkit.utils.io import write_json


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes ``<file>.tmp`` then renames it over ``<file>``: a crash mid-save never leaves a broken checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)


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
