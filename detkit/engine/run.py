"""Runs: ``train`` (fit from a config, or resume), ``evaluate`` (a run dir or config + checkpoint).

A run directory holds ``config.yaml`` (resolved), ``checkpoints/last.ckpt`` and ``checkpoints/best.ckpt`` (by
``eval.main_metric``), ``metrics.json`` (the last validation), ``tensorboard/`` and ``csv/metrics.csv`` logs,
and, after ``detkit eval``, ``pr_curves/`` (detectors) or ``confusion_matrix.png`` (segmenters).
"""

from __future__ import annotations

import copy
import datetime
import inspect
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from detkit.config import load_config
from detkit.data.formats import check_data_config
from detkit.data.shapes import ensure_shapes
from detkit.engine.budget import Budget
from detkit.engine.callbacks import ConfigWriter, Interrupted, LastCheckpoint, PartsSummary
from detkit.engine.loggers import build_loggers, log_run
from detkit.engine.optim import no_mosaic_epoch
from detkit.errors import ConfigError, TrainingError
from detkit.evaluation.metrics import check_eval_config
from detkit.heads.registry import head_traits
from detkit.models.build import build_model, check_model_config
from detkit.models.load import load_weights, read_checkpoint, resolve_checkpoint, run_dir_of
from detkit.utils.io import write_json

log = logging.getLogger(__name__)
RUN_DIR_ENV = "DETKIT_RUN_DIR"  # set by the launching process, so DDP workers write into the same run directory
DETKIT_TRAINER_KEYS = {"max_epochs", "gradient_clip_val", "callbacks", "logger", "plugins", "default_root_dir",
                       "enable_checkpointing", "use_distributed_sampler"}


# ------------------------------------------------------------------------------------------------ pieces
def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """``trainer.*`` as Lightning Trainer arguments (unset optional values left to Lightning's defaults)."""
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items() if v is not None}
    accepted = inspect.signature(L.Trainer.__init__).parameters
    for key in kwargs:
        if key not in accepted or key in DETKIT_TRAINER_KEYS:
            raise ConfigError(f"config key 'trainer.{key}' is not a Lightning Trainer argument detkit passes on")
    if str(kwargs.get("precision")) in ("32", "64", "16"):
        kwargs["precision"] = int(kwargs["precision"])
    if str(kwargs.get("precision")) == "16-mixed" and not torch.cuda.is_available() and \
            kwargs.get("accelerator") in ("auto", "cpu"):
        raise ConfigError("trainer.precision = 16-mixed needs a GPU; on the CPU use bf16-mixed or 32")
    return kwargs


def build_datamodule(cfg: DictConfig):
    """The data module of ``cfg`` (the shapes set made first when ``data.generate: shapes`` asks for it), decoding
    instance masks when ``data.with_masks`` says so or, unset, when the head's traits ask for them."""
    from detkit.data.datamodule import DetDataModule

    ensure_shapes(cfg.data)
    with_masks = cfg.data.with_masks if cfg.data.with_masks is not None else head_traits(cfg.model.head.name).masks
    return DetDataModule(cfg, with_masks=with_masks)


