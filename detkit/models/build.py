"""``build_model(cfg)``: the model of ``cfg.model``, composed in one place (backbone -> neck -> head).

Which model class a head makes, and what is checked, comes from the head's traits in :data:`detkit.heads.HEADS`:
semantic heads make a :class:`~detkit.models.Segmenter`, every other head a :class:`~detkit.models.Detector`.
"""

from __future__ import annotations

from typing import Any

from detkit.backbones import BACKBONES, build_backbone
from detkit.errors import ConfigError
from detkit.heads.registry import HEADS, HeadTraits
from detkit.models.base import Model
from detkit.models.detector import Detector
from detkit.models.segmenter import Segmenter
from detkit.necks import NECKS, NO_NECK, build_neck


def check_model_config(cfg: Any) -> HeadTraits:
    """``model.*`` names against their registries and ``num_classes`` against the head's task, before anything is
    built; returns the head's traits. Every mistake is one :class:`ConfigError` line."""
    m = cfg.model
    traits = HEADS.traits(m.head.name)
    BACKBONES.entry(m.backbone.name)
    if m.neck.name != NO_NECK:
        NECKS.entry(m.neck.name)
    if int(m.num_classes) < 1:
        raise ConfigError(f"model.num_classes = {m.num_classes}: expected at least 1 (background is added)")
    if traits.semantic and int(m.num_classes) < 2:
        raise ConfigError(f"model.num_classes = {m.num_classes}: semantic segmentation needs at least 2 classes "
                          f"({m.head.name} adds no background class: give the dataset's classes, background "
                          f"included)")
    return traits


def build_model(cfg: Any) -> Model:
    """The model of ``cfg.model`` (``cfg.data.image_size`` is the input size the head is built for); ``config``
    set to ``cfg``. Unknown names and bad values are one-line :class:`ConfigError` s."""
    m = cfg.model
    traits = check_model_config(cfg)
    backbone = build_backbone(m.backbone)
    neck = build_neck(m.neck, backbone.out_channels, backbone.strides)
    if neck is not None:
        channels = {level: int(neck.out_channels) for level in neck.strides}
        strides = dict(neck.strides)
    else:
        channels, strides = dict(backbone.out_channels), dict(backbone.strides)
    name = m.head.name
    head = HEADS.check(name, HEADS.get(name)(m.head.params, channels, strides, int(m.num_classes),
                                             int(cfg.data.image_size)))
    if traits.export == "flat" and not hasattr(head, "flat_detections"):
        raise TypeError(f"head {name!r} is registered with export 'flat' and has no flat_detections method")
    if traits.semantic:
        model: Model = Segmenter(backbone, neck, head, traits)
    else:
        model = Detector(backbone, neck, head, mask_threshold=getattr(head, "mask_threshold", 0.5), traits=traits)
    model.config = cfg
    return model
