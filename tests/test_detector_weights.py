"""``model.weights`` with torchvision's detection weights, family by family: the state dict of torchvision's own
builder (seeded, saved as a local file) loads through ``detkit.models.load_weights`` into the matching detkit
config and gives torchvision's detections. (RetinaNet and FCOS: tests/test_dense_heads.py.)"""

from __future__ import annotations

import pytest
import torch
from torchvision.models import detection as tvd

from conftest import ROOT, sweep
from detkit import build_model, load_config
from detkit.heads.ssd import from_torchvision_ssd
from detkit.models import load_weights

MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
R50_FPN = ["model.backbone.name=resnet50", "model.backbone.norm=bn", "model.backbone.out_levels=[c2,c3,c4,c5]",
           "model.neck.levels=[p2,p3,p4,p5,p6]", "model.neck.extra_op=maxpool", "model.num_classes=90"]
MOBILENET_FPN = ROOT / "configs/_base_/models/faster_rcnn_mobilenet_v3_fpn.yaml"
LOW = "box_score_thresh: 0.0, box_detections_per_img: 50"
FAMILIES = {
    "fasterrcnn_resnet50_fpn": (tvd.fasterrcnn_resnet50_fpn, [*R50_FPN, f"model.head.params={{{LOW}}}"]),
    "fasterrcnn_resnet50_fpn_v2": (tvd.fasterrcnn_resnet50_fpn_v2, [
        *R50_FPN, "model.neck.norm=bn",
        f"model.head.params={{{LOW}, box_head: conv, box_head_convs: 4, rpn_conv_depth: 2}}"]),
    "maskrcnn_resnet50_fpn": (tvd.maskrcnn_resnet50_fpn, [*R50_FPN, "model.head.name=mask_rcnn",
                                                          f"model.head.params={{{LOW}}}"]),
    "maskrcnn_resnet50_fpn_v2": (tvd.maskrcnn_resnet50_fpn_v2, [
        *R50_FPN, "model.neck.norm=bn", "model.head.name=mask_rcnn",
        f"model.head.params={{{LOW}, box_head: conv, box_head_convs: 4, rpn_conv_depth: 2, mask_head_norm: bn}}"]),
    # two maps at stride 32 (after blocks 13 and 16): the shipped config taps the first as c5_mid
    "fasterrcnn_mobilenet_v3_large_fpn": (tvd.fasterrcnn_mobilenet_v3_large_fpn, [
        f"--config={MOBILENET_FPN}", "model.num_classes=90", f"model.head.params={{{LOW}}}"]),
    "fasterrcnn_mobilenet_v3_large_320_fpn": (tvd.fasterrcnn_mobilenet_v3_large_320_fpn, [
        f"--config={MOBILENET_FPN}", "model.num_classes=90",
        f"model.head.params={{{LOW}, rpn_pre_nms_top_n_test: 150, rpn_post_nms_top_n_test: 150}}"]),
}


@pytest.mark.parametrize("family", sweep(list(FAMILIES), fast=["fasterrcnn_resnet50_fpn"]))
def test_torchvision_detection_weights_give_torchvisions_detections(family, tmp_path):
    build, overrides = FAMILIES[family]
    torch.manual_seed(0)
    kwargs = {"box_score_thresh": 0.0, "box_detections_per_img": 50}
    tv = build(weights=None, weights_backbone=None, min_size=320, max_size=320, **kwargs).eval()
    config = next((o.split("=", 1)[1] for o in overrides if o.startswith("--config=")), None)
    overrides = [o for o in overrides if not o.startswith("--config=")]
    if config:  # MobileNet's untrained scores tie (their order is arbitrary): spread the weights
        for m in tv.modules():
            if isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
                torch.nn.init.normal_(m.weight, 0, 1 / m.weight[0].numel() ** 0.5)
                if m.bias is not None:
                    torch.nn.init.normal_(m.bias, 0, 0.1)
    torch.save(tv.state_dict(), tmp_path / "w.pth")
    model = build_model(load_config(config, overrides)).eval()
    classes = [f"class{i}" for i in range(1, 91)]
    # the file's class rows are COCO's 91 outputs (10 unused "N/A" ids): keep each row by its label
    report = load_weights(model, str(tmp_path / "w.pth"), classes, {name: i for i, name in enumerate(classes, 1)})
    assert not report.missing and not report.skipped, (report.missing[:3], report.skipped[:3])
    x = torch.rand(2, 3, 320, 320)  # short side = min_size: torchvision's transform does not resize it
    with torch.no_grad():
        expected = tv(list(x))
        got = model((x - MEAN) / STD)
    for e, g in zip(expected, got):
        assert len(e["boxes"]) == len(g["boxes"]) > 10
        if config:  # many RoIs of an untrained MobileNet score alike: ties come in any order, compare as sets
            e, g = _canonical(e), _canonical(g)
        torch.testing.assert_close(g["boxes"], e["boxes"], atol=5e-2 if config else 1e-3, rtol=0)  # px, at 320 px
        torch.testing.assert_close(g["scores"], e["scores"], atol=1e-4, rtol=0)
        assert torch.equal(g["labels"], e["labels"])
        if "masks" in e:  # torchvision: N x 1 x H x W probabilities; detkit: thresholded at 0.5
            assert torch.equal(g["masks"], e["masks"][:, 0] > 0.5)


