"""The LightningModule: one training/validation step for every model built by ``build_model``.

Batches arrive as uint8 images (see :class:`~detkit.data.datamodule.DetDataModule`); the model normalises them
itself (:meth:`detkit.models.Model.losses` / :meth:`~detkit.models.Model.predict`). Validation predictions, in
original image pixels, go to the evaluator of the head's task (:func:`detkit.evaluation.build_evaluator`) over the
whole validation set, gathered across processes.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from detkit.config.loader import validate
from detkit.config.schema import Config
from detkit.data.samplers import epoch_seed, seed_everything
from detkit.engine.optim import build_optimizer, build_scheduler, steps_per_epoch
from detkit.errors import ConfigError, DataError, TrainingError
from detkit.evaluation.build import build_evaluator
from detkit.models import build_model
from detkit.utils.memory_format import to_channels_last

log = logging.getLogger(__name__)


class DetectionModule(L.LightningModule):
    """``config``: the resolved config (a plain dict or DictConfig); ``classes``: names of labels 1..K;
    ``cat_ids``: their ids in the training set's own annotations (to write predictions back)."""

    def __init__(self, config: dict | DictConfig, classes: list[str] | None = None,
                 cat_ids: list[Any] | None = None) -> None:
        super().__init__()
        typed = isinstance(config, DictConfig) and OmegaConf.get_type(config) is Config
        container = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else config
        cat_ids = [c.item() if hasattr(c, "item") else c for c in (cat_ids or [])]
        self.save_hyperparameters({"config": container, "classes": list(classes or []), "cat_ids": cat_ids})
        self.cfg = config if typed else validate(container)  # a loaded config is not validated twice
        self.classes = list(classes or [])
        self.model = build_model(self.cfg)
        self.model.classes, self.model.cat_ids = self.classes, cat_ids
        self.evaluator = None
        self.metrics: dict[str, Any] = {}
        self.validated_step = -1  # the global step of the last full validation
        self.skipped = 0
        self.predict_fn = None  # validation predictions other than model.predict (detkit eval --tta)

    @property
    def task(self) -> str:
        return self.model.task

    # ------------------------------------------------------------------------------------------ setup
    def attach_evaluator(self, dataset) -> None:
        """Score validation predictions against ``dataset``'s ground truth (all its images)."""
        self.check_task(dataset, "data.val")
        self.evaluator = build_evaluator(dataset, self.cfg.eval, self.model.traits, int(self.cfg.model.num_classes))

    def check_task(self, dataset, key: str) -> None:
        """The model's classes and task fit ``dataset``'s (a semantic model needs label maps, a detector boxes): one
        line naming the mismatch otherwise."""
        task = getattr(dataset, "task", "detection")
        head = self.cfg.model.head.name
        k = int(self.cfg.model.num_classes)
        if len(dataset.classes) != k:
            names = ", ".join(map(str, dataset.classes[:5])) + (", ..." if len(dataset.classes) > 5 else "")
            raise ConfigError(f"model.num_classes = {k}, and {key} ({dataset.name}) has {len(dataset.classes)} "
                              f"classes ({names}): set model.num_classes={len(dataset.classes)}")
        if self.model.traits.semantic and task != "semantic":
            raise DataError(f"model.head.name = {head} needs semantic label maps, and {key} ({dataset.name}) is a "
                            f"{task} dataset: use format masks, or a detection head")
        if not self.model.traits.semantic and task == "semantic":
            raise DataError(f"model.head.name = {head} needs boxes, and {key} ({dataset.name}) holds semantic label "
                            f"maps only: use model.head.name=unet (or a detection dataset)")

    def on_fit_start(self) -> None:
        if self.cfg.train.channels_last:
            to_channels_last(self.model)

    def layout(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch's images in the model's memory format (``train.channels_last``)."""
        if self.cfg.train.channels_last and batch.get("images") is not None and batch["images"].ndim == 4:
            batch["images"] = batch["images"].contiguous(memory_format=torch.channels_last)
        return batch

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self.trainer is not None else None
        if stage == "fit" and dm is not None and dm.dataset("train") is not None:
            self.check_task(dm.dataset("train"), "data.train")
        if stage in ("fit", "validate") and self.evaluator is None and dm is not None:
            ds = dm.dataset("val")
            if ds is not None:
                self.attach_evaluator(ds)

    # --------------------------------------------------------------------------------------- training
    # Every step's randomness is a function of (seed, epoch, position): the data order and the augmentations are
    # seeded by the data module per epoch and per sample, the model's own (RPN/RoI sampling, dropout) at every step
    # here, so a run resumed from any checkpoint continues exactly as the uninterrupted run would have.
    def on_train_epoch_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if hasattr(dm, "set_epoch"):
            dm.set_epoch(self.current_epoch)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        seed_everything(epoch_seed(self.cfg.seed, self.current_epoch, self.global_rank, batch_idx))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self._count_skipped(batch)
        losses = self.model.losses(self.layout(batch))
        loss = sum(losses.values())
        self.check_finite(loss, losses)
        n = len(batch["targets"])
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=n)
        return loss

    def check_finite(self, loss: torch.Tensor, losses: dict[str, torch.Tensor]) -> None:
        """A NaN/inf loss stops training with one line. Under DDP every process learns of it at the same step
        (one small all-reduce) and stops with the same line, instead of the others waiting on a collective."""
        bad = not bool(torch.isfinite(loss))
        trainer = self._trainer
        world = trainer.world_size if trainer is not None else 1
        if world > 1:
            flags = torch.zeros(world, device=loss.device)
            flags[self.global_rank] = float(bad)
            flags = self.trainer.strategy.reduce(flags, reduce_op="sum")
            bad_ranks = [int(r) for r in torch.nonzero(flags).flatten()]
        else:
            bad_ranks = [0] if bad else []
        if not bad_ranks:
            return
        where = f" on process {', '.join(map(str, bad_ranks))}" if world > 1 else ""
        values = f" ({', '.join(f'{k}={v.item():.4g}' for k, v in losses.items())})" if bad else ""
        raise TrainingError(f"loss is not finite{where} at epoch {self.current_epoch}, step {self.global_step}"
                            f"{values}; training stopped, checkpoints keep the last good weights. Try a lower "
                            f"train.lr, longer train.warmup_iters or train.grad_clip")

    def _count_skipped(self, batch: dict[str, Any]) -> None:
        if batch.get("skipped"):
            self.skipped += len(batch["skipped"])

    # -------------------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self.val_unreadable: list[str] = []
        if self.evaluator is not None:
            self.evaluator.reset()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._count_skipped(batch)
        self.val_unreadable.extend(batch.get("skipped") or [])
        if not batch["targets"]:
            return
        predictions = (self.predict_fn or self.model.predict)(self.layout(batch))
        if self.evaluator is not None:
            self.evaluator.add_batch(predictions, batch["targets"])

    def on_validation_epoch_end(self) -> None:
        if self.evaluator is None or self.trainer.sanity_checking:
            return
        self.evaluator.gather()
        unreadable = self.unreadable_validation_images()
        limit = self.trainer.limit_val_batches  # a limited validation is scored on the images it saw
        self.metrics = self.evaluator.compute(only_seen=bool(unreadable) or (limit is not None and limit != 1.0))
        if unreadable:
            self.metrics["images_unreadable"] = len(unreadable)
        self.validated_step = self.global_step
        scalars = {f"val/{k}": float(v) for k, v in self.metrics.items()
                   if isinstance(v, int | float) and v is not None and math.isfinite(v)}
        main = f"val/{self.cfg.eval.main_metric}"
        if main not in scalars:  # null: nothing to measure (e.g. APl without large objects); still monitored
            log.warning("%s is null on this validation set (nothing to measure): logged as 0", main[4:])
        self.log(main, scalars.pop(main, 0.0), prog_bar=True, sync_dist=True)
        self.log_dict(scalars, sync_dist=True)

    def unreadable_validation_images(self) -> list[str]:
        """The validation images that could not be read (every process's). Scoring without them would describe
        part of the set: an error naming them, unless ``eval.skip_unreadable`` allows it (their ground truth is then
        left out too, and ``metrics.json`` counts them in ``images_unreadable``)."""
        found = list(getattr(self, "val_unreadable", []))
        if self.trainer.world_size > 1:
            import torch.distributed as dist

            gathered: list[Any] = [None] * self.trainer.world_size
            dist.all_gather_object(gathered, found)
            found = sorted({m for part in gathered for m in part})
        if found and not self.cfg.eval.skip_unreadable:
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            raise DataError(f"{len(found)} validation image(s) cannot be read, so the metrics would describe part "
                            f"of the set: {found[0]}{more}; fix or remove them, or set eval.skip_unreadable=true to "
                            f"score the readable images only")
        if found:
            log.warning("scoring without %d unreadable validation images (eval.skip_unreadable)", len(found))
        return found

    # -------------------------------------------------------------------------------------- optimizers
    def configure_optimizers(self):
        t = self.cfg.train
        # not under mixed precision: Lightning's AMP plugin refuses to clip the gradients of a fused optimizer
        optimizer = build_optimizer(self.model, t, fused="mixed" not in str(self.cfg.trainer.precision))
        spe = self.steps_per_epoch()
        # the schedule's length: train.total_steps (a budget's plan, which it may re-plan during the warmup), else
        # the epochs; never trainer.max_steps
        epochs_total = spe * int(t.epochs)
        scheduler = build_scheduler(optimizer, t, lambda: int(t.total_steps) if t.total_steps else epochs_total, spe)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: the training loader's batches (``trainer.limit_train_batches`` applied) over
        the gradient accumulation. Counted without starting the loader: a resumed run must restore its position
        before its first iterator is made."""
        dm = self.trainer.datamodule
        return steps_per_epoch(self.cfg, len(dm.train_dataloader()) if dm is not None else
                               int(self.trainer.estimated_stepping_batches))

    # -------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = [checkpoint["state_dict"], checkpoint.get("current_model_state") or {}]  # EMA keeps both
        bad = [k for s in states for k, v in s.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise TrainingError(f"weights hold NaN/inf values ({bad[0]} and {len(bad) - 1} more): not saving a "
                                f"checkpoint; the previous checkpoints keep the last good weights")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "current_model_state" in checkpoint and not self.cfg.train.ema.enabled:
            # an EMA run resumed without EMA continues from the trained weights, not from their average
            checkpoint["state_dict"] = checkpoint.pop("current_model_state")
