"""Prediction end to end: the Predictor on mixed inputs, ``classes`` filtering, ``predictions.json`` (boxes,
Mask R-CNN RLEs, U-Net per-class RLEs with the dataset's own ids) and ``detkit predict`` / ``tools/infer.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

import detkit
from conftest import ROOT, TINY_CONFIG, tiny_detector_overrides
from detkit.cli import main
from detkit.errors import ConfigError
from detkit.inference import Predictor
from detkit.inference.run import predict_files

MASK_RCNN = ROOT / "configs" / "mask_rcnn" / "shapes.yaml"
UNET = ROOT / "configs" / "unet" / "shapes.yaml"
SHAPES = ["circle", "square", "triangle", "star"]
SEMANTIC = ["background", *SHAPES]


def decode(rle):
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


_modules: dict = {}


def predictor_of(run, **kwargs) -> Predictor:
    """A Predictor over the run's best checkpoint, loaded once per run (loading dominates a Predictor's start)."""
    from detkit.engine.run import load_checkpoint, resolve_checkpoint

    if run not in _modules:
        _modules[run] = load_checkpoint(resolve_checkpoint(run, "best"))
    return Predictor(_modules[run], **kwargs)


def val_images(shapes_dir, n=None):
    return sorted((shapes_dir / "images" / "val").glob("*.jpg"))[:n]


@pytest.fixture(scope="module")
def det_run(shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict_det") / "run"
    return detkit.train(TINY_CONFIG, tiny_detector_overrides(shapes_dir, out, "train.epochs=1",
                                                             "trainer.limit_train_batches=2",
                                                             "trainer.limit_val_batches=1",
                                                             "model.head.params.box_score_thresh=0.0"))


@pytest.fixture(scope="module")
def mask_run(shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict_mask") / "run"
    overrides = tiny_detector_overrides(shapes_dir, out, "train.epochs=1", "trainer.limit_train_batches=2",
                                        "trainer.limit_val_batches=1", "model.head.params.mask_head_layers=[16,16]",
                                        "model.head.params.box_score_thresh=0.0",
                                        "model.head.params.box_detections_per_img=20")
    return detkit.train(detkit.load_config(MASK_RCNN, overrides))


@pytest.fixture(scope="module")
def unet_run(shapes_dir, tmp_path_factory):
    """A U-Net trained on the shapes label maps rewritten with pixel values 10 * index + 5 (classes given as
    ``{5: background, 15: circle, ...}``): the dataset's ids are not the class indices."""
    base = tmp_path_factory.mktemp("predict_unet")
    for split in ("train", "val"):
        (base / split).mkdir()
        for png in (shapes_dir / "semantic" / split).glob("*.png"):
            v = np.asarray(Image.open(png)).astype(np.int64)
            Image.fromarray(np.where(v < len(SEMANTIC), v * 10 + 5, 255).astype(np.uint8)).save(base / split / png.name)
    classes = base / "classes.yaml"
    classes.write_text("names: {" + ", ".join(f"{10 * i + 5}: {n}" for i, n in enumerate(SEMANTIC)) + "}\n")
    r = shapes_dir
    return detkit.train(UNET, [
        f"data.train.images={r}/images/train", f"data.train.annotations={base}/train", f"data.train.classes={classes}",
        f"data.val.images={r}/images/val", f"data.val.annotations={base}/val", f"data.val.classes={classes}",
        "data.generate=null", "data.image_size=64", "data.batch_size=4", "data.num_workers=0",
        "model.head.params.decoder_channels=[32,16,16,8,8]", "train.warmup_iters=2", "train.lr=0.01",
        "train.epochs=2", "trainer.limit_train_batches=4", "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.accelerator=cpu",
        f"output_dir={base / 'run'}"])


