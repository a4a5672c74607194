"""Backbones: any network as an ordered dict of feature maps ``c1..c5`` with declared channels and strides.

Importing this package registers every family (ResNet, RegNet, EfficientNet, MobileNetV3); ``timm:<model>``
names reach any timm model with ``features_only``.
"""

from detkit.backbones import resnet, regnet, efficientnet, mobilenet, ssd_vgg  # noqa: F401, I001  (registration order = table order)
from detkit.backbones.base import Backbone
from detkit.backbones.registry import (
    BACKBONES,
    BackboneContract,
    BackboneSpec,
    build_backbone,
    build_classifier,
    get_spec,
    imagenet_resolution,
    list_backbones,
)

__all__ = [
    "BACKBONES",
    "BackboneContract",
    "Backbone",
    "BackboneSpec",
    "build_backbone",
    "build_classifier",
    "get_spec",
    "imagenet_resolution",
    "list_backbones",
]
