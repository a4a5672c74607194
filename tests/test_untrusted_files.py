"""Untrusted files: XML attacks are refused in one line, and images whose header claims too many pixels are skipped
(counted, named) before they are decoded, in every reader, in ``read_image`` and in ``detkit predict``."""

from __future__ import annotations

import io
import json
import logging
import shutil
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURES, ROOT
from detkit.cli import main
from detkit.data.build import build_dataset
from detkit.data.dataset import read_image, read_label_png
from detkit.errors import ConfigError, DataError

PILLOW_LIMIT = Image.MAX_IMAGE_PIXELS
CHECKPOINT = ROOT / "tests" / "fixtures" / "checkpoints" / "yolo_anynet.ckpt"
SECRET = "TOP-SECRET-7f3a9c"


def png_claiming(width: int, height: int, mode: str = "1") -> bytes:
    """A PNG of a few dozen bytes whose header (IHDR) claims ``width`` x ``height``: an 8 x 8 image with its IHDR
    patched and the chunk's CRC fixed. Its pixel data is that of 8 x 8, so decoding it would fail."""
    buf = io.BytesIO()
    Image.new(mode, (8, 8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


# ---- XML attacks (VOC)

def _voc_with(tmp_path, xml: str):
    images, anns = tmp_path / "images", tmp_path / "annotations"
    shutil.copytree(FIXTURES / "raccoon_mini/images", images)
    shutil.copytree(FIXTURES / "raccoon_mini/annotations", anns)
    (anns / "raccoon-12.xml").write_text(xml)
    return {"format": "voc", "images": str(images), "annotations": str(anns)}


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE annotation [
<!ENTITY a "lollollollollollollollollollol">
<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">
<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">
<!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">
<!ENTITY e "&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;">
<!ENTITY f "&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;">
<!ENTITY g "&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;">
<!ENTITY h "&g;&g;&g;&g;&g;&g;&g;&g;&g;&g;">
<!ENTITY i "&h;&h;&h;&h;&h;&h;&h;&h;&h;&h;">
]>
<annotation><filename>raccoon-12.jpg</filename><object><name>&i;</name>
<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>20</xmax><ymax>20</ymax></bndbox></object></annotation>
"""


def test_billion_laughs_is_refused_at_once(tmp_path):
    cfg = _voc_with(tmp_path, BILLION_LAUGHS)
    start = time.perf_counter()
    with pytest.raises(DataError) as e:
        build_dataset(cfg)
    assert time.perf_counter() - start < 5  # refused, not expanded (3 GB of "lol")
    msg = str(e.value)
    assert "raccoon-12.xml: refused" in msg and "DTD" in msg and "\n" not in msg


@pytest.mark.parametrize("doctype", [
    '<!DOCTYPE annotation [<!ENTITY xxe SYSTEM "file://{secret}">]>',  # external entity
    '<!DOCTYPE annotation [<!ENTITY % p SYSTEM "file://{secret}"> %p;]>',  # external parameter entity
    '<!DOCTYPE annotation SYSTEM "file://{secret}">',  # external DTD
], ids=["entity", "parameter-entity", "external-dtd"])
def test_external_entities_never_read_local_files(tmp_path, capsys, doctype):
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    body = ("<annotation><filename>&xxe;</filename><object><name>&xxe;</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
            "<xmax>20</xmax><ymax>20</ymax></bndbox></object></annotation>")
    if "xxe" not in doctype:
        body = body.replace("&xxe;", "raccoon")
    cfg = _voc_with(tmp_path, f'<?xml version="1.0"?>\n{doctype.format(secret=secret)}\n{body}\n')
    with pytest.raises(DataError) as e:
        build_dataset(cfg)
    assert "raccoon-12.xml: refused" in str(e.value) and SECRET not in str(e.value) and "\n" not in str(e.value)
    assert main(["data", "stats", "--format", "voc", "--images", cfg["images"], "--annotations",
                 cfg["annotations"]]) == 2
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err
    assert len(out.err.strip().splitlines()) == 1 and "raccoon-12.xml: refused" in out.err


def test_a_plain_voc_file_still_parses(tmp_path):
    text = (FIXTURES / "raccoon_mini/annotations/raccoon-12.xml").read_text()
    ds = build_dataset(_voc_with(tmp_path, text))
    assert len(ds) == 3 and not ds.problems


@pytest.mark.parametrize("text, message", [
    ('{"images": [], "categories": [{"id": ' + "7" * 5000 + ', "name": "x"}]}', "malformed JSON (Exceeds the limit"),
    ('{"images": ' + "[" * 200_000 + "]" * 200_000 + "}", "malformed JSON (nested too deeply)"),
], ids=["5000-digit-number", "nested-200000-deep"])
def test_hostile_json_is_one_line(tmp_path, text, message):
    ann = tmp_path / "ann.json"
    ann.write_text(text)
    with pytest.raises(DataError) as e:
        build_dataset({"format": "coco", "images": str(tmp_path), "annotations": str(ann)})
    assert str(e.value).startswith(f"{ann}: {message}") and "\n" not in str(e.value)


def test_a_classes_yaml_naming_itself_is_refused(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / "a.png")
    classes = tmp_path / "classes.yaml"
    classes.write_text(f"names: {classes}\n")  # read as a file name, it would be read again, and again...
    with pytest.raises(DataError, match=r"classes.yaml: names = '/.*: expected a list or a mapping"):
        build_dataset({"format": "yolo", "images": str(images), "classes": str(classes)})


# ---- images whose header claims too many pixels

def _images(folder, **files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = folder / name.replace("_png", ".png")
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            Image.fromarray(content).save(path)
    return folder


def _dataset_with_a_big_file(tmp_path, fmt: str):
    """A two-image dataset of ``fmt`` where one image (or its mask) claims 20000 x 20000 pixels; and that file."""
    ok, big = np.full((30, 40, 3), 90, np.uint8), png_claiming(20000, 20000)
    mask = np.zeros((30, 40), np.uint8)
    mask[5:15, 5:20] = 1
    if fmt == "coco":
        images = _images(tmp_path / "images", ok_png=ok, big_png=big)
        ann = tmp_path / "ann.json"
        ann.write_text(json.dumps({
            "images": [{"id": 1, "file_name": "ok.png"}, {"id": 2, "file_name": "big.png"}],
            "annotations": [{"id": k, "image_id": k, "category_id": 1, "bbox": [2, 2, 10, 10]} for k in (1, 2)],
            "categories": [{"id": 1, "name": "thing"}]}))
        return {"format": "coco", "images": str(images), "annotations": str(ann)}, images / "big.png"
    if fmt == "voc":
        images = _images(tmp_path / "images", ok_png=ok, big_png=big)
        anns = tmp_path / "annotations"
        anns.mkdir()
        for stem in ("ok", "big"):
            (anns / f"{stem}.xml").write_text(
                f"<annotation><filename>{stem}.png</filename><object><name>thing</name><bndbox><xmin>2</xmin>"
                "<ymin>2</ymin><xmax>12</xmax><ymax>12</ymax></bndbox></object></annotation>")
        return {"format": "voc", "images": str(images), "annotations": str(anns)}, images / "big.png"
    if fmt == "yolo":
        images = _images(tmp_path / "images", ok_png=ok, big_png=big)
        labels = tmp_path / "labels"
        labels.mkdir()
        for stem in ("ok", "big"):
            (labels / f"{stem}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
        return {"format": "yolo", "images": str(images), "classes": ["thing"]}, images / "big.png"
    if fmt in ("masks", "instance_masks"):  # the image is fine, its mask claims 20000 x 20000
        images = _images(tmp_path / "images", ok_png=ok, big_png=ok)
        masks = _images(tmp_path / "masks", ok_png=mask, big_png=big)
        cfg = {"format": fmt, "images": str(images), "annotations": str(masks)}
        return ({**cfg, "classes": ["bg", "thing"]} if fmt == "masks" else cfg), masks / "big.png"
    raise AssertionError(fmt)


@pytest.mark.parametrize("fmt", ["coco", "voc", "yolo", "masks", "instance_masks"])
def test_an_image_over_the_pixel_limit_is_a_counted_skip(tmp_path, fmt):
    cfg, big = _dataset_with_a_big_file(tmp_path, fmt)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # no Pillow warning, no Pillow error
        ds = build_dataset(cfg)  # data.max_image_pixels unset: Pillow's limit (400 M pixels are over it)
    kind = f"images skipped (over {PILLOW_LIMIT} pixels)"
    assert len(ds) == 1 and ds.problems.counts[kind] == 1 and ds.problems.files[kind] == [str(big)]
    assert kind in ds.problems.summary()
    ds.load(0)  # the other image is fine
    small = build_dataset(cfg, max_pixels=1000)  # 40 x 30 = 1200 pixels: now every image is over the limit
    assert len(small) == 0 and small.problems.counts["images skipped (over 1000 pixels)"] == 2
    assert len(build_dataset(cfg, max_pixels=1200)) == 1


def test_read_image_refuses_before_decoding(tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(png_claiming(20000, 20000))
    with pytest.raises(DataError, match=r"big.png: image header claims 400000000 pixels, over the limit of "):
        read_image(big)  # over twice Pillow's limit: Pillow's own refusal, reworded
    mid = tmp_path / "mid.png"
    mid.write_bytes(png_claiming(10000, 10000))
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # between 1x and 2x Pillow only warns
        with pytest.raises(DataError, match=r"mid.png: image header claims 10000x10000 = 100000000 pixels, over the "
                                            rf"limit of {PILLOW_LIMIT} \(Pillow's MAX_IMAGE_PIXELS\): not decoded"):
            read_image(mid)
    small = tmp_path / "small.png"
    small.write_bytes(png_claiming(64, 64))  # a small header with too little data: decoding is what fails
    with pytest.raises(DataError, match="small.png: cannot decode image"):
        read_image(small)
    with pytest.raises(DataError, match=r"small.png: image header claims 64x64 = 4096 pixels, over the limit of 4000 "
                                        r"\(data.max_image_pixels\)"):
        read_image(small, max_pixels=4000)  # refused before the (failing) decode
    with pytest.raises(DataError, match="small.png: image header claims 64x64"):
        read_label_png(small, max_pixels=4000)


def test_a_limit_above_pillows_lets_big_images_through(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # restored after the test
    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((50, 60), np.uint8)).save(path)  # 3000 pixels: over Pillow's (patched) limit x 2
    with pytest.raises(DataError, match="over the limit of 1000"):
        read_image(path)
    assert read_image(path, max_pixels=5000).shape == (50, 60, 3)


@pytest.mark.parametrize("bad", [0, -5, 2.5, "many", True])
def test_max_pixels_must_be_a_positive_integer(tmp_path, bad):
    cfg, _ = _dataset_with_a_big_file(tmp_path, "coco")
    with pytest.raises(ConfigError, match=r"data.max_image_pixels = .*: expected a positive integer"):
        build_dataset(cfg, max_pixels=bad)


def test_the_data_module_passes_max_image_pixels(shapes_dir):
    from detkit.config import load_config
    from detkit.engine.run import build_datamodule

    cfg = load_config(None, [f"data.train.images={shapes_dir}/images/train", "data.train.format=coco",
                             f"data.train.annotations={shapes_dir}/annotations/instances_train.json",
                             "data.max_image_pixels=9000"])  # the shapes images are 96 x 96 = 9216 pixels
    ds = build_datamodule(cfg).dataset("train")
    assert ds.max_pixels == 9000 and len(ds) == 0 and ds.problems.counts["images skipped (over 9000 pixels)"] > 0


def test_predict_skips_images_over_the_limit(tmp_path, capsys, caplog):
    big, mid = tmp_path / "big.png", tmp_path / "mid.png"
    big.write_bytes(png_claiming(20000, 20000))  # over twice Pillow's limit: Pillow would refuse it
    mid.write_bytes(png_claiming(10000, 10000))  # between once and twice: Pillow would only warn, and decode it
    good = tmp_path / "raccoon-1.jpg"
    shutil.copy(FIXTURES / "raccoon_mini/images/raccoon-1.jpg", good)
    with caplog.at_level(logging.WARNING), warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert main(["predict", str(CHECKPOINT), str(big), str(mid), str(good), "--out", str(tmp_path / "out")]) == 0
    assert "1 images (2 skipped)" in capsys.readouterr().out
    messages = [r.getMessage() for r in caplog.records]
    assert [m for m in messages if "big.png" in m] == [f"skipping {big}: {big}: image header claims 400000000 pixels, "
                                                       f"over the limit of {PILLOW_LIMIT} (Pillow's MAX_IMAGE_PIXELS): "
                                                       "not decoded"]
    assert [m for m in messages if "mid.png" in m] == [f"skipping {mid}: {mid}: image header claims 10000x10000 = "
                                                       f"100000000 pixels, over the limit of {PILLOW_LIMIT} (Pillow's "
                                                       "MAX_IMAGE_PIXELS): not decoded"]
    results = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert {r["file_name"] for r in results} <= {str(good)}
    assert sorted(p.name for p in (tmp_path / "out").glob("*.jpg")) == ["raccoon-1.jpg"]


# ------------------------------------------------------------------------ checkpoints that would run code
class _Payload:
    """Unpickling this object calls ``open(marker, "w")``: a file that would run code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_checkpoint(tmp_path):
    """A real checkpoint (a run directory around it too) with a payload hidden in its hyper-parameters."""
    import torch

    marker = tmp_path / "marker"
    ckpt = torch.load(CHECKPOINT, weights_only=True)
    ckpt["hyper_parameters"]["note"] = _Payload(marker)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("best.ckpt", "last.ckpt"):
        torch.save(ckpt, run / "checkpoints" / name)
    from omegaconf import OmegaConf

    config = OmegaConf.create(torch.load(CHECKPOINT, weights_only=True)["hyper_parameters"]["config"])
    for split in ("train", "val"):  # data that exists nowhere: the checkpoint must be refused before it is looked at
        config.data[split].images = str(tmp_path / "absent" / "images")
        config.data[split].annotations = str(tmp_path / "absent" / f"{split}.json")
    (run / "config.yaml").write_text(OmegaConf.to_yaml(config))
    return run, marker


@pytest.mark.parametrize("command", [
    ["predict", "{run}", "{image}"],
    ["predict", "{run}/checkpoints/best.ckpt", "{image}"],
    ["eval", "{run}"],
    ["export", "{run}", "--format", "onnx", "--out", "{tmp}/m.onnx"],
    ["train", "--resume", "{run}"],
])
def test_a_checkpoint_that_would_run_code_is_refused_by_every_command(tmp_path, capsys, command):
    from detkit.cli import main

    run, marker = _evil_checkpoint(tmp_path)
    image = ROOT / "tests" / "fixtures" / "checkpoints" / "images" / "shapes-000000.jpg"
    args = [a.format(run=run, image=image, tmp=tmp_path) for a in command]
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("detkit:")]
    assert len(err) == 1 and "refused: the file holds Python objects" in err[0] and ".ckpt" in err[0], err
    assert not marker.exists()


def test_a_checkpoint_that_would_run_code_is_refused_by_the_python_api(tmp_path):
    import detkit
    from detkit.engine.run import load_checkpoint
    from detkit.errors import DetkitError
    from detkit.inference import Predictor

    run, marker = _evil_checkpoint(tmp_path)
    ckpt = run / "checkpoints" / "best.ckpt"
    for call in (lambda: detkit.load_model(run), lambda: detkit.load_model(ckpt), lambda: load_checkpoint(ckpt),
                 lambda: Predictor.from_checkpoint(run), lambda: detkit.evaluate(run),
                 lambda: detkit.build_backbone("resnet18", pretrained=str(ckpt))):
        with pytest.raises(DetkitError, match="refused: the file holds Python objects"):
            call()
    assert not marker.exists()
