"""COCO JSON (instances): boxes, polygons and RLE masks (pycocotools), ``iscrowd``, negatives kept."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from detkit.data.dataset import DetectionDataset, Record, box_mask, read_split, resolve_classes, safe_join
from detkit.errors import DataError


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise DataError(f"{path}: annotation file is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def segmentation_to_mask(seg: Any, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) as an H x W uint8 mask."""
    if isinstance(seg, list):  # polygons [[x1, y1, x2, y2, ...], ...]
        polys = [p for p in seg if len(p) >= 6]
        if not polys:
            return np.zeros((height, width), np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(seg, *seg["size"])
    elif isinstance(seg, dict):  # compressed RLE
        rle = dict(seg)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise DataError(f"unsupported segmentation of type {type(seg).__name__}")
    m = mask_utils.decode(rle)
    if m.shape != (height, width):
        raise DataError(f"mask of size {m.shape[1]}x{m.shape[0]} for an image of {width}x{height}")
    return m.astype(np.uint8)


class CocoDataset(DetectionDataset):
    """``images``: the image folder; ``annotations``: the COCO JSON; ``split``: optional file of image ids or
    file stems; ``classes``: optional subset/order of category names (default: every category by id)."""

    task = "instance"

    def __init__(self, images: str | Path, annotations: str | Path, split: str | Path | None = None,
                 classes: Any = None, name: str | None = None, transform=None, with_masks: bool = True) -> None:
        super().__init__(name or Path(annotations).stem, transform)
        self.root = Path(images)
        self.ann_file = Path(annotations)
        self.with_masks = with_masks
        data = read_json(self.ann_file)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise DataError(f"{self.ann_file}: not a COCO instances file (no 'images' list)")
        if not isinstance(data.get("categories"), list) or not data["categories"]:
            raise DataError(f"{self.ann_file}: no 'categories'")
        if not self.root.is_dir():
            raise DataError(f"image folder not found: {self.root}")
        try:
            categories = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{self.ann_file}: every category needs an 'id' and a 'name'") from None
        self._select_classes(categories, classes)
        self._parse(data, read_split(split))
        self.problems.report()

    def _select_classes(self, categories: dict[int, str], classes: Any) -> None:
        wanted = resolve_classes(classes)
        if wanted is None:
            self.cat_ids = sorted(categories)
            self.classes = [categories[c] for c in self.cat_ids]
            return
        by_name = {v: k for k, v in categories.items()}
        unknown = [n for n in wanted[0] if n not in by_name]
        if unknown:
            raise DataError(f"{self.ann_file}: classes {unknown} are not categories of this file "
                            f"(it has {', '.join(sorted(by_name))})")
        self.classes = list(wanted[0])
        self.cat_ids = [by_name[n] for n in self.classes]

    def _parse(self, data: dict, split: list[str] | None) -> None:
        label_of = self.cat_to_label()
        anns_by_image: dict[int, list[dict]] = defaultdict(list)
        image_ids = set()
        for img in data["images"]:
            if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
                raise DataError(f"{self.ann_file}: an image entry lacks 'id' or 'file_name': {str(img)[:80]}")
            if not isinstance(img["id"], int | str) or img["id"] in image_ids:
                raise DataError(f"{self.ann_file}: image id {img['id']!r} is repeated or not a number/string")
            for key in ("width", "height"):
                if img.get(key) is not None and not isinstance(img[key], int):
                    raise DataError(f"{self.ann_file}: image {img['id']!r} has {key} {img[key]!r} (not an int)")
            image_ids.add(img["id"])
        for ann in data.get("annotations", []):
            if not isinstance(ann, dict):
                self.problems.add("annotations dropped (not a mapping)")
                continue
            if ann.get("image_id") not in image_ids:
                self.problems.add(f"annotations dropped (unknown image id {ann.get('image_id')})")
                continue
            anns_by_image[ann["image_id"]].append(ann)
        keep_ids = set(split) if split is not None else None
        for img in data["images"]:
            file = safe_join(self.root, str(img["file_name"]))
            if keep_ids is not None and str(img["id"]) not in keep_ids and Path(str(img["file_name"])).stem \
                    not in keep_ids:
                continue
            if not file.is_file():
                self.problems.add("images skipped (file not found)", file)
                continue
            width, height = img.get("width"), img.get("height")
            boxes, labels, crowd, segs, ann_ids = [], [], [], [], []
            for ann in anns_by_image.get(img["id"], []):
                cat = ann.get("category_id")
                if cat not in label_of:
                    if cat not in self._all_categories(data):
                        self.problems.add(f"annotations dropped (unknown category id {cat})", file)
                    continue  # a category left out by `classes`: not a problem
                bbox = ann.get("bbox")
                if not isinstance(bbox, list) or len(bbox) != 4 or not all(
                        isinstance(v, int | float) and not isinstance(v, bool) for v in bbox):
                    self.problems.add("annotations dropped (no valid bbox)", file)
                    continue
                x, y, w, h = (float(v) for v in bbox)
                boxes.append([x, y, x + w, y + h])
                labels.append(label_of[cat])
                crowd.append(bool(ann.get("iscrowd", 0)))
                segs.append(ann.get("segmentation"))
                ann_ids.append(ann.get("id", -1))
            boxes_np = np.asarray(boxes, np.float32).reshape(-1, 4)
            keep = self.clean_boxes(boxes_np, width, height, file)
            self.records.append(Record(
                image_id=int(img["id"]), file=file, width=width, height=height, boxes=boxes_np[keep],
                labels=np.asarray(labels, np.int64)[keep], iscrowd=np.asarray(crowd, bool)[keep],
                difficult=np.zeros(int(keep.sum()), bool),
                segmentations=[s for s, k in zip(segs, keep) if k], ann_ids=[a for a, k in zip(ann_ids, keep) if k],
                source=self.ann_file,
            ))

    def _all_categories(self, data: dict) -> set:
        if not hasattr(self, "_category_ids"):
            self._category_ids = {int(c["id"]) for c in data["categories"]}
        return self._category_ids

    def add_masks(self, sample: dict[str, Any], record: Record) -> None:
        if not self.with_masks:
            return
        h, w = sample["orig_size"]
        masks = np.zeros((len(record.boxes), h, w), np.uint8)
        for i, seg in enumerate(record.segmentations or []):
            if seg:
                try:
                    masks[i] = segmentation_to_mask(seg, h, w)
                except Exception as e:  # malformed polygon / RLE: this image is skipped and counted
                    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                    raise DataError(f"{record.file}: annotation {record.ann_ids[i]}: bad segmentation ({reason})") \
                        from None
            else:
                masks[i] = box_mask(record.boxes[i], h, w)
        sample["masks"] = masks