def _canonical(det: dict) -> dict:
    """Detections ordered by (score to 1e-5, label, box to the pixel): detections of equal score in a fixed order."""
    keys = [(-round(score * 1e5), label, *(round(v) for v in box))
            for score, label, box in zip(det["scores"].tolist(), det["labels"].tolist(), det["boxes"].tolist())]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return {k: v[order] for k, v in det.items()}


SSD_FAMILIES = {  # torchvision builder, detkit config (its base), input size, the input normalisation it expects
    "ssd300_vgg16": (tvd.ssd300_vgg16, "configs/_base_/models/ssd300_vgg16.yaml", 300),
    "ssdlite320_mobilenet_v3_large": (tvd.ssdlite320_mobilenet_v3_large,
                                      "configs/_base_/models/ssdlite_torchvision.yaml", 320),
}


@pytest.mark.parametrize("family", sweep(list(SSD_FAMILIES), fast=["ssdlite320_mobilenet_v3_large"]))
def test_torchvision_ssd_weights_give_torchvisions_detections(family, tmp_path):
    """torchvision's SSD300 (VGG-16 cut at its L2-normed conv4_3) and SSDlite (MobileNetV3 cut inside block 13)
    state dicts load whole through ``model.weights`` into the shipped configs, with the COCO class rows kept by
    name, and give torchvision's detections and losses."""
    build, config, size = SSD_FAMILIES[family]
    torch.manual_seed(0)
    tv = build(weights=None, weights_backbone=None, num_classes=91)
    for m in tv.modules():  # torchvision's init gives near-constant scores (ties ordered arbitrarily): spread them
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="linear")
            if m.bias is not None:
                torch.nn.init.normal_(m.bias, 0, 0.1)
    tv.eval()
    torch.save(tv.state_dict(), tmp_path / "w.pth")
    from torchvision.models._meta import _COCO_CATEGORIES

    classes = list(_COCO_CATEGORIES[1:])  # COCO's 90 ids ("N/A" among them): every row kept by name
    model = build_model(load_config(ROOT / config, [f"model.num_classes={len(classes)}"])).eval()
    report = load_weights(model, str(tmp_path / "w.pth"), classes, {name: i for i, name in enumerate(classes, 1)})
    assert not report.missing and not report.skipped, (report.missing[:3], report.skipped[:3])
    x = torch.rand(2, 3, size, size)  # torchvision resizes to a fixed square: at that size it is the identity
    with torch.no_grad():
        pixels = (x * 255).round()  # detkit normalises uint8 pixels with the config's mean and std itself
        got = model.predict({"images": pixels.to(torch.uint8), "image_sizes": [(size, size)] * 2})
        expected = tv(list(pixels / 255))
    for e, g in zip(expected, got):
        assert len(e["boxes"]) == len(g["boxes"]) > 10
        order_e, order_g = e["scores"].argsort(descending=True), g["scores"].argsort(descending=True)
        torch.testing.assert_close(g["scores"][order_g], e["scores"][order_e], atol=1e-4, rtol=0)
        top = 10  # the best boxes are unambiguous (no score ties): the same boxes and labels
        torch.testing.assert_close(g["boxes"][order_g][:top], e["boxes"][order_e][:top], atol=1e-2, rtol=0)
        assert torch.equal(g["labels"][order_g][:top], e["labels"][order_e][:top])
    # other classes: the class convs are rebuilt per anchor, "person" keeping COCO's person rows (label 1)
    small = build_model(load_config(ROOT / config, ["model.num_classes=2"]))
    report = load_weights(small, str(tmp_path / "w.pth"), ["pedestrian", "dog"], {"pedestrian": "person"})
    assert report.class_rows == {"pedestrian": "person", "dog": "dog"} and report.reinitialised
    key = next(k for k in report.reinitialised if k.endswith("weight"))
    src, dst = from_torchvision_ssd(tv.state_dict())[key], small.state_dict()[key]
    anchors = dst.shape[0] // 3
    assert src.shape[0] == anchors * 91
    for a in range(anchors):
        for j, i in ((0, 0), (1, 1), (2, 18)):  # background, person, dog (COCO id 18)
            assert torch.equal(dst[a * 3 + j], src[a * 91 + i])
