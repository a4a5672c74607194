"""Tiled (sliced) inference for images much larger than the network's input.

``Tiling(size=None, overlap=0.2, full_image=True, merge="nms", match="ios", iou=0.5)``: each image is cut into
``size x size`` windows (default: the model's ``data.image_size``, so tiles are seen at the network's resolution,
not shrunk) overlapping by ``overlap`` of a tile; the last row and column are shifted back inside the image, so
every tile has the full size when the image does. The tiles run in batches (:func:`predict_tiled` takes any
``run(list of tile arrays) -> per-tile outputs``: the Predictor, with or without test-time augmentation, or an
exported ONNX model, since tiles are just batches), their outputs are moved into the image's pixels (boxes
offset, instance masks pasted, U-Net logits placed), optionally together with one pass over the whole image
(``full_image``: large objects that no tile holds whole), and merged: detections by ``merge`` (``nms``, by default
comparing intersection over the smaller box (``match="ios"``) so that a box cut at a tile's edge gives way to the
object's whole box; or ``wbf``, :mod:`detkit.inference.merge`), U-Net logits by their mean where tiles overlap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from detkit.errors import ConfigError
from detkit.inference.merge import check_merge, concat, merge_detections, settings_of

Window = tuple[int, int, int, int]  # x0, y0, x1, y1


@dataclass
class Tiling:
    """Tiled inference settings (``--tile``, ``--overlap``, ``--tile-merge``, ``--no-full-image``)."""

    size: int | None = None  # the tile's side in image pixels (None: the model's data.image_size)
    overlap: float = 0.2
    full_image: bool = True
    merge: str = "nms"  # nms | wbf
    match: str = "ios"  # nms: iou | ios (intersection over the smaller box)
    iou: float = 0.5
    max_detections: int = 1000

    def __post_init__(self) -> None:
        if self.size is not None and (int(self.size) != self.size or int(self.size) < 16):
            raise ConfigError(f"tile size = {self.size}: give a whole number of pixels >= 16")
        if not 0 <= float(self.overlap) < 1:
            raise ConfigError(f"tile overlap = {self.overlap}: give a fraction in [0, 1)")
        match = self.match if self.merge == "nms" else "iou"
        check_merge(self.merge, match, self.iou, what="tile merge")
        self.match = match

    @classmethod
    def of(cls, value: Any) -> Tiling | None:
        """An int (the tile size), a mapping of settings, ``True`` (the defaults), a Tiling, or None/False."""
        return settings_of(cls, value, "tiles", "tiles", "setting", "give a tile size, a mapping of settings, or None",
                           shorthand=lambda v: cls(size=v) if isinstance(v, int) else None)


def tile_windows(height: int, width: int, size: int, overlap: float) -> list[Window]:
    """Overlapping ``size x size`` windows covering an image, row by row (a side shorter than ``size``: one
    window of that side)."""
    def starts(n: int) -> list[int]:
        if n <= size:
            return [0]
        step = max(1, int(round(size * (1 - overlap))))
        out = list(range(0, n - size, step))
        return [*out, n - size]

    return [(x, y, min(x + size, width), min(y + size, height)) for y in starts(height) for x in starts(width)]


def to_image(out: dict[str, Tensor], window: Window, size: tuple[int, int]) -> dict[str, Tensor]:
    """A tile's outputs (tile pixels) in the whole image's pixels."""
    x0, y0, x1, y1 = window
    h, w = size
    out = dict(out)
    if "logits" in out:
        return out  # placed by the caller (averaged where tiles overlap)
    if len(out["boxes"]):
        out["boxes"] = out["boxes"] + out["boxes"].new_tensor([x0, y0, x0, y0])
    if "masks" in out:
        m = out["masks"]
        canvas = m.new_zeros((m.shape[0], h, w))
        canvas[:, y0:y1, x0:x1] = m[:, : y1 - y0, : x1 - x0]
        out["masks"] = canvas
    return out


def predict_tiled(image: np.ndarray, run: Callable[[list[np.ndarray]], list[dict[str, Tensor]]], tiling: Tiling,
                  size: int, batch_size: int = 4) -> dict[str, Tensor]:
    """One ``H x W x 3`` image through ``run`` tile by tile (``batch_size`` tiles at a time), merged; ``size``: the
    tile side when ``tiling.size`` is None. Returns detections in the image's pixels, or ``{"logits"}``."""
    h, w = image.shape[:2]
    windows = tile_windows(h, w, int(tiling.size or size), float(tiling.overlap))
    parts: list[dict[str, Tensor]] = []
    logits_sum: Tensor | None = None
    count = torch.zeros(h, w)
    jobs: list[tuple[Window | None, np.ndarray]] = [(win, image[win[1]:win[3], win[0]:win[2]]) for win in windows]
    if tiling.full_image and len(windows) > 1:
        jobs.append((None, image))
    for start in range(0, len(jobs), max(1, batch_size)):
        chunk = jobs[start:start + batch_size]
        for (win, _), out in zip(chunk, run([np.ascontiguousarray(a) for _, a in chunk])):
            win = win or (0, 0, w, h)
            if "logits" in out:
                x0, y0, x1, y1 = win
                lg = out["logits"].float().cpu()
                if logits_sum is None:
                    logits_sum = torch.zeros(lg.shape[0], h, w)
                logits_sum[:, y0:y1, x0:x1] += lg[:, : y1 - y0, : x1 - x0]
                count[y0:y1, x0:x1] += 1
            else:
                parts.append(to_image(out, win, (h, w)))
    if logits_sum is not None:
        return {"logits": logits_sum / count.clamp(min=1)}
    if tiling.merge == "wbf":  # every tile is a part of one pass: fused as one "model"
        parts = [concat(parts)]
    return merge_detections(parts, (h, w), tiling.merge, tiling.iou, tiling.match, tiling.max_detections)
