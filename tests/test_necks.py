"""FPN / PAN over every backbone family: levels, channels and shapes."""

from __future__ import annotations

import math

import pytest
import torch

from detkit.backbones import build_backbone
from detkit.config import load_config
from detkit.errors import ConfigError
from detkit.necks import FPN, PAN, build_neck

BACKBONES = ["resnet18", "regnet_x_400mf", "efficientnet_b0", "mobilenet_v3_small", "timm:tf_efficientnet_lite0"]


@pytest.mark.parametrize("neck_cls", [FPN, PAN])
@pytest.mark.parametrize("name", BACKBONES)
def test_neck_shapes_over_every_family(name, neck_cls):
    backbone = build_backbone(name).eval()
    neck = neck_cls(backbone.out_channels, backbone.strides, out_channels=32,
                    levels=["p3", "p4", "p5", "p6", "p7"]).eval()
    x = torch.randn(1, 3, 100, 132)  # not a multiple of 32
    with torch.no_grad():
        out = neck(backbone(x))
    assert list(out) == ["p3", "p4", "p5", "p6", "p7"] == neck.levels
    assert neck.strides == {f"p{k}": 2**k for k in range(3, 8)}
    h, w = 100, 132
    for k in range(1, 8):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        if f"p{k}" in out:
            assert out[f"p{k}"].shape == (1, 32, h, w), (k, out[f"p{k}"].shape)


@pytest.mark.parametrize("levels, extra_op, extra_from", [
    (["p2", "p3", "p4", "p5", "p6"], "maxpool", "fpn"),
    (["p3", "p4", "p5", "p6", "p7"], "conv", "backbone"),
    (["p3", "p4", "p5"], "conv", "fpn"),
    (["p4", "p5", "p6"], "conv", "fpn"),
])
def test_level_ranges_and_extra_levels(levels, extra_op, extra_from):
    backbone = build_backbone("resnet18")
    neck = FPN(backbone.out_channels, backbone.strides, 16, levels, extra_from, extra_op)
    out = neck(backbone(torch.randn(2, 3, 64, 64)))
    assert list(out) == levels
    assert all(v.shape[:2] == (2, 16) for v in out.values())
    params = sum(p.numel() for p in neck.parameters())
    extra_params = sum(p.numel() for p in neck.fpn.extra_blocks.parameters()) if neck.fpn.extra_blocks else 0
    assert params > 0
    if extra_op == "maxpool" or levels[-1] == "p5":
        assert extra_params == 0


def test_pan_adds_a_bottom_up_path():
    backbone = build_backbone("resnet18")
    fpn = FPN(backbone.out_channels, backbone.strides, 16, ["p3", "p4", "p5"])
    pan = PAN(backbone.out_channels, backbone.strides, 16, ["p3", "p4", "p5"])
    pan.fpn.load_state_dict(fpn.fpn.state_dict())
    feats = backbone(torch.randn(1, 3, 64, 64))
    a, b = fpn(feats), pan(feats)
    torch.testing.assert_close(a["p3"], b["p3"])  # the lowest level is the FPN's
    assert not torch.allclose(a["p5"], b["p5"])  # higher levels see the bottom-up path
    assert len(pan.down) == len(pan.fuse) == 2


def test_neck_config_errors():
    backbone = build_backbone("resnet18", out_levels=["c3", "c4", "c5"])
    with pytest.raises(ConfigError, match="p2 needs backbone level c2"):
        FPN(backbone.out_channels, backbone.strides, 16, ["p2", "p3"])
    with pytest.raises(ConfigError, match="levels must be consecutive"):
        FPN(backbone.out_channels, backbone.strides, 16, ["p3", "p5"])
    with pytest.raises(ConfigError, match="bad level 'q3'"):
        FPN(backbone.out_channels, backbone.strides, 16, ["q3"])
    with pytest.raises(ConfigError, match="lowest level must come from the backbone"):
        FPN(backbone.out_channels, backbone.strides, 16, ["p6", "p7"])


def test_build_neck_from_config():
    cfg = load_config(None, ["model.neck.name=pan", "model.neck.out_channels=24", "model.neck.levels=[p3,p4,p5,p6]"])
    backbone = build_backbone(cfg.model.backbone)
    neck = build_neck(cfg.model.neck, backbone.out_channels, backbone.strides)
    assert isinstance(neck, PAN) and neck.out_channels == 24 and neck.levels == ["p3", "p4", "p5", "p6"]
    assert build_neck(load_config(None, ["model.neck.name=none"]).model.neck, backbone.out_channels) is None


def test_fpn_reads_two_maps_at_one_stride_as_torchvisions_mobilenet_fpn():
    """Levels p5_mid, p5 (both stride 32, from the backbone's c5_mid and c5) and p6 by max-pooling: torchvision's
    FeaturePyramidNetwork over the two maps in the backbone's order, the strides as the backbone declares them."""
    from detkit.necks.fpn import FPN

    fpn = FPN({"c5_mid": 160, "c5": 960}, {"c5_mid": 32, "c5": 32}, 64, ["p5_mid", "p5", "p6"], extra_op="maxpool")
    assert fpn.in_levels == ["c5_mid", "c5"] and fpn.strides == {"p5_mid": 32, "p5": 32, "p6": 64}
    out = fpn({"c5_mid": torch.rand(1, 160, 4, 4), "c5": torch.rand(1, 960, 4, 4)})
    assert [(k, tuple(v.shape[-2:])) for k, v in out.items()] == [("p5_mid", (4, 4)), ("p5", (4, 4)), ("p6", (2, 2))]
    with pytest.raises(ConfigError, match="p5_mid needs backbone level c5_mid"):
        FPN({"c4": 16, "c5": 32}, None, 64, ["p5_mid", "p5"])
