"""Predictions as COCO results: from model outputs (tensors), to and from the dataset's own category ids, and
from a COCO-results JSON file (checked, one-line errors).

A COCO result is ``{image_id, category_id, bbox: [x, y, w, h] (original pixels), score}`` plus, for instance
segmentation, ``segmentation`` (compressed RLE, ``counts`` as str).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from detkit.data.to_coco import normalize_segmentation, rle_to_json
from detkit.errors import DataError

log = logging.getLogger(__name__)


def predictions_to_results(prediction: Mapping[str, Any], image_id: int, with_masks: bool = True
                           ) -> list[dict[str, Any]]:
    """One image's model output (``boxes`` N x 4 xyxy, ``scores``, ``labels`` 1..K, optional ``masks`` N x H x W
    bool/uint8, or N x 1 x H x W probabilities cut at 0.5) as COCO results with ``category_id = label``."""
    boxes = _numpy(prediction["boxes"], np.float64).reshape(-1, 4)
    scores = _numpy(prediction["scores"], np.float64).reshape(-1)
    labels = _numpy(prediction["labels"], np.int64).reshape(-1)
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores and {len(labels)} labels")
    results = [{"image_id": image_id, "category_id": int(label), "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": float(score)}
               for (x1, y1, x2, y2), score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist())]
    masks = prediction.get("masks")
    if with_masks and masks is not None and len(results):
        for result, rle in zip(results, encode_masks(masks)):
            result["segmentation"] = rle
    return results


def encode_masks(masks: Any) -> list[dict[str, Any]]:
    """N x H x W (or N x 1 x H x W) masks as compressed RLEs; float masks are cut at 0.5."""
    array = _numpy(masks)
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 3:
        raise ValueError(f"masks must be N x H x W, got shape {tuple(array.shape)}")
    array = (array > 0.5) if np.issubdtype(array.dtype, np.floating) else (array > 0)
    rles = mask_utils.encode(np.asfortranarray(array.transpose(1, 2, 0).astype(np.uint8)))
    return [rle_to_json(rle) for rle in rles]


def results_to_dataset_ids(results: Sequence[Mapping[str, Any]], label_to_cat: Mapping[int, Any] | Sequence[Any]
                           ) -> list[dict[str, Any]]:
    """Results with ``category_id`` = label 1..K rewritten with the dataset's own ids. ``label_to_cat``: a mapping
    ``{label: id}`` or the dataset's ``cat_ids`` (id of label k at k - 1)."""
    if not isinstance(label_to_cat, Mapping):
        label_to_cat = {i + 1: cat for i, cat in enumerate(label_to_cat)}
    return _remap(results, label_to_cat, "label")


def results_to_labels(results: Sequence[Mapping[str, Any]], cat_to_label: Mapping[Any, int]) -> list[dict[str, Any]]:
    """The inverse of :func:`results_to_dataset_ids`: dataset ids back to labels 1..K."""
    return _remap(results, cat_to_label, "category id")


def _remap(results: Sequence[Mapping[str, Any]], mapping: Mapping[Any, Any], what: str) -> list[dict[str, Any]]:
    out = []
    for r in results:
        if r["category_id"] not in mapping:
            raise DataError(f"{what} {r['category_id']!r} has no counterpart (known: {_preview(mapping)})")
        out.append({**r, "category_id": _plain(mapping[r["category_id"]])})
    return out


