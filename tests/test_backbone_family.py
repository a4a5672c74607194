"""Backbone families: each declared once (a BackboneFamily in its own module), registered with one line.

A toy family registered from this file trains through `detkit train`, loads with `detkit.load_model` and predicts;
the registry's functions name no family, prefix or option; each built-in family's own options, refusals and ImageNet
resolution are what they were before families were objects.
"""

from __future__ import annotations

import inspect
import json
import re
from collections import OrderedDict

import pytest
import torch
from torch import nn

from conftest import ROOT
from detkit.backbones import (
    BACKBONES,
    BackboneFamily,
    build_backbone,
    build_classifier,
    families,
    family_of,
    get_spec,
    imagenet_resolution,
    register_family,
    unregister_family,
)
from detkit.backbones import registry as backbone_registry
from detkit.backbones.family import OPTIONS
from detkit.cli import main
from detkit.errors import ConfigError


# ------------------------------------------------------------------------------------------- a toy family
class ToyBackbone(nn.Module):
    """c2..c5: a stride-4 stem, then one stride-2 conv per level; channels, strides and normalisation known when
    built (the backbone contract)."""

    def __init__(self, out_levels, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 4, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width * 2**i, width * 2 ** (i + 1), 3, 2, 1), nn.BatchNorm2d(width * 2 ** (i + 1)),
                          nn.ReLU()) for i in range(3))
        levels = ["c2", "c3", "c4", "c5"]
        bad = [lvl for lvl in out_levels if lvl not in levels]
        if bad:
            raise ConfigError(f"model.backbone.out_levels: {bad[0]!r} is not a level of the toy (it has c2..c5)")
        self.out_levels = [lvl for lvl in levels if lvl in out_levels]
        self.out_channels = {lvl: width * 2 ** (int(lvl[1:]) - 2) for lvl in self.out_levels}
        self.strides = {lvl: 2 ** int(lvl[1:]) for lvl in self.out_levels}
        self.mean, self.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        x = self.stem(x)
        feats = OrderedDict([("c2", x)] if "c2" in self.out_levels else [])
        for level, stage in zip(("c3", "c4", "c5"), self.stages):
            x = stage(x)
            if level in self.out_levels:
                feats[level] = x
        return feats


class ToyClassifier(nn.Module):
    def __init__(self, num_classes: int, width: int = 8) -> None:
        super().__init__()
        self.body = ToyBackbone(["c5"], width)
        self.fc = nn.Linear(width * 8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x)["c5"].mean((2, 3)))


def build_toy(cfg) -> ToyBackbone:
    return ToyBackbone(cfg.out_levels, **cfg.kwargs)


TOY = BackboneFamily(
    name="toy",
    prefix="toy:",
    build=build_toy,
    classifier=lambda cfg, num_classes: ToyClassifier(num_classes, **cfg.kwargs),
    resolution=lambda cfg: 64,
    accepts=("kwargs",),
)


@pytest.fixture
def toy_family():
    register_family(TOY)
    try:
        yield TOY
    finally:
        unregister_family(TOY)
    assert "toy:tiny" not in BACKBONES and TOY not in families()


