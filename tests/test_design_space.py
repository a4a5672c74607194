"""Design spaces: sampling respects each space's constraints and budgets; EDF, bootstrap and e_fit on known inputs."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import sweep
from detkit.analysis.design_space import (
    SPACES,
    Budget,
    bootstrap_edf,
    complexity_of,
    edf,
    fit_quantized_linear,
    sample_space,
)
from detkit.backbones.regnet import preset_stages, quantized_linear_widths
from detkit.errors import ConfigError


@pytest.mark.parametrize("space", [f"anynetx_{v}" for v in "abcde"])
def test_anynet_samples_keep_the_paper_ranges_and_their_variant(space):
    for s in sample_space(space, 8, seed=3):
        p = s.params
        assert len(p["depths"]) == len(p["widths"]) == 4 == s.stages.num_stages
        assert all(1 <= d <= 16 for d in p["depths"]) and s.stages.depths == p["depths"]
        assert all(8 <= w <= 1024 and w % 8 == 0 for w in p["widths"])
        assert all(b in (1, 2, 4) for b in p["bottlenecks"]) and all(1 <= g <= 32 for g in p["group_widths"])
        assert s.stages.bottleneck_ratios == [1 / b for b in p["bottlenecks"]]
        for w, b, g in zip(s.stages.widths, s.stages.bottleneck_ratios, s.stages.group_widths):
            assert round(w * b) % g == 0  # inner width a multiple of the group width
        if space != "anynetx_a":
            assert len(set(p["bottlenecks"])) == 1
        if space in ("anynetx_c", "anynetx_d", "anynetx_e"):
            assert len(set(p["group_widths"])) == 1
        if space in ("anynetx_d", "anynetx_e"):
            assert p["widths"] == sorted(p["widths"])
        if space == "anynetx_e":
            assert p["depths"] == sorted(p["depths"])


@pytest.mark.parametrize("space", ["regnetx_full", "regnetx", "regnety"])
def test_regnet_samples_are_4_stage_quantized_linear_networks(space):
    for s in sample_space(space, 8, seed=5):
        p = s.params
        assert s.stages.num_stages == 4 and sum(s.stages.depths) == p["depth"]
        assert 8 <= p["w0"] < 256 and 0 < p["wa"] < 256 and 1.5 <= p["wm"] <= 3 and 1 <= p["group_width"] <= 32
        if space != "regnetx_full":
            assert 12 <= p["depth"] <= 28 and p["wm"] >= 2 and p["bottleneck"] == 1
        assert s.stages.se_ratio == (0.25 if space == "regnety" else 0.0)
        # per-block widths follow the quantized linear rule (up to the group-width rounding of torchvision)
        rule = quantized_linear_widths(p["depth"], p["w0"], p["wa"], p["wm"])
        assert len(set(rule)) == 4
        slack = p["group_width"] * p["bottleneck"]  # inner widths rounded to a multiple of the group width
        assert all(abs(a - b) <= 0.1 * b + slack for a, b in zip(s.block_widths(), rule))


def test_sampling_is_reproducible_and_seeds_differ():
    a, b, c = (sample_space("anynetx_a", 4, seed=s) for s in (7, 7, 8))
    assert [x.params for x in a] == [x.params for x in b] != [x.params for x in c]


def test_budgets_bound_every_sample():
    budget = Budget(flops=(None, 300e6), params=(None, 4e6))
    for s in sample_space("regnetx", 5, seed=0, budget=budget):
        assert s.complexity["flops"] <= 300e6 and s.complexity["params"] <= 4e6
        assert s.complexity == complexity_of(s.stages)
    paper = Budget(paper_constraints=True)
    for s in sample_space("anynetx_c", 5, seed=1, budget=paper):
        gf, mp, ma = (s.complexity[k] / d for k, d in (("flops", 1e9), ("params", 1e6), ("activations", 1e6)))
        assert ma <= 6.5 * np.sqrt(gf) and mp <= 3.0 + 5.5 * gf


def test_an_impossible_budget_and_an_unknown_space_are_one_line_errors():
    with pytest.raises(ConfigError, match="only 0 of 1 samples within the budget after 20 draws"):
        sample_space("regnetx", 1, budget=Budget(flops=(None, 1.0)), max_tries=20)
    with pytest.raises(ConfigError, match="design space 'resnet'"):
        sample_space("resnet", 1)
    assert set(SPACES) >= {"regnetx", "regnety", "anynetx_a", "anynetx_e"}


def test_a_narrow_budget_in_a_strongly_rejecting_space_is_feasible():
    # AnyNetX_E keeps ~1 draw in 500 for its ordering alone; the draw limit is per sample, not per call
    samples = sample_space("anynetx_e", 4, seed=0, budget=Budget(flops=(360e6, 400e6)))
    assert all(360e6 <= s.complexity["flops"] <= 400e6 for s in samples)
    with pytest.raises(ConfigError, match="seed -1 must be >= 0"):
        sample_space("regnetx", 1, seed=-1)


def test_complexity_of_a_preset_is_the_published_one():
    c = complexity_of(preset_stages("regnet_x_400mf"))
    assert abs(c["flops"] / 1e6 - 400) < 20 and abs(c["params"] / 1e6 - 5.5) < 0.2


@pytest.mark.parametrize("space", sweep(sorted(s for s in SPACES if s != "csp"), fast=["regnetx"]))
def test_complexity_formula_equals_counting_the_built_network(space):  # csp's formula: tests/test_csp.py
    from detkit.analysis.complexity import count_built
    from detkit.backbones.regnet import build_regnet

    stages = [s.stages for s in sample_space(space, 3, seed=11)]
    stages += [preset_stages(p) for p in ("regnet_x_400mf", "regnet_y_400mf", "regnet_y_1_6gf")]
    for st in stages:
        assert complexity_of(st) == count_built(lambda: build_regnet(st), 224).as_dict()
    assert complexity_of(stages[0], 96) == count_built(lambda: build_regnet(stages[0]), 96).as_dict()


def test_edf_on_known_errors():
    x, f = edf([0.3, 0.1, 0.2, 0.2])
    np.testing.assert_allclose(x, [0.1, 0.2, 0.2, 0.3])
    np.testing.assert_allclose(f, [0.25, 0.75, 0.75, 1.0])
    _, f = edf([0.3, 0.1, 0.2, 0.2], grid=[0.0, 0.15, 0.2, 1.0])
    np.testing.assert_allclose(f, [0.0, 0.25, 0.75, 1.0])


def test_bootstrap_band_contains_the_edf_and_narrows_with_more_samples():
    rng = np.random.default_rng(0)
    grid = np.linspace(0, 1, 21)
    widths = []
    for n in (20, 500):
        errors = rng.uniform(0, 1, n)
        f, lo, hi = bootstrap_edf(errors, grid, n_boot=300, seed=1)
        assert (lo <= f + 1e-12).all() and (f <= hi + 1e-12).all()
        assert (lo >= 0).all() and (hi <= 1).all()
        widths.append(float(np.mean(hi - lo)))
    assert widths[1] < widths[0] / 3  # ~1/sqrt(n): 500 samples give a band ~5x narrower than 20
    same = np.full(10, 0.4)  # no spread: the band is the EDF itself
    f, lo, hi = bootstrap_edf(same, grid, n_boot=50)
    np.testing.assert_array_equal(lo, f)
    np.testing.assert_array_equal(hi, f)


def test_e_fit_is_about_zero_for_regnets_and_not_for_random_anynets():
    # the quantized linear rule itself fits exactly
    assert fit_quantized_linear(quantized_linear_widths(22, 24, 24.48, 2.54))[0] < 1e-3
    stages = [preset_stages(n) for n in ("regnet_x_400mf", "regnet_x_1_6gf", "regnet_y_800mf")]
    presets = [fit_quantized_linear([w for w, d in zip(s.widths, s.depths) for _ in range(d)])[0] for s in stages]
    anynets = [fit_quantized_linear(s.block_widths())[0] for s in sample_space("anynetx_a", 4, seed=0)]
    assert max(presets) < 0.01
    assert np.median(anynets) > 0.1 and min(anynets) > max(presets)
