"""torchvision Faster / Mask R-CNN state dicts under detkit's module names, strictly (for tests and benchmarks
that assemble a model by hand; ``model.weights`` uses :func:`detkit.models.weights.from_torchvision`)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from detkit.models.weights import torchvision_to_detkit

RCNN_PREFIXES = ("backbone.body.", "backbone.fpn.", "rpn.", "roi_heads.")


def from_torchvision_rcnn(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a torchvision ``fasterrcnn_*``/``maskrcnn_*`` state dict to detkit's keys
    (:data:`detkit.models.weights.TORCHVISION_KEYS`: ``backbone.body.*`` -> ``backbone.network.*``, MobileNet's
    numbered blocks -> ``backbone.network.features.N``, ``backbone.fpn.*`` -> ``neck.fpn.*``, ``rpn.*`` ->
    ``head.rpn.*``, ``roi_heads.*`` -> ``head.roi_heads.*``); any other key is a ``KeyError``. torchvision's
    ``LastLevelMaxPool`` (P6) has no weights: detkit's equivalent is ``model.neck.extra_op: maxpool``."""
    odd = next((k for k in state_dict if not k.startswith(RCNN_PREFIXES)), None)
    if odd is not None:
        raise KeyError(f"unexpected torchvision key {odd!r}")
    return torchvision_to_detkit(state_dict)
