"""Merging detections of one image that come from several passes (test-time augmentations, tiles).

``merge_detections(parts, size, method, iou, match)``: ``parts`` are per-pass detections in the same (original)
pixels, ``{"boxes" (xyxy), "scores", "labels"[, "masks" (N x H x W bool)]}``. Methods:

- ``nms``: class-wise greedy suppression (torchvision's ``batched_nms`` for ``match="iou"``); ``match="ios"``
  compares by intersection over the smaller box, so that a box cut at a tile's edge is suppressed by the whole box
  of the same object from another tile or the full-image pass (as SAHI does). Masks are kept with their boxes.
- ``wbf``: weighted box fusion (the ``ensemble-boxes`` package): boxes of one class that overlap by ``iou`` become
  their score-weighted mean; each pass is one "model", so a box found by fewer passes scores lower. Boxes only:
  instance masks cannot be fused (a one-line error says to use ``nms``).

Semantic logits are merged by their mean (:func:`mean_logits`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_area

from detkit.errors import ConfigError

log = logging.getLogger(__name__)
MERGE_METHODS = ("nms", "wbf")
MATCH_METRICS = ("iou", "ios")


def check_merge(method: str, match: str = "iou", iou: float = 0.5, masks: bool = False, what: str = "merge") -> None:
    if method not in MERGE_METHODS:
        raise ConfigError(f"{what} = {method!r}: use one of {', '.join(MERGE_METHODS)}")
    if match not in MATCH_METRICS:
        raise ConfigError(f"{what} match = {match!r}: use one of {', '.join(MATCH_METRICS)}")
    if not 0 < float(iou) <= 1:
        raise ConfigError(f"{what} iou = {iou}: must be in (0, 1]")
    if method == "wbf" and masks:
        raise ConfigError(f"{what} = wbf fuses boxes only: this model predicts instance masks, use nms")
    if method == "wbf" and match != "iou":
        raise ConfigError(f"{what} = wbf matches boxes by iou (match = {match!r} is for nms)")


def concat(parts: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    keys = [k for k in ("boxes", "scores", "labels", "masks") if all(k in p for p in parts)]
    out = {k: torch.cat([p[k] for p in parts]) for k in keys}
    if "boxes" in out:
        out["boxes"] = out["boxes"].reshape(-1, 4)
    return out


def merge_detections(parts: Sequence[dict[str, Tensor]], size: tuple[int, int], method: str = "nms",
                     iou: float = 0.5, match: str = "iou", max_detections: int | None = None) -> dict[str, Tensor]:
    """One image's detections from several passes -> one set, sorted by score (see the module docstring)."""
    parts = [p for p in parts if p is not None]
    if not parts:
        raise ValueError("nothing to merge")
    if method == "wbf":
        out = fuse_boxes(parts, size, iou)
    else:
        out = concat(parts)
        keep = suppress(out["boxes"], out["scores"], out["labels"], iou, match)
        out = {k: v[keep] for k, v in out.items()}
    if max_detections is not None and len(out["scores"]) > max_detections:
        out = {k: v[:max_detections] for k, v in out.items()}
    return out


def suppress(boxes: Tensor, scores: Tensor, labels: Tensor, threshold: float, match: str = "iou") -> Tensor:
    """Indices kept by class-wise greedy suppression, highest score first."""
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    if match == "iou":
        return batched_nms(boxes.float(), scores.float(), labels, float(threshold))
    order = scores.argsort(descending=True)
    b, lab = boxes[order].float(), labels[order]
    lt = torch.maximum(b[:, None, :2], b[None, :, :2])
    rb = torch.minimum(b[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = box_area(b)
    ios = inter / torch.minimum(area[:, None], area[None, :]).clamp(min=1e-9)
    overlap = (ios > threshold) & (lab[:, None] == lab[None, :])
    alive = torch.ones(len(b), dtype=torch.bool, device=b.device)
    for i in range(len(b)):  # greedy, in score order: a kept box removes the later ones it overlaps
        if alive[i]:
            rest = overlap[i].clone()
            rest[: i + 1] = False
            alive &= ~rest
    return order[alive]


def fuse_boxes(parts: Sequence[dict[str, Tensor]], size: tuple[int, int], iou: float) -> dict[str, Tensor]:
    """Weighted box fusion over the passes (boxes normalised by the image size for ``ensemble-boxes``)."""
    from ensemble_boxes import weighted_boxes_fusion

    h, w = (float(v) for v in size)
    device = parts[0]["boxes"].device
    scale = torch.tensor([w, h, w, h], dtype=torch.float64)
    boxes, scores, labels, empty = [], [], [], 0
    for p in parts:  # boxes of no area (squeezed flat against the image's edge) match nothing: left out, counted
        b = (p["boxes"].detach().cpu().double() / scale).clamp(0, 1)
        keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        empty += int((~keep).sum())
        boxes.append(b[keep].numpy())
        scores.append(p["scores"].detach().cpu().double()[keep].numpy())
        labels.append(p["labels"].detach().cpu()[keep].numpy())
    if empty:
        log.debug("weighted box fusion: %d boxes of zero area left out", empty)
    if sum(len(s) for s in scores) == 0:
        return {"boxes": torch.zeros(0, 4, device=device), "scores": torch.zeros(0, device=device),
                "labels": torch.zeros(0, dtype=torch.long, device=device)}
    fused, fscores, flabels = weighted_boxes_fusion(boxes, scores, labels, iou_thr=float(iou), skip_box_thr=0.0)
    order = torch.as_tensor(fscores).argsort(descending=True)
    return {"boxes": (torch.as_tensor(fused) * scale)[order].float().to(device),
            "scores": torch.as_tensor(fscores)[order].float().to(device),
            "labels": torch.as_tensor(flabels)[order].long().to(device)}


def mean_logits(parts: Sequence[Tensor]) -> Tensor:
    """Semantic logits (``K x H x W``, the same size) of several passes -> their mean."""
    return torch.stack(list(parts)).mean(dim=0)


def settings_of(cls: type, value: Any, mapping_key: str, value_key: str, word: str, hint: str,
                shorthand: Callable[[Any], Any] | None = None) -> Any:
    """A settings dataclass (``Tiling``, ``TTA``) from what a user passes: None/False (off), True (the defaults),
    an instance, a mapping of its fields, or ``shorthand``'s value (e.g. a tile size); else one line."""
    if value is None or value is False:
        return None
    if value is True:
        return cls()
    if isinstance(value, cls):
        return value
    if shorthand is not None and (made := shorthand(value)) is not None:
        return made
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"{mapping_key}: unknown {word} {unknown[0]!r} (known: "
                              f"{', '.join(cls.__dataclass_fields__)})")
        return cls(**dict(value))
    raise ConfigError(f"{value_key} = {value!r}: {hint}")
