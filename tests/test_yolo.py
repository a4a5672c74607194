"""The YOLO-style head: target assignment, box coding, NMS, losses, the output contract, params, training."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import QUIET_TRAINER, shapes_data_overrides
from detkit import build_model, load_config
from detkit.errors import ConfigError
from detkit.heads.yolo import build_yolo_head, decode, encode, make_grid

ROOT_CFG = "configs/yolo/shapes.yaml"
ANCHORS = [[[10, 10], [20, 10], [10, 20]], [[40, 40], [80, 40], [40, 80]], [[100, 100], [120, 60], [60, 120]]]
LEVELS = {"p3": 8, "p4": 16, "p5": 32}


def head(num_classes=3, **params):
    params = {"anchors": ANCHORS, "head_convs": 0, **params}
    return build_yolo_head(params, {k: 8 for k in LEVELS}, LEVELS, num_classes, 128)


def target(*boxes, labels=None):
    b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return {"boxes": b, "labels": torch.tensor(labels or [1] * len(b))}


def positives(assigned):
    """{(level, image, anchor, gy, gx)} of an assignment."""
    return {(lvl, *map(int, row)) for lvl, a in zip(LEVELS, assigned) for row in a["index"]}


def test_assignment_picks_the_level_anchor_and_cells_by_shape():
    """A 40x40 box centred at (52, 70) with ratio_thresh 2: only P4's 40x40 anchor fits. Stride 16 puts the
    centre at (3.25, 4.375) -> cell (3, 4); it is in the left/top half, so the left (2, 4) and upper (3, 3)
    neighbours are positives too."""
    h = head(ratio_thresh=2.0)
    assigned = h.assign([target([32, 50, 72, 90], labels=[2])], [(16, 16), (8, 8), (4, 4)])
    assert positives(assigned) == {("p4", 0, 0, 4, 3), ("p4", 0, 0, 4, 2), ("p4", 0, 0, 3, 3)}
    assert assigned[1]["labels"].tolist() == [1, 1, 1]  # 0-based class of label 2
    assert h.boxes_force_matched == 0


def test_assignment_right_and_lower_neighbours_and_grid_edges():
    h = head(ratio_thresh=2.0)
    # centre (60, 60) at P4 -> (3.75, 3.75): right and lower neighbours
    assert positives(h.assign([target([40, 40, 80, 80])], [(16, 16), (8, 8), (4, 4)])) == {
        ("p4", 0, 0, 3, 3), ("p4", 0, 0, 3, 4), ("p4", 0, 0, 4, 3)}
    # centre (3, 3) in the corner cell (0, 0) of P3 (10x10 anchor): the left/upper neighbours are off the grid
    assert positives(h.assign([target([-2, -2, 8, 8])], [(16, 16), (8, 8), (4, 4)])) == {("p3", 0, 0, 0, 0)}
    # without neighbour cells only the centre cell
    h = head(ratio_thresh=2.0, neighbour_cells=False)
    assert positives(h.assign([target([40, 40, 80, 80])], [(16, 16), (8, 8), (4, 4)])) == {("p4", 0, 0, 3, 3)}


def test_assignment_ratio_rule_matches_several_anchors_and_images():
    """With the default ratio 4 a 40x40 box fits P4's three anchors and P5's three (100/40 = 2.5 < 4), not P3's
    (40/10 = 4 is not < 4); boxes of the second image get image index 1."""
    h = head(neighbour_cells=False)
    assigned = h.assign([target(), target([32, 50, 72, 90])], [(16, 16), (8, 8), (4, 4)])
    got = positives(assigned)
    assert {(lvl, a) for lvl, _, a, _, _ in got} == {("p4", 0), ("p4", 1), ("p4", 2), ("p5", 0), ("p5", 1), ("p5", 2)}
    assert {img for _, img, _, _, _ in got} == {1}


def test_assignment_by_iou():
    h = head(match="iou", iou_thresh=0.6, neighbour_cells=False)
    # 40x20 box: IoU with 40x40 = 0.5, with 80x40 = 0.25, with 20x10 = 0.25, with 40x80 = 0.25 -> none above 0.6
    # except ... none: force-matched to the best (P4 anchor 0, IoU 0.5)
    assert positives(h.assign([target([0, 0, 40, 20])], [(16, 16), (8, 8), (4, 4)])) == {("p4", 0, 0, 0, 1)}
    assert h.boxes_force_matched == 1
    h = head(match="iou", iou_thresh=0.4, neighbour_cells=False)
    assert {(lvl, a) for lvl, _, a, _, _ in positives(h.assign([target([0, 0, 40, 20])], [(16, 16), (8, 8), (4, 4)]))} \
        == {("p4", 0)}


def test_a_box_no_anchor_fits_gets_its_best_anchor():
    """A 2x2 box is 5x smaller than every anchor (ratio 2): it still gets one positive, P3's 10x10 anchor."""
    h = head(ratio_thresh=2.0, neighbour_cells=False)
    assert positives(h.assign([target([20, 20, 22, 22])], [(16, 16), (8, 8), (4, 4)])) == {("p3", 0, 0, 2, 2)}
    assert h.boxes_force_matched == 1


