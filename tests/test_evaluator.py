"""DetectionEvaluator: tensors in, metrics out; de-duplication; DDP gather; PR plots; prediction files."""

from __future__ import annotations

import contextlib
import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from conftest import FIXTURES, run_gloo, shapes_cfg
from detkit.data.build import build_dataset
from detkit.errors import ConfigError, DataError
from detkit.evaluation import (
    DetectionEvaluator,
    dataset_to_coco,
    format_table,
    load_predictions,
    results_to_dataset_ids,
    results_to_labels,
    score_predictions,
)

CLASSES = ("traffic light", "a/b", "c")


def synthetic_case(num_images: int = 21, seed: int = 0):
    """A ground truth of ``num_images`` 100 x 100 images and one prediction dict (tensors) per image."""
    rng = np.random.default_rng(seed)
    images, anns, predictions = [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": 100, "height": 100, "file_name": f"{image_id}.jpg"})
        n = int(rng.integers(0, 4))
        xy = rng.uniform(0, 60, (n, 2))
        wh = rng.uniform(8, 40, (n, 2))
        labels = rng.integers(1, len(CLASSES) + 1, n)
        for box, label in zip(np.concatenate([xy, wh], 1), labels):
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(label),
                         "bbox": box.tolist(), "iscrowd": 0})
        boxes = np.concatenate([xy, xy + wh], 1) + rng.normal(0, 2, (n, 4))
        extra = int(rng.integers(0, 2))  # a false positive now and then
        boxes = np.concatenate([boxes, rng.uniform(0, 50, (extra, 2)).repeat(2, 1) + [0, 0, 20, 20]])
        predictions.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                            "scores": torch.tensor(rng.uniform(0.1, 1, n + extra), dtype=torch.float32),
                            "labels": torch.tensor(np.concatenate([labels, rng.integers(1, 4, extra)]))})
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": k + 1, "name": name} for k, name in enumerate(CLASSES)]}
    return gt, predictions


def test_update_compute_with_tensors_and_masks(shapes_dir):
    dataset = build_dataset(shapes_cfg(shapes_dir, "val"))
    evaluator = DetectionEvaluator(dataset_to_coco(dataset, with_masks=True), iou_types=("bbox", "segm"))
    samples = [dataset.load(i) for i in range(len(dataset))]
    predictions = [{"boxes": torch.from_numpy(s["boxes"]), "scores": torch.linspace(1, 0.5, len(s["boxes"])),
                    "labels": torch.from_numpy(s["labels"]), "masks": torch.from_numpy(s["masks"]).bool()}
                   for s in samples]
    evaluator.update(predictions[:3], [s["image_id"] for s in samples[:3]])
    evaluator.update(predictions[3:], torch.tensor([s["image_id"] for s in samples[3:]]))
    assert isinstance(evaluator.results()[0]["segmentation"]["counts"], str)
    metrics = evaluator.compute()
    for key in ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP75", "voc07_mAP", "voc12_mAP"):
        assert metrics[key] == pytest.approx(1.0), key
    assert set(metrics["per_class"]) == set(dataset.classes)
    table = format_table(metrics)
    assert "bbox" in table and "segm" in table and "voc12_mAP 1.000" in table and "circle" in table
    evaluator.reset()
    assert len(evaluator) == 0 and evaluator.compute()["bbox_AP"] == 0.0  # images without predictions count


def test_repeated_images_count_once_and_unknown_images_are_left_out(caplog):
    gt, predictions = synthetic_case()
    reference = DetectionEvaluator(gt)
    reference.update(predictions, range(1, 22))
    expected = reference.compute()
    evaluator = DetectionEvaluator(gt)
    evaluator.update(predictions[:10], range(1, 11))
    evaluator.update([predictions[0], predictions[5]], [1, 6])  # padding repeats: ignored
    evaluator.update([predictions[3]], [2])  # another copy of image 2: the first one stays
    evaluator.update(predictions[10:], range(11, 22))
    evaluator.update(predictions[:1], [999])  # not an image of the ground truth
    assert len(evaluator) == 21
    with caplog.at_level(logging.WARNING, logger="detkit.evaluation"):
        assert evaluator.compute() == expected
    assert "1 predicted images are not in the ground truth" in caplog.text


def _gather_body(rank: int, world: int) -> dict:
    gt, predictions = synthetic_case()
    indices = list(range(len(predictions)))
    indices += indices[:1]  # DistributedSampler pads 21 images to 22 by repeating the first
    mine = indices[rank::world] + ([4] if rank == 1 else [])  # image index 4 also done by rank 1
    evaluator = DetectionEvaluator(gt)
    for start in range(0, len(mine), 4):
        batch = mine[start:start + 4]
        evaluator.update([predictions[i] for i in batch], [gt["images"][i]["id"] for i in batch])
    evaluator.gather()
    return {"n": len(evaluator), "metrics": evaluator.compute()}


