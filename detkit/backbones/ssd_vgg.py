"""``ssd_vgg16``: torchvision's SSD300 VGG-16 feature extractor under the backbone contract.

SSD (Liu et al., 2016) cuts VGG-16 at conv4_3 (stride 8), whose map it L2-normalises and rescales by a learned
per-channel weight, turns fc6/fc7 into a dilated 3x3 and a 1x1 conv (stride 16), and adds four extra blocks.
The network is torchvision's ``SSDFeatureExtractorVGG`` itself (its module names, so torchvision's
``ssd300_vgg16`` weights load through ``model.weights``), its six maps exposed as levels:

======  ==================================  ========  =============
level   map                                 channels  cells at 300
======  ==================================  ========  =============
c3      conv4_3, L2-normalised x scale      512       38
c4      fc7                                 1024      19
c5-c6   extra blocks 1-2 (stride-2 3x3)     512, 256  10, 5
c7-c8   extra blocks 3-4 (valid 3x3)        256, 256  3, 1
======  ==================================  ========  =============

The strides are nominal (``2**k``): the valid 3x3 convs of c7 and c8 shrink the maps by 2 cells, not by half,
which is why SSD300 sets its default boxes' ``steps`` explicitly (``configs/_base_/models/ssd300_vgg16.yaml``)
and needs inputs of about 300 px when c8 is used. Levels above the highest of ``out_levels`` are dropped.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from detkit.backbones.base import FrozenStagesModule, _convert_norm, check_frozen_stages, check_levels
from detkit.backbones.family import BackboneFamily, BackboneSpec
from detkit.errors import ConfigError

LEVELS = ("c3", "c4", "c5", "c6", "c7", "c8")
CHANNELS = (512, 1024, 512, 256, 256, 256)
# torchvision's ssd300_vgg16 input normalisation: ImageNet's mean, pixels in 0..255 (std 1/255 in [0, 1] units)
MEAN = (0.48235, 0.45882, 0.40784)
STD = (1.0 / 255.0,) * 3


class SSDVGG16(FrozenStagesModule):
    """See the module docstring. ``frozen_stages`` counts levels from c3 (1: VGG up to conv4_3)."""

    def __init__(self, out_levels, *, frozen_stages: int = 0, norm: str = "bn", kwargs: dict | None = None) -> None:
        super().__init__()
        from torchvision.models import vgg16
        from torchvision.models.detection.ssd import SSDFeatureExtractorVGG

        self.name = "ssd_vgg16"
        if kwargs:
            raise ConfigError(f"model.backbone.kwargs: ssd_vgg16 takes no extra arguments (got {dict(kwargs)})")
        self.levels = list(LEVELS)
        check_levels(self.name, list(out_levels), self.levels)
        check_frozen_stages(self.name, frozen_stages, self.levels)
        self.out_levels = sorted(out_levels, key=self.levels.index)
        top = self.levels.index(self.out_levels[-1])
        network = SSDFeatureExtractorVGG(vgg16(weights=None).features, highres=False)
        network.extra = network.extra[:top]  # extra[i] makes level c(4 + i)
        self.dropped = tuple(f"extra.{i}." for i in range(top, len(LEVELS) - 1))
        self.network = _convert_norm(network, norm)
        self.out_channels = {level: CHANNELS[self.levels.index(level)] for level in self.out_levels}
        self.strides = {level: 2 ** int(level[1:]) for level in self.out_levels}
        self.mean, self.std = MEAN, STD
        self.recommended_resolution = 300
        self.frozen_stages = frozen_stages
        stages = [self.network.features, *self.network.extra]
        self._frozen = stages[:frozen_stages]
        for module in self._frozen:
            module.requires_grad_(False)
        if frozen_stages:
            self.network.scale_weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        x = self.network.features(x)
        feats: OrderedDict[str, torch.Tensor] = OrderedDict()
        if "c3" in self.out_levels:
            feats["c3"] = self.network.scale_weight.view(1, -1, 1, 1) * F.normalize(x)
        for level, block in zip(self.levels[1:], self.network.extra):
            if min(x.shape[-2:]) < 3 and level in ("c7", "c8"):
                raise ConfigError(f"ssd_vgg16: a {x.shape[-2]}x{x.shape[-1]} map is too small for {level}'s valid 3x3 "
                                  f"conv: use data.image_size >= 300 (SSD300) or out_levels up to "
                                  f"{self.levels[self.levels.index(level) - 1]}")
            x = block(x)
            if level in self.out_levels:
                feats[level] = x
        return feats


    def extra_repr(self) -> str:
        return f"out_levels={self.out_levels}, frozen_stages={self.frozen_stages}"


def build_ssd_vgg16(cfg) -> SSDVGG16:
    """The registry's builder for ``model.backbone.name: ssd_vgg16`` (``pretrained``: a file of this network's keys,
    e.g. the ``backbone.*`` of a torchvision SSD300 file without the prefix; torchvision's detector files load
    whole through ``model.weights``)."""
    from detkit.backbones.pretrained import load_into, looks_like_path, read_state_dict
    from detkit.errors import PretrainedError

    backbone = SSDVGG16(cfg.out_levels, frozen_stages=cfg.frozen_stages, norm=cfg.norm, kwargs=dict(cfg.kwargs))
    if cfg.pretrained:
        if not looks_like_path(cfg.pretrained):
            raise PretrainedError(f"model.backbone.pretrained = {cfg.pretrained!r}: ssd_vgg16 has no named weights; "
                                  f"give a file, or a torchvision SSD300 file as model.weights")
        load_into(backbone.network, read_state_dict(cfg.pretrained), source=str(cfg.pretrained), name=backbone.name,
                  ignored_prefixes=backbone.dropped)
    return backbone


def _vgg16(cfg, num_classes: int) -> nn.Module:
    from torchvision.models import vgg16

    return vgg16(weights=None, num_classes=num_classes)


# Its own builder (conv4_3 is L2-normalised: its levels are not a run of submodules): no taps; no options.
FAMILY = BackboneFamily(
    name="ssd_vgg16",
    presets=(BackboneSpec(name="ssd_vgg16", network=_vgg16, plan=lambda net: [], head=(), resolution=lambda cfg: 300,
                          preset=False),),
    build=build_ssd_vgg16,
)