def test_decode_encode_round_trip():
    torch.manual_seed(0)
    grid = torch.randint(0, 10, (200, 2)).float()
    anchors = torch.rand(200, 2) * 50 + 5
    stride = 16.0
    centre = (grid + torch.rand(200, 2) * 1.9 - 0.45) * stride  # offsets in (-0.45, 1.45) cells
    wh = anchors * (torch.rand(200, 2) * 3.8 + 0.1)  # (0.1, 3.9) x anchor
    boxes = torch.cat([centre - wh / 2, centre + wh / 2], 1)
    torch.testing.assert_close(decode(encode(boxes, grid, anchors, stride), grid, anchors, stride), boxes,
                               atol=1e-3, rtol=1e-5)
    t = torch.randn(200, 4) * 2
    torch.testing.assert_close(encode(decode(t, grid, anchors, stride), grid, anchors, stride), t, atol=1e-3,
                               rtol=1e-4)


def outputs_with(h, boxes_at, image=32):
    """Raw outputs of an image of ``image`` px: background everywhere except ``boxes_at``:
    [(level index, anchor, gy, gx, box xyxy, objectness prob, class index)]."""
    outs = []
    for s in h.strides:
        n = image // s
        o = torch.zeros(1, h.num_anchors, n, n, 5 + h.num_classes)
        o[..., 4:] = -30.0
        outs.append(o)
    for lvl, a, gy, gx, box, obj, cls in boxes_at:
        t = encode(torch.tensor([box], dtype=torch.float32), torch.tensor([[gx, gy]], dtype=torch.float32),
                   h.anchors[lvl, a][None], h.strides[lvl])
        outs[lvl][0, a, gy, gx, :4] = t[0]
        outs[lvl][0, a, gy, gx, 4] = torch.logit(torch.tensor(obj))
        outs[lvl][0, a, gy, gx, 5 + cls] = 30.0
    return outs


def test_nms_suppresses_same_class_overlaps_and_keeps_other_classes():
    h = head(score_thresh=0.05, nms_thresh=0.5).eval()
    box = [4.0, 4.0, 14.0, 14.0]
    shifted = [5.0, 5.0, 15.0, 15.0]  # IoU 0.68 with box
    outs = outputs_with(h, [(0, 0, 1, 1, box, 0.9, 0), (0, 0, 1, 0, shifted, 0.8, 0),  # same class: one kept
                            (0, 0, 0, 1, shifted, 0.7, 2),  # other class at the same place: kept
                            (0, 0, 2, 2, [18.0, 18.0, 28.0, 28.0], 0.6, 1),  # elsewhere: kept
                            (0, 0, 3, 3, [25.0, 25.0, 31.0, 31.0], 0.01, 1)])  # below score_thresh: dropped
    (det,) = h.postprocess(outs, [(32, 32)])
    assert det["labels"].tolist() == [1, 3, 2]  # labels are 1..K, sorted by score
    torch.testing.assert_close(det["scores"], torch.tensor([0.9, 0.7, 0.6]), atol=1e-4, rtol=0)
    torch.testing.assert_close(det["boxes"][0], torch.tensor(box), atol=1e-3, rtol=0)
    # max_detections caps the count, keeping the best
    h.p.max_detections = 2
    assert h.postprocess(outs, [(32, 32)])[0]["scores"].tolist() == pytest.approx([0.9, 0.7], abs=1e-4)
    # boxes are clipped to the (unpadded) image size
    h.p.max_detections = 300
    (det,) = h.postprocess(outputs_with(h, [(0, 0, 1, 1, [4.0, 4.0, 14.0, 14.0], 0.9, 0)]), [(10, 12)])
    assert det["boxes"][0].tolist() == pytest.approx([4.0, 4.0, 12.0, 10.0], abs=1e-3)


