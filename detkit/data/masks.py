"""Mask folders: semantic index PNGs (``masks``) and per-image instance-id PNGs (``instance_masks``).

Both pair ``<images>/<name>.<ext>`` with ``<annotations>/<name><label_suffix>.png``.

``masks`` (semantic): pixel values are class indices into ``classes`` (a list), or the keys of a mapping
``{pixel value: name}``; both are renumbered 0..K-1 in order. ``ignore_index`` is the file's value for
unlabeled pixels (e.g. 255, CamVid's 11, coco128's 0: a class listed with that value is left out). In the
samples, unlabeled pixels and values outside ``classes`` are 255 (``SEMANTIC_IGNORE``).

``instance_masks`` (PennFudan style): 0 is background, 1..N are instances of one class (``classes``, default
``["object"]``); boxes are the instances' extents.

What may go wrong, and what happens (errors are one line naming the file or the key; repairs are counted in
``dataset.problems`` and reported once):

Config errors (:class:`ConfigError`): a class pixel value or ``ignore_index`` that is not an integer in 0..65535
(the values a PNG can hold). Counted skips at build: an image without a mask file; an image or mask whose
header claims more than ``data.max_image_pixels`` pixels (not decoded); for instance masks (decoded at build, for
the boxes) a mask that cannot be read, is not single-channel (``L``, ``P``, 16-bit) or whose masks would take
more than ``MAX_MASK_BYTES``. At load (a one-line :class:`DataError`; the loader skips and counts the image): a
semantic mask that cannot be read or is not single-channel, and a mask whose size differs from its image's.
Pixel values outside ``classes`` are unlabeled by design (255 in the samples; the class list says what is
labeled), whatever their value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
from detkit.data.fields import ImageTooLarge, as_int, show
from detkit.errors import ConfigError, DataError

MAX_LABEL = 65535  # the largest value of a 16-bit PNG
MAX_MASK_BYTES = 2**31  # an instance-id PNG whose N x H x W masks would exceed this is skipped (counted)


def _label_value(value: Any, key: str) -> int:
    """A pixel value from config (a class key, ``ignore_index``): an int in 0..65535 (``"11"`` from YAML keys too)."""
    n = as_int(value)
    if n is None and isinstance(value, str) and value.strip().isdigit() and len(value.strip()) < 10:
        n = int(value.strip())
    if n is None or not 0 <= n <= MAX_LABEL:
        raise ConfigError(f"{key} = {show(value)}: expected a pixel value, an integer in 0..{MAX_LABEL}")
    return n


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


def instance_boxes(ids: np.ndarray) -> np.ndarray:
    """N x 4 xyxy boxes (pixel extents) of the instances 1..N of an instance-id map, in id order."""
    ys, xs = np.nonzero(ids > 0)
    if not len(xs):
        return np.zeros((0, 4), np.float32)
    _, inverse = np.unique(ids[ys, xs], return_inverse=True)
    n = int(inverse.max()) + 1
    boxes = np.empty((n, 4), np.float64)
    boxes[:, :2] = np.inf
    boxes[:, 2:] = -np.inf
    np.minimum.at(boxes[:, 0], inverse, xs)
    np.minimum.at(boxes[:, 1], inverse, ys)
    np.maximum.at(boxes[:, 2], inverse, xs + 1)
    np.maximum.at(boxes[:, 3], inverse, ys + 1)
    return boxes.astype(np.float32)


@dataclass
class InstanceMaskOptions:
    """``instance_masks``' own options (``data.<split>.<option>``)."""

    label_suffix: str = field(default="", metadata={"help": "the mask of <stem>.jpg is <stem><suffix>.png "
                                                            "(PennFudan: _mask)"})


@dataclass
class SemanticMaskOptions(InstanceMaskOptions):
    """``masks``' own options (``data.<split>.<option>``)."""

    ignore_index: int | str = field(default=255, metadata={"help": "the pixel value of unlabeled pixels in the files "
                                                                   "(CamVid: 11)"})


