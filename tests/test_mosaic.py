"""Mosaic augmentation (albumentations' A.Mosaic as a step of the pipeline): boxes, labels, instance masks and
semantic maps stay consistent through it, the extra samples are drawn reproducibly, and configs build it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import shapes_cfg
from detkit.config import load_config
from detkit.data.build import build_dataset
from detkit.data.dataset import DetectionDataset, Record
from detkit.data.transforms import PAD_VALUE, build_pipeline
from detkit.engine.run import build_datamodule
from detkit.errors import ConfigError, DataError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BACKGROUND = (40, 40, 40)
NEAREST = 0  # cv2.INTER_NEAREST: pixels keep their exact colours (the colour checks are then exact)


def colour(label: int) -> np.ndarray:
    """A distinct, saturated colour per label (never grey, so never the padding colour)."""
    rng = np.random.default_rng(label)
    c = rng.integers(0, 256, 3)
    c[label % 3] = 255
    c[(label + 1) % 3] = rng.integers(0, 90)
    return c.astype(np.uint8)


class Rectangles(DetectionDataset):
    """Images of solid rectangles, each object of its own label and colour (label k <-> colour(k)).

    ``overlap``: rectangles may overlap (their instance masks then overlap: each mask is its full rectangle).
    ``bad``: indices whose image "cannot be read". ``semantic``: add a class map (0 background, label k -> k).
    """

    def __init__(self, n=8, per_image=(0, 4), overlap=False, bad=(), semantic=False, masks=True, seed=0):
        super().__init__("rectangles")
        rng = np.random.default_rng(seed)
        self.samples, self.bad, label = [], set(bad), 1
        for i in range(n):
            h, w = int(rng.integers(50, 110)), int(rng.integers(50, 110))
            image = np.empty((h, w, 3), np.uint8)
            image[:] = BACKGROUND
            boxes, labels = [], []
            taken = np.zeros((h, w), bool)
            for _ in range(int(rng.integers(per_image[0], per_image[1] + 1))):
                for _try in range(50):
                    bw, bh = int(rng.integers(12, w // 2)), int(rng.integers(12, h // 2))
                    x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
                    if overlap or not taken[max(y - 2, 0):y + bh + 2, max(x - 2, 0):x + bw + 2].any():
                        break
                else:
                    continue
                taken[y:y + bh, x:x + bw] = True
                image[y:y + bh, x:x + bw] = colour(label)
                boxes.append([x, y, x + bw, y + bh])
                labels.append(label)
                label += 1
            boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
            sample = {"image": image, "boxes": boxes, "labels": np.asarray(labels, np.int64),
                      "iscrowd": np.asarray([k % 5 == 0 for k in labels], bool),
                      "difficult": np.asarray([k % 2 == 0 for k in labels], bool),
                      "image_id": i, "orig_size": (h, w), "file": f"r{i}.png"}
            if masks:
                m = np.zeros((len(boxes), h, w), np.uint8)
                for k, (x1, y1, x2, y2) in enumerate(boxes.astype(int)):
                    m[k, y1:y2, x1:x2] = 1
                sample["masks"] = m
            if semantic:
                sem = np.zeros((h, w), np.int64)  # class 0: background
                for (x1, y1, x2, y2), k in zip(boxes.astype(int), labels):
                    sem[y1:y2, x1:x2] = k
                sample["semantic"] = sem
            self.samples.append(sample)
            self.records.append(Record(image_id=i, file=f"r{i}.png"))
        self.classes = [f"c{k}" for k in range(1, label)]
        self.cat_ids = list(range(1, label))
        self.loaded: list[int] = []

    def load(self, index):
        self.loaded.append(index)
        if index in self.bad:
            raise DataError(f"r{index}.png: cannot decode image")
        return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in self.samples[index].items()}


def mosaic(size=96, *more, **args):
    spec = [{"name": "Mosaic", "p": 1.0, **args}, *more]
    return build_pipeline(spec, image_size=size, train=True, min_visibility=0.0)


def inner(box):
    """The pixels well inside a box (1 px in from each side: resampling may move edges by a pixel)."""
    x1, y1, x2, y2 = box
    return slice(int(np.ceil(y1)) + 1, max(int(np.floor(y2)) - 1, int(np.ceil(y1)) + 2)), \
        slice(int(np.ceil(x1)) + 1, max(int(np.floor(x2)) - 1, int(np.ceil(x1)) + 2))


def bbox_of(mask):
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32) if len(xs) else None


def test_config_defaults_and_extra_samples():
    pipe = mosaic(80)
    m = pipe.mosaics[0]
    assert pipe.extra_samples == 3 and m.target_size == (80, 80) and m.cell_shape == (80, 80) and m.fill == PAD_VALUE
    pipe = mosaic(80, grid_yx=[1, 3], target_size=[60, 90], fill=0)  # what the user gives wins
    assert pipe.extra_samples == 2 and pipe.mosaics[0].target_size == (60, 90) and pipe.mosaics[0].fill == 0
    assert pipe.mosaics[0].cell_shape == (60, 90)  # cells follow a given target size
    nested = build_pipeline([{"name": "OneOf", "transforms": [{"name": "Mosaic"}, {"name": "Blur"}]}],
                            image_size=64, train=True)
    assert nested.extra_samples == 3 and nested.mosaics[0].target_size == (64, 64)
    assert build_pipeline("train", image_size=64, train=True).extra_samples == 0


def test_bad_mosaic_arguments_are_one_line_config_errors():
    for bad, what in [({"target_size": [500, 500], "cell_shape": [100, 100]}, "Target size should be smaller"),
                      ({"grid_yx": 2}, "grid_yx"), ({"fit_mode": "stretch"}, "fit_mode"),
                      ({"fill_mask": 3}, "fill_mask must be 0")]:
        with pytest.raises(ConfigError, match=r"data.transforms\[0\]: bad arguments for Mosaic") as e:
            build_pipeline([{"name": "Mosaic", **bad}], image_size=64, train=True)
        assert what in str(e.value) and "\n" not in str(e.value)


def test_boxes_stay_on_their_objects_and_labels_follow_them():
    ds = Rectangles(n=10, per_image=(1, 4), semantic=False)
    ds.transform = mosaic(96, interpolation=NEAREST)
    ds.transform.reseed(0)
    seen = set()
    for i in range(len(ds)):
        s = ds[i]
        assert s["mosaic"] and s["image"].shape == (3, 96, 96) and s["image"].dtype == torch.uint8
        img = s["image"].permute(1, 2, 0).numpy()
        b = s["boxes"].numpy()
        n = len(b)
        assert len(s["labels"]) == len(s["iscrowd"]) == len(s["difficult"]) == len(s["masks"]) == n
        assert (b >= 0).all() and (b[:, [0, 2]] <= 96).all() and (b[:, [1, 3]] <= 96).all()
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        for box, label, crowd, difficult in zip(b, s["labels"].tolist(), s["iscrowd"].tolist(),
                                                s["difficult"].tolist()):
            inside = img[inner(box)].reshape(-1, 3)
            assert (inside == colour(label)).all(axis=1).mean() > 0.9, (i, box, label)
            assert crowd == (label % 5 == 0) and difficult == (label % 2 == 0)  # other fields follow too
            seen.add(label)
        assert s["image_id"] == i and s["orig_size"] == ds.samples[i]["orig_size"] and s["file"] == f"r{i}.png"
        assert s["boxes_dropped"] >= 0
    primary = {int(k) for i in range(len(ds)) for k in ds.samples[i]["labels"]}
    assert len(seen) > 0.5 * len(primary)  # objects of many images show up


def test_instance_masks_match_their_boxes_even_when_they_overlap():
    ds = Rectangles(n=10, per_image=(2, 6), overlap=True, seed=1)
    ds.transform = mosaic(96, {"name": "HorizontalFlip", "p": 0.5})
    ds.transform.reseed(1)
    checked = 0
    for i in range(len(ds)):
        s = ds[i]
        b, m = s["boxes"].numpy(), s["masks"].numpy()
        assert m.dtype == np.uint8 and m.shape == (len(b), *s["image"].shape[-2:]) and set(np.unique(m)) <= {0, 1}
        for box, mask in zip(b, m):
            assert bbox_of(mask) is not None
            np.testing.assert_allclose(bbox_of(mask), box, atol=1.0)
            checked += 1
    assert checked > 20


def test_many_instances_fit_through_the_mosaic():
    """More instances than OpenCV's 128 channels: masks travel as id-map layers, not one channel each."""
    ds = Rectangles(n=4, per_image=(0, 0))
    rng = np.random.default_rng(0)
    for s in ds.samples:  # 120 small overlapping rectangles per image: 480 instances in all
        h, w = s["orig_size"]
        x = rng.integers(0, w - 10, 120)
        y = rng.integers(0, h - 10, 120)
        s["boxes"] = np.stack([x, y, x + 10, y + 10], 1).astype(np.float32)
        s["labels"] = np.arange(1, 121)
        s["iscrowd"] = s["difficult"] = np.zeros(120, bool)
        s["masks"] = np.zeros((120, h, w), np.uint8)
        for k in range(120):
            s["masks"][k, y[k]:y[k] + 10, x[k]:x[k] + 10] = 1
    ds.transform = mosaic(128)
    ds.transform.reseed(0)
    s = ds[0]
    assert len(s["boxes"]) > 100
    for box, mask in zip(s["boxes"].numpy(), s["masks"].numpy()):
        np.testing.assert_allclose(bbox_of(mask), box, atol=1.0)


