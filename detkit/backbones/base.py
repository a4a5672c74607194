"""The backbone contract and the one class that keeps it for every torchvision-built network.

A backbone maps ``x[B, 3, H, W]`` to an ordered dict of feature maps keyed by level (``"c1".."c5"``; ``c_k``
has stride ``2**k``), and declares ``out_channels`` and ``strides`` (dicts keyed the same way) when it is
built. :class:`Backbone` wraps a classification network *unchanged* (so its state dict keeps the library's
own key names and pretrained files load as they are) together with a *level plan*: which of the network's
submodules, run in order, produce each level. The classifier head and every level above the highest one
asked for are dropped.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from detkit.errors import ConfigError

LevelPlan = list[tuple[str, list[str]]]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMS = ("bn", "frozen_bn", "sync_bn")


def level_name(stride: int) -> str:
    k = int(round(math.log2(stride)))
    if 2**k != stride:
        raise ValueError(f"feature stride {stride} is not a power of two")
    return f"c{k}"


def _probe(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(x)


def _probe_input(network: nn.Module, size: int = 64) -> torch.Tensor:
    p = next(network.parameters())
    return torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype)


def split_by_stride(network: nn.Module, sequential: str, size: int = 64) -> LevelPlan:
    """Level plan for a network whose body is one ``nn.Sequential`` (EfficientNet, MobileNet, ...).

    Children are run on a probe image; consecutive children at the same output stride form one level,
    which ends at the last child of that stride (so trailing 1x1 convs belong to the top level).
    """
    seq = network.get_submodule(sequential)
    was_training = network.training
    network.eval()
    x = _probe_input(network, size)
    plan: LevelPlan = []
    for child_name, child in seq.named_children():
        x = _probe(child, x)
        level = level_name(size // x.shape[-1])
        if plan and plan[-1][0] == level:
            plan[-1][1].append(f"{sequential}.{child_name}")
        else:
            plan.append((level, [f"{sequential}.{child_name}"]))
    network.train(was_training)
    return plan


def apply_taps(network: nn.Module, plan: LevelPlan, taps: Mapping[str, str], name: str = "",
               size: int = 64) -> LevelPlan:
    """The plan with level ``c_k`` ending at submodule ``taps[c_k]`` instead of at its last module
    (``model.backbone.taps``, e.g. ``{c4: features.13.block.0}``: torchvision's SSDlite takes C4 at the expansion
    conv inside the first stride-32 block). A tap inside a module of the plan splits that module into its
    children, which is checked on a probe image to give the module's own output (no residual or other glue); the
    tapped map must keep the level's stride. Every module up to the tap then belongs to ``c_k`` or below, every
    one after it to the levels above."""
    if not taps:
        return plan
    levels = [level for level, _ in plan]
    flat = [(module, level) for level, names in plan for module in names]  # execution order
    for level, tap in taps.items():
        where = f"model.backbone.taps.{level} = {tap!r}"
        tagged = re.fullmatch(r"(c\d+)_\w+", level)
        if tagged:  # a second map at the stride of an existing level (torchvision's MobileNet FPN: c5_mid)
            base = tagged.group(1)
            if base not in levels:
                raise ConfigError(f"{where}: {name} has no level {base!r} to tap inside (it has {', '.join(levels)})")
            flat = _split_at(network, flat, str(tap), where, size)
            at = next(i for i, (module, _) in enumerate(flat) if module == tap)
            if flat[at][1] != base:
                raise ConfigError(f"{where}: the submodule is in level {flat[at][1]}, not inside {base}")
            flat = [(m, level if i <= at and lv == base else lv) for i, (m, lv) in enumerate(flat)]
            levels.insert(levels.index(base), level)
            continue
        if level not in levels:
            raise ConfigError(f"{where}: {name} has no level {level!r} (it has {', '.join(levels)}; a second map at "
                              f"a level's stride is named like c5_mid)")
        if levels.index(level) == len(levels) - 1:
            raise ConfigError(f"{where}: {level} is the top level of {name}; a tap ends a level below the top")
        flat = _split_at(network, flat, str(tap), where, size)
        at = next(i for i, (module, _) in enumerate(flat) if module == tap)
        k, above = levels.index(level), levels[levels.index(level) + 1]
        flat = [(m, level if i <= at and levels.index(lv) > k else above if i > at and levels.index(lv) <= k else lv)
                for i, (m, lv) in enumerate(flat)]
    new: LevelPlan = []
    for module, level in flat:
        if new and new[-1][0] == level:
            new[-1][1].append(module)
        else:
            new.append((level, [module]))
    if [level for level, _ in new] != levels:
        raise ConfigError(f"model.backbone.taps = {dict(taps)}: leaves a level of {name} without modules (levels "
                          f"{', '.join(levels)}); taps must keep every level")
    _check_tap_strides(network, new, taps, size)
    return new


def _split_at(network: nn.Module, flat: list[tuple[str, str]], tap: str, where: str, size: int
              ) -> list[tuple[str, str]]:
    """``flat`` with the plan module containing ``tap`` replaced by its children, recursively down to ``tap``."""
    modules = dict(network.named_modules())
    if tap not in modules:
        near = [n for n in modules if n and (n.startswith(tap.rsplit(".", 1)[0] + ".") or tap.startswith(n + "."))]
        raise ConfigError(f"{where}: no such submodule (e.g. {', '.join(near[:6]) or 'none near it'})")
    while not any(module == tap for module, _ in flat):
        i = next((i for i, (module, _) in enumerate(flat) if tap.startswith(module + ".")), None)
        if i is None:
            raise ConfigError(f"{where}: the submodule is not on the backbone's path (a dropped head?)")
        parent, level = flat[i]
        children = [f"{parent}.{c}" for c, _ in modules[parent].named_children()]
        p = next(network.parameters())  # a random image: zeros can hide a residual (x + f(x) == f(x) at x = 0)
        x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(p)
        was_training = network.training
        network.eval()
        with torch.no_grad():
            for module, _ in flat[:i]:
                x = modules[module](x)
            whole, y = modules[parent](x), x
            for child in children:
                y = modules[child](y)
        network.train(was_training)
        # relative: an untrained network's activations can be tiny (1e-7) in eval mode
        if not children or y.shape != whole.shape or (y - whole).abs().max() > 1e-4 * whole.abs().max():
            raise ConfigError(f"{where}: {parent} is not its children run in order (a residual or other glue), so "
                              f"it cannot be cut inside")
        flat = flat[:i] + [(child, level) for child in children] + flat[i + 1:]
    return flat


def _check_tap_strides(network: nn.Module, plan: LevelPlan, taps: Mapping[str, str], size: int) -> None:
    x = _probe_input(network, size)
    was_training = network.training
    network.eval()
    with torch.no_grad():
        for level, names in plan:
            for module in names:
                x = network.get_submodule(module)(x)
            base = level.split("_")[0]  # c5_mid: a map at c5's stride
            if level in taps and level_name(size // x.shape[-1]) != base:
                network.train(was_training)
                raise ConfigError(f"model.backbone.taps.{level} = {taps[level]!r}: that map has stride "
                                  f"{size // x.shape[-1]}, not {2 ** int(base[1:])} as {level} must")
    network.train(was_training)


def _convert_norm(network: nn.Module, norm: str) -> nn.Module:
    if norm == "bn":
        return network
    # timm's converters handle torchvision's BatchNorm2d and timm's BatchNormAct2d (which must keep its act).
    from timm.layers import convert_sync_batchnorm, freeze_batch_norm_2d

    if norm == "frozen_bn":
        return freeze_batch_norm_2d(network)
    if norm == "sync_bn":
        return convert_sync_batchnorm(network)
    raise ConfigError(f"model.backbone.norm = {norm!r}: expected one of {', '.join(NORMS)}")


class FrozenStagesModule(nn.Module):
    """Base of every backbone class: ``train()`` keeps the modules of frozen stages (``self._frozen``) in eval
    mode, so their norm layers keep their running statistics."""

    _frozen: list[nn.Module]

    def train(self, mode: bool = True):
        super().train(mode)
        for module in getattr(self, "_frozen", []):
            module.eval()
        return self


class Backbone(FrozenStagesModule):
    """A network split into levels. See the module docstring for the contract.

    Args:
        network: the classification network (its submodule names are kept).
        plan: ``[(level, [submodule names run in order]), ...]`` from the input up.
        out_levels: the levels returned by ``forward``.
        head: submodule names of the classifier (dropped).
        frozen_stages: how many levels, from the first (``c1``, the stem), get no gradient and keep their
            norm layers in eval mode. 0 = none; ``len(plan)`` = all.
        norm: ``bn`` | ``frozen_bn`` (BatchNorm as a fixed affine map) | ``sync_bn`` (for DDP).
        mean, std: the input normalisation the network's weights expect (RGB in [0, 1]).
        taps: ``{level: submodule}``: end a level at that submodule (:func:`apply_taps`).
    """

    def __init__(
        self,
        network: nn.Module,
        plan: LevelPlan,
        out_levels: Sequence[str] = ("c2", "c3", "c4", "c5"),
        head: Iterable[str] = (),
        *,
        name: str = "",
        frozen_stages: int = 0,
        norm: str = "bn",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        recommended_resolution: int = 224,
        taps: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        plan = apply_taps(network, plan, taps or {}, name)
        self.levels = [level for level, _ in plan]
        out_levels = list(out_levels)
        check_levels(name, out_levels, self.levels)
        check_frozen_stages(name, frozen_stages, self.levels)
        top = max(self.levels.index(level) for level in out_levels)
        dropped = [n for _, names in plan[top + 1:] for n in names] + list(head)
        for module_name in dropped:
            network.set_submodule(module_name, nn.Identity())
        self.dropped = dropped
        self.plan: LevelPlan = [(level, list(names)) for level, names in plan[: top + 1]]
        self.out_levels = sorted(out_levels, key=self.levels.index)
        self.network = _convert_norm(network, norm)
        self.mean, self.std = tuple(mean), tuple(std)
        self.recommended_resolution = recommended_resolution
        self.frozen_stages = frozen_stages
        self._frozen: list[nn.Module] = []
        for _, names in self.plan[:frozen_stages]:
            for module_name in names:
                module = self.network.get_submodule(module_name)
                module.requires_grad_(False)
                self._frozen.append(module)
        self.out_channels, self.strides = self._probe_shapes()
        self.train()

    def _probe_shapes(self, size: int = 64) -> tuple[dict[str, int], dict[str, int]]:
        was_training = self.training
        self.eval()
        feats = _probe(self, _probe_input(self.network, size))
        self.train(was_training)
        channels = {k: int(v.shape[1]) for k, v in feats.items()}
        strides = {k: size // int(v.shape[-1]) for k, v in feats.items()}
        return channels, strides

    def _stage_modules(self, names: list[str]) -> list[nn.Module]:
        return [self.network.get_submodule(n) for n in names]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats: OrderedDict[str, torch.Tensor] = OrderedDict()
        for level, names in self.plan:
            for module in self._stage_modules(names):
                x = module(x)
            if level in self.out_levels:
                feats[level] = x
        return feats

    def extra_repr(self) -> str:
        return f"name={self.name!r}, out_levels={self.out_levels}, frozen_stages={self.frozen_stages}"


def check_frozen_stages(name: str, frozen_stages: int, levels: Sequence[str]) -> None:
    if not 0 <= frozen_stages <= len(levels):
        raise ConfigError(
            f"model.backbone.frozen_stages = {frozen_stages}: {name} has {len(levels)} stages "
            f"({', '.join(levels)}); expected 0..{len(levels)}"
        )


def check_levels(name: str, out_levels: Sequence[str], available: Sequence[str]) -> None:
    if not out_levels:
        raise ConfigError("model.backbone.out_levels is empty: name at least one level, e.g. [c3, c4, c5]")
    for level in out_levels:
        if level not in available:
            raise ConfigError(
                f"model.backbone.out_levels: {level!r} is not a level of {name} (it has {', '.join(available)})"
            )
