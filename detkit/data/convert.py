"""Convert any dataset to COCO JSON (``detkit data convert ... --to coco OUT.json``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from detkit.data.dataset import DetectionDataset, instance_masks_from_ids, read_label_png


def to_coco(dataset: DetectionDataset, out: str | Path, images_root: str | Path) -> dict[str, int]:
    """Write ``dataset`` as a COCO instances file whose ``file_name``s are relative to ``images_root``.

    Category ids are 1..K in the dataset's class order (the original ids are kept as ``original_id``);
    YOLO-seg polygons are written as polygons, instance-mask PNGs as RLE, VOC ``difficult`` as a
    ``difficult`` flag on the annotation.
    """
    root = Path(images_root)
    images, annotations = [], []
    for index, record in enumerate(dataset.records):
        file = Path(record.file)
        width, height = record.width, record.height
        if width is None or height is None:
            from PIL import Image

            with Image.open(file) as im:
                width, height = im.size
        image_id = index + 1
        images.append({"id": image_id, "file_name": Path(os.path.relpath(file, root)).as_posix(), "width": width,
                       "height": height})
        instance_masks = _instance_masks(record)
        for i, (box, label) in enumerate(zip(record.boxes, record.labels)):
            x1, y1, x2, y2 = (float(v) for v in box)
            ann: dict[str, Any] = {"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                   "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                   "iscrowd": int(record.iscrowd[i]) if len(record.iscrowd) else 0}
            if len(record.difficult) and record.difficult[i]:
                ann["difficult"] = 1
            if instance_masks is not None:
                rle = mask_utils.encode(np.asfortranarray(instance_masks[i]))
                ann["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
                ann["area"] = float(mask_utils.area(rle))
            elif record.segmentations and record.segmentations[i]:
                seg = record.segmentations[i]
                ann["segmentation"] = seg if isinstance(seg, dict) else [list(map(float, p)) for p in seg]
            annotations.append(ann)
    categories = [{"id": i + 1, "name": name, "original_id": _plain(orig)}
                  for i, (name, orig) in enumerate(zip(dataset.classes, dataset.cat_ids))]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return {"images": len(images), "annotations": len(annotations), "categories": len(categories)}


def _instance_masks(record) -> np.ndarray | None:
    if record.mask_file is None or record.segmentations is not None:
        return None
    return instance_masks_from_ids(read_label_png(record.mask_file))


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value
