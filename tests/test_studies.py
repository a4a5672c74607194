"""Studies: `detkit design-space` and `detkit transfer` run end to end on a tiny task, resume, survive failures,
and report what their runs measured."""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import QUIET_TRAINER, ROOT, shapes_data_overrides
from detkit.analysis import design_study, study
from detkit.analysis.design_space import Budget, sample_space
from detkit.analysis.design_study import parse_widths, run_design_space, sample_overrides
from detkit.analysis.study import mean_std
from detkit.analysis.transfer import run_transfer, variants
from detkit.backbones import build_backbone, build_classifier
from detkit.backbones.regnet import build_regnet, preset_stages
from detkit.cli import budget_range, main
from detkit.config import load_config
from detkit.engine import run as engine_run
from detkit.errors import ConfigError

YOLO_SHAPES = ROOT / "configs" / "yolo" / "shapes.yaml"


def tiny_task(root: Path) -> list[str]:
    """Overrides of configs/yolo/shapes.yaml: a few steps at 64 px on the session's small shapes set."""
    return [*shapes_data_overrides(root), "model.neck.out_channels=16", "train.epochs=1", "train.warmup_iters=1",
            "trainer.limit_train_batches=2", "trainer.limit_val_batches=2", *QUIET_TRAINER]


def results(folder: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(folder.glob("trials/*/result.json"))}


# ------------------------------------------------------------------------------------------ anynet backbone
def test_anynet_backbone_builds_the_stages_it_is_given():
    st = preset_stages("regnet_y_400mf")
    cfg = {"name": "anynet", "anynet": {"depths": st.depths, "widths": st.widths, "group_widths": st.group_widths,
                                        "bottleneck_ratios": st.bottleneck_ratios, "se_ratio": st.se_ratio}}
    ours, ref = build_classifier(cfg), build_regnet(st)
    assert [tuple(p.shape) for p in ours.parameters()] == [tuple(p.shape) for p in ref.parameters()]
    assert build_backbone(cfg).out_channels == {f"c{i + 2}": w for i, w in enumerate(st.widths)}


@pytest.mark.parametrize("anynet, message", [
    ({"depths": [1, 2]}, "one value per stage"),
    ({"widths": [32, 64, 160, 404]}, "stage 4: inner width 404"),
    ({"depths": [1, 0, 3, 4]}, "depths = [1, 0, 3, 4]"),
])
def test_anynet_backbone_rejects_bad_stages_in_one_line(anynet, message):
    with pytest.raises(ConfigError, match="model.backbone.anynet") as e:
        build_backbone({"name": "anynet", "anynet": anynet})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_sample_becomes_the_same_network_through_the_task_config(shapes_dir):
    sample = sample_space("anynetx_a", 1, seed=5, budget=Budget(flops=(None, 600e6)))[0]
    cfg = load_config(YOLO_SHAPES, [*tiny_task(shapes_dir), *sample_overrides(sample)])
    net = build_classifier(cfg.model.backbone)
    assert sum(p.numel() for p in net.parameters()) == sample.complexity["params"]


