"""The LightningDataModule built from ``data.*``: datasets, pipelines, loaders, samplers."""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Sampler

from detkit.data.build import build_dataset
from detkit.data.collate import Collate
from detkit.data.dataset import DetectionDataset
from detkit.data.transforms import pipeline_from_config


def aspect_groups(dataset: DetectionDataset) -> np.ndarray:
    """0 for landscape (w >= h), 1 for portrait images."""
    groups = []
    for r in dataset.records:
        w, h = r.width, r.height
        if w is None or h is None:
            with Image.open(r.file) as im:
                w, h = im.size
        groups.append(0 if w >= h else 1)
    return np.asarray(groups, np.int64)


class GroupedSampler(Sampler[int]):
    """A shuffled order in which every run of ``chunk`` consecutive indices shares one aspect group.

    With DDP, Lightning hands rank ``r`` the indices ``r, r + world, ...`` of this order; with
    ``chunk = batch_size * world_size`` every rank's batches then stay within one group. The order is
    reshuffled (identically on every rank) at each epoch (``set_epoch``, called by the engine). Each group's
    last chunk is completed with repeats
    from the same group, so a few images may be seen twice per epoch.
    """

    def __init__(self, groups: np.ndarray, chunk: int, seed: int = 0) -> None:
        self.groups, self.chunk, self.seed, self.epoch = np.asarray(groups), int(chunk), int(seed), 0

    def __len__(self) -> int:
        return sum(-(-int(n) // self.chunk) * self.chunk for n in np.bincount(self.groups) if n)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        rng = np.random.default_rng(self.seed + self.epoch)
        chunks = []
        for g in np.unique(self.groups):
            idx = rng.permutation(np.nonzero(self.groups == g)[0])
            short = -len(idx) % self.chunk  # complete the last chunk with repeats, so chunks stay aligned
            idx = np.concatenate([idx, rng.choice(idx, short, replace=short > len(idx))])
            chunks += [idx[i:i + self.chunk] for i in range(0, len(idx), self.chunk)]
        order = rng.permutation(len(chunks))
        return iter(int(i) for c in order for i in chunks[c])


class EpochSampler(Sampler[int]):
    """A random order that is a function of (seed, epoch) only (``set_epoch``), so a resumed run sees the same
    order as an uninterrupted one."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def seed_worker(worker_id: int) -> None:
    """Each loader worker: numpy, random and the augmentation stream seeded from the worker's torch seed."""
    import random

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info is not None else None
    if hasattr(transform, "reseed"):
        transform.reseed(seed)


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

    def dataset(self, split: str) -> DetectionDataset | None:
        if split not in self.datasets and self.cfg.data[split].format is not None:
            pipeline = pipeline_from_config(self.cfg.data, train=split == "train")
            self.datasets[split] = build_dataset(self.cfg.data[split], transform=pipeline, with_masks=self.with_masks,
                                                 key=f"data.{split}")
        return self.datasets.get(split)

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in splits.get(stage or "fit", ("train", "val")):
            self.dataset(split)

    @property
    def classes(self) -> list[str]:
        ds = self.dataset("train") or self.dataset("val") or self.dataset("test")
        return list(ds.classes) if ds is not None else []

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        ds = self.dataset(split)
        if ds is None:
            raise ValueError(f"data.{split} is not configured")
        d = self.cfg.data
        # training workers restart every epoch, seeded from the (per-epoch) torch seed: augmentations are then a
        # function of (seed, epoch) and a resumed run continues exactly
        kwargs: dict[str, Any] = dict(batch_size=d.batch_size, num_workers=d.num_workers, collate_fn=self.collate,
                                      persistent_workers=d.num_workers > 0 and not shuffle,
                                      pin_memory=torch.cuda.is_available(), worker_init_fn=seed_worker)
        world = self.trainer.world_size if self.trainer is not None else 1
        if shuffle and d.aspect_ratio_grouping:
            kwargs["sampler"] = GroupedSampler(aspect_groups(ds), d.batch_size * world, seed=int(self.cfg.seed))
        elif shuffle and world == 1:
            kwargs["sampler"] = EpochSampler(len(ds), seed=int(self.cfg.seed))
        else:
            kwargs["shuffle"] = shuffle  # under DDP Lightning's DistributedSampler shuffles by (seed, epoch)
        self.samplers[split] = kwargs.get("sampler")
        return DataLoader(ds, **kwargs)

    def set_epoch(self, epoch: int, seed: int) -> None:
        """Called by the engine at each training epoch start: sampler order and augmentations of this epoch."""
        sampler = self.samplers.get("train")
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        transform = getattr(self.datasets.get("train"), "transform", None)
        if hasattr(transform, "reseed"):
            transform.reseed(seed)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


