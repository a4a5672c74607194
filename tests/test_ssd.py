"""SSD / SSDlite head: default boxes, box coding, matching, hard negatives, torchvision parity, training, the
output contract, every backbone family with and without a neck, params errors, and a run through the engine."""

from __future__ import annotations

import json
import math
from functools import partial

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection import ssdlite320_mobilenet_v3_large
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator

import detkit
from conftest import ROOT, tiny_detector_overrides
from detkit import build_model, load_config
from detkit.backbones.base import Backbone, split_by_stride
from detkit.errors import ConfigError
from detkit.heads import HEADS
from detkit.heads.ssd import DefaultBoxes, build_ssd_head, from_torchvision_ssdlite, hard_negatives
from detkit.models import Detector

SSD_SHAPES = ROOT / "configs" / "ssd" / "shapes.yaml"


def small(*extra: str):
    """A small SSD: ResNet-18 C3-C5 (no neck) + 2 extras, 3 classes."""
    return load_config(None, ["model.head.name=ssd", "model.neck.name=none", "model.backbone.name=resnet18",
                              "model.backbone.out_levels=[c3,c4,c5]", "model.num_classes=3", "data.image_size=128",
                              "model.head.params={in_levels: [c3, c4, c5], extra_channels: [32, 32], "
                              "min_ratio: 0.1, max_ratio: 0.7}", *extra])


def _head(**params):
    return build_ssd_head(params, {"c4": 8, "c5": 16}, {"c4": 16, "c5": 32}, 3, 128)


# ------------------------------------------------------------------------------------------- default boxes
def test_registered():
    assert HEADS.get("ssd") is build_ssd_head


def test_default_boxes_of_a_known_layout():
    """One 2x2 level on a 64 px image: centres at 16/48 px, 4 boxes per location in torchvision's order."""
    boxes = DefaultBoxes(DefaultBoxGenerator([[2]], scales=[0.5, 1.0]), 64)(torch.zeros(1, 3, 64, 64),
                                                                             [torch.zeros(1, 1, 2, 2)])
    assert boxes.shape == (16, 4)
    s, s2, r = 32.0, 64 * math.sqrt(0.5), math.sqrt(2)
    sizes = torch.tensor([[s, s], [s2, s2], [s * r, s / r], [s / r, s * r]])
    centres = torch.tensor([[16.0, 16.0], [48.0, 16.0], [16.0, 48.0], [48.0, 48.0]])  # row-major locations
    expected = torch.cat([centres.repeat_interleave(4, 0) - sizes.repeat(4, 1) / 2,
                          centres.repeat_interleave(4, 0) + sizes.repeat(4, 1) / 2], dim=1)
    torch.testing.assert_close(boxes, expected)


def test_default_box_count_over_levels_and_extras():
    head = _head(extra_channels=[8, 8], aspect_ratios=[[2], [2, 3], [2], [2]]).eval()  # BN on a 1x1 map
    feats = {"c4": torch.zeros(1, 8, 8, 8), "c5": torch.zeros(1, 16, 4, 4)}
    maps = head.feature_maps(feats)
    assert [tuple(m.shape[-2:]) for m in maps] == [(8, 8), (4, 4), (2, 2), (1, 1)]
    assert head.default_boxes.num_anchors_per_location() == [4, 6, 4, 4]
    assert len(head.default_boxes(torch.zeros(1, 3, 128, 128), maps)) == 64 * 4 + 16 * 6 + 4 * 4 + 1 * 4
    assert head.levels == ["c4", "c5", "extra1", "extra2"] and head.strides["extra2"] == 128


def test_default_boxes_in_a_padded_non_square_batch():
    """Box sizes follow data.image_size, not the padded tensor: the boxes over the real image are those of the
    unpadded image, and square boxes stay square (torchvision's generator alone would stretch them)."""
    gen = DefaultBoxes(DefaultBoxGenerator([[2, 3]], min_ratio=0.3, max_ratio=0.8), 64)
    alone = gen(torch.zeros(1, 3, 64, 64), [torch.zeros(1, 1, 2, 2)])
    padded = gen(torch.zeros(1, 3, 128, 64), [torch.zeros(1, 1, 4, 2)])  # a 64x64 image padded to 128 rows
    torch.testing.assert_close(padded[: len(alone)], alone)  # the first two rows of locations
    wh = padded[:, 2:] - padded[:, :2]
    torch.testing.assert_close(wh[0, 0], wh[0, 1])  # the scale-s_k square box
    stretched = DefaultBoxGenerator([[2, 3]], min_ratio=0.3, max_ratio=0.8)(
        torchvision.models.detection.image_list.ImageList(torch.zeros(1, 3, 128, 64), [(128, 64)]),
        [torch.zeros(1, 1, 4, 2)])[0]
    assert (stretched[0, 3] - stretched[0, 1]) == 2 * (stretched[0, 2] - stretched[0, 0])


