"""``detkit design-space``: the RegNet paper's population method on a detection or segmentation task.

For each design space (:data:`detkit.analysis.design_space.SPACES`), ``n`` networks are drawn under a complexity
budget (reproducibly from ``seed``), and each is trained on the task from scratch as an ``anynet`` backbone (its
exact stages) with the task's schedule: a :mod:`study <detkit.analysis.study>`, so it resumes and one failing
sample is recorded without stopping the others. Error = 1 - the task's main metric.

Layout of ``OUT``::

    OUT/<space>/settings.json      the space's settings (a larger n later extends the same study)
    OUT/<space>/samples.json       the drawn networks (params, stages, ImageNet complexity at 224)
    OUT/<space>/trials/sNNN/       one run directory per sample, with result.json
    OUT/<space>/results.{csv,md}   every sample: its parameters, complexity, e_fit, error
    OUT/<space>/scatter.png        error vs each parameter
    OUT/summary.{csv,md}, OUT/edf.png   every space in OUT: error EDFs side by side with bootstrap bands
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from detkit.analysis.design_space import (
    KINDS,
    SPACES,
    Budget,
    Sample,
    bootstrap_edf,
    fit_quantized_linear,
    sample_space,
)
from detkit.analysis.study import (
    Trial,
    check_settings,
    human,
    measure_model,
    run_trials,
    task_settings,
    write_json,
    write_table,
)
from detkit.errors import ConfigError
from detkit.utils.lock import FolderLock

log = logging.getLogger(__name__)
ANYNET_COLUMNS = [f"{p}{i}" for p in "dwbg" for i in range(1, 5)]
REGNET_COLUMNS = ["depth", "w0", "wa", "wm", "bottleneck", "group_width"]
CSP_COLUMNS = [*(f"{p}{i}" for p in "dw" for i in range(1, 5)), "split_ratio", "dense", "stem_width"]
LOG_X = {"w1", "w2", "w3", "w4", "w0", "wa", "imagenet_flops", "imagenet_params"}


def sample_overrides(sample: Sample) -> list[str]:
    """The task overrides that make the sample the backbone: ``anynet`` with its exact stages (``cspnet`` with its
    design), from scratch."""
    st = sample.stages
    if isinstance(st, KINDS["csp"]):
        design = [f"model.backbone.kwargs.{k}={json.dumps(v).replace(' ', '')}" for k, v in st.as_dict().items()]
        return ["model.backbone.name=cspnet", *design, "model.backbone.pretrained=null"]
    return ["model.backbone.name=anynet", f"model.backbone.anynet.depths={st.depths}",
            f"model.backbone.anynet.widths={st.widths}", f"model.backbone.anynet.group_widths={st.group_widths}",
            f"model.backbone.anynet.bottleneck_ratios={st.bottleneck_ratios}",
            f"model.backbone.anynet.se_ratio={st.se_ratio}", "model.backbone.pretrained=null"]


def flat_params(sample: Sample) -> dict[str, Any]:
    """The sample's parameters as report columns. AnyNet: ``d1..d4``, ``b1..b4`` and the widths ``w1..w4`` and group
    widths ``g1..g4`` of the network as built (torchvision rounds a stage's inner width to a multiple of its group
    width, and shrinks a group wider than the stage); RegNet: its six numbers."""
    p = sample.params
    if isinstance(sample.stages, KINDS["csp"]):
        st = sample.stages
        return {**{f"d{i + 1}": d for i, d in enumerate(st.depths)},
                **{f"w{i + 1}": w for i, w in enumerate(st.widths)},
                **{k: p[k] for k in ("split_ratio", "dense", "stem_width")}}
    if "depths" in p:
        st = sample.stages
        columns = {"d": st.depths, "w": st.widths, "b": p["bottlenecks"], "g": st.group_widths}
        return {f"{k}{i + 1}": values[i] for k, values in columns.items() for i in range(len(values))}
    return dict(p)


def read_samples(path: Path) -> list[Sample]:
    try:
        return [Sample(d["space"], d["params"], KINDS[d.get("kind", "xblock")](**d["stages"]), d["complexity"])
                for d in json.loads(path.read_text())]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not a samples file detkit wrote ({type(e).__name__}: {e}); remove it to draw "
                          f"again") from None


def load_samples(out: Path, space: str, n: int, seed: int, budget: Budget) -> list[Sample]:
    """``n`` samples: the ones saved with the study first (so a resumed study trains the same networks), drawn only
    when more are needed (the draw is reproducible, so the first ones repeat)."""
    path = out / "samples.json"
    saved = read_samples(path) if path.is_file() and (out / "settings.json").is_file() else []
    if len(saved) >= n:
        return saved[:n]
    log.info("%s: drawing %d samples (seed %d)", space, n, seed)
    drawn = sample_space(space, n, seed=seed, budget=budget)
    if any(a.params != b.params for a, b in zip(saved, drawn)):
        log.warning("%s: the samples drawn differ from %s; keeping the %d saved ones", space, path, len(saved))
    return saved + drawn[len(saved):]


def sample_info(space: str, index: int, sample: Sample) -> dict[str, Any]:
    c = sample.complexity
    return {"space": space, "sample": index, **flat_params(sample),
            "imagenet_flops": c.get("flops"), "imagenet_params": c.get("params"),
            "imagenet_activations": c.get("activations"),
            "e_fit": round(fit_quantized_linear(sample.block_widths())[0], 5)}


def run_design_space(spaces: Sequence[str], n: int, task: str | Path, *, out: str | Path,
                     overrides: Sequence[str] = (), budget: Budget | None = None, seed: int = 0,
                     retry_failed: bool = False) -> list[dict[str, Any]]:
    """Sample, train and report (see the module docstring); returns the summary rows (one per space in ``out``)."""
    out = Path(out)
    budget = budget or Budget()
    unknown = [s for s in spaces if s not in SPACES]
    if unknown or not spaces:
        raise ConfigError(f"design space {', '.join(map(repr, unknown)) or '(none)'}: expected one or more of "
                          f"{', '.join(SPACES)}")
    if n < 1:
        raise ConfigError(f"--n {n}: need at least one sample")
    base = task_settings(task, overrides)  # a bad task or override is one line now, not a failure per sample
    with FolderLock(out, "design-space study"):
        return _run_spaces(spaces, n, task, out, overrides, budget, seed, retry_failed, base)


def _run_spaces(spaces, n, task, out, overrides, budget, seed, retry_failed, base) -> list[dict[str, Any]]:
    plans = []
    for space in spaces:  # draw every space first: an impossible budget fails before anything trains
        sdir = out / space
        counted_at = asdict(budget)
        if counted_at["input_size"] == 224:  # ImageNet's: the studies written before budgets had a size
            del counted_at["input_size"]
        settings = {"space": space, "n": n, "seed": seed, "budget": counted_at, **base}
        check_settings(sdir, settings, grow=("n",), write=False)
        plans.append((sdir, settings, load_samples(sdir, space, n, seed, budget)))
    for sdir, settings, samples in plans:
        check_settings(sdir, settings, grow=("n",))
        write_json([s.as_dict() for s in samples], sdir / "samples.json")
        trials = [Trial(f"trials/s{i:03d}", sample_overrides(s), sample_info(settings["space"], i, s))
                  for i, s in enumerate(samples)]
        run_trials(task, overrides, trials, sdir, retry_failed=retry_failed,
                   measure=lambda run_dir, cfg: measure_model(run_dir, cfg, latency=False))
    return write_report(out)


def space_results(sdir: Path) -> tuple[list[dict[str, Any]], int]:
    """The results of the study's first ``n`` samples (parameter columns from ``samples.json``, as
    :func:`flat_params` reports them) and how many of them have no result yet."""
    n = json.loads((sdir / "settings.json").read_text()).get("n", 0)
    samples = read_samples(sdir / "samples.json") if (sdir / "samples.json").is_file() else []
    records = []
    for i in range(n):
        path = sdir / "trials" / f"s{i:03d}" / "result.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        if i < len(samples):
            r.update(flat_params(samples[i]))
        r["error"] = round(1.0 - r["value"], 5) if r.get("status") == "done" else None
        records.append(r)
    return records, n - len(records)


def write_report(out: Path, n_boot: int = 1000, level: float = 0.95) -> list[dict[str, Any]]:
    """Per-space results and scatter plots, and the summary and EDF plot of every space found in ``out``."""
    from detkit.analysis.study_plots import plot_edfs, plot_scatter

    summary, curves = [], {}
    for sdir in sorted(p.parent for p in out.glob("*/settings.json")):
        space = sdir.name
        records, pending = space_results(sdir)
        params = ANYNET_COLUMNS if space.startswith("anynet") else CSP_COLUMNS if space == "csp" else REGNET_COLUMNS
        columns = ["sample", "status", "error", *params, "imagenet_flops", "imagenet_params",
                   "imagenet_activations", "backbone_flops", "e_fit", "train_s", "failure"]
        fmt = {c: human for c in ("imagenet_flops", "imagenet_params", "imagenet_activations", "backbone_flops")}
        write_table(records, columns, sdir / "results", fmt)
        done = [r for r in records if r["error"] is not None]
        row: dict[str, Any] = {"space": space, "samples": len(records) + pending, "done": len(done),
                               "failed": len(records) - len(done), "pending": pending}
        if done:
            errors = np.array([r["error"] for r in done])
            best = done[int(np.argmin(errors))]
            row.update(min_error=round(float(errors.min()), 4), median_error=round(float(np.median(errors)), 4),
                       mean_error=round(float(errors.mean()), 4), best_sample=best["trial"],
                       median_e_fit=round(float(np.median([r["e_fit"] for r in done])), 4),
                       median_imagenet_flops=float(np.median([r["imagenet_flops"] for r in done])))
            plot_scatter(done, [*params, "imagenet_flops", "e_fit"], f"{space}: error vs parameters "
                         f"({len(done)} samples)", sdir / "scatter.png", log_x=LOG_X)
            grid = np.linspace(0.0, 1.0, 4001)
            grid = np.union1d(grid, errors)
            F, lo, hi = bootstrap_edf(errors, grid, n_boot=n_boot, level=level)
            curves[space] = {"grid": grid, "F": F, "lo": lo, "hi": hi, "errors": errors}
        summary.append(row)
    if not summary:
        raise ConfigError(f"{out}: no design-space study here (no <space>/settings.json)")
    columns = ["space", "samples", "done", "failed", "pending", "min_error", "median_error", "mean_error",
               "best_sample", "median_e_fit", "median_imagenet_flops"]
    write_table(summary, columns, out / "summary", {"median_imagenet_flops": human})
    if curves:
        plot_edfs(curves, out / "edf.png", level=level)
    pairs = ks_tests({space: c["errors"] for space, c in curves.items()})
    if pairs:
        write_table(pairs, ["space_a", "space_b", "n_a", "n_b", "ks", "p_value"], out / "ks")
        for row in summary:
            row["ks"] = [p for p in pairs if row["space"] in (p["space_a"], p["space_b"])]
    return summary


def ks_tests(errors: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """The two-sample Kolmogorov-Smirnov test between every two spaces' errors: the statistic (the largest gap
    between their EDFs) and its p-value (how likely a gap this large is when both come from one distribution)."""
    from scipy.stats import ks_2samp

    names = [s for s in errors if len(errors[s]) >= 2]
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            test = ks_2samp(errors[a], errors[b])
            rows.append({"space_a": a, "space_b": b, "n_a": len(errors[a]), "n_b": len(errors[b]),
                         "ks": round(float(test.statistic), 4), "p_value": float(f"{test.pvalue:.4g}")})
    return rows


def confirmation_picks(errors: Sequence[tuple[int, float]], k: int, best: int) -> list[int]:
    """``k`` sample indices of ``(index, short error)`` pairs: the ``best`` lowest errors, then the rest spread
    evenly over the remaining ranks (so that a rank correlation sees the whole range, not only the top)."""
    ranked = [i for i, _ in sorted(errors, key=lambda e: (e[1], e[0]))]
    k = min(k, len(ranked))
    top, rest = ranked[:min(best, k)], ranked[min(best, k):]
    more = k - len(top)
    if more and rest:
        spots = np.linspace(0, len(rest) - 1, more).round().astype(int)
        top += [rest[j] for j in dict.fromkeys(spots.tolist())]
    return top


def confirm_design_space(out: str | Path, spaces: Sequence[str], k: int, long_overrides: Sequence[str],
                         best: int = 3, retry_failed: bool = False) -> dict[str, Any]:
    """Train ``k`` samples of each study in ``out`` again with ``long_overrides`` added to its task (e.g.
    ``train.budget=10min``): the ``best`` best and the others spread over the error ranks, into
    ``OUT/<space>/confirm/sNNN``. Then the Spearman rank correlation between the study's (short) errors and these
    (long) ones, over every confirmed sample and per space, in ``OUT/confirm.{csv,md}``: whether the short budget
    ranks networks as the long one does."""
    from scipy.stats import spearmanr

    out = Path(out)
    if k < 2:
        raise ConfigError(f"--confirm {k}: a rank correlation needs at least 2 networks")
    pairs: list[dict[str, Any]] = []
    with FolderLock(out, "design-space study"):
        for space in spaces:
            sdir = out / space
            if not (sdir / "settings.json").is_file():
                raise ConfigError(f"{sdir}: no design-space study of {space!r} here (no settings.json)")
            settings = json.loads((sdir / "settings.json").read_text())
            records, _ = space_results(sdir)
            done = [(int(Path(r["trial"]).name[1:]), r["error"]) for r in records if r["error"] is not None]
            if len(done) < 2:
                raise ConfigError(f"{sdir}: {len(done)} finished sample(s); confirm needs at least 2")
            samples = read_samples(sdir / "samples.json")
            picks = confirmation_picks(done, k, best)
            short = dict(done)
            trials = [Trial(f"confirm/s{i:03d}", [*sample_overrides(samples[i]), *long_overrides],
                            {**sample_info(space, i, samples[i]), "short_error": short[i]}) for i in picks]
            overrides = list(settings.get("overrides", []))
            check_settings(sdir / "confirm", {"long_overrides": list(long_overrides), "task": settings["task"],
                                              "overrides": overrides}, grow=())
            results = run_trials(settings["task"], overrides, trials, sdir, retry_failed=retry_failed,
                                 measure=lambda run_dir, cfg: measure_model(run_dir, cfg, latency=False))
            for trial, r in zip(trials, results):
                long_error = round(1.0 - r["value"], 5) if r.get("status") == "done" else None
                pairs.append({"space": space, "sample": trial.name.rsplit("/", 1)[1],
                              "short_error": trial.info["short_error"], "long_error": long_error})
    write_table(pairs, ["space", "sample", "short_error", "long_error"], out / "confirm")
    summary: dict[str, Any] = {"pairs": pairs}
    for name, rows in [("all", pairs), *((sp, [p for p in pairs if p["space"] == sp]) for sp in spaces)]:
        usable = [p for p in rows if p["long_error"] is not None]
        if len(usable) >= 2:
            rho, pvalue = spearmanr([p["short_error"] for p in usable], [p["long_error"] for p in usable])
            summary[name] = {"n": len(usable), "spearman": round(float(rho), 4), "p_value": float(f"{pvalue:.4g}")}
    write_json(summary, out / "confirm.json")
    return summary


def format_summary(rows: Sequence[dict[str, Any]], out: Path) -> str:
    lines = [f"design-space study: {out / 'summary.md'}, {out / 'edf.png'} (per space: results.md, scatter.png)"]
    for r in rows:
        counts = f"{r['done']}/{r['samples']} done" + (f", {r['failed']} failed" if r["failed"] else "") + \
            (f", {r['pending']} pending" if r["pending"] else "")
        if r.get("min_error") is None:
            lines.append(f"  {r['space']:<13} {counts}")
            continue
        lines.append(f"  {r['space']:<13} {counts}; error min {r['min_error']:.4f} median "
                     f"{r['median_error']:.4f} mean {r['mean_error']:.4f}; median e_fit {r['median_e_fit']:.4f}; "
                     f"best {r['best_sample']}")
    pairs = {(p["space_a"], p["space_b"]): p for r in rows for p in r.get("ks", [])}
    for p in pairs.values():
        lines.append(f"  KS {p['space_a']} vs {p['space_b']}: D = {p['ks']:.3f}, p = {p['p_value']:.3g} "
                     f"(n = {p['n_a']}, {p['n_b']})")
    return "\n".join(lines)


def parse_widths(text: str) -> list[int]:
    """Per-block widths for ``--fit``: a RegNet preset name, ``DxW,...`` stages (e.g. ``1x32,2x64,7x160,12x400``)
    or one width per block (``32,64,64,...``)."""
    from detkit.backbones.regnet import PRESETS, preset_stages

    text = text.strip()
    if text in PRESETS:
        st = preset_stages(text)
        return [w for w, d in zip(st.widths, st.depths) for _ in range(d)]
    widths: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",") if p.strip()):
            d, sep, w = part.partition("x")
            widths += [int(w)] * int(d) if sep else [int(d)]
    except ValueError:
        raise ConfigError(f"--fit {text!r}: expected a RegNet preset name ({', '.join(list(PRESETS)[:2])}, ...), "
                          f"stages DEPTHxWIDTH,... or widths W,W,...") from None
    if not widths or min(widths) <= 0:
        raise ConfigError(f"--fit {text!r}: widths must be positive integers")
    return widths
