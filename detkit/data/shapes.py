"""The embedded default dataset: shapes on textured, noisy backgrounds, written as COCO JSON + PNG masks.

``make_shapes(out)`` writes::

    out/images/{train,val}/000000.jpg
    out/annotations/instances_{train,val}.json   COCO instances: visible-part RLE masks, boxes, areas
    out/semantic/{train,val}/000000.png          index PNGs: 0 background, 1..4 the classes
    out/dataset.yaml                             classes and a ready-to-use data config

Each image holds 1-5 shapes (circle, square, triangle, star) of random colour, size (8-45 % of the image)
and rotation; later shapes may occlude earlier ones (each keeps at least 40 % of its area visible). The
background is smooth colour noise plus a stripe or checker texture, and the whole image gets pixel noise
and JPEG compression. Everything follows from ``seed``: the same seed writes the same bytes. The set is written
into a hidden ``.<name>.partial-<pid>`` folder beside ``out`` and renamed when complete, so a generation killed
half-way is made again next time instead of being taken for a finished one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from detkit.errors import ConfigError, DataError
from detkit.utils.lock import pid_alive

CLASSES = ("circle", "square", "triangle", "star")
SPLITS = {"train": 0, "val": 1}
log = logging.getLogger(__name__)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    coarse = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    kind = rng.integers(3)
    period = rng.uniform(6, 20)
    angle = rng.uniform(0, math.pi)
    if kind == 0:  # stripes
        texture = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
    elif kind == 1:  # checker
        texture = np.sign(np.sin(xx * 2 * math.pi / period) * np.sin(yy * 2 * math.pi / period))
    else:  # blotches
        texture = np.asarray(Image.fromarray(rng.uniform(0, 255, (8, 8)).astype(np.uint8)).resize(
            (size, size), Image.BICUBIC), np.float32) / 127.5 - 1
    return np.clip(base * 0.7 + texture[..., None] * rng.uniform(10, 35), 0, 255)


def _polygon(kind: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    if kind == "square":
        angles = [rot + math.pi / 4 + k * math.pi / 2 for k in range(4)]
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]
    if kind == "triangle":
        return [(cx + r * math.cos(rot + k * 2 * math.pi / 3), cy + r * math.sin(rot + k * 2 * math.pi / 3))
                for k in range(3)]
    points = []  # star: 5 outer, 5 inner points
    for k in range(10):
        rr = r if k % 2 == 0 else r * 0.45
        a = rot + k * math.pi / 5
        points.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return points


def _shape_mask(kind: str, size: int, cx: float, cy: float, r: float, rot: float) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    else:
        draw.polygon(_polygon(kind, cx, cy, r, rot), fill=1)
    return np.asarray(canvas, np.uint8)


def render_image(rng: np.random.Generator, size: int, max_objects: int = 5):
    """One image: (RGB uint8, [(class index 0..3, visible mask)], semantic index map)."""
    for _ in range(50):  # retry layouts until every shape keeps enough visible area
        image = _background(rng, size)
        shapes = []
        for _ in range(int(rng.integers(1, max_objects + 1))):
            cls = int(rng.integers(len(CLASSES)))
            r = rng.uniform(0.04, 0.225) * size
            cx, cy = rng.uniform(0, size), rng.uniform(0, size)
            mask = _shape_mask(CLASSES[cls], size, cx, cy, r, rng.uniform(0, 2 * math.pi))
            if mask.sum() < 12:
                continue
            shapes.append((cls, mask))
        if not shapes:
            continue
        visible = []
        covered = np.zeros((size, size), bool)
        for cls, mask in reversed(shapes):  # later shapes are on top
            vis = mask.astype(bool) & ~covered
            covered |= mask.astype(bool)
            visible.append((cls, vis, mask.sum()))
        visible.reverse()
        if all(v.sum() >= 0.4 * full for _, v, full in visible):
            break
    semantic = np.zeros((size, size), np.uint8)
    for (cls, mask), (_, vis, _) in zip(shapes, visible):
        colour = rng.uniform(0, 255, 3)
        shade = np.linspace(rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0), size, dtype=np.float32)[None, :, None]
        fill = np.clip(colour[None, None, :] * shade, 0, 255)
        image = np.where(mask[..., None].astype(bool), fill, image)
        semantic[vis] = cls + 1
    image = np.clip(image + rng.normal(0, rng.uniform(4, 14), image.shape), 0, 255).astype(np.uint8)
    return image, [(cls, vis) for cls, vis, _ in visible], semantic


def make_shapes(out: str | Path, num_images: int = 240, image_size: int = 128, seed: int = 0,
                val_fraction: float = 1 / 6) -> dict[str, int]:
    """Write the dataset; returns the number of images per split."""
    if num_images < 2:
        raise DataError(f"make-shapes: --num-images {num_images}: need at least 2 (train and val)")
    if image_size < 32:
        raise DataError(f"make-shapes: --image-size {image_size}: need at least 32 pixels")
    out = Path(out)
    if out.is_dir() and any(out.iterdir()):
        raise DataError(f"make-shapes: {out} exists and is not empty (remove it, or choose another folder)")
    # written into a hidden sibling folder and renamed: a killed generation never looks complete
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    counts = _write_shapes(tmp, out, num_images, image_size, seed, val_fraction)
    try:
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "dataset.yaml").is_file():  # not another process's finished copy of the same set
            raise
    for stale in out.parent.glob(f".{out.name}.partial-*"):  # left by killed generations (not running ones)
        pid = stale.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return counts


def _write_shapes(out: Path, final: Path, num_images: int, image_size: int, seed: int,
                  val_fraction: float) -> dict[str, int]:
    num_val = max(1, round(num_images * val_fraction))
    counts = {"train": num_images - num_val, "val": num_val}
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)]
    for split, n in counts.items():
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "semantic" / split).mkdir(parents=True, exist_ok=True)
        (out / "annotations").mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for index in range(n):
            rng = np.random.default_rng([seed, SPLITS[split], index])
            image, objects, semantic = render_image(rng, image_size)
            name = f"{index:06d}"
            Image.fromarray(image).save(out / "images" / split / f"{name}.jpg", quality=90)
            Image.fromarray(semantic).save(out / "semantic" / split / f"{name}.png")
            images.append({"id": index + 1, "file_name": f"{name}.jpg", "width": image_size, "height": image_size})
            for cls, vis in objects:
                rle = mask_utils.encode(np.asfortranarray(vis.astype(np.uint8)))
                x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
                annotations.append({
                    "id": len(annotations) + 1, "image_id": index + 1, "category_id": cls + 1,
                    "bbox": [x, y, w, h], "area": float(mask_utils.area(rle)), "iscrowd": 0,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                })
        coco = {"info": {"description": f"detkit shapes (seed {seed})", "version": "1"}, "licenses": [],
                "images": images, "annotations": annotations, "categories": categories}
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    (out / "dataset.yaml").write_text(_dataset_yaml(final, image_size))  # the last file: the set is complete
    return counts


def _dataset_yaml(out: Path, image_size: int) -> str:
    lines = [f"# detkit shapes dataset: {', '.join(CLASSES)} (COCO ids 1..{len(CLASSES)})",
             f"classes: [{', '.join(CLASSES)}]", f"semantic_classes: [background, {', '.join(CLASSES)}]",
             f"image_size: {image_size}", "data:"]
    for split in SPLITS:
        lines += [f"  {split}:", "    format: coco", f"    images: {out / 'images' / split}",
                  f"    annotations: {out / 'annotations' / f'instances_{split}.json'}"]
    return "\n".join(lines) + "\n"


def ensure_shapes(data) -> None:
    """``data.generate: shapes`` makes the shapes dataset (at ``../..`` of ``data.train.annotations``) when its
    train annotations are absent; any other ``data.generate`` does nothing."""
    if data.generate != "shapes":
        return
    ann = data.train.annotations
    if not ann:
        raise ConfigError("data.generate = shapes needs data.train.annotations (…/annotations/instances_train.json)")
    if not Path(ann).exists():
        root = Path(ann).parent.parent
        log.warning("generating the shapes dataset in %s (data.generate = shapes)", root)
        make_shapes(root)