# ---------------------------------------------------------------------------- box coding, matching, mining
def test_decode_of_encode_is_the_box():
    head = _head()
    anchors = torch.tensor([[0.0, 0.0, 32.0, 32.0], [40.0, 10.0, 100.0, 50.0], [5.0, 60.0, 25.0, 120.0]])
    boxes = torch.tensor([[3.0, 4.0, 30.0, 41.0], [35.5, 12.25, 110.0, 47.0], [0.0, 70.0, 40.0, 100.0]])
    codes = head.box_coder.encode_single(boxes, anchors)
    torch.testing.assert_close(head.box_coder.decode_single(codes, anchors), boxes, atol=1e-4, rtol=0)
    torch.testing.assert_close(codes[0], torch.tensor([(16.5 - 16) / 32 * 10, (22.5 - 16) / 32 * 10,
                                                       math.log(27 / 32) * 5, math.log(37 / 32) * 5]))


def test_iou_matching_assigns_hand_made_ground_truth():
    head = _head(iou_thresh=0.5)
    anchors = torch.tensor([[0.0, 0, 10, 10], [0, 0, 20, 20], [50, 50, 70, 70], [100, 100, 110, 110]])
    gt = torch.tensor([[0.0, 0, 19, 19], [60, 60, 90, 90]])
    # box 1: IoU 0.9 with object 0; box 0: 0.28 (background); object 1 has IoU 0.08 at best (box 2) and still
    # gets that box (every object keeps its best default box); box 3 touches nothing
    assert head.match(gt, anchors).tolist() == [-1, 0, 1, -1]
    assert head.match(torch.zeros(0, 4), anchors).tolist() == [-1] * 4