@pytest.mark.slow
# -------------------------------------------------------------------------------------------- design space
def test_design_space_study_runs_resumes_and_survives_a_failing_sample(shapes_dir, tmp_path, monkeypatch):
    out = tmp_path / "ds"
    budget = Budget(flops=(None, 250e6))
    calls = []
    real_train = engine_run.train  # a study imports train at each trial: patching the engine's reaches it

    def flaky_train(cfg, *args, **kwargs):
        calls.append(cfg.output_dir)
        if cfg.output_dir.endswith("s001"):
            raise RuntimeError("out of memory (simulated)")
        return real_train(cfg, *args, **kwargs)

    monkeypatch.setattr(engine_run, "train", flaky_train)
    rows = run_design_space(["regnetx"], 3, YOLO_SHAPES, out=out, overrides=tiny_task(shapes_dir), budget=budget)
    assert len(rows) == 1 and rows[0]["done"] == 2 and rows[0]["failed"] == 1
    found = results(out / "regnetx")
    assert [r["status"] for r in found.values()] == ["done", "failed", "done"]
    assert found["s001"]["failure"] == "RuntimeError: out of memory (simulated)"
    assert (out / "regnetx" / "trials" / "s001" / "error.txt").read_text().count("Traceback") == 1
    for name in ("s000", "s002"):
        r = found[name]
        metrics = json.loads((out / "regnetx" / "trials" / name / "metrics.json").read_text())
        assert r["value"] == metrics["bbox_AP"] and r["imagenet_flops"] <= 250e6 and r["e_fit"] < 0.05
        assert r["backbone_flops"] < r["model_flops"]
    samples = json.loads((out / "regnetx" / "samples.json").read_text())
    assert [s["params"] for s in samples] == [s.params for s in sample_space("regnetx", 3, seed=0, budget=budget)]
    with open(out / "regnetx" / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [row["status"] for row in table] == ["done", "failed", "done"]
    assert float(table[0]["error"]) == pytest.approx(1 - found["s000"]["value"], abs=1e-5)
    for png in ("edf.png", "regnetx/scatter.png"):
        assert (out / png).stat().st_size > 10_000

    # run again: nothing is retrained; a failed sample is retried only when asked
    calls.clear()
    before = {n: (out / "regnetx" / "trials" / n / "result.json").stat().st_mtime_ns for n in found}
    run_design_space(["regnetx"], 3, YOLO_SHAPES, out=out, overrides=tiny_task(shapes_dir), budget=budget)
    assert calls == []
    assert before == {n: (out / "regnetx" / "trials" / n / "result.json").stat().st_mtime_ns for n in found}
    monkeypatch.setattr(engine_run, "train", real_train)
    rows = run_design_space(["regnetx"], 3, YOLO_SHAPES, out=out, overrides=tiny_task(shapes_dir), budget=budget,
                            retry_failed=True)
    assert rows[0]["done"] == 3 and results(out / "regnetx")["s001"]["status"] == "done"


class Interrupt(L.Callback):
    """At the start of the second epoch (after epoch 1's last.ckpt): Ctrl-C, or SIGTERM to the process group (here:
    to this process, then the error a data loader worker killed by the same signal causes)."""

    def __init__(self, how: str) -> None:
        self.how = how

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 1:
            if self.how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
                raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated")
            raise KeyboardInterrupt


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_an_interrupted_sample_resumes_from_its_last_checkpoint(shapes_dir, tmp_path, monkeypatch, how):
    calls = []
    real_train = engine_run.train

    def train(cfg, resume=None, callbacks=None):
        calls.append(resume)
        return real_train(cfg, resume=resume, callbacks=[Interrupt(how)] if len(calls) == 1 else None)

    monkeypatch.setattr(engine_run, "train", train)
    kwargs = dict(out=tmp_path, overrides=[*tiny_task(shapes_dir), "train.epochs=2"],
                  budget=Budget(flops=(None, 250e6)))
    try:
        # Lightning turns a Ctrl-C raised inside a step into SystemExit; a SIGTERM stops after the step
        # (KeyboardInterrupt from detkit's engine): either way the study stops, the trial unrecorded
        with pytest.raises((SystemExit, KeyboardInterrupt)):
            run_design_space(["regnetx"], 1, YOLO_SHAPES, **kwargs)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores further Ctrl-C
    trial = tmp_path / "regnetx" / "trials" / "s000"
    last = trial / "checkpoints" / "last.ckpt"
    assert not (trial / "result.json").exists()
    assert torch.load(last, weights_only=False)["global_step"] == 2  # epoch 0 of 2 batches
    first_attempt = json.loads((trial / "attempts.json").read_text())
    assert len(first_attempt) == 1

    rows = run_design_space(["regnetx"], 1, YOLO_SHAPES, **kwargs)
    assert calls == [None, last]
    r = results(tmp_path / "regnetx")["s000"]
    assert r["status"] == "done" and r["resumed"] is True and rows[0]["done"] == 1
    assert torch.load(last, weights_only=False)["global_step"] == 4  # the second epoch, not a restart
    assert r["train_s"] > first_attempt[0]


@pytest.mark.slow
def test_a_study_folder_refuses_other_settings_but_grows_with_n(shapes_dir, tmp_path, monkeypatch, write_yaml):
    drawn = []
    monkeypatch.setattr(design_study, "run_trials", lambda task, overrides, trials, out, **kw: drawn.append(
        [t.name for t in trials]))
    monkeypatch.setattr(design_study, "write_report", lambda out: [])
    task = write_yaml("task.yaml", f"_base_: [{YOLO_SHAPES}]\ntrain: {{lr: 0.002}}\n")
    kwargs = dict(out=tmp_path / "ds", overrides=tiny_task(shapes_dir))
    # an impossible budget fails before any settings are recorded, so a looser one is then accepted
    with pytest.raises(ConfigError, match="only 0 of 2 samples within the budget"):
        run_design_space(["regnetx"], 2, task, budget=Budget(flops=(None, 1e3)), **kwargs)
    assert not (tmp_path / "ds" / "regnetx" / "settings.json").exists()
    budget = Budget(flops=(None, 250e6))
    run_design_space(["regnetx"], 2, task, budget=budget, **kwargs)
    with pytest.raises(ConfigError, match=r"settings.json: this study was run with seed = 0, not 1"):
        run_design_space(["regnetx"], 2, task, seed=1, budget=budget, **kwargs)
    task.write_text(f"_base_: [{YOLO_SHAPES}]\ntrain: {{lr: 0.004}}\n")  # the config file was edited
    with pytest.raises(ConfigError, match=r"this study was run with config_sha1 = "):
        run_design_space(["regnetx"], 2, task, budget=budget, **kwargs)
    task.write_text(f"_base_: [{YOLO_SHAPES}]\ntrain: {{lr: 0.002}}\n")
    run_design_space(["regnetx"], 4, task, budget=budget, **kwargs)
    assert drawn[-1] == [f"trials/s{i:03d}" for i in range(4)]
    saved = json.loads((tmp_path / "ds" / "regnetx" / "samples.json").read_text())
    assert [s["params"] for s in saved] == [s.params for s in sample_space("regnetx", 4, seed=0, budget=budget)]


def test_anynet_results_report_the_widths_and_groups_as_built(shapes_dir, tmp_path, monkeypatch):
    def fake_trials(task, overrides, trials, out, **kw):  # record a result without training
        for t in trials:
            study.write_json({"trial": t.name, **t.info, "status": "done", "value": 0.25}, out / t.name / "result.json")

    monkeypatch.setattr(design_study, "run_trials", fake_trials)
    rows = run_design_space(["anynetx_a"], 3, YOLO_SHAPES, out=tmp_path, overrides=tiny_task(shapes_dir),
                            budget=Budget(flops=(None, 600e6)))
    assert rows[0]["done"] == 3 and rows[0]["min_error"] == 0.75
    samples = design_study.read_samples(tmp_path / "anynetx_a" / "samples.json")
    with open(tmp_path / "anynetx_a" / "results.csv") as f:
        table = list(csv.DictReader(f))
    for row, sample in zip(table, samples):
        assert [int(row[f"w{i}"]) for i in range(1, 5)] == sample.stages.widths
        assert [int(row[f"g{i}"]) for i in range(1, 5)] == sample.stages.group_widths
        assert [int(row[f"b{i}"]) for i in range(1, 5)] == sample.params["bottlenecks"]


def test_design_space_input_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match="design space 'regnetz': expected one or more of anynetx_a"):
        run_design_space(["regnetz"], 2, YOLO_SHAPES, out=tmp_path)
    for option, value, message in (("--flops-budget", "4x", "argument --flops-budget: '4x': expected MAX or MIN"),
                                   ("--flops-budget", "nan", "argument --flops-budget: 'nan': expected MAX or MIN"),
                                   ("--seed", "-1", "argument --seed: -1 is negative")):
        with pytest.raises(SystemExit) as e:
            main(["design-space", "regnetx", "--task", str(YOLO_SHAPES), option, value])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert main(["design-space", "--n", "2"]) == 2
    assert "give SPACE[,SPACE...] and --task CONFIG" in capsys.readouterr().err