# ------------------------------------------------------------------------------------------ the Predictor
def test_mixed_inputs_of_different_sizes_in_one_batch_equal_single_calls(det_run, shapes_dir):
    predictor = Predictor.from_checkpoint(det_run, batch_size=2, score_threshold=0.0)
    files = val_images(shapes_dir, 4)
    pil = Image.open(files[1]).convert("RGB").resize((120, 80))
    array = np.asarray(Image.open(files[2]).convert("RGB").resize((50, 90)))
    tensor = torch.from_numpy(np.array(Image.open(files[3]).convert("RGB").resize((70, 61)))).permute(2, 0, 1)
    tensor = tensor.float() / 255
    inputs = [str(files[0]), pil, array, tensor]
    sizes = [Image.open(files[0]).size[::-1], (80, 120), (90, 50), (61, 70)]  # (h, w)
    batched = predictor(inputs)
    assert isinstance(batched, list) and len(batched) == 4
    for image, (h, w), got in zip(inputs, sizes, batched):
        assert len(got["boxes"]) > 0
        boxes = got["boxes"]
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= w + 1e-4).all() and (boxes[:, 3] <= h + 1e-4).all()
        assert (boxes[:, 2] > w / 2).any() or (boxes[:, 3] > h / 2).any()  # not squeezed into the model's size
        alone = predictor(image)  # one input in, one result (a dict) out
        assert isinstance(alone, dict) and torch.equal(alone["labels"], got["labels"])
        assert torch.allclose(alone["boxes"], boxes, atol=1e-4, rtol=0)
        assert torch.allclose(alone["scores"], got["scores"], atol=1e-4, rtol=0)
        assert got["names"] == [SHAPES[int(i) - 1] for i in got["labels"]]


def test_classes_keep_only_the_named_detections(det_run, shapes_dir):
    file = str(val_images(shapes_dir, 1)[0])
    every = predictor_of(det_run, score_threshold=0.0)(file)
    counts = torch.bincount(every["labels"], minlength=len(SHAPES) + 1)
    assert (counts > 0).sum() >= 2, counts  # the tiny model finds two classes at least: one is filtered out
    label = int(torch.where(counts > 0, counts, counts.max() + 1).argmin())  # the rarest class found
    name = SHAPES[label - 1]
    expected = every["labels"] == label
    for wanted in (name, [name], f" {name}, "):
        only = predictor_of(det_run, score_threshold=0.0, classes=wanted)(file)
        assert set(only["names"]) == {name} and (only["labels"] == label).all()
        assert torch.equal(only["boxes"], every["boxes"][expected])
        assert torch.equal(only["scores"], every["scores"][expected])
    for everything in ("", " , "):
        assert torch.equal(predictor_of(det_run, score_threshold=0.0, classes=everything)(file)["boxes"],
                           every["boxes"])


