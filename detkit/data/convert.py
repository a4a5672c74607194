"""Convert any dataset to COCO JSON (``detkit data convert ... --to coco OUT.json``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from detkit.data.dataset import DetectionDataset
from detkit.evaluation.ground_truth import coco_categories, record_annotations, record_size


def to_coco(dataset: DetectionDataset, out: str | Path, images_root: str | Path) -> dict[str, int]:
    """Write ``dataset`` as a COCO instances file whose ``file_name``s are relative to ``images_root``.

    Image ids are 1..N in record order; category ids are 1..K in the dataset's class order (the original ids are
    kept as ``original_id``); YOLO-seg polygons are written as polygons, instance-mask PNGs as RLE, VOC
    ``difficult`` as a ``difficult`` flag (1/0) on the annotation; ``area`` is the mask area where there is a
    segmentation, else the box area. The annotations are those of the evaluation's ground truth
    (:mod:`detkit.evaluation.ground_truth`).
    """
    root = Path(images_root)
    images, annotations = [], []
    for index, record in enumerate(dataset.records):
        width, height = record_size(record)
        image_id = index + 1
        images.append({"id": image_id, "file_name": Path(os.path.relpath(record.file, root)).as_posix(),
                       "width": width, "height": height})
        annotations += record_annotations(record, image_id, width, height, segmentation="known",
                                          first_id=len(annotations) + 1)
    categories = coco_categories(dataset)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return {"images": len(images), "annotations": len(annotations), "categories": len(categories)}
