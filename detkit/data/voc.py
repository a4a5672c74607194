"""Pascal VOC XML: standard (``JPEGImages``/``Annotations``/``ImageSets/Main/*.txt``) and flat layouts.

Coordinates are used as written (VOC's 1-based corners are not shifted). ``difficult`` is kept for VOC
evaluation. Classes come from config (objects of other names are dropped and counted) or are discovered
(sorted names).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from detkit.data.dataset import IMAGE_SUFFIXES, DetectionDataset, Record, read_split, resolve_classes, safe_join
from detkit.errors import DataError


def parse_voc_xml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_bytes()  # bytes: the XML declaration's encoding is honoured
    except FileNotFoundError:
        raise DataError(f"annotation file not found: {path}") from None
    if not text.strip():
        raise DataError(f"{path}: annotation file is empty")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise DataError(f"{path}: malformed XML ({e})") from None
    if root.tag != "annotation":
        raise DataError(f"{path}: not a VOC annotation (root element <{root.tag}>)")

    def number(node: ET.Element | None, tag: str) -> float:
        child = node.find(tag) if node is not None else None
        if child is None or child.text is None:
            raise DataError(f"{path}: missing <{tag}>")
        try:
            return float(child.text)
        except ValueError:
            raise DataError(f"{path}: <{tag}> is not a number: {child.text!r}") from None

    size = root.find("size")
    width = int(number(size, "width")) if size is not None and size.find("width") is not None else None
    height = int(number(size, "height")) if size is not None and size.find("height") is not None else None
    objects = []
    for obj in root.findall("object"):
        name = (obj.findtext("name") or "").strip()
        box = obj.find("bndbox")
        if box is None:
            raise DataError(f"{path}: an <object> ({name}) has no <bndbox>")
        objects.append({
            "name": name,
            "difficult": (obj.findtext("difficult") or "0").strip() == "1",
            "box": [number(box, t) for t in ("xmin", "ymin", "xmax", "ymax")],
        })
    return {"filename": (root.findtext("filename") or "").strip(), "width": width or None,
            "height": height or None, "objects": objects}


class VocDataset(DetectionDataset):
    """``images``: image folder; ``annotations``: XML folder; ``split``: optional file of image stems."""

    def __init__(self, images: str | Path, annotations: str | Path, split: str | Path | None = None,
                 classes: Any = None, name: str | None = None, transform=None) -> None:
        super().__init__(name or Path(images).parent.name or "voc", transform)
        self.root, self.ann_dir = Path(images), Path(annotations)
        if not self.root.is_dir():
            raise DataError(f"image folder not found: {self.root}")
        if not self.ann_dir.is_dir():
            raise DataError(f"annotation folder not found: {self.ann_dir}")
        stems = read_split(split)
        xml_files = [self.ann_dir / f"{s}.xml" for s in stems] if stems is not None \
            else sorted(self.ann_dir.glob("*.xml"))
        if not xml_files:
            raise DataError(f"no .xml annotation files in {self.ann_dir}")
        parsed = [(f, parse_voc_xml(f)) for f in xml_files]
        given = resolve_classes(classes)
        if given is None:
            names = sorted({o["name"] for _, p in parsed for o in p["objects"]})
            if not names:
                raise DataError(f"no objects in {self.ann_dir}: set data.*.classes")
            given = (names, names)
        self.classes, self.cat_ids = list(given[0]), list(given[0])
        label_of = {n: i + 1 for i, n in enumerate(self.classes)}
        for index, (xml, p) in enumerate(parsed):
            file = self._image_file(xml, p["filename"])
            if file is None:
                self.problems.add("images skipped (file not found)", xml)
                continue
            boxes, labels, difficult = [], [], []
            for obj in p["objects"]:
                if obj["name"] not in label_of:
                    self.problems.add(f"objects dropped (unknown class {obj['name']!r})", xml)
                    continue
                boxes.append(obj["box"])
                labels.append(label_of[obj["name"]])
                difficult.append(obj["difficult"])
            boxes_np = np.asarray(boxes, np.float32).reshape(-1, 4)
            keep = self.clean_boxes(boxes_np, p["width"], p["height"], xml)
            n = int(keep.sum())
            self.records.append(Record(
                image_id=index, file=file, width=p["width"], height=p["height"], boxes=boxes_np[keep],
                labels=np.asarray(labels, np.int64)[keep], iscrowd=np.zeros(n, bool),
                difficult=np.asarray(difficult, bool)[keep], source=xml,
            ))
        self.problems.report()

    def _image_file(self, xml: Path, filename: str) -> Path | None:
        if filename:
            path = safe_join(self.root, filename, "<filename>")
            if path.is_file():
                return path
        for suffix in IMAGE_SUFFIXES:  # the XML's <filename> is often stale: fall back to the XML's stem
            path = self.root / f"{xml.stem}{suffix}"
            if path.is_file():
                return path
        return None