def build_trainer(cfg: DictConfig, out: Path, *, fit: bool = True, callbacks: list | None = None,
                  max_time: float | None = None) -> L.Trainer:
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint

    from detkit.engine.callbacks import AtomicCheckpointIO, MetricsWriter

    kwargs = trainer_kwargs(cfg)
    if not fit:
        for key in ("max_steps", "limit_train_batches", "val_check_interval", "check_val_every_n_epoch",
                    "accumulate_grad_batches", "num_sanity_val_steps", "max_time", "overfit_batches"):
            kwargs.pop(key, None)
        quiet_lightning()
        return L.Trainer(logger=False, enable_checkpointing=False, default_root_dir=str(out),
                         callbacks=list(callbacks or []), use_distributed_sampler=False, **kwargs)
    main = f"val/{cfg.eval.main_metric}"
    has_val = cfg.data.val.format is not None
    cbs: list = [
        # last.ckpt at every epoch end, every so many steps / minutes, and when training stops (see LastCheckpoint)
        LastCheckpoint(out / "checkpoints" / "last.ckpt", every_n_steps=cfg.train.checkpoint_every_n_steps,
                       every_minutes=cfg.train.checkpoint_every_minutes),
        LearningRateMonitor("step"),
        # (considered after each validation only: a run that stops before its first one gets its best.ckpt from
        # final_validation)
        *([ModelCheckpoint(dirpath=out / "checkpoints", filename="best", monitor=main, mode="max", save_top_k=1,
                           auto_insert_metric_name=False, enable_version_counter=False,
                           save_on_train_epoch_end=False)] if has_val else []),
        MetricsWriter(out / "metrics.json"),
    ]
    if cfg.train.ema.enabled:
        from lightning.pytorch.callbacks import EMAWeightAveraging

        cbs.append(EMAWeightAveraging(decay=float(cfg.train.ema.decay),
                                      update_starting_at_step=int(cfg.train.ema.start_step)))
    if cfg.train.early_stopping_patience is not None:
        if not has_val:
            raise ConfigError("train.early_stopping_patience needs a validation set (data.val)")
        cbs.append(EarlyStopping(monitor=main, mode="max", patience=int(cfg.train.early_stopping_patience)))
    if kwargs.pop("enable_model_summary", True):
        cbs.append(PartsSummary())
    cbs += list(callbacks or [])
    loggers = build_loggers(cfg, out)
    max_epochs = int(cfg.train.epochs)
    if cfg.train.total_steps:  # a run of so many steps (a budget's plan): the epochs follow from them
        max_epochs = -1
        if int(kwargs.get("max_steps", -1)) < 0:
            kwargs["max_steps"] = int(cfg.train.total_steps)
    if max_time is not None:
        kwargs["max_time"] = datetime.timedelta(seconds=max_time)
    quiet_lightning()
    return L.Trainer(max_epochs=max_epochs, gradient_clip_val=cfg.train.grad_clip, callbacks=cbs,
                     logger=loggers, plugins=[AtomicCheckpointIO()], default_root_dir=str(out),
                     enable_model_summary=False, use_distributed_sampler=False, **kwargs)
    # (the data module shards and resumes its samplers)


LIGHTNING_NOISE = (  # Lightning's advice that does not apply to detkit runs, as regular expressions
    r".*is smaller than the logging interval",  # a short epoch: detkit logs by step, whatever the epoch's length
    r".*isinstance\(treespec, LeafSpec\)",  # torch's deprecation inside Lightning
    # the evaluator counts each image once (sampler padding de-duplicated by image id): the advice does not apply
    r"Using `DistributedSampler` with the dataloaders",
)


def quiet_lightning() -> None:
    """Lightning's warnings that a detkit user cannot act on, and its advertising, left out (CLI and Python API)."""
    import warnings

    for pattern in LIGHTNING_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(getattr(f, "detkit", False) for f in rank_zero.filters):
        def no_tips(record: logging.LogRecord) -> bool:
            return "litlogger" not in record.getMessage()

        no_tips.detkit = True  # type: ignore[attr-defined]
        rank_zero.addFilter(no_tips)


def check_config(cfg: DictConfig):
    """Everything about ``cfg`` that can be checked before data is read: part names against their registries (dataset
    formats and their options included), ``num_classes`` and ``eval.*`` against the head's traits, and every part's
    settings (the model is built once on the meta device). Returns the head's traits."""
    traits = check_model_config(cfg)
    check_data_config(cfg.data)
    check_eval_config(cfg.eval, traits, cfg.model.head.name)
    if cfg.eval.get("tta"):  # test-time augmentation settings (detkit eval --tta), checked before anything runs
        from detkit.inference.merge import check_merge
        from detkit.inference.tta import TTA

        tta = TTA.of(dict(cfg.eval.tta))
        check_merge(tta.method(traits.masks), "iou", tta.iou, masks=traits.masks, what="eval.tta.merge")
    dry = copy.deepcopy(cfg)
    dry.model.backbone.pretrained = None
    with torch.device("meta"):  # every part's settings checked by building it, at no cost (no memory, no weights)
        build_model(dry)
    return traits


