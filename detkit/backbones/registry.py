"""The backbone registry, the backbone contract, and the builder that maps ``model.backbone`` onto a backbone.

Every backbone family is declared once, as a :class:`~detkit.backbones.family.BackboneFamily` in its own module (its
names or name prefix, how it builds the backbone and the full classifier, its ImageNet resolution, the options it
takes), and registered below with one line. :func:`build_backbone`, :func:`build_classifier`,
:func:`imagenet_resolution` and :func:`get_spec` look the family up in :data:`BACKBONES` and call it: nothing here
knows a family, a prefix or which options a backbone takes.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Protocol

from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from detkit.backbones.family import BackboneFamily, BackboneSpec
from detkit.config.schema import BackboneConfig
from detkit.errors import ConfigError
from detkit.utils.registry import Registry


class BackboneContract(Protocol):
    """The backbone contract: ``forward(x[B, 3, H, W]) -> OrderedDict[level -> B x C x h x w]`` for its
    ``out_levels`` (``c_k`` has stride ``2**k``, fine to coarse), with ``out_channels`` and ``strides`` (dicts keyed
    by level) and ``mean``/``std`` (the input normalisation its weights expect, RGB in [0, 1]) known at
    construction, before any forward pass."""

    out_channels: dict[str, int]
    strides: dict[str, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def forward(self, x: Tensor) -> dict[str, Tensor]: ...


BACKBONES: Registry = Registry("backbone", "model.backbone.name", contract=BackboneContract,
                               hint="see `detkit backbones`")
_FAMILIES: dict[str, BackboneFamily] = {}  # by family name, in registration order


def register_family(family: BackboneFamily | str) -> BackboneFamily:
    """Register ``family`` (or ``"module:attribute"`` naming it): each preset name, or its name prefix, resolves to
    it in :data:`BACKBONES` (the entry's traits: the preset's :class:`BackboneSpec`, ``None`` for a prefix)."""
    if isinstance(family, str):
        module, _, attribute = family.partition(":")
        family = getattr(importlib.import_module(module), attribute)
    if family.name in _FAMILIES:
        raise ValueError(f"backbone family {family.name!r} is registered already")
    taken = [n for n in family.names if n in BACKBONES]
    taken += [f"{f.prefix}<name>" for f in _FAMILIES.values() if family.prefix and f.prefix == family.prefix]
    if taken:
        raise ValueError(f"backbone family {family.name!r}: {', '.join(taken)} registered already by another family")
    _FAMILIES[family.name] = family
    if family.prefix:
        BACKBONES.register_prefix(family.prefix, family)
    for spec in family.presets:
        BACKBONES.register(spec.name, family, spec)
    return family


def unregister_family(family: BackboneFamily | str) -> None:
    """Remove a family (the object or its name) and every name it answers to."""
    family = _FAMILIES.pop(family if isinstance(family, str) else family.name, None)
    if family is not None:
        for name in [*family.names, *([family.prefix] if family.prefix else [])]:
            BACKBONES.unregister(name)


def families() -> list[BackboneFamily]:
    return list(_FAMILIES.values())


def family_of(name: str) -> BackboneFamily:
    """The family ``name`` belongs to; an unknown name is one ``ConfigError`` line with "did you mean"."""
    return BACKBONES.get(name)


def list_backbones(presets_only: bool = True) -> list[str]:
    return BACKBONES.names(lambda e: e.traits.preset or not presets_only)


def get_spec(name: str) -> BackboneSpec:
    spec = BACKBONES.traits(name)
    if spec is None:
        raise ConfigError(f"model.backbone.name = {name!r}: {family_of(name).name} backbones have no spec")
    return spec


def _as_config(cfg: BackboneConfig | DictConfig | Mapping | str | None, overrides: Mapping[str, Any]) -> DictConfig:
    from detkit.config.loader import validate

    if isinstance(cfg, DictConfig) and not overrides and OmegaConf.get_type(cfg) is BackboneConfig:
        return cfg  # a node of a config the loader has validated already: not again
    if cfg is None or isinstance(cfg, str):
        data: dict[str, Any] = {"name": cfg or BackboneConfig.name}
    elif isinstance(cfg, DictConfig):
        data = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    elif isinstance(cfg, BackboneConfig):
        data = OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[assignment]
    else:
        data = dict(cfg)
    data.update(overrides)
    return validate({"model": {"backbone": data}}).model.backbone


def build_backbone(cfg: BackboneConfig | DictConfig | Mapping | str | None = None, **overrides: Any) -> nn.Module:
    """Build the backbone described by ``model.backbone`` (a config node, a dict, or just a name).

    Keyword arguments override config keys: ``build_backbone("resnet50", out_levels=["c3", "c4", "c5"])``.
    """
    cfg = _as_config(cfg, overrides)
    for key in ("mean", "std"):
        if cfg[key] is not None and len(cfg[key]) != 3:
            raise ConfigError(f"model.backbone.{key} = {list(cfg[key])}: expected 3 values (R, G, B in [0, 1] units)")
    family = _checked_family(cfg)
    backbone = family.build_backbone(cfg)
    return BACKBONES.check(cfg.name, set_bn_momentum(set_normalisation(backbone, cfg), cfg.bn_momentum))


def _checked_family(cfg: DictConfig) -> BackboneFamily:
    """``cfg.name``'s family, after checking that it takes every option set in ``cfg`` (else one line)."""
    family = family_of(cfg.name)
    key = family.refused(cfg)
    if key is not None:
        raise ConfigError(family.refusal(key, cfg, [f.name for f in families() if key in f.accepts]))
    return family


def set_normalisation(backbone: nn.Module, cfg: DictConfig) -> nn.Module:
    """``model.backbone.mean`` / ``std`` (when set) replace the backbone's own input normalisation."""
    if cfg.mean is not None:
        backbone.mean = tuple(float(v) for v in cfg.mean)
    if cfg.std is not None:
        backbone.std = tuple(float(v) for v in cfg.std)
    return backbone


def set_bn_momentum(module: nn.Module, momentum: float | None) -> nn.Module:
    """Every BatchNorm's running-statistics momentum (``model.backbone.bn_momentum``; ``None``: as built)."""
    if momentum is not None:
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = float(momentum)
    return module


def build_classifier(cfg: BackboneConfig | DictConfig | Mapping | str | None = None, num_classes: int = 1000,
                     **overrides: Any) -> nn.Module:
    """The backbone's full classification network (stem, body and a ``num_classes`` head), as published.

    Used to compare complexity with published ImageNet numbers (``detkit backbones --imagenet``).
    """
    cfg = _as_config(cfg, overrides)
    return _checked_family(cfg).build_classifier(cfg, num_classes)


def imagenet_resolution(cfg: BackboneConfig | DictConfig | Mapping | str | None = None, **overrides: Any) -> int:
    """The input resolution the backbone's ImageNet network is made for (its family's own rule)."""
    cfg = _as_config(cfg, overrides)
    return family_of(cfg.name).imagenet_resolution(cfg)


# One line per family: the module that declares it (registration order = the order of `detkit backbones`).
register_family("detkit.backbones.resnet:FAMILY")
register_family("detkit.backbones.regnet:FAMILY")
register_family("detkit.backbones.regnet:ANYNET")
register_family("detkit.backbones.efficientnet:FAMILY")
register_family("detkit.backbones.mobilenet:FAMILY")
register_family("detkit.backbones.ssd_vgg:FAMILY")
register_family("detkit.backbones.csp:FAMILY")
register_family("detkit.backbones.timm_backbone:FAMILY")
register_family("detkit.backbones.torchvision_any:FAMILY")