def test_budget_ranges_parse_with_units():
    assert budget_range("400M") == (None, 400e6)
    assert budget_range("360M:400M") == (360e6, 400e6)
    assert budget_range("1.5G:") == (1.5e9, None)
    assert budget_range("2500") == (None, 2500.0)
    with pytest.raises(argparse.ArgumentTypeError, match="minimum is above the maximum"):
        budget_range("400M:300M")


def test_fit_prints_e_fit_of_any_widths(capsys):
    assert parse_widths("1x32,2x64") == [32, 64, 64]
    assert parse_widths("regnet_x_400mf")[:3] == [32, 64, 64]
    assert main(["design-space", "--fit", "regnet_x_400mf"]) == 0
    e_preset = float(capsys.readouterr().out.split("e_fit = ")[1].split()[0])
    assert e_preset < 0.01
    assert main(["design-space", "--fit", "8,64,16,512,32"]) == 0
    e_random = float(capsys.readouterr().out.strip().splitlines()[-1].split("e_fit = ")[1].split()[0])
    assert e_random > 10 * max(e_preset, 1e-3)
    assert main(["design-space", "--fit", "wide"]) == 2
    assert "--fit 'wide': expected a RegNet preset name" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ transfer
def test_transfer_variants_scale_phi_resolution_and_pick_weights(shapes_dir):
    task = tiny_task(shapes_dir)
    found = variants(YOLO_SHAPES, task, ["resnet18", "efficientnet@phi=2", "timm:tf_efficientnet_lite0"],
                     ["none", "timm:tf_efficientnet_lite0=/w/lite0.pth"])
    assert [(v.backbone, v.pretrained_label, v.image_size) for v in found] == [
        ("resnet18", "scratch", 64), ("efficientnet@phi=2", "scratch", 96),  # 64 * 1.15**2 = 84.6 -> 96
        ("timm:tf_efficientnet_lite0", "scratch", 64), ("timm:tf_efficientnet_lite0", "lite0.pth", 64)]
    assert "model.backbone.efficientnet.phi=2.0" in found[1].overrides
    assert "model.backbone.pretrained=/w/lite0.pth" in found[3].overrides
    with pytest.raises(ConfigError, match="unknown backbone"):
        variants(YOLO_SHAPES, task, ["resnet81"])
    with pytest.raises(ConfigError, match="timm:nosuch_model"):
        variants(YOLO_SHAPES, task, ["timm:nosuch_model"])
    with pytest.raises(ConfigError, match="'mobilenet' is not one of --backbones"):
        variants(YOLO_SHAPES, task, ["resnet18"], ["mobilenet=x.pth"])
    with pytest.raises(ConfigError, match="the only '@' form is efficientnet@phi"):
        variants(YOLO_SHAPES, task, ["resnet18@depth=3"])
    with pytest.raises(ConfigError, match="'efficientnet@phi=1.2.3': phi must be a number"):
        variants(YOLO_SHAPES, task, ["efficientnet@phi=1.2.3"])
    with pytest.raises(ConfigError, match="'efficientnet@phi=-20': phi out of range"):
        variants(YOLO_SHAPES, task, ["efficientnet@phi=-20"])


