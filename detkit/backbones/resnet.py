"""ResNet-18/34/50/101 (torchvision): the ``resnet`` family."""

from __future__ import annotations

import torchvision
from torch import nn

from detkit.backbones.family import BackboneFamily, BackboneSpec

RESNET_PLAN = [
    ("c1", ["conv1", "bn1", "relu"]),
    ("c2", ["maxpool", "layer1"]),
    ("c3", ["layer2"]),
    ("c4", ["layer3"]),
    ("c5", ["layer4"]),
]


def _resnet(name: str):
    def build(cfg, num_classes: int) -> nn.Module:
        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes, **cfg.kwargs)

    return build


FAMILY = BackboneFamily(
    name="resnet",
    presets=tuple(BackboneSpec(
        name=name,
        network=_resnet(name),
        plan=lambda net: [(level, list(names)) for level, names in RESNET_PLAN],
        head=("avgpool", "fc"),
        torchvision_weights=name,
    ) for name in ("resnet18", "resnet34", "resnet50", "resnet101")),
    accepts=("kwargs", "taps"),  # kwargs: torchvision's resnet builder arguments
)
