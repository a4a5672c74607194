"""Backbones: the contract for every family, RegNet/EfficientNet parity with torchvision, options."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torchvision
from torch import nn

from conftest import sweep
from detkit.backbones import build_backbone, build_classifier, list_backbones
from detkit.backbones.efficientnet import NAMED, compound_scaling
from detkit.backbones.regnet import PRESETS, preset_stages, quantized_linear_widths, regnet_stages
from detkit.errors import ConfigError

FAMILIES = [
    ("resnet18", {}),
    ("resnet50", {}),
    ("regnet_x_400mf", {}),
    ("regnet_y_400mf", {}),
    ("regnet", {"regnet": {"depth": 10, "w0": 16, "wa": 12.0, "wm": 2.2, "group_width": 8, "se_ratio": 0.25}}),
    ("efficientnet_b0", {}),
    ("efficientnet", {"efficientnet": {"phi": 0.5}}),
    ("mobilenet_v3_large", {}),
    ("mobilenet_v3_small", {}),
    ("timm:resnet18", {}),
    ("timm:tf_efficientnet_lite0", {}),
]


@pytest.mark.parametrize("name, extra", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_every_family_keeps_the_contract(name, extra):
    levels = ["c1", "c2", "c3", "c4", "c5"]
    backbone = build_backbone({"name": name, "out_levels": levels, **extra})
    # declared before any forward pass
    assert list(backbone.out_channels) == levels and list(backbone.strides) == levels
    assert backbone.strides == {f"c{k}": 2**k for k in range(1, 6)}
    x = torch.randn(2, 3, 64, 96)
    feats = backbone.eval()(x)
    assert list(feats) == levels
    for level, f in feats.items():
        s = backbone.strides[level]
        assert f.shape == (2, backbone.out_channels[level], 64 // s, 96 // s), level
    assert len(backbone.mean) == 3 and len(backbone.std) == 3


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "timm:resnet18"])
def test_out_levels_subset_drops_unused_modules(name):
    full = build_backbone(name)
    small = build_backbone(name, out_levels=["c3", "c2"])
    assert list(small.out_channels) == ["c2", "c3"]  # ordered by stride whatever the config order
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in full.parameters())
    feats = small(torch.randn(1, 3, 64, 64))
    assert list(feats) == ["c2", "c3"]
    assert feats["c3"].shape[1] == full.out_channels["c3"]


def test_classifier_head_is_dropped():
    backbone = build_backbone("resnet18")
    names = {n for n, _ in backbone.named_parameters()}
    assert not any(n.startswith("network.fc") for n in names)
    assert "network.conv1.weight" in names  # the library's own key names are kept


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "timm:resnet18"])
def test_frozen_stages(name):
    backbone = build_backbone(name, frozen_stages=2, out_levels=["c2", "c3", "c4", "c5"]).train()
    x = torch.randn(2, 3, 64, 64)
    sum(f.sum() for f in backbone(x).values()).backward()
    frozen = [m for m in backbone._frozen]
    assert frozen, "nothing frozen"
    for module in frozen:
        for p in module.parameters():
            assert not p.requires_grad and p.grad is None
        assert not module.training  # BN statistics of frozen stages stay fixed
    trainable = [p for p in backbone.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    # frozen BN buffers don't move in train mode
    bns = [m for mod in frozen for m in mod.modules() if isinstance(m, nn.BatchNorm2d)]
    if bns:
        before = bns[0].running_mean.clone()
        backbone(x * 3 + 1)
        assert torch.equal(before, bns[0].running_mean)


def test_frozen_stages_out_of_range():
    with pytest.raises(ConfigError, match=r"model.backbone.frozen_stages = 9: resnet18 has 5 stages"):
        build_backbone("resnet18", frozen_stages=9)


@pytest.mark.parametrize("name", ["resnet18", "timm:tf_efficientnet_lite0"])
def test_norm_options(name):
    from timm.layers import FrozenBatchNormAct2d

    frozen = build_backbone(name, norm="frozen_bn")
    kinds = {type(m).__name__ for m in frozen.modules()}
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)) for m in frozen.modules()), kinds
    assert "FrozenBatchNorm2d" in kinds or any(isinstance(m, FrozenBatchNormAct2d) for m in frozen.modules())
    reference = build_backbone(name).eval()
    # BN scale/shift become buffers: fewer trainable parameters, same state-dict keys for the weights
    assert sum(p.numel() for p in frozen.parameters()) < sum(p.numel() for p in reference.parameters())
    # frozen BN computes the same function as eval-mode BN
    frozen.load_state_dict(reference.state_dict(), strict=False)
    x = torch.randn(1, 3, 64, 64)
    for a, b in zip(reference(x).values(), frozen.eval()(x).values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    synced = build_backbone(name, norm="sync_bn")
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())


def test_bad_names_and_levels():
    with pytest.raises(ConfigError, match=r"unknown backbone \(did you mean 'resnet50'\?"):
        build_backbone("resnet5O")
    with pytest.raises(ConfigError, match=r"'c6' is not a level of resnet18 \(it has c1, c2, c3, c4, c5\)"):
        build_backbone("resnet18", out_levels=["c5", "c6"])
    with pytest.raises(ConfigError, match="timm:not_a_model"):
        build_backbone("timm:not_a_model")
    with pytest.raises(ConfigError, match="model.backbone.norm"):
        build_backbone("resnet18", norm="gn")
    with pytest.raises(ConfigError, match="model.backbone.kwargs = {'nope': 1}: resnet18: .*unexpected keyword"):
        build_backbone({"name": "resnet18", "kwargs": {"nope": 1}})
    with pytest.raises(ConfigError, match="efficientnet_b0 takes no extra arguments"):
        build_backbone({"name": "efficientnet_b0", "kwargs": {"a": 1}})


# ------------------------------------------------------------------------------------------ RegNet
def _torchvision_block_params(name: str):
    """The BlockParams torchvision's own builder passes to RegNet (captured, no network built)."""
    with mock.patch.object(torchvision.models.regnet, "RegNet") as regnet_cls:
        getattr(torchvision.models, name)(weights=None)
    return regnet_cls.call_args.args[0]


