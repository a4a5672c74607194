"""Pascal VOC XML: standard (``JPEGImages``/``Annotations``/``ImageSets/Main/*.txt``) and flat layouts.

Coordinates are used as written (VOC's 1-based corners are not shifted). ``difficult`` is kept for VOC
evaluation. Classes come from config (objects of other names are dropped and counted) or are discovered
(sorted names).

XML is parsed with ``defusedxml``: a file that declares a DTD (the carrier of entity expansion, "billion laughs",
and of external entities) is refused with a one-line :class:`DataError`, whatever the platform's expat.

What each field may hold, and what happens otherwise (errors are one line naming the file, the tag and the text;
repairs are counted in ``dataset.problems`` and reported once):

Errors (the file is malformed): not XML, a root other than ``<annotation>``, an ``<object>`` without
``<bndbox>``, a ``<bndbox>`` corner (``<xmin>``, ``<ymin>``, ``<xmax>``, ``<ymax>``) that is missing or not a
finite number (``abc``, ``nan``, ``inf``, ``1e999``), a ``<size>`` ``<width>``/``<height>`` that is not an integer
in 1..``MAX_SIDE`` (``-5``, ``640.5``, ``nan``), and any tag read here holding elements instead of text.

Counted repairs: ``<width>``/``<height>`` 0 (written by tools that do not know it) or absent: the image header's
size (0 is counted); an ``<object>`` without a ``<name>``: dropped; ``<difficult>`` other than 0/1/true/false
(absent: 0): the object dropped; an image not found (from ``<filename>``, else the XML's stem) or whose header
claims more than ``data.max_image_pixels`` pixels: skipped. Corners are finite numbers in any range: boxes are
checked by :meth:`DetectionDataset.clean_boxes` (dropped or clipped, counted). Other tags (``<truncated>``,
``<pose>``, ``<segmented>``...) are not read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element, ParseError

import numpy as np
from defusedxml import DefusedXmlException, DTDForbidden, EntitiesForbidden, ExternalReferenceForbidden
from defusedxml.ElementTree import fromstring

from detkit.data.dataset import IMAGE_SUFFIXES, DetectionDataset, Record, read_split, resolve_classes, safe_join
from detkit.data.fields import MAX_SIDE, exists, show, text_number
from detkit.errors import DataError


def parse_xml(path: Path, text: bytes) -> Element:
    """``text`` as an element tree, refusing DTDs, entity declarations and external references."""
    try:
        return fromstring(text, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except ParseError as e:
        raise DataError(f"{path}: malformed XML ({e})") from None
    except DTDForbidden as e:
        raise DataError(f"{path}: refused: the XML declares a DTD (<!DOCTYPE {e.name}>), which can expand entities "
                        "or read external files") from None
    except EntitiesForbidden as e:
        raise DataError(f"{path}: refused: the XML declares the entity {e.name!r}") from None
    except ExternalReferenceForbidden as e:
        raise DataError(f"{path}: refused: the XML refers to an external resource ({show(e.sysid)})") from None
    except (DefusedXmlException, ValueError) as e:  # anything else defusedxml or the parser refuses
        raise DataError(f"{path}: refused XML ({type(e).__name__})") from None


def _text(path: Path, node: Element | None, tag: str) -> str | None:
    """The stripped text of ``node``'s child ``tag`` (``None``: no such child, or no text)."""
    child = node.find(tag) if node is not None else None
    if child is None:
        return None
    if len(child):
        raise DataError(f"{path}: <{tag}> holds elements ({show(child[0].tag)}), not text")
    text = (child.text or "").strip()
    return text or None


def _corner(path: Path, box: Element, tag: str) -> float:
    text = _text(path, box, tag)
    if text is None:
        raise DataError(f"{path}: missing <{tag}>")
    x = text_number(text)
    if x is None:
        raise DataError(f"{path}: <{tag}> is not a number: {show(text)} (a finite number)")
    return x


