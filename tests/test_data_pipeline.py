"""Transforms, batching, the DataModule, conversion to COCO, and the data CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from conftest import FIXTURES, shapes_cfg, shared_path
from detkit.cli import main
from detkit.config import load_config
from detkit.data.build import build_dataset
from detkit.data.collate import Collate
from detkit.data.datamodule import GroupedSampler
from detkit.data.to_coco import to_coco
from detkit.data.transforms import build_pipeline
from detkit.engine.run import build_datamodule
from detkit.errors import ConfigError
from detkit.models import build_model

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _mask_inside_box(mask, box, tol=3.0):
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return True
    return xs.min() >= box[0] - tol and xs.max() + 1 <= box[2] + tol and ys.min() >= box[1] - tol \
        and ys.max() + 1 <= box[3] + tol


def test_train_pipeline_keeps_boxes_inside_and_aligned_with_masks(shapes_dir):
    ds = build_dataset(shapes_cfg(shapes_dir))
    pipe = build_pipeline("train", image_size=80, train=True)
    dropped = 0
    for i in range(len(ds)):
        raw = ds.load(i)
        s = pipe(raw)
        assert s["image"].shape == (3, 80, 80) and s["image"].dtype == torch.uint8  # the model normalises
        b = s["boxes"]
        assert (b >= 0).all() and (b <= 80).all() and (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert len(s["labels"]) == len(b) == len(s["masks"]) == len(s["iscrowd"])
        for box, m in zip(b.numpy(), s["masks"].numpy()):
            assert _mask_inside_box(m, box)
        dropped += s["boxes_dropped"]
        assert s["boxes_dropped"] == len(raw["boxes"]) - len(b)
    assert dropped > 0  # random crops do drop boxes, and say so


def test_val_letterbox_maps_back_to_original_pixels(shapes_dir):
    ds = build_dataset({**shapes_cfg(shapes_dir), "format": "coco"})
    for resize in ("letterbox", "stretch"):
        pipe = build_pipeline("val", image_size=160, train=False, resize=resize)
        raw = ds.load(0)
        s = pipe(raw)
        sx, sy = s["scale"]
        back = s["boxes"].numpy() / np.array([sx, sy, sx, sy])
        np.testing.assert_allclose(back, raw["boxes"], atol=1e-3)
        assert max(s["image"].shape[-2:]) == 160
        if resize == "stretch":
            assert s["image"].shape[-2:] == (160, 160)


def test_semantic_maps_follow_the_image_and_padding_is_ignored():
    root = shared_path("datasets", "camvid")
    ds = build_dataset({"format": "masks", "images": str(root / "train"), "annotations": str(root / "trainannot"),
                        "classes": [f"c{i}" for i in range(11)], "ignore_index": 11})
    pipe = build_pipeline([{"name": "LongestMaxSize", "max_size": 120},
                           {"name": "PadIfNeeded", "min_height": 120, "min_width": 120, "border_mode": 0,
                            "position": "top_left"},
                           {"name": "HorizontalFlip", "p": 1.0}], image_size=120, train=True)
    raw = ds.load(0)
    s = pipe(raw)
    sem = s["semantic"].numpy()
    assert sem.shape == (120, 120) and set(np.unique(sem)) <= set(range(11)) | {255}
    assert (sem[90:] == 255).all()  # 480x360 -> 120x90 plus padding: padding is unlabeled, not class 0
    from PIL import Image

    small = np.asarray(Image.fromarray(raw["semantic"].astype(np.uint8)).resize((120, 90), Image.NEAREST))
    assert (sem[:90] == small[:, ::-1]).mean() > 0.93  # flipped with the image (up to resampling at edges)
    assert (sem[:90] == small).mean() < 0.8


def test_transform_lists_from_config_and_their_errors():
    pipe = build_pipeline([{"name": "HorizontalFlip", "p": 1.0},
                           {"name": "OneOf", "transforms": [{"name": "Blur"}, {"name": "GaussNoise"}]},
                           {"name": "Resize", "height": 32, "width": 48}],
                          image_size=32, train=True)
    sample = {"image": np.zeros((20, 30, 3), np.uint8), "boxes": np.array([[0, 0, 10, 5]], np.float32),
              "labels": np.array([1]), "iscrowd": np.array([False]), "difficult": np.array([False])}
    out = pipe(sample)
    assert out["image"].shape == (3, 32, 48)
    np.testing.assert_allclose(out["boxes"][0].numpy(), [32, 0, 48, 8], atol=1e-4)  # flipped, then resized
    with pytest.raises(ConfigError, match=r"data.transforms\[0\]: unknown albumentations transform 'HorizontalFlp' "
                                          r"\(did you mean 'HorizontalFlip'\?\)"):
        build_pipeline([{"name": "HorizontalFlp"}], image_size=32, train=True)
    with pytest.raises(ConfigError, match=r"data.transforms\[0\]: bad arguments for Resize"):
        build_pipeline([{"name": "Resize", "hieght": 3}], image_size=32, train=True)
    with pytest.raises(ConfigError, match="unknown transform preset 'strong'"):
        build_pipeline("strong", image_size=32, train=True)


def test_normalisation_uses_the_backbone_mean_and_std():
    assert build_model(load_config()).mean == MEAN and build_model(load_config()).std == STD
    lite = build_model(load_config(None, ["model.backbone.name=timm:tf_efficientnet_lite0", "model.neck.name=fpn"]))
    assert lite.mean == (0.5,) * 3 and lite.std == (0.5,) * 3
    pipe = build_pipeline("none", image_size=8, train=False)
    out = pipe({"image": np.full((4, 4, 3), 255, np.uint8), "boxes": np.zeros((0, 4), np.float32),
                "labels": np.zeros(0, np.int64), "iscrowd": np.zeros(0, bool), "difficult": np.zeros(0, bool)})
    assert out["image"].dtype == torch.uint8
    assert torch.allclose(lite.normalize(out["image"][None]), torch.ones(1, 3, 4, 4))


def test_collate_pads_and_keeps_targets(shapes_dir):
    ds = build_dataset(shapes_cfg(shapes_dir))
    ds.transform = build_pipeline("val", image_size=70, train=False)
    batch = Collate(32)([ds[0], ds[1], {"skipped": "x.jpg: cannot decode image"}])
    assert batch["images"].shape == (2, 3, 96, 96)  # 70 rounded up to a multiple of 32
    assert batch["image_sizes"] == [(70, 70), (70, 70)] and batch["skipped"] == ["x.jpg: cannot decode image"]
    assert torch.equal(batch["images"][0, :, :70, :70], ds[0]["image"])
    assert (batch["images"][:, :, 70:, :] == 0).all()
    assert set(batch["targets"][0]) >= {"boxes", "labels", "masks", "image_id", "orig_size", "scale"}


def test_datamodule_from_config(shapes_dir, tmp_path):
    cfg = load_config(None, [
        "data.train.format=coco", f"data.train.images={shapes_dir}/images/train",
        f"data.train.annotations={shapes_dir}/annotations/instances_train.json",
        "data.val.format=masks", f"data.val.images={shapes_dir}/images/val",
        f"data.val.annotations={shapes_dir}/semantic/val", "data.val.classes=[bg,circle,square,triangle,star]",
        "data.image_size=64", "data.batch_size=4", "data.num_workers=0", "data.aspect_ratio_grouping=true",
        "model.head.name=mask_rcnn",
    ])
    dm = build_datamodule(cfg)  # instance masks decoded: the head's traits ask for them
    dm.setup("fit")
    assert dm.classes == ["circle", "square", "triangle", "star"] and dm.with_masks
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (4, 3, 64, 64) and "masks" in batch["targets"][0]
    assert batch["images"].dtype == torch.uint8  # normalised on the device by the model
    x = build_model(cfg).normalize(batch["images"])
    expected = (batch["images"].float() / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    torch.testing.assert_close(x, expected)
    val = next(iter(dm.val_dataloader()))
    assert val["semantic"].shape == (4, 64, 64) and val["semantic"].dtype == torch.int64


def test_grouped_sampler_is_ddp_safe():
    groups = np.array([0, 1] * 10 + [0] * 5)
    batch, world = 2, 2
    sampler = GroupedSampler(groups, chunk=batch * world, seed=1)
    order = list(sampler)
    assert set(order) == set(range(len(groups))) and len(order) == len(sampler) == 28  # 15 -> 16, 10 -> 12
    for rank in range(world):  # what Lightning's distributed wrapper hands each rank
        mine = order[rank::world]
        for i in range(0, len(mine) - batch + 1, batch):
            assert len(set(groups[mine[i:i + batch]])) == 1
    assert list(sampler) == order  # a function of (seed, epoch): a resumed run sees the same order
    sampler.set_epoch(1)
    assert list(sampler) != order  # reshuffled each epoch (the engine calls set_epoch)


def test_convert_voc_and_instance_masks_round_trip(tmp_path, shapes_dir):
    voc = build_dataset({"format": "voc", "images": str(FIXTURES / "raccoon_mini/images"),
                         "annotations": str(FIXTURES / "raccoon_mini/annotations")})
    out = tmp_path / "voc.json"
    assert to_coco(voc, out, FIXTURES / "raccoon_mini/images")["annotations"] == 4
    COCO(str(out))  # pycocotools loads it
    back = build_dataset({"format": "coco", "images": str(FIXTURES / "raccoon_mini/images"),
                          "annotations": str(out)})
    assert back.classes == voc.classes
    for a, b in zip(voc.records, back.records):
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-4)
        assert list(a.labels) == list(b.labels)
    # instance-id PNGs -> RLE -> the same masks
    ids_dir = tmp_path / "ids"
    ids_dir.mkdir()
    ds = build_dataset(shapes_cfg(shapes_dir))
    from PIL import Image

    for i in range(3):
        s = ds.load(i)
        ids = np.zeros(s["orig_size"], np.uint8)
        for k, m in enumerate(s["masks"]):
            ids[m > 0] = k + 1
        Image.fromarray(ids).save(ids_dir / (ds.records[i].file.stem + ".png"))
    images = tmp_path / "im"
    images.mkdir()
    for i in range(3):
        (images / ds.records[i].file.name).write_bytes(ds.records[i].file.read_bytes())
    inst = build_dataset({"format": "instance_masks", "images": str(images), "annotations": str(ids_dir)})
    assert main(["data", "convert", "--format", "instance_masks", "--images", str(images), "--annotations",
                 str(ids_dir), "--to", "coco", str(tmp_path / "inst.json")]) == 0
    back = build_dataset({"format": "coco", "images": str(images), "annotations": str(tmp_path / "inst.json")})
    for i in range(3):
        a, b = inst.load(i), back.load(i)
        assert np.array_equal(a["masks"], b["masks"])
        np.testing.assert_allclose(a["boxes"], b["boxes"])


def test_convert_yolo_segments_round_trip(tmp_path):
    root = shared_path("datasets", "coco128")
    cfg = {"format": "yolo", "images": str(root / "images/train2017"),
           "annotations": str(root / "instance_segmentation/labels/train2017"),
           "classes": str(root / "instance_segmentation/config.yaml"), "split": None}
    ds = build_dataset(cfg)
    to_coco(ds, tmp_path / "seg.json", root / "images/train2017")
    back = build_dataset({"format": "coco", "images": str(root / "images/train2017"),
                          "annotations": str(tmp_path / "seg.json")})
    assert back.classes == ds.classes and len(back) == len(ds)
    a, b = ds.load(0), back.load(0)
    np.testing.assert_allclose(a["boxes"], b["boxes"], atol=1e-3)
    assert np.array_equal(a["masks"], b["masks"])


def test_cli_stats_json_and_show(shapes_dir, tmp_path, capsys):
    args = ["--format", "coco", "--images", f"{shapes_dir}/images/val", "--annotations",
            f"{shapes_dir}/annotations/instances_val.json"]
    assert main(["data", "stats", *args, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert {"images", "instances", "per_class", "problems", "box_sizes", "images_without_objects"} <= set(stats)
    assert stats["images"] == 6 and stats["instances"] == sum(stats["per_class"].values())
    assert sum(stats["box_sizes"].values()) == stats["instances"] and stats["problems"] == {}
    assert main(["data", "stats", *args]) == 0
    assert "instances per class" in capsys.readouterr().out
    assert main(["data", "show", *args, "--out", str(tmp_path / "show"), "-n", "3", "--image-size", "64"]) == 0
    pngs = sorted((tmp_path / "show").glob("*.png"))
    assert len(pngs) == 3
    from PIL import Image

    assert Image.open(pngs[0]).size == (64, 64)
    assert main(["data", "make-shapes", str(tmp_path / "s"), "--num-images", "6", "--image-size", "48"]) == 0
    assert (tmp_path / "s/annotations/instances_train.json").is_file()


def test_convert_coco_with_rle_to_coco(tmp_path):
    root = shared_path("datasets", "coco128")
    assert main(["data", "convert", "--format", "coco", "--images", str(root / "images/val2017"), "--annotations",
                 str(root / "annotations/instances_val2017.json"), "--to", "coco", str(tmp_path / "c.json")]) == 0
    a = build_dataset({"format": "coco", "images": str(root / "images/val2017"),
                       "annotations": str(root / "annotations/instances_val2017.json")})
    b = build_dataset({"format": "coco", "images": str(root / "images/val2017"),
                       "annotations": str(tmp_path / "c.json")})
    assert np.array_equal(a.load(0)["masks"], b.load(0)["masks"])
