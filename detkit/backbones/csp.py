"""CSP networks: plain 3x3 convolutions in cross-stage-partial stages, a family meant to run fast on a CPU.

Depthwise and grouped convolutions are cheap in multiply-adds but not in CPU time; dense 3x3 convolutions keep the
cores' matrix kernels busy. A network here is a stem (3x3 conv, stride 2) and stages, each:

- a 3x3 convolution of stride 2 to the stage's width ``w``;
- a 1x1 convolution to ``2 h`` channels (``h = w * split_ratio / 2``, rounded to a multiple of 8), split in two
  halves: one passes the stage untouched (the cross-stage partial), the other goes through ``d`` residual blocks of
  two 3x3 convolutions at width ``h``;
- a 1x1 convolution of the concatenated parts back to ``w``: the untouched half and the last block's output, or
  (``dense``) every block's output as well, which reuses the features of every depth.

Every convolution is conv-BatchNorm-SiLU. Parameters: per-stage ``depths`` and ``widths``, ``split_ratios`` (one per
stage), ``dense`` and ``stem_width``. ``model.backbone.name: cspnet`` takes them in ``model.backbone.kwargs``; named
presets (:data:`PRESETS`) are design points found by ``detkit design-space`` (docs/studies.md), registered with
their parameters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torchvision.ops.misc import Conv2dNormActivation

from detkit.backbones.family import BackboneFamily, BackboneSpec
from detkit.errors import ConfigError

KEY = "model.backbone.kwargs"
QUANTUM = 8


def conv(cin: int, cout: int, k: int, stride: int = 1) -> Conv2dNormActivation:
    return Conv2dNormActivation(cin, cout, k, stride=stride, activation_layer=nn.SiLU)


def hidden_width(width: int, ratio: float) -> int:
    """The split path's width ``h``: ``width * ratio / 2``, a multiple of 8, at least 8."""
    return max(QUANTUM, int(round(width * ratio / 2 / QUANTUM)) * QUANTUM)


class Block(nn.Module):
    """Two 3x3 conv-BN-SiLU with a residual connection."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = conv(width, width, 3), conv(width, width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.conv1(x))


class CSPStage(nn.Module):
    """Downsample, split, ``depth`` blocks on one half, concatenate, merge (see the module docstring)."""

    def __init__(self, cin: int, width: int, depth: int, ratio: float, dense: bool) -> None:
        super().__init__()
        h = hidden_width(width, ratio)
        self.down = conv(cin, width, 3, stride=2)
        self.split = conv(width, 2 * h, 1)
        self.blocks = nn.ModuleList(Block(h) for _ in range(depth))
        self.dense = dense
        self.merge = conv((2 + depth if dense else 2) * h, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip, y = self.split(self.down(x)).chunk(2, dim=1)
        parts = [skip, y]
        for block in self.blocks:
            y = block(y)
            if self.dense:
                parts.append(y)
        if not self.dense:
            parts[1] = y
        return self.merge(torch.cat(parts, dim=1))


@dataclass
class CSPDesign:
    """A CSP network's design parameters (see the module docstring)."""

    depths: list[int] = field(default_factory=lambda: [1, 2, 2, 1])
    widths: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    split_ratios: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])
    dense: bool = True
    stem_width: int = 16

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(cls, values: dict[str, Any], key: str = KEY) -> CSPDesign:
        """Checked design parameters: one line naming the key at fault."""
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"{key}: unknown CSP parameter {unknown[0]!r} (known: "
                              f"{', '.join(cls.__dataclass_fields__)})")
        d = cls(**values)
        lists = {"depths": d.depths, "widths": d.widths, "split_ratios": d.split_ratios}
        n = len(d.depths)
        if n == 0 or any(len(v) != n for v in lists.values()):
            sizes = ", ".join(f"{k}: {len(v)}" for k, v in lists.items())
            raise ConfigError(f"{key}: depths, widths and split_ratios need one value per stage (got {sizes})")
        for k, v in lists.items():
            if any(isinstance(x, bool) or not isinstance(x, (int, float)) or not x > 0 for x in v):
                raise ConfigError(f"{key}.{k} = {list(v)}: every value must be a number > 0")
        if any(int(v) != v for v in (*d.depths, *d.widths)):
            raise ConfigError(f"{key}: depths and widths must be whole numbers (got {list(d.depths)}, "
                              f"{list(d.widths)})")
        if not isinstance(d.stem_width, int) or d.stem_width < 1:
            raise ConfigError(f"{key}.stem_width = {d.stem_width!r}: must be a whole number >= 1")
        if not isinstance(d.dense, bool):
            raise ConfigError(f"{key}.dense = {d.dense!r}: must be true or false")
        return cls([int(v) for v in d.depths], [int(v) for v in d.widths], [float(v) for v in d.split_ratios],
                   d.dense, int(d.stem_width))


