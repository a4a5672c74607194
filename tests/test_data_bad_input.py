"""Bad input: each case is either a one-line error naming the file, or a repair counted and reported once."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURES
from detkit.data.build import build_dataset
from detkit.data.collate import Collate
from detkit.data.stats import dataset_stats
from detkit.data.transforms import build_pipeline
from detkit.errors import DataError


def _coco(tmp_path, images, annotations, categories=None):
    root = tmp_path / "imgs"
    root.mkdir(exist_ok=True)
    for name, (w, h) in images.items():
        Image.fromarray(np.full((h, w, 3), 120, np.uint8)).save(root / name)
    data = {"images": [{"id": i + 1, "file_name": n, "width": w, "height": h}
                       for i, (n, (w, h)) in enumerate(images.items())],
            "annotations": [{"id": k + 1, "iscrowd": 0, **a} for k, a in enumerate(annotations)],
            "categories": categories or [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    return {"format": "coco", "images": str(root), "annotations": str(ann)}


def test_box_repairs_are_counted_and_reported_once(tmp_path, caplog):
    cfg = _coco(tmp_path, {"x.png": (100, 80), "y.png": (100, 80)}, [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]},  # fine
        {"image_id": 1, "category_id": 1, "bbox": [90, 70, 30, 30]},  # partly outside: clipped
        {"image_id": 1, "category_id": 2, "bbox": [10, 10, 0, 5]},  # zero area: dropped
        {"image_id": 2, "category_id": 2, "bbox": [200, 10, 5, 5]},  # wholly outside: dropped
        {"image_id": 2, "category_id": 2, "bbox": [50, 10, -20, 5]},  # x2 < x1: dropped
        {"image_id": 2, "category_id": 999, "bbox": [1, 1, 5, 5]},  # unknown category id: dropped
        {"image_id": 7, "category_id": 1, "bbox": [1, 1, 5, 5]},  # unknown image id: dropped
    ])
    with caplog.at_level(logging.WARNING, logger="detkit.data"):
        ds = build_dataset({**cfg, "name": "toy"})
    assert [len(r.boxes) for r in ds.records] == [2, 0]
    np.testing.assert_allclose(ds.records[0].boxes[1], [90, 70, 100, 80])
    c = ds.problems.counts
    assert c["boxes clipped"] == 1 and c["boxes dropped (zero area)"] == 1
    assert c["boxes dropped (outside the image)"] == 1 and c["boxes dropped (x2 < x1 or y2 < y1)"] == 1
    assert c["annotations dropped (unknown category id 999)"] == 1
    assert c["annotations dropped (unknown image id 7)"] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("toy: ") and "in 2 images" in warnings[0]
    assert "1 boxes clipped" in warnings[0]


def test_missing_image_file_is_skipped_and_counted(tmp_path):
    cfg = _coco(tmp_path, {"x.png": (50, 40)}, [])
    data = json.loads(open(cfg["annotations"]).read())
    data["images"].append({"id": 2, "file_name": "gone.png", "width": 50, "height": 40})
    open(cfg["annotations"], "w").write(json.dumps(data))
    ds = build_dataset(cfg)
    assert len(ds) == 1 and ds.problems.counts["images skipped (file not found)"] == 1
    assert "gone.png" in ds.problems.files["images skipped (file not found)"][0]


def test_file_name_escaping_the_image_folder_is_refused(tmp_path):
    cfg = _coco(tmp_path, {"x.png": (50, 40)}, [])
    data = json.loads(open(cfg["annotations"]).read())
    data["images"][0]["file_name"] = "../../x.jpg"
    open(cfg["annotations"], "w").write(json.dumps(data))
    with pytest.raises(DataError, match=r"file_name '../../x.jpg' escapes the image folder .*: refused"):
        build_dataset(cfg)


@pytest.mark.parametrize("content, message", [
    ("", "annotation file is empty"),
    ("{not json", "malformed JSON (line 1, column 2"),
    ('{"images": []}', "no 'categories'"),
    ('[1, 2]', "not a COCO instances file"),
])
def test_bad_coco_json(tmp_path, content, message):
    (tmp_path / "imgs").mkdir()
    ann = tmp_path / "bad.json"
    ann.write_text(content)
    with pytest.raises(DataError) as e:
        build_dataset({"format": "coco", "images": str(tmp_path / "imgs"), "annotations": str(ann)})
    assert message in str(e.value) and str(ann) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("content, message", [
    ("", "annotation file is empty"),
    ("<annotation><object>", "malformed XML"),
    ("<other/>", "not a VOC annotation"),
    ("<annotation><object><name>raccoon</name></object></annotation>", "has no <bndbox>"),
    ("<annotation><object><name>r</name><bndbox><xmin>a</xmin></bndbox></object></annotation>", "is not a number"),
])
def test_bad_voc_xml(tmp_path, content, message):
    images, anns = tmp_path / "images", tmp_path / "annotations"
    shutil.copytree(FIXTURES / "raccoon_mini/images", images)
    shutil.copytree(FIXTURES / "raccoon_mini/annotations", anns)
    (anns / "raccoon-12.xml").write_text(content)
    with pytest.raises(DataError) as e:
        build_dataset({"format": "voc", "images": str(images), "annotations": str(anns)})
    assert message in str(e.value) and "raccoon-12.xml" in str(e.value)


def test_voc_unknown_class_is_counted(tmp_path):
    ds = build_dataset({"format": "voc", "images": str(FIXTURES / "raccoon_mini/images"),
                        "annotations": str(FIXTURES / "raccoon_mini/annotations"), "classes": ["dog"]})
    assert ds.problems.counts["objects dropped (unknown class 'raccoon')"] == 4


def test_yolo_bad_lines_and_unknown_class(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(images / "a.png")
    (labels / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.2 0.2\n")
    ds = build_dataset({"format": "yolo", "images": str(images), "classes": ["x", "y"]})  # labels/ guessed
    assert len(ds.records[0].boxes) == 1 and ds.problems.counts["labels dropped (unknown class id 7)"] == 1
    np.testing.assert_allclose(ds.records[0].boxes[0], [24, 16, 36, 24])
    (labels / "a.txt").write_text("0 0.5 0.5\n")
    with pytest.raises(DataError, match=r"a.txt:1: expected 'class cx cy w h'"):
        build_dataset({"format": "yolo", "images": str(images), "classes": ["x"]})
    (labels / "a.txt").write_text("zero 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DataError, match=r"a.txt:1: not numbers"):
        build_dataset({"format": "yolo", "images": str(images), "classes": ["x"]})


def _corrupt_files(tmp_path):
    cfg = _coco(tmp_path, {"ok.png": (40, 30), "trunc.jpg": (40, 30), "junk.png": (40, 30)},
                [{"image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10]}])
    root = tmp_path / "imgs"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(root / "trunc.jpg")
    data = (root / "trunc.jpg").read_bytes()
    (root / "trunc.jpg").write_bytes(data[: len(data) // 2])  # truncated
    (root / "junk.png").write_bytes(b"this is not an image")  # corrupt
    return cfg


def test_corrupt_and_truncated_images_are_skipped_with_a_count(tmp_path):
    ds = build_dataset(_corrupt_files(tmp_path))
    assert len(ds) == 3
    with pytest.raises(DataError, match="junk.png: cannot decode image"):
        ds.load(2)
    with pytest.raises(DataError, match="trunc.jpg: cannot decode image"):
        ds.load(1)
    ds.transform = build_pipeline("val", image_size=64, train=False)
    batch = Collate()([ds[i] for i in range(3)])  # training: the bad ones are left out and counted
    assert len(batch["targets"]) == 1 and len(batch["skipped"]) == 2
    stats = dataset_stats(ds)
    assert stats["problems"]["images that fail to load"]["count"] == 2


def test_mask_size_differs_from_image(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(images / "a.png")
    Image.fromarray(np.ones((20, 40), np.uint8)).save(masks / "a.png")
    sem = build_dataset({"format": "masks", "images": str(images), "annotations": str(masks), "classes": ["x", "y"]})
    with pytest.raises(DataError, match=r"masks/a.png: mask is 40x20 but image .*a.png is 40x30"):
        sem.load(0)
    inst = build_dataset({"format": "instance_masks", "images": str(images), "annotations": str(masks)})
    with pytest.raises(DataError, match=r"a.png: image is 40x30 but .*masks/a.png says 40x20"):
        inst.load(0)
    assert "skipped" in inst[0]


def test_missing_folders_and_files_name_the_path(tmp_path):
    with pytest.raises(DataError, match="image folder not found: .*nope"):
        build_dataset({"format": "voc", "images": str(tmp_path / "nope"), "annotations": str(tmp_path)})
    with pytest.raises(DataError, match="annotation file not found: .*none.json"):
        build_dataset({"format": "coco", "images": str(tmp_path), "annotations": str(tmp_path / "none.json")})
    with pytest.raises(DataError, match="split file not found"):
        build_dataset({"format": "voc", "images": str(FIXTURES / "raccoon_mini/images"),
                       "annotations": str(FIXTURES / "raccoon_mini/annotations"), "split": str(tmp_path / "s.txt")})


def test_cli_bad_input_is_one_line(tmp_path):
    ann = tmp_path / "bad.json"
    ann.write_text("{oops")
    out = subprocess.run([sys.executable, "-m", "detkit.cli", "data", "stats", "--format", "coco", "--images",
                          str(tmp_path), "--annotations", str(ann)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"detkit: error: {ann}: malformed JSON (line 1, column 2: "
                                               "Expecting property name enclosed in double quotes)"]


def test_symlinked_images_are_fine_and_duplicate_ids_are_refused(tmp_path):
    cfg = _coco(tmp_path, {"x.png": (50, 40)}, [{"image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}])
    elsewhere = tmp_path / "elsewhere.png"
    (tmp_path / "imgs/x.png").rename(elsewhere)
    (tmp_path / "imgs/x.png").symlink_to(elsewhere)
    ds = build_dataset(cfg)
    assert len(ds) == 1 and ds.load(0)["image"].shape == (40, 50, 3)
    data = json.loads(open(cfg["annotations"]).read())
    data["images"].append(dict(data["images"][0]))
    open(cfg["annotations"], "w").write(json.dumps(data))
    with pytest.raises(DataError, match="image id 1 is repeated"):
        build_dataset(cfg)


def test_malformed_coco_entries_are_counted_or_skipped(tmp_path):
    cfg = _coco(tmp_path, {"x.png": (50, 40)}, [
        {"image_id": 1, "category_id": 1, "bbox": ["a", 1, 5, 5]},
        {"image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "segmentation": [["p", "q", "r", "s", "t", "u"]]},
    ])
    ds = build_dataset(cfg)
    assert ds.problems.counts["annotations dropped (no valid bbox)"] == 1
    with pytest.raises(DataError, match="x.png: annotation 2: bad segmentation"):
        ds.load(0)
    assert "skipped" in ds[0]


def test_non_utf8_annotation_files(tmp_path):
    (tmp_path / "imgs").mkdir()
    ann = tmp_path / "latin1.json"
    ann.write_bytes('{"images": [], "categories": [{"id": 1, "name": "caf\xe9"}]}'.encode("latin-1"))
    with pytest.raises(DataError, match="latin1.json: not UTF-8 text"):
        build_dataset({"format": "coco", "images": str(tmp_path / "imgs"), "annotations": str(ann)})
