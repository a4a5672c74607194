"""A head's weight layout: what ``model.weights`` needs to know about a head, declared beside the head's code.

- ``class_layers``: the head's parameters whose first dimension is (anchors x) classes x rows per class, so that
  ``model.weights_classes`` can keep the rows of the classes a source knows (:class:`ClassLayer`);
- ``torchvision``: how the state dict of torchvision's matching detector (the whole detector: backbone, FPN and
  head) maps onto detkit's module names, or ``None`` where torchvision has no such detector.

A head module defines its layout (``WEIGHTS = WeightLayout(...)``) and names it in its registry line
(``HeadTraits(..., layout="detkit.heads.<module>:WEIGHTS")``, imported on first use);
:mod:`detkit.models.weights` asks the model's head for it and knows no head's keys. The torchvision pieces that
several heads share (torchvision's ``BackboneWithFPN``: R-CNN, RetinaNet, FCOS) are here, once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import Tensor

Renames = tuple[tuple[str, str], ...]  # (torchvision key prefix, detkit's), the first that matches wins

BODY = "backbone.body."
# torchvision's BackboneWithFPN: its body is detkit's backbone network, its FPN the neck's
FPN_BACKBONE: Renames = ((BODY, "backbone.network."), ("backbone.fpn.", "neck.fpn."))


@dataclass(frozen=True)
class ClassLayer:
    """A class layer: ``pattern`` (a regular expression) matches the whole name of the parameter inside the head
    (the model's key without ``head.``); its first dimension is (anchors x) classes x ``rows`` (rows per class),
    with a background row first where ``background``."""

    pattern: str
    rows: int = 1
    background: bool = True

    def matches(self, name: str) -> bool:
        return re.fullmatch(self.pattern, name) is not None


@dataclass(frozen=True)
class WeightLayout:
    """A head's weight layout (see the module docstring). ``torchvision(state) -> state`` under detkit's keys may
    raise ``KeyError``/``ValueError`` for a state dict that is not its detector's; ``detectors`` names them."""

    class_layers: tuple[ClassLayer, ...] = ()
    torchvision: Callable[[Mapping[str, Tensor]], dict[str, Tensor]] | None = None
    detectors: str = ""  # torchvision's builders whose weights it takes (for messages), e.g. "retinanet_*, fcos_*"

    def class_layer(self, key: str) -> ClassLayer | None:
        """The class layer that the model's key ``key`` (``head.<name>``) is, or None."""
        if not key.startswith("head."):
            return None
        name = key[len("head."):]
        return next((layer for layer in self.class_layers if layer.matches(name)), None)


def rename(state: Mapping[str, Tensor], renames: Renames, strict: bool = False) -> dict[str, Tensor]:
    """``state`` with each key's first matching prefix of ``renames`` replaced. torchvision's MobileNet bodies index
    ``features`` directly (``backbone.body.N`` -> ``backbone.network.features.N``). A key no prefix matches is kept
    as it is (``model.weights`` reports it as skipped unless the model has it), or is a ``KeyError`` with
    ``strict``."""
    out = {}
    for key, value in state.items():
        for old, new in renames:
            if key.startswith(old):
                rest = key[len(old):]
                if old == BODY and rest[:1].isdigit():
                    rest = "features." + rest
                out[new + rest] = value
                break
        else:
            if strict:
                raise KeyError(f"unexpected torchvision key {key!r}")
            out[key] = value
    return out
