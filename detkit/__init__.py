"""detkit: object detection and segmentation on swappable backbones."""

import os

__version__ = "0.1.0"

# albumentations asks PyPI for a newer version on import: not on offline machines, not on every run
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from detkit.config import load_config
from detkit.errors import ConfigError, DetkitError, PretrainedError


def build_backbone(*args, **kwargs):
    """See :func:`detkit.backbones.build_backbone` (imported lazily: torch is heavy)."""
    from detkit.backbones import build_backbone as _build

    return _build(*args, **kwargs)


def build_model(cfg):
    """See :func:`detkit.models.build_model`: the model of ``cfg.model``."""
    from detkit.models import build_model as _build

    return _build(cfg)


def load_model(path, config=None, device="cpu"):
    """See :func:`detkit.models.load_model`: the trained model of a run directory or checkpoint (no Lightning)."""
    from detkit.models import load_model as _load

    return _load(path, config, device)


def train(cfg, overrides=(), *, resume=None, callbacks=None):
    """See :func:`detkit.engine.train`: train from a config (or config path); returns the run directory."""
    from detkit.engine import train as _train

    return _train(cfg, overrides, resume=resume, callbacks=callbacks)


def evaluate(target, checkpoint=None, overrides=(), split="val", out=None, tta=False):
    """See :func:`detkit.engine.evaluate`: (metrics, run directory) of a run directory or config; ``split`` other
    than val writes ``metrics_<split>.json`` etc., ``out`` a metrics file of its own; ``tta`` merges the flipped
    and scaled passes of ``eval.tta`` (``metrics_tta.json``)."""
    from detkit.engine import evaluate as _evaluate

    return _evaluate(target, checkpoint, overrides, split=split, out=out, tta=tta)


__all__ = ["ConfigError", "DetkitError", "PretrainedError", "__version__", "build_backbone", "build_model",
           "evaluate", "load_config", "load_model", "train"]
