"""Mask folders: semantic index PNGs (``masks``) and per-image instance-id PNGs (``instance_masks``).

Both pair ``<images>/<name>.<ext>`` with ``<annotations>/<name><label_suffix>.png``.

``masks`` (semantic): pixel values are class indices into ``classes`` (a list), or the keys of a mapping
``{pixel value: name}``; both are renumbered 0..K-1 in order. ``ignore_index`` is the file's value for
unlabeled pixels (e.g. 255, CamVid's 11, coco128's 0: a class listed with that value is left out). In the
samples, unlabeled pixels and values outside ``classes`` are 255 (``SEMANTIC_IGNORE``).

``instance_masks`` (PennFudan style): 0 is background, 1..N are instances of one class (``classes``, default
``["object"]``); boxes are the instances' extents.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from detkit.data.dataset import (
    SEMANTIC_IGNORE,
    DetectionDataset,
    Record,
    instance_masks_from_ids,
    list_images,
    read_label_png,
    read_split,
    resolve_classes,
)
from detkit.errors import DataError


def _pairs(images: Path, annotations: Path, suffix: str, split: list[str] | None, problems) -> list[tuple[Path, Path]]:
    if not annotations.is_dir():
        raise DataError(f"mask folder not found: {annotations}")
    files = list_images(images)
    if split is not None:
        wanted = set(split)
        files = [p for p in files if p.stem in wanted]
    pairs = []
    for file in files:
        mask = annotations / file.relative_to(images).parent / f"{file.stem}{suffix}.png"
        if mask.is_file():
            pairs.append((file, mask))
        else:
            problems.add("images skipped (no mask file)", file)
    if not pairs:
        raise DataError(f"no image in {images} has a mask in {annotations} (label_suffix={suffix!r})")
    return pairs


class SemanticMaskDataset(DetectionDataset):
    task = "semantic"

    def __init__(self, images: str | Path, annotations: str | Path, split: str | Path | None = None,
                 classes: Any = None, name: str | None = None, transform=None, label_suffix: str = "",
                 ignore_index: int = 255) -> None:
        super().__init__(name or Path(images).name, transform)
        given = resolve_classes(classes)
        if given is None:
            raise DataError("the masks format needs data.*.classes: a list of names (pixel value = position) "
                            "or {pixel value: name}")
        self.ignore_index = int(ignore_index)
        kept = [(n, int(c)) for n, c in zip(*given) if int(c) != self.ignore_index]  # e.g. coco128's 0: unlabeled
        self.classes, self.cat_ids = [n for n, _ in kept], [c for _, c in kept]
        if not 0 < len(self.classes) < SEMANTIC_IGNORE - 1:
            raise DataError(f"masks datasets need 1..{SEMANTIC_IGNORE - 2} classes, got {len(self.classes)}")
        lut = np.full(max(256, max(self.cat_ids) + 1, self.ignore_index + 1), SEMANTIC_IGNORE, np.int64)
        for index, value in enumerate(self.cat_ids):
            lut[int(value)] = index
        self.lut = lut
        for index, (file, mask) in enumerate(_pairs(Path(images), Path(annotations), label_suffix,
                                                     read_split(split), self.problems)):
            self.records.append(Record(image_id=index, file=file, mask_file=mask))
        self.problems.report()

    def add_masks(self, sample: dict[str, Any], record: Record) -> None:
        raw = read_label_png(record.mask_file)
        if raw.shape != sample["orig_size"]:
            raise DataError(f"{record.mask_file}: mask is {raw.shape[1]}x{raw.shape[0]} but image {record.file} is "
                            f"{sample['orig_size'][1]}x{sample['orig_size'][0]}")
        sample["semantic"] = self.lut[np.clip(raw, 0, len(self.lut) - 1)]


class InstanceMaskDataset(DetectionDataset):
    task = "instance"

    def __init__(self, images: str | Path, annotations: str | Path, split: str | Path | None = None,
                 classes: Any = None, name: str | None = None, transform=None, label_suffix: str = "") -> None:
        super().__init__(name or Path(images).name, transform)
        given = resolve_classes(classes) or (["object"], [1])
        if len(given[0]) != 1:
            raise DataError("instance_masks datasets have one class: set data.*.classes to one name")
        self.classes, self.cat_ids = list(given[0]), [1]
        for index, (file, mask_file) in enumerate(_pairs(Path(images), Path(annotations), label_suffix,
                                                          read_split(split), self.problems)):
            ids = read_label_png(mask_file)
            boxes = []
            for inst in np.unique(ids[ids > 0]):
                ys, xs = np.nonzero(ids == inst)
                boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            n = len(boxes)
            if n == 0:
                self.problems.add("masks without instances (kept as negatives)", mask_file)
            self.records.append(Record(
                image_id=index, file=file, width=ids.shape[1], height=ids.shape[0],
                boxes=np.asarray(boxes, np.float32).reshape(-1, 4), labels=np.ones(n, np.int64),
                iscrowd=np.zeros(n, bool), difficult=np.zeros(n, bool), mask_file=mask_file, source=mask_file,
            ))
        self.problems.report()

    def add_masks(self, sample: dict[str, Any], record: Record) -> None:
        sample["masks"] = instance_masks_from_ids(read_label_png(record.mask_file))
