"""Any detkit dataset as COCO: an in-memory ground-truth dict (evaluation) or a COCO instances file
(``detkit data convert ... --to coco OUT.json``).

``dataset_to_coco(dataset)`` keeps the dataset's own image ids (``record.image_id``) and uses the contiguous
labels 1..K as category ids (the dataset's own ids are kept as ``original_id``), so model predictions
(``labels`` 1..K) can be scored against it directly.

Per annotation: ``bbox`` (xywh, original pixels), ``area`` (the mask area when the instance has a segmentation,
as COCO does, also for the size ranges of box AP; the box area otherwise), ``iscrowd`` and ``difficult`` (1/0),
and with ``with_masks`` a ``segmentation`` (polygons, or compressed RLE with ``counts`` as str; an instance
without one gets its box as a polygon, the mask the data pipeline would give it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from detkit.data.dataset import DetectionDataset, Record, instance_masks_from_ids, read_label_png
from detkit.errors import DataError
from detkit.utils.io import write_json


def dataset_to_coco(dataset: DetectionDataset, with_masks: bool = False) -> dict[str, Any]:
    """The COCO ground-truth dict of ``dataset`` (image ids = ``record.image_id``, category ids = labels 1..K)."""
    images, annotations = [], []
    for record in dataset.records:
        width, height = record_size(record)
        images.append({"id": int(record.image_id), "file_name": Path(record.file).as_posix(), "width": width,
                       "height": height})
        annotations += record_annotations(record, int(record.image_id), width, height,
                                          segmentation="all" if with_masks else "none",
                                          first_id=len(annotations) + 1)
    return {"images": images, "annotations": annotations, "categories": coco_categories(dataset)}


def coco_categories(dataset: DetectionDataset) -> list[dict[str, Any]]:
    """``[{id: 1..K, name, original_id}]`` in the dataset's class order."""
    return [{"id": i + 1, "name": name, "original_id": _plain(orig)}
            for i, (name, orig) in enumerate(zip(dataset.classes, dataset.cat_ids))]


def record_size(record: Record) -> tuple[int, int]:
    """``(width, height)`` of a record's image, read from the file when the annotations did not say."""
    if record.width is not None and record.height is not None:
        return int(record.width), int(record.height)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(record.file) as im:
            return im.size
    except FileNotFoundError:
        raise DataError(f"{record.file}: image file not found") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{record.file}: cannot read the image size ({e})") from None


def record_annotations(record: Record, image_id: int, width: int, height: int, segmentation: str = "none",
                       first_id: int = 1) -> list[dict[str, Any]]:
    """COCO annotations of one record. ``segmentation``: ``none`` (left out), ``known`` (written where the
    dataset has one) or ``all`` (instances without one get their box as a polygon)."""
    instance_masks = _instance_masks(record)
    annotations = []
    for i, (box, label) in enumerate(zip(record.boxes, record.labels)):
        x1, y1, x2, y2 = (float(v) for v in box)
        ann: dict[str, Any] = {
            "id": first_id + i, "image_id": image_id, "category_id": int(label), "bbox": [x1, y1, x2 - x1, y2 - y1],
            "area": (x2 - x1) * (y2 - y1), "iscrowd": _flag(record.iscrowd, i), "difficult": _flag(record.difficult, i),
        }
        seg = None
        try:
            if instance_masks is not None:
                seg = rle_to_json(mask_utils.encode(np.asfortranarray(instance_masks[i])))
            elif record.segmentations and i < len(record.segmentations):
                seg = normalize_segmentation(record.segmentations[i], height, width)
            if seg is not None:
                ann["area"] = segmentation_area(seg, height, width)
        except DataError as e:
            ann_id = record.ann_ids[i] if i < len(record.ann_ids) else i
            raise DataError(f"{record.source or record.file}: annotation {ann_id}: {e}") from None
        if seg is None and segmentation == "all":
            seg = [[x1, y1, x1, y2, x2, y2, x2, y1]]
        if seg is not None and segmentation != "none":
            ann["segmentation"] = seg
        annotations.append(ann)
    return annotations