def test_semantic_maps_follow_and_padding_is_unlabeled():
    ds = Rectangles(n=8, per_image=(1, 3), semantic=True, masks=False)
    ds.transform = mosaic(96, interpolation=NEAREST, fit_mode="contain")  # "contain" pads every cell
    ds.transform.reseed(2)
    padded = 0
    for i in range(len(ds)):
        s = ds[i]
        sem, img = s["semantic"].numpy(), s["image"].permute(1, 2, 0).numpy()
        assert sem.shape == img.shape[:2] and sem.dtype == np.int64 and "masks" not in s
        pad = (img == PAD_VALUE).all(-1)
        assert (sem[pad] == 255).all() and (sem[~pad] != 255).all()
        padded += pad.sum()
        for box, label in zip(s["boxes"].numpy(), s["labels"].tolist()):
            assert (sem[inner(box)] == label).mean() > 0.9
        assert ((sem == 0) == (img == BACKGROUND).all(-1)).mean() > 0.99
    assert padded > 0


def test_samples_without_boxes_and_a_one_image_dataset():
    empty = Rectangles(n=4, per_image=(0, 0), semantic=True)
    empty.transform = mosaic(64)
    s = empty[0]
    assert s["boxes"].shape == (0, 4) and s["masks"].shape == (0, 64, 64) and s["labels"].shape == (0,)
    assert s["semantic"].shape == (64, 64) and s["boxes_dropped"] == 0

    one = Rectangles(n=1, per_image=(3, 3), semantic=True, seed=4)
    one.transform = mosaic(96, interpolation=NEAREST)
    one.transform.reseed(0)
    s = one[0]
    assert one.loaded == [0]  # no other image to draw: the mosaic is made of copies of this one
    b, m = s["boxes"].numpy(), s["masks"].numpy()
    assert len(b) > 3 and len(m) == len(b) == len(s["labels"])  # several copies of its objects
    for box, mask in zip(b, m):  # each copy's mask is its own, not the union of the copies
        np.testing.assert_allclose(bbox_of(mask), box, atol=1.0)


