"""The backbone registry, the backbone contract, and the builder that maps ``model.backbone`` onto a backbone.

Each family module registers a :class:`BackboneSpec` per name in :data:`BACKBONES`: how to build the family's
ImageNet classification network, how to split it into levels, and which submodules form its classifier head.
``timm:<model>`` names (a registry prefix) are handled by :mod:`detkit.backbones.timm_backbone`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from detkit.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone, LevelPlan
from detkit.backbones.pretrained import fetch_named, load_into, looks_like_path, read_state_dict
from detkit.backbones.timm_backbone import PREFIX as TIMM_PREFIX
from detkit.config.schema import BackboneConfig
from detkit.errors import ConfigError, PretrainedError
from detkit.utils.registry import Registry

TV_PREFIX = "tv:"  # any torchvision classification CNN (detkit.backbones.torchvision_any)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    family: str
    network: Callable[[Any, int], nn.Module]  # (backbone config, num_classes) -> classification network
    plan: Callable[[nn.Module], LevelPlan]
    head: tuple[str, ...]
    torchvision_weights: str | None = None  # torchvision model name whose weights enum gives named weights
    resolution: Callable[[Any], int] = lambda cfg: 224
    preset: bool = True  # a fixed network (listed by `detkit backbones`), not a parametric family
    # a network whose levels are not a run of submodules (SSD's L2-normed conv4_3): its own builder, cfg -> backbone
    build: Callable[[Any], nn.Module] | None = None


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
BACKBONES.register_prefix(TIMM_PREFIX, "detkit.backbones.timm_backbone:build_timm_backbone")
BACKBONES.register_prefix("tv:", "detkit.backbones.torchvision_any:build_torchvision_backbone")


def register(spec: BackboneSpec) -> BackboneSpec:
    return BACKBONES.register(spec.name, spec)


def list_backbones(presets_only: bool = True) -> list[str]:
    return BACKBONES.names(lambda e: e.target.preset or not presets_only)


def get_spec(name: str) -> BackboneSpec:
    if name.startswith((TIMM_PREFIX, TV_PREFIX)):
        raise ConfigError(f"model.backbone.name = {name!r}: {name.split(':')[0]} backbones have no spec")
    return BACKBONES.get(name)


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
    if cfg.name.startswith((TIMM_PREFIX, TV_PREFIX)):  # prefix families: timm:<model>, tv:<model>
        if cfg.drop_path is not None and cfg.name.startswith(TV_PREFIX):
            raise ConfigError(f"model.backbone.drop_path: {cfg.name}: pass the model's own argument in "
                              f"model.backbone.kwargs (e.g. stochastic_depth_prob for ConvNeXt)")
        if cfg.taps:
            raise ConfigError(f"model.backbone.taps: {cfg.name}: taps are for the registry's backbones (see `detkit "
                              f"backbones`), whose levels are runs of submodules")
        backbone = BACKBONES.get(cfg.name)(cfg)
        return BACKBONES.check(cfg.name, set_bn_momentum(set_normalisation(backbone, cfg), cfg.bn_momentum))
    spec = get_spec(cfg.name)
    if spec.build is not None:
        if cfg.taps or cfg.drop_path is not None:
            raise ConfigError(f"model.backbone: {cfg.name} takes neither taps nor drop_path")
        backbone = spec.build(cfg)
        return BACKBONES.check(cfg.name, set_bn_momentum(set_normalisation(backbone, cfg), cfg.bn_momentum))
    if cfg.drop_path is not None and spec.family != "efficientnet":
        raise ConfigError(f"model.backbone.drop_path = {cfg.drop_path}: {cfg.name} has no stochastic depth "
                          f"(EfficientNet and timm models have)")
    network = _build_network(spec, cfg, 1000)
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
    set_normalisation(backbone, cfg)
    if cfg.pretrained:
        state, source = _pretrained_state(spec, cfg.pretrained)
        dropped = tuple(f"{n}." for n in backbone.dropped)
        load_into(backbone.network, state, source=source, name=cfg.name, ignored_prefixes=dropped)
    return BACKBONES.check(cfg.name, set_bn_momentum(backbone, cfg.bn_momentum))


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


def _pretrained_state(spec: BackboneSpec, pretrained: str) -> tuple[dict, str]:
    if looks_like_path(pretrained):
        return read_state_dict(pretrained), pretrained
    if spec.torchvision_weights is None:
        raise PretrainedError(
            f"model.backbone.pretrained = {pretrained!r}: {spec.name} has no named weights (it is built from "
            f"parameters); give a path to a state dict file"
        )
    from torchvision.models import get_model_weights

    enum = get_model_weights(spec.torchvision_weights)
    names = [w.name for w in enum] + ["DEFAULT"]
    if pretrained not in names:
        raise PretrainedError(
            f"model.backbone.pretrained = {pretrained!r}: not a file and not named weights of {spec.name} "
            f"(named: {', '.join(names)})"
        )
    weights = enum[pretrained]
    state = fetch_named(spec.name, pretrained, lambda: weights.get_state_dict(progress=False, check_hash=True),
                        host=urlparse(weights.url).hostname, cached=_in_torch_hub_cache(weights.url))
    return state, f"torchvision weights {weights}"


def _in_torch_hub_cache(url: str) -> bool:
    import torch.hub

    return os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path)))


def build_classifier(cfg: BackboneConfig | DictConfig | Mapping | str | None = None, num_classes: int = 1000,
                     **overrides: Any) -> nn.Module:
    """The backbone's full classification network (stem, body and a ``num_classes`` head), as published.

    Used to compare complexity with published ImageNet numbers (``detkit backbones --imagenet``).
    """
    cfg = _as_config(cfg, overrides)
    if cfg.name.startswith(TIMM_PREFIX):
        import timm

        return timm.create_model(cfg.name[len(TIMM_PREFIX):], pretrained=False, num_classes=num_classes,
                                 **cfg.kwargs)
    if cfg.name.startswith(TV_PREFIX):
        from detkit.backbones.torchvision_any import build_network

        return build_network(cfg.name[len(TV_PREFIX):], num_classes, dict(cfg.kwargs))
    return _build_network(get_spec(cfg.name), cfg, num_classes)


def _build_network(spec: BackboneSpec, cfg: DictConfig, num_classes: int) -> nn.Module:
    if cfg.kwargs and spec.family in ("regnet", "efficientnet"):
        node = spec.name if spec.name in ("anynet", "regnet", "efficientnet") else spec.family
        raise ConfigError(f"model.backbone.kwargs: {spec.name} takes no extra arguments (got {dict(cfg.kwargs)}); "
                          f"use model.backbone.{node}.*")
    try:
        return spec.network(cfg, num_classes)
    except TypeError as e:  # an unknown keyword in model.backbone.kwargs
        raise ConfigError(f"model.backbone.kwargs = {dict(cfg.kwargs)}: {spec.name}: {e}") from None


def imagenet_resolution(cfg: BackboneConfig | DictConfig | Mapping | str | None = None, **overrides: Any) -> int:
    cfg = _as_config(cfg, overrides)
    if cfg.name.startswith(TIMM_PREFIX):
        from detkit.backbones.timm_backbone import timm_resolution

        return timm_resolution(cfg.name[len(TIMM_PREFIX):])
    if cfg.name.startswith(TV_PREFIX):
        return 299 if cfg.name == "tv:inception_v3" else 224
    return get_spec(cfg.name).resolution(cfg)
