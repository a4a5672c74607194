"""``load_model(path)``: a trained model from a run directory or checkpoint, with no training machinery.

A detkit checkpoint (written by the engine) holds ``hyper_parameters`` (``config``: the resolved config as plain
containers, ``classes``, ``cat_ids``) and ``state_dict`` (the model's weights under ``model.``; with EMA the
averaged ones). It is read as data: ``torch.load(weights_only=True)`` accepts tensors and plain containers only,
so a file that would run code when unpickled is refused with one line naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from detkit.config.loader import validate
from detkit.errors import ConfigError
from detkit.models.base import Model
from detkit.models.build import build_model
from detkit.utils.io import torch_load_data

STATE_PREFIX = "model."  # the engine's LightningModule keeps the model as its `model` attribute


def resolve_checkpoint(target: str | Path, prefer: str = "last") -> Path:
    """A checkpoint file, or ``RUN_DIR/checkpoints/<prefer>.ckpt`` (falling back to the other one)."""
    path = Path(target)
    if path.is_dir():
        for name in (prefer, "best" if prefer == "last" else "last"):
            ckpt = path / "checkpoints" / f"{name}.ckpt"
            if ckpt.is_file():
                return ckpt
        raise ConfigError(f"{path}: no checkpoints/{prefer}.ckpt in this run directory")
    if not path.is_file():
        raise ConfigError(f"{path}: no such run directory or checkpoint file")
    return path


def run_dir_of(ckpt: Path) -> Path | None:
    """The run directory of ``RUN/checkpoints/x.ckpt`` (``None`` for a checkpoint elsewhere)."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A detkit checkpoint as a dict, read as data (``weights_only=True``); one :class:`ConfigError` line for a
    file that is not one, or that holds anything but tensors and plain containers."""
    path = Path(path)
    try:
        ckpt = torch_load_data(path, map_location)
    except ValueError as e:  # UnsafeFile included: one line naming the file
        msg = str(e).replace("not a readable torch file", "not a readable checkpoint")
        raise ConfigError(msg) from None
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hp, dict) or "config" not in hp or "state_dict" not in ckpt:
        raise ConfigError(f"{path}: not a detkit checkpoint (no config/state_dict inside)")
    return ckpt


def model_state(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model's weights of a checkpoint, without the engine's ``model.`` prefix."""
    n = len(STATE_PREFIX)
    return {k[n:]: v for k, v in ckpt["state_dict"].items() if k.startswith(STATE_PREFIX)}


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """``model.load_state_dict(state)`` (strict) with one line naming the first mismatch."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        raise ConfigError(f"{source}: the checkpoint does not fit the model of this config "
                          f"({lines[0][:200] if lines else 'different keys or shapes'}); model.* overrides must "
                          f"match the run's") from None


def load_model(path: str | Path, config: Any = None, device: str | torch.device = "cpu") -> Model:
    """The model of a run directory (its ``best.ckpt``, else ``last.ckpt``) or checkpoint file, in eval mode, on
    ``device``, with ``classes``, ``cat_ids`` and ``config`` set. ``config`` (a resolved config) replaces the one
    stored in the checkpoint, e.g. with other thresholds; its ``model.*`` must build the same network."""
    ckpt_path = resolve_checkpoint(path, "best")
    ckpt = read_checkpoint(ckpt_path)
    hp = ckpt["hyper_parameters"]
    cfg = config if config is not None else validate(hp["config"])
    model = build_model(cfg)
    load_weights(model, model_state(ckpt), ckpt_path)
    model.classes = [str(c) for c in hp.get("classes") or []]
    model.cat_ids = list(hp.get("cat_ids") or [])
    return model.eval().to(device)
