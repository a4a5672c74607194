"""``detkit train / eval / predict`` from the command line, on a tiny run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_CONFIG, tiny_detector_overrides
from detkit.cli import main


@pytest.fixture(scope="module")
def cli_run(shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    code = main(["train", str(TINY_CONFIG), *tiny_detector_overrides(shapes_dir, out, "train.epochs=1",
                                                                    "trainer.limit_train_batches=2",
                                                                    "model.head.params.box_score_thresh=0.0")])
    assert code == 0
    return out


def test_train_prints_the_run_directory(cli_run, capsys):
    assert (cli_run / "checkpoints" / "last.ckpt").is_file()


def test_resume_from_the_command_line_continues_the_run(cli_run, capsys):
    code = main(["train", "--resume", str(cli_run), "train.epochs=2"])
    assert code == 0
    assert f"run directory: {cli_run}" in capsys.readouterr().out
    assert torch.load(cli_run / "checkpoints/last.ckpt", weights_only=False)["epoch"] == 1


def test_eval_prints_a_table_and_writes_metrics_and_pr_curves(cli_run, capsys, tmp_path):
    out = tmp_path / "m.json"
    assert main(["eval", str(cli_run), "--out", str(out), "trainer.enable_progress_bar=false"]) == 0
    text = capsys.readouterr().out
    assert "AP50" in text and "circle" in text
    metrics = json.loads(out.read_text())
    assert 0 <= metrics["bbox_AP50"] <= 1 and "per_class" in metrics
    assert (tmp_path / "m_pr_curves" / "pr_overall.png").is_file()  # beside --out: the run's own files untouched
    # the scored detections, re-scored with no model involved, give the same numbers
    rescored = tmp_path / "rescored.json"
    assert main(["eval", "--predictions", str(tmp_path / "m_predictions.json"), "--ground-truth",
                 str(_val_json(cli_run)), "--out", str(rescored)]) == 0
    again = json.loads(rescored.read_text())
    for key in ("bbox_AP", "bbox_AP50", "voc07_mAP", "voc12_mAP"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-12), key


def _val_json(run):
    from detkit.config import load_config

    return load_config(run / "config.yaml").data.val.annotations


def test_predict_a_folder_skips_unreadable_images(cli_run, shapes_dir, tmp_path, capsys):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for i, src in enumerate(sorted((shapes_dir / "images" / "val").iterdir())[:3]):
        (images / "sub" / f"{i}.jpg").write_bytes(src.read_bytes())
    (images / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "pred"
    assert main(["predict", str(cli_run), str(images), "--out", str(out), "--score-threshold", "0.0"]) == 0
    text = capsys.readouterr().out
    assert "3 images (1 skipped)" in text
    preds = json.loads((out / "predictions.json").read_text())
    assert preds and {"image_id", "category_id", "bbox", "score", "file_name"} <= set(preds[0])
    assert {p["category_id"] for p in preds} <= {1, 2, 3, 4}  # the shapes set's own COCO category ids
    assert sorted(p.name for p in out.glob("*.jpg")) == ["0.jpg", "1.jpg", "2.jpg"]
    first = sorted((shapes_dir / "images" / "val").iterdir())[0]
    w, h = Image.open(first).size
    boxes = np.array([p["bbox"] for p in preds if p["file_name"].endswith("0.jpg")])
    assert (boxes[:, 0] + boxes[:, 2] <= w + 1e-3).all() and (boxes[:, 1] + boxes[:, 3] <= h + 1e-3).all()


def test_eval_scores_a_predictions_file_against_a_config_or_json(cli_run, shapes_dir, tmp_path, capsys):
    gt = json.loads((shapes_dir / "annotations" / "instances_val.json").read_text())
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in gt["annotations"]]
    pred = tmp_path / "pred.json"
    pred.write_text(json.dumps(perfect))
    out = tmp_path / "metrics.json"
    assert main(["eval", "--predictions", str(pred), "--ground-truth",
                 str(shapes_dir / "annotations" / "instances_val.json"), "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["bbox_AP"] == pytest.approx(1.0) and m["voc07_mAP"] == pytest.approx(1.0)
    data = [o for o in tiny_detector_overrides(shapes_dir, tmp_path) if o.startswith("data.")]
    cfg_gt = main(["eval", "--predictions", str(pred), "--ground-truth", str(TINY_CONFIG), "--metric", "voc12",
                   "--out", str(out), *data])
    assert cfg_gt == 0
    assert json.loads(out.read_text())["voc12_mAP"] == pytest.approx(1.0)


def test_cli_errors_are_one_line(cli_run, tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert main(["train"]) == 2
    assert main(["predict", str(cli_run), str(tmp_path / "nothing*.jpg")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("detkit: error:") for line in err)


def test_predictor_takes_16_bit_grey_tensors_and_arrays(cli_run, tmp_path):
    from detkit.inference import Predictor, to_rgb_array

    grey = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    arr = to_rgb_array(tmp_path / "g16.png")
    assert arr.dtype == np.uint8 and arr.shape == (64, 64, 3) and arr.max() == round(grey.max() / 257)
    assert to_rgb_array(torch.rand(64, 48)).shape == (64, 48, 3)
    assert to_rgb_array(torch.rand(1, 64, 48)).shape == (64, 48, 3)
    predictor = Predictor.from_checkpoint(cli_run)
    results = predictor([tmp_path / "g16.png", np.zeros((50, 70, 3), np.uint8), torch.rand(3, 40, 40)])
    assert len(results) == 3 and all(r["boxes"].shape[1] == 4 for r in results)
    if not torch.cuda.is_available():
        from detkit.errors import ConfigError

        with pytest.raises(ConfigError, match="no such CUDA device"):
            Predictor.from_checkpoint(cli_run, device="cuda")
