"""A backbone family: everything the registry knows of a group of backbones, declared once in the family's module.

A :class:`BackboneFamily` answers to the names of its presets (``resnet18``, ...; one :class:`BackboneSpec` each) or
to every name with its ``prefix`` (``timm:<model>``). It says how it builds the backbone of a validated
``model.backbone`` node, how it builds the whole classification network (for complexity, ``detkit backbones
--imagenet``), the ImageNet resolution its networks are made for, and which optional keys of ``model.backbone`` it
takes (:data:`OPTIONS`); a key it does not take is one ``ConfigError`` line, the family's own wording or the default
of :data:`REFUSED`. A family of presets needs none of ``build``/``classifier``/``resolution``: by default each
preset's classification network is cut into levels by the preset's plan (:func:`build_planned`, a
:class:`~detkit.backbones.base.Backbone`), which is also what makes ``taps`` possible.

The registry (:mod:`detkit.backbones.registry`) registers each family with one line and looks names up; it keeps no
list of prefixes, family names or options of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from detkit.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone, LevelPlan
from detkit.backbones.pretrained import load_into, looks_like_path, read_state_dict, torchvision_weights
from detkit.errors import ConfigError, PretrainedError

# The optional keys of model.backbone a family may take, and the default line when one is set but not taken
# ({name}: the backbone, {value}: the key's value, {takers}: the registered families that take it).
REFUSED: dict[str, str] = {
    "drop_path": "model.backbone.drop_path = {value}: {name} has no stochastic depth (families that have: {takers})",
    "taps": ("model.backbone.taps = {value}: {name}: taps are for the registry's backbones whose levels are runs of "
             "submodules (families: {takers})"),
    "kwargs": "model.backbone.kwargs: {name} takes no extra arguments (got {value})",
}
OPTIONS = tuple(REFUSED)


@dataclass(frozen=True)
class BackboneSpec:
    """One preset of a family: its classification network and how that network splits into levels."""

    name: str
    network: Callable[[Any, int], nn.Module]  # (backbone config, num_classes) -> classification network
    plan: Callable[[nn.Module], LevelPlan]
    head: tuple[str, ...]
    torchvision_weights: str | None = None  # torchvision model name whose weights enum gives named weights
    resolution: Callable[[Any], int] = lambda cfg: 224
    preset: bool = True  # a fixed network (listed by `detkit backbones`), not a parametric one


@dataclass(frozen=True)
class BackboneFamily:
    """A family of backbones, registered once (``register_family``); see the module docstring.

    ``build(cfg) -> backbone`` (the backbone contract), ``classifier(cfg, num_classes) -> network`` and
    ``resolution(cfg) -> int`` receive the validated ``model.backbone`` node; a family of presets may leave them out
    (the preset's network cut by its plan, the preset's network, the preset's resolution). ``accepts``: the
    :data:`OPTIONS` it takes; ``refusals``: its own line for an option it does not take (format fields ``name``,
    ``value``, ``takers``).
    """

    name: str
    presets: tuple[BackboneSpec, ...] = ()
    prefix: str | None = None
    build: Callable[[Any], nn.Module] | None = None
    classifier: Callable[[Any, int], nn.Module] | None = None
    resolution: Callable[[Any], int] | None = None
    accepts: tuple[str, ...] = ()
    refusals: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if bool(self.presets) == bool(self.prefix):
            raise ValueError(f"backbone family {self.name!r}: give either presets (its names) or a prefix")
        if self.prefix and (self.build is None or self.classifier is None):
            raise ValueError(f"backbone family {self.name!r}: a prefix family needs build and classifier")
        unknown = sorted((set(self.accepts) | set(self.refusals)) - set(OPTIONS))
        if unknown:
            raise ValueError(f"backbone family {self.name!r}: unknown options {unknown} (options: {OPTIONS})")

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.presets]

    def preset(self, name: str) -> BackboneSpec | None:
        return next((spec for spec in self.presets if spec.name == name), None)

    def refused(self, cfg: DictConfig) -> str | None:
        """The first option set in ``cfg`` that this family does not take."""
        return next((k for k in OPTIONS if k not in self.accepts and cfg[k] not in (None, {})), None)

    def refusal(self, key: str, cfg: DictConfig, takers: list[str]) -> str:
        value = cfg[key]
        value = OmegaConf.to_container(value) if isinstance(value, DictConfig) else value
        return self.refusals.get(key, REFUSED[key]).format(name=cfg.name, value=value,
                                                           takers=", ".join(takers) or "none")

    # ------------------------------------------------------------------ what the registry's functions call
    def build_backbone(self, cfg: DictConfig) -> nn.Module:
        return self.build(cfg) if self.build is not None else build_planned(self._spec(cfg.name), cfg)

    def build_classifier(self, cfg: DictConfig, num_classes: int) -> nn.Module:
        if self.classifier is not None:
            return self.classifier(cfg, num_classes)
        return preset_network(self._spec(cfg.name), cfg, num_classes)

    def imagenet_resolution(self, cfg: DictConfig) -> int:
        if self.resolution is not None:
            return self.resolution(cfg)
        spec = self.preset(cfg.name)
        return spec.resolution(cfg) if spec is not None else 224

    def _spec(self, name: str) -> BackboneSpec:
        spec = self.preset(name)
        if spec is None:
            raise ConfigError(f"model.backbone.name = {name!r}: not a preset of the {self.name} backbone family "
                              f"({', '.join(self.names)})")
        return spec


# ------------------------------------------------------------------------ the default: a preset cut by its plan
def build_planned(spec: BackboneSpec, cfg: DictConfig) -> Backbone:
    """The preset's classification network split into levels by its plan, ``taps`` applied, weights loaded."""
    network = preset_network(spec, cfg, 1000)
    backbone = Backbone(
        network,
        spec.plan(network),
        out_levels=cfg.out_levels,
        head=spec.head,
        name=cfg.name,
        frozen_stages=cfg.frozen_stages,
        norm=cfg.norm,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        recommended_resolution=spec.resolution(cfg),
        taps=dict(cfg.taps),
    )
    if cfg.pretrained:
        state, source = _pretrained_state(spec, cfg.pretrained)
        dropped = tuple(f"{n}." for n in backbone.dropped)
        load_into(backbone.network, state, source=source, name=cfg.name, ignored_prefixes=dropped)
    return backbone


def preset_network(spec: BackboneSpec, cfg: DictConfig, num_classes: int) -> nn.Module:
    try:
        return spec.network(cfg, num_classes)
    except TypeError as e:  # an unknown keyword in model.backbone.kwargs
        raise ConfigError(f"model.backbone.kwargs = {dict(cfg.kwargs)}: {spec.name}: {e}") from None


def _pretrained_state(spec: BackboneSpec, pretrained: str) -> tuple[dict, str]:
    if looks_like_path(pretrained):
        return read_state_dict(pretrained), pretrained
    if spec.torchvision_weights is None:
        raise PretrainedError(
            f"model.backbone.pretrained = {pretrained!r}: {spec.name} has no named weights (it is built from "
            f"parameters); give a path to a state dict file"
        )
    return torchvision_weights(spec.torchvision_weights, pretrained, spec.name)