def test_a_backbone_family_registered_from_a_test_file_trains_through_the_cli(toy_family, shapes_dir, tmp_path):
    import detkit
    from detkit.inference import Predictor

    config = tmp_path / "toy.yaml"
    config.write_text(f"""
_base_: [{ROOT / 'configs/_base_/runtime.yaml'}, {ROOT / 'configs/_base_/data/shapes.yaml'}]
data:
  train: {{images: {shapes_dir}/images/train, annotations: {shapes_dir}/annotations/instances_train.json}}
  val: {{images: {shapes_dir}/images/val, annotations: {shapes_dir}/annotations/instances_val.json}}
  image_size: 64
  batch_size: 4
model:
  backbone: {{name: "toy:tiny", out_levels: [c3, c4, c5], kwargs: {{width: 8}}}}
  neck: {{name: fpn, out_channels: 16, levels: [p3, p4, p5]}}
  head: {{name: yolo, params: {{score_thresh: 0.0}}}}
train: {{epochs: 1, lr: 0.001, warmup_iters: 1}}
trainer: {{max_steps: 2, limit_val_batches: 2, enable_progress_bar: false, enable_model_summary: false,
          accelerator: cpu}}
output_dir: {tmp_path / 'run'}
""")
    assert main(["train", str(config)]) == 0
    run = tmp_path / "run"
    assert "bbox_AP" in json.loads((run / "metrics.json").read_text())
    model = detkit.load_model(run)
    assert isinstance(model.backbone, ToyBackbone) and model.backbone.out_channels == {"c3": 16, "c4": 32, "c5": 64}
    torch.testing.assert_close(model.pixel_mean.flatten(), torch.full((3,), 0.5 * 255))  # the family's normalisation
    result = Predictor(model)(str(shapes_dir / "images" / "val" / "000000.jpg"))
    assert result["boxes"].shape[1] == 4


def test_a_registered_family_answers_every_registry_function(toy_family, capsys):
    assert family_of("toy:tiny") is TOY
    backbone = build_backbone({"name": "toy:tiny", "kwargs": {"width": 4}, "bn_momentum": 0.2})
    assert backbone.out_channels == {"c2": 4, "c3": 8, "c4": 16, "c5": 32}
    assert all(m.momentum == 0.2 for m in backbone.modules() if isinstance(m, nn.BatchNorm2d))
    assert build_classifier("toy:tiny", num_classes=7)(torch.zeros(1, 3, 64, 64)).shape == (1, 7)
    assert imagenet_resolution("toy:tiny") == 64
    with pytest.raises(ConfigError, match="'toy:tiny': toy backbones have no spec"):
        get_spec("toy:tiny")
    with pytest.raises(ConfigError, match=r"drop_path = 0.1: toy:tiny has no stochastic depth \(families that have: "
                                          r"efficientnet, timm\)"):
        build_backbone("toy:tiny", drop_path=0.1)
    with pytest.raises(ConfigError, match="toy:tiny: taps are for the registry's backbones"):
        build_classifier({"name": "toy:tiny", "taps": {"c4": "stem"}})
    with pytest.raises(ConfigError, match=r"or timm:<name>, or tv:<name>, or toy:<name>"):
        build_backbone("tyo:tiny")
    assert main(["backbones", "toy:tiny", "--format", "json"]) == 0
    assert '"toy:tiny"' in capsys.readouterr().out


def test_a_family_is_registered_once_and_declared_whole():
    taken = BackboneFamily(name="resnet_again", presets=(get_spec("resnet18"),))
    with pytest.raises(ValueError, match="'resnet_again': resnet18 registered already by another family"):
        register_family(taken)
    assert family_of("resnet18").name == "resnet"
    with pytest.raises(ValueError, match="'timm' is registered already"):
        register_family(family_of("timm:resnet18"))
    with pytest.raises(ValueError, match="timm:<name> registered already"):
        register_family(BackboneFamily(name="timm2", prefix="timm:", build=build_toy, classifier=build_toy))
    with pytest.raises(ValueError, match="either presets"):
        BackboneFamily(name="x")
    with pytest.raises(ValueError, match="needs build and classifier"):
        BackboneFamily(name="x", prefix="x:")
    with pytest.raises(ValueError, match=r"unknown options \['dropout'\]"):
        BackboneFamily(name="x", prefix="x:", build=build_toy, classifier=build_toy, accepts=("dropout",))


