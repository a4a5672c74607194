"""``detkit data anchors``: anchor shapes for the YOLO-style head, by k-means on a dataset's box sizes.

The boxes are compared by *shape* only (centred on each other), as the head compares them with its anchors:

- ``shape_iou``: IoU of two boxes with the same centre, ``min(w, aw) * min(h, ah) / union``;
- k-means with the distance ``1 - shape_iou`` (``kmeans_anchors``): k-means++ seeding on that distance,
  Lloyd iterations whose centroid is the **median** width and height of its members (robust to the few
  very large or very thin boxes every dataset has; ``center="mean"`` gives the classic update), an empty
  cluster re-seeded with the box that the other centroids fit worst, a few seeded restarts of which the
  one with the best mean IoU is kept. Deterministic for a given ``seed``;
- ``anchor_fit``: the best possible recall (BPR: the share of boxes that at least one anchor may be
  assigned to under the head's rule ``max(w/aw, aw/w, h/ah, ah/h) < ratio_thresh``) and the mean over boxes
  of the best shape IoU with any anchor;
- ``split_levels``: anchors sorted by area, split into equal groups, fine (small anchors, stride 8) to coarse.

Box sizes are measured where the network sees them: ``dataset_box_sizes`` scales each image's boxes by
``image_size / max(width, height)``, as the data pipeline's letterbox resize does (longest side ``image_size``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

RATIO_THRESH = 4.0  # the YOLO-style head's default anchor-matching ratio


# ------------------------------------------------------------------------------------------------ measures
def _as_wh(wh: Any, what: str = "wh") -> np.ndarray:
    arr = np.asarray(wh, dtype=np.float64)
    if arr.ndim == 1 and arr.size == 0:
        arr = arr.reshape(0, 2)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{what}: expected an N x 2 array of (width, height), got shape {arr.shape}")
    return arr


def shape_iou(wh: Any, anchors: Any) -> np.ndarray:
    """IoU of every box with every anchor, both centred at the same point: ``[N, 2], [K, 2] -> [N, K]``."""
    wh, anchors = _as_wh(wh), _as_wh(anchors, "anchors")
    inter = np.minimum(wh[:, None, 0], anchors[None, :, 0]) * np.minimum(wh[:, None, 1], anchors[None, :, 1])
    union = (wh[:, 0] * wh[:, 1])[:, None] + (anchors[:, 0] * anchors[:, 1])[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union
    return np.nan_to_num(iou, nan=0.0)


def anchor_fit(wh: Any, anchors: Any, ratio_thresh: float = RATIO_THRESH) -> tuple[float, float]:
    """``(bpr, mean_iou)`` of ``anchors`` on the box sizes ``wh``.

    ``bpr``: share of boxes with at least one anchor satisfying ``max(w/aw, aw/w, h/ah, ah/h) < ratio_thresh``
    (the YOLO-style head's assignment rule); ``mean_iou``: mean over boxes of the best :func:`shape_iou`.
    """
    wh, anchors = _as_wh(wh), _as_wh(anchors, "anchors")
    if len(wh) == 0:
        raise ValueError("no boxes to measure the anchors on")
    if len(anchors) == 0:
        raise ValueError("no anchors")
    return float((best_ratio(wh, anchors) < ratio_thresh).mean()), float(shape_iou(wh, anchors).max(1).mean())


def best_ratio(wh: Any, anchors: Any) -> np.ndarray:
    """Per box, the smallest over anchors of ``max(w/aw, aw/w, h/ah, ah/h)`` (1 = a perfect match): ``[N]``."""
    wh, anchors = _as_wh(wh), _as_wh(anchors, "anchors")
    r = wh[:, None, :] / anchors[None, :, :]
    return np.maximum(r, 1.0 / r).max(axis=2).min(axis=1)


# ------------------------------------------------------------------------------------------------ k-means
def _kmeanspp(wh: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding with the distance ``1 - shape_iou``: each next centroid is a box drawn with
    probability proportional to its squared distance to the nearest centroid chosen so far."""
    centroids = [wh[rng.integers(len(wh))]]
    dist = 1.0 - shape_iou(wh, centroids[0][None])[:, 0]
    for _ in range(1, k):
        weights = np.clip(dist, 0.0, None) ** 2
        total = weights.sum()
        index = rng.choice(len(wh), p=weights / total) if total > 0 else int(np.argmax(dist))
        centroids.append(wh[index])
        dist = np.minimum(dist, 1.0 - shape_iou(wh, wh[index][None])[:, 0])
    return np.array(centroids, dtype=np.float64)


def _lloyd(wh: np.ndarray, centroids: np.ndarray, iters: int, center: str) -> np.ndarray:
    reduce = np.median if center == "median" else np.mean
    assign = None
    for _ in range(iters):
        new_assign = shape_iou(wh, centroids).argmax(1)
        if assign is not None and np.array_equal(new_assign, assign):
            break
        assign = new_assign
        for j in range(len(centroids)):
            members = wh[assign == j]
            if len(members):
                centroids[j] = reduce(members, axis=0)
        for j in range(len(centroids)):
            if not np.any(assign == j):  # empty: take the box the other centroids fit worst
                others = np.delete(centroids, j, axis=0)
                worst = int(np.argmin(shape_iou(wh, others).max(1)))
                centroids[j] = wh[worst]
                assign[worst] = j
    return centroids


def kmeans_anchors(wh: Any, k: int, seed: int = 0, iters: int = 300, center: str = "median",
                   restarts: int = 3) -> np.ndarray:
    """``k`` anchor shapes ``[k, 2]`` (float, sorted by area) from the box sizes ``wh [N, 2]``.

    k-means with the distance ``1 - shape_iou``: k-means++ seeding, at most ``iters`` Lloyd iterations
    (centroid = ``median`` or ``mean`` of its members' widths and heights), ``restarts`` seeded runs of which
    the one with the best mean IoU is kept. Raises ``ValueError`` for non-positive sizes and when there are
    fewer distinct box sizes than ``k`` (the caller asks for fewer anchors instead).
    """
    wh = _as_wh(wh)
    if k < 1:
        raise ValueError(f"k = {k}: expected at least one anchor")
    if center not in ("median", "mean"):
        raise ValueError(f"center = {center!r}: expected median or mean")
    if len(wh) == 0:
        raise ValueError("no boxes to fit anchors to")
    if not np.all(np.isfinite(wh)) or np.any(wh <= 0):
        raise ValueError("box sizes must be finite and positive (drop degenerate boxes first)")
    distinct = len(np.unique(wh, axis=0))
    if distinct < k:
        raise ValueError(f"only {distinct} distinct box size{'s' if distinct != 1 else ''}, fewer than the "
                         f"{k} anchors asked for")
    rng = np.random.default_rng(seed)
    best, best_iou = None, -1.0
    for _ in range(max(1, restarts)):
        centroids = _lloyd(wh, _kmeanspp(wh, k, rng), iters, center)
        iou = float(shape_iou(wh, centroids).max(1).mean())
        if iou > best_iou + 1e-12:
            best, best_iou = centroids, iou
    assert best is not None
    return best[np.argsort(best[:, 0] * best[:, 1], kind="stable")]


def round_anchors(anchors: Any) -> np.ndarray:
    """Anchors as integers (at least 1), sorted by area: what a config holds."""
    anchors = np.maximum(np.round(_as_wh(anchors, "anchors")), 1).astype(np.int64)
    return anchors[np.argsort(anchors[:, 0] * anchors[:, 1], kind="stable")]


def split_levels(anchors: Any, levels: int) -> list[np.ndarray]:
    """Anchors sorted by area and split into ``levels`` equal groups, fine (smallest) to coarse."""
    anchors = np.asarray(anchors)
    if anchors.ndim != 2 or anchors.shape[1] != 2:
        raise ValueError(f"anchors: expected a K x 2 array, got shape {anchors.shape}")
    if levels < 1 or len(anchors) % levels:
        raise ValueError(f"{len(anchors)} anchors cannot be split evenly into {levels} levels")
    ordered = anchors[np.argsort(anchors[:, 0] * anchors[:, 1], kind="stable")]
    return list(np.split(ordered, levels))


# ------------------------------------------------------------------------------------------------ datasets
def dataset_box_sizes(dataset, image_size: int | None, counts: Counter | None = None) -> np.ndarray:
    """The (width, height) of every box of ``dataset`` in network input pixels: ``[N, 2]`` float.

    Each image's boxes are scaled by ``image_size / max(width, height)`` (the letterbox resize of the data
    pipeline; ``image_size=None`` keeps original pixels). Reads the parsed records only; an image whose size
    the annotations do not give is opened lazily (header only). Crowd boxes are left out, and so are
    degenerate ones (zero or negative size, not finite) and boxes of images whose size cannot be read; all
    three are counted in ``counts`` (``crowd``, ``degenerate``, ``unsized``), next to ``images`` and
    ``boxes`` (the boxes kept).
    """
    counts = Counter() if counts is None else counts
    sizes: list[np.ndarray] = []
    for record in dataset.records:
        counts["images"] += 1
        boxes = np.asarray(record.boxes, dtype=np.float64).reshape(-1, 4)
        if len(boxes) == 0:
            continue
        crowd = np.asarray(record.iscrowd, bool)
        if crowd.shape == (len(boxes),) and crowd.any():
            counts["crowd"] += int(crowd.sum())
            boxes = boxes[~crowd]
            if len(boxes) == 0:
                continue
        scale = 1.0
        if image_size is not None:
            width, height = record.width, record.height
            if not width or not height:
                width, height = _image_size(record.file)
            if not width or not height:
                counts["unsized"] += len(boxes)
                continue
            scale = float(image_size) / max(width, height)
        wh = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1) * scale
        good = np.all(np.isfinite(wh), axis=1) & np.all(wh > 0, axis=1)
        counts["degenerate"] += int((~good).sum())
        sizes.append(wh[good])
    wh = np.concatenate(sizes) if sizes else np.zeros((0, 2))
    counts["boxes"] += len(wh)
    return wh