@pytest.mark.parametrize("name", sweep(sorted(PRESETS), fast=["regnet_x_400mf", "regnet_y_800mf"]))
def test_regnet_preset_rebuilt_from_parameters_equals_torchvision(name):
    ref = _torchvision_block_params(name)
    ours = preset_stages(name)
    assert ours.depths == list(ref.depths)
    assert ours.widths == list(ref.widths)
    assert ours.group_widths == list(ref.group_widths)
    assert ours.bottleneck_ratios == list(ref.bottleneck_multipliers)
    assert (ours.se_ratio or None) == ref.se_ratio
    # and the network is block for block torchvision's (compared on the meta device: shapes only)
    with torch.device("meta"):
        tv = getattr(torchvision.models, name)
        mine = build_classifier(name)
    if name in ("regnet_x_400mf", "regnet_y_400mf", "regnet_y_800mf"):  # small enough to build for real
        tv_state = tv(weights=None).state_dict()
        assert {k: v.shape for k, v in mine.state_dict().items()} == {k: v.shape for k, v in tv_state.items()}


def test_quantized_linear_rule_by_hand():
    # d=6, w0=24, wa=24, wm=2: u = 24, 48, 72, 96, 120, 144 -> exponents 0,1,2(1.58),2,2(2.32),3(2.58)
    assert quantized_linear_widths(6, 24, 24.0, 2.0) == [24, 48, 96, 96, 96, 192]
    stages = regnet_stages(6, 24, 24.0, 2.0, group_width=16)
    assert stages.depths == [1, 1, 3, 1]
    # widths made divisible by the group width (24 -> 32 with g=16), groups capped by the width
    assert stages.widths == [32, 48, 96, 192] and stages.group_widths == [16, 16, 16, 16]
    with pytest.raises(ConfigError, match="invalid design point"):
        quantized_linear_widths(10, 24, 10.0, 0.9)


