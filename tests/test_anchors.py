"""k-means anchors (``detkit data anchors``): shape IoU, the k-means itself, BPR / mean IoU, level split, the CLI."""

from __future__ import annotations

import json
import re
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_CONFIG, shapes_cfg
from detkit.cli import main
from detkit.config import load_config
from detkit.data.anchors import (
    anchor_fit,
    anchors_override,
    dataset_box_sizes,
    kmeans_anchors,
    round_anchors,
    shape_iou,
    split_levels,
)
from detkit.data.dataset import Record

CENTRES = np.array([[8.0, 16.0], [32.0, 32.0], [100.0, 50.0]])


def _clusters(seed=0, n=200, sigma=0.05):
    rng = np.random.default_rng(seed)
    return np.concatenate([c * np.exp(rng.normal(0, sigma, (n, 2))) for c in CENTRES])


# ---------------------------------------------------------------------------------------------- shape IoU
def test_shape_iou_on_hand_made_values():
    iou = shape_iou([[4, 4], [10, 10], [2, 2]], [[2, 8], [10, 10], [4, 4]])
    assert iou.shape == (3, 3)
    assert iou[0, 0] == pytest.approx(8 / 24)  # inter 2x4, union 16 + 16 - 8
    assert iou[1, 1] == pytest.approx(1.0)
    assert iou[2, 2] == pytest.approx(4 / 16)  # a box inside the anchor: area ratio
    assert iou[0, 2] == pytest.approx(1.0)
    assert iou[1, 0] == pytest.approx(16 / 100)  # the anchor fits inside: 2x8 / 10x10
    assert np.all((iou >= 0) & (iou <= 1))


# ---------------------------------------------------------------------------------------------- k-means
def test_kmeans_recovers_three_known_clusters():
    anchors = kmeans_anchors(_clusters(), 3, seed=0)
    assert anchors.shape == (3, 2)
    # sorted by area, each within 3 % of its cluster's centre (the median of a log-normal cloud around it)
    np.testing.assert_allclose(anchors, CENTRES, rtol=0.03)


@pytest.mark.parametrize("center", ["median", "mean"])
def test_kmeans_is_deterministic_for_a_seed(center):
    wh = _clusters(seed=1, sigma=0.4)  # overlapping clouds: the result depends on the seeding
    a = kmeans_anchors(wh, 9, seed=7, center=center)
    b = kmeans_anchors(wh, 9, seed=7, center=center)
    np.testing.assert_array_equal(a, b)
    assert np.all(np.diff(a[:, 0] * a[:, 1]) >= 0)  # sorted by area


def test_kmeans_with_many_duplicates_finds_every_distinct_size():
    wh = np.array([[10.0, 10.0]] * 100 + [[50.0, 10.0], [10.0, 50.0], [80.0, 80.0]])
    anchors = kmeans_anchors(wh, 4, seed=0)
    assert sorted(map(tuple, anchors)) == [(10, 10), (10, 50), (50, 10), (80, 80)]


def test_kmeans_refuses_fewer_distinct_sizes_than_anchors_and_bad_sizes():
    with pytest.raises(ValueError, match="only 2 distinct box sizes"):
        kmeans_anchors([[10, 10], [10, 10], [20, 20]], 3)
    with pytest.raises(ValueError, match="positive"):
        kmeans_anchors([[10, 10], [0, 5]], 1)
    with pytest.raises(ValueError, match="no boxes"):
        kmeans_anchors(np.zeros((0, 2)), 1)


# ---------------------------------------------------------------------------------------------- fit
def test_anchor_fit_bpr_and_mean_iou_on_hand_made_boxes():
    anchors = [[10, 10], [20, 20]]
    boxes = [[10, 10],    # exact: ratio 1, IoU 1
             [20, 10],    # ratio 2 to both; IoU 0.5 with both
             [100, 10]]   # 5x wider than the 20x20, 10x wider than the 10x10: not recallable
    bpr, mean_iou = anchor_fit(boxes, anchors)
    assert bpr == pytest.approx(2 / 3)
    assert mean_iou == pytest.approx((1 + 0.5 + 200 / 1200) / 3)
    # the rule is strict: a ratio of exactly the threshold does not match
    assert anchor_fit([[40, 10]], [[10, 10]], ratio_thresh=4.0)[0] == 0.0
    assert anchor_fit([[40, 10]], [[10, 10]], ratio_thresh=4.01)[0] == 1.0
    assert anchor_fit([[100, 10]], [[10, 10], [20, 20]], ratio_thresh=11)[0] == 1.0


def test_round_and_split_levels_fine_to_coarse():
    anchors = round_anchors([[60.4, 61], [0.2, 0.3], [10, 9.6], [33, 23], [16, 30], [120, 90]])
    assert anchors.dtype == np.int64 and anchors.min() >= 1
    groups = split_levels(anchors[::-1], 3)  # any input order
    assert [g.tolist() for g in groups] == [[[1, 1], [10, 10]], [[16, 30], [33, 23]], [[60, 61], [120, 90]]]
    assert anchors_override(groups) == \
        "model.head.params.anchors=[[[1,1],[10,10]],[[16,30],[33,23]],[[60,61],[120,90]]]"
    with pytest.raises(ValueError, match="evenly"):
        split_levels(anchors, 4)


