"""Backbones: any network as an ordered dict of feature maps ``c1..c5`` with declared channels and strides.

Each family (ResNet, RegNet, AnyNet, EfficientNet, MobileNetV3, SSD's VGG-16, ``timm:<model>``, ``tv:<model>``) is a
:class:`BackboneFamily` declared in its own module and registered with one line in :mod:`detkit.backbones.registry`.
"""

from detkit.backbones.base import Backbone
from detkit.backbones.registry import (
    BACKBONES,
    BackboneContract,
    BackboneFamily,
    BackboneSpec,
    build_backbone,
    build_classifier,
    families,
    family_of,
    get_spec,
    imagenet_resolution,
    list_backbones,
    register_family,
    unregister_family,
)

__all__ = [
    "BACKBONES",
    "BackboneContract",
    "Backbone",
    "BackboneFamily",
    "BackboneSpec",
    "build_backbone",
    "build_classifier",
    "families",
    "family_of",
    "get_spec",
    "imagenet_resolution",
    "list_backbones",
    "register_family",
    "unregister_family",
]
