"""``model.weights`` with torchvision's detection weights, family by family: the state dict of torchvision's own
builder (seeded, saved as a local file) loads through ``detkit.models.load_weights`` into the matching detkit
config and gives torchvision's detections. (RetinaNet and FCOS: tests/test_dense_heads.py.)"""

from __future__ import annotations

import pytest
import torch
from torchvision.models import detection as tvd

from detkit import build_model, load_config
from detkit.errors import PretrainedError
from detkit.models import load_weights

MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
R50_FPN = ["model.backbone.name=resnet50", "model.backbone.norm=bn", "model.backbone.out_levels=[c2,c3,c4,c5]",
           "model.neck.levels=[p2,p3,p4,p5,p6]", "model.neck.extra_op=maxpool", "model.num_classes=90"]
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
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_torchvision_detection_weights_give_torchvisions_detections(family, tmp_path):
    build, overrides = FAMILIES[family]
    torch.manual_seed(0)
    kwargs = {"box_score_thresh": 0.0, "box_detections_per_img": 50}
    tv = build(weights=None, weights_backbone=None, min_size=320, max_size=320, **kwargs).eval()
    torch.save(tv.state_dict(), tmp_path / "w.pth")
    model = build_model(load_config(None, overrides)).eval()
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
        torch.testing.assert_close(g["boxes"], e["boxes"], atol=1e-3, rtol=0)
        torch.testing.assert_close(g["scores"], e["scores"], atol=1e-4, rtol=0)
        assert torch.equal(g["labels"], e["labels"])
        if "masks" in e:  # torchvision: N x 1 x H x W probabilities; detkit: thresholded at 0.5
            assert torch.equal(g["masks"], e["masks"][:, 0] > 0.5)


@pytest.mark.parametrize("build, message", [
    (tvd.ssd300_vgg16, "SSD300 / SSDlite weights are not mapped"),
    (tvd.ssdlite320_mobilenet_v3_large, "SSD300 / SSDlite weights are not mapped"),
    (tvd.fasterrcnn_mobilenet_v3_large_fpn, "MobileNet-FPN detectors are not mapped"),
])
def test_weights_of_backbones_cut_elsewhere_are_refused_in_one_line(build, message, tmp_path):
    """torchvision's SSDs and MobileNet-FPN R-CNNs cut their backbones where detkit's levels have no point (SSD's
    L2-normed conv4_3, SSDlite inside block 13, two stride-32 maps): one line, never a silent partial load."""
    torch.save(build(weights=None, weights_backbone=None).state_dict(), tmp_path / "w.pth")
    model = build_model(load_config(None, ["model.head.name=yolo_af", "model.num_classes=2"]))
    with pytest.raises(PretrainedError, match=message):
        load_weights(model, str(tmp_path / "w.pth"), ["a", "b"])
