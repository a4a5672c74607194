"""Training order and randomness as functions of (seed, epoch, position), so a run stopped anywhere resumes exactly.

- :class:`EpochSampler` / :class:`GroupedSampler`: the order of an epoch is a function of (seed, epoch); a resumed
  epoch skips the batches it had already trained on (:meth:`resume`).
- Augmentations: the dataset reseeds its pipeline per sample from (the epoch's seed, the sample's index)
  (:func:`sample_seed`), so they do not depend on which worker loads a sample nor on what was loaded before.
- :class:`ResumableLoader`: a ``DataLoader`` that Lightning checkpoints (``state_dict``: the epoch and the batches
  done) and restores before it iterates (``load_state_dict``), so a mid-epoch checkpoint continues with the next
  batch of the same order instead of starting the epoch again.
"""

from __future__ import annotations

import random
import signal
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Sampler


def epoch_seed(seed: int, epoch: int, rank: int, step: int = -1) -> int:
    """The seed of an epoch (``step = -1``: augmentations, sampler) or of one training step within it (model-side
    randomness: RPN/RoI sampling, dropout), per process ``rank``."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(rank), int(step) + 1]).generate_state(1)[0])


def sample_seed(seed: int, index: int) -> int:
    """The augmentation seed of sample ``index`` in an epoch whose seed is ``seed``."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's global generators from one seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _Resumable:
    """Sharding across ``world`` processes and a one-shot skip of the first indices of the epoch being resumed.

    Each process takes every ``world``-th index of the (padded) order, starting at its ``rank``: the order is the
    same on every process, as DDP's own sampler does it, so every image is seen once per epoch (a few twice, as
    padding, when the count does not divide).
    """

    epoch, rank, world = 0, 0, 1
    _resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resume(self, epoch: int, skip: int) -> None:
        """The next iteration is ``epoch``'s order without its first ``skip`` indices (once)."""
        self.epoch, self._resume = int(epoch), (int(epoch), int(skip))

    def _share(self, order: list[int]) -> list[int]:
        """This process's share of the epoch's ``order``, minus what a resumed epoch has done already."""
        if self.world > 1:
            order = order + order[:-len(order) % self.world or 0] if order else order
            order = order[self.rank::self.world]
        if self._resume is not None and self._resume[0] == self.epoch:
            order = order[self._resume[1]:]
        self._resume = None
        return order

    def _shared_len(self, n: int) -> int:
        return -(-n // self.world)


class EpochSampler(_Resumable, Sampler[int]):
    """A random order that is a function of (seed, epoch) only (``set_epoch``), so a resumed run sees the same
    order as an uninterrupted one."""

    def __init__(self, n: int, seed: int = 0, rank: int = 0, world: int = 1) -> None:
        self.n, self.seed, self.epoch, self.rank, self.world = int(n), int(seed), 0, int(rank), int(world)

    def __len__(self) -> int:
        return self._shared_len(self.n)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(self._share(torch.randperm(self.n, generator=g).tolist()))


class ShardSampler(_Resumable, Sampler[int]):
    """Indices in order (evaluation), this process's share of them."""

    def __init__(self, n: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.rank, self.world = int(n), int(rank), int(world)

    def __len__(self) -> int:
        return self._shared_len(self.n)

    def __iter__(self):
        return iter(self._share(list(range(self.n))))


def aspect_groups(dataset: Any) -> np.ndarray:
    """0 for landscape (w >= h), 1 for portrait images."""
    groups = []
    for r in dataset.records:
        w, h = r.width, r.height
        if w is None or h is None:
            with Image.open(r.file) as im:
                w, h = im.size
        groups.append(0 if w >= h else 1)
    return np.asarray(groups, np.int64)


class GroupedSampler(_Resumable, Sampler[int]):
    """A shuffled order in which every run of ``chunk`` consecutive indices shares one aspect group.

    With DDP, rank ``r`` takes the indices ``r, r + world, ...`` of this order; with ``chunk = batch_size *
    world_size`` every rank's batches then stay within one group. The order is
    reshuffled (identically on every rank) at each epoch (``set_epoch``, called by the engine). Each group's
    last chunk is completed with repeats from the same group, so a few images may be seen twice per epoch.
    """

    def __init__(self, groups: np.ndarray, chunk: int, seed: int = 0, rank: int = 0, world: int = 1) -> None:
        self.groups, self.chunk, self.seed, self.epoch = np.asarray(groups), int(chunk), int(seed), 0
        self.rank, self.world = int(rank), int(world)

    def __len__(self) -> int:
        return self._shared_len(sum(-(-int(n) // self.chunk) * self.chunk for n in np.bincount(self.groups) if n))

    def __iter__(self):
        rng = np.random.default_rng(self.seed + self.epoch)
        chunks = []
        for g in np.unique(self.groups):
            idx = rng.permutation(np.nonzero(self.groups == g)[0])
            short = -len(idx) % self.chunk  # complete the last chunk with repeats, so chunks stay aligned
            idx = np.concatenate([idx, rng.choice(idx, short, replace=short > len(idx))])
            chunks += [idx[i:i + self.chunk] for i in range(0, len(idx), self.chunk)]
        order = rng.permutation(len(chunks))
        return iter(self._share([int(i) for c in order for i in chunks[c]]))


def seed_worker(worker_id: int) -> None:
    """Each loader worker: numpy and random seeded from the worker's torch seed (augmentations are seeded per
    sample); Ctrl-C and SIGTERM are left to the main process, which stops at the end of a step and then ends the
    workers (a worker killed first would turn a clean stop into a crash)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


class ResumableLoader(DataLoader):
    """A ``DataLoader`` Lightning can checkpoint mid-epoch (it saves ``state_dict()`` with the loops, and calls
    ``load_state_dict`` before it creates the iterator of a resumed run).

    ``progress``: returns ``(epoch, batches done)`` from the training loop (the loader itself cannot know: workers
    load ahead); ``on_resume(epoch)``: sets the epoch's seeds before the first batch is loaded.
    """

    def __init__(self, *args: Any, progress: Callable[[], tuple[int, int]] | None = None,
                 on_resume: Callable[[int], None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress, self.on_resume = progress, on_resume

    def state_dict(self) -> dict[str, int]:
        epoch, batches = self.progress() if self.progress is not None else (0, 0)
        return {"epoch": int(epoch), "batches": int(batches)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, batches = int(state.get("epoch", 0)), int(state.get("batches", 0))
        if batches >= len(self):  # saved at the end of an epoch: the next one starts from its beginning
            epoch, batches = epoch + 1, 0
        if hasattr(self.sampler, "resume"):
            self.sampler.resume(epoch, batches * int(self.batch_size or 1))
        if self.on_resume is not None:
            self.on_resume(epoch)
