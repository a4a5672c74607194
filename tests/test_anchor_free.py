"""The anchor-free YOLO-style head: task-aligned assignment and the distribution focal loss on hand-worked cases,
the loss falling on real data, and the head contract."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, shapes_cfg
from detkit.config import load_config
from detkit.errors import ConfigError
from detkit.heads.anchor_free import (
    boxes_to_distances,
    dfl_loss,
    distances_to_boxes,
    make_points,
    task_aligned_assign,
)
from detkit.models import build_model

CONFIG = ROOT / "configs" / "yolo_af" / "shapes.yaml"


def test_points_are_cell_centres_level_by_level():
    points, strides = make_points([(2, 3), (1, 1)], [8, 16], torch.device("cpu"))
    assert points.tolist() == [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12], [8, 8]]
    assert strides.tolist() == [8] * 6 + [16]


def test_distances_and_boxes_are_inverse():
    points = torch.tensor([[10.0, 20.0], [5.0, 5.0]])
    boxes = torch.tensor([[0.0, 4.0, 30.0, 21.0], [1.0, 2.0, 9.0, 6.0]])
    ltrb = boxes_to_distances(points, boxes)
    assert ltrb.tolist() == [[10, 16, 20, 1], [4, 3, 4, 1]]
    assert torch.equal(distances_to_boxes(points, ltrb), boxes)


def test_dfl_is_the_interpolated_cross_entropy_and_lowest_at_the_target():
    target = torch.tensor([[2.3, 0.0, 4.99, 1.5]])
    logits = torch.randn(1, 4, 6)
    expected = []
    for side, t in enumerate(target[0].tolist()):
        left = math.floor(t)
        logp = F.log_softmax(logits[0, side], -1)
        expected.append(-(logp[left] * (left + 1 - t) + logp[left + 1] * (t - left)))
    assert dfl_loss(logits, target).item() == pytest.approx(sum(expected).item() / 4, rel=1e-5)
    # the best distribution puts the interpolation weights on the two bins around the target
    best = torch.full((1, 1, 6), -1e4)
    best[0, 0, 2], best[0, 0, 3] = math.log(0.7), math.log(0.3)
    worse = torch.full((1, 1, 6), -1e4)
    worse[0, 0, 2] = 0.0
    t = torch.tensor([[2.3]])
    assert dfl_loss(best, t) < dfl_loss(worse, t)
    # its expectation is the target distance
    assert (F.softmax(best[0, 0], -1) @ torch.arange(6.0)).item() == pytest.approx(2.3, abs=1e-4)


def test_task_aligned_assignment_by_hand():
    # three points; the object [0, 0, 32, 32] (class 1 of 2) contains the first two
    points = torch.tensor([[4.0, 4.0], [20.0, 20.0], [48.0, 48.0]])
    gt = torch.tensor([[0.0, 0.0, 32.0, 32.0]])
    pred = torch.tensor([[0.0, 0.0, 32.0, 32.0],  # IoU 1
                         [0.0, 0.0, 32.0, 16.0],  # IoU 0.5
                         [0.0, 0.0, 32.0, 32.0]])  # perfect, but outside: never a positive
    scores = torch.tensor([[0.25, 0.9], [0.81, 0.1], [0.99, 0.0]])
    a = task_aligned_assign(scores, pred, points, gt, torch.tensor([1]), topk=2, alpha=0.5, beta=6.0)
    assert a.positive.tolist() == [True, True, False]
    t0 = 0.25 ** 0.5 * 1.0 ** 6  # 0.5
    t1 = 0.81 ** 0.5 * 0.5 ** 6  # 0.0140625
    # soft targets: alignment rescaled so that the object's best point gets its best IoU (1.0)
    assert a.scores[:, 0].tolist() == pytest.approx([1.0, t1 / t0, 0.0])
    assert a.scores[:, 1].tolist() == [0.0, 0.0, 0.0]
    assert torch.equal(a.boxes[0], gt[0])
    # topk = 1: only the better aligned point
    a1 = task_aligned_assign(scores, pred, points, gt, torch.tensor([1]), topk=1, alpha=0.5, beta=6.0)
    assert a1.positive.tolist() == [True, False, False]


def test_a_point_claimed_by_two_objects_goes_to_the_one_it_overlaps_most():
    points = torch.tensor([[16.0, 16.0]])
    gts = torch.tensor([[0.0, 0.0, 32.0, 32.0], [8.0, 8.0, 24.0, 24.0]])
    pred = torch.tensor([[7.0, 7.0, 25.0, 25.0]])  # IoU 0.32 with the first, 0.79 with the second
    scores = torch.tensor([[0.5, 0.5]])
    a = task_aligned_assign(scores, pred, points, gts, torch.tensor([1, 2]), topk=10, alpha=0.5, beta=6.0)
    assert a.positive.tolist() == [True] and a.gt_index.tolist() == [1]
    assert a.scores[0, 0] == 0 and a.scores[0, 1] > 0 and torch.equal(a.boxes[0], gts[1])


def test_no_objects_no_positives():
    a = task_aligned_assign(torch.rand(5, 3), torch.rand(5, 4), torch.rand(5, 2), torch.zeros(0, 4),
                            torch.zeros(0, dtype=torch.long), topk=10, alpha=0.5, beta=6.0)
    assert not a.positive.any() and a.scores.shape == (5, 3) and a.scores.sum() == 0


def test_the_loss_falls_on_shapes_and_detections_keep_the_contract(shapes_dir):
    from detkit.data.build import build_dataset
    from detkit.data.collate import Collate
    from detkit.data.transforms import build_pipeline

    cfg = load_config(CONFIG, ["data.image_size=96", "model.neck.out_channels=32", "model.backbone.name=resnet18"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    ds = build_dataset(shapes_cfg(shapes_dir), transform=build_pipeline("val", image_size=96, train=False))
    batch = Collate(32)([ds[i] for i in range(4)])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    history = []
    for _ in range(30):
        losses = model(batch["images"], batch["targets"], batch["image_sizes"])
        assert set(losses) == {"loss_box", "loss_cls", "loss_dfl"} and all(torch.isfinite(v) for v in losses.values())
        history.append({k: v.item() for k, v in losses.items()})
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    first, last = history[0], history[-1]
    assert sum(last.values()) < 0.6 * sum(first.values())
    assert all(last[k] < first[k] for k in first)
    model.eval()
    with torch.no_grad():
        dets = model.predict(batch)
    for d, t in zip(dets, batch["targets"]):
        h, w = t["orig_size"]
        assert (d["boxes"][:, 2:] <= torch.tensor([w, h])).all() and (d["boxes"] >= 0).all()
        assert torch.all(d["scores"][:-1] >= d["scores"][1:]) and d["labels"].min() >= 1


@pytest.mark.parametrize("override,message", [
    ("model.head.params.reg_max=1", "reg_max = 1: expected at least 2 bins"),
    ("model.head.params.topk=0", "topk = 0: expected at least 1"),
    ("model.head.params.levels=[p5,p3]", "fine to coarse"),
    ("model.head.params.dfl_wieght=1", "did you mean 'model.head.params.dfl_weight'"),
])
def test_bad_params_are_one_line(override, message):
    with pytest.raises(ConfigError, match=message):
        build_model(load_config(CONFIG, [override]))


@pytest.mark.parametrize("config", ["yolo_af/shapes.yaml", "yolo_af/raccoon.yaml", "yolo_af/coco128.yaml",
                                    "yolo/raccoon.yaml", "yolo/coco128.yaml"])
def test_shipped_recipes_train_in_channels_last_with_the_same_losses(config, shapes_dir, tmp_path):
    """The shipped one-stage recipes (train.channels_last on) train through the engine on the shapes set: the
    weights stay channels-last during training, each batch arrives channels-last, the losses equal those of the
    default memory layout, and the checkpoint loads into a plain model."""
    import lightning as L

    import detkit
    from conftest import tiny_detector_overrides

    overrides = [o for o in tiny_detector_overrides(shapes_dir, tmp_path / "run") if not o.startswith("model.")]
    overrides += ["data.train.format=coco", "data.val.format=coco", "data.train.split=null", "data.val.split=null",
                  "data.train.classes=null", "data.val.classes=null", "model.num_classes=4",
                  "model.neck.out_channels=16", "train.epochs=1", "trainer.max_steps=2", "trainer.limit_val_batches=1",
                  "train.budget=null"]
    cfg = load_config(ROOT / "configs" / config, overrides)
    assert cfg.train.channels_last is True
    seen = []

    class Check(L.Callback):
        def on_train_start(self, trainer, module):
            losses = module.model.losses

            def spy(batch):  # what the model is given: channels-last images, channels-last weights
                conv = next(m for m in module.model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
                seen.append((batch["images"].is_contiguous(memory_format=torch.channels_last),
                             conv.weight.is_contiguous(memory_format=torch.channels_last)))
                if len(seen) == 1:  # the same losses in the default layout
                    with torch.no_grad():
                        a = losses(batch)
                        b = losses(dict(batch, images=batch["images"].contiguous()))
                    for k in a:
                        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4)
                return losses(batch)

            module.model.losses = spy

    run = detkit.train(cfg, callbacks=[Check()])
    assert seen and all(images and weights for images, weights in seen)
    model = detkit.load_model(run / "checkpoints" / "last.ckpt")
    assert all(torch.isfinite(p).all() for p in model.parameters())
