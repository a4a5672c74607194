"""CSP networks (detkit/backbones/csp.py) and the ``csp`` design space: the network's shape and multiply-adds
against a hand count, one-line errors for bad design parameters, samples that keep the space's rules and budget,
overrides that build exactly the sample, saved samples that read back, and the KS test between spaces."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from detkit.analysis.complexity import count_complexity
from detkit.analysis.design_space import Budget, Sample, complexity_of, sample_space
from detkit.analysis.design_study import flat_params, ks_tests, read_samples, sample_overrides
from detkit.backbones.csp import CSPDesign, build_cspnet, hidden_width
from detkit.backbones.registry import build_backbone
from detkit.config import load_config
from detkit.errors import ConfigError
from detkit.models.build import build_model


def hand_macs(d: CSPDesign, size: int, num_classes: int = 1000) -> int:
    """Multiply-adds of the classifier network, counted convolution by convolution from the module docstring."""
    res = (size + 1) // 2
    macs = res * res * 3 * d.stem_width * 9
    cin = d.stem_width
    for depth, w, r in zip(d.depths, d.widths, d.split_ratios):
        h = hidden_width(w, r)
        res = (res + 1) // 2
        macs += res * res * cin * w * 9  # down
        macs += res * res * w * 2 * h  # split
        macs += depth * 2 * res * res * h * h * 9  # blocks
        macs += res * res * ((2 + depth) * h if d.dense else 2 * h) * w  # merge
        cin = w
    return macs + cin * num_classes


@pytest.mark.parametrize("dense", [True, False])
def test_the_network_has_its_declared_levels_and_multiply_adds(dense):
    design = CSPDesign([1, 2, 3, 1], [24, 48, 96, 192], [0.5, 1.0, 0.5, 1.0], dense, 16)
    for size in (224, 320):
        counted = count_complexity(build_cspnet(design), size).as_dict()
        assert counted["flops"] == hand_macs(design, size)
        assert complexity_of(design, size) == counted  # the formula a budget reads: params and activations too
    backbone = build_backbone({"name": "cspnet", "out_levels": ["c2", "c3", "c4", "c5"], "kwargs": design.as_dict()})
    out = backbone(torch.zeros(2, 3, 96, 128))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "c2": (2, 24, 24, 32), "c3": (2, 48, 12, 16), "c4": (2, 96, 6, 8), "c5": (2, 192, 3, 4)}
    assert backbone.out_channels == {"c2": 24, "c3": 48, "c4": 96, "c5": 192}
    assert backbone.strides == {"c2": 4, "c3": 8, "c4": 16, "c5": 32}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"depth": [1]}, "unknown CSP parameter 'depth'"),
    ({"depths": [1, 2], "widths": [8]}, "need one value per stage"),
    ({"depths": [1, 0, 1, 1]}, r"depths = \[1, 0, 1, 1\]: every value must be a number > 0"),
    ({"widths": [16, 32, "wide", 64]}, "widths"),
    ({"depths": [1.5, 1, 1, 1]}, "whole numbers"),
    ({"dense": "yes"}, "dense = 'yes'"),
    ({"stem_width": 0}, "stem_width = 0"),
])
def test_bad_design_parameters_are_one_line_naming_the_key(kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        build_backbone({"name": "cspnet", "kwargs": kwargs})
    assert str(info.value).startswith("model.backbone.kwargs") and "\n" not in str(info.value)


def test_csp_samples_keep_the_space_rules_and_the_budget_at_the_detection_size():
    budget = Budget(flops=(250e6, 450e6), input_size=320)
    samples = sample_space("csp", 12, seed=1, budget=budget)
    assert [s.params for s in samples] == [s.params for s in sample_space("csp", 12, seed=1, budget=budget)]
    assert [s.params for s in samples] != [s.params for s in sample_space("csp", 12, seed=2, budget=budget)]
    for s in samples:
        p = s.params
        assert all(1 <= d <= 6 for d in p["depths"]) and p["widths"] == sorted(p["widths"])
        assert all(16 <= w <= 512 and w % 8 == 0 for w in p["widths"])
        assert p["split_ratio"] in (0.5, 1.0) and p["stem_width"] in (16, 32) and isinstance(p["dense"], bool)
        assert 250e6 <= s.complexity["flops"] <= 450e6
        assert s.complexity["flops"] == hand_macs(s.stages, 320)


def test_a_samples_overrides_build_exactly_that_network_and_it_reads_back(tmp_path):
    sample = sample_space("csp", 1, seed=0, budget=Budget(flops=(100e6, 300e6), input_size=320))[0]
    cfg = load_config("configs/yolo_af/shapes.yaml", sample_overrides(sample))
    model = build_model(cfg)
    assert model.backbone.network.design == sample.stages
    path = tmp_path / "samples.json"
    path.write_text(json.dumps([sample.as_dict()]))
    (back,) = read_samples(path)
    assert isinstance(back, Sample) and back.stages == sample.stages and back.params == sample.params
    assert flat_params(back)["w4"] == sample.stages.widths[3] and flat_params(back)["dense"] == sample.params["dense"]


def test_ks_between_spaces_on_known_errors():
    same = np.linspace(0.2, 0.8, 50)
    rows = ks_tests({"a": same, "b": same.copy(), "c": same + 1.0, "d": np.array([0.5])})
    by_pair = {(r["space_a"], r["space_b"]): r for r in rows}
    assert set(by_pair) == {("a", "b"), ("a", "c"), ("b", "c")}  # d: one error, no test
    assert by_pair["a", "b"]["ks"] == 0.0 and by_pair["a", "b"]["p_value"] == 1.0
    assert by_pair["a", "c"]["ks"] == 1.0 and by_pair["a", "c"]["p_value"] < 1e-10