def test_transfer_refuses_runs_that_would_share_a_folder(shapes_dir, tmp_path):
    task = tiny_task(shapes_dir)
    with pytest.raises(ConfigError, match="seeds must be distinct and >= 0"):
        run_transfer(YOLO_SHAPES, ["resnet18"], seeds=[1, 1], out=tmp_path, overrides=task)
    with pytest.raises(ConfigError, match="would share the run folder trials/resnet18__w.pth__seed0"):
        run_transfer(YOLO_SHAPES, ["resnet18"], pretrained=["a/w.pth", "b/w.pth"], out=tmp_path, overrides=task)
    assert not (tmp_path / "settings.json").exists()


@pytest.mark.slow
def test_transfer_reports_mean_and_std_over_seeds_and_records_a_failure(shapes_dir, tmp_path):
    out = tmp_path / "tf"
    missing = tmp_path / "no_such_weights.pth"
    rows = run_transfer(YOLO_SHAPES, ["resnet18", "mobilenet_v3_small"], pretrained=["none", f"resnet18={missing}"],
                        seeds=[1, 2], out=out, overrides=tiny_task(shapes_dir))
    by = {(r["backbone"], r["pretrained"]): r for r in rows}
    assert set(by) == {("resnet18", "scratch"), ("resnet18", "no_such_weights.pth"),
                       ("mobilenet_v3_small", "scratch")}
    failed = by[("resnet18", "no_such_weights.pth")]
    assert failed["runs"] == "0/2" and str(missing) in failed["failed"]
    runs = results(out)
    for backbone in ("resnet18", "mobilenet_v3_small"):
        row = by[(backbone, "scratch")]
        values = [runs[f"{backbone}__scratch__seed{s}"]["value"] for s in (1, 2)]
        assert row["runs"] == "2/2" and (row["mean"], row["std"]) == pytest.approx(mean_std(values), abs=1e-4)
        assert 0 < row["backbone_flops"] < row["model_flops"] and 0 < row["backbone_params"] < row["model_params"]
        assert row["latency_ms"] > 0 and row["input"] == "64x64"
    assert by[("resnet18", "scratch")]["backbone_params"] > by[("mobilenet_v3_small", "scratch")]["backbone_params"]
    cfg = load_config(out / "trials" / "resnet18__scratch__seed2" / "config.yaml")
    assert cfg.seed == 2 and cfg.model.backbone.pretrained is None
    md = (out / "report.md").read_text()
    assert md.count("\n") == 5 and "| mobilenet_v3_small | scratch | 64x64 | 2/2 |" in md
    for name in ("flops", "latency", "params"):
        assert (out / f"metric_vs_{name}.png").stat().st_size > 10_000
    # resuming repeats nothing
    before = {n: (out / "trials" / n / "result.json").stat().st_mtime_ns for n in runs}
    again = run_transfer(YOLO_SHAPES, ["resnet18", "mobilenet_v3_small"], pretrained=["none", f"resnet18={missing}"],
                         seeds=[1, 2], out=out, overrides=tiny_task(shapes_dir))
    assert again == rows
    assert before == {n: (out / "trials" / n / "result.json").stat().st_mtime_ns for n in runs}
    # --remeasure: the finished runs are measured again (here: without latency), not retrained
    run_transfer(YOLO_SHAPES, ["mobilenet_v3_small"], seeds=[1], out=out, overrides=tiny_task(shapes_dir),
                 latency=False, remeasure=True)
    remeasured = results(out)["mobilenet_v3_small__scratch__seed1"]
    assert remeasured["model_flops"] == runs["mobilenet_v3_small__scratch__seed1"]["model_flops"]
    assert remeasured["train_s"] == runs["mobilenet_v3_small__scratch__seed1"]["train_s"]
    assert (out / "trials" / "mobilenet_v3_small__scratch__seed1" / "result.json").stat().st_mtime_ns > \
        before["mobilenet_v3_small__scratch__seed1"]


