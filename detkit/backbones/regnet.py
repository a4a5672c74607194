"""RegNet: every torchvision preset, and any point of the design space.

A RegNet is six numbers (Radosavovic et al., "Designing Network Design Spaces", 2020): depth ``d``, initial
width ``w0``, slope ``wa``, width multiplier ``wm``, group width ``g`` and bottleneck ratio ``b`` (plus the
SE ratio for RegNetY). Block ``j`` gets the linear width ``u_j = w0 + wa * j``, quantized in log space to
``w0 * wm ** round(log(u_j / w0) / log(wm))`` and then to a multiple of 8; consecutive blocks of equal
width form a stage. The network itself is torchvision's ``RegNet`` class fed with those stages, so a preset
rebuilt from its parameters is the torchvision preset, block for block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

from torch import nn
from torchvision.models.regnet import BlockParams, RegNet

from detkit.backbones.family import BackboneFamily, BackboneSpec
from detkit.errors import ConfigError

WIDTH_QUANTUM = 8
REGNET_HEAD = ("avgpool", "fc")


@dataclass(frozen=True)
class RegNetStages:
    depths: list[int]
    widths: list[int]
    group_widths: list[int]
    bottleneck_ratios: list[float]
    se_ratio: float

    @property
    def num_stages(self) -> int:
        return len(self.depths)


def quantized_linear_widths(depth: int, w0: float, wa: float, wm: float, q: int = WIDTH_QUANTUM) -> list[int]:
    """Per-block widths of the quantized linear rule (before group-width compatibility)."""
    if depth < 1 or w0 < q or wa < 0 or wm <= 1:
        raise ConfigError(
            f"model.backbone.regnet: invalid design point depth={depth}, w0={w0}, wa={wa}, wm={wm} "
            f"(need depth >= 1, w0 >= {q}, wa >= 0, wm > 1)"
        )
    widths = []
    for j in range(depth):
        u = w0 + wa * j
        s = round(math.log(u / w0) / math.log(wm))
        widths.append(int(round(w0 * wm**s / q) * q))
    return widths


def _make_divisible(value: float, divisor: int) -> int:
    """Round to a multiple of ``divisor`` (halves up), never more than 10% below ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def compatible_widths(widths: list[int], group_widths: list[int], ratios: list[float]) -> tuple[list[int], list[int]]:
    """Make each stage's bottleneck width a multiple of its group width (shrinking the group if wider).

    Same rule as torchvision's RegNet builders (``_make_divisible``), so presets match them exactly.
    """
    bottleneck = [int(w * b) for w, b in zip(widths, ratios)]
    groups = [min(g, wb) for g, wb in zip(group_widths, bottleneck)]
    bottleneck = [_make_divisible(wb, g) for wb, g in zip(bottleneck, groups)]
    return [int(wb / b) for wb, b in zip(bottleneck, ratios)], groups


def regnet_stages(depth: int, w0: float, wa: float, wm: float, group_width: int, bottleneck_ratio: float = 1.0,
                  se_ratio: float = 0.0) -> RegNetStages:
    """Stages (depths, widths, groups) of the RegNet design point ``(d, w0, wa, wm, g, b)``."""
    if group_width < 1 or bottleneck_ratio <= 0 or se_ratio < 0:
        raise ConfigError(f"model.backbone.regnet: invalid group_width={group_width}, bottleneck_ratio="
                          f"{bottleneck_ratio}, se_ratio={se_ratio} (need g >= 1, b > 0, se >= 0)")
    block_widths = quantized_linear_widths(depth, w0, wa, wm)
    depths: list[int] = []
    widths: list[int] = []
    for w in block_widths:
        if widths and widths[-1] == w:
            depths[-1] += 1
        else:
            widths.append(w)
            depths.append(1)
    ratios = [float(bottleneck_ratio)] * len(widths)
    widths, groups = compatible_widths(widths, [int(group_width)] * len(widths), ratios)
    return RegNetStages(depths, widths, groups, ratios, float(se_ratio))


def build_regnet(stages: RegNetStages, num_classes: int = 1000, stem_width: int = 32) -> nn.Module:
    params = BlockParams(
        depths=stages.depths,
        widths=stages.widths,
        group_widths=stages.group_widths,
        bottleneck_multipliers=stages.bottleneck_ratios,
        strides=[2] * stages.num_stages,
        se_ratio=stages.se_ratio or None,
    )
    return RegNet(params, num_classes=num_classes, stem_width=stem_width,
                  norm_layer=partial(nn.BatchNorm2d, eps=1e-05, momentum=0.1))


def regnet_plan(network: nn.Module) -> list[tuple[str, list[str]]]:
    blocks = [name for name, _ in network.trunk_output.named_children()]
    return [("c1", ["stem"])] + [(f"c{i + 2}", [f"trunk_output.{b}"]) for i, b in enumerate(blocks)]


