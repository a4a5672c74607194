"""Design spaces of networks and the tools to judge them by their error distribution (Radosavovic et al.,
"Designing Network Design Spaces", 2020).

A design space is a distribution over networks. The AnyNet and RegNet spaces describe a 4-stage X-block network
(ResNeXt bottleneck blocks, torchvision's ``RegNet`` class) by per-stage depths ``d_i``, widths ``w_i``, bottleneck
ratios ``b_i`` and group widths ``g_i`` (:class:`detkit.backbones.regnet.RegNetStages`), built with
:func:`detkit.backbones.regnet.build_regnet`; the ``csp`` space a CSP network
(:class:`detkit.backbones.csp.CSPDesign`). A sample is one such network.

Spaces (:data:`SPACES`), with the paper's ranges:

- ``anynetx_a``: free per stage: ``d_i`` in 1..16, ``w_i`` in 8..1024 and divisible by 8, ``b_i`` in {1, 2, 4},
  ``g_i`` in {1, 2, ..., 32};
- ``anynetx_b``: a bottleneck ratio shared by the stages; ``anynetx_c``: and a shared group width;
- ``anynetx_d``: and non-decreasing widths; ``anynetx_e``: and non-decreasing depths;
- ``regnetx_full``: RegNet's six numbers: ``d`` < 64, ``w0`` < 256, 0 < ``wa`` < 256, 1.5 <= ``wm`` <= 3, ``b``
  and ``g`` as AnyNet; widths from the quantized linear rule (:func:`detkit.backbones.regnet.regnet_stages`);
- ``regnetx``: the refined RegNetX: ``b`` = 1, 12 <= ``d`` <= 28, ``wm`` >= 2;
- ``regnety``: ``regnetx`` with Squeeze-and-Excitation (ratio 0.25);
- ``csp``: a space of CPU-efficient networks (:mod:`detkit.backbones.csp`: plain 3x3 convolutions in
  cross-stage-partial stages, no grouped or depthwise convolution): per stage ``d_i`` in 1..6 and ``w_i`` in
  16..512 (divisible by 8, non-decreasing), a split ratio shared by the stages in {0.5, 1}, ``dense`` (every block's
  output merged, or only the last) and a stem width in {16, 32}.

Sampling: depths and group widths uniformly over their integers, widths, ``w0`` and ``wa`` log-uniformly (as
pycls' sweeps do), ``wm`` log-uniformly, bottleneck ratios uniformly over {1, 2, 4}; ordered spaces (D, E) by
rejection, so that every admissible network keeps its probability. A RegNet sample whose quantized widths do not
make exactly 4 stages is rejected (the paper's 4-stage constraint). A group width larger than a stage's
bottleneck width is shrunk to it (torchvision's rule). Budgets (:class:`Budget`) bound params, FLOPs and
activations (of the classifier network at ``input_size`` x ``input_size``, 224 as the paper counts them, or a
detection input size; :func:`complexity_of`, a formula per network form equal to counting the built network) and
optionally the paper's ``activations <= 6.5 sqrt(flops)`` and
``params <= 3.0 + 5.5 flops`` (millions, GF); samples outside are rejected.

Analysis: :func:`edf` (the error empirical distribution function), :func:`bootstrap_edf` (its pointwise
confidence band), :func:`fit_quantized_linear` (``e_fit`` of a network's per-block widths: how far they are from
any quantized linear rule; ~0 for a RegNet).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from detkit.backbones.csp import CSPDesign, csp_complexity
from detkit.backbones.regnet import RegNetStages, compatible_widths, regnet_stages
from detkit.errors import ConfigError

NUM_STAGES = 4
BOTTLENECKS = (1, 2, 4)
MAX_GROUP_WIDTH = 32
MAX_TRIES = 100_000  # draws per requested sample (AnyNetX_E keeps ~1 in 500 for its ordering alone)


@dataclass
class Budget:
    """Inclusive ranges on the complexity of a sample (None: unbounded); ``paper_constraints`` adds
    activations <= 6.5 sqrt(flops) and params <= 3.0 + 5.5 flops (params and activations in millions, flops in
    GF)."""

    flops: tuple[float | None, float | None] = (None, None)
    params: tuple[float | None, float | None] = (None, None)
    activations: tuple[float | None, float | None] = (None, None)
    paper_constraints: bool = False
    input_size: int = 224  # the side of the square input the complexity is counted at

    def admits(self, c: dict[str, int]) -> bool:
        for key, (lo, hi) in (("flops", self.flops), ("params", self.params), ("activations", self.activations)):
            if (lo is not None and c[key] < lo) or (hi is not None and c[key] > hi):
                return False
        if self.paper_constraints:
            gf, mp, ma = c["flops"] / 1e9, c["params"] / 1e6, c["activations"] / 1e6
            return ma <= 6.5 * math.sqrt(gf) and mp <= 3.0 + 5.5 * gf
        return True


@dataclass
class Sample:
    """One network of a space: its parameters (the space's own), stages and complexity."""

    space: str
    params: dict[str, Any]
    stages: RegNetStages | CSPDesign
    complexity: dict[str, int] = field(default_factory=dict)

    def block_widths(self) -> list[int]:
        return [w for w, d in zip(self.stages.widths, self.stages.depths) for _ in range(d)]

    def as_dict(self) -> dict[str, Any]:
        return {"space": self.space, "params": self.params, "stages": asdict(self.stages),
                "kind": kind_of(self.stages), "complexity": self.complexity}


KINDS: dict[str, type] = {"xblock": RegNetStages, "csp": CSPDesign}  # the network forms a space's samples take


def kind_of(stages: RegNetStages | CSPDesign) -> str:
    return next(k for k, cls in KINDS.items() if isinstance(stages, cls))


# ------------------------------------------------------------------------------------------------ sampling
def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _width(rng: np.random.Generator) -> int:
    """8..1024, divisible by 8, log-uniform."""
    return int(min(1024, max(8, round(_log_uniform(rng, 8, 1024) / 8) * 8)))


def _anynet(variant: str) -> Callable[[np.random.Generator], tuple[dict[str, Any], RegNetStages] | None]:
    def sample(rng: np.random.Generator):
        n = NUM_STAGES
        depths = [int(rng.integers(1, 17)) for _ in range(n)]
        widths = [_width(rng) for _ in range(n)]
        shared_b = variant in "bcde"
        shared_g = variant in "cde"
        b = [int(rng.choice(BOTTLENECKS))] * n if shared_b else [int(rng.choice(BOTTLENECKS)) for _ in range(n)]
        g = [int(rng.integers(1, MAX_GROUP_WIDTH + 1))] * n if shared_g else \
            [int(rng.integers(1, MAX_GROUP_WIDTH + 1)) for _ in range(n)]
        if variant in "de" and any(w2 < w1 for w1, w2 in zip(widths, widths[1:])):
            return None
        if variant == "e" and any(d2 < d1 for d1, d2 in zip(depths, depths[1:])):
            return None
        ratios = [1.0 / v for v in b]  # torchvision's bottleneck multiplier: inner width = w * multiplier
        widths_ok, groups = compatible_widths(widths, g, ratios)
        params = {"depths": depths, "widths": widths, "bottlenecks": b, "group_widths": g}
        return params, RegNetStages(depths, widths_ok, groups, ratios, 0.0)
    return sample


def _regnet(refined: bool, se_ratio: float) -> Callable[[np.random.Generator], tuple[dict, RegNetStages] | None]:
    def sample(rng: np.random.Generator):
        d = int(rng.integers(12, 29)) if refined else int(rng.integers(1, 64))
        w0 = int(round(_log_uniform(rng, 8, 256) / 8) * 8)
        wa = _log_uniform(rng, 1e-1, 256)
        wm = _log_uniform(rng, 2.0 if refined else 1.5, 3.0)
        b = 1 if refined else int(rng.choice(BOTTLENECKS))
        g = int(rng.integers(1, MAX_GROUP_WIDTH + 1))
        if not 8 <= w0 < 256:
            return None
        stages = regnet_stages(d, w0, wa, wm, g, 1.0 / b, se_ratio)
        if stages.num_stages != NUM_STAGES:
            return None
        return {"depth": d, "w0": w0, "wa": round(wa, 4), "wm": round(wm, 4), "bottleneck": b,
                "group_width": g}, stages
    return sample


def _csp(rng: np.random.Generator) -> tuple[dict[str, Any], CSPDesign] | None:
    depths = [int(rng.integers(1, 7)) for _ in range(NUM_STAGES)]
    widths = [int(min(512, max(16, round(_log_uniform(rng, 16, 512) / 8) * 8))) for _ in range(NUM_STAGES)]
    if any(w2 < w1 for w1, w2 in zip(widths, widths[1:])):
        return None
    ratio = float(rng.choice([0.5, 1.0]))
    dense = bool(rng.integers(0, 2))
    stem = int(rng.choice([16, 32]))
    params = {"depths": depths, "widths": widths, "split_ratio": ratio, "dense": dense, "stem_width": stem}
    return params, CSPDesign(depths, widths, [ratio] * NUM_STAGES, dense, stem)


SPACES: dict[str, Callable[[np.random.Generator], tuple[dict[str, Any], RegNetStages | CSPDesign] | None]] = {
    **{f"anynetx_{v}": _anynet(v) for v in "abcde"},
    "regnetx_full": _regnet(refined=False, se_ratio=0.0),
    "regnetx": _regnet(refined=True, se_ratio=0.0),
    "regnety": _regnet(refined=True, se_ratio=0.25),
    "csp": _csp,
}


def complexity_of(stages: RegNetStages | CSPDesign, input_size: int = 224, stem_width: int = 32,
                  num_classes: int = 1000) -> dict[str, int]:
    """Params, FLOPs (multiply-adds) and activations of the ImageNet classifier with these stages, by formula.
    A CSP network: :func:`detkit.backbones.csp.csp_complexity`.

    The same numbers as :func:`detkit.analysis.complexity.count_built` on :func:`~detkit.backbones.regnet.build_regnet`
    (a test checks they are equal), ~1000x faster, so sampling under a narrow budget costs little. Per X block
    (torchvision's ``ResBottleneckBlock``): 1x1 conv to the inner width ``w_b``, 3x3 group conv (stride 2 in a
    stage's first block), optional SE, 1x1 conv to the output width, and a 1x1 projection where the shape changes.
    """
    if isinstance(stages, CSPDesign):
        return csp_complexity(stages, input_size, num_classes)
    params = flops = acts = 0

    def conv(c_in: int, c_out: int, k: int, res: int, groups: int = 1, bn: bool = True, bias: bool = False) -> None:
        nonlocal params, flops, acts
        params += c_in // groups * c_out * k * k + (2 * c_out if bn else 0) + (c_out if bias else 0)
        flops += res * res * c_in // groups * c_out * k * k
        acts += res * res * c_out

    res = (input_size + 1) // 2
    conv(3, stem_width, 3, res)
    w_in = stem_width
    for depth, w, g, bm in zip(stages.depths, stages.widths, stages.group_widths, stages.bottleneck_ratios):
        for i in range(depth):
            r_in, res = res, (res + 1) // 2 if i == 0 else res
            w_b = int(round(w * bm))
            if w_in != w or i == 0:
                conv(w_in, w, 1, res)
            conv(w_in, w_b, 1, r_in)
            conv(w_b, w_b, 3, res, groups=w_b // g)
            if stages.se_ratio:
                squeeze = int(round(stages.se_ratio * w_in))
                conv(w_b, squeeze, 1, 1, bn=False, bias=True)
                conv(squeeze, w_b, 1, 1, bn=False, bias=True)
            conv(w_b, w, 1, res)
            w_in = w
    params += w_in * num_classes + num_classes
    flops += w_in * num_classes
    return {"params": params, "flops": flops, "activations": acts}


def sample_space(space: str, n: int, seed: int = 0, budget: Budget | None = None,
                 max_tries: int = MAX_TRIES) -> list[Sample]:
    """``n`` networks of ``space`` (see the module docstring), reproducible from ``seed``; at most ``max_tries``
    draws per sample."""
    if space not in SPACES:
        raise ConfigError(f"design space {space!r}: expected one of {', '.join(SPACES)}")
    if seed < 0:
        raise ConfigError(f"design space {space!r}: seed {seed} must be >= 0")
    rng = np.random.default_rng(seed)
    budget = budget or Budget()
    out: list[Sample] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > max_tries * n:
            raise ConfigError(f"design space {space!r}: only {len(out)} of {n} samples within the budget after "
                              f"{max_tries * n} draws; loosen the budget")
        drawn = SPACES[space](rng)
        if drawn is None:
            continue
        params, stages = drawn
        complexity = complexity_of(stages, budget.input_size)
        if not budget.admits(complexity):
            continue
        out.append(Sample(space, params, stages, complexity))
    return out


# ------------------------------------------------------------------------------------------------ analysis
def edf(errors: Sequence[float], grid: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The empirical distribution function of ``errors``: ``F(e)`` = fraction of errors <= e, at ``grid``
    (default: the sorted errors)."""
    e = np.sort(np.asarray(errors, dtype=float))
    if e.size == 0:
        raise ValueError("edf of no errors")
    x = e if grid is None else np.asarray(grid, dtype=float)
    return x, np.searchsorted(e, x, side="right") / e.size


def bootstrap_edf(errors: Sequence[float], grid: Sequence[float], n_boot: int = 1000, level: float = 0.95,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EDF at ``grid`` and its pointwise bootstrap band (``level``): (F, lower, upper), resampling the errors
    with replacement ``n_boot`` times."""
    e = np.asarray(errors, dtype=float)
    grid = np.asarray(grid, dtype=float)
    rng = np.random.default_rng(seed)
    resampled = np.sort(rng.choice(e, size=(n_boot, e.size), replace=True), axis=1)
    curves = np.stack([np.searchsorted(r, grid, side="right") for r in resampled]) / e.size
    alpha = (1 - level) / 2
    return edf(e, grid)[1], np.quantile(curves, alpha, axis=0), np.quantile(curves, 1 - alpha, axis=0)


def fit_quantized_linear(block_widths: Sequence[int], q: int = 8) -> tuple[float, dict[str, float]]:
    """``e_fit``: the smallest mean squared log-ratio between ``block_widths`` (one per block) and the widths of a
    quantized linear rule ``w0 * wm ** round(log((w0 + wa j) / w0) / log(wm))`` (rounded to ``q``) over a grid of
    (w0, wa, wm); returns (e_fit, the best parameters)."""
    w = np.asarray(block_widths, dtype=float)
    if w.size == 0 or (w <= 0).any():
        raise ValueError("block widths must be positive")
    j = np.arange(w.size, dtype=float)
    w0s = np.unique(np.clip(np.round(w[0] * np.linspace(0.5, 1.5, 21) / q) * q, q, None))
    was = np.concatenate([[0.0], np.geomspace(0.5, 512, 200)])
    wms = np.linspace(1.5, 3.5, 201)
    W0, WA, WM = np.meshgrid(w0s, was, wms, indexing="ij")
    W0, WA, WM = (a.reshape(-1, 1) for a in (W0, WA, WM))
    u = W0 + WA * j  # [grid, d]
    s = np.round(np.log(u / W0) / np.log(WM))
    fitted = np.maximum(q, np.round(W0 * WM**s / q) * q)
    err = np.mean((np.log(w) - np.log(fitted)) ** 2, axis=1)
    best = int(np.argmin(err))
    return float(err[best]), {"w0": float(W0[best, 0]), "wa": float(WA[best, 0]), "wm": float(WM[best, 0])}
