"""Batching: pad images to one size, keep per-image targets, stack semantic maps, count skipped images."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from detkit.data.dataset import SEMANTIC_IGNORE

TARGET_KEYS = ("boxes", "labels", "iscrowd", "difficult", "masks", "image_id", "orig_size", "scale", "file",
               "semantic_orig")


class Collate:
    """``batch = {"images": B x 3 x H x W, "targets": [dict per image], "semantic": B x H x W (if any),
    "image_sizes": [(h, w) before padding], "skipped": [messages], "boxes_dropped": int}``.

    Images are padded at the bottom/right (so box coordinates are unchanged) to the largest size in the batch,
    rounded up to ``size_divisor``; semantic maps are padded with the ignore value. Samples that failed to load
    (``{"skipped": message}``) are left out and listed in ``skipped``.
    """

    def __init__(self, size_divisor: int = 32) -> None:
        self.size_divisor = max(1, int(size_divisor))

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        skipped = [s["skipped"] for s in samples if "skipped" in s]
        samples = [s for s in samples if "skipped" not in s]
        batch: dict[str, Any] = {"skipped": skipped, "boxes_dropped": sum(s.get("boxes_dropped", 0) for s in samples)}
        if not samples:
            batch.update(images=torch.zeros(0, 3, self.size_divisor, self.size_divisor), targets=[], image_sizes=[])
            return batch
        d = self.size_divisor
        h = math.ceil(max(s["image"].shape[-2] for s in samples) / d) * d
        w = math.ceil(max(s["image"].shape[-1] for s in samples) / d) * d
        images = torch.zeros(len(samples), 3, h, w, dtype=samples[0]["image"].dtype)
        for i, s in enumerate(samples):
            ih, iw = s["image"].shape[-2:]
            images[i, :, :ih, :iw] = s["image"]
        batch["images"] = images
        batch["image_sizes"] = [tuple(s["image"].shape[-2:]) for s in samples]
        batch["targets"] = [{k: s[k] for k in TARGET_KEYS if k in s} for s in samples]
        if all("semantic" in s for s in samples):
            batch["semantic"] = torch.stack([
                F.pad(s["semantic"], (0, w - s["semantic"].shape[-1], 0, h - s["semantic"].shape[-2]),
                      value=SEMANTIC_IGNORE) for s in samples
            ])
        return batch