@pytest.mark.timeout(180)
def test_gather_under_two_gloo_processes(tmp_path):
    ranks = run_gloo(_gather_body, tmp_path)
    gt, predictions = synthetic_case()
    single = DetectionEvaluator(gt)
    single.update(predictions, [img["id"] for img in gt["images"]])
    expected = json.loads(json.dumps(single.compute()))
    for got in ranks:
        assert got["n"] == 21 and got["metrics"] == expected
    assert 0.2 < expected["bbox_AP"] < 0.95


def test_plot_pr_curves(tmp_path):
    gt, predictions = synthetic_case()
    evaluator = DetectionEvaluator(gt)
    evaluator.update(predictions, range(1, 22))
    paths = evaluator.plot_pr_curves(tmp_path / "coco")  # computes first
    assert [p.name for p in paths] == ["pr_overall.png", "pr_traffic_light.png", "pr_a_b.png", "pr_c.png"]
    assert all(Image.open(p).format == "PNG" for p in paths)
    voc_only = DetectionEvaluator(gt, metrics=("voc12",))
    voc_only.update(predictions, range(1, 22))
    assert set(voc_only.compute()) == {"voc12_mAP", "per_class"}
    assert len(voc_only.plot_pr_curves(tmp_path / "voc")) == 4


def test_bad_options():
    gt, _ = synthetic_case(3)
    with pytest.raises(ConfigError, match="metrics: unknown 'map'"):
        DetectionEvaluator(gt, metrics=("map",))
    with pytest.raises(ConfigError, match="backend: unknown 'fast'"):
        DetectionEvaluator(gt, backend="fast")
    with pytest.raises(ConfigError, match="iou_types: unknown 'mask'"):
        DetectionEvaluator(gt, iou_types=("mask",))
    with pytest.raises(DataError, match="no segmentations"):
        DetectionEvaluator(gt, iou_types=("bbox", "segm"))
    with pytest.raises(ConfigError, match="metric: unknown"):
        score_predictions("p.json", gt, metric="map")


BAD_FILES = [
    ("{not json", "malformed JSON"),
    ('{"image_id": 1}', "expected a JSON list of COCO results"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}, 7]', "entry 1: expected an object"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5], "score": 0.5}]', "entry 0: 'bbox' must be 4"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [0, 0, -5, 5], "score": 0.5}]', "entry 0: 'bbox' must be 4"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5]}]', "entry 0: 'score' must be a finite number"),
    ('[{"image_id": "x", "category_id": 1, "bbox": [0, 0, 5, 5], "score": NaN}]', "entry 0: 'score'"),
    ('[{"image_id": [1], "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1}]', "entry 0: 'image_id' must be"),
    ('[{"image_id": 1, "category_id": 1, "score": 1}]', "entry 0: has neither a 'bbox' nor a 'segmentation'"),
    ('[{"image_id": 1, "category_id": 1, "score": 1, "segmentation": {"size": [50, 50], "counts": "x"}}]',
     "entry 0: RLE of size 50x50 for an image of 100x100"),
    ('[{"image_id": 99, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1}]', "none of its 1 predictions matches"),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES)
def test_load_predictions_errors_are_one_line(tmp_path, text, message):
    gt, _ = synthetic_case(3)
    path = tmp_path / "pred.json"
    path.write_text(text)
    with pytest.raises(DataError) as error:
        load_predictions(path, gt)
    assert message in str(error.value) and str(path) in str(error.value) and "\n" not in str(error.value)


def test_load_predictions_counts_what_it_drops(tmp_path, caplog):
    gt, _ = synthetic_case(3)
    entries = [{"image_id": i, "category_id": c, "bbox": [1, 2, 3, 4], "score": 0.5}
               for i, c in [(1, 1), (2, 3), (50, 1), (51, 2), (1, 7)]]
    path = tmp_path / "pred.json"
    path.write_text(json.dumps(entries))
    with caplog.at_level(logging.WARNING, logger="detkit.evaluation"):
        results = load_predictions(path, gt)
    assert [(r["image_id"], r["category_id"]) for r in results] == [(1, 1), (2, 3)]
    assert "2 predictions dropped: their image_id" in caplog.text and "1 predictions dropped: their category_id" \
        in caplog.text
    mapped = load_predictions(path, gt, cat_to_label={1: 2, 3: 1, 7: 3})
    assert [(r["image_id"], r["category_id"]) for r in mapped] == [(1, 2), (2, 1), (1, 3)]