def test_hard_negative_mining_keeps_three_negatives_per_positive():
    loss = torch.tensor([[5.0, 1.0, 4.0, 3.0, 2.0, 0.5, 6.0, 7.0],
                         [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
                         [9.0, 1.0, 2.0, 3.0, 8.0, 4.0, 5.0, 6.0]])
    positive = torch.zeros_like(loss, dtype=torch.bool)
    positive[0, 6] = True  # 1 positive: the 3 highest-loss negatives
    positive[2, [0, 4, 5, 6, 7]] = True  # 5 positives, 3 negatives: all of them (never a positive)
    neg = hard_negatives(loss, positive, 3.0)
    assert torch.where(neg[0])[0].tolist() == [0, 2, 7]
    assert not neg[1].any()  # no positive: no negatives (torchvision's SSD loss)
    assert torch.where(neg[2])[0].tolist() == [1, 2, 3]
    assert torch.where(hard_negatives(loss[:1], positive[:1], 2.0)[0])[0].tolist() == [0, 7]


# -------------------------------------------------------------------------------------- torchvision parity
def _torchvision_taps_detkit(tv_head_params: dict, num_classes: int) -> Detector:
    """detkit's parts with torchvision SSDlite's taps: c4 ends after features.13.block.0 (672 channels)."""
    net = torchvision.models.mobilenet_v3_large(reduced_tail=True,
                                                norm_layer=partial(nn.BatchNorm2d, eps=0.001, momentum=0.03))
    plan = split_by_stride(net, "features")
    c4 = [level for level, _ in plan].index("c4")
    first = plan[c4 + 1][1].pop(0)  # features.13
    plan[c4][1].append(f"{first}.block.0")
    plan[c4 + 1][1][:0] = [f"{first}.block.{j}" for j in (1, 2, 3)]
    backbone = Backbone(net, plan, ["c4", "c5"], ("avgpool", "classifier"), name="mobilenet_v3_large")
    assert backbone.out_channels == {"c4": 672, "c5": 480}
    head = build_ssd_head(tv_head_params, backbone.out_channels, backbone.strides, num_classes, 320)
    return Detector(backbone, None, head)


def _canonical(det: dict) -> np.ndarray:
    rows = torch.cat([det["scores"][:, None], det["labels"][:, None].float(), det["boxes"]], 1).numpy()
    return rows[np.lexsort(rows.T[::-1])]


def test_same_detections_and_losses_as_torchvision_ssdlite():
    """torchvision's ssdlite320_mobilenet_v3_large state dict loads into detkit's SSDlite head over a backbone
    with the same taps; default boxes, detections (as sets: ties may be ordered differently) and losses agree."""
    torch.manual_seed(0)
    tv = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=6)
    for m in tv.modules():  # torchvision's init gives near-constant outputs (all scores tie): spread them
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="linear")
            if m.bias is not None:
                nn.init.normal_(m.bias, 0, 0.1)
    params = load_config(ROOT / "configs/_base_/models/ssdlite_mobilenet_v3.yaml").model.head.params
    ours = _torchvision_taps_detkit(params, 5)
    result = ours.load_state_dict(from_torchvision_ssdlite(tv.state_dict()), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    tv.eval(), ours.eval()
    x = torch.rand(2, 3, 320, 320)
    with torch.no_grad():
        expected = tv(list(x))
        got = ours((x - 0.5) / 0.5)  # torchvision's SSDlite normalisation
        feats = ours.head.feature_maps(ours.features((x - 0.5) / 0.5))
        tv_images, _ = tv.transform(list(x))
        torch.testing.assert_close(ours.head.default_boxes(x, feats),
                                   tv.anchor_generator(tv_images, list(tv.backbone(tv_images.tensors).values()))[0])
    for e, g in zip(expected, got):
        assert len(e["boxes"]) == len(g["boxes"]) == 300
        np.testing.assert_allclose(_canonical(g), _canonical(e), atol=1e-4)
    targets = [{"boxes": torch.tensor([[10.0, 20, 100, 150], [200, 200, 300, 310]]), "labels": torch.tensor([1, 3])},
               {"boxes": torch.tensor([[50.0, 60, 90, 120]]), "labels": torch.tensor([5])}]
    tv.train(), ours.train()
    theirs = tv(list(x), [dict(t) for t in targets])
    mine = ours((x - 0.5) / 0.5, [dict(t) for t in targets])
    torch.testing.assert_close(mine["loss_classifier"], theirs["classification"])
    torch.testing.assert_close(mine["loss_box_reg"], theirs["bbox_regression"])


# ------------------------------------------------------------------------------- training and the contract
def test_loss_falls_over_a_few_steps_on_shapes(shapes_dir):
    from detkit.engine.run import build_datamodule

    torch.manual_seed(0)
    cfg = load_config(SSD_SHAPES, [o for o in tiny_detector_overrides(shapes_dir, "unused")
                                   if not o.startswith("model.head.params")] + ["data.batch_size=4"])
    dm = build_datamodule(cfg)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    model = build_model(cfg).train()
    images = model.normalize(batch["images"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss_dict = model(images, batch["targets"], batch["image_sizes"])
        assert set(loss_dict) == {"loss_classifier", "loss_box_reg"}
        loss = sum(loss_dict.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.6 * losses[0], losses


def test_eval_output_follows_the_contract():
    torch.manual_seed(0)
    model = build_model(small("model.head.params.score_thresh=0.0", "model.head.params.detections_per_img=50"))
    images = torch.randn(2, 3, 128, 128)
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 70.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]  # no object: fine
    model.train()
    losses = model(images, targets, [(128, 128), (96, 128)])
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model(images, image_sizes=[(128, 128), (96, 128)], scales=[(0.5, 0.5), (1.0, 1.0)],
                    orig_sizes=[(256, 256), (96, 128)])
    assert len(out) == 2
    for det, (h, w) in zip(out, [(256, 256), (96, 128)]):
        n = len(det["boxes"])
        assert 0 < n <= 50 and det["boxes"].shape == (n, 4) and det["scores"].shape == det["labels"].shape == (n,)
        assert det["labels"].dtype == torch.int64 and det["labels"].min() >= 1 and det["labels"].max() <= 3
        assert (det["boxes"][:, :2] >= 0).all() and (det["boxes"][:, 2] <= w).all() and (det["boxes"][:, 3] <= h).all()
        assert (det["boxes"][:, 2:] >= det["boxes"][:, :2]).all()
        assert torch.all(det["scores"][:-1] >= det["scores"][1:])
    assert out[0]["boxes"].max() > 128  # mapped back to the 256-pixel original by the 0.5 scale


BACKBONES = ["resnet18", "regnet_x_400mf", "efficientnet_b0", "mobilenet_v3_large", "timm:resnet18"]


@pytest.mark.parametrize("neck", ["none", "fpn"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_family_with_and_without_a_neck(backbone, neck):
    torch.manual_seed(0)
    cfg = load_config(None, ["model.head.name=ssd", f"model.neck.name={neck}", f"model.backbone.name={backbone}",
                             "model.backbone.out_levels=[c3,c4,c5]", "model.neck.out_channels=32",
                             "model.neck.levels=[p3,p4,p5,p6]", "model.num_classes=2", "data.image_size=96",
                             "model.head.params={extra_channels: [32], score_thresh: 0.0}"])
    model = build_model(cfg)
    expected = ["p3", "p4", "p5", "p6"] if neck == "fpn" else ["c4", "c5"]  # default in_levels
    assert model.head.in_levels == expected and len(model.head.extras) == 1
    model.train()
    losses = model(torch.randn(2, 3, 96, 96), [{"boxes": torch.tensor([[8.0, 8.0, 50.0, 40.0]]),
                                                "labels": torch.tensor([1])}] * 2)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    model.eval()
    with torch.no_grad():
        (det,) = model(torch.randn(1, 3, 96, 64), image_sizes=[(96, 60)])
    assert len(det["boxes"]) > 0 and det["boxes"][:, 2].max() <= 60


@pytest.mark.parametrize("neck", ["none", "fpn"])
def test_lite_mode(neck):
    cfg = load_config(None, ["model.head.name=ssd", f"model.neck.name={neck}", "model.backbone.name=mobilenet_v3_large",
                             "model.backbone.out_levels=[c4,c5]", "model.neck.out_channels=32",
                             "model.neck.levels=[p4,p5]", "model.num_classes=2", "data.image_size=128",
                             "model.head.params={lite: true, extra_channels: [64, 32], score_thresh: 0.0}"])
    model = build_model(cfg)
    convs = [m for m in model.head.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert convs and all(m.groups == m.in_channels for m in convs)  # every 3x3 conv is depthwise
    model.train()
    losses = model(torch.randn(2, 3, 128, 128), [{"boxes": torch.tensor([[8.0, 8.0, 90.0, 60.0]]),
                                                  "labels": torch.tensor([2])}] * 2)
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        (det,) = model(torch.randn(1, 3, 128, 128))
    assert len(det["boxes"]) > 0


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "ssd").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_ssd_configs_build_and_detect(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    model = build_model(load_config(path, ["model.backbone.pretrained=null"])).eval()
    assert model.neck is None and len(model.head.extras) > 0
    with torch.no_grad():
        (det,) = model(torch.randn(1, 3, 128, 128))
    assert det["boxes"].shape[1] == 4 and len(det["scores"]) == len(det["labels"])


@pytest.mark.parametrize("override, message", [
    ("model.head.params.neg_to_pos=3", "did you mean 'model.head.params.neg_to_pos_ratio'"),
    ("model.head.params.lite=maybe", "model.head.params.lite"),
    ("model.head.params.in_levels=[c3,c9]", r"in_levels = \['c3', 'c9'\]: \['c9'\] not among .* \['c3', 'c4', 'c5'\]"),
    ("model.head.params.in_levels=[c5,c4]", "from fine to coarse"),
    ("model.head.params.aspect_ratios=[[2],[2]]", "aspect_ratios has 2 entries for 5 levels"),
    ("model.head.params.aspect_ratios=[0,2]", "positive ratios"),
    ("model.head.params.scales=[0.1,0.2]", "expected 6 positive scales"),
    ("model.head.params.min_ratio=0.8", "min_ratio <= max_ratio"),
    ("model.head.params.steps=[8,16]", "steps"),
    ("model.head.params.iou_thresh=1.5", "iou_thresh = 1.5"),
    ("model.head.params.nms_thresh=-1", "nms_thresh"),
    ("model.head.params.neg_to_pos_ratio=0", "neg_to_pos_ratio"),
    ("model.head.params.topk_candidates=0", "at least 1"),
    ("model.head.params.extra_channels=[64,1]", "extra_channels"),
    ("model.head.params.bbox_reg_weights=[1,1]", "bbox_reg_weights"),
])
def test_bad_params_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message) as e:
        build_model(small(override))
    assert "\n" not in str(e.value)


def test_a_tiny_training_run_through_the_engine(shapes_dir, tmp_path):
    overrides = [o for o in tiny_detector_overrides(shapes_dir, tmp_path / "run", "train.epochs=1",
                                                     "trainer.limit_train_batches=3")
                 if not o.startswith("model.head.params")]
    run = detkit.train(SSD_SHAPES, overrides)
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["bbox_AP50"] <= 1.0
    assert set(metrics["per_class"]) == {"circle", "square", "triangle", "star"}
    assert (run / "checkpoints/last.ckpt").is_file()
    again, _ = detkit.evaluate(run, checkpoint=run / "checkpoints/last.ckpt")
    assert again["bbox_AP"] == pytest.approx(metrics["bbox_AP"], abs=1e-12)
