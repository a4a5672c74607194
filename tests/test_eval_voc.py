"""VOC mAP on small cases worked out by hand (the numbers in the comments)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import FIXTURES
from detkit.data.build import build_dataset
from detkit.evaluation import dataset_to_coco, voc_ap, voc_metrics


def make_gt(boxes_by_image, classes=("cat",)):
    """``{image id: [(x1, y1, x2, y2, class id, difficult, iscrowd), ...]}`` as a COCO ground-truth dict."""
    images = [{"id": i, "width": 100, "height": 100} for i in boxes_by_image]
    anns = [{"id": n + 1, "image_id": i, "category_id": c, "bbox": [x1, y1, x2 - x1, y2 - y1], "difficult": d,
             "iscrowd": crowd}
            for n, (i, (x1, y1, x2, y2, c, d, crowd)) in enumerate(
                (i, box) for i, boxes in boxes_by_image.items() for box in boxes)]
    return {"images": images, "annotations": anns,
            "categories": [{"id": k + 1, "name": name} for k, name in enumerate(classes)]}


def det(image, box, score, cat=1):
    x1, y1, x2, y2 = box
    return {"image_id": image, "category_id": cat, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}


def test_difficult_ignored_duplicates_false_and_07_vs_12():
    gt = make_gt({1: [(0, 0, 10, 10, 1, 0, 0),     # A
                      (20, 0, 30, 10, 1, 1, 0),    # B, difficult
                      (0, 20, 10, 30, 1, 0, 0)],   # C, never found
                  2: [(0, 0, 10, 10, 1, 0, 0)]})   # D
    results = [det(1, (0, 0, 10, 10), 0.9),        # TP (A)
               det(1, (20, 0, 30, 10), 0.8),       # on difficult B: ignored, neither TP nor FP
               det(1, (0, 0, 10, 10), 0.7),        # A again: duplicate, FP
               det(2, (0, 0, 10, 10), 0.6),        # TP (D)
               det(2, (50, 50, 60, 60), 0.5)]      # nothing there: FP
    report = voc_metrics(gt, results)
    # 3 boxes to find (A, C, D; B is difficult). Counted detections: TP FP TP FP
    assert report.num_gt["cat"] == 3
    np.testing.assert_allclose(report.recall["cat"], [1 / 3, 1 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(report.precision["cat"], [1, 1 / 2, 2 / 3, 1 / 2])
    # voc12: envelope 1 up to recall 1/3, 2/3 up to 2/3, then 0: 1/3 * 1 + 1/3 * 2/3 = 5/9
    assert report.per_class["voc12"]["cat"] == pytest.approx(5 / 9)
    # voc07: t = 0, .1, .2, .3 -> 1; t = .4, .5, .6 -> 2/3; t = .7 ... 1 -> 0: (4 + 3 * 2/3) / 11 = 6/11
    assert report.per_class["voc07"]["cat"] == pytest.approx(6 / 11)
    assert report.mAP == {"voc07": pytest.approx(6 / 11), "voc12": pytest.approx(5 / 9)}
    # were the difficult box an ordinary one: 4 to find, TP TP FP TP FP -> a different AP
    gt["annotations"][1]["difficult"] = 0
    assert voc_metrics(gt, results).per_class["voc12"]["cat"] != pytest.approx(5 / 9)


def test_crowd_is_ignored_like_difficult():
    gt = make_gt({1: [(0, 0, 10, 10, 1, 0, 0), (40, 40, 90, 90, 1, 0, 1)]})
    report = voc_metrics(gt, [det(1, (40, 40, 90, 90), 0.9), det(1, (0, 0, 10, 10), 0.8)])
    assert report.num_gt["cat"] == 1 and report.mAP["voc12"] == 1.0 and report.mAP["voc07"] == 1.0


def test_highest_iou_box_decides_as_in_the_devkit():
    # B overlaps A: IoU(A, B) = 80 / 120 = 2/3. The second detection's best box is A (IoU 1), already matched,
    # so it is a FP although B (IoU 2/3 >= 0.5) is free: the devkit takes the best box, matched or not.
    gt = make_gt({1: [(0, 0, 10, 10, 1, 0, 0), (2, 0, 12, 10, 1, 0, 0)]})
    report = voc_metrics(gt, [det(1, (0, 0, 10, 10), 0.9), det(1, (0, 0, 10, 10), 0.8)])
    np.testing.assert_allclose(report.precision["cat"], [1, 1 / 2])
    np.testing.assert_allclose(report.recall["cat"], [1 / 2, 1 / 2])
    assert report.per_class["voc12"]["cat"] == pytest.approx(0.5)  # 1/2 * 1
    # voc07: t = 0 .. .5 -> 1 (6 points), t = .6 .. 1 -> 0: 6/11
    assert report.per_class["voc07"]["cat"] == pytest.approx(6 / 11)


def test_continuous_iou_no_plus_one():
    # IoU = 10 * 4.9 / 100 = 0.49 < 0.5: a FP. With the devkit's +1 pixels it would be 11 * 5.9 / 121 = 0.536.
    gt = make_gt({1: [(0, 0, 10, 10, 1, 0, 0)]})
    assert voc_metrics(gt, [det(1, (0, 0, 10, 4.9), 0.9)]).mAP["voc12"] == 0.0
    # exactly 0.5 counts (IoU >= threshold): 10 x 10 inside 20 x 10
    assert voc_metrics(gt, [det(1, (0, 0, 20, 10), 0.9)]).mAP["voc12"] == 1.0


def test_class_without_ground_truth_and_class_without_detections():
    gt = make_gt({1: [(0, 0, 10, 10, 1, 0, 0), (50, 50, 60, 60, 3, 1, 0)], 2: [(0, 0, 30, 30, 2, 0, 0)]},
                 classes=("cat", "dog", "bird"))
    results = [det(1, (0, 0, 10, 10), 0.9, cat=1),
               det(2, (70, 70, 80, 80), 0.8, cat=3)]  # bird: only a difficult box -> nothing to find
    report = voc_metrics(gt, results)
    # cat: 1.0; dog: never detected -> 0.0; bird: no AP (None), left out of the mean -> (1 + 0) / 2
    assert report.per_class["voc12"] == {"cat": 1.0, "dog": 0.0, "bird": None}
    assert report.per_class["voc07"] == {"cat": 1.0, "dog": 0.0, "bird": None}
    assert report.mAP == {"voc07": 0.5, "voc12": 0.5}
    assert voc_metrics(make_gt({1: []}), results).mAP == {"voc07": None, "voc12": None}


def test_perfect_is_one_and_voc07_thresholds_are_exact():
    gt = make_gt({i: [(i, 0, i + 10, 10, 1, 0, 0)] for i in range(1, 11)})
    perfect = [det(i, (i, 0, i + 10, 10), 1 - i / 100) for i in range(1, 11)]
    assert voc_metrics(gt, perfect).mAP == {"voc07": 1.0, "voc12": 1.0}
    # 3 of 10 found, precision 1: recall reaches exactly 0.3, so t = 0, .1, .2, .3 count: 4/11
    # (np.arange(0, 1.1, 0.1) would give t = 0.30000000000000004 and 3/11); voc12: 0.3 * 1
    report = voc_metrics(gt, perfect[:3])
    assert report.mAP["voc07"] == pytest.approx(4 / 11) and report.mAP["voc12"] == pytest.approx(0.3)


def test_voc_ap_directly():
    recall, precision = np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])
    assert voc_ap(recall, precision, "voc12") == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert voc_ap(recall, precision, "voc07") == pytest.approx((6 + 5 * 2 / 3) / 11)
    assert voc_ap(np.array([]), np.array([]), "voc07") == 0.0 and voc_ap(np.array([]), np.array([])) == 0.0


def test_voc_dataset_difficult_flags_reach_the_metric():
    dataset = build_dataset({"format": "voc", "images": str(FIXTURES / "raccoon_mini/images"),
                             "annotations": str(FIXTURES / "raccoon_mini/annotations")})
    gt = dataset_to_coco(dataset)
    assert [c["original_id"] for c in gt["categories"]] == dataset.cat_ids
    perfect = [det(r.image_id, box, 0.9, int(label)) for r in dataset.records for box, label in zip(r.boxes, r.labels)]
    report = voc_metrics(gt, perfect)
    assert report.mAP == {"voc07": 1.0, "voc12": 1.0}
    assert report.num_gt[dataset.classes[0]] == sum(int((~r.difficult).sum()) for r in dataset.records)