def normalize_segmentation(seg: Any, height: int, width: int) -> list[list[float]] | dict[str, Any] | None:
    """Polygons as lists of floats (parts with fewer than 3 points dropped), RLE as compressed RLE with str
    ``counts``; ``None`` when nothing is left. Raises :class:`DataError` for anything else."""
    if seg is None or (isinstance(seg, list | tuple) and not seg):
        return None
    if isinstance(seg, list | tuple):
        try:
            polygons = [[float(v) for v in part] for part in seg]
        except (TypeError, ValueError):
            raise DataError(f"segmentation is not a list of polygons: {str(seg)[:60]}") from None
        polygons = [p for p in polygons if len(p) >= 6 and len(p) % 2 == 0 and all(map(math.isfinite, p))]
        return polygons or None
    if isinstance(seg, Mapping) and "counts" in seg and "size" in seg:
        size = seg["size"]
        if not (isinstance(size, list | tuple) and len(size) == 2 and all(isinstance(v, int) for v in size)):
            raise DataError(f"RLE 'size' must be [height, width], got {size!r}")
        if tuple(size) != (height, width):
            raise DataError(f"RLE of size {size[1]}x{size[0]} for an image of {width}x{height}")
        counts = seg["counts"]
        try:
            if isinstance(counts, list):
                return rle_to_json(mask_utils.frPyObjects({"size": list(size), "counts": counts}, *size))
            if isinstance(counts, bytes | str):
                rle = {"size": list(size), "counts": counts if isinstance(counts, bytes) else counts.encode("ascii")}
                mask_utils.area(rle)  # decodes the string: a corrupt one fails here
                return rle_to_json(rle)
        except (TypeError, ValueError, UnicodeEncodeError) as e:
            raise DataError(f"malformed RLE ({e})") from None
        raise DataError(f"RLE 'counts' must be a string or a list of ints, got {type(counts).__name__}")
    raise DataError(f"unsupported segmentation of type {type(seg).__name__}")


def segmentation_area(seg: list | dict, height: int, width: int) -> float:
    """The pixel area of a (normalized) segmentation, as pycocotools computes it."""
    return float(mask_utils.area(segmentation_rle(seg, height, width)))


def segmentation_rle(seg: list | dict, height: int, width: int) -> dict[str, Any]:
    """A (normalized) segmentation as one compressed RLE with bytes ``counts`` (pycocotools' own form)."""
    if isinstance(seg, list):
        return mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    counts = seg["counts"]
    return {"size": list(seg["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def rle_to_json(rle: dict[str, Any]) -> dict[str, Any]:
    """A pycocotools RLE with ``counts`` as str (JSON-ready)."""
    counts = rle["counts"]
    return {"size": [int(v) for v in rle["size"]], "counts": counts.decode("ascii") if isinstance(counts, bytes)
            else counts}


def to_coco(dataset: DetectionDataset, out: str | Path, images_root: str | Path) -> dict[str, int]:
    """Write ``dataset`` as a COCO instances file whose ``file_name``s are relative to ``images_root``.

    Image ids are 1..N in record order; category ids are 1..K in the dataset's class order (the original ids are
    kept as ``original_id``); YOLO-seg polygons are written as polygons, instance-mask PNGs as RLE, VOC
    ``difficult`` as a ``difficult`` flag (1/0) on the annotation; ``area`` is the mask area where there is a
    segmentation, else the box area. The annotations are those of the evaluation's ground truth
    (:func:`dataset_to_coco`).
    """
    root = Path(images_root)
    images, annotations = [], []
    for index, record in enumerate(dataset.records):
        width, height = record_size(record)
        image_id = index + 1
        images.append({"id": image_id, "file_name": Path(os.path.relpath(record.file, root)).as_posix(),
                       "width": width, "height": height})
        annotations += record_annotations(record, image_id, width, height, segmentation="known",
                                          first_id=len(annotations) + 1)
    categories = coco_categories(dataset)
    write_json({"images": images, "annotations": annotations, "categories": categories}, out, indent=None)
    return {"images": len(images), "annotations": len(annotations), "categories": len(categories)}


def _flag(values: np.ndarray, i: int) -> int:
    return int(bool(values[i])) if i < len(values) else 0


def _instance_masks(record: Record) -> np.ndarray | None:
    """Per-instance masks of an instance-id PNG record (instance_masks datasets), in box order."""
    if record.mask_file is None or record.segmentations is not None or not len(record.boxes):
        return None
    return instance_masks_from_ids(read_label_png(record.mask_file))


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value
