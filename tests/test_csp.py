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


def fake_trials(errors):
    """A study's run_trials that trains nothing: each trial's result has the error ``errors(name, overrides)``."""
    from detkit.analysis import study

    def run(task, overrides, trials, out, **kw):
        results = []
        for t in trials:
            r = {"trial": t.name, **t.info, "status": "done", "value": 1.0 - errors(t.name, [*overrides, *t.overrides])}
            study.write_json(r, out / t.name / "result.json")
            results.append(r)
        return results
    return run


def test_a_csp_study_reports_its_design_columns_and_the_ks_test_between_spaces(tmp_path, monkeypatch):
    from detkit.analysis import design_study
    from detkit.analysis.design_study import run_design_space

    # csp errors low, anynet errors high: the KS test between them says so
    monkeypatch.setattr(design_study, "run_trials", fake_trials(
        lambda name, ov: (0.2 if "model.backbone.name=cspnet" in ov else 0.6) + int(name[-3:]) / 100))
    budget = Budget(flops=(None, 800e6), input_size=320)
    rows = run_design_space(["csp", "anynetx_a"], 6, "configs/yolo_af/shapes.yaml", out=tmp_path, budget=budget)
    by_space = {r["space"]: r for r in rows}
    assert by_space["csp"]["done"] == 6 and by_space["csp"]["min_error"] == pytest.approx(0.2)
    (ks,) = by_space["csp"]["ks"]
    assert ks["ks"] == 1.0 and ks["p_value"] < 0.01 and {ks["space_a"], ks["space_b"]} == {"csp", "anynetx_a"}
    assert (tmp_path / "ks.md").is_file()
    header = (tmp_path / "csp" / "results.csv").read_text().splitlines()[0].split(",")
    assert {"d1", "w4", "split_ratio", "dense", "stem_width"} <= set(header)
    settings = json.loads((tmp_path / "csp" / "settings.json").read_text())
    assert settings["budget"]["input_size"] == 320


def test_confirm_retrains_the_best_and_a_spread_and_reports_the_rank_correlation(tmp_path, monkeypatch):
    from detkit.analysis import design_study
    from detkit.analysis.design_study import confirm_design_space, confirmation_picks, run_design_space

    assert confirmation_picks([(i, e) for i, e in enumerate([0.5, 0.1, 0.9, 0.3, 0.7, 0.2])], 4, 2) == [1, 5, 3, 2]
    assert confirmation_picks([(0, 0.4), (1, 0.2)], 5, 3) == [1, 0]

    def errors(name, ov):  # short: the sample's rank; long (train.epochs=9): the same order, except two swapped
        i = int(name[-3:])
        if "train.epochs=9" not in ov:
            return 0.1 + i / 100
        return 0.05 + {2: 4, 4: 2}.get(i, i) / 100

    monkeypatch.setattr(design_study, "run_trials", fake_trials(errors))
    run_design_space(["csp"], 8, "configs/yolo_af/shapes.yaml", out=tmp_path, budget=Budget(input_size=320))
    summary = confirm_design_space(tmp_path, ["csp"], 5, ["train.epochs=9"], best=2)
    picked = [p["sample"] for p in summary["pairs"]]
    assert picked == ["s000", "s001", "s002", "s004", "s007"]  # the 2 best, then ranks 0, 2.5, 5 of the other 6
    # the long errors swap s002 and s004: one adjacent swap among 5 ranks, rho = 1 - 6 * 2 / (5 * 24)
    assert summary["all"]["spearman"] == pytest.approx(0.9) == summary["csp"]["spearman"]
    assert (tmp_path / "confirm.md").is_file() and (tmp_path / "csp" / "confirm" / "settings.json").is_file()
    with pytest.raises(ConfigError, match="needs at least 2"):
        confirm_design_space(tmp_path, ["csp"], 1, ["train.epochs=9"])
    with pytest.raises(ConfigError, match="no design-space study of 'regnetx'"):
        confirm_design_space(tmp_path, ["regnetx"], 3, ["train.epochs=9"])
