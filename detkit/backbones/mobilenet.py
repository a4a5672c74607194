"""MobileNetV3 large and small (torchvision): the ``mobilenet_v3`` family."""

from __future__ import annotations

import torchvision
from torch import nn

from detkit.backbones.base import split_by_stride
from detkit.backbones.family import BackboneFamily, BackboneSpec


def _mobilenet(name: str):
    def build(cfg, num_classes: int) -> nn.Module:
        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes, **cfg.kwargs)

    return build


FAMILY = BackboneFamily(
    name="mobilenet_v3",
    presets=tuple(BackboneSpec(
        name=name,
        network=_mobilenet(name),
        plan=lambda net: split_by_stride(net, "features"),
        head=("avgpool", "classifier"),
        torchvision_weights=name,
    ) for name in ("mobilenet_v3_large", "mobilenet_v3_small")),
    accepts=("kwargs", "taps"),  # kwargs: torchvision's mobilenet builder arguments
)
