"""Test-time augmentation: a model run on scaled and flipped copies of a batch, the passes merged.

``TTA(scales=(1.0,), hflip=True, merge="auto", iou=0.55)`` (the config's ``eval.tta``) and
``tta_predict(model, batch, tta, size_divisor)``: for a collated batch (what :meth:`detkit.models.Model.predict`
takes) every scale x (unflipped, flipped) pass runs the model on the normalised images resized by that scale
(padded to ``size_divisor``), maps its outputs back to the original pixels (boxes un-flipped, masks and logits
flipped back), and merges them per image: detections by weighted box fusion or NMS
(:mod:`detkit.inference.merge`; ``auto``: fusion for boxes, NMS for instance masks, which cannot be fused),
U-Net logits by their mean. It returns what
:func:`raw_predict` returns: per image detections, or ``{"logits": K x H x W}`` for a segmenter.

Used by ``detkit eval --tta`` (the engine's validation, scored by the same evaluator) and ``Predictor(tta=...)``
/ ``detkit predict --tta``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from detkit.errors import ConfigError
from detkit.inference.merge import check_merge, mean_logits, merge_detections, settings_of
from detkit.models import Model


@dataclass
class TTA:
    """Test-time augmentation settings (``eval.tta`` in a config)."""

    scales: Sequence[float] = field(default_factory=lambda: [1.0])  # add e.g. 0.83, 1.17: multi-scale
    hflip: bool = True
    merge: str = "auto"  # auto (wbf; nms for instance masks) | wbf | nms
    iou: float = 0.55
    max_detections: int = 300

    def __post_init__(self) -> None:
        self.scales = [float(s) for s in self.scales]
        if not self.scales or any(not 0.1 <= s <= 4 for s in self.scales):
            raise ConfigError(f"eval.tta.scales = {list(self.scales)}: give scales between 0.1 and 4")
        check_merge("wbf" if self.merge == "auto" else self.merge, "iou", self.iou, what="eval.tta.merge")

    def method(self, masks: bool) -> str:
        """The merge for a model with (or without) instance masks."""
        return ("nms" if masks else "wbf") if self.merge == "auto" else self.merge

    @classmethod
    def of(cls, value: Any) -> TTA | None:
        """``True`` (the defaults), a mapping of settings, a TTA, or ``False``/``None`` (no TTA)."""
        return settings_of(cls, value, "eval.tta", "tta", "key", "give true, false or a mapping of eval.tta settings")

    @property
    def passes(self) -> list[tuple[float, bool]]:
        return [(s, flip) for s in self.scales for flip in ((False, True) if self.hflip else (False,))]


@torch.no_grad()
def raw_predict(model: Model, batch: dict[str, Any]) -> list[dict[str, Tensor]]:
    """:meth:`Model.predict`, except that a segmenter returns its ``{"logits": K x H x W}`` at the original size
    (what passes are merged on)."""
    if model.task != "semantic":
        return model.predict(batch)
    targets = batch.get("targets") or []
    orig = [t["orig_size"] for t in targets] if targets and "orig_size" in targets[0] else None
    return [{"logits": x} for x in model.original_logits(model.preprocess(batch["images"]), batch["image_sizes"],
                                                         orig)]


@torch.no_grad()
def tta_predict(model: Model, batch: dict[str, Any], tta: TTA, size_divisor: int = 32,
                channels_last: bool = False) -> list[dict[str, Tensor]]:
    """The merged passes of one collated batch (see the module docstring)."""
    method = tta.method(bool(model.traits.masks))
    check_merge(method, "iou", tta.iou, masks=bool(model.traits.masks), what="eval.tta.merge")
    images = model.preprocess(batch["images"])  # normalised floats: the passes resize these
    sizes = [(int(h), int(w)) for h, w in batch["image_sizes"]]
    targets = batch.get("targets") or [{} for _ in sizes]
    orig = [tuple(int(v) for v in t.get("orig_size", s)) for t, s in zip(targets, sizes)]
    base_scales = [tuple(float(v) for v in t.get("scale", (1.0, 1.0))) for t in targets]
    passes: list[list[dict[str, Tensor]]] = [[] for _ in sizes]
    for scale, flip in tta.passes:
        x, psizes, pscales = _resized(images, sizes, base_scales, scale, size_divisor)
        if flip:
            x = x.clone()
            for i, (h, w) in enumerate(psizes):
                x[i, :, :h, :w] = x[i, :, :h, :w].flip(-1)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if model.task == "semantic":
            outs = [{"logits": t} for t in model.original_logits(x, psizes, orig)]
        else:
            outs = model(x, image_sizes=psizes, scales=pscales, orig_sizes=orig)
        for i, out in enumerate(outs):
            passes[i].append(_unflip(out, orig[i][1]) if flip else out)
    if model.task == "semantic":
        return [{"logits": mean_logits([p["logits"] for p in per])} for per in passes]
    return [merge_detections(per, orig[i], method, tta.iou, max_detections=tta.max_detections)
            for i, per in enumerate(passes)]


def _resized(images: Tensor, sizes: list[tuple[int, int]], base: list[tuple[float, float]], scale: float,
             divisor: int) -> tuple[Tensor, list[tuple[int, int]], list[tuple[float, float]]]:
    if scale == 1.0:
        return images, sizes, base
    new = [(max(1, round(h * scale)), max(1, round(w * scale))) for h, w in sizes]
    hmax, wmax = max(h for h, _ in new), max(w for _, w in new)
    d = max(1, int(divisor))
    out = images.new_zeros(images.shape[0], images.shape[1], -(-hmax // d) * d, -(-wmax // d) * d)
    for i, ((h, w), (nh, nw)) in enumerate(zip(sizes, new)):
        out[i, :, :nh, :nw] = F.interpolate(images[i:i + 1, :, :h, :w], size=(nh, nw), mode="bilinear",
                                            align_corners=False)[0]
    scales = [(sx * nw / w, sy * nh / h) for (sx, sy), (h, w), (nh, nw) in zip(base, sizes, new)]
    return out, new, scales


def _unflip(out: dict[str, Tensor], width: int) -> dict[str, Tensor]:
    """A pass on mirrored images, mirrored back (boxes, masks, logits in original pixels)."""
    out = dict(out)
    if "logits" in out:
        out["logits"] = out["logits"].flip(-1)
        return out
    b = out["boxes"]
    out["boxes"] = torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], dim=1) if len(b) else b
    if "masks" in out:
        out["masks"] = out["masks"].flip(-1)
    return out


class TTAPredict:
    """:meth:`Model.predict` with test-time augmentation: the merged passes, segmenters' logits turned into label
    maps (what the engine's evaluator takes; ``detkit eval --tta``)."""

    def __init__(self, model: Model, tta: TTA, size_divisor: int = 32) -> None:
        self.model, self.tta, self.size_divisor = model, tta, size_divisor

    def __call__(self, batch: dict[str, Any]) -> list[dict[str, Tensor]]:
        from detkit.models.segmenter import label_map

        return [label_map(p["logits"]) if "logits" in p else p
                for p in tta_predict(self.model, batch, self.tta, self.size_divisor)]
