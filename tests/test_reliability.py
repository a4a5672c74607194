"""Nothing a user made is overwritten or silently mixed; bad values are one line before anything runs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import FIXTURES, ROOT
from detkit.cli import main
from detkit.config import load_config
from detkit.errors import ConfigError, DataError

CKPT = FIXTURES / "checkpoints" / "yolo_anynet.ckpt"


# --------------------------------------------------------------------------------- values, one line each
@pytest.mark.parametrize("override,expected", [
    ("data.batch_size=0", "'data.batch_size' = 0: expected a value >= 1"),
    ("data.num_workers=-1", "'data.num_workers' = -1: expected a value >= 0"),
    ("train.epochs=0", "'train.epochs' = 0: expected a value >= 1"),
    ("train.lr=0", "'train.lr' = 0.0: expected a value > 0"),
    ("train.lr=nan", "'train.lr' = nan: expected a finite number"),
    ("train.weight_decay=-1e-4", "'train.weight_decay' = -0.0001: expected a value >= 0"),
    ("train.ema.decay=1.0", "'train.ema.decay' = 1.0: expected a value > 0 and < 1"),
    ("data.min_visibility=1.5", "'data.min_visibility' = 1.5: expected a value >= 0 and <= 1"),
    ("train.milestones=[3,-1]", "'train.milestones' = [3, -1]: expected values >= 0"),
    ("trainer.accumulate_grad_batches=0", "expected a value >= 1"),
    ("model.head.params.nms_thresh=1.5", "model.head.params.nms_thresh = 1.5: expected a value in [0, 1]"),
    ("model.head.params.score_thresh=-0.1", "model.head.params.score_thresh = -0.1: expected a value in [0, 1]"),
    ("model.head.params.anchors=[[[10,.inf]]]", "expected finite numbers"),
])
def test_out_of_range_values_are_one_line_before_anything_runs(override, expected, capsys):
    code = main(["config", "show", str(ROOT / "configs/yolo/shapes.yaml"), override])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and expected in err, err


@pytest.mark.parametrize("args,expected", [
    (["predict", str(CKPT), "x.jpg", "--score-threshold", "nan"], "'nan' is not a finite number"),
    (["predict", str(CKPT), "x.jpg", "--score-threshold", "1.5"], "1.5 is not in [0, 1]"),
    (["data", "anchors", "--ratio-thresh", "inf"], "'inf' is not a finite number"),
    (["data", "make-shapes", "out", "--seed", "-1"], "-1 is negative"),
])
def test_cli_numbers_are_checked_in_one_line(args, expected, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and expected in err, err


# ------------------------------------------------------------------------------------------- predict
def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_predict_never_overwrites_an_input_and_keeps_equal_stems_apart(tmp_path, capsys):
    src = FIXTURES / "checkpoints" / "images" / "shapes-000000.jpg"
    inputs = tmp_path / "in"
    for sub in ("a", "b"):
        (inputs / sub).mkdir(parents=True)
        shutil.copy(src, inputs / sub / "x.jpg")  # the same stem in two folders
    shutil.copy(src, inputs / "a" / "x.png")  # and beside it under another suffix
    before = _digest(inputs)
    assert main(["predict", str(CKPT), str(inputs), "--out", str(inputs / "a")]) == 0  # out inside an input folder
    assert main(["predict", str(CKPT), str(inputs / "a"), "--out", str(inputs / "a")]) == 0  # out = input folder
    after = _digest(inputs)
    assert {k: after[k] for k in before} == before  # every input byte as it was
    drawn = sorted(p.name for p in (inputs / "a").glob("x*.jpg"))
    assert "x.jpg" in drawn and len(drawn) >= 4  # x.jpg (input) + a drawn image per input, none replaced
    first = json.loads((inputs / "a" / "predictions.json").read_text())
    assert len({r["file_name"] for r in first}) <= 3


# ----------------------------------------------------------------------------------------------- eval
@pytest.fixture
def run_dir(tmp_path, shapes_dir):
    """A run directory around the fixture checkpoint, its data pointed at the session's shapes set (val also as
    test split), with a metrics.json and predictions.json of its own."""
    ckpt = torch.load(CKPT, weights_only=True)
    cfg = ckpt["hyper_parameters"]["config"]
    for split in ("train", "val"):
        cfg["data"][split].update(images=str(shapes_dir / "images" / split),
                                  annotations=str(shapes_dir / "annotations" / f"instances_{split}.json"))
    cfg["data"]["test"] = dict(cfg["data"]["val"])
    cfg["trainer"].update(enable_progress_bar=False, enable_model_summary=False)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(CKPT, run / "checkpoints" / "best.ckpt")
    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    (run / "metrics.json").write_text('{"bbox_AP": 0.123}')
    (run / "predictions.json").write_text("[]")
    return run


def test_eval_on_another_split_or_predictions_never_replaces_the_runs_own_files(run_dir, capsys):
    own = _digest(run_dir)
    assert main(["eval", str(run_dir), "--split", "test"]) == 0
    assert (run_dir / "metrics_test.json").is_file() and (run_dir / "predictions_test.json").is_file()
    assert (run_dir / "pr_curves_test").is_dir()
    out = run_dir.parent / "elsewhere" / "m.json"
    assert main(["eval", str(run_dir), "--out", str(out)]) == 0
    assert out.is_file() and (out.parent / "m_predictions.json").is_file()
    gt = Path(load_config(run_dir / "config.yaml").data.val.annotations)
    assert main(["eval", "--predictions", str(run_dir / "predictions_test.json"), "--ground-truth", str(gt)]) == 0
    assert (run_dir / "predictions_test_metrics.json").is_file()
    after = _digest(run_dir)
    assert {k: after[k] for k in own} == own  # metrics.json, predictions.json, checkpoints, config untouched


def test_eval_fails_naming_unreadable_images_or_scores_the_rest_when_asked(run_dir, tmp_path, shapes_dir, capsys):
    images = tmp_path / "val_images"
    shutil.copytree(shapes_dir / "images" / "val", images)
    (images / "000001.jpg").write_bytes(b"not an image")
    override = f"data.val.images={images}"
    assert main(["eval", str(run_dir), override]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("detkit:")]
    assert len(err) == 1 and "1 validation image(s) cannot be read" in err[0] and "000001.jpg" in err[0]
    assert json.loads((run_dir / "metrics.json").read_text()) == {"bbox_AP": 0.123}  # nothing written
    assert main(["eval", str(run_dir), override, "eval.skip_unreadable=true"]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["images_unreadable"] == 1 and metrics["bbox_AP"] is not None


def test_a_failed_resume_leaves_the_run_config_as_it_was(run_dir):
    import detkit

    before = (run_dir / "config.yaml").read_text()
    shutil.copy(run_dir / "checkpoints" / "best.ckpt", run_dir / "checkpoints" / "last.ckpt")
    cfg = load_config(run_dir / "config.yaml", ["model.neck.out_channels=8"])  # does not fit the checkpoint
    with pytest.raises(Exception, match="size mismatch|does not fit"):
        detkit.train(cfg, resume=run_dir)
    assert (run_dir / "config.yaml").read_text() == before and not (run_dir / "resumes.jsonl").exists()


# ---------------------------------------------------------------------------------------- study folders
def test_a_second_process_on_a_study_folder_is_refused_and_a_stale_lock_taken_over(tmp_path):
    from detkit.utils.lock import FolderLock

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from detkit.utils.lock import FolderLock\n"
        f"with FolderLock({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(60)")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=rf"another detkit study is running in this folder \(process "
                                              rf"{holder.pid} on"):
            FolderLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock: it is left behind, stale
        holder.wait()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == holder.pid
    with FolderLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".lock").exists()


def test_transfer_refuses_a_folder_in_use(tmp_path, monkeypatch):
    from detkit.analysis.transfer import run_transfer

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename,
                                                    "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        with pytest.raises(ConfigError, match="another detkit transfer study is running"):
            run_transfer(ROOT / "configs/yolo/shapes.yaml", ["resnet18"], out=tmp_path)
    finally:
        sleeper.kill()
        sleeper.wait()


# ---------------------------------------------------------------------------------------- shapes dataset
def test_a_killed_shapes_generation_is_made_again_not_taken_as_complete(tmp_path, monkeypatch):
    from detkit.data import shapes

    real, calls = shapes.render_image, []

    def dies(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # killed half-way
        return real(*args, **kwargs)

    monkeypatch.setattr(shapes, "render_image", dies)
    out = tmp_path / "data" / "shapes"
    cfg = load_config(ROOT / "configs/yolo/shapes.yaml",
                      [f"data.train.annotations={out}/annotations/instances_train.json"])
    with pytest.raises(KeyboardInterrupt):
        shapes.make_shapes(out, num_images=12, image_size=48)
    assert not out.exists()  # nothing that looks like a dataset
    assert list(out.parent.glob(".shapes.partial-*"))  # what was written so far, hidden
    monkeypatch.undo()
    shapes.make_shapes(out, num_images=12, image_size=48)  # made again, complete
    assert (out / "dataset.yaml").is_file() and len(list((out / "images" / "train").glob("*.jpg"))) == 10
    assert not list(out.parent.glob(".shapes.partial-*"))
    shapes.ensure_shapes(cfg.data)  # complete: not made again
    with pytest.raises(DataError, match="exists and is not empty"):
        shapes.make_shapes(out, num_images=12, image_size=48)