class SemanticMaskDataset(DetectionDataset):
    task = "semantic"
    Options = SemanticMaskOptions

    def __init__(self, images: str | Path, annotations: str | Path, split: str | Path | None = None,
                 classes: Any = None, name: str | None = None, transform=None, label_suffix: str = "",
                 ignore_index: int | str = 255, max_pixels: int | None = None) -> None:
        super().__init__(name or Path(images).name, transform, max_pixels)
        given = resolve_classes(classes)
        if given is None:
            raise DataError("the masks format needs data.*.classes: a list of names (pixel value = position) "
                            "or {pixel value: name}")
        self.ignore_index = _label_value(ignore_index, "data.*.ignore_index")
        values = [_label_value(c, f"data.*.classes key {show(c)} ({n})") for n, c in zip(*given)]
        kept = [(n, c) for n, c in zip(given[0], values) if c != self.ignore_index]  # e.g. coco128's 0: unlabeled
        self.classes, self.cat_ids = [n for n, _ in kept], [c for _, c in kept]
        if not 0 < len(self.classes) < SEMANTIC_IGNORE - 1:
            raise DataError(f"masks datasets need 1..{SEMANTIC_IGNORE - 2} classes, got {len(self.classes)}")
        lut = np.full(max(256, max(self.cat_ids) + 1, self.ignore_index + 1), SEMANTIC_IGNORE, np.int64)
        for index, value in enumerate(self.cat_ids):
            lut[int(value)] = index
        self.lut = lut
        index = 0
        for file, mask in _pairs(Path(images), Path(annotations), label_suffix, read_split(split), self.problems):
            if self.image_header(file) is False or self.image_header(mask) is False:
                continue
            self.records.append(Record(image_id=index, file=file, mask_file=mask))
            index += 1
        self.problems.report()

    def add_masks(self, sample: dict[str, Any], record: Record) -> None:
        raw = read_label_png(record.mask_file, self.max_pixels)
        if raw.shape != sample["orig_size"]:
            raise DataError(f"{record.mask_file}: mask is {raw.shape[1]}x{raw.shape[0]} but image {record.file} is "
                            f"{sample['orig_size'][1]}x{sample['orig_size'][0]}")
        inside = (raw >= 0) & (raw < len(self.lut))  # values the lut does not cover are unlabeled too
        sample["semantic"] = np.where(inside, self.lut[np.where(inside, raw, 0)], SEMANTIC_IGNORE)


class InstanceMaskDataset(DetectionDataset):
    task = "instance"
    Options = InstanceMaskOptions

    def __init__(self, images: str | Path, annotations: str | Path, split: str | Path | None = None,
                 classes: Any = None, name: str | None = None, transform=None, label_suffix: str = "",
                 max_pixels: int | None = None, with_masks: bool = True) -> None:
        super().__init__(name or Path(images).name, transform, max_pixels)
        self.with_masks = with_masks  # False: samples carry boxes only (the masks still give the boxes)
        given = resolve_classes(classes) or (["object"], [1])
        if len(given[0]) != 1:
            raise DataError("instance_masks datasets have one class: set data.*.classes to one name")
        self.classes, self.cat_ids = list(given[0]), [1]
        index = 0
        for file, mask_file in _pairs(Path(images), Path(annotations), label_suffix, read_split(split),
                                      self.problems):
            if self.image_header(file) is False:
                continue
            try:
                ids = read_label_png(mask_file, self.max_pixels)
            except ImageTooLarge:
                self.count_too_large(mask_file)
                continue
            except DataError:
                self.problems.add("images skipped (mask unreadable or not single-channel)", mask_file)
                continue
            boxes = instance_boxes(ids)
            n = len(boxes)
            if n * ids.size > MAX_MASK_BYTES:
                self.problems.add(f"images skipped ({n} instances: masks over {MAX_MASK_BYTES >> 20} MiB)", mask_file)
                continue
            if n == 0:
                self.problems.add("masks without instances (kept as negatives)", mask_file)
            self.records.append(Record(
                image_id=index, file=file, width=ids.shape[1], height=ids.shape[0], boxes=boxes,
                labels=np.ones(n, np.int64), iscrowd=np.zeros(n, bool), difficult=np.zeros(n, bool),
                mask_file=mask_file, source=mask_file,
            ))
            index += 1
        self.problems.report()

    def add_masks(self, sample: dict[str, Any], record: Record) -> None:
        if self.with_masks:
            sample["masks"] = instance_masks_from_ids(read_label_png(record.mask_file, self.max_pixels))
