"""RetinaNet and FCOS on detkit's backbones and necks: parity with torchvision on the same (seeded) weights, the
head contract, training, and ``model.weights`` (starting from a trained detector, keeping known classes)."""

from __future__ import annotations

import json

import pytest
import torch
from torchvision.models.detection import fasterrcnn_resnet50_fpn, fcos_resnet50_fpn, retinanet_resnet50_fpn

from conftest import ROOT, TINY_CONFIG, tiny_detector_overrides
from detkit import build_model, load_config
from detkit.errors import ConfigError, PretrainedError
from detkit.heads.dense import from_torchvision_dense
from detkit.models import load_weights

MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
PARITY = ["model.backbone.name=resnet50", "model.backbone.norm=bn", "model.backbone.out_levels=[c3,c4,c5]",
          "model.neck.levels=[p3,p4,p5,p6,p7]", "model.neck.extra_from=fpn", "model.num_classes=90"]
# low thresholds: the (seeded, untrained) networks score about their prior, and many detections get compared
LOW = ["model.head.params={score_thresh: 0.009, detections_per_img: 50}"]
TORCHVISION = {"retinanet": (retinanet_resnet50_fpn, LOW), "fcos": (fcos_resnet50_fpn, LOW)}


@pytest.mark.parametrize("head", ["retinanet", "fcos"])
def test_torchvision_weights_give_the_same_detections(head):
    build, extra = TORCHVISION[head]
    torch.manual_seed(0)
    kwargs = {"score_thresh": 0.009, "detections_per_img": 50}
    tv = build(weights=None, weights_backbone=None, min_size=256, max_size=256, **kwargs).eval()
    model = build_model(load_config(None, [*PARITY, f"model.head.name={head}", *extra])).eval()
    result = model.load_state_dict(from_torchvision_dense(tv.state_dict()), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.rand(2, 3, 256, 256)  # at min_size: torchvision's transform does not resize it
    with torch.no_grad():
        expected = tv(list(x))
        got = model((x - MEAN) / STD)
    for e, g in zip(expected, got):
        assert (e["labels"] > 0).all()  # torchvision's background class is not among them (detkit never gives it)
        assert len(e["boxes"]) == len(g["boxes"]) > 10
        torch.testing.assert_close(g["boxes"], e["boxes"], atol=1e-3, rtol=0)
        torch.testing.assert_close(g["scores"], e["scores"], atol=1e-4, rtol=0)
        assert torch.equal(g["labels"], e["labels"])


@pytest.mark.parametrize("head", ["retinanet", "fcos"])
def test_heads_train_on_any_backbone_and_keep_the_contract(head):
    cfg = load_config(ROOT / f"configs/{head}/shapes.yaml", ["model.backbone.name=mobilenet_v3_large",
                                                            "model.neck.out_channels=64", "model.num_classes=3",
                                                            "data.image_size=96", "model.head.params.score_thresh=0"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    images = torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8)
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 50.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.tensor([[30.0, 20.0, 90.0, 95.0], [5.0, 5.0, 25.0, 30.0]]),
                "labels": torch.tensor([1, 3])}]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = None
    for _ in range(15):
        losses = model(images, targets)
        assert all(k.startswith("loss_") and torch.isfinite(v) for k, v in losses.items())
        first = first if first is not None else sum(v.item() for v in losses.values())
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    assert sum(v.item() for v in losses.values()) < first
    model.eval()
    with torch.no_grad():
        (det,) = model(images[:1], image_sizes=[(96, 80)], scales=[(0.5, 0.5)], orig_sizes=[(192, 160)])
    assert det["boxes"].shape[1] == 4 and (det["boxes"][:, 2] <= 160).all() and (det["boxes"][:, 3] <= 192).all()
    assert det["labels"].min() >= 1 and det["labels"].max() <= 3


def test_bad_dense_params_are_one_line():
    base = ROOT / "configs/retinanet/shapes.yaml"
    for override, message in (("model.head.params.anchor_sizes=[[16]]", "give 5 lists"),
                              ("model.head.params.bg_iou_thresh=0.9", "bg_iou_thresh 0.9 is above"),
                              ("model.head.params.head_norm=batch", "expected none or group"),
                              ("model.neck.out_channels=48", "needs at least 64 channels, a multiple of 32")):
        extra = ["model.head.params.head_norm=group"] if "out_channels" in override else []
        with pytest.raises(ConfigError, match=message):
            build_model(load_config(base, [override, *extra]))


