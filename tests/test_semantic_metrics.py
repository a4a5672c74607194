"""Semantic segmentation metrics: confusion matrix, mIoU / accuracy / Dice and the absent-class rule, the
evaluator (first copy wins, compact storage, DDP gather), the text table and the confusion-matrix plot."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_gloo
from detkit.data.dataset import SEMANTIC_IGNORE
from detkit.evaluation import (
    SemanticEvaluator,
    confusion_matrix,
    format_semantic_table,
    format_table,
    semantic_metrics,
)

IGN = SEMANTIC_IGNORE


# --- confusion_matrix ---------------------------------------------------------------------------------------------

def test_confusion_matrix_by_hand_with_ignored_pixels():
    target = torch.tensor([[0, 0, 1], [1, 2, IGN]])
    pred = torch.tensor([[0, 1, 1], [2, 2, 0]])
    cm = confusion_matrix(pred, target, 3)
    assert cm.dtype == torch.int64 and cm.shape == (3, 3)
    # rows: ground truth, columns: prediction; the ignored pixel (predicted 0) counts nowhere
    assert cm.tolist() == [[1, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert int(cm.sum()) == 5


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64])
def test_confusion_matrix_accepts_numpy_of_any_integer_dtype_and_any_shape(dtype):
    target = np.array([[[2, 2], [0, IGN]], [[1, 1], [1, 0]]], dtype=dtype)  # 2 x 2 x 2
    pred = np.array([[[2, 0], [0, 1]], [[1, 1], [2, 0]]], dtype=dtype)
    assert confusion_matrix(pred, target, 3).tolist() == [[2, 0, 0], [0, 2, 1], [1, 0, 1]]
    mixed = confusion_matrix(torch.as_tensor(pred.astype(np.int64)), target, 3)  # tensor and array together
    assert mixed.tolist() == [[2, 0, 0], [0, 2, 1], [1, 0, 1]]


def test_confusion_matrix_other_ignore_index():
    target = torch.tensor([0, 1, 1, 2])
    pred = torch.tensor([0, 0, 1, 2])
    assert confusion_matrix(pred, target, 3, ignore_index=1).tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 1]]
    assert confusion_matrix(pred, target, 3, ignore_index=None).tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]


@pytest.mark.parametrize(("pred", "target", "message"), [
    ([0, 1], [0, 3], "target has value 3 outside the classes 0..2"),
    ([0, 1], [-1, 0], "target has value -1 outside"),
    ([0, 5], [0, 1], "pred has value 5 outside the classes 0..2"),
    ([IGN, 1], [IGN, 1], "pred has value 255 outside"),  # predictions are checked at ignored pixels too
    ([-2, 0], [0, 0], "pred has value -2"),
    ([0, 1, 2], [0, 1], "pred shape (3,) != target shape (2,)"),
])
def test_confusion_matrix_errors_name_the_bad_value(pred, target, message):
    with pytest.raises(ValueError) as info:
        confusion_matrix(torch.tensor(pred), torch.tensor(target), 3)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_confusion_matrix_rejects_float_maps_and_bad_num_classes():
    with pytest.raises(ValueError, match="pred dtype torch.float32"):
        confusion_matrix(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="target dtype float64"):
        confusion_matrix(np.zeros((2, 2), np.int64), np.zeros((2, 2)), 3)
    with pytest.raises(ValueError, match="num_classes 0"):
        confusion_matrix(torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), 0)


def test_confusion_matrix_equals_a_brute_force_double_loop():
    rng = np.random.default_rng(0)
    k = 5
    for _ in range(3):
        target = rng.integers(0, k, (13, 17))
        target[rng.random((13, 17)) < 0.2] = IGN
        pred = rng.integers(0, k, (13, 17))
        expected = np.zeros((k, k), np.int64)
        for i in range(target.shape[0]):
            for j in range(target.shape[1]):
                if target[i, j] != IGN:
                    expected[target[i, j], pred[i, j]] += 1
        assert confusion_matrix(torch.as_tensor(pred), torch.as_tensor(target), k).tolist() == expected.tolist()


# --- semantic_metrics ---------------------------------------------------------------------------------------------

def test_perfect_prediction_is_all_ones():
    m = semantic_metrics(torch.diag(torch.tensor([3, 5, 2])), ["a", "b", "c"])
    assert m["mIoU"] == m["pixel_acc"] == m["mean_class_acc"] == m["dice"] == 1.0
    for key in ("per_class", "per_class_acc", "per_class_dice"):
        assert m[key] == {"a": 1.0, "b": 1.0, "c": 1.0}


def test_three_classes_by_hand():
    cm = np.array([[5, 1, 0],
                   [2, 3, 1],
                   [0, 0, 4]])
    m = semantic_metrics(cm)
    # TP 5, 3, 4; GT (row sums) 6, 6, 4; predicted (column sums) 7, 4, 5; union 8, 7, 5
    assert m["per_class"] == pytest.approx({"0": 5 / 8, "1": 3 / 7, "2": 4 / 5})
    assert m["per_class_acc"] == pytest.approx({"0": 5 / 6, "1": 3 / 6, "2": 4 / 4})
    assert m["per_class_dice"] == pytest.approx({"0": 10 / 13, "1": 6 / 10, "2": 8 / 9})
    assert m["mIoU"] == pytest.approx((5 / 8 + 3 / 7 + 4 / 5) / 3)
    assert m["mean_class_acc"] == pytest.approx((5 / 6 + 1 / 2 + 1) / 3)
    assert m["dice"] == pytest.approx((10 / 13 + 6 / 10 + 8 / 9) / 3)
    assert m["pixel_acc"] == pytest.approx(12 / 16)
    assert all(type(v) is float for v in m["per_class"].values()) and type(m["mIoU"]) is float


def test_class_absent_from_prediction_and_ground_truth_is_none_and_left_out():
    cm = [[3, 1, 0],
          [1, 2, 0],
          [0, 0, 0]]
    m = semantic_metrics(cm, ["a", "b", "c"])
    assert m["per_class"]["c"] is None and m["per_class_dice"]["c"] is None and m["per_class_acc"]["c"] is None
    assert m["per_class"] == pytest.approx({"a": 3 / 5, "b": 2 / 4, "c": None})
    assert m["mIoU"] == pytest.approx(0.55)  # (3/5 + 1/2) / 2, not / 3
    assert m["dice"] == pytest.approx((6 / 8 + 4 / 6) / 2)
    assert m["mean_class_acc"] == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert m["pixel_acc"] == pytest.approx(5 / 7)


def test_class_predicted_but_absent_from_ground_truth_counts_as_zero():
    m = semantic_metrics(torch.tensor([[3, 1],
                                       [0, 0]]))
    assert m["per_class"] == {"0": 0.75, "1": 0.0}
    assert m["per_class_dice"] == pytest.approx({"0": 6 / 7, "1": 0.0})
    assert m["per_class_acc"] == {"0": 0.75, "1": None}  # no ground-truth pixels: no accuracy
    assert m["mIoU"] == pytest.approx(0.375)
    assert m["dice"] == pytest.approx(3 / 7)
    assert m["mean_class_acc"] == 0.75 and m["pixel_acc"] == 0.75


def test_empty_matrix_is_all_none():
    m = semantic_metrics(torch.zeros(3, 3, dtype=torch.int64), ["a", "b", "c"])
    assert m["mIoU"] is m["pixel_acc"] is m["mean_class_acc"] is m["dice"] is None
    for key in ("per_class", "per_class_acc", "per_class_dice"):
        assert m[key] == {"a": None, "b": None, "c": None}


def test_semantic_metrics_errors():
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        semantic_metrics(np.zeros((2, 3), np.int64))
    with pytest.raises(ValueError, match="1 names for 2 classes"):
        semantic_metrics(np.eye(2, dtype=np.int64), ["a"])
    with pytest.raises(ValueError, match="duplicate 'a'"):
        semantic_metrics(np.eye(2, dtype=np.int64), ["a", "a"])
    with pytest.raises(ValueError, match="negative count -1"):
        semantic_metrics(np.array([[1, -1], [0, 1]]))


# --- SemanticEvaluator --------------------------------------------------------------------------------------------

def random_maps(num_images: int, k: int, seed: int = 0, size: tuple[int, int] = (6, 7)):
    """``num_images`` (prediction, target) pairs of int64 label maps, a few ignored pixels, ~60 % correct."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(num_images):
        target = rng.integers(0, k, size)
        pred = np.where(rng.random(size) < 0.6, target, rng.integers(0, k, size))
        target[rng.random(size) < 0.1] = IGN
        pairs.append((torch.as_tensor(pred), torch.as_tensor(target)))
    return pairs


