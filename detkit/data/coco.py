"""COCO JSON (instances): boxes, polygons and RLE masks (pycocotools), ``iscrowd``, negatives kept.

What each field may hold, and what happens otherwise (every error is one line naming the file, the field and the
value; every repair is counted in ``dataset.problems`` and reported once):

Structure (errors): the file is a JSON object whose ``images`` is a list and ``categories`` a non-empty list;
``annotations``, when present, a list. A category is a mapping with an integer ``id`` (0..2**63-1, unique) and a
non-empty string ``name`` (unique). An image is a mapping with an integer ``id`` (unique) and a non-empty string
``file_name`` inside the image folder; ``width`` and ``height``, when present and not null, integers in
1..``MAX_SIDE`` (absent: the image header's). "Integer" is a JSON integer or an integral float (``3.0``); never
``"3"``, ``1.5``, ``true``, NaN or infinity (see :mod:`detkit.data.fields`).

Per image (counted skips): a file that is missing, or whose header claims more than ``data.max_image_pixels``
pixels (not decoded). A header that cannot be read keeps the image; it fails, counted, when loaded.

Per annotation (counted drops, the annotation only): not a mapping; ``image_id`` not an integer or not an image's
id; ``category_id`` not an integer or not a category's id (a category left out by ``classes`` is not a problem);
``bbox`` not a list of 4 numbers; ``iscrowd`` other than 0/1/true/false (absent: 0). Boxes are then checked by
:meth:`DetectionDataset.clean_boxes`: non-finite, x2 < x1, outside the image or zero area are dropped, boxes
partly outside are clipped (counted). ``segmentation`` is checked when decoded
(:func:`detkit.data.fields.check_segmentation`): a malformed one makes the image unreadable (a one-line
:class:`DataError` at load, skipped and counted by the loader); absent, null or empty, the box is the mask.
Other keys (``area``, ``id``...) are not read (``id`` only names the annotation in messages).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from detkit.data.dataset import DetectionDataset, Record, box_mask, read_split, resolve_classes, safe_join
from detkit.data.fields import MAX_SIDE, as_int, bad_value, check_segmentation, exists, is_real, require_int, show
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
    except ValueError as e:  # an integer of more than 4300 digits
        raise DataError(f"{path}: malformed JSON ({str(e).split(':')[0]})") from None
    except RecursionError:
        raise DataError(f"{path}: malformed JSON (nested too deeply)") from None


def segmentation_to_mask(seg: Any, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) as an H x W uint8 mask; a malformed one
    (see :func:`detkit.data.fields.check_segmentation`) raises :class:`DataError` before pycocotools reads it."""
    check_segmentation(seg, height, width)
    if isinstance(seg, list):  # polygons [[x1, y1, x2, y2, ...], ...]; parts of < 3 points have no area
        polys = [[float(v) for v in p] for p in seg if len(p) >= 6]
        if not polys:
            return np.zeros((height, width), np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    elif isinstance(seg.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects({"size": [height, width], "counts": [int(v) for v in seg["counts"]]},
                                     height, width)
    else:  # compressed RLE
        counts = seg["counts"]
        rle = {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(rle).astype(np.uint8)


class CocoDataset(DetectionDataset):
    """``images``: the image folder; ``annotations``: the COCO JSON; ``split``: optional file of image ids or
    file stems; ``classes``: optional subset/order of category names (default: every category by id)."""

    task = "instance"

    def __init__(self, images: str | Path, annotations: str | Path, split: str | Path | None = None,
                 classes: Any = None, name: str | None = None, transform=None, with_masks: bool = True,
                 max_pixels: int | None = None) -> None:
        super().__init__(name or Path(annotations).stem, transform, max_pixels)
        self.root = Path(images)
        self.ann_file = Path(annotations)
        self.with_masks = with_masks
        data = read_json(self.ann_file)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise DataError(f"{self.ann_file}: not a COCO instances file (no 'images' list)")
        if "categories" not in data:
            raise DataError(f"{self.ann_file}: no 'categories'")
        if not isinstance(data["categories"], list) or not data["categories"]:
            raise bad_value(self.ann_file, "'categories'", data["categories"], "a non-empty list (no 'categories')")
        if not isinstance(data.get("annotations", []), list):
            raise bad_value(self.ann_file, "'annotations'", data["annotations"], "a list")
        if not self.root.is_dir():
            raise DataError(f"image folder not found: {self.root}")
        self._categories = self._read_categories(data["categories"])
        self._select_classes(self._categories, classes)
        self._parse(data, read_split(split))
        self.problems.report()

    def _read_categories(self, categories: list) -> dict[int, str]:
        out: dict[int, str] = {}
        for i, c in enumerate(categories):
            if not isinstance(c, dict) or "id" not in c or "name" not in c:
                raise DataError(f"{self.ann_file}: categories[{i}] = {show(c)}: every category needs an 'id' and a "
                                "'name'")
            cid = require_int(c["id"], self.ann_file, f"categories[{i}] 'id'")
            name = c["name"]
            if not isinstance(name, str) or not name.strip():
                raise bad_value(self.ann_file, f"category {cid} 'name'", name, "a non-empty string")
            if cid in out:
                raise DataError(f"{self.ann_file}: category id {cid} is repeated (categories[{i}])")
            if name in out.values():
                raise DataError(f"{self.ann_file}: category name {show(name)} is repeated (categories[{i}], id {cid})")
            out[cid] = name
        return out

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

    def _read_images(self, images: list) -> list[tuple[int, str, int | None, int | None]]:
        """``(id, file_name, width, height)`` of every image entry; a malformed entry is an error."""
        out, seen = [], set()
        for i, img in enumerate(images):
            if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
                raise DataError(f"{self.ann_file}: images[{i}] = {show(img)}: an image entry lacks 'id' or "
                                "'file_name'")
            iid = require_int(img["id"], self.ann_file, f"images[{i}] 'id'")
            if iid in seen:
                raise DataError(f"{self.ann_file}: image id {iid} is repeated (images[{i}])")
            seen.add(iid)
            name = img["file_name"]
            if not isinstance(name, str) or not name.strip() or "\0" in name:
                raise bad_value(self.ann_file, f"image {iid} 'file_name'", name, "a file name")
            size = [None if img.get(k) is None else require_int(img[k], self.ann_file, f"image {iid} '{k}'", 1,
                                                                  MAX_SIDE) for k in ("width", "height")]
            out.append((iid, name, *size))
        return out

    def _annotation_image(self, ann: Any, image_ids: set[int]) -> int | None:
        """The image id of an annotation, or ``None`` for one dropped (counted)."""
        if not isinstance(ann, dict):
            self.problems.add("annotations dropped (not a mapping)")
            return None
        iid = as_int(ann.get("image_id"))
        if iid is None:
            self.problems.add("annotations dropped (image_id not an integer)")
            return None
        if iid not in image_ids:
            self.problems.add(f"annotations dropped (unknown image id {iid})")
            return None
        return iid

    def _parse(self, data: dict, split: list[str] | None) -> None:
        label_of = self.cat_to_label()
        images = self._read_images(data["images"])
        image_ids = {iid for iid, *_ in images}
        anns_by_image: dict[int, list[dict]] = defaultdict(list)
        for ann in data.get("annotations", []):
            iid = self._annotation_image(ann, image_ids)
            if iid is not None:
                anns_by_image[iid].append(ann)
        keep_ids = set(split) if split is not None else None
        for iid, file_name, width, height in images:
            file = safe_join(self.root, file_name)
            if keep_ids is not None and str(iid) not in keep_ids and Path(file_name).stem not in keep_ids:
                continue
            if not exists(file):
                self.problems.add("images skipped (file not found)", file)
                continue
            header = self.image_header(file)
            if header is False:
                continue
            if width is None or height is None:  # the header's size (None when it cannot be read: load fails)
                width, height = header or (None, None)
            boxes, labels, crowd, segs, ann_ids = [], [], [], [], []
            for ann in anns_by_image.get(iid, []):
                cat = as_int(ann.get("category_id"))
                if cat is None:
                    self.problems.add("annotations dropped (category_id not an integer)", file)
                    continue
                if cat not in label_of:
                    if cat not in self._categories:
                        self.problems.add(f"annotations dropped (unknown category id {cat})", file)
                    continue  # a category left out by `classes`: not a problem
                bbox = ann.get("bbox")
                if not isinstance(bbox, list) or len(bbox) != 4 or not all(is_real(v) for v in bbox):
                    self.problems.add("annotations dropped (no valid bbox)", file)
                    continue
                iscrowd = ann.get("iscrowd", 0)
                if iscrowd not in (0, 1) or not isinstance(iscrowd, int | float):  # 0, 1, 0.0, 1.0, true, false
                    self.problems.add("annotations dropped (iscrowd not 0 or 1)", file)
                    continue
                x, y, w, h = (float(v) for v in bbox)
                boxes.append([x, y, x + w, y + h])
                labels.append(label_of[cat])
                crowd.append(bool(iscrowd))
                segs.append(ann.get("segmentation"))
                ann_ids.append(ann.get("id", -1))
            boxes_np = np.asarray(boxes, np.float64).reshape(-1, 4)
            keep = self.clean_boxes(boxes_np, width, height, file)
            self.records.append(Record(
                image_id=iid, file=file, width=width, height=height, boxes=boxes_np[keep].astype(np.float32),
                labels=np.asarray(labels, np.int64)[keep], iscrowd=np.asarray(crowd, bool)[keep],
                difficult=np.zeros(int(keep.sum()), bool),
                segmentations=[s for s, k in zip(segs, keep) if k], ann_ids=[a for a, k in zip(ann_ids, keep) if k],
                source=self.ann_file,
            ))

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
                    raise DataError(f"{record.file}: annotation {show(record.ann_ids[i])}: bad segmentation "
                                    f"({reason})") from None
            else:
                masks[i] = box_mask(record.boxes[i], h, w)
        sample["masks"] = masks
