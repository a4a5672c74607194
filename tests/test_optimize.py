"""Fast inference: BatchNorm folding is exact, leaves what it cannot prove alone, and detections do not change."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torchvision
from test_export import assert_same_detections, make_module
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from conftest import FIXTURES
from detkit.inference.optimize import fold_batch_norms, fold_conv_bn, is_batch_norm, optimize_for_inference


def randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if is_batch_norm(m) or isinstance(m, nn.BatchNorm2d):
                n = m.running_mean.numel()
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


@pytest.mark.parametrize("groups,bias,norm", [(1, False, "bn"), (4, True, "bn"), (1, True, "frozen")])
def test_fold_conv_bn_equals_conv_then_norm(groups, bias, norm):
    conv = nn.Conv2d(8, 12, 3, padding=1, groups=groups, bias=bias)
    bn = randomise_norms(nn.BatchNorm2d(12, eps=1e-3) if norm == "bn" else FrozenBatchNorm2d(12))
    x = torch.randn(2, 8, 9, 7)
    with torch.no_grad():
        expected = bn(conv(x))
        fold_conv_bn(conv, bn)
        torch.testing.assert_close(conv(x), expected, atol=1e-5, rtol=1e-5)


class Shared(nn.Module):
    """conv -> bn, but the conv's output is also used elsewhere: folding would change that other use."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.conv2, self.bn2 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), \
            nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn2(self.conv2(self.bn(y))) + y


def test_a_convolution_with_another_user_keeps_its_norm():
    model = randomise_norms(Shared())
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        report = fold_batch_norms(model)
        assert (report.folded, report.kept) == (1, 1)  # conv2 -> bn2 folded, conv -> bn kept
        assert isinstance(model.bn, nn.BatchNorm2d) and isinstance(model.bn2, nn.Identity)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_training_mode_norms_are_not_folded():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    assert fold_batch_norms(model).folded == 0


@pytest.mark.parametrize("build", [
    lambda: torchvision.models.resnet18(),
    lambda: torchvision.models.mobilenet_v3_small(),
    lambda: torchvision.models.efficientnet_b0(),
    lambda: torchvision.models.regnet_y_400mf(),
    lambda: __import__("timm").create_model("tf_efficientnet_lite0", features_only=True),
    lambda: __import__("timm").layers.freeze_batch_norm_2d(__import__("timm").create_model("resnet18")),
], ids=["resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "timm_lite0_bnact",
        "timm_resnet18_frozen"])
def test_every_norm_of_the_backbone_families_folds_and_outputs_stay(build):
    torch.manual_seed(0)
    model = randomise_norms(build())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        before = sum(is_batch_norm(m) for m in model.modules())
        report = fold_batch_norms(model)
        got = model(x)
    assert report.folded == before > 0 and report.kept == 0
    for e, g in zip(expected if isinstance(expected, list) else [expected], got if isinstance(got, list) else [got]):
        torch.testing.assert_close(g, e, atol=1e-4 * float(e.abs().max()), rtol=1e-4)


@pytest.mark.parametrize("head", ["yolo", "yolo_af", "ssd", "faster_rcnn", "mask_rcnn", "unet"])
def test_fast_predictor_gives_the_same_detections(head):
    """The default Predictor (BatchNorm folded, channels_last, inference_mode) against the plain model."""
    from detkit.inference import Predictor

    module = make_module(head)
    files = sorted((FIXTURES / "raccoon_mini" / "images").glob("*.jpg"))
    plain = Predictor(copy.deepcopy(module), batch_size=2, fast=False)
    fast = Predictor(module, batch_size=2)
    assert fast.report.folded > 0 and fast.report.kept == 0 and fast.report.channels_last
    assert any(isinstance(m, nn.BatchNorm2d) for m in module.modules())  # the module given stays trainable
    expected, got = plain(files), fast(files)
    for e, g in zip(expected, got, strict=True):
        if head == "unet":
            assert (g["semantic"] == e["semantic"]).float().mean() > 0.999
            torch.testing.assert_close(g["scores"], e["scores"], atol=1e-4, rtol=0)
            continue
        flat = {k: g[k].numpy() for k in ("boxes", "scores", "labels")} | {"batch_index": np.zeros(len(g["boxes"]))}
        assert_same_detections([e], flat, atol=1e-3)
        if head == "mask_rcnn":
            assert g["masks"].shape == e["masks"].shape
            assert (g["masks"] == e["masks"]).float().mean() > 0.999


@pytest.mark.slow
def test_compile_is_optional_and_keeps_detections():
    pytest.importorskip("torch._dynamo")
    from detkit.inference import Predictor

    module = make_module("yolo")
    image = torch.randint(0, 255, (3, 80, 96), dtype=torch.uint8)
    plain = Predictor(copy.deepcopy(module), fast=False)(image)
    report = optimize_for_inference(module.model, compile=True, channels_last=False)
    assert report.compiled and type(module.model.backbone).__name__ == "OptimizedModule"
    torch._dynamo.config.suppress_errors = False
    compiled = Predictor(module, fast=False)(image)
    flat = {k: compiled[k].numpy() for k in ("boxes", "scores", "labels")} | {
        "batch_index": np.zeros(len(compiled["boxes"]))}
    assert_same_detections([plain], flat, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("head", ["yolo", "ssd", "faster_rcnn", "mask_rcnn", "unet"])
def test_fast_predictor_on_cuda_matches_the_cpu(head):
    from detkit.inference import Predictor

    module = make_module(head)
    files = sorted((FIXTURES / "raccoon_mini" / "images").glob("*.jpg"))
    cpu = Predictor(copy.deepcopy(module), batch_size=2, fast=False)(files)
    cuda = Predictor(module, device="cuda", batch_size=2)(files)
    for e, g in zip(cpu, cuda, strict=True):
        assert all(v.device.type == "cpu" for v in g.values() if isinstance(v, torch.Tensor))
        if head == "unet":
            assert (g["semantic"] == e["semantic"]).float().mean() > 0.99
            continue
        flat = {k: g[k].numpy() for k in ("boxes", "scores", "labels")} | {"batch_index": np.zeros(len(g["boxes"]))}
        assert_same_detections([e], flat, atol=1e-2)  # cuDNN may use TF32: looser than on the CPU
