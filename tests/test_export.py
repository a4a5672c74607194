"""Export: ONNX (run in onnxruntime) and TorchScript files give the PyTorch model's outputs on real images."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import FIXTURES, ROOT
from detkit import load_config
from detkit.errors import ConfigError

needs_onnxruntime = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None,
                                       reason="onnxruntime not installed (pip install 'detkit[onnx]')")

SIZE = 96
CONFIGS = {"yolo": "configs/yolo/shapes.yaml", "yolo_af": "configs/yolo_af/shapes.yaml",
           "ssd": "configs/ssd/shapes.yaml", "faster_rcnn": "configs/faster_rcnn/shapes.yaml",
           "mask_rcnn": "configs/mask_rcnn/shapes.yaml", "unet": "configs/unet/shapes.yaml"}
EXTRA = {"yolo": ["model.head.params.score_thresh=0.0001"], "yolo_af": ["model.head.params.score_thresh=0.01"],
         "ssd": ["model.head.params.score_thresh=0.001"],
         "faster_rcnn": ["model.head.params.box_score_thresh=0.001"],
         "mask_rcnn": ["model.head.params.box_score_thresh=0.001"]}
CLASSES = ["circle", "square", "triangle"]


def make_module(head: str, seed: int = 0):
    from detkit.engine.module import DetectionModule

    cfg = load_config(ROOT / CONFIGS[head], ["data.generate=null", "model.backbone.name=resnet18",
                                             f"data.image_size={SIZE}", *EXTRA.get(head, [])])
    classes = ["background", *CLASSES] if head == "unet" else CLASSES
    cfg.model.num_classes = len(classes)
    torch.manual_seed(seed)
    module = DetectionModule(cfg, classes=classes, cat_ids=list(range(1, len(classes) + 1)))
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so that folding them is tested
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return module.eval()


@pytest.fixture(scope="module")
def images():
    """The real raccoon fixture images through a model's validation pipeline: B x 3 x 96 x 96, 0..255 float."""
    from detkit.inference import Predictor

    predictor = Predictor(make_module("ssd"), fast=False)
    files = sorted((FIXTURES / "raccoon_mini" / "images").glob("*.jpg"))
    batch = predictor.collate([predictor.sample(f, i) for i, f in enumerate(files)])
    assert batch["images"].shape == (3, 3, SIZE, SIZE)
    return batch["images"].float()


def reference(module, images: torch.Tensor):
    """The eager model on the same input: per image detections in input pixels, or logits."""
    x = module.model.normalize(images)
    with torch.inference_mode():
        if module.task == "semantic":
            return module.model.logits(x)
        return module.model(x, image_sizes=[(SIZE, SIZE)] * len(x))


def assert_same_detections(ref: list[dict], out: dict, atol: float = 1e-3) -> None:
    """Per image the same detections: every reference detection has an exported one with the same label and box
    and score within ``atol`` (compared as sets: near-equal scores may come in either order)."""
    batch_index = np.asarray(out["batch_index"])
    for i, r in enumerate(ref):
        mine = batch_index == i
        boxes, scores, labels = (np.asarray(out[k])[mine] for k in ("boxes", "scores", "labels"))
        assert len(boxes) == len(r["boxes"]), f"image {i}: {len(boxes)} vs {len(r['boxes'])} detections"
        assert len(boxes) > 0
        np.testing.assert_allclose(np.sort(scores), np.sort(r["scores"].numpy()), atol=atol, rtol=0)
        for box, score, label in zip(r["boxes"].numpy(), r["scores"].numpy(), r["labels"].numpy()):
            hit = (labels == label) & (np.abs(boxes - box).max(1) <= atol) & (np.abs(scores - score) <= atol)
            assert hit.any(), f"image {i}: no exported detection matches {box} {score} {label}"


@needs_onnxruntime
@pytest.mark.parametrize("head,dynamic", [("yolo", True), ("yolo_af", True), ("ssd", True), ("faster_rcnn", False),
                                          ("mask_rcnn", False), ("unet", True)])