# ----------------------------------------------------------------------------------------------- train
def train(cfg: DictConfig | str | Path | None, overrides: list[str] | tuple[str, ...] = (), *,
          resume: str | Path | None = None,
          callbacks: list | None = None) -> Path:
    """Train the model of ``cfg`` (a config or a config path); returns the run directory.

    ``resume``: a run directory or checkpoint; model, optimizer, scheduler, EMA, epoch, step and the position in
    the epoch are restored and the run continues in that directory exactly as if it had not stopped. The config
    (with any overrides) replaces the run's ``config.yaml`` only once the resumed training has started; the change
    is recorded in ``resumes.jsonl``. A Ctrl-C or SIGTERM saves ``last.ckpt`` and raises :class:`Interrupted`.
    """
    from detkit.engine.module import DetectionModule

    started = time.perf_counter()
    ckpt = resolve_checkpoint(resume, "last") if resume is not None else None
    cfg, out = run_config(cfg, overrides, ckpt)
    os.environ[RUN_DIR_ENV] = str(out)  # DDP workers re-run the command: they must find the same directory
    budget = Budget.of(cfg, started, resumed_from=ckpt)
    try:
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)
        dm = build_datamodule(cfg)
        dm.setup("fit")
        if budget is not None:
            budget.plan(dm, trial=lambda short, cbs: fit_throwaway(short, dm, cbs))
        train_set = dm.dataset("train")
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)  # the same initial weights, planned or not
        module = DetectionModule(cfg, classes=dm.classes, cat_ids=list(train_set.cat_ids) if train_set else None)
        if cfg.model.weights and ckpt is None:  # a trained detector to start from (not when resuming)
            start_from_weights(module, cfg, out)
        dm.no_mosaic_from = no_mosaic_epoch(cfg, len(dm.train_dataloader()))
        writer = ConfigWriter(out, cfg, resumed_from=ckpt)

        def replanned(trainer: L.Trainer) -> None:  # the budget changed train.total_steps
            dm.no_mosaic_from = no_mosaic_epoch(cfg, len(dm.train_dataloader()))
            if trainer.is_global_zero:
                writer.write()

        extra = [writer, *(budget.callbacks(replanned) if budget else []), *(callbacks or [])]
        trainer = build_trainer(cfg, out, callbacks=extra, max_time=budget.max_time if budget else None)
        if trainer.is_global_zero and ckpt is None:
            writer.write()
        fit_or_explain(trainer, module, dm, ckpt)
        last = next(c for c in trainer.callbacks if isinstance(c, LastCheckpoint))
        if last.stopped_by is not None:
            name = signal.Signals(last.stopped_by).name
            raise Interrupted(f"{name}: training stopped at step {trainer.global_step} ({last.path} saved); "
                              f"continue with: detkit train --resume {out}", last.stopped_by)
        if module.evaluator is not None and module.validated_step != trainer.global_step and not trainer.interrupted:
            final_validation(trainer, module, dm, out)
        if trainer.is_global_zero:
            log_run(trainer.loggers, cfg, module.metrics, trainer.global_step)
            if budget is not None:
                budget.record(out, trainer.global_step)
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
    if module.skipped:
        log.warning("%d images could not be read and were skipped (see the warnings above)", module.skipped)
    return out


def run_config(cfg: DictConfig | str | Path | None, overrides: list[str] | tuple[str, ...], ckpt: Path | None
               ) -> tuple[DictConfig, Path]:
    """The checked config of a run and its directory. Resuming (``ckpt``), the checkpoint is read first (one that
    would run code is refused before anything else is looked at), the run's ``config.yaml`` is the config unless one
    is given, and the run's directory is kept."""
    run = None
    if ckpt is not None:
        read_checkpoint(ckpt)
        run = run_dir_of(ckpt)
    if cfg is None and ckpt is not None:
        if run is None or not (run / "config.yaml").is_file():
            raise ConfigError(f"{ckpt}: give the CONFIG to resume with (no run directory config.yaml next to it)")
        cfg = run / "config.yaml"
    if not isinstance(cfg, DictConfig):
        cfg = load_config(cfg, list(overrides))
    check_config(cfg)
    out = Path(os.environ.get(RUN_DIR_ENV) or run or cfg.output_dir)
    cfg.output_dir = str(out)
    return cfg, out


def fit_throwaway(cfg: DictConfig, dm, callbacks: list) -> None:
    """Fit ``cfg`` on ``dm`` in a temporary run directory that is removed afterwards (a time budget's
    calibration)."""
    import tempfile

    from detkit.engine.module import DetectionModule

    with tempfile.TemporaryDirectory(prefix="detkit-budget-") as tmp:
        trainer = build_trainer(cfg, Path(tmp), callbacks=callbacks)
        trainer.fit(DetectionModule(cfg, classes=dm.classes), datamodule=dm)


