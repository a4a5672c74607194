"""A head declares its weight layout beside its code and names it in its registry line; ``model.weights`` asks the
model's head for it. A head registered from this file with its own layout keeps class rows through
``load_weights``; a head without a torchvision layout takes detkit weights, and refuses torchvision's in one line."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detkit import build_model, load_config
from detkit.errors import PretrainedError
from detkit.heads import HEADS, ClassLayer, HeadTraits, WeightLayout
from detkit.heads.registry import torchvision_heads
from detkit.models import load_weights

SMALL = ["model.backbone.name=resnet18", "model.neck.out_channels=16", "model.neck.levels=[p3,p4,p5]",
         "data.image_size=64"]


class RowsHead(nn.Module):
    """A toy head: per class one logit (no background row) and, background first, 4 box rows per class."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.trunk = nn.Conv2d(channels, channels, 3, padding=1)
        self.cls = nn.Conv2d(channels, num_classes, 1)
        self.box = nn.Linear(channels, 4 * (num_classes + 1))

    def forward(self, features, images, image_sizes, targets=None):
        return [], {}


def build_rows_head(params, channels, strides, num_classes, image_size) -> RowsHead:
    return RowsHead(next(iter(channels.values())), num_classes)


# the layout beside the head's code ...
ROWS_LAYOUT = WeightLayout(class_layers=(ClassLayer(r"cls\.(weight|bias)", background=False),
                                         ClassLayer(r"box\.(weight|bias)", rows=4)))


@pytest.fixture
def rows_head():
    # ... and the head's one registry line
    HEADS.register("rows_toy", build_rows_head, HeadTraits("detection", "per_image", layout=ROWS_LAYOUT))
    yield "rows_toy"
    HEADS.unregister("rows_toy")


def _checkpoint(path, model, classes):
    """A detkit checkpoint as the engine writes one: the config, the class names, the weights under ``model.``."""
    torch.save({"hyper_parameters": {"config": {}, "classes": classes},
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


def test_a_head_registered_with_its_layout_keeps_class_rows(rows_head, tmp_path):
    torch.manual_seed(0)
    source = build_model(load_config(None, [*SMALL, f"model.head.name={rows_head}", "model.num_classes=3"]))
    ckpt = _checkpoint(tmp_path / "source.ckpt", source, ["cat", "dog", "bird"])
    target = build_model(load_config(None, [*SMALL, f"model.head.name={rows_head}", "model.num_classes=3"]))
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    report = load_weights(target, str(ckpt), ["bird", "fish", "cat"])
    assert report.class_rows == {"bird": "bird", "cat": "cat"}
    assert sorted(report.reinitialised) == ["head.box.bias", "head.box.weight", "head.cls.bias", "head.cls.weight"]
    assert not report.skipped and not report.missing
    src, dst = source.state_dict(), target.state_dict()
    # no background row: label k is row k - 1 (bird 3 -> 1, cat 1 -> 3); the fish keeps its fresh row
    assert torch.equal(dst["head.cls.weight"][0], src["head.cls.weight"][2])
    assert torch.equal(dst["head.cls.weight"][2], src["head.cls.weight"][0])
    assert torch.equal(dst["head.cls.weight"][1], fresh["head.cls.weight"][1])
    # background first, 4 rows per class: label k is rows 4k .. 4k + 3
    box_src, box_dst = src["head.box.weight"], dst["head.box.weight"]
    assert torch.equal(box_dst[0:4], box_src[0:4])  # background
    assert torch.equal(box_dst[4:8], box_src[12:16]) and torch.equal(box_dst[12:16], box_src[4:8])
    assert torch.equal(box_dst[8:12], fresh["head.box.weight"][8:12])
    assert torch.equal(dst["head.trunk.weight"], src["head.trunk.weight"])  # not a class layer: loads as it is


def test_a_head_without_a_torchvision_layout_takes_detkit_weights_only(tmp_path):
    cfg = load_config(None, [*SMALL, "model.head.name=yolo", "model.num_classes=2"])
    torch.manual_seed(0)
    source = build_model(cfg)
    target = build_model(cfg)
    report = load_weights(target, str(_checkpoint(tmp_path / "run.ckpt", source, ["a", "b"])), ["a", "b"])
    assert report.loaded == len(target.state_dict()) and not report.skipped
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in target.state_dict().items())
    torch.save(source.state_dict(), tmp_path / "detkit.pth")  # a plain detkit state dict: used as it is
    assert not load_weights(build_model(cfg), str(tmp_path / "detkit.pth"), ["a", "b"]).skipped
    # torchvision's keys (a Faster R-CNN's): one line naming the head and the heads that take them
    torch.save({"backbone.body.conv1.weight": torch.zeros(64, 3, 7, 7), "rpn.head.conv.0.0.weight": torch.zeros(1)},
               tmp_path / "tv.pth")
    with pytest.raises(PretrainedError) as e:
        load_weights(target, str(tmp_path / "tv.pth"), ["a", "b"])
    message = str(e.value)
    assert "\n" not in message and "model.head.name = yolo takes no torchvision detection weights" in message
    assert f"(the heads that do: {', '.join(torchvision_heads())})" in message
    assert torchvision_heads() == ["faster_rcnn", "mask_rcnn", "ssd", "retinanet", "fcos"]


def test_every_registered_layout_resolves():
    for name in HEADS.names():
        layout = HEADS.traits(name).weight_layout()
        assert layout is None or isinstance(layout, WeightLayout), name
    with pytest.raises(ValueError, match="HeadTraits.layout"):
        HeadTraits("detection", "flat", layout=42)
