#!/usr/bin/env python
"""Images/s of the train pipeline (decode + albumentations + uint8 tensors + collate) with 0, 1 and 2 workers.

The reference, measured in the same run, is decoding alone (PIL, no transform, one process): the ratio
says what the augmentations and batching cost on top of reading the files. Usage:

    .venv/bin/python benchmarks/data_throughput.py [--images ../shared/datasets/coco128/images/train2017]
        [--labels .../object_detection/labels/train2017] [--size 640] [--batch 8] [--epochs 2]

Without ../shared it runs on a generated shapes set instead.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from torch.utils.data import DataLoader

from detkit.data.build import build_dataset
from detkit.data.collate import Collate
from detkit.data.dataset import read_image
from detkit.data.transforms import build_pipeline

COCO128 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "coco128"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default=str(COCO128 / "images/train2017"))
    parser.add_argument("--labels", default=str(COCO128 / "object_detection/labels/train2017"))
    parser.add_argument("--classes", default=str(COCO128 / "object_detection/config.yaml"))
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    if Path(args.images).is_dir():
        cfg = {"format": "yolo", "images": args.images, "annotations": args.labels, "classes": args.classes}
    else:
        from detkit.data.shapes import make_shapes

        root = Path(tempfile.mkdtemp())
        make_shapes(root, 128, args.size)
        cfg = {"format": "coco", "images": str(root / "images/train"),
               "annotations": str(root / "annotations/instances_train.json")}
    dataset = build_dataset(cfg, with_masks=False)
    n = len(dataset) * args.epochs

    t = time.perf_counter()
    for _ in range(args.epochs):
        for r in dataset.records:
            read_image(r.file)
    decode = n / (time.perf_counter() - t)
    print(f"{len(dataset)} images x {args.epochs} epochs at {args.size}, batch {args.batch}")
    print(f"{'reference: decode only':28s} {decode:8.1f} img/s")
    dataset.transform = build_pipeline("train", image_size=args.size, train=True)  # uint8 samples
    for workers in (0, 1, 2):
        loader = DataLoader(dataset, batch_size=args.batch, shuffle=True, num_workers=workers,
                            collate_fn=Collate(32), persistent_workers=workers > 0)
        seen = 0
        t = time.perf_counter()
        for _ in range(args.epochs):
            for batch in loader:
                seen += len(batch["targets"]) + len(batch["skipped"])
        rate = seen / (time.perf_counter() - t)
        what = f"uint8 samples, {workers} workers"
        print(f"{what:28s} {rate:8.1f} img/s   ratio to decode-only {rate / decode:5.2f}")


if __name__ == "__main__":
    main()