def start_from_weights(module, cfg: DictConfig, out: Path) -> None:
    """``model.weights`` into the module's model, with ``weights_report.json`` in the run directory."""
    from detkit.models.weights import load_weights

    classes = list(module.classes) or [str(i) for i in range(1, int(cfg.model.num_classes) + 1)]
    report = load_weights(module.model, str(cfg.model.weights), classes, dict(cfg.model.weights_classes or {}))
    if module.global_rank == 0:
        write_json(report.as_dict(), out / "weights_report.json")


PEER_FAILURE = ("closed by peer", "Connection reset", "Broken pipe", "Timed out", "timed out", "NCCL error",
                "DistBackendError", "DistNetworkError")


def fit_or_explain(trainer: L.Trainer, module, dm, ckpt: Path | None) -> None:
    """``trainer.fit``; under DDP a process whose collective fails because another process died stops with one
    line saying so (the other process prints the cause) instead of a transport traceback."""
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt) if ckpt is not None else None)
    except RuntimeError as e:
        text = f"{type(e).__name__}: {e}"
        if trainer.world_size > 1 and any(s in text for s in PEER_FAILURE):
            raise TrainingError(f"process {trainer.global_rank}: another process of this run stopped (its error says "
                                f"why); stopping too") from None
        raise


def final_validation(trainer: L.Trainer, module, dm, out: Path) -> None:
    """Validate the final weights when the last epoch did not (``check_val_every_n_epoch``, ``max_steps``), so
    ``metrics.json`` describes them; they become ``best.ckpt`` when they beat the best validated so far."""
    trainer.validate(module, datamodule=dm, verbose=False)
    best = next((c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)), None)
    score = module.metrics.get(module.cfg.eval.main_metric)
    if best is not None and best.best_model_score is None and trainer.is_global_zero:
        log.info("no validation ran before training stopped (step %d): best.ckpt holds the final weights",
                 trainer.global_step)
    if best is not None and score is not None and (best.best_model_score is None or score > best.best_model_score):
        trainer.save_checkpoint(out / "checkpoints" / "best.ckpt", weights_only=False)


# -------------------------------------------------------------------------------------------- evaluate
def load_checkpoint(path: str | Path, cfg: DictConfig | None = None, map_location: str = "cpu"):
    """A :class:`DetectionModule` with the weights of ``path`` (its config from the checkpoint unless given); for
    evaluation. (Prediction and export need no Lightning: :func:`detkit.models.load_model`.)"""
    from detkit.engine.module import DetectionModule

    ckpt = read_checkpoint(path, map_location)
    hp = ckpt["hyper_parameters"]
    module = DetectionModule(cfg if cfg is not None else hp["config"], classes=hp.get("classes"),
                             cat_ids=hp.get("cat_ids"))
    load_weights(module, ckpt["state_dict"], path)
    return module


def analyse(evaluator, classes: list[str], eval_cfg: Any, folder: Path) -> dict[str, Any]:
    """The error analysis of a detector's validation (:mod:`detkit.evaluation.analysis`): the confusion matrix with
    background (CSV, PNG) and the F1 curves (PNG) in ``folder``; the best score threshold per class and the AP lost
    to each kind of error, returned for ``metrics.json``."""
    from detkit.evaluation import analysis as A

    gt, results = evaluator.gt, evaluator.results()
    names = [c["name"] for c in sorted(gt["categories"], key=lambda c: c["id"])] or classes
    cm = A.confusion_matrix(gt, results, len(names), eval_cfg.confusion_iou, eval_cfg.confusion_score)
    A.write_confusion(cm, names, folder, eval_cfg.confusion_iou, eval_cfg.confusion_score)
    curves = A.threshold_curves(gt, results, names)
    A.write_threshold_plot(curves, folder / "f1_vs_threshold.png")
    return {"best_score_threshold": {n: c["best_threshold"] for n, c in curves.items()},
            "best_f1": {n: c["best_f1"] for n, c in curves.items()},
            "errors": A.error_breakdown(gt, results, len(names))}


