"""MobileNetV3 large and small (torchvision)."""

from __future__ import annotations

import torchvision
from torch import nn

from detkit.backbones.base import split_by_stride
from detkit.backbones.registry import BackboneSpec, register


def _mobilenet(name: str):
    def build(cfg, num_classes: int) -> nn.Module:
        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes, **cfg.kwargs)

    return build


for _name in ("mobilenet_v3_large", "mobilenet_v3_small"):
    register(BackboneSpec(
        name=_name,
        family="mobilenet_v3",
        network=_mobilenet(_name),
        plan=lambda net: split_by_stride(net, "features"),
        head=("avgpool", "classifier"),
        torchvision_weights=_name,
    ))
