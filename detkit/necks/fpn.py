"""FPN and PAN necks over any backbone's levels.

The FPN is torchvision's ``FeaturePyramidNetwork`` (lateral 1x1 + top-down + 3x3 output convs) over the
backbone levels ``c_k`` whose ``p_k`` is asked for; levels above the backbone's top (``p6``, ``p7``) come
from :class:`ExtraLevels`, a stride-2 3x3 conv (RetinaNet style, ReLU between) or a stride-2 max-pool
(Faster R-CNN style), fed by the top FPN output or the top backbone map. PAN (Liu et al., 2018) adds a
bottom-up path after the FPN: ``n_lowest = p_lowest``, ``n_{k+1} = conv3x3(p_{k+1} + conv3x3_s2(n_k))``.

A neck maps the backbone's ``{"c_k": tensor}`` to ``{"p_k": tensor}`` with one channel count, and declares
``out_channels`` (an int) and ``strides`` (``{"p_k": 2**k}``) when built. ``norm="bn"`` puts BatchNorm after the
FPN's convs (torchvision's ``*_v2`` detectors).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

from detkit.errors import ConfigError

# model.neck.norm: the FPN's lateral and output convs without (torchvision's default) or with BatchNorm
# (torchvision's v2 detectors)
NORMS = {"none": None, "bn": nn.BatchNorm2d}


def _index(level: str, prefix: str) -> int:
    """``p5`` -> 5; a tapped level's tag is allowed (``p5_mid``: a second map at stride 32, model.backbone.taps)."""
    m = re.fullmatch(rf"{prefix}(\d+)(_\w+)?", level)
    if m is None:
        raise ConfigError(f"model.neck.levels: bad level {level!r} (expected names like {prefix}3, {prefix}4, ...)")
    return int(m.group(1))


class ExtraLevels(ExtraFPNBlock):
    """``n`` extra pyramid levels above the top, each at half the resolution of the one below.

    ``source="fpn"`` feeds the first extra level with the top FPN output, ``"backbone"`` with the top backbone
    map (RetinaNet's P6 from C5). ``op="conv"``: 3x3 stride-2 convs with a ReLU before each but the first;
    ``op="maxpool"``: 1x1 stride-2 max-pooling (no parameters).
    """

    def __init__(self, n: int, in_channels: int, out_channels: int, names: Sequence[str], op: str = "conv",
                 source: str = "fpn") -> None:
        super().__init__()
        self.op, self.source, self.names = op, source, list(names)
        if op == "conv":
            first_in = in_channels if source == "backbone" else out_channels
            self.convs = nn.ModuleList(
                nn.Conv2d(first_in if i == 0 else out_channels, out_channels, 3, stride=2, padding=1) for i in range(n)
            )
            for conv in self.convs:
                nn.init.kaiming_uniform_(conv.weight, a=1)
                nn.init.zeros_(conv.bias)
        elif op == "maxpool":
            if source == "backbone" and in_channels != out_channels:
                raise ConfigError(
                    f"model.neck.extra_op = maxpool with extra_from = backbone needs the top backbone level to "
                    f"have {out_channels} channels (it has {in_channels}); use extra_from=fpn or extra_op=conv"
                )
            self.n = n
        else:
            raise ConfigError(f"model.neck.extra_op = {op!r}: expected conv or maxpool")

    def forward(self, results: list[torch.Tensor], x: list[torch.Tensor], names: list[str]):
        y = x[-1] if self.source == "backbone" else results[-1]
        count = len(self.convs) if self.op == "conv" else self.n
        for i in range(count):
            if self.op == "conv":
                y = self.convs[i](y if i == 0 else F.relu(y))
            else:
                y = F.max_pool2d(y, kernel_size=1, stride=2)
            results.append(y)
        return results, names + self.names


class FPN(nn.Module):
    """Feature pyramid over ``in_channels`` (``{"c_k": channels}``) producing ``levels`` (``["p3", ...]``)."""

    def __init__(
        self,
        in_channels: Mapping[str, int],
        in_strides: Mapping[str, int] | None = None,
        out_channels: int = 256,
        levels: Sequence[str] = ("p3", "p4", "p5", "p6", "p7"),
        extra_from: str = "fpn",
        extra_op: str = "conv",
        norm: str = "none",
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ConfigError(f"model.neck.norm = {norm!r}: expected one of {', '.join(NORMS)}")
        if not levels:
            raise ConfigError("model.neck.levels is empty: name the pyramid levels, e.g. [p3, p4, p5, p6, p7]")
        ks = sorted({_index(level, "p") for level in levels})
        if ks != list(range(ks[0], ks[-1] + 1)):
            raise ConfigError(f"model.neck.levels = {list(levels)}: levels must be consecutive, e.g. p3..p7")
        top_c = max(_index(level, "c") for level in in_channels)
        have = ", ".join(in_channels)
        for level in levels:  # every level up to the backbone's top comes from a backbone level of the same name
            if _index(level, "p") <= top_c and f"c{level[1:]}" not in in_channels:
                raise ConfigError(f"model.neck.levels: {level} needs backbone level c{level[1:]} (backbone "
                                  f"out_levels: {have})")
        wanted = {f"c{level[1:]}" for level in levels}
        self.in_levels = [c for c in in_channels if c in wanted]  # the backbone's order (a tapped c5_mid before c5)
        if not self.in_levels:
            raise ConfigError(
                f"model.neck.levels = {list(levels)}: the lowest level must come from the backbone "
                f"(its top level is c{top_c})"
            )
        extra = [f"p{k}" for k in ks if k > top_c]
        self.levels = [f"p{c[1:]}" for c in self.in_levels] + extra
        self.out_channels = int(out_channels)
        self.strides = {f"p{c[1:]}": int(in_strides[c]) if in_strides else 2 ** _index(c, "c")
                        for c in self.in_levels}
        self.strides.update({level: 2 ** _index(level, "p") for level in extra})
        extra_block = (
            ExtraLevels(len(extra), in_channels[self.in_levels[-1]], out_channels, extra, extra_op, extra_from)
            if extra else None
        )
        self.fpn = FeaturePyramidNetwork([in_channels[c] for c in self.in_levels], out_channels, extra_block,
                                         norm_layer=NORMS[norm])

    def forward(self, feats: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        x = OrderedDict((f"p{c[1:]}", feats[c]) for c in self.in_levels)
        return self.fpn(x)


class PAN(FPN):
    """FPN followed by PANet's bottom-up path augmentation."""

    def __init__(self, in_channels: Mapping[str, int], in_strides: Mapping[str, int] | None = None,
                 out_channels: int = 256, levels: Sequence[str] = ("p3", "p4", "p5", "p6", "p7"),
                 extra_from: str = "fpn", extra_op: str = "conv", norm: str = "none") -> None:
        super().__init__(in_channels, in_strides, out_channels, levels, extra_from, extra_op, norm)
        n = len(self.levels) - 1
        self.down = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1) for _ in range(n))
        self.fuse = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in range(n))

    def forward(self, feats: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        p = super().forward(feats)
        names = list(p)
        out = OrderedDict([(names[0], p[names[0]])])
        prev = p[names[0]]
        for i, name in enumerate(names[1:]):
            down = F.relu(self.down[i](prev))
            if down.shape[-2:] != p[name].shape[-2:]:
                down = F.interpolate(down, size=p[name].shape[-2:], mode="nearest")
            prev = F.relu(self.fuse[i](down + p[name]))
            out[name] = prev
        return out