def evaluation_outputs(run: Path, split: str, out: str | Path | None = None, tta: bool = False) -> dict[str, Path]:
    """Where an evaluation writes: ``metrics``, ``predictions`` (COCO results), ``pr_curves`` (a folder) and
    ``confusion_matrix`` (a PNG). The validation split goes to the run's own names; another split to names that
    carry it (``metrics_test.json``, ...), so a run's validation results are never replaced; ``out`` (a metrics
    file) puts everything beside it instead (``<stem>_predictions.json``, ...). With test-time augmentation the
    names end in ``_tta`` (``metrics_tta.json``): the plain evaluation's files stay."""
    if out is not None:
        out = Path(out)
        base, tag = out.parent, out.stem
        return {"metrics": out, "predictions": base / f"{tag}_predictions.json", "pr_curves": base / f"{tag}_pr_curves",
                "confusion_matrix": base / f"{tag}_confusion_matrix.png", "analysis": base / f"{tag}_analysis"}
    suffix = ("" if split == "val" else f"_{split}") + ("_tta" if tta else "")
    return {"metrics": run / f"metrics{suffix}.json", "predictions": run / f"predictions{suffix}.json",
            "pr_curves": run / f"pr_curves{suffix}", "confusion_matrix": run / f"confusion_matrix{suffix}.png",
            "analysis": run / f"analysis{suffix}"}


def evaluate(target: str | Path, checkpoint: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
             split: str = "val", plots: bool = True, out: str | Path | None = None,
             tta: bool = False) -> tuple[dict[str, Any], Path]:
    """Validate a run directory (its best checkpoint) or a config + ``checkpoint``; returns (metrics, the run
    directory; the files written are :func:`evaluation_outputs` of it).

    Writes the metrics, the scored detections as COCO results with the dataset's own ids, and PR curves
    (segmenters: the confusion matrix) into the run directory (or the config's ``output_dir``), under names that
    carry the split unless it is ``val``, or beside ``out``. ``tta``: the model's predictions are merged over the
    flips and scales of ``eval.tta`` (:mod:`detkit.inference.tta`), scored by the same evaluator.
    """
    from detkit.engine.callbacks import write_metrics

    target = Path(target)
    if target.is_dir():
        if not (target / "config.yaml").is_file():
            raise ConfigError(f"{target}: not a run directory (no config.yaml)")
        cfg = load_config(target / "config.yaml", list(overrides))
        ckpt = Path(checkpoint) if checkpoint else resolve_checkpoint(target, "best")
        run = target
    else:
        if checkpoint is None:
            raise ConfigError(f"{target}: evaluating a config needs --checkpoint (or give a run directory)")
        cfg = load_config(target, list(overrides))
        ckpt, run = Path(checkpoint), Path(os.environ.get(RUN_DIR_ENV) or cfg.output_dir)
    check_config(cfg)
    if split != "val":
        if cfg.data[split].format is None:
            raise ConfigError(f"data.{split} is not configured: cannot evaluate on it")
        cfg.data.val = cfg.data[split]
    files = evaluation_outputs(run, split, out, tta)
    os.environ[RUN_DIR_ENV] = str(run)
    try:
        module = load_checkpoint(resolve_checkpoint(ckpt, "best"), cfg)
        if tta:
            from detkit.inference.tta import TTA, TTAPredict

            module.predict_fn = TTAPredict(module.model, TTA.of(dict(cfg.eval.tta)), int(cfg.data.size_divisor))
        dm = build_datamodule(cfg)
        trainer = build_trainer(cfg, run, fit=False)
        trainer.validate(module, datamodule=dm, verbose=False)
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
    metrics = module.metrics
    if trainer.is_global_zero:
        evaluator = module.evaluator
        if evaluator is not None and hasattr(evaluator, "results") and cfg.eval.analysis:
            metrics.update(analyse(evaluator, list(module.classes), cfg.eval, files["analysis"]))
        write_metrics(metrics, files["metrics"])
        if evaluator is not None and hasattr(evaluator, "results"):
            from detkit.evaluation import results_to_dataset_ids

            # the scored detections, with the dataset's own image and category ids (COCO results format)
            results = results_to_dataset_ids(evaluator.results(), list(dm.dataset("val").cat_ids))
            write_json(results, files["predictions"], indent=None)
        if evaluator is not None and plots:
            if hasattr(evaluator, "plot_pr_curves"):
                evaluator.plot_pr_curves(files["pr_curves"])
            else:
                evaluator.plot_confusion_matrix(files["confusion_matrix"])
    return metrics, run
