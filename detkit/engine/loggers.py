"""Loggers users already use: ``logging.loggers: [tensorboard, csv, mlflow, wandb]`` (Lightning's loggers).

Several at once; each one's settings under ``logging.<name>`` are its Lightning class's arguments (e.g.
``logging.mlflow.tracking_uri=file:/path``, ``logging.wandb.offline=true``), checked against that class. Every
logger gets the run name (``logging.run_name``, default the config's ``name``), the tags (``logging.tags``), the
resolved config (as hyper-parameters) and, at the end of training, the final validation metrics. MLflow and W&B are
optional: ``pip install 'detkit[mlflow]'`` / ``'detkit[wandb]'``; without them the config is one line naming the
extra. TensorBoard writes ``RUN/tensorboard/``, CSV ``RUN/csv/`` (a new ``restart-N/`` per resume), MLflow and W&B
their own stores (defaults: ``RUN/mlruns``, MLflow's file store, which MLflow 3 keeps behind
``MLFLOW_ALLOW_FILE_STORE=true``, set for it; ``RUN/wandb``, W&B offline unless ``logging.wandb.offline=false``).
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from detkit.errors import ConfigError

LOGGERS = ("tensorboard", "csv", "mlflow", "wandb")
EXTRAS = {"mlflow": "mlflow", "wandb": "wandb"}  # logger -> the package (and detkit extra) it needs


def _csv_version(out: Path) -> str:
    """A fresh CSV log folder per (re)start: Lightning's CSVLogger would overwrite an existing one."""
    if not (out / "csv" / "metrics.csv").exists():
        return ""
    n = 1
    while (out / "csv" / f"restart-{n}").exists():
        n += 1
    return f"restart-{n}"


def _settings(cfg: DictConfig, name: str) -> dict[str, Any]:
    node = cfg.logging.get(name)
    return dict(OmegaConf.to_container(node, resolve=True)) if node is not None else {}


def _checked(cls: type, settings: dict[str, Any], name: str, passed_to: Any = None) -> dict[str, Any]:
    """``settings`` when every key is an argument of ``cls`` (or of ``passed_to``, which receives its
    ``**kwargs``: ``wandb.init`` for the WandbLogger)."""
    accepted = set(inspect.signature(cls.__init__).parameters)
    if passed_to is not None:
        accepted |= set(inspect.signature(passed_to).parameters)
    for key in settings:
        if key not in accepted:
            where = f"Lightning's {cls.__name__}" + (f" or {passed_to.__module__}.{passed_to.__name__}"
                                                      if passed_to is not None else "")
            raise ConfigError(f"config key 'logging.{name}.{key}' is not an argument of {where}")
    return settings


def build_loggers(cfg: DictConfig, out: Path) -> list:
    """The Lightning loggers of ``logging.loggers`` for the run directory ``out``."""
    from lightning.pytorch import loggers as pl

    names = list(cfg.logging.loggers)
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise ConfigError(f"logging.loggers: unknown {unknown[0]!r} (known: {', '.join(LOGGERS)})")
    run_name = cfg.logging.run_name or str(cfg.name)
    tags = {str(t): "" for t in cfg.logging.tags} if OmegaConf.is_list(cfg.logging.tags) else dict(cfg.logging.tags)
    made = []
    for name in dict.fromkeys(names):
        if name in EXTRAS and importlib.util.find_spec(EXTRAS[name]) is None:
            raise ConfigError(f"logging.loggers: {name} needs the {EXTRAS[name]} package: pip install "
                              f"'detkit[{name}]'")
        settings = _settings(cfg, name)
        if name == "tensorboard":
            made.append(pl.TensorBoardLogger(**_checked(pl.TensorBoardLogger, {
                "save_dir": str(out), "name": "tensorboard", "version": "", **settings}, name)))
        elif name == "csv":
            made.append(pl.CSVLogger(**_checked(pl.CSVLogger, {
                "save_dir": str(out), "name": "csv", "version": _csv_version(out), **settings}, name)))
        elif name == "mlflow":
            args = _checked(pl.MLFlowLogger, {
                "experiment_name": str(cfg.name), "run_name": run_name, "tags": tags or None,
                "tracking_uri": f"file:{(out / 'mlruns').resolve()}", **settings}, name)
            if str(args.get("tracking_uri") or "").startswith("file:"):
                # MLflow 3 keeps its file store (the no-server default here) behind this switch
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            made.append(pl.MLFlowLogger(**args))
        else:
            import wandb

            made.append(pl.WandbLogger(**_checked(pl.WandbLogger, {
                "name": run_name, "project": str(cfg.name), "save_dir": str(out), "offline": True,
                "tags": list(tags) or None, **settings}, name, passed_to=wandb.init)))
    return made


def log_run(loggers: list, cfg: DictConfig, metrics: dict[str, Any] | None, step: int) -> None:
    """The resolved config as hyper-parameters and the final validation's numbers, to every logger."""
    flat = {k: v for k, v in (metrics or {}).items() if isinstance(v, int | float) and not isinstance(v, bool)}
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        if flat:
            logger.log_metrics({f"final/{k}": float(v) for k, v in flat.items()}, step=step)
        logger.save()