def test_evaluator_repeated_image_ids_count_once():
    pairs = random_maps(5, 4)
    evaluator = SemanticEvaluator(4, ["a", "b", "c", "d"])
    evaluator.update([p for p, _ in pairs[:3]], [t for _, t in pairs[:3]], [10, 11, 12])
    # image 11 again, with other maps: the first copy wins
    evaluator.update([pairs[3][0], pairs[4][0], pairs[0][0]], [pairs[3][1], pairs[4][1], pairs[0][1]],
                     torch.tensor([11, 13, 10]))
    assert len(evaluator) == 4 and evaluator._repeated == 2
    expected_cm = sum(confusion_matrix(p, t, 4) for p, t in (pairs[0], pairs[1], pairs[2], pairs[4]))
    assert torch.equal(evaluator.confusion, expected_cm)
    metrics = evaluator.compute()
    assert metrics == {**semantic_metrics(expected_cm, ["a", "b", "c", "d"]), "images": 4}
    assert evaluator.compute(only_seen=True) == metrics  # accepted for parity, changes nothing
    assert 0.3 < metrics["mIoU"] < 0.9
    evaluator.gather()  # no process group: a no-op
    assert len(evaluator) == 4
    evaluator.reset()
    assert len(evaluator) == 0 and evaluator.compute()["mIoU"] is None and evaluator.compute()["images"] == 0