def test_regnet_design_point_backbone():
    backbone = build_backbone({"name": "regnet", "regnet": {"depth": 13, "w0": 24, "wa": 36.0, "wm": 2.5,
                                                           "group_width": 8}})
    stages = regnet_stages(13, 24, 36.0, 2.5, 8)
    assert stages.num_stages == 4
    assert [backbone.out_channels[f"c{i + 2}"] for i in range(4)] == stages.widths


# ------------------------------------------------------------------------------------------ EfficientNet
@pytest.mark.parametrize("name", sweep(sorted(NAMED), fast=["efficientnet_b0", "efficientnet_b3"]))
def test_efficientnet_matches_torchvision(name):
    with torch.device("meta"):
        tv = getattr(torchvision.models, name)(weights=None)
        mine = build_classifier(name)
    assert sum(p.numel() for p in mine.parameters()) == sum(p.numel() for p in tv.parameters())
    assert {k: v.shape for k, v in mine.state_dict().items()} == {k: v.shape for k, v in tv.state_dict().items()}
    tv_bn = next(m for m in tv.modules() if isinstance(m, nn.BatchNorm2d))
    my_bn = next(m for m in mine.modules() if isinstance(m, nn.BatchNorm2d))
    assert (tv_bn.eps, tv_bn.momentum) == (my_bn.eps, my_bn.momentum)


def test_compound_scaling():
    assert compound_scaling(0) == (1.0, 1.0, 224)
    width, depth, res = compound_scaling(1.0)
    assert (width, depth) == pytest.approx((1.1, 1.2)) and res == 256  # 224 * 1.15 = 257.6 -> multiple of 32
    assert 1.2 * 1.1**2 * 1.15**2 == pytest.approx(2.0, abs=0.1)
    b = build_backbone({"name": "efficientnet", "efficientnet": {"phi": 2.0}})
    assert b.recommended_resolution == compound_scaling(2.0)[2]
    base = build_backbone({"name": "efficientnet", "efficientnet": {"phi": 0.0}})
    assert b.out_channels["c5"] > base.out_channels["c5"]  # wider


@pytest.mark.slow
def test_every_registered_preset_builds_on_meta():
    for name in list_backbones():
        with torch.device("meta"):
            b = build_backbone(name)
        assert b.strides == {"c2": 4, "c3": 8, "c4": 16, "c5": 32}, name


def test_timm_frozen_stages_for_nested_blocks():
    backbone = build_backbone("timm:tf_efficientnet_lite0", frozen_stages=2)
    frozen = {id(p) for m in backbone._frozen for p in m.parameters()}
    assert frozen and all(not p.requires_grad for m in backbone._frozen for p in m.parameters())
    # conv_stem .. blocks.1 (c1, c2) are frozen; later blocks train
    assert not backbone.network.conv_stem.weight.requires_grad
    assert backbone.network.blocks[2][0].conv_pwl.weight.requires_grad


@pytest.mark.parametrize("params, message", [
    ({"w0": 4}, "w0 >= 8"), ({"group_width": 0}, "g >= 1"), ({"bottleneck_ratio": 0}, "b > 0")])
def test_regnet_invalid_design_points(params, message):
    with pytest.raises(ConfigError, match=message):
        build_backbone({"name": "regnet", "regnet": params})


# ------------------------------------------------------------------------------------------------ taps
def test_a_tap_ends_a_level_inside_a_block_with_the_same_features_as_running_the_block_in_parts():
    """``model.backbone.taps`` (torchvision's SSDlite C4): the level ends at the tapped submodule, the features equal
    the network's own intermediate output there, and the next level goes on from it to the same top map."""
    torch.manual_seed(0)
    plain = build_backbone("mobilenet_v3_large", out_levels=["c4", "c5"]).eval()
    tapped = build_backbone("mobilenet_v3_large", out_levels=["c4", "c5"], taps={"c4": "features.13.block.0"}).eval()
    tapped.load_state_dict(plain.state_dict())
    assert tapped.out_channels == {"c4": 672, "c5": 960} and tapped.strides == {"c4": 16, "c5": 32}
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        a, b = plain(x), tapped(x)
        net = plain.network
        inside = net.features[13].block[0](a["c4"])
    torch.testing.assert_close(b["c4"], inside)
    torch.testing.assert_close(b["c5"], a["c5"])


