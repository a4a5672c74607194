"""``detkit data show``: ground truth drawn on samples after the train transforms (what the model sees)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from detkit.data.dataset import DetectionDataset
from detkit.data.transforms import Pipeline
from detkit.utils.draw import draw_detections, draw_semantic


def show_samples(dataset: DetectionDataset, pipeline: Pipeline, out: str | Path, n: int = 16,
                 seed: int = 0) -> list[Path]:
    """Draw ``n`` random samples (after ``pipeline``) into ``out`` as PNG; returns the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    indices = rng.choice(len(dataset), size=min(n, len(dataset)), replace=False)
    written = []
    pipeline.reseed(seed)
    for i in indices:  # a mosaic step draws its other images from the dataset, as in training
        extras = dataset.load_extras(int(i), pipeline.extra_samples, pipeline.rng) if pipeline.extra_samples else None
        sample = pipeline(dataset.load(int(i)), extras)
        image = np.ascontiguousarray(sample["image"].permute(1, 2, 0).numpy())  # uint8 H x W x 3
        if "semantic" in sample:
            drawn = draw_semantic(image, sample["semantic"].numpy(), dataset.classes)
        else:
            masks = sample["masks"].numpy() if "masks" in sample else None
            drawn = draw_detections(image, sample["boxes"].numpy(), sample["labels"].tolist(), dataset.classes,
                                    masks=masks)
        path = out / f"{Path(sample['file']).stem}.png"
        drawn.save(path)
        written.append(path)
    return written