# ------------------------------------------------------------------------------------------ model.weights
@pytest.fixture(scope="module")
def coco_retinanet(tmp_path_factory):
    """torchvision's RetinaNet (91 COCO outputs), seeded and saved locally as a plain state dict."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("tv") / "retinanet_coco.pth"
    torch.save(retinanet_resnet50_fpn(weights=None, weights_backbone=None).state_dict(), path)
    return path


def test_weights_keep_the_rows_of_known_classes(coco_retinanet):
    cfg = load_config(None, [*PARITY[:-1], "model.num_classes=3", "model.head.name=retinanet"])
    model = build_model(cfg)
    classes = ["pedestrian", "dog", "unicorn"]
    report = load_weights(model, str(coco_retinanet), classes, {"pedestrian": "person"})
    assert report.class_rows == {"pedestrian": "person", "dog": "dog"}  # mapped, by name; the unicorn is new
    src = torch.load(coco_retinanet, weights_only=True)["head.classification_head.cls_logits.weight"]
    dst = model.state_dict()["head.net.head.classification_head.cls_logits.weight"]
    # 9 anchors x (background + 3 classes) rows; COCO: person is label 1, dog label 18 (torchvision's list)
    for a in range(9):
        assert torch.equal(dst[a * 4 + 1], src[a * 91 + 1]) and torch.equal(dst[a * 4 + 2], src[a * 91 + 18])
        assert not torch.equal(dst[a * 4 + 3], src[a * 91 + 3])
    assert report.reinitialised and report.loaded > 300 and not report.missing


def test_a_wrong_weights_file_is_one_line(coco_retinanet, tmp_path):
    model = build_model(load_config(None, ["model.head.name=yolo_af", "model.num_classes=2",
                                           "model.backbone.name=mobilenet_v3_large"]))
    with pytest.raises(PretrainedError, match=r"only \d+ % of the model's weights \(\d+ of its \d+ tensors\) fit"):
        load_weights(model, str(coco_retinanet), ["a", "b"])
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(PretrainedError, match="junk.pth: not a readable torch file"):
        load_weights(model, str(tmp_path / "junk.pth"), ["a", "b"])
    with pytest.raises(PretrainedError, match="no such file or run directory, and not torchvision weights"):
        load_weights(model, "no/such/file.pth", ["a", "b"])
    with pytest.raises(PretrainedError, match="the source has no such class"):
        load_weights(build_model(load_config(None, [*PARITY[:-1], "model.num_classes=1",
                                                   "model.head.name=retinanet"])),
                     str(coco_retinanet), ["x"], {"x": "unicorn"})


@pytest.mark.slow
def test_fine_tuning_from_a_coco_detector_through_train(shapes_dir, tmp_path):
    """A Faster R-CNN trained on COCO (seeded, saved locally) fine-tuned on shapes: its weights are where training
    starts, the classes it knows keep their rows, the report is in the run directory."""
    import detkit

    torch.manual_seed(2)
    tv = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, trainable_backbone_layers=5)
    weights = tmp_path / "frcnn_coco.pth"
    torch.save(tv.state_dict(), weights)
    overrides = [o for o in tiny_detector_overrides(shapes_dir, tmp_path / "run") if not o.startswith("model.")]
    overrides += ["model.backbone.name=resnet50", "model.neck.out_channels=256", "model.neck.levels=[p2,p3,p4,p5,p6]",
                  "model.neck.extra_op=maxpool", f"model.weights={weights}", "model.weights_classes={circle: clock}",
                  "trainer.max_steps=1", "train.epochs=1", "trainer.limit_val_batches=1",
                  "model.head.params={anchor_sizes: [[32], [64], [128], [256], [512]]}"]
    run = detkit.train(TINY_CONFIG, overrides)
    report = json.loads((run / "weights_report.json").read_text())
    assert report["class_rows"] == {"circle": "clock"} and report["loaded"] > 250
    model = detkit.load_model(run / "checkpoints" / "last.ckpt")
    # one AdamW step at a small learning rate moved the backbone's first conv only a little from COCO's
    start = torch.load(weights, weights_only=True)["backbone.body.conv1.weight"]
    assert (model.backbone.network.conv1.weight - start).abs().max() < 0.01
