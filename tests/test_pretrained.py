"""Pretrained weights: files (good, wrapped, partial, wrong shapes, wrong files), named weights offline."""

from __future__ import annotations

import logging
import urllib.error
from unittest import mock

import pytest
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

from conftest import shared_path
from detkit.backbones import build_backbone
from detkit.backbones import pretrained as pretrained_mod
from detkit.errors import PretrainedError


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_classification_checkpoint_loads_with_parity(resnet18_file, caplog):
    model, path = resnet18_file
    with caplog.at_level(logging.INFO):
        backbone = build_backbone("resnet18", pretrained=str(path)).eval()
    assert "loaded 120 tensors" in caplog.text and "2 classifier keys not used" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    reference = create_feature_extractor(model, {"layer2": "c3", "layer4": "c5"})
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        ours, ref = backbone(x), reference(x)
    torch.testing.assert_close(ours["c3"], ref["c3"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["c5"], ref["c5"], rtol=1e-5, atol=1e-5)


def test_wrapped_and_prefixed_checkpoint(resnet18_file, tmp_path):
    model, _ = resnet18_file
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, path)
    backbone = build_backbone("resnet18", pretrained=str(path))
    torch.testing.assert_close(backbone.network.conv1.weight, model.conv1.weight)


def test_missing_and_unexpected_keys_are_reported(resnet18_file, tmp_path, caplog):
    model, _ = resnet18_file
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("layer4.1.")}
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with caplog.at_level(logging.WARNING):
        backbone = build_backbone("resnet18", pretrained=str(path))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("keys of resnet18 are not in the file" in w and "layer4.1.conv1.weight" in w for w in warnings)
    assert any("1 keys in the file are not in resnet18" in w and "extra.weight" in w for w in warnings)
    torch.testing.assert_close(backbone.network.layer4[0].conv1.weight, model.layer4[0].conv1.weight)


def test_shape_mismatch_names_key_and_shapes(resnet18_file, tmp_path):
    model, _ = resnet18_file
    state = model.state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    path = tmp_path / "bad_shape.pth"
    torch.save(state, path)
    with pytest.raises(PretrainedError) as e:
        build_backbone("resnet18", pretrained=str(path))
    assert "shape mismatch for key 'layer1.0.conv1.weight': (64, 64, 1, 1) in the file, (64, 64, 3, 3) in " \
           "backbone resnet18" in str(e.value)


def test_wrong_missing_and_corrupt_files(tmp_path):
    with pytest.raises(PretrainedError, match="weights file not found: .*nope.pth"):
        build_backbone("resnet18", pretrained=str(tmp_path / "nope.pth"))
    unrelated = tmp_path / "other.pth"
    torch.save({"foo.bar": torch.zeros(2)}, unrelated)
    with pytest.raises(PretrainedError, match="no key matches backbone resnet18"):
        build_backbone("resnet18", pretrained=str(unrelated))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedError, match="cannot read weights file .*corrupt.pth"):
        build_backbone("resnet18", pretrained=str(corrupt))


def test_named_weights_offline_fail_in_one_line():
    # the library's download fails (no network): one line, suggesting a local file
    refused = urllib.error.URLError("[Errno 111] Connection refused")
    with mock.patch.object(pretrained_mod, "host_reachable", return_value=True), \
            mock.patch("torchvision.models._api.load_state_dict_from_url", side_effect=refused):
        with pytest.raises(PretrainedError) as e:
            build_backbone("resnet18", pretrained="IMAGENET1K_V1")
    msg = str(e.value)
    assert "cannot fetch named weights 'IMAGENET1K_V1' for resnet18 (offline?" in msg
    assert "model.backbone.pretrained=/path/to/weights.pth" in msg and "\n" not in msg
    # unreachable host: fail at once, without waiting for the library's retries
    with mock.patch.object(pretrained_mod, "host_reachable", return_value=False), \
            mock.patch("torchvision.models._api.load_state_dict_from_url") as download, \
            mock.patch("detkit.backbones.pretrained.in_torch_hub_cache", return_value=False):
        with pytest.raises(PretrainedError, match="download.pytorch.org is not reachable"):
            build_backbone("mobilenet_v3_small", pretrained="DEFAULT")
        download.assert_not_called()


def test_unknown_named_weights_and_parametric_backbones():
    with pytest.raises(PretrainedError, match=r"not a file and not named weights of resnet18 \(named: IMAGENET1K_V1"):
        build_backbone("resnet18", pretrained="IMAGENET9K")
    with pytest.raises(PretrainedError, match="regnet has no named weights"):
        build_backbone({"name": "regnet", "pretrained": "IMAGENET1K_V1"})


def test_timm_named_weights_offline():
    with mock.patch("detkit.backbones.timm_backbone.host_reachable", return_value=False):
        with pytest.raises(PretrainedError, match="cannot fetch named weights 'default' for timm:resnet18"):
            build_backbone("timm:resnet18", pretrained="default")


def test_real_imagenet_weights_change_the_features():
    import timm

    path = shared_path("weights", "tf_efficientnet_lite0.in1k.timm.pth")
    torch.manual_seed(0)
    random = build_backbone("timm:tf_efficientnet_lite0").eval()
    loaded = build_backbone("timm:tf_efficientnet_lite0", pretrained=str(path)).eval()
    assert loaded.mean == (0.5, 0.5, 0.5) and loaded.std == (0.5, 0.5, 0.5)
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    reference.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    reference.eval()
    x = (torch.rand(1, 3, 128, 128) - 0.5) / 0.5
    with torch.no_grad():
        ours = loaded(x)
        ref = reference.blocks(reference.bn1(reference.conv_stem(x)))
        rand = random(x)
    torch.testing.assert_close(ours["c5"], ref, rtol=1e-4, atol=1e-4)  # the real weights, in the right places
    assert not torch.allclose(ours["c5"], rand["c5"], atol=1e-2)  # ... and they changed the features