def test_dataset_ids_round_trip():
    results = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0},
               {"image_id": 2, "category_id": 2, "bbox": [0, 0, 1, 1], "score": 1.0}]
    cat_ids = [18, "dog"]
    out = results_to_dataset_ids(results, cat_ids)
    assert [r["category_id"] for r in out] == [18, "dog"] and results[0]["category_id"] == 1
    assert results_to_labels(out, {18: 1, "dog": 2}) == results
    with pytest.raises(DataError, match="label 3 has no counterpart"):
        results_to_dataset_ids([{**results[0], "category_id": 3}], cat_ids)


def test_score_predictions_on_a_coco_json_ground_truth(shapes_dir, tmp_path):
    gt_file = shapes_dir / "annotations" / "instances_val.json"
    data = json.loads(gt_file.read_text())
    rng = np.random.default_rng(1)
    preds = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": float(rng.uniform()),
              "bbox": (np.asarray(a["bbox"]) + rng.normal(0, 1.5, 4)).tolist(), "segmentation": a["segmentation"]}
             for a in data["annotations"] if rng.uniform() < 0.8]
    preds.append({**preds[0], "category_id": 4 if preds[0]["category_id"] != 4 else 1})  # a FP
    pred_file = tmp_path / "pred.json"
    pred_file.write_text(json.dumps(preds))
    metrics = score_predictions(pred_file, gt_file, plot_dir=tmp_path / "plots")
    assert {"bbox_AP", "segm_AP", "voc07_mAP", "voc12_mAP", "per_class"} <= set(metrics)
    assert (tmp_path / "plots" / "pr_overall.png").is_file()
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt_file))
        boxes_only = [{k: v for k, v in p.items() if k != "segmentation"} for p in preds]
        reference = COCOeval(coco, coco.loadRes(boxes_only), "bbox")
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    assert metrics["bbox_AP"] == pytest.approx(reference.stats[0], abs=1e-9)
    assert metrics["bbox_AR100"] == pytest.approx(reference.stats[8], abs=1e-9)
    voc07 = score_predictions(pred_file, gt_file, metric="voc07")
    assert set(voc07) == {"voc07_mAP", "per_class"} and voc07["voc07_mAP"] == metrics["voc07_mAP"]


def test_score_predictions_with_dataset_ids(tmp_path):
    """A VOC dataset's ids are class names: a file written with them is mapped back through cat_to_label."""
    dataset = build_dataset({"format": "voc", "images": str(FIXTURES / "raccoon_mini/images"),
                             "annotations": str(FIXTURES / "raccoon_mini/annotations")})
    gt = dataset_to_coco(dataset)
    results = [{"image_id": r.image_id, "category_id": int(label), "score": 0.9,
                "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]}
               for r in dataset.records for box, label in zip(r.boxes, r.labels)]
    path = tmp_path / "pred.json"
    path.write_text(json.dumps(results_to_dataset_ids(results, dataset.cat_ids)))
    assert json.loads(path.read_text())[0]["category_id"] == "raccoon"
    metrics = score_predictions(path, gt, cat_to_label=dataset.cat_to_label())
    assert metrics["voc07_mAP"] == 1.0 and metrics["voc12_mAP"] == 1.0 and metrics["bbox_AP"] == pytest.approx(1.0)


def test_masks_must_have_the_original_size(shapes_dir):
    dataset = build_dataset(shapes_cfg(shapes_dir, "val"))
    evaluator = DetectionEvaluator(dataset_to_coco(dataset, with_masks=True), iou_types=("segm",))
    prediction = {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "scores": torch.tensor([0.5]),
                  "labels": torch.tensor([1]), "masks": torch.rand(1, 1, 48, 48)}  # probabilities, N x 1 x H x W
    with pytest.raises(ValueError, match="masks must be at the original resolution"):
        evaluator.update([prediction], [dataset.records[0].image_id])
    prediction["masks"] = torch.rand(1, 1, 96, 96)
    evaluator.update([prediction], [dataset.records[0].image_id])
    assert set(evaluator.compute()) >= {"segm_AP", "voc12_mAP"}


def test_only_seen_scores_the_predicted_images_alone():
    from detkit.evaluation import DetectionEvaluator

    gt = {"images": [{"id": i, "width": 100, "height": 100} for i in (1, 2)],
          "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900,
                           "iscrowd": 0} for i in (1, 2)],
          "categories": [{"id": 1, "name": "a"}]}
    ev = DetectionEvaluator(gt, metrics=("coco", "voc07"))
    ev.update([{"boxes": torch.tensor([[10.0, 10.0, 40.0, 40.0]]), "scores": torch.tensor([0.9]),
                "labels": torch.tensor([1])}], [1])
    assert ev.compute()["bbox_AP50"] == pytest.approx(0.5, abs=0.01)  # image 2 never predicted: a miss
    seen = ev.compute(only_seen=True)
    assert seen["bbox_AP50"] == pytest.approx(1.0) and seen["voc07_mAP"] == pytest.approx(1.0)
