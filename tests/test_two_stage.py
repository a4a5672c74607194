"""Faster R-CNN / Mask R-CNN: parity with torchvision, RoI pooling over levels, the output contract, params."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import fasterrcnn_resnet50_fpn
from torchvision.ops import roi_pool
from torchvision.ops.poolers import LevelMapper

from detkit import build_model, load_config
from detkit.errors import ConfigError
from detkit.heads import MultiScaleRoIPool, map_levels
from detkit.heads.two_stage import from_torchvision_rcnn

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]

PARITY = ["model.backbone.name=resnet50", "model.backbone.norm=bn", "model.neck.levels=[p2,p3,p4,p5,p6]",
          "model.neck.extra_op=maxpool", "model.num_classes=90", "model.head.params={box_score_thresh: 0.0}"]


def small(*extra: str):
    return load_config(None, ["model.backbone.name=resnet18", "model.neck.out_channels=32",
                              "model.neck.levels=[p2,p3,p4,p5]", "model.num_classes=3",
                              "model.head.params={box_head_dim: 64, anchor_sizes: [[16], [32], [64], [128]]}", *extra])


def test_torchvision_faster_rcnn_parity():
    """The state dict of torchvision's builder loads (key map) and gives the same detections (1e-4)."""
    torch.manual_seed(0)
    tv = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=320, max_size=320,
                                 box_score_thresh=0.0).eval()
    model = build_model(load_config(None, PARITY)).eval()
    result = model.load_state_dict(from_torchvision_rcnn(tv.state_dict()), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.rand(2, 3, 320, 320)  # short side = min_size: torchvision's transform does not resize it
    with torch.no_grad():
        expected = tv(list(x))
        got = model((x - IMAGENET_MEAN) / IMAGENET_STD)
    for e, g in zip(expected, got):
        assert len(e["boxes"]) == len(g["boxes"]) > 0
        torch.testing.assert_close(g["boxes"], e["boxes"], atol=1e-4, rtol=0)
        torch.testing.assert_close(g["scores"], e["scores"], atol=1e-4, rtol=0)
        assert torch.equal(g["labels"], e["labels"])


def test_roi_pool_level_mapping_matches_torchvision():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 100, 120], [5, 5, 300, 260], [0, 0, 900, 800.0]])
    ours = map_levels(boxes, 2, 5)
    theirs = LevelMapper(2, 5)([boxes])
    assert torch.equal(ours, theirs.to(torch.int64))


def test_multiscale_roi_pool_pools_each_box_from_its_level():
    torch.manual_seed(0)
    feats = {f"p{k}": torch.randn(2, 4, 1024 // 2**k, 1024 // 2**k) for k in (2, 3, 4, 5)}
    boxes = [torch.tensor([[4.0, 4.0, 20.0, 28.0], [10.0, 20.0, 210.0, 220.0]]),
             torch.tensor([[30.0, 40.0, 530.0, 440.0], [0.0, 0.0, 1000.0, 900.0]])]
    pool = MultiScaleRoIPool(list(feats), 7, [4, 8, 16, 32])
    out = pool(feats, boxes, [(1024, 1024)] * 2)
    assert out.shape == (4, 4, 7, 7)
    flat = torch.cat(boxes)
    levels = map_levels(flat, 2, 5)
    # sqrt(area) 18 -> p2 (clamped), 200 -> floor(4 + log2(200/224)) = p3, 447 -> p4, 949 -> p6 clamped to p5
    assert levels.tolist() == [0, 1, 2, 3]
    image_index = torch.tensor([0, 0, 1.0, 1.0])
    for i, lvl in enumerate(levels.tolist()):
        name = f"p{lvl + 2}"
        rois = torch.cat([image_index[i:i + 1, None], flat[i:i + 1]], dim=1)
        expected = roi_pool(feats[name], rois, 7, 1.0 / 2 ** (lvl + 2))
        torch.testing.assert_close(out[i:i + 1], expected)


@pytest.mark.parametrize("roi_op", ["roi_align", "roi_pool"])
@pytest.mark.parametrize("box_head", ["2fc", "conv"])
def test_faster_rcnn_losses_and_detections_contract(roi_op, box_head):
    torch.manual_seed(0)
    model = build_model(small(f"model.head.params.roi_op={roi_op}", f"model.head.params.box_head={box_head}",
                              "model.head.params.box_score_thresh=0.0"))
    images = torch.randn(2, 3, 128, 128)
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 70.0]]), "labels": torch.tensor([2]),
                "iscrowd": torch.tensor([False])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "iscrowd": torch.zeros(0, dtype=torch.bool)}]
    model.train()
    losses = model(images, targets, [(128, 128), (96, 128)])
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model(images, image_sizes=[(128, 128), (96, 128)], scales=[(0.5, 0.5), (1.0, 1.0)],
                    orig_sizes=[(256, 256), (96, 128)])
    assert len(out) == 2
    for det, (h, w) in zip(out, [(256, 256), (96, 128)]):
        assert det["boxes"].shape[1] == 4 and len(det["boxes"]) == len(det["scores"]) == len(det["labels"]) > 0
        assert det["labels"].min() >= 1 and det["labels"].max() <= 3
        assert det["boxes"][:, 2].max() <= w and det["boxes"][:, 3].max() <= h
    assert out[0]["boxes"].max() > 128  # mapped back to the 256-pixel original by the 0.5 scale


