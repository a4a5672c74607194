"""COCO metrics: detkit equals pycocotools run directly on the same files; faster-coco-eval gives the same numbers."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import random

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from conftest import shared_path
from detkit.data.build import build_dataset
from detkit.evaluation import (
    DetectionEvaluator,
    coco_metrics,
    dataset_to_coco,
    load_ground_truth,
    load_predictions,
    score_predictions,
)
from detkit.evaluation.metrics import COCO_STATS as STAT_NAMES

ROOT = ("datasets", "coco128")


@pytest.fixture(scope="module")
def coco128(tmp_path_factory):
    """The coco128 val ground truth and two prediction files made from it (boxes; masks)."""
    gt_file = shared_path(*ROOT, "annotations", "instances_val2017.json")
    data = json.loads(gt_file.read_text())
    rng = random.Random(0)
    boxes, masks = [], []
    for ann in data["annotations"]:
        if rng.random() < 0.15:  # missed
            continue
        x, y, w, h = ann["bbox"]

        def jitter(scale: float = 0.12) -> float:
            return rng.uniform(-scale, scale)

        box = {"image_id": ann["image_id"], "category_id": ann["category_id"], "score": round(rng.random(), 4),
               "bbox": [x + w * jitter(), y + h * jitter(), w * (1 + jitter()), h * (1 + jitter())]}
        boxes.append(box)
        if rng.random() < 0.1:  # a duplicate
            boxes.append({**box, "score": round(rng.random(), 4)})
        if rng.random() < 0.1:  # a false positive: wrong class
            boxes.append({**box, "category_id": rng.choice(data["categories"])["id"], "score": rng.random() / 2})
        if rng.random() < 0.85:
            mask = {"image_id": ann["image_id"], "category_id": ann["category_id"], "score": rng.random(),
                    "segmentation": ann["segmentation"]}
            masks.append(mask)
            if rng.random() < 0.1:
                masks.append({**mask, "category_id": rng.choice(data["categories"])["id"], "score": rng.random()})
    rng.shuffle(boxes)
    rng.shuffle(masks)
    out = tmp_path_factory.mktemp("coco128_eval")
    (out / "boxes.json").write_text(json.dumps(boxes))
    (out / "masks.json").write_text(json.dumps(masks))
    return gt_file, out / "boxes.json", out / "masks.json"


def pycocotools_stats(gt_file, results_file, iou_type):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        coco_eval = COCOeval(gt, gt.loadRes(str(results_file)), iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


def test_bbox_equals_pycocotools_and_faster_backend(coco128):
    gt_file, boxes_file, _ = coco128
    reference = pycocotools_stats(gt_file, boxes_file, "bbox")
    gt = load_ground_truth(gt_file)
    results = load_predictions(boxes_file, gt)
    report = coco_metrics(gt, results)
    got = np.array([report.metrics[f"bbox_{s}"] for s in STAT_NAMES])
    np.testing.assert_allclose(got, reference.stats, rtol=0, atol=1e-9)
    assert 0.3 < report.metrics["bbox_AP"] < 0.9 and report.metrics["bbox_AP50"] > report.metrics["bbox_AP75"]
    # per-class AP: AP@[.5:.95] of each category from the precision array
    precision = reference.eval["precision"][:, :, :, 0, -1]
    names = {c["id"]: c["name"] for c in gt["categories"]}
    for k, cat in enumerate(reference.params.catIds):
        defined = precision[:, :, k][precision[:, :, k] > -1]
        expected = float(defined.mean()) if defined.size else None
        assert report.per_class["bbox"][names[cat]] == pytest.approx(expected, abs=1e-12)
    assert None in report.per_class["bbox"].values()  # coco128 val lacks some of the 80 classes
    assert report.precision["bbox"].shape == (10, 101, 80, 4, 3)
    faster = coco_metrics(gt, results, backend="faster_coco_eval")
    for key, value in report.metrics.items():
        assert faster.metrics[key] == pytest.approx(value, abs=1e-12), key
    np.testing.assert_allclose(faster.precision["bbox"], report.precision["bbox"], atol=1e-12)


def test_segm_equals_pycocotools(coco128):
    gt_file, _, masks_file = coco128
    reference = pycocotools_stats(gt_file, masks_file, "segm")
    metrics = score_predictions(masks_file, gt_file, metric="coco")  # iou types: auto, segm found
    got = np.array([metrics[f"segm_{s}"] for s in STAT_NAMES])
    np.testing.assert_allclose(got, reference.stats, rtol=0, atol=1e-9)
    assert 0.5 < metrics["segm_AP"] < 1
    gt = load_ground_truth(gt_file)
    faster = coco_metrics(gt, load_predictions(masks_file, gt), ("segm",), backend="faster_coco_eval")
    np.testing.assert_allclose([faster.metrics[f"segm_{s}"] for s in STAT_NAMES], got, atol=1e-12)


def test_dataset_ground_truth_gives_the_file_numbers(coco128):
    """dataset_to_coco (labels 1..K, the dataset's own image ids) scores as the original file does."""
    gt_file, boxes_file, _ = coco128
    dataset = build_dataset({"format": "coco", "images": str(shared_path(*ROOT, "images", "val2017")),
                             "annotations": str(gt_file)}, with_masks=True)
    gt = dataset_to_coco(dataset, with_masks=True)
    assert [c["id"] for c in gt["categories"]] == list(range(1, 81))
    assert [c["original_id"] for c in gt["categories"]] == dataset.cat_ids
    assert {img["id"] for img in gt["images"]} == {img["id"] for img in json.loads(gt_file.read_text())["images"]}
    ann = gt["annotations"][0]
    assert {"id", "image_id", "category_id", "bbox", "area", "iscrowd", "difficult", "segmentation"} <= set(ann)
    assert isinstance(ann["segmentation"]["counts"], str)
    from_file = score_predictions(boxes_file, gt_file, metric="coco", iou_types=("bbox",))
    from_dataset = score_predictions(boxes_file, gt, metric="coco", iou_types=("bbox",),
                                     cat_to_label=dataset.cat_to_label())
    for key in (f"bbox_{s}" for s in STAT_NAMES):
        assert from_dataset[key] == pytest.approx(from_file[key], abs=1e-9), key
    assert from_dataset["per_class"] == pytest.approx(from_file["per_class"], abs=1e-9)


def test_perfect_and_empty_predictions(coco128):
    gt = load_ground_truth(coco128[0])
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
                "segmentation": a["segmentation"]} for a in gt["annotations"] if not a["iscrowd"]]
    report = coco_metrics(gt, perfect, ("bbox", "segm"))
    for iou_type in ("bbox", "segm"):
        for stat in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"):
            assert report.metrics[f"{iou_type}_{stat}"] == pytest.approx(1.0, abs=1e-12), (iou_type, stat)
        assert all(ap is None or ap == pytest.approx(1.0) for ap in report.per_class[iou_type].values())
    for backend in ("pycocotools", "faster_coco_eval"):
        empty = coco_metrics(gt, [], ("bbox", "segm"), backend=backend)
        assert set(empty.metrics) == {f"{t}_{s}" for t in ("bbox", "segm") for s in STAT_NAMES}
        assert all(v == 0.0 for v in empty.metrics.values()), backend
    assert gt["annotations"][0]["segmentation"] == copy.deepcopy(gt)["annotations"][0]["segmentation"]
    assert "ignore" not in gt["annotations"][0]  # COCOeval worked on a copy


