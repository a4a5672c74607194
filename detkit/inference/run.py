"""``detkit predict``: a predictor over image paths -> drawn images, ``predictions.json``, a summary.

Detectors: ``<stem>.jpg`` with boxes, captions and instance masks; ``predictions.json`` in COCO results format
(the dataset's own category ids). Segmenters: ``<stem>.jpg`` with the label map blended in and a legend,
``<stem>_labels.png`` (class indices 0..K-1, 255 unlabeled), and ``predictions.json`` listing per image its
label file and the classes present; ``per_class`` then counts images, not detections.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from detkit.errors import DataError
from detkit.inference.draw import draw_detections, draw_semantic
from detkit.inference.predictor import Predictor, to_rgb_array

log = logging.getLogger(__name__)


def predict_files(predictor: Predictor, files: list[Path], out: str | Path, draw: bool = True) -> dict[str, Any]:
    """Predict every file; unreadable images are reported and skipped (counted). Returns the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    per_class: Counter[str] = Counter()
    skipped: list[str] = []
    written: set[str] = set()
    start, done = time.perf_counter(), 0
    bs = predictor.batch_size
    for i in range(0, len(files), bs):
        chunk, images = [], []
        for f in files[i:i + bs]:
            try:
                images.append(to_rgb_array(f))
                chunk.append(f)
            except (DataError, OSError, ValueError, RuntimeError) as e:
                skipped.append(str(f))
                log.warning("skipping %s: %s", f, e)
        if not images:
            continue
        for f, image, pred in zip(chunk, images, predictor(images)):
            done += 1
            name = f.stem
            n = 1
            while name in written:  # same stem in two folders, or x.png and x.jpg: keep both outputs
                name, n = f"{f.stem}-{n}", n + 1
            written.add(name)
            if "semantic" in pred:
                semantic = pred["semantic"].numpy().astype(np.uint8)
                Image.fromarray(semantic).save(out / f"{name}_labels.png")
                per_class.update(pred["names"])  # images in which each class covers some pixels
                results.append({"image_id": done, "file_name": str(f), "segmentation_file": f"{name}_labels.png",
                                "classes": pred["names"]})
                if draw:
                    draw_semantic(image, semantic, predictor.classes).save(out / f"{name}.jpg", quality=92)
                continue
            for box, score, label in zip(pred["boxes"].tolist(), pred["scores"].tolist(), pred["labels"].tolist()):
                per_class[predictor.classes[label - 1]] += 1
                results.append({"image_id": done, "file_name": str(f), "category_id": predictor.category_id(label),
                                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": score})
            if draw:
                masks = pred["masks"].numpy() if "masks" in pred else None
                im = draw_detections(image, pred["boxes"].numpy(), pred["labels"].tolist(), predictor.classes,
                                     pred["scores"].tolist(), masks=masks)
                im.save(out / f"{name}.jpg", quality=92)
    elapsed = time.perf_counter() - start
    (out / "predictions.json").write_text(json.dumps(results))
    semantic = predictor.task == "semantic"
    return {"task": predictor.task, "images": done, "skipped": len(skipped),
            "detections": 0 if semantic else len(results), "per_class": dict(per_class),
            "images_per_s": done / elapsed if elapsed > 0 else 0.0, "out": str(out)}