def test_single_label_mode_keeps_one_class_per_box():
    h = head(score_thresh=0.05, multi_label=False).eval()
    outs = outputs_with(h, [(0, 0, 1, 1, [4.0, 4.0, 14.0, 14.0], 0.9, 0)])
    outs[0][0, 0, 1, 1, 5 + 1] = 2.0  # a second class above threshold at the same box
    assert h.postprocess(outs, [(32, 32)])[0]["labels"].tolist() == [1]
    h.p.multi_label = True
    assert sorted(h.postprocess(outs, [(32, 32)])[0]["labels"].tolist()) == [1, 2]


def test_loss_is_zero_box_and_cls_and_low_obj_for_a_perfect_prediction():
    """Outputs that decode exactly onto the target at every assigned positive give box/cls losses ~0."""
    h = head(num_classes=2, ratio_thresh=2.0)
    tgt = target([32, 50, 72, 90], labels=[2])
    assigned = h.assign([tgt], [(4, 4), (2, 2), (1, 1)])
    outs = outputs_with(h, [(1, int(a), int(gy), int(gx), [32.0, 50.0, 72.0, 90.0], 0.999, 1)
                            for _, a, gy, gx in assigned[1]["index"]], image=32)
    # a 32-px canvas is enough: assignment runs on the given grids; use 64 px grids for this box
    outs = outputs_with(h, [(1, int(a), int(gy), int(gx), [32.0, 50.0, 72.0, 90.0], 0.999, 1)
                            for _, a, gy, gx in h.assign([tgt], [(16, 16), (8, 8), (4, 4)])[1]["index"]], image=128)
    losses = h.loss(outs, [tgt])
    assert losses["loss_box"].item() < 1e-3
    assert losses["loss_cls"].item() < 1e-3
    assert losses["loss_obj"].item() < 0.05


def tiny(tmp_path, shapes_dir, *extra):
    return [*shapes_data_overrides(shapes_dir), "model.neck.out_channels=32", "model.head.params.head_convs=1",
            "train.warmup_iters=2", *QUIET_TRAINER, "trainer.check_val_every_n_epoch=1",
            f"output_dir={tmp_path / 'run'}", *extra]


def test_loss_falls_over_a_few_steps_on_shapes(shapes_dir, tmp_path):
    from detkit.data.datamodule import DetDataModule

    torch.manual_seed(0)
    cfg = load_config(ROOT_CFG, tiny(tmp_path, shapes_dir))
    dm = DetDataModule(cfg)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    model = build_model(cfg).train()
    images = model.normalize(batch["images"])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    first = None
    for _ in range(25):
        losses = model(images, batch["targets"], batch["image_sizes"])
        loss = sum(losses.values())
        first = first if first is not None else {k: v.item() for k, v in losses.items()}
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = {k: v.item() for k, v in losses.items()}
    assert sum(last.values()) < 0.7 * sum(first.values())
    assert last["loss_box"] < first["loss_box"] and last["loss_cls"] < first["loss_cls"]


