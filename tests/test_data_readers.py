"""Readers against the real datasets in ../shared (skipped without them), the fixtures and the shapes set."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURES, shapes_cfg, shared_path
from detkit.data.build import build_dataset
from detkit.data.shapes import CLASSES, make_shapes

CAMVID = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
          "Bicyclist"]


def _check_sample(ds, sample):
    h, w = sample["orig_size"]
    assert sample["image"].dtype == np.uint8 and sample["image"].shape == (h, w, 3)
    assert sample["boxes"].dtype == np.float32 and sample["boxes"].shape[1] == 4
    assert len(sample["labels"]) == len(sample["boxes"]) == len(sample["iscrowd"])
    if len(sample["labels"]):
        assert sample["labels"].min() >= 1 and sample["labels"].max() <= ds.num_classes
        b = sample["boxes"]
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert (b >= 0).all() and (b[:, [0, 2]] <= w).all() and (b[:, [1, 3]] <= h).all()


def test_voc_fixture():
    ds = build_dataset({"format": "voc", "images": str(FIXTURES / "raccoon_mini/images"),
                        "annotations": str(FIXTURES / "raccoon_mini/annotations")})
    assert len(ds) == 3 and ds.classes == ["raccoon"] and ds.cat_ids == ["raccoon"]
    assert sum(len(r.boxes) for r in ds.records) == 4
    for i in range(len(ds)):
        _check_sample(ds, ds.load(i))
    assert not ds.problems


def test_raccoon_voc_flat_layout():
    root = shared_path("datasets", "raccoon")
    ds = build_dataset({"format": "voc", "images": str(root / "images"), "annotations": str(root / "annotations")})
    assert len(ds) == 200 and sum(len(r.boxes) for r in ds.records) == 217
    assert ds.classes == ["raccoon"] and not ds.problems
    grey = [i for i, r in enumerate(ds.records) if Image.open(r.file).mode == "L"]
    assert len(grey) == 3  # PROVENANCE.md: 3 greyscale images, loaded as RGB
    _check_sample(ds, ds.load(grey[0]))


def test_voc_split_and_standard_layout(tmp_path):
    root = tmp_path / "VOC"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "ImageSets/Main").mkdir(parents=True)
    for f in (FIXTURES / "raccoon_mini/images").iterdir():
        (root / "JPEGImages" / f.name).write_bytes(f.read_bytes())
    for f in (FIXTURES / "raccoon_mini/annotations").iterdir():
        text = f.read_text().replace("<difficult>0</difficult>", "<difficult>1</difficult>", 1)
        (root / "Annotations" / f.name).write_text(text)
    (root / "ImageSets/Main/train.txt").write_text("raccoon-1\nraccoon-12\n")
    ds = build_dataset({"format": "voc", "images": str(root / "JPEGImages"), "annotations": str(root / "Annotations"),
                        "split": str(root / "ImageSets/Main/train.txt"), "classes": ["raccoon", "dog"]})
    assert len(ds) == 2 and ds.classes == ["raccoon", "dog"]
    assert all(r.difficult[0] for r in ds.records)  # difficult kept for VOC evaluation


def test_coco128_instances_json():
    root = shared_path("datasets", "coco128")
    ann = root / "annotations/instances_val2017.json"
    ds = build_dataset({"format": "coco", "images": str(root / "images/val2017"), "annotations": str(ann)})
    data = json.loads(ann.read_text())
    assert len(ds) == 100 and sum(len(r.boxes) for r in ds.records) == 712
    assert ds.num_classes == 80 and ds.label_to_cat(ds.classes.index("toothbrush") + 1) == 90
    areas = {a["id"]: a["area"] for a in data["annotations"]}
    checked = 0
    for i in range(5):
        s = ds.load(i)
        _check_sample(ds, s)
        assert s["masks"].shape == (len(s["boxes"]), *s["orig_size"])
        for m, ann_id in zip(s["masks"], ds.records[i].ann_ids):
            assert int(m.sum()) == pytest.approx(areas[ann_id], abs=1)  # RLE decoded to the right area
            checked += 1
    assert checked > 10
    assert sum(int(r.iscrowd.sum()) for r in ds.records) == sum(a["iscrowd"] for a in data["annotations"])


def test_coco128_yolo_labels_and_segments():
    root = shared_path("datasets", "coco128")
    ds = build_dataset({"format": "yolo", "images": str(root / "images/train2017"),
                        "annotations": str(root / "object_detection/labels/train2017"),
                        "classes": str(root / "object_detection/config.yaml")})
    lines = sum(len((root / "object_detection/labels/train2017" / f"{r.file.stem}.txt").read_text().split("\n")) - 1
                for r in ds.records if (root / "object_detection/labels/train2017" / f"{r.file.stem}.txt").exists())
    assert len(ds) == 128 and sum(len(r.boxes) for r in ds.records) == lines
    assert sum(len(r.boxes) == 0 for r in ds.records) == 2  # PROVENANCE.md: two background images
    assert ds.problems.counts["label files without an image (ignored)"] == 2
    seg = build_dataset({"format": "yolo", "images": str(root / "images/train2017"),
                         "annotations": str(root / "instance_segmentation/labels/train2017"),
                         "classes": str(root / "instance_segmentation/config.yaml")})
    assert seg.label_to_cat(1) == 1 and seg.classes[0] == "person"  # class ids are COCO category ids
    s = seg.load(0)
    _check_sample(seg, s)
    for box, m in zip(s["boxes"], s["masks"]):
        ys, xs = np.nonzero(m)
        assert abs(xs.min() - box[0]) <= 2 and abs(xs.max() + 1 - box[2]) <= 2  # polygon box == mask extent


def test_pennfudan_instance_masks():
    root = shared_path("datasets", "pennfudan", "PennFudanPed")
    ds = build_dataset({"format": "instance_masks", "images": str(root / "PNGImages"),
                        "annotations": str(root / "PedMasks"), "label_suffix": "_mask", "classes": ["pedestrian"]})
    assert len(ds) == 170 and sum(len(r.boxes) for r in ds.records) == 423  # PROVENANCE.md
    s = ds.load(0)
    _check_sample(ds, s)
    raw = np.asarray(Image.open(ds.records[0].mask_file))
    assert s["masks"].sum() == (raw > 0).sum() and len(s["masks"]) == raw.max()


def test_camvid_semantic_masks():
    root = shared_path("datasets", "camvid")
    ds = build_dataset({"format": "masks", "images": str(root / "train"), "annotations": str(root / "trainannot"),
                        "classes": CAMVID, "ignore_index": 11})
    assert len(ds) == 92 and ds.task == "semantic"  # PROVENANCE.md: 92 of 367 train images
    s = ds.load(0)
    raw = np.asarray(Image.open(ds.records[0].mask_file))
    assert s["semantic"].shape == s["orig_size"]
    assert set(np.unique(s["semantic"])) <= set(range(11)) | {255}
    assert (s["semantic"] == 255).sum() == (raw == 11).sum()
    assert (s["semantic"] == 3).sum() == (raw == 3).sum()


def test_coco128_semantic_with_class_mapping():
    root = shared_path("datasets", "coco128")
    ds = build_dataset({"format": "masks", "images": str(root / "images/val2017"),
                        "annotations": str(root / "semantic_segmentation/masks/val2017"),
                        "classes": str(root / "semantic_segmentation/config.yaml"), "ignore_index": 0})
    assert len(ds) == 100 and "unlabeled" not in ds.classes and ds.classes[0] == "person"
    assert ds.problems.counts["images skipped (no mask file)"] == 28  # masks cover 100 of 128 images
    s = ds.load(0)
    raw = np.asarray(Image.open(ds.records[0].mask_file))
    assert (s["semantic"] == 255).sum() == (raw == 0).sum()
    assert (s["semantic"] == 0).sum() == (raw == 1).sum()  # person: pixel value 1 -> class index 0


def test_shapes_dataset(shapes_dir, tmp_path):
    ds = build_dataset(shapes_cfg(shapes_dir, "train"))
    val = build_dataset(shapes_cfg(shapes_dir, "val"))
    assert len(ds) + len(val) == 36 and ds.classes == list(CLASSES)
    counts = np.bincount(np.concatenate([r.labels for r in ds.records]), minlength=5)[1:]
    assert (counts > 0).all()  # every class present
    sizes = np.concatenate([(r.boxes[:, 2] - r.boxes[:, 0]) for r in ds.records])
    assert sizes.min() < 20 and sizes.max() > 40  # varied sizes
    sem = build_dataset({"format": "masks", "images": str(shapes_dir / "images/train"),
                         "annotations": str(shapes_dir / "semantic/train"), "classes": ["background", *CLASSES]})
    for i in range(3):
        s, t = ds.load(i), sem.load(i)
        expected = np.zeros(s["orig_size"], np.int64)
        for m, label in zip(s["masks"], s["labels"]):
            expected[m > 0] = label
        assert np.array_equal(expected, t["semantic"])  # semantic PNGs agree with the instance masks
    # deterministic per seed
    make_shapes(tmp_path / "a", num_images=6, image_size=64, seed=1)
    make_shapes(tmp_path / "b", num_images=6, image_size=64, seed=1)
    make_shapes(tmp_path / "c", num_images=6, image_size=64, seed=2)
    a, b, c = (tmp_path / x / "images/train/000001.jpg" for x in "abc")
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    from pycocotools.coco import COCO

    coco = COCO(str(shapes_dir / "annotations/instances_val.json"))
    assert len(coco.getImgIds()) == len(val)
