"""YOLO txt labels: ``class cx cy w h`` (normalized) per line, or YOLO-seg ``class x1 y1 x2 y2 ...`` polygons.

Label files mirror the image folder: ``<annotations>/<relative path>.txt``; when ``annotations`` is not set,
the ``images`` path with its last ``images`` component replaced by ``labels`` (the YOLO convention). An image
without a label file is a negative (counted). ``classes`` is required: a list of names (the class index is the
position), a mapping ``{id: name}``, or the dataset's YAML file (its ``names``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from detkit.data.coco import segmentation_to_mask
from detkit.data.dataset import DetectionDataset, Record, box_mask, list_images, read_split, resolve_classes
from detkit.errors import DataError


def default_label_dir(images: Path) -> Path:
    parts = list(images.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts)
    raise DataError(f"cannot guess the YOLO label folder of {images}: set data.*.annotations")


def parse_yolo_txt(path: Path, width: int, height: int) -> list[tuple[int, list[float], list[float] | None]]:
    """``[(class id, xyxy box in pixels, polygon in pixels or None), ...]``."""
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            cls = int(float(fields[0]))
            values = [float(v) for v in fields[1:]]
        except (ValueError, OverflowError):
            raise DataError(f"{path}:{lineno}: not numbers: {line.strip()[:60]!r}") from None
        if len(values) == 4:
            cx, cy, w, h = values
            box = [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
            rows.append((cls, box, None))
        elif len(values) >= 6 and len(values) % 2 == 0:
            xs, ys = np.asarray(values[0::2]) * width, np.asarray(values[1::2]) * height
            poly = np.stack([xs, ys], 1).reshape(-1).tolist()
            rows.append((cls, [xs.min(), ys.min(), xs.max(), ys.max()], poly))
        else:
            raise DataError(f"{path}:{lineno}: expected 'class cx cy w h' or 'class x1 y1 x2 y2 x3 y3 ...', "
                            f"got {len(fields)} fields")
    return rows


class YoloDataset(DetectionDataset):
    def __init__(self, images: str | Path, annotations: str | Path | None = None, split: str | Path | None = None,
                 classes: Any = None, name: str | None = None, transform=None, with_masks: bool = True) -> None:
        super().__init__(name or Path(images).name, transform)
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
            try:
                with Image.open(file) as im:  # header only: the size to denormalize with
                    width, height = im.size
            except (OSError, SyntaxError, ValueError):
                self.problems.add("images skipped (cannot be read)", file)
                continue
            boxes, labels, polys = [], [], []
            if label_file.is_file():
                seen_labels.add(label_file.resolve())
                for cls, box, poly in parse_yolo_txt(label_file, width, height):
                    if cls not in label_of:
                        self.problems.add(f"labels dropped (unknown class id {cls})", label_file)
                        continue
                    boxes.append(box)
                    labels.append(label_of[cls])
                    polys.append([poly] if poly is not None else None)
                    self.has_polygons |= poly is not None
            else:
                self.problems.add("images without a label file (kept as negatives)", file)
            boxes_np = np.asarray(boxes, np.float32).reshape(-1, 4)
            keep = self.clean_boxes(boxes_np, width, height, label_file)
            n = int(keep.sum())
            self.records.append(Record(
                image_id=index, file=file, width=width, height=height, boxes=boxes_np[keep],
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