def test_detections_follow_the_contract(shapes_dir, tmp_path):
    """Eval output: per image boxes in the original image's pixels, scores sorted, labels 1..K."""
    from detkit.data.datamodule import DetDataModule

    cfg = load_config(ROOT_CFG, tiny(tmp_path, shapes_dir, "model.head.params.score_thresh=0.0",
                                     "model.head.params.max_detections=50"))
    dm = DetDataModule(cfg)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    model = build_model(cfg).eval()
    scales = [t["scale"] for t in batch["targets"]]
    orig = [t["orig_size"] for t in batch["targets"]]
    with torch.no_grad():
        dets = model(batch["images"], None, batch["image_sizes"], scales, orig)  # uint8: the model normalises
    assert len(dets) == len(batch["image_sizes"])
    for d, (h, w) in zip(dets, orig):
        assert set(d) == {"boxes", "scores", "labels"}
        assert 0 < len(d["boxes"]) <= 50 and d["boxes"].shape[1] == 4
        assert (d["boxes"][:, 0] >= 0).all() and (d["boxes"][:, 2] <= w).all() and (d["boxes"][:, 3] <= h).all()
        assert (d["boxes"][:, 2] >= d["boxes"][:, 0]).all()
        assert torch.all(d["scores"][:-1] >= d["scores"][1:])
        assert d["labels"].min() >= 1 and d["labels"].max() <= cfg.model.num_classes


@pytest.mark.parametrize("backbone", ["mobilenet_v3_small", "regnet_x_400mf", "efficientnet_b0", "timm:resnet18"])
@pytest.mark.parametrize("neck", ["pan", "none"])
def test_any_backbone_with_or_without_a_neck(backbone, neck):
    cfg = load_config(ROOT_CFG, [f"model.backbone.name={backbone}", f"model.neck.name={neck}",
                                 "model.neck.out_channels=16", "model.head.params.head_channels=16",
                                 "model.head.params.head_convs=1"])
    model = build_model(cfg)
    assert model.head.levels == (["p3", "p4", "p5"] if neck == "pan" else ["c3", "c4", "c5"])
    model.train()
    losses = model(torch.randn(1, 3, 96, 96), [target([10, 10, 50, 40], labels=[3])])
    assert set(losses) == {"loss_box", "loss_obj", "loss_cls"} and all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        assert len(model(torch.randn(1, 3, 70, 90))) == 1  # not a multiple of 32


@pytest.mark.parametrize("override,message", [
    ("model.head.params.anchors=[[[10,10]],[[20,20]]]", "2 entries for 3 levels"),
    ("model.head.params.anchors=[[[10,10]],[[20,20],[30,30]],[[40,40]]]", "same number"),
    ("model.head.params.anchors=[[[10,0]],[[20,20]],[[40,40]]]", "not a [w, h] pair"),
    ("model.head.params.match=overlap", "expected ratio or iou"),
    ("model.head.params.box_loss=l1", "expected one of ciou"),
    ("model.head.params.nms_tresh=0.5", "did you mean 'model.head.params.nms_thresh'"),
    ("model.head.params.levels=[p3,p9]", "not among the available levels"),
    ("model.head.params.levels=[p5,p3]", "fine to coarse"),
    ("model.head.params.ratio_thresh=1.0", "above 1"),
    ("model.head.params.score_thresh=2", "in [0, 1]"),
])
def test_bad_params_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=None) as e:
        build_model(load_config(ROOT_CFG, [override]))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_grid():
    g = make_grid(2, 3)
    assert g.shape == (2, 3, 2) and g[1, 2].tolist() == [2.0, 1.0]


def test_trains_and_evaluates_through_the_engine(shapes_dir, tmp_path):
    from detkit.engine import evaluate, train

    run = train(ROOT_CFG, tiny(tmp_path, shapes_dir, "train.epochs=1", "trainer.limit_train_batches=3",
                               "model.head.params.score_thresh=0.0", "model.head.params.max_detections=20"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"bbox_AP", "bbox_AP50", "voc07_mAP"} <= set(metrics)
    assert all(v is None or 0.0 <= v <= 1.0 for k, v in metrics.items() if k != "per_class")
    evaluate(run)
    preds = json.loads((run / "predictions.json").read_text())
    assert preds and {"image_id", "category_id", "bbox", "score"} <= set(preds[0])