def test_transfer_cli_prints_the_report(shapes_dir, tmp_path, capsys):
    out = tmp_path / "tf"
    code = main(["transfer", str(YOLO_SHAPES), "--backbones", "efficientnet@phi=0", "--out", str(out),
                 "--no-latency", *tiny_task(shapes_dir)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "efficientnet@phi=0" in printed and "runs 1/1" in printed and str(out / "report.md") in printed


@pytest.mark.slow
def test_lineage_networks_have_one_line_each_and_expand_in_order():
    from detkit.analysis.lineage import LINEAGE, expand, ideas_table

    assert expand(["resnet18", "lineage"])[0] == "resnet18" and len(expand(["lineage"])) == len(LINEAGE)
    assert [n.year for n in LINEAGE] == sorted(n.year for n in LINEAGE)
    for n in LINEAGE:
        with torch.device("meta"):
            build_backbone(n.backbone)  # every network of the lineage is a backbone
        assert n.idea and "\n" not in n.idea and "|" not in n.idea
    table = ideas_table(["tv:alexnet", "resnet18", "not-a-lineage-net"])
    assert table.count("\n") == 4 and table.index("AlexNet") < table.index("ResNet-18")


@pytest.mark.slow
def test_transfer_over_lineage_networks_writes_years_ideas_and_the_four_plots(shapes_dir, tmp_path, capsys):
    out = tmp_path / "lineage"
    code = main(["transfer", str(YOLO_SHAPES), "--backbones", "tv:alexnet,resnet18,tv:shufflenet_v2_x1_0",
                 "--out", str(out), "--no-latency", *tiny_task(shapes_dir), "model.backbone.out_levels=[c3,c4,c5]"])
    assert code == 0
    report = (out / "report.md").read_text()
    header = next(line for line in report.splitlines() if "backbone" in line)
    assert header.index("network") < header.index("year") < header.index("backbone") and "AlexNet" in report
    lineage = (out / "lineage.md").read_text()
    order = [lineage.index(n) for n in ("| 2012 | AlexNet", "| 2015 | ResNet-18", "| 2018 | ShuffleNetV2")]
    assert order == sorted(order)
    assert "identity shortcuts" in lineage and "channel split and shuffle" in lineage
    for plot in ("metric_vs_year", "metric_vs_flops", "metric_vs_params", "metric_vs_activations"):
        assert (out / f"{plot}.png").stat().st_size > 1000, plot