@pytest.mark.parametrize("taps, message", [
    ({"c4": "features.12.block.0"}, "features.12 is not its children run in order"),  # a residual block
    ({"c4": "features.13.block.1"}, "has stride 32, not 16"),
    ({"c4": "features.99"}, "no such submodule"),
    ({"c5": "features.13"}, "top level"),
    ({"c9": "features.1"}, "has no level 'c9'"),
    ({"c4": "features.4"}, "leaves a level"),
])
def test_a_tap_that_cannot_be_kept_is_one_line(taps, message):
    with pytest.raises(ConfigError, match=message):
        build_backbone("mobilenet_v3_large", out_levels=["c4", "c5"], taps=taps)


def test_taps_and_normalisation_keys_are_checked():
    with pytest.raises(ConfigError, match="taps are for the registry's backbones"):
        build_backbone("tv:alexnet", taps={"c4": "features.5"})
    with pytest.raises(ConfigError, match=r"model.backbone.mean = \[0.5, 0.5\]: expected 3 values"):
        build_backbone("resnet18", mean=[0.5, 0.5])
    assert build_backbone("resnet18", mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]).std == (0.25, 0.25, 0.25)


def test_ssd_vgg16_is_torchvisions_extractor_and_says_when_the_input_is_too_small():
    from torchvision.models import vgg16
    from torchvision.models.detection.ssd import SSDFeatureExtractorVGG

    torch.manual_seed(0)
    backbone = build_backbone("ssd_vgg16", out_levels=["c3", "c4", "c5", "c6", "c7", "c8"]).eval()
    tv = SSDFeatureExtractorVGG(vgg16().features, highres=False).eval()
    tv.load_state_dict(backbone.network.state_dict())
    x = torch.rand(1, 3, 300, 300)
    with torch.no_grad():
        ours, theirs = backbone(x), tv(x)
    assert [tuple(v.shape[-2:]) for v in ours.values()] == [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]
    for a, b in zip(ours.values(), theirs.values()):
        torch.testing.assert_close(a, b)
    low = build_backbone("ssd_vgg16", out_levels=["c3", "c4"])
    assert not hasattr(low.network.extra, "1") and low.out_channels == {"c3": 512, "c4": 1024}
    with pytest.raises(ConfigError, match="too small for c8's valid 3x3 conv"):
        backbone(torch.rand(1, 3, 200, 200))


def test_a_tagged_tap_adds_a_second_map_at_a_levels_stride():
    """``taps: {c5_mid: features.13}``: torchvision's MobileNet FPN reads the maps after blocks 13 and 16, both at
    stride 32; the tagged level is the first, c5 goes on from it."""
    torch.manual_seed(0)
    plain = build_backbone("mobilenet_v3_large", out_levels=["c5"]).eval()
    tapped = build_backbone("mobilenet_v3_large", out_levels=["c5_mid", "c5"], taps={"c5_mid": "features.13"}).eval()
    tapped.load_state_dict(plain.state_dict())
    assert tapped.out_channels == {"c5_mid": 160, "c5": 960} and tapped.strides == {"c5_mid": 32, "c5": 32}
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        out = tapped(x)
        mid = plain.network.features[:14](x)
    torch.testing.assert_close(out["c5_mid"], mid)
    torch.testing.assert_close(out["c5"], plain(x)["c5"])
    with pytest.raises(ConfigError, match="is in level c4, not inside c5"):
        build_backbone("mobilenet_v3_large", out_levels=["c5_mid", "c5"], taps={"c5_mid": "features.12"})
    with pytest.raises(ConfigError, match="no level 'c7' to tap inside"):
        build_backbone("mobilenet_v3_large", taps={"c7_mid": "features.13"})
