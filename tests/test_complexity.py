"""Complexity counter: hand-computed cases, and agreement with torchvision's published weights metadata."""

from __future__ import annotations

import json

import pytest
from torch import nn
from torchvision.models import get_model_weights

from detkit.analysis import count_built, count_complexity
from detkit.analysis.backbone_table import COLUMNS, backbone_table
from detkit.backbones import build_backbone, build_classifier, get_spec, list_backbones
from detkit.cli import main


def test_counts_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1, stride=2, bias=False),
                          nn.Flatten(), nn.Linear(4 * 5 * 5, 10))
    c = count_complexity(model, (10, 10))
    assert c.params == (8 * 3 * 9 + 8) + (4 * 8) + (100 * 10 + 10)
    # multiply-adds: conv1 8*10*10 outputs x 27, conv2 4*5*5 x 8, linear 100 x 10
    assert c.flops == 8 * 100 * 27 + 4 * 25 * 8 + 100 * 10
    # activations: conv outputs only (RegNet paper), per image
    assert c.activations == 8 * 10 * 10 + 4 * 5 * 5


def test_meta_and_real_counts_agree():
    real = count_complexity(build_backbone("resnet18").eval(), 96)
    meta = count_built(lambda: build_backbone("resnet18"), 96)
    assert real == meta


def _published():
    for name in list_backbones():
        tv_name = get_spec(name).torchvision_weights
        if tv_name:
            for weights in get_model_weights(tv_name):
                yield name, weights


FAST = {"resnet18-IMAGENET1K_V1", "regnet_y_400mf-IMAGENET1K_V2", "efficientnet_b0-IMAGENET1K_V1"}


# a plain, a grouped-width and a compound-scaled network in the fast tier, every published weight in the full one
@pytest.mark.parametrize("name, weights", [
    pytest.param(n, w, id=f"{n}-{w.name}", marks=() if f"{n}-{w.name}" in FAST else pytest.mark.slow)
    for n, w in _published()])
def test_imagenet_complexity_matches_torchvision_metadata(name, weights):
    resolution = weights.transforms().crop_size[0]
    c = count_built(lambda: build_classifier(name, num_classes=1000), resolution)
    assert c.params == weights.meta["num_params"]
    assert c.flops / 1e9 == pytest.approx(weights.meta["_ops"], rel=0.02)


@pytest.mark.parametrize("name, gflops, mparams", [
    ("resnet50", 4.09, 25.56), ("regnet_x_400mf", 0.41, 5.50), ("regnet_y_400mf", 0.40, 4.34),
    ("efficientnet_b0", 0.39, 5.29), ("mobilenet_v3_large", 0.22, 5.48)])
def test_reference_numbers(name, gflops, mparams):
    c = count_built(lambda: build_classifier(name), 224)
    assert round(c.flops / 1e9, 2) == pytest.approx(gflops, abs=0.01)
    assert round(c.params / 1e6, 2) == pytest.approx(mparams, abs=0.01)


def test_activations_match_the_regnet_paper():
    # The paper reports 11.1M activations for ResNet-50 and 3.1M for RegNetX-400MF (its pycls variant; the
    # torchvision preset rounds its last stage to 400 channels instead of 384, hence ~2% more).
    assert count_built(lambda: build_classifier("resnet50"), 224).activations / 1e6 == pytest.approx(11.1, abs=0.05)
    regnet = count_built(lambda: build_classifier("regnet_x_400mf"), 224)
    assert regnet.activations / 1e6 == pytest.approx(3.1, rel=0.03)


def test_efficientnet_phi_roughly_doubles_flops():
    from detkit.backbones.efficientnet import compound_scaling

    flops = []
    for phi in (0.0, 1.0, 2.0):
        res = compound_scaling(phi)[2]
        cfg = {"name": "efficientnet", "efficientnet": {"phi": phi}}
        flops.append(count_built(lambda: build_classifier(cfg), res).flops)
    for small, big in zip(flops, flops[1:]):
        assert 1.5 < big / small < 2.6


def test_backbone_table_rows_and_json(capsys):
    rows = backbone_table(["resnet18", "mobilenet_v3_small"], input_size=128)
    assert [r["name"] for r in rows] == ["resnet18", "mobilenet_v3_small"]
    assert rows[0]["flops"] == count_built(lambda: build_backbone("resnet18"), 128).flops
    assert main(["backbones", "--format", "json", "--filter", "^resnet(18|50)$"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in data] == ["resnet18", "resnet50"]
    for r in data:
        assert set(r) == set(COLUMNS)
        assert all(isinstance(r[k], int) for k in ("params", "flops", "activations"))
        assert r["strides"] == {"c2": 4, "c3": 8, "c4": 16, "c5": 32}
    assert main(["backbones", "--imagenet", "--format", "csv", "resnet50"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split(",") == list(COLUMNS)
    assert lines[1].startswith("resnet50,25557032,")


def test_table_format_and_errors(capsys):
    assert main(["backbones", "--filter", "mobilenet"]) == 0
    out = capsys.readouterr().out
    assert "mobilenet_v3_large" in out and "mobilenet_v3_small" in out and "resnet18" not in out
    assert main(["backbones", "--filter", "("]) == 2
    assert "bad regular expression" in capsys.readouterr().err
    assert main(["backbones", "resnet_nope"]) == 2
    assert "unknown backbone" in capsys.readouterr().err
