"""detkit.load_model: checkpoints written before the architecture change load and predict exactly as before, with
no training machinery; the model owns its normalisation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import FIXTURES, ROOT
from detkit import load_model
from detkit.errors import ConfigError
from detkit.inference import Predictor
from detkit.models import Detector, Segmenter

CKPTS = FIXTURES / "checkpoints"


def _images(expected):
    return [str((FIXTURES / "raccoon_mini" / "images" if e["image"].startswith("raccoon") else CKPTS / "images")
                / e["image"]) for e in expected]


def test_an_old_detector_checkpoint_gives_the_same_detections():
    expected = json.loads((CKPTS / "yolo_expected.json").read_text())
    model = load_model(CKPTS / "yolo_anynet.ckpt")
    assert isinstance(model, Detector) and not model.training
    assert model.classes == ["circle", "square", "triangle", "star"] and model.cat_ids == [1, 2, 3, 4]
    assert model.config.model.head.name == "yolo" and model.traits.export == "flat"
    got = Predictor(model, fast=False)(_images(expected))  # one batch of four, as when the file was written
    for g, e in zip(got, expected):
        assert g["labels"].tolist() == e["labels"] and g["names"] == e["names"]
        torch.testing.assert_close(g["boxes"], torch.tensor(e["boxes"]).reshape(-1, 4), atol=1e-4, rtol=0)
        torch.testing.assert_close(g["scores"], torch.tensor(e["scores"]), atol=1e-6, rtol=1e-4)


def test_an_old_segmenter_checkpoint_gives_the_same_label_maps():
    expected = json.loads((CKPTS / "unet_expected.json").read_text())
    model = load_model(CKPTS / "unet_anynet.ckpt")
    assert isinstance(model, Segmenter) and model.task == "semantic"
    got = Predictor(model, fast=False)(_images(expected))
    for g, e in zip(got, expected):
        assert torch.equal(g["semantic"], torch.tensor(e["semantic"]))
        assert g["scores"].double().sum().item() == pytest.approx(e["scores_sum"], rel=1e-6)
        assert g["names"] == e["names"]


def test_the_model_normalises_its_own_input():
    model = load_model(CKPTS / "yolo_anynet.ckpt")
    # the backbone's normalisation, as buffers that are not part of the checkpoint
    assert "pixel_mean" not in model.state_dict() and model.mean == model.backbone.mean
    images = torch.randint(0, 256, (1, 3, 96, 96), dtype=torch.uint8)
    x = model.normalize(images)
    mean = torch.tensor(model.backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.backbone.std).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (images.float() / 255 - mean) / std, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        raw = model(images)[0]
        normalised = model(x)[0]  # a float batch counts as normalised already
    torch.testing.assert_close(raw["boxes"], normalised["boxes"])


@pytest.mark.slow
def test_load_model_needs_no_lightning(tmp_path):
    code = ("import sys, detkit; from detkit.inference import Predictor; "
            f"m = detkit.load_model({str(CKPTS / 'yolo_anynet.ckpt')!r}); "
            f"Predictor(m)({str(CKPTS / 'images' / 'shapes-000000.jpg')!r}); "
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('lightning', 'pytorch_lightning')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_load_model_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="no such run directory or checkpoint file"):
        load_model(tmp_path / "missing.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="junk.ckpt: not a readable checkpoint"):
        load_model(tmp_path / "junk.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ConfigError, match="not a detkit checkpoint"):
        load_model(tmp_path / "other.ckpt")
    (tmp_path / "run").mkdir()
    with pytest.raises(ConfigError, match="no checkpoints/best.ckpt in this run directory"):
        load_model(tmp_path / "run")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # unpickling would create the marker file


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "marker"
    good = torch.load(CKPTS / "yolo_anynet.ckpt", weights_only=True)
    good["hyper_parameters"]["extra"] = _Payload(marker)
    torch.save(good, tmp_path / "evil.ckpt")
    with pytest.raises(ConfigError, match="evil.ckpt: refused: the file holds Python objects"):
        load_model(tmp_path / "evil.ckpt")
    assert not marker.exists()