# ---------------------------------------------------------------------------------------------- dataset
def test_dataset_box_sizes_scale_like_the_letterbox_and_leave_out_crowd_and_degenerate(tmp_path):
    Image.new("RGB", (200, 50)).save(tmp_path / "b.png")  # no size in its annotations: read from the header
    records = [
        Record(1, tmp_path / "a.png", width=400, height=300,
               boxes=np.array([[0, 0, 40, 20], [10, 10, 110, 60], [5, 5, 5, 30]], np.float32),
               iscrowd=np.array([False, True, False])),
        Record(2, tmp_path / "b.png", boxes=np.array([[0, 0, 20, 10]], np.float32), iscrowd=np.zeros(1, bool)),
        Record(3, tmp_path / "missing.png", boxes=np.array([[0, 0, 20, 10]], np.float32)),
        Record(4, tmp_path / "empty.png", width=10, height=10),
    ]
    counts = Counter()
    wh = dataset_box_sizes(SimpleNamespace(records=records), 100, counts)
    np.testing.assert_allclose(wh, [[10, 5], [10, 5]])  # x 100/400 and x 100/200
    assert counts == Counter(images=4, boxes=2, crowd=1, degenerate=1, unsized=1)
    np.testing.assert_allclose(dataset_box_sizes(SimpleNamespace(records=records[:1]), None), [[40, 20]])


# ---------------------------------------------------------------------------------------------- CLI
def _shapes_overrides(root):
    cfg = shapes_cfg(root)
    return [f"data.train.images={cfg['images']}", f"data.train.annotations={cfg['annotations']}", "data.generate=null"]


def _override_line(text):
    lines = [line for line in text.splitlines() if line.startswith("model.head.params.anchors=")]
    assert len(lines) == 1, text
    assert " " not in lines[0]
    return lines[0]


def test_cli_with_a_config_prints_fit_and_an_override_the_config_takes(shapes_dir, capsys, tmp_path):
    out = tmp_path / "anchors.yaml"
    code = main(["data", "anchors", str(TINY_CONFIG), *_shapes_overrides(shapes_dir), "--num-anchors", "9",
                 "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    bpr = float(re.search(r"best possible recall \(BPR.*\): ([0-9.]+)", text).group(1))
    mean_iou = float(re.search(r"mean IoU.*: ([0-9.]+)", text).group(1))
    assert 0.9 <= bpr <= 1 and 0.5 < mean_iou <= 1
    assert "at image size 128" in text and "p3" in text and "p5" in text
    override = _override_line(text)
    anchors = load_config(TINY_CONFIG, [override]).model.head.params.anchors
    assert np.array(anchors).shape == (3, 3, 2)  # levels x anchors per level x (w, h)
    flat = np.array(anchors).reshape(-1, 2)
    assert np.all(np.diff(flat[:, 0] * flat[:, 1]) >= 0)  # fine to coarse
    # the YAML snippet says the same
    assert load_config(out).model.head.params.anchors == anchors


def test_cli_with_format_matches_the_config_form(shapes_dir, capsys):
    cfg = shapes_cfg(shapes_dir)
    assert main(["data", "anchors", "--format", "coco", "--images", cfg["images"], "--annotations",
                 cfg["annotations"], "--num-anchors", "6", "--levels", "2", "--image-size", "96"]) == 0
    by_format = _override_line(capsys.readouterr().out)
    assert np.array(load_config(None, [by_format]).model.head.params.anchors).shape == (2, 3, 2)
    assert main(["data", "anchors", str(TINY_CONFIG), *_shapes_overrides(shapes_dir), "data.image_size=96",
                 "--num-anchors", "6", "--levels", "2"]) == 0
    assert _override_line(capsys.readouterr().out) == by_format


def _one_line_error(capsys, *args):
    assert main(["data", "anchors", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("detkit: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_cli_bad_input_is_one_line(shapes_dir, capsys, tmp_path):
    overrides = _shapes_overrides(shapes_dir)
    assert "evenly" in _one_line_error(capsys, str(TINY_CONFIG), *overrides, "--num-anchors", "9", "--levels", "2")
    empty = json.loads((shapes_dir / "annotations" / "instances_train.json").read_text())
    empty["annotations"] = []
    path = tmp_path / "empty.json"
    path.write_text(json.dumps(empty))
    assert "no boxes" in _one_line_error(capsys, "--format", "coco", "--images", shapes_cfg(shapes_dir)["images"],
                                         "--annotations", str(path))
    assert "fewer" in _one_line_error(capsys, str(TINY_CONFIG), *overrides, "--num-anchors", "6000", "--levels", "1")


def test_cli_takes_levels_and_ratio_from_a_yolo_config(shapes_dir, capsys):
    overrides = [*_shapes_overrides(shapes_dir), "model.head.name=yolo", "model.neck.levels=[p3,p4]",
                 "model.head.params={ratio_thresh: 2.0}"]
    assert main(["data", "anchors", str(TINY_CONFIG), *overrides, "--num-anchors", "4"]) == 0
    text = capsys.readouterr().out
    assert "ratio < 2)" in text
    assert np.array(load_config(TINY_CONFIG, [_override_line(text)]).model.head.params.anchors).shape == (2, 2, 2)