# The published design points of torchvision's presets: (depth, w0, wa, wm, group width, se ratio).
PRESETS: dict[str, tuple[int, int, float, float, int, float]] = {
    "regnet_x_400mf": (22, 24, 24.48, 2.54, 16, 0.0),
    "regnet_x_800mf": (16, 56, 35.73, 2.28, 16, 0.0),
    "regnet_x_1_6gf": (18, 80, 34.01, 2.25, 24, 0.0),
    "regnet_x_3_2gf": (25, 88, 26.31, 2.25, 48, 0.0),
    "regnet_x_8gf": (23, 80, 49.56, 2.88, 120, 0.0),
    "regnet_x_16gf": (22, 216, 55.59, 2.1, 128, 0.0),
    "regnet_x_32gf": (23, 320, 69.86, 2.0, 168, 0.0),
    "regnet_y_400mf": (16, 48, 27.89, 2.09, 8, 0.25),
    "regnet_y_800mf": (14, 56, 38.84, 2.4, 16, 0.25),
    "regnet_y_1_6gf": (27, 48, 20.71, 2.65, 24, 0.25),
    "regnet_y_3_2gf": (21, 80, 42.63, 2.66, 24, 0.25),
    "regnet_y_8gf": (17, 192, 76.82, 2.19, 56, 0.25),
    "regnet_y_16gf": (18, 200, 106.23, 2.48, 112, 0.25),
    "regnet_y_32gf": (20, 232, 115.89, 2.53, 232, 0.25),
    "regnet_y_128gf": (27, 456, 160.83, 2.52, 264, 0.25),
}


def preset_stages(name: str) -> RegNetStages:
    d, w0, wa, wm, g, se = PRESETS[name]
    return regnet_stages(d, w0, wa, wm, g, 1.0, se)


def _preset_network(name: str):
    return lambda cfg, num_classes: build_regnet(preset_stages(name), num_classes)


def _design_point_network(cfg, num_classes: int) -> nn.Module:
    p = cfg.regnet
    return build_regnet(regnet_stages(p.depth, p.w0, p.wa, p.wm, p.group_width, p.bottleneck_ratio, p.se_ratio),
                        num_classes)


def anynet_stages(depths, widths, group_widths, bottleneck_ratios, se_ratio: float = 0.0) -> RegNetStages:
    """Explicit stages (``model.backbone.anynet``), checked: one value per stage, all positive, and each stage's
    inner width ``width * bottleneck_ratio`` a whole multiple of its group width."""
    key = "model.backbone.anynet"
    lists = {"depths": list(depths), "widths": list(widths), "group_widths": list(group_widths),
             "bottleneck_ratios": list(bottleneck_ratios)}
    n = len(lists["depths"])
    if n == 0 or any(len(v) != n for v in lists.values()):
        sizes = ", ".join(f"{k}: {len(v)}" for k, v in lists.items())
        raise ConfigError(f"{key}: depths, widths, group_widths and bottleneck_ratios need one value per stage "
                          f"(got {sizes})")
    for k, values in lists.items():
        if any(not v > 0 for v in values):
            raise ConfigError(f"{key}.{k} = {values}: every value must be > 0")
    if se_ratio < 0:
        raise ConfigError(f"{key}.se_ratio = {se_ratio}: must be >= 0")
    for i, (w, g, b) in enumerate(zip(lists["widths"], lists["group_widths"], lists["bottleneck_ratios"])):
        inner = w * b
        if inner != int(inner) or int(inner) % int(g):
            raise ConfigError(f"{key}: stage {i + 1}: inner width {w} * {b} = {inner:g} is not a multiple of its "
                              f"group width {g}")
    return RegNetStages([int(v) for v in lists["depths"]], [int(v) for v in lists["widths"]],
                        [int(v) for v in lists["group_widths"]], [float(v) for v in lists["bottleneck_ratios"]],
                        float(se_ratio))


def _anynet_network(cfg, num_classes: int) -> nn.Module:
    p = cfg.anynet
    return build_regnet(anynet_stages(p.depths, p.widths, p.group_widths, p.bottleneck_ratios, p.se_ratio),
                        num_classes)


# Both families take no kwargs: their parameters live in model.backbone.regnet / model.backbone.anynet.
FAMILY = BackboneFamily(
    name="regnet",
    presets=(*(BackboneSpec(name=name, network=_preset_network(name), plan=regnet_plan, head=REGNET_HEAD,
                            torchvision_weights=name) for name in PRESETS),
             BackboneSpec(name="regnet", network=_design_point_network, plan=regnet_plan, head=REGNET_HEAD,
                          preset=False)),
    accepts=("taps",),
    refusals={"kwargs": "model.backbone.kwargs: {name} takes no extra arguments (got {value}); "
                        "use model.backbone.regnet.*"},
)
ANYNET = BackboneFamily(
    name="anynet",
    presets=(BackboneSpec(name="anynet", network=_anynet_network, plan=regnet_plan, head=REGNET_HEAD, preset=False),),
    accepts=("taps",),
    refusals={"kwargs": "model.backbone.kwargs: {name} takes no extra arguments (got {value}); "
                        "use model.backbone.anynet.*"},
)
