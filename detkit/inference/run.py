"""``detkit predict``: a predictor over image paths -> drawn images, ``predictions.json``, a summary.

``predictions.json`` is a list of COCO results; ``image_id`` numbers the images read (1, 2, ... in input order),
``file_name`` is the image's path as given, ``category_id`` the dataset's own id of the class (its contiguous
label, or class index for segmenters, where the dataset's ids are not ints, e.g. VOC's names) and
``category_name`` its name. Segmentations are compressed COCO RLE at the original image size
(``{"size": [h, w], "counts": str}``; ``pycocotools.mask.decode`` reads them).

Detectors (one entry per detection; ``<stem>.jpg`` drawn with boxes, captions and instance masks)::

    {"image_id", "file_name", "category_id", "category_name", "bbox": [x, y, w, h] (original pixels), "score"}

plus, for Mask R-CNN, ``"segmentation"``: the detection's mask.

Segmenters (U-Net: one entry per image and class present; ``<stem>.jpg`` with the label map blended in and a
legend, ``<stem>_labels.png`` with class indices 0..K-1, 255 unlabeled)::

    {"image_id", "file_name", "category_id", "category_name", "segmentation": the class's pixels, "area": their
     count, "segmentation_file": "<stem>_labels.png"}

An image where no class is present (every pixel unlabeled) has no entry but still its ``_labels.png``; the
summary's ``per_class`` then counts images, not detections.
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
from detkit.evaluation.predictions import encode_masks, predictions_to_results
from detkit.inference.predictor import Predictor, to_rgb_array
from detkit.utils.draw import draw_detections, draw_semantic
from detkit.utils.io import write_json

log = logging.getLogger(__name__)


def predict_files(predictor: Predictor, files: list[Path], out: str | Path, draw: bool = True,
                  protect: list[Path] | None = None) -> dict[str, Any]:
    """Predict every file; unreadable images are reported and skipped (counted). No output replaces one of
    ``files`` or ``protect`` (other user files, e.g. images in ``out`` that were not predicted). Returns the
    summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    per_class: Counter[str] = Counter()
    skipped: list[str] = []
    written: set[str] = set()
    inputs = {p.resolve() for p in [*files, *(protect or [])]}
    start, done, detections = time.perf_counter(), 0, 0
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
            name = output_name(f, out, written, inputs)
            if "semantic" in pred:
                semantic = pred["semantic"].numpy().astype(np.uint8)
                Image.fromarray(semantic).save(out / f"{name}_labels.png")
                per_class.update(pred["names"])  # images in which each class covers some pixels
                results += semantic_results(predictor, semantic, done, str(f), f"{name}_labels.png")
                if draw:
                    draw_semantic(image, semantic, predictor.classes).save(out / f"{name}.jpg", quality=92)
                continue
            per_class.update(pred["names"])
            detections += len(pred["labels"])
            results += detection_results(predictor, pred, done, str(f))
            if draw:
                masks = pred["masks"].numpy() if "masks" in pred else None
                im = draw_detections(image, pred["boxes"].numpy(), pred["labels"].tolist(), predictor.classes,
                                     pred["scores"].tolist(), masks=masks)
                im.save(out / f"{name}.jpg", quality=92)
    elapsed = time.perf_counter() - start
    write_json(results, out / "predictions.json", indent=None)
    return {"task": predictor.task, "images": done, "skipped": len(skipped), "skipped_files": skipped,
            "detections": detections, "per_class": dict(per_class), "classes": predictor.keep_classes,
            "images_per_s": done / elapsed if elapsed > 0 else 0.0, "seconds": elapsed, "out": str(out)}


def predict_video(predictor: Predictor, source: Any, out: str | Path, vid_stride: int = 1,
                  max_frames: int | None = None, stall_timeout: float = 10.0, draw: bool = True,
                  protect: list[Path] | None = None) -> dict[str, Any]:
    """Predict the frames of a video file, stream or camera (:meth:`Predictor.predict_video`) into ``out``:
    ``<name>.jsonl`` (one line per frame: ``{"frame", "time", "detections": COCO results with image_id = frame}``,
    written as frames are done) and the annotated ``<name>.mp4``. A stream that ends finishes the run; one that
    stalls, fails or is interrupted keeps everything done so far (``summary["stopped"]`` says why). Returns the
    summary (``frames``, ``frames_per_s``, ...)."""
    from detkit.inference.video import StreamStalled, VideoWriter, source_name

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    inputs = {p.resolve() for p in protect or []}
    if isinstance(source, str | Path) and Path(str(source)).is_file():
        inputs.add(Path(source).resolve())
    name, n = source_name(source), 1
    while any((out / f"{name}{s}").resolve() in inputs for s in (".mp4", ".jsonl")):
        name, n = f"{source_name(source)}-{n}", n + 1
    lines_path, video_path = out / f"{name}.jsonl", out / f"{name}.mp4"
    per_class: Counter[str] = Counter()
    frames = detections = 0
    stopped, writer = None, None
    start = time.perf_counter()
    with open(lines_path, "w") as lines:
        try:
            for frame, pred in predictor.predict_video(source, vid_stride=vid_stride, max_frames=max_frames,
                                                       stall_timeout=stall_timeout):
                frames += 1
                image_id = frame.index
                if "semantic" in pred:
                    semantic = pred["semantic"].numpy().astype(np.uint8)
                    found = semantic_results(predictor, semantic, image_id, str(source), "")
                    for r in found:
                        r.pop("segmentation_file", None)
                    drawn = draw_semantic(frame.image, semantic, predictor.classes) if draw else None
                else:
                    found = detection_results(predictor, pred, image_id, str(source))
                    detections += len(found)
                    drawn = draw_detections(frame.image, pred["boxes"].numpy(), pred["labels"].tolist(),
                                            predictor.classes, pred["scores"].tolist(),
                                            masks=pred["masks"].numpy() if "masks" in pred else None) if draw else None
                per_class.update(pred["names"])
                for r in found:
                    r.pop("file_name", None)
                lines.write(json.dumps({"frame": frame.index, "time": round(frame.time, 4), "detections": found})
                            + "\n")
                lines.flush()
                if drawn is not None:
                    if writer is None:
                        fps = _source_fps(source) / max(1, int(vid_stride))
                        writer = VideoWriter(video_path, fps or 10.0, drawn.size)
                    writer.write(np.asarray(drawn))
        except StreamStalled as e:
            stopped = str(e)
        except KeyboardInterrupt:
            stopped = f"{source}: interrupted after {frames} frames; the results so far are kept"
        finally:
            if writer is not None:
                writer.close()
    elapsed = time.perf_counter() - start
    return {"task": predictor.task, "source": str(source), "frames": frames, "detections": detections,
            "per_class": dict(per_class), "classes": predictor.keep_classes,
            "frames_per_s": frames / elapsed if elapsed > 0 else 0.0, "seconds": elapsed, "stopped": stopped,
            "results": str(lines_path), "video": str(video_path) if writer is not None else None, "out": str(out)}