def test_extras_are_other_readable_images_and_reproducible():
    ds = Rectangles(n=6, per_image=(1, 3), bad=(2,))
    ds.transform = mosaic(64)
    ds.transform.reseed(5)
    for _ in range(3):
        for i in (0, 1, 3):
            ds.loaded.clear()
            s = ds[i]
            assert ds.loaded[0] == i and i not in ds.loaded[1:]
            assert len([j for j in ds.loaded[1:] if j != 2]) == 3  # three readable others, the bad one skipped
            assert s["mosaic"]
    assert ds.extras_skipped > 0

    def run(seed, indices=(0, 3, 4, 1, 0)):
        d = Rectangles(n=6, per_image=(1, 3), semantic=True)
        d.transform = mosaic(64, {"name": "HorizontalFlip", "p": 0.5})
        d.transform.reseed(seed)
        return [d[i] for i in indices], d.loaded

    (a, loaded_a), (b, loaded_b), (c, _) = run(11), run(11), run(12)
    assert loaded_a == loaded_b
    for x, y in zip(a, b):
        for key in ("image", "boxes", "labels", "masks", "semantic"):
            assert torch.equal(x[key], y[key]), key
    assert any(not torch.equal(x["image"], z["image"]) for x, z in zip(a, c))


def test_mosaic_with_p_below_one_keeps_the_plain_sample_consistent():
    ds = Rectangles(n=6, per_image=(1, 3))
    ds.transform = build_pipeline([{"name": "Mosaic", "p": 0.5}], image_size=64, train=True)
    ds.transform.reseed(3)
    flags = []
    for i in list(range(len(ds))) * 2:
        s = ds[i]
        flags.append(s["mosaic"])
        if not s["mosaic"]:  # not applied: the sample as it was, with its own objects only
            torch.testing.assert_close(s["boxes"], torch.as_tensor(ds.samples[i]["boxes"]))
            assert torch.equal(s["labels"], torch.as_tensor(ds.samples[i]["labels"]))
            assert torch.equal(s["masks"], torch.as_tensor(ds.samples[i]["masks"]))
            assert s["boxes_dropped"] == 0
    assert any(flags) and not all(flags)


