"""Drawing boxes, labels, instance masks and semantic maps on images (ground truth and predictions)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

PALETTE = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40),
    (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
], np.uint8)


def colour(i: int) -> tuple[int, int, int]:
    return tuple(int(c) for c in PALETTE[int(i) % len(PALETTE)])


def draw_detections(image: np.ndarray, boxes: np.ndarray, labels: Sequence[int], class_names: Sequence[str],
                    scores: Sequence[float] | None = None, masks: np.ndarray | None = None,
                    alpha: float = 0.45) -> Image.Image:
    """Boxes with ``name score`` captions; masks (one colour per instance, with outline) when given."""
    canvas = np.asarray(image, np.uint8).copy()
    if masks is not None and len(masks):
        for i, m in enumerate(np.asarray(masks) > 0):
            c = np.asarray(colour(i + 3), np.float32)
            canvas[m] = (canvas[m] * (1 - alpha) + c * alpha).astype(np.uint8)
            edge = m & ~_erode(m)
            canvas[edge] = c.astype(np.uint8)
    im = Image.fromarray(canvas)
    draw = ImageDraw.Draw(im)
    for i, (box, label) in enumerate(zip(np.asarray(boxes).reshape(-1, 4), labels)):
        c = colour(int(label))
        x1, x2 = sorted((float(box[0]), float(box[2])))
        y1, y2 = sorted((float(box[1]), float(box[3])))
        box = (x1, y1, x2, y2)
        draw.rectangle(box, outline=c, width=2)
        name = class_names[int(label) - 1] if 0 < int(label) <= len(class_names) else str(int(label))
        text = f"{name} {scores[i]:.2f}" if scores is not None else name
        x, y = float(box[0]), max(0.0, float(box[1]) - 11)
        tw = draw.textlength(text)
        draw.rectangle([x, y, x + tw + 4, y + 11], fill=c)
        draw.text((x + 2, y), text, fill=(0, 0, 0))
    return im


def draw_semantic(image: np.ndarray, semantic: np.ndarray, class_names: Sequence[str], ignore: int = 255,
                  alpha: float = 0.5) -> Image.Image:
    """A label map blended over the image, with a legend of the classes present."""
    canvas = np.asarray(image, np.uint8).copy()
    sem = np.asarray(semantic)
    present = [int(v) for v in np.unique(sem) if v != ignore]
    for v in present:
        m = sem == v
        canvas[m] = (canvas[m] * (1 - alpha) + np.asarray(colour(v), np.float32) * alpha).astype(np.uint8)
    im = Image.fromarray(canvas)
    draw = ImageDraw.Draw(im)
    for row, v in enumerate(present):
        name = class_names[v] if v < len(class_names) else str(v)
        y = 2 + row * 12
        draw.rectangle([2, y, 12, y + 10], fill=colour(v))
        draw.text((15, y - 1), name, fill=(255, 255, 255))
    return im


def _erode(m: np.ndarray) -> np.ndarray:
    out = m.copy()
    out[1:] &= m[:-1]
    out[:-1] &= m[1:]
    out[:, 1:] &= m[:, :-1]
    out[:, :-1] &= m[:, 1:]
    return out