def _source_fps(source: Any) -> float:
    from detkit.inference.video import open_capture

    if not isinstance(source, str | Path) or not Path(str(source)).is_file():
        return 25.0 if isinstance(source, str | Path) else 10.0  # a stream or camera: its rate is not known ahead
    cap, fps = open_capture(source)
    cap.release()
    return fps or 25.0


def format_video_summary(summary: dict[str, Any]) -> str:
    """The summary of a video source as printed by ``detkit predict``."""
    semantic = summary["task"] == "semantic"
    found = "label maps" if semantic else f"{summary['detections']} detections"
    lines = [f"{summary['source']}: {summary['frames']} frames, {found}, {summary['frames_per_s']:.1f} frames/s"]
    counts = dict(summary["per_class"])
    if counts:
        lines.append("frames per class:" if semantic else "detections per class:")
        lines += [f"  {name:20s} {n}" for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    lines.append(f"per-frame results: {summary['results']}" + (f"; annotated video: {summary['video']}"
                                                              if summary["video"] else ""))
    return "\n".join(lines)


OUTPUT_SUFFIXES = (".jpg", "_labels.png")  # what predict writes per image: out/<name>.jpg, out/<name>_labels.png


def output_name(file: Path, out: Path, taken: set[str], inputs: set[Path]) -> str:
    """The name of ``file``'s outputs in ``out``: its stem, or ``<stem>-1``, ``-2``, ... when that is taken by an
    image with the same stem (from another folder, or x.png beside x.jpg) or when an output would land on an input
    file (``--out`` equal to or inside an input folder): an input is never overwritten."""
    name, n = file.stem, 1
    while name in taken or any((out / f"{name}{s}").resolve() in inputs for s in OUTPUT_SUFFIXES):
        name, n = f"{file.stem}-{n}", n + 1
    taken.add(name)
    return name


def detection_results(predictor: Predictor, pred: dict[str, Any], image_id: int, file_name: str
                      ) -> list[dict[str, Any]]:
    """One image's detections as COCO results (with ``segmentation`` RLEs where the model predicts masks)."""
    results = predictions_to_results(pred, image_id)
    for r, name in zip(results, pred["names"]):
        label = r["category_id"]
        r.update(file_name=file_name, category_id=predictor.category_id(label), category_name=name)
    return [{k: r[k] for k in ("image_id", "file_name", "category_id", "category_name", "bbox", "score",
                               "segmentation") if k in r} for r in results]


def semantic_results(predictor: Predictor, semantic: np.ndarray, image_id: int, file_name: str,
                     segmentation_file: str) -> list[dict[str, Any]]:
    """One label map (class indices, 255 unlabeled) as one COCO result per class present."""
    values, counts = np.unique(semantic, return_counts=True)
    present = [(int(v), int(n)) for v, n in zip(values, counts) if v < len(predictor.classes)]
    if not present:
        return []
    rles = encode_masks(np.stack([semantic == v for v, _ in present]))
    return [{"image_id": image_id, "file_name": file_name, "category_id": predictor.category_id(v),
             "category_name": predictor.classes[v], "segmentation": rle, "area": n,
             "segmentation_file": segmentation_file} for (v, n), rle in zip(present, rles)]


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as printed by ``detkit predict`` and ``tools/infer.py``."""
    semantic = summary["task"] == "semantic"
    found = "label maps" if semantic else f"{summary['detections']} detections"
    lines = [f"{summary['images']} images ({summary['skipped']} skipped), {found}, "
             f"{summary['images_per_s']:.1f} images/s"]
    if summary.get("classes"):
        lines.append(f"classes kept: {', '.join(summary['classes'])}")
    counts = dict(summary["per_class"])
    for name in summary.get("classes") or []:
        counts.setdefault(name, 0)
    if counts:
        lines.append("images per class:" if semantic else "detections per class:")
        lines += [f"  {name:20s} {n}" for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    lines.append(f"drawn images and predictions.json in {summary['out']}")
    return "\n".join(lines)
