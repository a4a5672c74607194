"""ResNet-18/34/50/101 (torchvision)."""

from __future__ import annotations

import torchvision
from torch import nn

from detkit.backbones.registry import BackboneSpec, register

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


for _name in ("resnet18", "resnet34", "resnet50", "resnet101"):
    register(BackboneSpec(
        name=_name,
        family="resnet",
        network=_resnet(_name),
        plan=lambda net: [(level, list(names)) for level, names in RESNET_PLAN],
        head=("avgpool", "fc"),
        torchvision_weights=_name,
    ))
