"""Any detkit dataset written as YOLO txt or Pascal VOC XML (``detkit data convert ... --to yolo|voc OUT``; COCO JSON
is :func:`detkit.data.to_coco.to_coco`).

- **YOLO**: ``OUT/labels/<image path relative to the image folder>.txt`` with ``class cx cy w h`` per object
  (class = label - 1, coordinates normalised by the image size, 6 decimals) and ``OUT/dataset.yaml``: the class
  names and the detkit data config that reads it back (``format: yolo``, the original image folder).
- **VOC**: ``OUT/<image stem>.xml`` per image (``filename``, ``size``, one ``object`` per box: ``name``,
  ``difficult``, ``bndbox`` in pixels with 2 decimals) and ``OUT/dataset.yaml`` likewise (``format: voc``).

The images themselves are not copied. YOLO and VOC have no crowd regions: crowd boxes are left out and counted.
"""

from __future__ import annotations

from pathlib import Path
from xml.etree import ElementTree as ET

from detkit.data.dataset import DetectionDataset
from detkit.data.to_coco import record_size
from detkit.errors import DataError
from detkit.utils.io import write_text


def _relative(file: Path, root: Path) -> Path:
    try:
        return Path(file).resolve().relative_to(Path(root).resolve())
    except ValueError:
        raise DataError(f"{file}: not inside the image folder {root} (--images)") from None


def _dataset_yaml(dataset: DetectionDataset, fmt: str, images: Path, annotations: Path) -> str:
    names = ", ".join(f'"{n}"' for n in dataset.classes)
    return (f"# {dataset.name} as {fmt} (detkit data convert)\nclasses: [{names}]\ndata:\n  train:\n"
            f"    format: {fmt}\n    images: {Path(images).resolve()}\n    annotations: {Path(annotations).resolve()}\n"
            f"    classes: [{names}]\n")


def _boxes(record) -> list[tuple[list[float], int, bool, bool]]:
    """``(xyxy box, label, difficult, crowd)`` of a record."""
    n = len(record.boxes)
    difficult = list(record.difficult) + [False] * n
    crowd = list(record.iscrowd) + [False] * n
    return [([float(v) for v in b], int(label), bool(difficult[i]), bool(crowd[i]))
            for i, (b, label) in enumerate(zip(record.boxes.tolist(), record.labels.tolist()))]


def to_yolo(dataset: DetectionDataset, out: str | Path, images_root: str | Path) -> dict[str, int]:
    """Write ``dataset`` as YOLO txt labels in ``out`` (see the module docstring); returns the counts."""
    out = Path(out)
    counts = {"images": 0, "annotations": 0, "categories": len(dataset.classes), "crowd_left_out": 0}
    stems: set[Path] = set()
    for record in dataset.records:
        rel = _relative(record.file, Path(images_root)).with_suffix(".txt")
        if rel in stems:
            raise DataError(f"{record.file}: two images share the label file {rel} (same name, another suffix)")
        stems.add(rel)
        width, height = record_size(record)
        lines = []
        for (x1, y1, x2, y2), label, _, crowd in _boxes(record):
            if crowd:
                counts["crowd_left_out"] += 1
                continue
            lines.append(f"{label - 1} {(x1 + x2) / 2 / width:.6f} {(y1 + y2) / 2 / height:.6f} "
                         f"{(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}")
        write_text("\n".join(lines) + ("\n" if lines else ""), out / "labels" / rel)
        counts["images"] += 1
        counts["annotations"] += len(lines)
    write_text(_dataset_yaml(dataset, "yolo", Path(images_root), out / "labels"), out / "dataset.yaml")
    return counts


def to_voc(dataset: DetectionDataset, out: str | Path, images_root: str | Path) -> dict[str, int]:
    """Write ``dataset`` as Pascal VOC XML files in ``out`` (see the module docstring); returns the counts."""
    out = Path(out)
    counts = {"images": 0, "annotations": 0, "categories": len(dataset.classes), "crowd_left_out": 0}
    stems: set[str] = set()
    for record in dataset.records:
        rel = _relative(record.file, Path(images_root))
        if rel.stem in stems:
            raise DataError(f"{record.file}: two images share the VOC file name {rel.stem}.xml (VOC is flat)")
        stems.add(rel.stem)
        width, height = record_size(record)
        root = ET.Element("annotation")
        ET.SubElement(root, "filename").text = rel.as_posix()
        size = ET.SubElement(root, "size")
        for tag, value in (("width", width), ("height", height), ("depth", 3)):
            ET.SubElement(size, tag).text = str(value)
        for (x1, y1, x2, y2), label, difficult, crowd in _boxes(record):
            if crowd:
                counts["crowd_left_out"] += 1
                continue
            obj = ET.SubElement(root, "object")
            ET.SubElement(obj, "name").text = str(dataset.classes[label - 1])
            ET.SubElement(obj, "difficult").text = "1" if difficult else "0"
            box = ET.SubElement(obj, "bndbox")
            for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), (x1, y1, x2, y2)):
                ET.SubElement(box, tag).text = f"{value:.2f}"
            counts["annotations"] += 1
        ET.indent(root)
        write_text(ET.tostring(root, encoding="unicode") + "\n", out / f"{rel.stem}.xml")
        counts["images"] += 1
    write_text(_dataset_yaml(dataset, "voc", Path(images_root), out), out / "dataset.yaml")
    return counts

