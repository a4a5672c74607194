"""The LightningDataModule built from ``data.*``: datasets, pipelines, loaders, samplers."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from detkit.data.build import build_dataset
from detkit.data.collate import Collate
from detkit.data.dataset import DetectionDataset
from detkit.data.samplers import (
    EpochSampler,
    GroupedSampler,
    ResumableLoader,
    ShardSampler,
    aspect_groups,
    epoch_seed,
    seed_worker,
)
from detkit.data.transforms import pipeline_from_config


class DetDataModule(L.LightningDataModule):
    """Datasets of ``data.train/val/test`` with their pipelines; ``classes`` from the train set.

    Batches hold uint8 images (4x less to copy from the workers); the model normalises them on its device.
    ``with_masks``: decode instance masks (default ``data.with_masks``; the engine passes what the head's traits
    ask for when that is unset).
    """

    def __init__(self, cfg: Any, with_masks: bool | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.with_masks = bool(cfg.data.with_masks if with_masks is None else with_masks)
        self.datasets: dict[str, DetectionDataset] = {}
        self.collate = Collate(cfg.data.size_divisor)
        self.samplers: dict[str, Sampler | None] = {}
        self.no_mosaic_from: int | None = None  # the first epoch trained without Mosaic (train.close_mosaic)
        self._pipelines: dict[bool, Any] = {}

    def dataset(self, split: str) -> DetectionDataset | None:
        if split not in self.datasets and self.cfg.data[split].format is not None:
            pipeline = pipeline_from_config(self.cfg.data, train=split == "train")
            self.datasets[split] = build_dataset(self.cfg.data[split], transform=pipeline, with_masks=self.with_masks,
                                                 key=f"data.{split}", max_pixels=self.cfg.data.max_image_pixels)
        return self.datasets.get(split)

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in splits.get(stage or "fit", ("train", "val")):
            self.dataset(split)

    @property
    def classes(self) -> list[str]:
        ds = self.dataset("train") or self.dataset("val") or self.dataset("test")
        return list(ds.classes) if ds is not None else []

    @property
    def rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (int(trainer.global_rank), int(trainer.world_size)) if trainer is not None else (0, 1)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        ds = self.dataset(split)
        if ds is None:
            raise ValueError(f"data.{split} is not configured")
        d = self.cfg.data
        rank, world = self.rank_and_world
        # training workers restart every epoch; augmentations are seeded per sample (a function of seed, epoch and
        # index), so neither the workers nor a resume change them
        kwargs: dict[str, Any] = dict(batch_size=d.batch_size, num_workers=d.num_workers, collate_fn=self.collate,
                                      persistent_workers=d.num_workers > 0 and not shuffle,
                                      pin_memory=torch.cuda.is_available(), worker_init_fn=seed_worker)
        seed = int(self.cfg.seed)
        if not shuffle:  # this process's share, in order (the evaluators count each image once)
            sampler: Sampler = ShardSampler(len(ds), rank, world)
        elif d.aspect_ratio_grouping:
            sampler = GroupedSampler(aspect_groups(ds), d.batch_size * world, seed, rank, world)
        else:
            sampler = EpochSampler(len(ds), seed, rank, world)
        self.samplers[split] = sampler
        if not shuffle:
            return DataLoader(ds, sampler=sampler, **kwargs)
        self.set_epoch(0)
        return ResumableLoader(ds, sampler=sampler, progress=self._progress, on_resume=self.set_epoch, **kwargs)

    def _progress(self) -> tuple[int, int]:
        """(epoch, batches done in it) of the training loop, for a checkpoint of the training loader."""
        trainer = self.trainer
        return int(trainer.current_epoch), int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)

    def set_epoch(self, epoch: int) -> None:
        """The training epoch ``epoch``'s order and augmentation seeds (the engine calls this at each epoch start;
        the training loader when it resumes mid-epoch)."""
        sampler = self.samplers.get("train")
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        train = self.datasets.get("train")
        if train is not None:
            rank, _ = self.rank_and_world
            train.augment_seed = epoch_seed(int(self.cfg.seed), epoch, rank)
            mosaic = self.no_mosaic_from is None or epoch < self.no_mosaic_from
            if mosaic not in self._pipelines:
                self._pipelines[mosaic] = pipeline_from_config(self.cfg.data, train=True, mosaic=mosaic)
            train.transform = self._pipelines[mosaic]

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
