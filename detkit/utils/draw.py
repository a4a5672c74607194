"""Drawing boxes, labels, instance masks and semantic maps on images (ground truth and predictions).

Colours: :func:`colour` gives 20 well-separated colours, then golden-ratio hues for any further index, so that
datasets with many classes (coco128's 129 semantic classes) keep distinct colours.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

PALETTE = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40),
    (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
], np.uint8)
LEGEND_ROW = 12  # pixels per legend row


def colour(i: int) -> tuple[int, int, int]:
    """The colour of index ``i`` (a class, or an instance): the palette, then golden-ratio hues."""
    i = int(i)
    if 0 <= i < len(PALETTE):
        return tuple(int(c) for c in PALETTE[i])
    hue = (i * 0.618033988749895) % 1.0
    return tuple(int(c * 255) for c in colorsys.hsv_to_rgb(hue, 0.65 + 0.35 * ((i * 7) % 3) / 2, 0.95))


def draw_detections(image: np.ndarray, boxes: np.ndarray, labels: Sequence[int], class_names: Sequence[str],
                    scores: Sequence[float] | None = None, masks: np.ndarray | None = None,
                    alpha: float = 0.45) -> Image.Image:
    """Boxes with ``name score`` captions (labels 1..K index ``class_names``). With ``masks`` (N x H x W, one per
    box), every instance gets a colour of its own, shared by its filled mask, its outline, its box and its
    caption; without masks the colour is the class's."""
    canvas = np.asarray(image, np.uint8).copy()
    with_masks = masks is not None and len(masks) > 0
    if with_masks:
        for i, m in enumerate(np.asarray(masks) > 0):
            c = np.asarray(colour(i), np.float32)
            canvas[m] = (canvas[m] * (1 - alpha) + c * alpha).astype(np.uint8)
            edge = m & ~_erode(m)
            canvas[edge] = c.astype(np.uint8)
    im = Image.fromarray(canvas)
    draw = ImageDraw.Draw(im)
    for i, (box, label) in enumerate(zip(np.asarray(boxes).reshape(-1, 4), labels)):
        c = colour(i) if with_masks else colour(int(label))
        x1, x2 = sorted((float(box[0]), float(box[2])))
        y1, y2 = sorted((float(box[1]), float(box[3])))
        draw.rectangle((x1, y1, x2, y2), outline=c, width=2)
        name = class_names[int(label) - 1] if 0 < int(label) <= len(class_names) else str(int(label))
        text = f"{name} {scores[i]:.2f}" if scores is not None else name
        y = max(0.0, y1 - 11)
        tw = draw.textlength(text)
        draw.rectangle([x1, y, x1 + tw + 4, y + 11], fill=c)
        draw.text((x1 + 2, y), text, fill=(0, 0, 0))
    return im


def draw_semantic(image: np.ndarray, semantic: np.ndarray, class_names: Sequence[str], ignore: int = 255,
                  alpha: float = 0.5) -> Image.Image:
    """A label map (class indices 0..K-1 into ``class_names``; ``ignore`` left undrawn) blended over the image,
    and a legend (colour, name, share of the image) of the classes present, largest first."""
    canvas = np.asarray(image, np.uint8).copy()
    sem = np.asarray(semantic)
    if sem.shape != canvas.shape[:2]:
        raise ValueError(f"label map {sem.shape} and image {canvas.shape[:2]} differ in size")
    values, counts = np.unique(sem, return_counts=True)
    present = [(int(v), int(n)) for v, n in zip(values, counts) if v != ignore]
    present.sort(key=lambda vn: -vn[1])
    for v, _ in present:
        m = sem == v
        canvas[m] = (canvas[m] * (1 - alpha) + np.asarray(colour(v), np.float32) * alpha).astype(np.uint8)
    im = Image.fromarray(canvas)
    draw = ImageDraw.Draw(im)
    rows = [(v, f"{class_names[v] if v < len(class_names) else v} {100 * n / sem.size:.0f}%") for v, n in present]
    rows = rows[:max(1, (im.height - 4) // LEGEND_ROW)]  # as many as fit
    if rows:
        width = max(draw.textlength(text) for _, text in rows) + 20
        draw.rectangle([0, 0, width, 4 + LEGEND_ROW * len(rows)], fill=(0, 0, 0))
    for row, (v, text) in enumerate(rows):
        y = 2 + row * LEGEND_ROW
        draw.rectangle([2, y, 12, y + 10], fill=colour(v))
        draw.text((15, y - 1), text, fill=(255, 255, 255))
    return im


def _erode(m: np.ndarray) -> np.ndarray:
    out = m.copy()
    out[1:] &= m[:-1]
    out[:-1] &= m[1:]
    out[:, 1:] &= m[:, :-1]
    out[:, :-1] &= m[:, 1:]
    return out
