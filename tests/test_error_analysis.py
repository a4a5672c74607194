"""Error analysis on hand-worked cases: the confusion matrix with background, F1 against the score threshold, the
TIDE-style breakdown; and `detkit eval` writing them, `predict --score-threshold best`, `eval --compare`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from detkit.evaluation.analysis import classify_errors, confusion_matrix, error_breakdown, threshold_curves

# two objects: A (class 1) at [0, 0, 10, 10], B (class 2) at [20, 20, 10, 10] (xywh)
GT = {"images": [{"id": 1, "width": 100, "height": 100}],
      "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
                      {"id": 2, "image_id": 1, "category_id": 2, "bbox": [20, 20, 10, 10], "area": 100,
                       "iscrowd": 0}],
      "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
DETS = [
    {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9},    # d1: true positive on A
    {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.8},    # d2: duplicate of A
    {"image_id": 1, "category_id": 1, "bbox": [20, 20, 10, 10], "score": 0.7},  # d3: on B, wrong class
    {"image_id": 1, "category_id": 2, "bbox": [20, 20, 10, 4], "score": 0.6},   # d4: B's class, IoU 0.4
    {"image_id": 1, "category_id": 1, "bbox": [50, 50, 5, 5], "score": 0.5},    # d5: on nothing
    {"image_id": 1, "category_id": 2, "bbox": [0, 0, 10, 4], "score": 0.4},     # d6: on A, wrong class, IoU 0.4
]


def test_errors_are_classified_by_hand():
    kinds, missed = classify_errors(GT, DETS)
    assert kinds == [None, "duplicate", "classification", "localisation", "background", "both"]
    assert missed == [(1, [20, 20, 10, 10], 2)]  # B: no detection of its class covers it at IoU 0.5


def test_the_ap_each_fix_would_gain_by_hand():
    # AP50: class a = 1 (its first detection is right), class b = 0 (none right): mean 0.5
    out = error_breakdown(GT, DETS, 2)
    assert out["AP50"] == pytest.approx(0.5)
    assert out["counts"] == {"classification": 1, "localisation": 1, "both": 1, "duplicate": 1, "background": 1,
                             "missed": 1}
    # d3 with class b, or d4 with B's box, or B added at the top: b's first detection is right (AP 1)
    for kind in ("classification", "localisation", "missed"):
        assert out["dAP"][kind] == pytest.approx(0.5), kind
    # the duplicate, the background and the "both" detection rank below a's true positive / b has none
    for kind in ("duplicate", "background", "both"):
        assert out["dAP"][kind] == pytest.approx(0.0), kind


def test_confusion_matrix_with_background_by_hand():
    cm = confusion_matrix(GT, DETS, 2, iou_thresh=0.5, score_thresh=0.25)
    # A found as a (d1), B found as a (d3); d2, d5 (a) and d4, d6 (b) match no object
    assert cm.tolist() == [[1, 0, 0], [1, 0, 0], [2, 2, 0]]
    high = confusion_matrix(GT, DETS, 2, score_thresh=0.75)  # only d1 and d2 count
    assert high.tolist() == [[1, 0, 0], [0, 0, 1], [1, 0, 0]]


def test_f1_against_the_threshold_by_hand():
    curves = threshold_curves(GT, DETS, ["a", "b"])
    a = curves["a"]
    assert a["thresholds"] == [0.9, 0.8, 0.7, 0.5]
    np.testing.assert_allclose(a["precision"], [1, 1 / 2, 1 / 3, 1 / 4])
    np.testing.assert_allclose(a["f1"], [1, 2 / 3, 1 / 2, 2 / 5])
    assert a["best_threshold"] == 0.9 and a["best_f1"] == 1.0
    assert curves["b"]["best_f1"] == 0.0


def test_crowd_objects_are_neither_missed_nor_targets():
    gt = json.loads(json.dumps(GT))
    gt["annotations"][1]["iscrowd"] = 1
    kinds, missed = classify_errors(gt, DETS)
    assert missed == [] and kinds[0] is None
    cm = confusion_matrix(gt, DETS, 2)
    assert cm[1].sum() == 0  # the crowd region is not a row


# ------------------------------------------------------------------------------------------ through the CLI
def test_eval_writes_the_analysis_and_predict_uses_the_best_thresholds(tmp_path, shapes_dir, capsys):
    import torch
    from omegaconf import OmegaConf

    from conftest import FIXTURES
    from detkit.cli import main

    ckpt = torch.load(FIXTURES / "checkpoints" / "yolo_anynet.ckpt", weights_only=True)
    cfg = ckpt["hyper_parameters"]["config"]
    for split in ("train", "val"):
        cfg["data"][split].update(images=str(shapes_dir / "images" / split),
                                  annotations=str(shapes_dir / "annotations" / f"instances_{split}.json"))
    cfg["trainer"].update(enable_progress_bar=False, enable_model_summary=False)
    runs = []
    for name in ("a", "b"):
        run = tmp_path / name
        (run / "checkpoints").mkdir(parents=True)
        shutil.copy(FIXTURES / "checkpoints" / "yolo_anynet.ckpt", run / "checkpoints" / "best.ckpt")
        (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
        assert main(["eval", str(run)] + (["model.head.params.score_thresh=0.2"] if name == "b" else [])) == 0
        runs.append(run)
    out = capsys.readouterr().out
    assert "gained by fixing each kind of error" in out
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert set(metrics["best_score_threshold"]) == {"circle", "square", "triangle", "star"}
    assert set(metrics["errors"]["dAP"]) == {"classification", "localisation", "both", "duplicate", "background",
                                             "missed"}
    for name in ("confusion_matrix_detection.csv", "confusion_matrix_detection.png", "f1_vs_threshold.png"):
        assert (runs[0] / "analysis" / name).is_file()
    rows = (runs[0] / "analysis" / "confusion_matrix_detection.csv").read_text().splitlines()
    assert len(rows) == 6 and rows[0].endswith("background")
    image = shapes_dir / "images" / "val" / "000000.jpg"
    assert main(["predict", str(runs[0]), str(image), "--score-threshold", "best", "--out", str(tmp_path / "p")]) == 0
    kept = json.loads((tmp_path / "p" / "predictions.json").read_text())
    best = metrics["best_score_threshold"]
    assert all(r["score"] >= (best[r["category_name"]] or 0) for r in kept)
    assert main(["eval", "--compare", str(runs[0]), str(runs[1]), "--out", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| bbox_AP |" in table and "| circle |" in table
    assert (tmp_path / "cmp" / "per_class_ap.png").is_file() and (tmp_path / "cmp" / "pr_overall.png").is_file()


def test_best_thresholds_need_an_evaluated_run(tmp_path, capsys):
    from conftest import FIXTURES
    from detkit.cli import main

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(FIXTURES / "checkpoints" / "yolo_anynet.ckpt", run / "checkpoints" / "best.ckpt")
    image = FIXTURES / "checkpoints" / "images" / "shapes-000000.jpg"
    assert main(["predict", str(run), str(image), "--score-threshold", "best"]) == 2
    assert "has no best_score_threshold; run `detkit eval" in capsys.readouterr().err