def test_onnx_runtime_matches_pytorch_on_real_images(head, dynamic, images, tmp_path):
    from detkit.inference.export import export_model, run_onnx

    module = make_module(head)
    path = tmp_path / f"{head}.onnx"
    # dynamic: exported for batch 1, run on 3 images; fixed: exported for the batch it runs
    info = export_model(module, "onnx", path, dynamic_batch=dynamic, batch_size=1 if dynamic else len(images))
    assert info.batchnorms_folded > 0
    sidecar = json.loads((tmp_path / f"{head}.onnx.json").read_text())
    assert sidecar["input_shape"] == ["batch" if dynamic else 3, 3, SIZE, SIZE]
    assert sidecar["classes"] == list(module.classes)
    out = run_onnx(path, images)
    assert list(out) == info.outputs
    ref = reference(module, images)
    if head == "unet":
        assert out["logits"].shape == (3, 4, SIZE, SIZE)
        np.testing.assert_allclose(out["logits"], ref.numpy(), atol=1e-3, rtol=1e-4)
        return
    assert_same_detections(ref, out)
    if head == "mask_rcnn":  # the mask head's probabilities, before pasting, for the same detections
        with torch.inference_mode():
            x = module.model.normalize(images)
            raw, _ = module.model.head(module.model.features(x), x, [(SIZE, SIZE)] * 3)
        probs = torch.cat([d["masks"] for d in raw]).numpy()
        assert out["mask_probs"].shape == probs.shape
        order = np.lexsort((-out["scores"], out["batch_index"]))  # both in per-image score order
        ref_order = np.lexsort((-torch.cat([d["scores"] for d in raw]).numpy(),
                                np.repeat(np.arange(3), [len(d["scores"]) for d in raw])))
        np.testing.assert_allclose(out["mask_probs"][order], probs[ref_order], atol=1e-3)


@pytest.mark.parametrize("head,dynamic", [("yolo", True), ("faster_rcnn", False), ("unet", True)])
def test_torchscript_matches_pytorch(head, dynamic, images, tmp_path):
    from detkit.inference.export import export_model

    module = make_module(head)
    path = tmp_path / f"{head}.pt"
    export_model(module, "torchscript", path, dynamic_batch=dynamic, batch_size=1 if dynamic else len(images))
    loaded = torch.jit.load(str(path))
    with torch.inference_mode():
        got = loaded(images.clone())
    ref = reference(module, images)
    if head == "unet":
        torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-4)
        return
    assert_same_detections(ref, {k: v.numpy() for k, v in zip(["boxes", "scores", "labels", "batch_index"], got)})


def test_export_errors_are_one_line(tmp_path):
    from detkit.inference.export import export_model

    module = make_module("faster_rcnn")
    with pytest.raises(ConfigError, match=r"--dynamic-batch: not possible for faster_rcnn.*--batch-size N") as e:
        export_model(module, "onnx", tmp_path / "x.onnx", dynamic_batch=True)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="--format 'tflite': expected one of onnx, torchscript"):
        export_model(module, "tflite", tmp_path / "x.tfl")
    with pytest.raises(ConfigError, match="--image-size 16"):
        export_model(module, "onnx", tmp_path / "x.onnx", image_size=16)
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.slow
@needs_onnxruntime
def test_cli_exports_a_checkpoint(tmp_path):
    module = make_module("ssd")
    ckpt = tmp_path / "model.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, ckpt)
    cmd = [sys.executable, "-m", "detkit", "export", str(ckpt), "--format", "onnx", "--out",
           str(tmp_path / "m.onnx"), "--dynamic-batch", "--image-size", "64"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "m.onnx" in done.stdout and "batch x 3 x 64 x 64" in done.stdout
    meta = json.loads((tmp_path / "m.onnx.json").read_text())
    assert meta["input_shape"] == ["batch", 3, 64, 64] and meta["head"] == "ssd"
    bad = subprocess.run([*cmd[:5], "--format", "onnx", "--out", str(tmp_path / "b.onnx"), "--batch-size", "0"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode != 0
    assert "error: argument --batch-size: 0 is not a positive integer" in bad.stderr.strip().splitlines()[-1]
