"""torchvision detection weights under detkit's module names."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

TORCHVISION_RCNN_KEYS = {"backbone.body.": "backbone.network.", "backbone.fpn.": "neck.fpn.", "rpn.": "head.rpn.",
                         "roi_heads.": "head.roi_heads."}


def from_torchvision_rcnn(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a torchvision ``fasterrcnn_*``/``maskrcnn_*`` state dict to detkit's keys.

    ``backbone.body.*`` -> ``backbone.network.*`` (the wrapped torchvision ResNet; MobileNet's numbered blocks
    ``backbone.body.N`` -> ``backbone.network.features.N``), ``backbone.fpn.*`` ->
    ``neck.fpn.*`` (torchvision's FeaturePyramidNetwork inside detkit's FPN), ``rpn.*`` -> ``head.rpn.*``,
    ``roi_heads.*`` -> ``head.roi_heads.*``. torchvision's ``LastLevelMaxPool`` (P6) has no weights: detkit's
    equivalent is ``model.neck.extra_op: maxpool``.
    """
    out = {}
    for key, value in state_dict.items():
        for old, new in TORCHVISION_RCNN_KEYS.items():
            if key.startswith(old):
                rest = key[len(old):]
                if old == "backbone.body." and rest[:1].isdigit():  # MobileNet bodies index `features` directly
                    rest = "features." + rest
                out[new + rest] = value
                break
        else:
            raise KeyError(f"unexpected torchvision key {key!r}")
    return out
