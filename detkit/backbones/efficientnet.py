"""EfficientNet: B0-B7 as torchvision defines them, and compound scaling for any ``phi``.

Compound scaling (Tan & Le, 2019) grows depth by ``alpha**phi``, width by ``beta**phi`` and input resolution
by ``gamma**phi`` (alpha=1.2, beta=1.1, gamma=1.15, so that alpha * beta**2 * gamma**2 ~ 2 and each +1 of
phi about doubles the FLOPs). The named B1-B7 use the paper's hand-rounded multipliers instead. Both build
torchvision's ``EfficientNet`` from the B0 stage table below, scaled by ``MBConvConfig``.
"""

from __future__ import annotations

from functools import partial

from torch import nn
from torchvision.models.efficientnet import EfficientNet, MBConvConfig

from detkit.backbones.base import split_by_stride
from detkit.backbones.family import BackboneFamily, BackboneSpec

# B0's stages: expand ratio, kernel, stride, input channels, output channels, layers.
B0_STAGES = [
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
]

# Named models: width multiplier, depth multiplier, resolution, dropout (as torchvision defines them).
NAMED = {
    "efficientnet_b0": (1.0, 1.0, 224, 0.2),
    "efficientnet_b1": (1.0, 1.1, 240, 0.2),
    "efficientnet_b2": (1.1, 1.2, 260, 0.3),
    "efficientnet_b3": (1.2, 1.4, 300, 0.3),
    "efficientnet_b4": (1.4, 1.8, 380, 0.4),
    "efficientnet_b5": (1.6, 2.2, 456, 0.4),
    "efficientnet_b6": (1.8, 2.6, 528, 0.5),
    "efficientnet_b7": (2.0, 3.1, 600, 0.5),
}
# torchvision ported B5-B7 from TensorFlow with TF's BatchNorm settings.
TF_NORM = {"efficientnet_b5", "efficientnet_b6", "efficientnet_b7"}


def compound_scaling(phi: float, alpha: float = 1.2, beta: float = 1.1, gamma: float = 1.15,
                     base_resolution: int = 224) -> tuple[float, float, int]:
    """Width and depth multipliers and the input resolution (a multiple of 32) for ``phi``."""
    width, depth = beta**phi, alpha**phi
    resolution = int(round(base_resolution * gamma**phi / 32) * 32)
    return width, depth, resolution


def build_efficientnet(width_mult: float, depth_mult: float, num_classes: int = 1000, dropout: float = 0.2,
                       tf_norm: bool = False, drop_path: float | None = None) -> nn.Module:
    stages = [MBConvConfig(*row, width_mult=width_mult, depth_mult=depth_mult) for row in B0_STAGES]
    norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01) if tf_norm else None
    return EfficientNet(stages, dropout=dropout, num_classes=num_classes, norm_layer=norm,
                        stochastic_depth_prob=0.2 if drop_path is None else float(drop_path))


def _named(name: str):
    width, depth, _, dropout = NAMED[name]
    return lambda cfg, num_classes: build_efficientnet(width, depth, num_classes, dropout, name in TF_NORM,
                                                       cfg.drop_path)


def _phi_network(cfg, num_classes: int) -> nn.Module:
    p = cfg.efficientnet
    width, depth, _ = compound_scaling(p.phi, p.alpha, p.beta, p.gamma)
    return build_efficientnet(width, depth, num_classes, drop_path=cfg.drop_path)


def _phi_resolution(cfg) -> int:
    p = cfg.efficientnet
    return compound_scaling(p.phi, p.alpha, p.beta, p.gamma)[2]


def _plan(net: nn.Module):
    return split_by_stride(net, "features")


# Stochastic depth (model.backbone.drop_path) is torchvision's stochastic_depth_prob; no kwargs: the compound-scaled
# network's parameters live in model.backbone.efficientnet.
FAMILY = BackboneFamily(
    name="efficientnet",
    presets=(*(BackboneSpec(name=name, network=_named(name), plan=_plan, head=("avgpool", "classifier"),
                            torchvision_weights=name, resolution=lambda cfg, r=res: r)
               for name, (_, _, res, _) in NAMED.items()),
             BackboneSpec(name="efficientnet", network=_phi_network, plan=_plan, head=("avgpool", "classifier"),
                          resolution=_phi_resolution, preset=False)),
    accepts=("drop_path", "taps"),
    refusals={"kwargs": "model.backbone.kwargs: {name} takes no extra arguments (got {value}); "
                        "use model.backbone.efficientnet.*"},
)