def test_flat_dict_keys_and_none_rule():
    """No object is small or medium here: COCOeval's -1 comes back as None (valid JSON), never -1."""
    gt = {"images": [{"id": 1, "width": 400, "height": 400}, {"id": 2, "width": 400, "height": 400}],
          "categories": [{"id": 1, "name": "big"}, {"id": 2, "name": "absent"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 200, 200], "iscrowd": 0}]}
    evaluator = DetectionEvaluator(gt)
    evaluator.add_results([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 200, 176], "score": 0.9},
                           {"image_id": 2, "category_id": 2, "bbox": [0, 0, 50, 50], "score": 0.8}])
    metrics = evaluator.compute()
    expected = {f"bbox_{s}" for s in STAT_NAMES} | {"voc07_mAP", "voc12_mAP", "per_class"}
    assert set(metrics) == expected
    assert metrics["bbox_APs"] is None and metrics["bbox_APm"] is None and metrics["bbox_ARs"] is None
    assert metrics["per_class"] == {"big": pytest.approx(0.8), "absent": None}  # IoU .88: found at 8 of 10 thresholds
    assert metrics["voc07_mAP"] == 1.0 and metrics["voc12_mAP"] == 1.0  # "absent" has no AP, not a 0
    for key, value in metrics.items():
        if key != "per_class":
            assert value is None or 0.0 <= value <= 1.0
    json.dumps(metrics, allow_nan=False)