def test_unknown_class_names_are_a_one_line_error(det_run, unet_run, capsys, tmp_path):
    with pytest.raises(ConfigError) as err:
        predictor_of(det_run, classes="circle,hexagon,dog")
    message = str(err.value)
    assert "'hexagon', 'dog'" in message and "circle, square, triangle, star" in message and "\n" not in message
    assert "'circle'" not in message
    with pytest.raises(ConfigError, match=r"'cat'.*background, circle, square, triangle, star"):
        predictor_of(unet_run, classes=["cat"])
    image = tmp_path / "a.jpg"
    Image.new("RGB", (40, 30)).save(image)
    assert main(["predict", str(det_run), str(image), "--out", str(tmp_path / "o"), "--classes", "hexagon"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("detkit: error: unknown class 'hexagon'") and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------ predictions.json
def test_detection_results_carry_names_and_the_dataset_ids(det_run, shapes_dir, tmp_path):
    predictor = predictor_of(det_run, score_threshold=0.0)
    files = val_images(shapes_dir, 2)
    expected = predictor([str(f) for f in files])
    summary = predict_files(predictor, files, tmp_path)
    results = json.loads((tmp_path / "predictions.json").read_text())
    assert summary["detections"] == len(results) == sum(len(e["boxes"]) for e in expected)
    coco = json.loads((shapes_dir / "annotations" / "instances_val.json").read_text())
    ids = {c["name"]: c["id"] for c in coco["categories"]}
    for r in results:
        assert set(r) == {"image_id", "file_name", "category_id", "category_name", "bbox", "score"}
        assert r["category_id"] == ids[r["category_name"]] and isinstance(r["category_id"], int)
    first = [r for r in results if r["image_id"] == 1]
    assert all(r["file_name"] == str(files[0]) for r in first)
    assert [r["category_name"] for r in first] == expected[0]["names"]
    xyxy = np.array([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in first)])
    np.testing.assert_allclose(xyxy, expected[0]["boxes"].numpy(), atol=1e-4)


def test_mask_rcnn_results_have_rles_at_the_original_size(mask_run, shapes_dir, tmp_path):
    predictor = Predictor.from_checkpoint(mask_run, batch_size=2, score_threshold=0.0)
    src = val_images(shapes_dir, 2)
    files = [tmp_path / "wide.jpg", tmp_path / "tall.png"]
    Image.open(src[0]).convert("RGB").resize((150, 110)).save(files[0])
    Image.open(src[1]).convert("RGB").resize((70, 130)).save(files[1])
    expected = predictor([str(f) for f in files])  # the batch predict_files makes
    predict_files(predictor, files, tmp_path / "out")
    results = json.loads((tmp_path / "out" / "predictions.json").read_text())
    by_image = defaultdict(list)
    for r in results:
        by_image[r["image_id"]].append(r)
    assert sorted(by_image) == [1, 2]
    for image_id, (w, h), exp in zip((1, 2), ((150, 110), (70, 130)), expected):
        got = by_image[image_id]
        assert len(got) == len(exp["masks"]) > 0 and exp["masks"].shape[1:] == (h, w)
        assert sum(int(m.sum()) for m in exp["masks"]) > 0
        for r, mask, name in zip(got, exp["masks"].numpy(), exp["names"]):
            assert r["segmentation"]["size"] == [h, w] and isinstance(r["segmentation"]["counts"], str)
            assert np.array_equal(decode(r["segmentation"]), mask)
            assert r["category_name"] == name
    # COCO's own loader takes the file as instance-segmentation results
    from pycocotools.coco import COCO

    gt = COCO()
    gt.dataset = {"images": [{"id": 1, "width": 150, "height": 110}, {"id": 2, "width": 70, "height": 130}],
                  "annotations": [], "categories": [{"id": i, "name": n} for i, n in enumerate(SHAPES, 1)]}
    gt.createIndex()
    assert len(gt.loadRes(str(tmp_path / "out" / "predictions.json")).anns) == len(results)


def test_unet_results_are_per_class_rles_of_the_label_maps_with_dataset_ids(unet_run, shapes_dir, tmp_path):
    predictor = predictor_of(unet_run)
    assert predictor.classes == SEMANTIC
    files = val_images(shapes_dir, 3)
    summary = predict_files(predictor, files, tmp_path)
    results = json.loads((tmp_path / "predictions.json").read_text())
    seen = set()
    for image_id, f in enumerate(files, 1):
        labels = np.asarray(Image.open(tmp_path / f"{f.stem}_labels.png"))
        assert labels.shape == Image.open(f).size[::-1] and (tmp_path / f"{f.stem}.jpg").is_file()
        got = [r for r in results if r["image_id"] == image_id]
        present = [int(v) for v in np.unique(labels) if v != 255]
        assert [r["category_name"] for r in got] == [SEMANTIC[v] for v in present]
        for r, v in zip(got, present):
            assert r["category_id"] == 10 * v + 5  # the dataset's own pixel value, not the index
            assert r["file_name"] == str(f) and r["segmentation_file"] == f"{f.stem}_labels.png"
            assert np.array_equal(decode(r["segmentation"]), labels == v)
            assert r["area"] == int((labels == v).sum()) > 0
            seen.add(v)
        assert sum(r["area"] for r in got) == int((labels != 255).sum())
    assert len(seen) >= 2, "the tiny U-Net should find more than one class"
    assert summary["per_class"] == {SEMANTIC[v]: sum(SEMANTIC[v] == r["category_name"] for r in results)
                                    for v in seen}
    # --classes for a segmenter: other pixels become unlabeled, only the kept class is listed
    keep = SEMANTIC[max(seen)]
    only = predictor_of(unet_run, classes=keep)
    every, kept = predictor(str(files[0])), only(str(files[0]))
    index = SEMANTIC.index(keep)
    expected = torch.where(every["semantic"] == index, index, 255)
    assert torch.equal(kept["semantic"], expected)
    assert kept["names"] == ([keep] if (expected == index).any() else [])
    predict_files(only, files, tmp_path / "only")
    assert {r["category_name"] for r in json.loads((tmp_path / "only" / "predictions.json").read_text())} == {keep}


# ------------------------------------------------------------------------------------------ command line
def test_cli_predict_a_glob_a_folder_and_an_unreadable_file(det_run, shapes_dir, tmp_path, capsys):
    val = val_images(shapes_dir, 5)
    (tmp_path / "globbed").mkdir()
    (tmp_path / "folder" / "sub").mkdir(parents=True)
    for f in val[:2]:
        (tmp_path / "globbed" / f"g_{f.name}").write_bytes(f.read_bytes())
    (tmp_path / "globbed" / "notes.txt").write_text("not an image")  # the glob matches images only
    for f in val[2:5]:
        (tmp_path / "folder" / "sub" / f"d_{f.name}").write_bytes(f.read_bytes())
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    out = tmp_path / "out"
    assert main(["predict", str(det_run), str(tmp_path / "globbed" / "*"), str(tmp_path / "folder"), str(broken),
                 "--out", str(out), "--score-threshold", "0.0", "--batch-size", "2", "--classes", "circle,star"]) == 0
    text = capsys.readouterr().out
    results = json.loads((out / "predictions.json").read_text())
    assert f"5 images (1 skipped), {len(results)} detections, " in text and " images/s" in text
    assert "classes kept: circle, star" in text
    counts = {n: sum(r["category_name"] == n for r in results) for n in ("circle", "star")}
    assert sum(counts.values()) == len(results) > 0
    for name, n in counts.items():
        assert any(line.split() == [name, str(n)] for line in text.splitlines()), (name, n, text)
    readable = [*sorted((tmp_path / "globbed").glob("*.jpg")), *sorted((tmp_path / "folder").rglob("*.jpg"))]
    assert {r["file_name"] for r in results} == {str(p) for p in readable}  # every readable image has detections
    assert {r["image_id"] for r in results} == {1, 2, 3, 4, 5}
    assert sorted(p.name for p in out.glob("*.jpg")) == sorted(f"{p}_{f.stem}.jpg" for p, f in
                                                                 [("g", v) for v in val[:2]] +
                                                                 [("d", v) for v in val[2:5]])


@pytest.mark.slow
def test_tools_infer_uses_the_python_api_and_prints_the_summary(det_run, shapes_dir, tmp_path):
    for f in val_images(shapes_dir, 3):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 broken")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "infer.py"), str(det_run), str(tmp_path / "*.jpg"),
                             "--out", str(tmp_path / "out"), "--score-threshold", "0", "--batch-size", "3",
                             "--classes", "triangle"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert f"3 images (1 skipped), {len(results)} detections" in result.stdout and "images/s" in result.stdout
    assert {r["category_name"] for r in results} == {"triangle"}
    assert any(line.split() == ["triangle", str(len(results))] for line in result.stdout.splitlines())
