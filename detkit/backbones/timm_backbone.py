"""``timm:<model>``: any timm model that supports ``features_only``, under the same contract.

timm reports each feature's reduction (stride) and channels; detkit names them ``c_k`` with ``2**k`` the
stride. The input normalisation is the model's own (``pretrained_cfg`` mean/std).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from detkit.backbones.base import FrozenStagesModule, _convert_norm, check_frozen_stages, check_levels, level_name
from detkit.backbones.family import BackboneFamily
from detkit.backbones.pretrained import (
    fetch_named,
    host_reachable,
    load_into,
    looks_like_path,
    read_state_dict,
)
from detkit.errors import ConfigError

PREFIX = "timm:"
HF_HOST = "huggingface.co"


def _create(model_name: str, **kwargs):
    import timm

    try:
        return timm.create_model(model_name, **kwargs)
    except RuntimeError as e:  # timm's "Unknown model" and "features_only not implemented"
        raise ConfigError(f"model.backbone.name = 'timm:{model_name}': {str(e).splitlines()[0]}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.backbone 'timm:{model_name}': {type(e).__name__}: {str(e).splitlines()[0]}") from None


def _create_pretrained(model_name: str, **kwargs):
    """timm's own download (Hugging Face hub). Offline, use only the local cache instead of retrying for a minute."""
    from unittest import mock

    import huggingface_hub.constants as hf

    if host_reachable(HF_HOST):
        return _create(model_name, pretrained=True, **kwargs)
    with mock.patch.object(hf, "HF_HUB_OFFLINE", True):
        try:
            return _create(model_name, pretrained=True, **kwargs)
        except Exception as e:
            raise ConnectionError(f"{HF_HOST} is not reachable and the weights are not in the local cache "
                                  f"({type(e).__name__})") from None


def _feature_levels(model_name: str, kwargs: dict) -> list[str]:
    with torch.device("meta"):
        probe = _create(model_name, features_only=True, pretrained=False, **kwargs)
    strides = probe.feature_info.reduction()
    levels = [level_name(s) for s in strides]
    if len(set(levels)) != len(levels):
        raise ConfigError(
            f"model.backbone.name = 'timm:{model_name}': its features have strides {strides}; detkit needs "
            f"one feature map per stride (a CNN-like pyramid)"
        )
    return levels


def timm_resolution(model_name: str) -> int:
    import timm

    cfg = timm.models.get_pretrained_cfg(model_name.split(".")[0]) if "." not in model_name else None
    size = getattr(cfg, "input_size", None) if cfg is not None else None
    return int(size[-1]) if size else 224


class TimmBackbone(FrozenStagesModule):
    """A timm ``features_only`` network keyed by level."""

    def __init__(self, model_name: str, out_levels, *, frozen_stages: int = 0, norm: str = "bn",
                 pretrained: str | None = None, kwargs: dict | None = None) -> None:
        super().__init__()
        kwargs = dict(kwargs or {})
        self.name = PREFIX + model_name
        self.levels = _feature_levels(model_name, kwargs)
        out_levels = list(out_levels)
        check_levels(self.name, out_levels, self.levels)
        check_frozen_stages(self.name, frozen_stages, self.levels)
        self.out_levels = sorted(out_levels, key=self.levels.index)
        indices = [self.levels.index(level) for level in self.out_levels]
        named_tag = pretrained if pretrained and not looks_like_path(pretrained) else None
        create = dict(features_only=True, out_indices=indices, **kwargs)
        if named_tag is not None:
            tag = "" if named_tag in ("default", "imagenet", "true", "True") else f".{named_tag}"
            self.network = fetch_named(self.name, named_tag, lambda: _create_pretrained(model_name + tag, **create))
        else:
            self.network = _create(model_name, pretrained=False, **create)
        if pretrained and named_tag is None:
            load_into(self.network, read_state_dict(pretrained), source=pretrained, name=self.name)
        self.network = _convert_norm(self.network, norm)
        info = self.network.feature_info
        self.out_channels = {lvl: int(c) for lvl, c in zip(self.out_levels, info.channels())}
        self.strides = {lvl: int(s) for lvl, s in zip(self.out_levels, info.reduction())}
        pcfg = getattr(self.network, "pretrained_cfg", None) or {}
        self.mean = tuple(pcfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(pcfg.get("std", (0.229, 0.224, 0.225)))
        self.recommended_resolution = int(pcfg.get("input_size", (3, 224, 224))[-1])
        self.frozen_stages = frozen_stages
        self._frozen = self._freeze(frozen_stages)

    def _freeze(self, n: int) -> list[nn.Module]:
        """Freeze every top-level module up to the one that produces the n-th level (c1 = 1)."""
        if n == 0:
            return []
        info = self.network.feature_info  # FeatureInfo keeps every level; index n-1 is the n-th
        module = str(info.module_name(n - 1))
        children = list(self.network.named_children())
        names = [name for name, _ in children]
        top = module.split(".")[0]
        target = module.replace(".", "_") if module.replace(".", "_") in names else top  # flattened or nested
        if target in names:
            children = children[: names.index(target) + 1]
            if target == top and module != top:  # freeze the nested stages up to `module`, not the whole `top`
                parent = self.network.get_submodule(top)
                index = int(module.split(".")[1])
                partial = [m for i, (_, m) in enumerate(parent.named_children()) if i <= index]
                children = children[:-1] + [(f"{top}.{i}", m) for i, m in enumerate(partial)]
        elif n - 1 <= max(self.levels.index(lvl) for lvl in self.out_levels):
            raise ConfigError(f"model.backbone.frozen_stages = {n}: cannot find module {target!r} in {self.name}")
        for _, child in children:
            child.requires_grad_(False)
        return [child for _, child in children]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict(zip(self.out_levels, self.network(x)))



def build_timm_backbone(cfg) -> TimmBackbone:
    model_name = cfg.name[len(PREFIX):]
    if not model_name:
        raise ConfigError("model.backbone.name = 'timm:': name a timm model, e.g. timm:tf_efficientnet_lite0")
    kwargs = dict(cfg.kwargs)
    if cfg.drop_path is not None:
        kwargs.setdefault("drop_path_rate", float(cfg.drop_path))
    return TimmBackbone(model_name, cfg.out_levels, frozen_stages=cfg.frozen_stages, norm=cfg.norm,
                        pretrained=cfg.pretrained, kwargs=kwargs)


def build_timm_classifier(cfg, num_classes: int = 1000) -> nn.Module:
    """timm's whole classification network (for complexity)."""
    return _create(cfg.name[len(PREFIX):], pretrained=False, num_classes=num_classes, **cfg.kwargs)


# Any timm model: kwargs are timm.create_model's, drop_path its drop_path_rate; no taps (timm chooses the features).
FAMILY = BackboneFamily(
    name="timm",
    prefix=PREFIX,
    build=build_timm_backbone,
    classifier=build_timm_classifier,
    resolution=lambda cfg: timm_resolution(cfg.name[len(PREFIX):]),
    accepts=("drop_path", "kwargs"),
)