def test_pipelines_without_mosaic_ignore_extras():
    ds = Rectangles(n=3, per_image=(1, 2))
    ds.transform = build_pipeline("val", image_size=64, train=False)
    ds[0]
    assert ds.loaded == [0] and "mosaic" not in ds[1]


def test_datamodule_builds_a_mosaic_config(shapes_dir):
    cfg = load_config(None, [
        "data.train.format=coco", f"data.train.images={shapes_dir}/images/train",
        f"data.train.annotations={shapes_dir}/annotations/instances_train.json",
        "data.image_size=64", "data.batch_size=4", "data.num_workers=0", "model.head.name=mask_rcnn",
        "data.transforms.train=[{name: Mosaic, p: 1.0}, {name: HorizontalFlip, p: 0.5}]",
    ])
    dm = build_datamodule(cfg)
    dm.setup("fit")
    assert dm.datasets["train"].transform.extra_samples == 3

    def batch():
        dm.set_epoch(0)  # what the engine does at each epoch start
        return next(iter(dm.train_dataloader()))

    first = batch()
    assert first["images"].shape == (4, 3, 64, 64) and first["images"].dtype == torch.uint8
    for t in first["targets"]:
        assert len(t["boxes"]) == len(t["labels"]) == len(t["masks"]) and t["masks"].shape[-2:] == (64, 64)
    again = batch()  # same (seed, epoch): the same mosaics
    assert torch.equal(first["images"], again["images"])
    assert all(torch.equal(x["boxes"], y["boxes"]) for x, y in zip(first["targets"], again["targets"]))


def test_shapes_dataset_through_mosaic(shapes_dir):
    ds = build_dataset(shapes_cfg(shapes_dir))
    ds.transform = mosaic(80)
    ds.transform.reseed(0)
    for i in range(4):
        s = ds[i]
        b = s["boxes"]
        assert s["image"].shape == (3, 80, 80) and len(b) == len(s["labels"]) == len(s["masks"])
        assert (b >= 0).all() and (b <= 80).all()