def load_predictions(path: str | Path, gt: Mapping[str, Any], cat_to_label: Mapping[Any, int] | None = None
                     ) -> list[dict[str, Any]]:
    """Read a COCO-results JSON file (a list of ``{image_id, category_id, bbox, score, [segmentation]}``).

    ``cat_to_label`` maps the file's category ids onto the ground truth's (default: the same ids). Predictions
    of images or categories that are not in ``gt`` are dropped and counted in a warning; when none is left of
    a non-empty file, that is an error. Segmentations come back as compressed RLE; a result with only a
    segmentation gets its box from the mask.
    """
    from detkit.data.coco import read_json

    path = Path(path)
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of COCO results ({{image_id, category_id, bbox, score}}), "
                        f"got a {type(data).__name__}")
    sizes = {img["id"]: (img.get("height"), img.get("width")) for img in gt["images"]}
    categories = {c["id"] for c in gt["categories"]}
    unknown_images: dict[Any, int] = {}
    unknown_cats: dict[Any, int] = {}
    results = []
    for index, entry in enumerate(data):
        result = _check_entry(entry, f"{path}: entry {index}")
        cat = result["category_id"]
        if cat_to_label is not None:
            cat = cat_to_label.get(cat)
        if cat is None or cat not in categories:
            unknown_cats[result["category_id"]] = unknown_cats.get(result["category_id"], 0) + 1
            continue
        result["category_id"] = cat
        if result["image_id"] not in sizes:
            unknown_images[result["image_id"]] = unknown_images.get(result["image_id"], 0) + 1
            continue
        if "segmentation" in result:
            _normalize_result_mask(result, sizes[result["image_id"]], f"{path}: entry {index}")
        results.append(result)
    if unknown_images:
        log.warning("%s: %d predictions dropped: their image_id is not in the ground truth (e.g. %s)", path,
                    sum(unknown_images.values()), _preview(unknown_images))
    if unknown_cats:
        log.warning("%s: %d predictions dropped: their category_id is not a ground-truth category (e.g. %s)", path,
                    sum(unknown_cats.values()), _preview(unknown_cats))
    if data and not results:
        raise DataError(f"{path}: none of its {len(data)} predictions matches the ground truth (unknown image ids "
                        f"{_preview(unknown_images)}, unknown category ids {_preview(unknown_cats)}; ground-truth "
                        f"categories {_preview(dict.fromkeys(categories))})")
    return results


def _check_entry(entry: Any, where: str) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object {{image_id, category_id, bbox, score}}, got {entry!r:.60}")
    for key in ("image_id", "category_id"):
        value = entry.get(key)
        if not isinstance(value, int | str) or isinstance(value, bool):
            raise DataError(f"{where}: '{key}' must be an integer id, got {value!r:.60}")
    score = entry.get("score")
    if not _is_number(score):
        raise DataError(f"{where}: 'score' must be a finite number, got {score!r:.60}")
    result: dict[str, Any] = {"image_id": entry["image_id"], "category_id": entry["category_id"],
                              "score": float(score)}
    bbox = entry.get("bbox")
    if bbox is not None:
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox))
                and bbox[2] >= 0 and bbox[3] >= 0):
            raise DataError(f"{where}: 'bbox' must be 4 finite numbers [x, y, w, h] with w, h >= 0, got {bbox!r:.80}")
        result["bbox"] = [float(v) for v in bbox]
    if entry.get("segmentation") is not None:
        result["segmentation"] = entry["segmentation"]
    elif bbox is None:
        raise DataError(f"{where}: has neither a 'bbox' nor a 'segmentation'")
    return result


def _normalize_result_mask(result: dict[str, Any], size: tuple[int | None, int | None], where: str) -> None:
    height, width = size
    if height is None or width is None:
        raise DataError(f"{where}: has a segmentation but its image has no width/height in the ground truth")
    try:
        seg = normalize_segmentation(result["segmentation"], height, width)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    if seg is None:
        raise DataError(f"{where}: 'segmentation' is empty")
    if isinstance(seg, list):  # polygons: one RLE (COCOeval takes RLE results only)
        seg = rle_to_json(mask_utils.merge(mask_utils.frPyObjects(seg, height, width)))
    result["segmentation"] = seg
    if "bbox" not in result:
        rle = {"size": seg["size"], "counts": seg["counts"].encode("ascii")}
        result["bbox"] = [float(v) for v in mask_utils.toBbox(rle)]


def _numpy(value: Any, dtype: Any = None) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if value.dtype.is_floating_point:  # float64 keeps float32 boxes exact; bfloat16 has no numpy twin
            value = value.double() if dtype == np.float64 else value.float()
        value = value.numpy()
    array = np.asarray(value)
    return array.astype(dtype) if dtype is not None else array


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _preview(items: Mapping[Any, Any], n: int = 5) -> str:
    keys = [repr(k) for k in list(items)[:n]]
    return "[" + ", ".join(keys) + (", ..." if len(items) > n else "") + "]"