def _side(path: Path, size: Element | None, tag: str) -> int | None:
    """``<size><width>`` / ``<height>``: ``None`` when absent; 0 (unknown) is returned as 0."""
    text = _text(path, size, tag)
    if text is None:
        return None
    x = text_number(text)
    if x is None or not x.is_integer() or not 0 <= x <= MAX_SIDE:
        raise DataError(f"{path}: <size><{tag}> = {show(text)}: expected an integer in 1..{MAX_SIDE} (or 0: unknown)")
    return int(x)


DIFFICULT = {"0": False, "1": True, "false": False, "true": True}


def parse_voc_xml(path: Path) -> dict[str, Any]:
    """``{filename, width, height, objects: [{name, difficult, box}]}``; ``width``/``height`` ``None`` when
    absent, 0 when the file says 0; an object's ``name`` ``""`` when absent and ``difficult`` ``None`` when it is
    not 0/1 (both dropped and counted by :class:`VocDataset`)."""
    try:
        text = path.read_bytes()  # bytes: the XML declaration's encoding is honoured
    except FileNotFoundError:
        raise DataError(f"annotation file not found: {path}") from None
    if not text.strip():
        raise DataError(f"{path}: annotation file is empty")
    root = parse_xml(path, text)
    if root.tag != "annotation":
        raise DataError(f"{path}: not a VOC annotation (root element <{show(root.tag)}>)")
    size = root.find("size")
    objects = []
    for obj in root.findall("object"):
        name = _text(path, obj, "name") or ""
        box = obj.find("bndbox")
        if box is None:
            raise DataError(f"{path}: an <object> ({show(name)}) has no <bndbox>")
        difficult = _text(path, obj, "difficult")
        objects.append({
            "name": name,
            "difficult": DIFFICULT.get((difficult or "0").lower()),
            "box": [_corner(path, box, t) for t in ("xmin", "ymin", "xmax", "ymax")],
        })
    return {"filename": _text(path, root, "filename") or "", "width": _side(path, size, "width"),
            "height": _side(path, size, "height"), "objects": objects}


class VocDataset(DetectionDataset):
    """``images``: image folder; ``annotations``: XML folder; ``split``: optional file of image stems."""

    def __init__(self, images: str | Path, annotations: str | Path, split: str | Path | None = None,
                 classes: Any = None, name: str | None = None, transform=None, max_pixels: int | None = None) -> None:
        super().__init__(name or Path(images).parent.name or "voc", transform, max_pixels)
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
            names = sorted({o["name"] for _, p in parsed for o in p["objects"] if o["name"]})
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
            header = self.image_header(file)
            if header is False:
                continue
            width, height = p["width"], p["height"]
            if 0 in (width, height):
                self.problems.add("image sizes taken from the image (<size> 0 in the XML)", xml)
            if not width or not height:  # absent or 0: the header's (None when unreadable: the image fails to load)
                width, height = header or (None, None)
            boxes, labels, difficult = [], [], []
            for obj in p["objects"]:
                if not obj["name"]:
                    self.problems.add("objects dropped (no <name>)", xml)
                    continue
                if obj["name"] not in label_of:
                    self.problems.add(f"objects dropped (unknown class {show(obj['name'])})", xml)
                    continue
                if obj["difficult"] is None:
                    self.problems.add("objects dropped (<difficult> not 0 or 1)", xml)
                    continue
                boxes.append(obj["box"])
                labels.append(label_of[obj["name"]])
                difficult.append(obj["difficult"])
            boxes_np = np.asarray(boxes, np.float64).reshape(-1, 4)
            keep = self.clean_boxes(boxes_np, width, height, xml)
            n = int(keep.sum())
            self.records.append(Record(
                image_id=index, file=file, width=width, height=height, boxes=boxes_np[keep].astype(np.float32),
                labels=np.asarray(labels, np.int64)[keep], iscrowd=np.zeros(n, bool),
                difficult=np.asarray(difficult, bool)[keep], source=xml,
            ))
        self.problems.report()

    def _image_file(self, xml: Path, filename: str) -> Path | None:
        if filename:
            path = safe_join(self.root, filename, "<filename>")
            if exists(path):
                return path
        for suffix in IMAGE_SUFFIXES:  # the XML's <filename> is often stale: fall back to the XML's stem
            path = self.root / f"{xml.stem}{suffix}"
            if path.is_file():
                return path
        return None