def test_mask_rcnn_masks_at_original_resolution():
    torch.manual_seed(0)
    model = build_model(small("model.head.name=mask_rcnn", "model.head.params.box_score_thresh=0.0"))
    images = torch.randn(1, 3, 96, 128)
    mask = torch.zeros(1, 96, 128, dtype=torch.uint8)
    mask[0, 20:60, 30:90] = 1
    model.train()
    losses = model(images, [{"boxes": torch.tensor([[30.0, 20.0, 90.0, 60.0]]), "labels": torch.tensor([1]),
                             "masks": mask}])
    assert "loss_mask" in losses and torch.isfinite(losses["loss_mask"])
    model.eval()
    with torch.no_grad():
        (det,) = model(images, scales=[(0.5, 0.5)], orig_sizes=[(192, 256)])
    assert det["masks"].dtype == torch.bool and det["masks"].shape[1:] == (192, 256)
    assert len(det["masks"]) == len(det["boxes"])


def test_crowd_boxes_are_not_training_targets():
    from detkit.models import train_targets

    (t,) = train_targets([{"boxes": torch.tensor([[0, 0, 5, 5], [1, 1, 9, 9.0]]), "labels": torch.tensor([1, 2]),
                           "iscrowd": torch.tensor([False, True])}])
    assert t["boxes"].tolist() == [[0, 0, 5, 5]] and t["labels"].tolist() == [1]


@pytest.mark.parametrize("override, message", [
    ("model.head.params.rpn_nms_tresh=0.5", "did you mean 'model.head.params.rpn_nms_thresh'"),
    ("model.head.params.box_score_thresh=high", "model.head.params.box_score_thresh"),
    ("model.head.params.roi_op=roi_warp", "roi_op"),
    ("model.head.params.roi_levels=[p9]", "p9"),
    ("model.neck.name=none", "model.neck.name"),
    ("model.head.params.anchor_sizes=[[16],[32]]", "anchor_sizes"),
    ("model.head.params.roi_levels=[p5,p4,p3,p2]", "consecutive levels from fine to coarse"),
    ("model.head.params.rpn_levels=[p2,p4]", "consecutive levels"),
    ("model.head.params.box_fg_iou_thresh=0.3", "box_bg_iou_thresh <= box_fg_iou_thresh"),
    ("model.head.params.aspect_ratios=[]", "aspect_ratios"),
    ("model.head.params.rpn_batch_size_per_image=0", "at least 1"),
])
def test_bad_head_params_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as e:
        build_model(small(override))
    assert "\n" not in str(e.value)
