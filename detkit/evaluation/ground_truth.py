"""Ground truth as an in-memory COCO dict: built from any detkit dataset (:func:`detkit.data.to_coco.dataset_to_coco`,
re-exported here), or read and checked from a JSON file.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from detkit.data.coco import read_json
from detkit.data.to_coco import dataset_to_coco, normalize_segmentation, rle_to_json, segmentation_area
from detkit.errors import DataError

__all__ = ["category_names", "check_ground_truth", "dataset_to_coco", "has_segmentation", "load_ground_truth",
           "normalize_segmentation", "rle_to_json"]


def load_ground_truth(path: str | Path) -> dict[str, Any]:
    """Read and check a COCO instances JSON file (its own category ids are kept)."""
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