def test_evaluator_update_errors():
    evaluator = SemanticEvaluator(3)
    with pytest.raises(ValueError, match="2 predictions, 1 targets and 2 image ids"):
        evaluator.update([torch.zeros(2, 2, dtype=torch.long)] * 2, [torch.zeros(2, 2, dtype=torch.long)], [1, 2])
    with pytest.raises(ValueError, match=r"pred shape \(2, 3\) != target shape \(2, 2\)"):
        evaluator.update([torch.zeros(2, 3, dtype=torch.long)], [torch.zeros(2, 2, dtype=torch.long)], [1])
    with pytest.raises(ValueError, match="2 names for 3 classes"):
        SemanticEvaluator(3, ["a", "b"])


def test_evaluator_stores_133_classes_compactly():
    k = 133
    pairs = random_maps(20, k, seed=1, size=(8, 8))
    evaluator = SemanticEvaluator(k)
    evaluator.update([p for p, _ in pairs], [t for _, t in pairs], range(20))
    dense = sum(confusion_matrix(p, t, k) for p, t in pairs)
    assert torch.equal(evaluator.confusion, dense)
    for (cells, counts), (p, t) in zip(evaluator._entries.values(), pairs):
        one = confusion_matrix(p, t, k).reshape(-1)
        assert cells.size == counts.size == int((one > 0).sum()) <= 64  # at most one cell per pixel, not K * K
        assert counts.sum() == int((t != IGN).sum())
    assert sum(c.nbytes + n.nbytes for c, n in evaluator._entries.values()) < 20 * 64 * 12
    assert evaluator.compute() == {**semantic_metrics(dense), "images": 20}


def _gather_body(rank: int, world: int) -> dict:
    pairs = random_maps(9, 4, seed=2)
    indices = list(range(9)) + [0]  # DistributedSampler pads 9 images to 10 by repeating the first
    mine = indices[rank::world] + ([4] if rank == 1 else [])  # image 4 also done by rank 1
    evaluator = SemanticEvaluator(4, ["a", "b", "c", "d"])
    for start in range(0, len(mine), 3):
        batch = mine[start:start + 3]
        evaluator.update([pairs[i][0] for i in batch], [pairs[i][1] for i in batch], [100 + i for i in batch])
    evaluator.gather()
    return {"n": len(evaluator), "confusion": evaluator.confusion.tolist(), "metrics": evaluator.compute()}


@pytest.mark.timeout(120)
def test_gather_under_two_gloo_processes_equals_one_process(tmp_path):
    ranks = run_gloo(_gather_body, tmp_path)
    pairs = random_maps(9, 4, seed=2)
    single = SemanticEvaluator(4, ["a", "b", "c", "d"])
    single.update([p for p, _ in pairs], [t for _, t in pairs], [100 + i for i in range(9)])
    expected = json.loads(json.dumps(single.compute()))
    for got in ranks:
        assert got["n"] == 9
        assert got["confusion"] == single.confusion.tolist()
        assert got["metrics"] == expected  # exactly, not approximately
    assert 0.3 < expected["mIoU"] < 0.9


# --- table and plot -----------------------------------------------------------------------------------------------

def test_format_semantic_table_and_format_table_dispatch():
    metrics = {**semantic_metrics([[3, 1, 0], [1, 2, 0], [0, 0, 0]], ["road", "sky", "car"]), "images": 2}
    text = format_semantic_table(metrics)
    lines = text.splitlines()
    assert lines[0] == "mIoU 0.550   pixel_acc 0.714   mean_class_acc 0.708   dice 0.708"
    assert lines[3].split() == ["class", "IoU", "acc", "Dice", "class", "IoU", "acc", "Dice"]  # 2 classes a row
    assert lines[4].split() == ["road", "0.600", "0.750", "0.750", "sky", "0.500", "0.667", "0.667"]
    assert lines[5].split() == ["car", "-", "-", "-"]
    assert format_table(metrics) == text
    assert format_table(metrics, columns=3) == format_semantic_table(metrics, columns=3)
    assert len(format_semantic_table(metrics, columns=3).splitlines()) == 5
    assert SemanticEvaluator.format_table(metrics) == text


def test_format_table_detection_unchanged():
    text = format_table({"voc07_mAP": 0.5, "per_class": {"cat": 0.25, "dog": None, "bus": 1.0, "car": 0.5}})
    assert text.splitlines() == ["voc07_mAP 0.500", "", "per-class AP",
                                 "class     AP    class     AP    class     AP",
                                 "cat  0.250    dog      -    bus  1.000",
                                 "car  0.500"]


def test_plot_confusion_matrix_writes_a_png(tmp_path):
    evaluator = SemanticEvaluator(3, ["road", "sky", "a/b"])
    target = torch.tensor([[0, 0, 1], [1, 1, IGN]])  # class 2 has no ground truth: a blank row
    pred = torch.tensor([[0, 2, 1], [0, 1, 1]])
    evaluator.update([pred], [target], ["img"])
    path = evaluator.plot_confusion_matrix(tmp_path / "plots" / "confusion.png")
    assert path == tmp_path / "plots" / "confusion.png"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 200
