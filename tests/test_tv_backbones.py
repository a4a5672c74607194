"""``tv:<name>``: any torchvision classification CNN as a backbone. Features equal torchvision's own feature extractor
on the same weights, weights load by the library's names, complexity matches torchvision's published numbers, and
every network (and every network of the CNN lineage, detkit/analysis/lineage.py) trains a step in every head family
through the CLI."""

from __future__ import annotations

import shutil

import pytest
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

from conftest import ROOT, sweep
from detkit.analysis.lineage import LINEAGE
from detkit.backbones import build_backbone, build_classifier
from detkit.errors import ConfigError

NETWORKS = ["shufflenet_v2_x1_0", "mnasnet1_0", "googlenet", "alexnet", "mobilenet_v2", "resnext50_32x4d",
            "densenet121", "vgg16_bn", "convnext_tiny"]
# the levels each has (AlexNet: its first conv has stride 4, so it starts at c2; GoogLeNet and VGG have a stride-2
# map after their first conv / pool)
LEVELS = {"alexnet": ["c2", "c3", "c4", "c5"], "convnext_tiny": ["c2", "c3", "c4", "c5"]}


@pytest.mark.parametrize("name", sweep(NETWORKS, fast=["mobilenet_v2", "googlenet"]))
def test_features_equal_torchvisions_extractor_on_the_same_weights(name, tmp_path):
    torch.manual_seed(0)
    backbone = build_backbone(f"tv:{name}", out_levels=["c3", "c4", "c5"]).eval()
    assert set(LEVELS.get(name, ["c1", "c2", "c3", "c4", "c5"])) <= set(backbone.levels)
    assert backbone.strides == {"c3": 8, "c4": 16, "c5": 32}
    # torchvision's network with other (seeded) weights, saved as a file: they load into the backbone by name
    reference = torchvision.models.get_model(name, weights=None, **(
        {"aux_logits": False, "transform_input": False, "init_weights": True} if name == "googlenet" else {})).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    torch.save(reference.state_dict(), tmp_path / "w.pth")
    loaded = build_backbone(f"tv:{name}", out_levels=["c3", "c4", "c5"], pretrained=str(tmp_path / "w.pth")).eval()
    expected = create_feature_extractor(reference, return_nodes={loaded.nodes[k]: k for k in ("c3", "c4", "c5")})
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        got, want = loaded(x), expected(x)
    for level in ("c3", "c4", "c5"):
        assert got[level].shape[1] == loaded.out_channels[level]
        torch.testing.assert_close(got[level], want[level], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NETWORKS)
def test_complexity_matches_torchvisions_published_numbers(name):
    from detkit.analysis.complexity import count_built

    meta = torchvision.models.get_model_weights(name).DEFAULT.meta
    counted = count_built(lambda: build_classifier(f"tv:{name}"), 224)
    assert counted.params == meta["num_params"]
    assert counted.flops / 1e9 == pytest.approx(meta["_ops"], rel=0.02)


def test_frozen_stages_and_frozen_batchnorm():
    backbone = build_backbone("tv:mobilenet_v2", out_levels=["c3", "c4", "c5"], frozen_stages=2, norm="frozen_bn")
    frozen = [n for n, p in backbone.named_parameters() if not p.requires_grad]
    trainable = [n for n, p in backbone.named_parameters() if p.requires_grad]
    assert frozen and trainable and all(n.startswith("network.features.") for n in frozen)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())  # all frozen BN
    backbone.train()
    assert all(not m.training for m in backbone._frozen)


def test_missing_levels_and_unknown_networks_are_one_line():
    with pytest.raises(ConfigError, match=r"'c1' is not a level of tv:alexnet \(it has c2, c3, c4, c5\)"):
        build_backbone("tv:alexnet", out_levels=["c1", "c2"])
    with pytest.raises(ConfigError, match="'tv:resnet1000': not a torchvision classification model"):
        build_backbone("tv:resnet1000")


HEADS = {"faster_rcnn": "configs/faster_rcnn/shapes.yaml", "yolo": "configs/yolo/shapes.yaml",
         "yolo_af": "configs/yolo_af/shapes.yaml", "ssd": "configs/ssd/shapes.yaml",
         "retinanet": "configs/retinanet/shapes.yaml", "unet": "configs/unet/shapes.yaml"}


@pytest.mark.slow
@pytest.mark.parametrize("name", [n.backbone for n in LINEAGE] + [f"tv:{n}" for n in NETWORKS
                                                                  if f"tv:{n}" not in {m.backbone for m in LINEAGE}])
def test_every_network_trains_a_step_in_every_head_family_through_the_cli(name, shapes_dir, tmp_path):
    from detkit.cli import main

    levels = "[c3,c4,c5]"
    for head, config in HEADS.items():
        data = [f"data.train.images={shapes_dir}/images/train", f"data.val.images={shapes_dir}/images/val",
                "data.generate=null", "data.image_size=64", "data.batch_size=2", "data.num_workers=0"]
        if head == "unet":
            data += [f"data.train.annotations={shapes_dir}/semantic/train",
                     f"data.val.annotations={shapes_dir}/semantic/val"]
        else:
            data += [f"data.train.annotations={shapes_dir}/annotations/instances_train.json",
                     f"data.val.annotations={shapes_dir}/annotations/instances_val.json"]
        model = [f"model.backbone.name={name}", f"model.backbone.out_levels={levels}", "model.neck.out_channels=32"]
        if head == "faster_rcnn":
            model += ["model.neck.levels=[p3,p4,p5]", "model.head.params.anchor_sizes=[[16],[32],[64]]"]
        if head == "ssd":
            model += ["model.neck.name=none"]
        if head == "unet":
            model += ["model.neck.name=none", "model.head.params.decoder_channels=[32,16,8]"]
        args = ["train", str(ROOT / config), *data, *model, "trainer.max_steps=1", "train.epochs=1",
                "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
                "trainer.enable_model_summary=false", f"output_dir={tmp_path / head}"]
        assert main(args) == 0, (name, head)
        assert (tmp_path / head / "checkpoints" / "last.ckpt").is_file()
        shutil.rmtree(tmp_path / head)  # VGG/DenseNet checkpoints are hundreds of MB: keep one at a time
