"""YOLO txt labels: ``class cx cy w h`` (normalized) per line, or YOLO-seg ``class x1 y1 x2 y2 ...`` polygons.

Label files mirror the image folder: ``<annotations>/<relative path>.txt``; when ``annotations`` is not set,
the ``images`` path with its last ``images`` component replaced by ``labels`` (the YOLO convention). An image
without a label file is a negative (counted). ``classes`` is required: a list of names (the class index is the
position), a mapping ``{id: name}``, or the dataset's YAML file (its ``names``).

What a line may hold, and what happens otherwise (errors are one line naming the file, the line and the field;
repairs are counted in ``dataset.problems`` and reported once):

Errors (the file is malformed): a line whose fields are not finite numbers (``abc``, ``nan``, ``inf``,
``1e999``), whose class is not an integer (``0.7`` is an error, not class 0; ``1.0`` is 1), or that has neither
5 fields nor an odd number >= 7 (a class and pairs of coordinates); a label file that is not UTF-8.

Counted repairs: a class that is not one of ``classes`` (negative, huge, unknown): the line dropped; coordinates
in any finite range: the box is checked by :meth:`DetectionDataset.clean_boxes` (dropped when negative in size,
outside the image or of zero area, clipped when partly outside; a box that overflows to infinity in pixels is
dropped as not finite); polygon vertices further than one image size outside the image: clamped there (counted).
An image whose header cannot be read, or claims more than ``data.max_image_pixels`` pixels: skipped.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from detkit.data.coco import segmentation_to_mask
from detkit.data.dataset import DetectionDataset, Record, box_mask, list_images, read_split, resolve_classes
from detkit.data.fields import SEGMENT_MARGIN, show, text_int, text_number
from detkit.errors import DataError


def default_label_dir(images: Path) -> Path:
    parts = list(images.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts)
    raise DataError(f"cannot guess the YOLO label folder of {images}: set data.*.annotations")


def parse_yolo_txt(path: Path, width: int, height: int
                   ) -> list[tuple[int, list[float], list[float] | None, bool]]:
    """``[(class id, xyxy box in pixels, polygon in pixels or None, polygon clamped), ...]``; polygon vertices
    further than ``SEGMENT_MARGIN`` image sizes outside the image are clamped there (``True`` when any was)."""
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        numbers = [text_number(f) for f in fields]
        bad = [k for k, x in enumerate(numbers) if x is None]
        if bad:
            raise DataError(f"{path}:{lineno}: not numbers: {show(line.strip(), 60)} (field {bad[0] + 1}, "
                            f"{show(fields[bad[0]])}, is not a finite number)")
        cls = text_int(fields[0])
        if cls is None:
            raise DataError(f"{path}:{lineno}: class {show(fields[0])} is not an integer (a class index)")
        values: list[float] = numbers[1:]  # type: ignore[assignment]
        if len(values) == 4:
            cx, cy, w, h = values
            box = [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
            rows.append((cls, box, None, False))
        elif len(values) >= 6 and len(values) % 2 == 0:
            xs = [x * width for x in values[0::2]]
            ys = [y * height for y in values[1::2]]
            box = [min(xs), min(ys), max(xs), max(ys)]  # the box keeps the polygon's extent (clean_boxes clips it)
            lo_x, hi_x = -SEGMENT_MARGIN * width, (1 + SEGMENT_MARGIN) * width
            lo_y, hi_y = -SEGMENT_MARGIN * height, (1 + SEGMENT_MARGIN) * height
            clamped = any(not lo_x <= x <= hi_x for x in xs) or any(not lo_y <= y <= hi_y for y in ys)
            if not all(map(math.isfinite, box)):
                poly = None  # the box is dropped as not finite
            else:
                poly = [v for x, y in zip(xs, ys) for v in (min(max(x, lo_x), hi_x), min(max(y, lo_y), hi_y))]
            rows.append((cls, box, poly, clamped))
        else:
            raise DataError(f"{path}:{lineno}: expected 'class cx cy w h' or 'class x1 y1 x2 y2 x3 y3 ...', "
                            f"got {len(fields)} fields")
    return rows


class YoloDataset(DetectionDataset):
    def __init__(self, images: str | Path, annotations: str | Path | None = None, split: str | Path | None = None,
                 classes: Any = None, name: str | None = None, transform=None, with_masks: bool = True,
                 max_pixels: int | None = None) -> None:
        super().__init__(name or Path(images).name, transform, max_pixels)
        self.root = Path(images)
        self.label_dir = Path(annotations) if annotations else default_label_dir(self.root)
        self.with_masks = with_masks
        given = resolve_classes(classes)
        if given is None:
            raise DataError("the yolo format needs data.*.classes: a list of names, {id: name}, or the dataset's YAML")
        self.classes, self.cat_ids = list(given[0]), list(given[1])
        label_of = self.cat_to_label()
        images_found = list_images(self.root)
        stems = read_split(split)
        if stems is not None:
            wanted = set(stems)
            images_found = [p for p in images_found if p.stem in wanted or str(p.relative_to(self.root)) in wanted]
        if not images_found:
            raise DataError(f"no images in {self.root}")
        self.has_polygons = False
        seen_labels = set()
        for index, file in enumerate(images_found):
            label_file = self.label_dir / file.relative_to(self.root).with_suffix(".txt")
            header = self.image_header(file)  # header only: the size to denormalize with
            if header is False:
                continue
            if header is None:
                self.problems.add("images skipped (cannot be read)", file)
                continue
            width, height = header
            boxes, labels, polys = [], [], []
            if label_file.is_file():
                seen_labels.add(label_file.resolve())
                for cls, box, poly, clamped in parse_yolo_txt(label_file, width, height):
                    if cls not in label_of:
                        self.problems.add(f"labels dropped (unknown class id {show(cls)})", label_file)
                        continue
                    if clamped:
                        self.problems.add("polygons clamped (vertices far outside the image)", label_file)
                    boxes.append(box)
                    labels.append(label_of[cls])
                    polys.append([poly] if poly is not None else None)
                    self.has_polygons |= poly is not None
            else:
                self.problems.add("images without a label file (kept as negatives)", file)
            boxes_np = np.asarray(boxes, np.float64).reshape(-1, 4)
            keep = self.clean_boxes(boxes_np, width, height, label_file)
            n = int(keep.sum())
            self.records.append(Record(
                image_id=index, file=file, width=width, height=height, boxes=boxes_np[keep].astype(np.float32),
                labels=np.asarray(labels, np.int64)[keep], iscrowd=np.zeros(n, bool), difficult=np.zeros(n, bool),
                segmentations=[p for p, k in zip(polys, keep) if k], source=label_file,
            ))
        if self.label_dir.is_dir() and stems is None:
            orphans = [p for p in self.label_dir.rglob("*.txt") if p.resolve() not in seen_labels]
            for p in orphans:
                self.problems.add("label files without an image (ignored)", p)
        self.problems.report()

    def add_masks(self, sample: dict[str, Any], record: Record) -> None:
        if not (self.with_masks and self.has_polygons):
            return
        h, w = sample["orig_size"]
        masks = np.zeros((len(record.boxes), h, w), np.uint8)
        for i, seg in enumerate(record.segmentations or []):
            if seg is not None:
                masks[i] = segmentation_to_mask(seg, h, w)
            else:
                masks[i] = box_mask(record.boxes[i], h, w)
        sample["masks"] = masks
