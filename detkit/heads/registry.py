"""The head registry: every head's builder and traits, and the head contract.

A head is registered once, here, with the function that builds it and its :class:`HeadTraits`; nothing else in
detkit keeps a list of head names. The config's ``model.head.name`` is checked against :data:`HEADS`; the model
class, the data module (instance masks or not), evaluation (IoU types, metrics) and export read the traits.

Adding a head is one new file (its parameters, module, builder and, for ``model.weights``, its
:class:`~detkit.heads.layout.WeightLayout`) plus one line below. A builder is
``build(params, channels, strides, num_classes, image_size) -> Head``: ``params`` is ``model.head.params`` (check
it with :func:`detkit.heads.params.parse_params`), ``channels``/``strides`` the ``{level: int}`` maps of the
features it receives (the neck's, or the backbone's with ``model.neck.name: none``; choose among them with
:func:`detkit.heads.levels.select_levels`), ``image_size`` is ``data.image_size``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

from detkit.heads.layout import WeightLayout
from detkit.utils.registry import Entry, Registry

TASKS = ("detection", "instance", "semantic")
EXPORTS = ("flat", "per_image", "logits")


@dataclass(frozen=True)
class HeadTraits:
    """What the rest of detkit asks about a head, declared when it is registered.

    ``task``: ``detection`` (boxes), ``instance`` (boxes and instance masks: the data module decodes masks,
    evaluation adds mask AP) or ``semantic`` (per-pixel logits: the model is a :class:`~detkit.models.Segmenter`,
    scored by mIoU). ``export``: ``flat`` (the head has ``flat_detections``: a batched graph, any batch size),
    ``per_image`` (the head loops over images in Python: exported at a fixed batch) or ``logits``. ``layout``: the
    head's :class:`~detkit.heads.layout.WeightLayout` (class layers, torchvision's keys), or a ``"module:attribute"``
    naming it (imported on first use), or None (no class layers, no torchvision weights).
    """

    task: str = "detection"
    export: str = "flat"
    layout: WeightLayout | str | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"HeadTraits.task = {self.task!r}: expected one of {', '.join(TASKS)}")
        if self.export not in EXPORTS:
            raise ValueError(f"HeadTraits.export = {self.export!r}: expected one of {', '.join(EXPORTS)}")
        if (self.task == "semantic") != (self.export == "logits"):
            raise ValueError("HeadTraits: semantic heads export logits, detection heads detections")
        if not isinstance(self.layout, WeightLayout | str | None):
            raise ValueError(f"HeadTraits.layout = {self.layout!r}: expected a WeightLayout or 'module:attribute'")

    def weight_layout(self) -> WeightLayout | None:
        """The head's weight layout (imported on first use when named as ``"module:attribute"``)."""
        return Entry("layout", self.layout).load() if isinstance(self.layout, str) else self.layout

    @property
    def masks(self) -> bool:
        """The head predicts instance masks (and trains on them)."""
        return self.task == "instance"

    @property
    def semantic(self) -> bool:
        return self.task == "semantic"


class Head(Protocol):
    """The head contract. ``forward(features, images, image_sizes, targets=None) -> (outputs, losses)``.

    ``features``: ``{level: B x C x h x w}``; ``images``: the normalised, padded batch; ``image_sizes``: each
    image's unpadded ``(h, w)``. Detection heads return detections per image in input pixels (``boxes`` xyxy,
    ``scores``, ``labels`` 1..K, ``masks`` N x 1 x m x m probabilities for instance heads) and, with ``targets``
    (per-image dicts of ``boxes``, ``labels``[, ``masks``]), a dict of named scalar losses. Semantic heads return
    ``B x K x H x W`` logits at the input's resolution and take ``B x H x W`` label maps as targets. Heads with
    ``export: flat`` also have ``flat_detections(features, images, image_sizes) -> (boxes, scores, labels,
    batch_index)``.
    """

    def forward(self, features: dict[str, Tensor], images: Tensor, image_sizes: Sequence[tuple[int, int]],
                targets: Any = None) -> tuple[Any, dict[str, Tensor]]: ...


HEADS: Registry = Registry("head", "model.head.name", contract=Head)

# name, builder, traits: task, export and the weight layout (model.weights: class layers, torchvision's keys)
HEADS.register("faster_rcnn", "detkit.heads.two_stage:build_faster_rcnn",
               HeadTraits("detection", "per_image", layout="detkit.heads.two_stage:WEIGHTS"))
HEADS.register("mask_rcnn", "detkit.heads.two_stage:build_mask_rcnn",
               HeadTraits("instance", "per_image", layout="detkit.heads.two_stage:WEIGHTS"))
HEADS.register("ssd", "detkit.heads.ssd:build_ssd_head",
               HeadTraits("detection", "flat", layout="detkit.heads.ssd:WEIGHTS"))
HEADS.register("yolo", "detkit.heads.yolo:build_yolo_head", HeadTraits("detection", "flat"))
HEADS.register("yolo_af", "detkit.heads.anchor_free:build_yolo_af_head",
               HeadTraits("detection", "flat", layout="detkit.heads.anchor_free:WEIGHTS"))
HEADS.register("retinanet", "detkit.heads.dense:build_retinanet_head",
               HeadTraits("detection", "per_image", layout="detkit.heads.dense:WEIGHTS"))
HEADS.register("fcos", "detkit.heads.dense:build_fcos_head",
               HeadTraits("detection", "per_image", layout="detkit.heads.dense:WEIGHTS"))
HEADS.register("unet", "detkit.heads.unet:build_unet_head", HeadTraits("semantic", "logits"))


def head_traits(name: str) -> HeadTraits:
    """The traits of ``model.head.name = name`` (one line naming the key for an unknown head)."""
    return HEADS.traits(name)


def torchvision_heads() -> list[str]:
    """The heads whose weight layout maps torchvision's detection weights (imports their layouts)."""
    def takes(entry: Entry) -> bool:
        layout = entry.traits.weight_layout() if isinstance(entry.traits, HeadTraits) else None
        return layout is not None and layout.torchvision is not None

    return HEADS.names(takes)
