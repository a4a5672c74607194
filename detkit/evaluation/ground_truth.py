"""Ground truth as an in-memory COCO dict: built from any detkit dataset, or read and checked from a JSON file.

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
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from detkit.data.dataset import DetectionDataset, Record, instance_masks_from_ids, read_label_png
from detkit.errors import DataError


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


def load_ground_truth(path: str | Path) -> dict[str, Any]:
    """Read and check a COCO instances JSON file (its own category ids are kept)."""
    from detkit.data.coco import read_json

    return check_ground_truth(read_json(Path(path)), source=str(path))


def check_ground_truth(data: Any, source: str = "ground truth") -> dict[str, Any]:
    """Check a COCO ground-truth dict and return a copy with COCOeval's required fields filled in: annotation
    ``id`` (numbered when missing), ``iscrowd`` (0), ``area`` (from the segmentation or the box), ``difficult``
    (0). Raises :class:`DataError` naming ``source`` and the entry."""
    if not isinstance(data, Mapping) or not isinstance(data.get("images"), list):
        raise DataError(f"{source}: not a COCO ground truth (no 'images' list)")
    if not isinstance(data.get("categories"), list) or not data["categories"]:
        raise DataError(f"{source}: no 'categories'")
    images: dict[Any, dict] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, Mapping) or not isinstance(img.get("id"), int | str) or isinstance(img["id"], bool):
            raise DataError(f"{source}: image {i}: needs an integer 'id'")
        if img["id"] in images:
            raise DataError(f"{source}: image {i}: id {img['id']!r} is repeated")
        for key in ("width", "height"):  # needed for masks only
            value = img.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise DataError(f"{source}: image {img['id']!r}: '{key}' must be a positive int, got {value!r}")
        images[img["id"]] = img
    categories = []
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, Mapping) or not isinstance(cat.get("id"), int | str) or isinstance(cat["id"], bool):
            raise DataError(f"{source}: category {i}: needs an 'id'")
        categories.append({**cat, "name": str(cat.get("name", cat["id"]))})
    if len({c["id"] for c in categories}) != len(categories):
        raise DataError(f"{source}: category ids are repeated")
    annotations = []
    used_ids = {a.get("id") for a in data.get("annotations") or [] if isinstance(a, Mapping)}
    next_id = max([v for v in used_ids if isinstance(v, int)], default=0) + 1
    seen: set = set()
    for i, ann in enumerate(data.get("annotations") or []):
        where = f"{source}: annotation {i}"
        if not isinstance(ann, Mapping):
            raise DataError(f"{where}: not a mapping")
        img = images.get(ann.get("image_id")) if isinstance(ann.get("image_id"), int | str) else None
        if img is None:
            raise DataError(f"{where}: image_id {ann.get('image_id')!r} is not an image of the file")
        bbox = ann.get("bbox")
        if not _is_box(bbox):
            raise DataError(f"{where}: 'bbox' must be 4 finite numbers [x, y, w, h] with w, h >= 0, got {bbox!r:.80}")
        out = dict(ann)
        if not isinstance(out.get("id"), int) or out["id"] in seen:
            out["id"], next_id = next_id, next_id + 1
        seen.add(out["id"])
        out["iscrowd"] = int(bool(out.get("iscrowd", 0)))
        out["difficult"] = int(bool(out.get("difficult", 0)))
        if "segmentation" in out:
            if img.get("width") is None or img.get("height") is None:
                raise DataError(f"{where}: has a segmentation but image {img['id']!r} has no width/height")
            try:
                seg = normalize_segmentation(out["segmentation"], img["height"], img["width"])
            except DataError as e:
                raise DataError(f"{where}: {e}") from None
            if seg is None:
                del out["segmentation"]
            else:
                out["segmentation"] = seg
        if not _is_number(out.get("area")):
            out["area"] = (segmentation_area(out["segmentation"], img["height"], img["width"])
                           if "segmentation" in out else float(bbox[2]) * float(bbox[3]))
        annotations.append(out)
    return {**{k: v for k, v in data.items() if k not in ("images", "annotations", "categories")},
            "images": list(data["images"]), "annotations": annotations, "categories": categories}


def category_names(gt: Mapping[str, Any], class_names: Iterable[str] | None = None) -> dict[Any, str]:
    """``{category id: name}`` in id order; ``class_names`` (one per category, id order) replaces the names.
    Repeated names get ``#id`` appended, so names can key per-class tables."""
    ids = sorted((c["id"] for c in gt["categories"]), key=_sort_key)
    given = {c["id"]: str(c.get("name", c["id"])) for c in gt["categories"]}
    if class_names is not None:
        class_names = [str(n) for n in class_names]
        if len(class_names) != len(ids):
            raise DataError(f"class_names has {len(class_names)} names for {len(ids)} ground-truth categories")
        given = dict(zip(ids, class_names))
    names = [given[i] for i in ids]
    return {i: (n if names.count(n) == 1 else f"{n}#{i}") for i, n in zip(ids, names)}


def has_segmentation(gt: Mapping[str, Any]) -> bool:
    """Whether any ground-truth annotation has a segmentation (segm AP needs them)."""
    return any("segmentation" in a for a in gt.get("annotations", []))


def _sort_key(value: Any) -> tuple[int, Any]:
    return (0, value) if isinstance(value, int) else (1, str(value))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_box(bbox: Any) -> bool:
    return (isinstance(bbox, list | tuple) and len(bbox) == 4 and all(map(_is_number, bbox))
            and bbox[2] >= 0 and bbox[3] >= 0)


def _flag(values: np.ndarray, i: int) -> int:
    return int(bool(values[i])) if i < len(values) else 0


def _instance_masks(record: Record) -> np.ndarray | None:
    """Per-instance masks of an instance-id PNG record (instance_masks datasets), in box order."""
    if record.mask_file is None or record.segmentations is not None or not len(record.boxes):
        return None
    return instance_masks_from_ids(read_label_png(record.mask_file))


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value