class CSPNet(nn.Module):
    """Stem and CSP stages (``stem``, ``stages.0`` ...), then a classifier (pool, linear) for ImageNet-style use."""

    def __init__(self, design: CSPDesign, num_classes: int = 1000) -> None:
        super().__init__()
        self.design = design
        self.stem = conv(3, design.stem_width, 3, stride=2)
        stages, cin = [], design.stem_width
        for d, w, r in zip(design.depths, design.widths, design.split_ratios):
            stages.append(CSPStage(cin, w, d, r, design.dense))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


def csp_complexity(design: CSPDesign, input_size: int = 224, num_classes: int = 1000) -> dict[str, int]:
    """Params, multiply-adds and activations (conv outputs, one image) of :class:`CSPNet` at ``input_size``, by
    formula: the same numbers as counting the built network (a test checks), fast enough to sample under a budget."""
    params = flops = acts = 0

    def conv_(c_in: int, c_out: int, k: int, res: int) -> None:
        nonlocal params, flops, acts
        params += c_in * c_out * k * k + 2 * c_out
        flops += res * res * c_in * c_out * k * k
        acts += res * res * c_out

    res = (input_size + 1) // 2
    conv_(3, design.stem_width, 3, res)
    c_in = design.stem_width
    for depth, w, r in zip(design.depths, design.widths, design.split_ratios):
        h = hidden_width(w, r)
        res = (res + 1) // 2
        conv_(c_in, w, 3, res)
        conv_(w, 2 * h, 1, res)
        for _ in range(2 * depth):
            conv_(h, h, 3, res)
        conv_((2 + depth if design.dense else 2) * h, w, 1, res)
        c_in = w
    params += c_in * num_classes + num_classes
    flops += c_in * num_classes
    return {"params": params, "flops": flops, "activations": acts}


def csp_plan(network: nn.Module) -> list[tuple[str, list[str]]]:
    """Levels: ``c1`` the stem (stride 2), ``c2``.. one stage each (strides 4, 8, ...)."""
    return [("c1", ["stem"])] + [(f"c{i + 2}", [f"stages.{i}"]) for i in range(len(network.stages))]


def build_cspnet(design: CSPDesign | dict[str, Any], num_classes: int = 1000) -> CSPNet:
    return CSPNet(design if isinstance(design, CSPDesign) else CSPDesign.of(design), num_classes)


def _network(base: dict[str, Any]):
    def build(cfg, num_classes: int) -> nn.Module:
        kwargs = dict(cfg.kwargs) if cfg.kwargs else {}
        return build_cspnet(CSPDesign.of({**base, **{k: _plain(v) for k, v in kwargs.items()}}), num_classes)
    return build


def _plain(value: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


# Named design points: {name: design parameters}. `cspnet` is the parametric member (model.backbone.kwargs).
PRESETS: dict[str, dict[str, Any]] = {}

FAMILY = BackboneFamily(
    name="cspnet",
    presets=(BackboneSpec(name="cspnet", network=_network({}), plan=csp_plan, head=("pool", "fc"), preset=False),
             *(BackboneSpec(name=name, network=_network(p), plan=csp_plan, head=("pool", "fc"))
               for name, p in PRESETS.items())),
    accepts=("taps", "kwargs"),
)