def test_the_registry_functions_name_no_family_prefix_or_option():
    functions = [backbone_registry.get_spec, backbone_registry.build_backbone, backbone_registry.build_classifier,
                 backbone_registry.imagenet_resolution, backbone_registry._checked_family]
    source = "\n".join(inspect.getsource(f) for f in functions)
    words = [f.name for f in families()] + list(OPTIONS) + ["inception"]
    assert [w for w in words if re.search(rf"\b{w}\b", source)] == []
    assert [f.prefix for f in families() if f.prefix and f.prefix in source] == []


# ----------------------------------------------------------------- what each built-in family declares
@pytest.mark.parametrize("cfg, message", [
    ({"name": "resnet18", "drop_path": 0.1},
     r"model.backbone.drop_path = 0.1: resnet18 has no stochastic depth \(families that have: efficientnet, timm\)"),
    ({"name": "mobilenet_v3_small", "drop_path": 0.0}, "mobilenet_v3_small has no stochastic depth"),
    ({"name": "tv:alexnet", "drop_path": 0.1},
     r"drop_path = 0.1: tv:alexnet: pass the model's own argument in model.backbone.kwargs"),
    ({"name": "tv:alexnet", "taps": {"c4": "features.5"}},
     r"model.backbone.taps = \{'c4': 'features.5'\}: tv:alexnet: taps are for the registry's backbones"),
    ({"name": "timm:resnet18", "taps": {"c4": "layer3"}}, "timm:resnet18: taps are for the registry's backbones"),
    ({"name": "ssd_vgg16", "taps": {"c4": "extra.0"}}, "ssd_vgg16: taps are for the registry's backbones"),
    ({"name": "ssd_vgg16", "drop_path": 0.1}, "ssd_vgg16 has no stochastic depth"),
    ({"name": "ssd_vgg16", "kwargs": {"a": 1}}, r"model.backbone.kwargs: ssd_vgg16 takes no extra arguments \(got"),
    ({"name": "regnet_x_400mf", "kwargs": {"a": 1}}, r"regnet_x_400mf takes no extra arguments .*backbone.regnet"),
    ({"name": "regnet", "kwargs": {"a": 1}}, r"regnet takes no extra arguments .*use model.backbone.regnet\.\*"),
    ({"name": "anynet", "kwargs": {"a": 1}}, r"anynet takes no extra arguments .*use model.backbone.anynet\.\*"),
    ({"name": "efficientnet", "kwargs": {"a": 1}}, r"use model.backbone.efficientnet\.\*"),
])
def test_each_family_refuses_the_options_it_does_not_take_in_one_line(cfg, message):
    for build in (build_backbone, build_classifier):
        with pytest.raises(ConfigError, match=message) as e:
            build(cfg)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("cfg, accepted", [
    ({"name": "efficientnet_b0", "drop_path": 0.1},
     lambda b: 0 < max(m.p for m in b.modules() if type(m).__name__ == "StochasticDepth") < 0.1),
    ({"name": "timm:resnet18", "drop_path": 0.1}, lambda b: any(type(m).__name__ == "DropPath" for m in b.modules())),
    ({"name": "resnet50", "kwargs": {"width_per_group": 32}}, lambda b: b.network.layer1[0].conv1.out_channels == 32),
    ({"name": "tv:alexnet", "kwargs": {"dropout": 0.1}}, lambda b: b.out_channels["c5"] == 256),
])
def test_each_family_takes_its_own_options(cfg, accepted):
    with torch.device("meta"):
        backbone = build_backbone(cfg)
    assert accepted(backbone)


@pytest.mark.parametrize("cfg, resolution", [
    ("resnet18", 224), ("regnet_y_400mf", 224), ("efficientnet_b3", 300), ("ssd_vgg16", 300),
    ({"name": "efficientnet", "efficientnet": {"phi": 2.0}}, 288), ("tv:alexnet", 224), ("tv:inception_v3", 299),
    ("timm:tf_efficientnet_lite2", 260),
])
def test_each_family_knows_its_imagenet_resolution(cfg, resolution):
    assert imagenet_resolution(cfg) == resolution
