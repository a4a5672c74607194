"""``detkit data stats``: what a dataset holds and every problem found in it, with counts."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from detkit.data.dataset import DetectionDataset
from detkit.errors import DataError

SMALL, MEDIUM = 32**2, 96**2  # COCO's area ranges


def dataset_stats(dataset: DetectionDataset, check_images: bool = True) -> dict[str, Any]:
    """Counts per class and box size, negatives, and problems (those found while parsing, plus, with
    ``check_images``, images and masks that fail to load)."""
    per_class: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    negatives = crowd = difficult = 0
    for r in dataset.records:
        if len(r.boxes) == 0:
            negatives += 1
        crowd += int(r.iscrowd.sum())
        difficult += int(r.difficult.sum())
        for box, label in zip(r.boxes, r.labels):
            per_class[dataset.classes[int(label) - 1]] += 1
            area = float((box[2] - box[0]) * (box[3] - box[1]))
            sizes["small" if area < SMALL else "medium" if area < MEDIUM else "large"] += 1
    problems = dict(dataset.problems.as_dict())
    pixels: Counter[int] = Counter()
    if check_images:
        bad: list[str] = []
        for i in range(len(dataset)):
            try:
                sample = dataset.load(i)
            except DataError as e:
                bad.append(str(e))
                continue
            if "semantic" in sample:
                values, counts = np.unique(sample["semantic"], return_counts=True)
                pixels.update(dict(zip(values.tolist(), counts.tolist())))
        if bad:
            problems["images that fail to load"] = {"count": len(bad), "examples": bad[:5]}
    stats: dict[str, Any] = {
        "name": dataset.name,
        "task": dataset.task,
        "images": len(dataset),
        "instances": int(sum(per_class.values())),
        "classes": list(dataset.classes),
        "per_class": {name: per_class.get(name, 0) for name in dataset.classes},
        "box_sizes": {k: sizes.get(k, 0) for k in ("small", "medium", "large")},
        "images_without_objects": negatives if dataset.task != "semantic" else None,
        "crowd": crowd,
        "difficult": difficult,
        "problems": problems,
    }
    if dataset.task == "semantic":
        total = sum(pixels.values()) or 1
        stats["pixels_per_class"] = {name: round(pixels.get(i, 0) / total, 4) for i, name in enumerate(dataset.classes)}
        stats["pixels_ignored"] = round(pixels.get(255, 0) / total, 4)
    return stats


def format_stats(stats: dict[str, Any]) -> str:
    lines = [f"{stats['name']} ({stats['task']}): {stats['images']} images, {stats['instances']} instances, "
             f"{len(stats['classes'])} classes"]
    if stats["images_without_objects"] is not None:
        lines.append(f"  images without objects: {stats['images_without_objects']}  crowd: {stats['crowd']}  "
                     f"difficult: {stats['difficult']}")
        sizes = stats["box_sizes"]
        lines.append(f"  box sizes (COCO): small {sizes['small']}, medium {sizes['medium']}, large {sizes['large']}")
        width = max((len(n) for n in stats["per_class"]), default=5)
        lines.append("  instances per class:")
        lines += [f"    {name:<{width}}  {n}" for name, n in stats["per_class"].items()]
    if "pixels_per_class" in stats:
        lines.append(f"  pixel share per class (ignored: {stats['pixels_ignored']:.2%}):")
        lines += [f"    {name:<16} {share:.2%}" for name, share in stats["pixels_per_class"].items()]
    if stats["problems"]:
        lines.append("  problems:")
        for kind, info in stats["problems"].items():
            example = f" (e.g. {info['examples'][0]})" if info["examples"] else ""
            lines.append(f"    {info['count']} {kind}{example}")
    else:
        lines.append("  problems: none")
    return "\n".join(lines)