def _image_size(path: Path) -> tuple[int | None, int | None]:
    """(width, height) from the image header (PIL opens lazily: no pixels are decoded)."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None, None


# ------------------------------------------------------------------------------------------------ output
def level_names(levels: int, neck_levels: Sequence[str] | None = None) -> list[str]:
    """Pyramid level names for the groups: the neck's own when it has exactly ``levels`` (sorted fine to
    coarse), otherwise p3, p4, ... (the YOLO-style head's usual levels)."""
    if neck_levels and len(neck_levels) == levels and all(str(n)[1:].isdigit() for n in neck_levels):
        return sorted((str(n) for n in neck_levels), key=lambda n: int(n[1:]))
    return [f"p{3 + i}" for i in range(levels)]


def anchors_override(groups: Sequence[np.ndarray], key: str = "model.head.params.anchors") -> str:
    """``key=[[[w,h],...],...]`` without spaces, so it pastes into a shell as one argument."""
    levels = ",".join("[" + ",".join(f"[{int(w)},{int(h)}]" for w, h in g) + "]" for g in groups)
    return f"{key}=[{levels}]"


def anchors_yaml(groups: Sequence[np.ndarray], names: Sequence[str] | None = None) -> str:
    """The YAML a config takes: ``model: {head: {params: {anchors: ...}}}``, one line per level."""
    lines = ["model:", "  head:", "    params:", "      anchors:"]
    for i, g in enumerate(groups):
        pairs = ", ".join(f"[{int(w)}, {int(h)}]" for w, h in g)
        comment = f"  # {names[i]} (stride {2 ** int(names[i][1:])})" if names else ""
        lines.append(f"        - [{pairs}]{comment}")
    return "\n".join(lines) + "\n"
