"""Inference beyond single images: test-time augmentation, tiled inference of large images, video files and
streams -- each against an independent path (the plain Predictor on transformed inputs), on generated data."""

from __future__ import annotations

import json
import shutil
import threading
import time

import cv2
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import FIXTURES
from detkit import load_model
from detkit.cli import main
from detkit.config import load_config
from detkit.errors import ConfigError, DataError
from detkit.heads.registry import HeadTraits
from detkit.inference import Predictor
from detkit.inference.export import onnx_tile_runner
from detkit.inference.merge import merge_detections, suppress
from detkit.inference.run import predict_video
from detkit.inference.tiling import Tiling, predict_tiled, tile_windows
from detkit.inference.tta import TTA, tta_predict
from detkit.inference.video import StreamStalled, read_frames
from detkit.models import Detector

CKPTS = FIXTURES / "checkpoints"
SHAPE_IMAGES = sorted((CKPTS / "images").glob("*.jpg"))


@pytest.fixture(scope="module")
def yolo():
    return load_model(CKPTS / "yolo_anynet.ckpt")


@pytest.fixture(scope="module")
def spread(tmp_path_factory):
    """The fixture detector (trained 6 steps: its scores are all about 1e-4) with seeded random prediction layers:
    distinct scores, so orders and top-k sets are well defined for parity checks. A checkpoint file."""
    ckpt = torch.load(CKPTS / "yolo_anynet.ckpt", weights_only=True)
    g = torch.Generator().manual_seed(0)
    for key, value in ckpt["state_dict"].items():
        if ".preds." in key:
            ckpt["state_dict"][key] = torch.randn(value.shape, generator=g) * (0.3 if key.endswith("weight") else 1.5)
    path = tmp_path_factory.mktemp("spread") / "spread.ckpt"
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def unet():
    return load_model(CKPTS / "unet_anynet.ckpt")


def rgb(path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def sorted_dets(d):
    order = torch.argsort(d["scores"], descending=True, stable=True)
    return {k: d[k][order] for k in ("boxes", "scores", "labels")}


# ------------------------------------------------------------------------------------------------ merging
def test_nms_by_intersection_over_the_smaller_box_removes_boxes_cut_at_a_tile_edge():
    whole = torch.tensor([[10.0, 10.0, 50.0, 50.0]])
    cut = torch.tensor([[10.0, 10.0, 25.0, 50.0]])  # the left part of the same object, seen by another tile
    other = torch.tensor([[60.0, 60.0, 70.0, 70.0]])
    boxes = torch.cat([whole, cut, other])
    scores, labels = torch.tensor([0.9, 0.8, 0.7]), torch.tensor([1, 1, 1])
    assert suppress(boxes, scores, labels, 0.5, "iou").tolist() == [0, 1, 2]  # IoU 0.375: both kept
    assert suppress(boxes, scores, labels, 0.5, "ios").tolist() == [0, 2]  # inside the whole box: removed
    assert suppress(boxes, scores, torch.tensor([1, 2, 1]), 0.5, "ios").tolist() == [0, 1, 2]  # other class: kept


def test_weighted_box_fusion_averages_passes_and_discounts_boxes_few_passes_found():
    a = {"boxes": torch.tensor([[10.0, 10.0, 50.0, 50.0], [80.0, 80.0, 90.0, 90.0]]),
         "scores": torch.tensor([0.8, 0.6]), "labels": torch.tensor([1, 2])}
    b = {"boxes": torch.tensor([[12.0, 10.0, 52.0, 50.0]]), "scores": torch.tensor([0.4]), "labels": torch.tensor([1])}
    out = merge_detections([a, b], (100, 100), "wbf", 0.55)
    assert out["labels"].tolist() == [1, 2]
    # the score-weighted mean box, the mean score; a box found by one pass of two: half its score
    torch.testing.assert_close(out["boxes"][0], torch.tensor([(10 * .8 + 12 * .4) / 1.2, 10.0,
                                                              (50 * .8 + 52 * .4) / 1.2, 50.0]), atol=1e-3, rtol=0)
    torch.testing.assert_close(out["scores"], torch.tensor([0.6, 0.3]), atol=1e-5, rtol=0)


def test_masks_cannot_be_fused_and_bad_settings_are_one_line(yolo):
    from detkit.inference.merge import check_merge

    with pytest.raises(ConfigError, match="wbf fuses boxes only"):
        check_merge("wbf", masks=True)
    with pytest.raises(ConfigError, match="eval.tta.scales"):
        TTA(scales=[0.0])
    with pytest.raises(ConfigError, match="unknown key 'flip'"):
        TTA.of({"flip": True})
    with pytest.raises(ConfigError, match="tile overlap = 1"):
        Tiling(size=64, overlap=1.0)
    with pytest.raises(ConfigError, match="tile merge = 'mean'"):
        Predictor(yolo, tiles={"size": 64, "merge": "mean"})
    # auto: fusion for boxes, NMS for instance masks; an explicit fusion of masks is refused with the config
    from detkit.engine.run import check_config

    assert TTA().method(masks=False) == "wbf" and TTA().method(masks=True) == "nms"
    mask_rcnn = FIXTURES.parent.parent / "configs" / "mask_rcnn" / "shapes.yaml"
    check_config(load_config(mask_rcnn, ["eval.tta={scales: [1.0, 1.2]}"]))
    with pytest.raises(ConfigError, match="wbf fuses boxes only"):
        check_config(load_config(mask_rcnn, ["eval.tta={merge: wbf}"]))


# ------------------------------------------------------------------------------------- test-time augmentation
def test_one_plain_pass_is_the_plain_prediction(yolo, unet):
    for model in (yolo, unet):
        plain = Predictor(model, fast=False)(list(map(str, SHAPE_IMAGES)))
        tta = Predictor(model, fast=False, tta={"scales": [1.0], "hflip": False, "merge": "nms", "iou": 1.0})
        for p, t in zip(plain, tta(list(map(str, SHAPE_IMAGES)))):
            if "semantic" in p:
                assert torch.equal(p["semantic"], t["semantic"])
                torch.testing.assert_close(p["scores"], t["scores"])
            else:
                p, t = sorted_dets(p), sorted_dets(t)
                torch.testing.assert_close(p["boxes"], t["boxes"])
                assert torch.equal(p["labels"], t["labels"])


def test_the_flipped_pass_equals_predicting_the_mirrored_image_mirrored_back(yolo, unet):
    image = rgb(SHAPE_IMAGES[0])
    w = image.shape[1]
    mirrored = np.ascontiguousarray(image[:, ::-1])
    # detector: the flipped pass alone (scale 1, flip) merged with the plain pass by NMS, against the plain
    # predictor's detections of the image and of its mirror image mirrored back, merged the same way
    plain = Predictor(yolo, fast=False)
    direct, flipped = plain.run([image])[0], plain.run([mirrored])[0]
    b = flipped["boxes"]
    back = dict(flipped, boxes=torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1))
    expected = merge_detections([direct, back], image.shape[:2], "nms", 0.6, max_detections=300)
    batch = plain.collate([plain.sample(image, 0)])
    got = tta_predict(yolo, batch, TTA(scales=[1.0], hflip=True, merge="nms", iou=0.6))[0]
    e, g = sorted_dets(expected), sorted_dets(got)
    assert len(e["scores"]) == len(g["scores"]) > 0
    torch.testing.assert_close(g["boxes"], e["boxes"], atol=0.05, rtol=0)
    torch.testing.assert_close(g["scores"], e["scores"], atol=1e-3, rtol=0)
    # segmenter: the mean of the plain logits and of the mirror image's logits mirrored back
    seg = Predictor(unet, fast=False)
    la, lb = seg.run([image])[0]["logits"], seg.run([mirrored])[0]["logits"].flip(-1)
    got = tta_predict(unet, seg.collate([seg.sample(image, 0)]), TTA(scales=[1.0], hflip=True))[0]["logits"]
    torch.testing.assert_close(got, (la + lb) / 2, atol=1e-3, rtol=0)


def test_every_scaled_and_mirrored_pass_lands_on_the_objects_in_original_pixels():
    """With a detector whose output is known exactly (bright squares), each single pass -- scaled down, scaled up,
    mirrored -- must find every square where it is in the original image."""
    model = blob_model(128)
    rng = np.random.default_rng(1)
    image = np.zeros((200, 256, 3), np.uint8)  # letterboxed to 128: the pipeline's own scale 0.5 comes first
    truth = []
    for x, y in [(20, 30), (120, 40), (200, 130), (60, 140)]:
        s = int(rng.integers(24, 32))
        image[y:y + s, x:x + s] = 255
        truth.append([x, y, x + s, y + s])
    truth = torch.tensor(truth, dtype=torch.float32)
    pred = Predictor(model, fast=False)
    batch = pred.collate([pred.sample(image, 0)])
    for scale, flip in [(1.0, False), (1.0, True), (0.75, False), (1.5, True), (0.6, True)]:
        got = tta_predict(model, batch, TTA(scales=[scale], hflip=flip, merge="nms", iou=0.5))[0]
        order = torch.argsort(got["boxes"][:, 0] * 1000 + got["boxes"][:, 1])
        expected = truth[torch.argsort(truth[:, 0] * 1000 + truth[:, 1])]
        assert len(got["boxes"]) == len(truth), (scale, flip)
        torch.testing.assert_close(got["boxes"][order], expected, atol=4.0, rtol=0, msg=f"scale {scale} flip {flip}")


def test_eval_tta_is_scored_by_the_same_evaluator_beside_the_plain_metrics(tmp_path, shapes_dir, spread, capsys):
    ckpt = torch.load(spread, weights_only=True)
    cfg = ckpt["hyper_parameters"]["config"]
    for split in ("train", "val"):
        cfg["data"][split].update(images=str(shapes_dir / "images" / split),
                                  annotations=str(shapes_dir / "annotations" / f"instances_{split}.json"))
    cfg["trainer"].update(enable_progress_bar=False, enable_model_summary=False)
    cfg["eval"]["tta"] = {"scales": [1.0, 1.25], "hflip": True}
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(spread, run / "checkpoints" / "best.ckpt")
    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    assert main(["eval", str(run), "eval.analysis=false"]) == 0
    plain = json.loads((run / "metrics.json").read_text())
    assert main(["eval", str(run), "--tta", "eval.analysis=false"]) == 0
    tta = json.loads((run / "metrics_tta.json").read_text())
    assert json.loads((run / "metrics.json").read_text()) == plain  # the plain evaluation's file is kept
    assert (run / "predictions_tta.json").is_file()
    assert set(tta) == set(plain) and tta["bbox_AP50"] != plain["bbox_AP50"]
    assert main(["eval", str(run), "--tta", "eval.tta.merge=mean"]) == 2
    assert "eval.tta.merge = 'mean'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ tiling
def test_tile_windows_cover_the_image_at_full_size_with_the_overlap_asked():
    for h, w, size, overlap in [(300, 1000, 128, 0.2), (128, 128, 128, 0.5), (90, 500, 128, 0.0), (513, 257, 64, .3)]:
        windows = tile_windows(h, w, size, overlap)
        covered = np.zeros((h, w), bool)
        for x0, y0, x1, y1 in windows:
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            assert x1 - x0 == min(size, w) and y1 - y0 == min(size, h)
            covered[y0:y1, x0:x1] = True
        assert covered.all()
        xs = sorted({x0 for x0, *_ in windows})
        assert all(b - a <= round(size * (1 - overlap)) for a, b in zip(xs, xs[1:]))


def quadrants(images: list[np.ndarray], size: int) -> np.ndarray:
    canvas = np.zeros((2 * size, 2 * size, 3), np.uint8)
    for k, im in enumerate(images):
        y, x = divmod(k, 2)
        canvas[y * size:(y + 1) * size, x * size:(x + 1) * size] = cv2.resize(im, (size, size))
    return canvas


def test_tiles_without_overlap_equal_the_plain_predictions_of_each_tile_moved_into_place(yolo, unet):
    size = int(yolo.config.data.image_size)
    parts = [rgb(SHAPE_IMAGES[k % 2])[:, ::-1 if k > 1 else 1] for k in range(4)]
    canvas = quadrants(parts, size)
    tiles = {"size": size, "overlap": 0.0, "full_image": False, "merge": "nms", "match": "iou", "iou": 1.0}
    for model in (yolo, unet):
        plain = Predictor(model, fast=False, batch_size=3)
        got = Predictor(model, fast=False, batch_size=3, tiles=tiles)(canvas)
        each = plain([np.ascontiguousarray(canvas[y:y + size, x:x + size]) for y in (0, size) for x in (0, size)])
        if model is unet:
            expected = torch.cat([torch.cat([each[0]["semantic"], each[1]["semantic"]], 1),
                                  torch.cat([each[2]["semantic"], each[3]["semantic"]], 1)], 0)
            assert torch.equal(got["semantic"], expected)
            continue
        moved = [dict(e, boxes=e["boxes"] + torch.tensor([x, y, x, y], dtype=torch.float32))
                 for e, (y, x) in zip(each, [(0, 0), (0, size), (size, 0), (size, size)])]
        expected = sorted_dets({k: torch.cat([m[k] for m in moved]) for k in ("boxes", "scores", "labels")})
        got = sorted_dets(got)
        assert len(got["boxes"]) == len(expected["boxes"]) > 4
        torch.testing.assert_close(got["boxes"], expected["boxes"], atol=1e-3, rtol=0)
        torch.testing.assert_close(got["scores"], expected["scores"])


class BlobHead(nn.Module):
    """A detector that sees bright blobs of at least ``min_side`` input pixels a side (a stand-in for a network's
    smallest detectable object): what shrinking a large image loses and tiling recovers."""

    def __init__(self, min_side: int = 4) -> None:
        super().__init__()
        self.min_side = min_side

    def forward(self, features, images, image_sizes, targets):
        out = []
        for i, (h, w) in enumerate(image_sizes):
            bright = (images[i, :, :h, :w].mean(0) > 1.0).cpu().numpy().astype(np.uint8)
            n, _, stats, _ = cv2.connectedComponentsWithStats(bright)
            keep = [s for s in stats[1:] if min(s[2], s[3]) >= self.min_side]
            boxes = torch.tensor([[x, y, x + bw, y + bh] for x, y, bw, bh, _ in keep], dtype=torch.float32)
            out.append({"boxes": boxes.reshape(-1, 4), "scores": torch.ones(len(keep)),
                        "labels": torch.ones(len(keep), dtype=torch.long)})
        return out, {}


class Identity(nn.Module):
    def forward(self, x):
        return {"c1": x}


def blob_model(image_size: int) -> Detector:
    model = Detector(Identity(), None, BlobHead(), traits=HeadTraits("detection", "per_image")).eval()
    model.config = load_config(FIXTURES.parent.parent / "configs" / "yolo" / "shapes.yaml",
                               [f"data.image_size={image_size}"])
    model.classes = ["blob"]
    return model


def test_tiling_recovers_small_objects_that_shrinking_the_whole_image_loses():
    from torchvision.ops import box_iou

    model = blob_model(128)
    rng = np.random.default_rng(0)
    canvas = np.zeros((1024, 1536, 3), np.uint8)
    truth = []
    for y in range(40, 1000, 96):
        for x in range(40, 1500, 96):
            s = int(rng.integers(8, 14))
            canvas[y:y + s, x:x + s] = 255
            truth.append([x, y, x + s, y + s])
    truth = torch.tensor(truth, dtype=torch.float32)

    def recall(pred):
        if not len(pred["boxes"]):
            return 0.0
        return float((box_iou(truth, pred["boxes"]).max(dim=1).values >= 0.5).float().mean())

    plain = Predictor(model, fast=False)(canvas)
    tiled = Predictor(model, fast=False, tiles={"size": 128, "overlap": 0.25})(canvas)
    assert recall(plain) == 0.0  # 1536 -> 128 pixels: every object under a pixel or two
    assert recall(tiled) == 1.0
    assert len(tiled["boxes"]) == len(truth)  # objects seen by several tiles are merged, not repeated


def test_instance_masks_are_pasted_into_the_image():
    from detkit.inference.tiling import to_image

    masks = torch.zeros(1, 4, 5, dtype=torch.bool)
    masks[0, 1:3, 2:4] = True
    out = to_image({"boxes": torch.tensor([[2.0, 1.0, 4.0, 3.0]]), "scores": torch.ones(1),
                    "labels": torch.ones(1, dtype=torch.long), "masks": masks}, (10, 20, 15, 24), (30, 40))
    assert out["masks"].shape == (1, 30, 40)
    assert torch.nonzero(out["masks"][0]).min(0).values.tolist() == [21, 12]
    assert out["boxes"].tolist() == [[12.0, 21.0, 14.0, 23.0]]


def test_an_exported_onnx_model_runs_the_tiles_as_batches(spread, tmp_path):
    pytest.importorskip("onnxruntime")
    from detkit.inference.export import export_model

    yolo = load_model(spread)
    size = int(yolo.config.data.image_size)
    info = export_model(yolo, "onnx", tmp_path / "m.onnx", dynamic_batch=True, image_size=size)
    canvas = quadrants([rgb(SHAPE_IMAGES[k % 2]) for k in range(4)], size)
    tiling = Tiling(size=size, overlap=0.25, full_image=False)
    got = sorted_dets(predict_tiled(canvas, onnx_tile_runner(str(info.file), size), tiling, size, batch_size=4))
    ref = sorted_dets(predict_tiled(canvas, Predictor(yolo, fast=False).run, tiling, size, batch_size=4))
    n = min(len(got["scores"]), len(ref["scores"]), 20)
    assert n > 0
    torch.testing.assert_close(got["boxes"][:n], ref["boxes"][:n], atol=0.05, rtol=0)
    torch.testing.assert_close(got["scores"][:n], ref["scores"][:n], atol=1e-3, rtol=0)


# ------------------------------------------------------------------------------------------------- video
def make_video(path, frames: int = 10, fps: float = 5.0) -> list[np.ndarray]:
    """A small MP4 of the shapes images sliding right, one pixel shift a frame; returns the frames (RGB) as read
    back by OpenCV (what the codec kept)."""
    base = rgb(SHAPE_IMAGES[0])
    h, w = base.shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    for k in range(frames):
        writer.write(cv2.cvtColor(np.roll(base, 2 * k, axis=1), cv2.COLOR_RGB2BGR))
    writer.release()
    cap, out = cv2.VideoCapture(str(path)), []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        out.append(cv2.cvtColor(f, cv2.COLOR_BGR2RGB))
    assert len(out) == frames
    return out


def test_predict_a_video_file_through_the_cli(tmp_path, spread, capsys):
    video = tmp_path / "clip.mp4"
    frames = make_video(video, frames=10, fps=5.0)
    out = tmp_path / "out"
    assert main(["predict", str(spread), str(video), "--out", str(out), "--vid-stride", "2",
                 "--max-frames", "4", "--score-threshold", "0.05", "--no-fast"]) == 0
    printed = capsys.readouterr().out
    assert "4 frames" in printed and "frames/s" in printed
    lines = [json.loads(x) for x in (out / "clip.jsonl").read_text().splitlines()]
    assert [x["frame"] for x in lines] == [0, 2, 4, 6]
    assert [x["time"] for x in lines] == pytest.approx([0.0, 0.4, 0.8, 1.2], abs=1e-3)
    # the same detections as the Predictor on the decoded frames
    expected = Predictor(load_model(spread), fast=False, score_threshold=0.05)(
        [frames[i] for i in (0, 2, 4, 6)])
    for line, e in zip(lines, expected):
        assert len(line["detections"]) == len(e["scores"]) > 0
        assert {d["image_id"] for d in line["detections"]} == {line["frame"]}
        got = np.array(sorted(d["score"] for d in line["detections"]))
        np.testing.assert_allclose(got, np.sort(e["scores"].numpy()), atol=1e-4)
        assert set(line["detections"][0]) >= {"category_id", "category_name", "bbox", "score"}
    written = cv2.VideoCapture(str(out / "clip.mp4"))
    assert int(written.get(cv2.CAP_PROP_FRAME_COUNT)) == 4
    assert int(written.get(cv2.CAP_PROP_FRAME_WIDTH)) == frames[0].shape[1]
    assert (video.stat().st_size > 0) and video.read_bytes()[:4] != b""  # the input is untouched


def test_a_broken_video_is_one_line(tmp_path, capsys):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x13" * 500)
    assert main(["predict", str(CKPTS / "yolo_anynet.ckpt"), str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("detkit: error:") and "broken.mp4" in err and "\n" not in err
    assert main(["predict", str(CKPTS / "yolo_anynet.ckpt"), str(tmp_path / "missing.mp4")]) == 2
    assert "no such video file" in capsys.readouterr().err


class StallingCapture:
    """A stream that delivers ``good`` frames and then hangs (a camera unplugged, a network stall)."""

    def __init__(self, frames: list[np.ndarray], good: int) -> None:
        self.frames, self.good, self.n = frames, good, 0
        self.released = threading.Event()

    def read(self):
        if self.n >= self.good:
            self.released.wait(30)  # hangs until released (or 30 s)
            return False, None
        self.n += 1
        return True, cv2.cvtColor(self.frames[self.n - 1], cv2.COLOR_RGB2BGR)

    def get(self, prop):
        return 5.0 if prop == cv2.CAP_PROP_FPS else 0.0

    def release(self):
        self.released.set()


def test_a_stalled_stream_stops_in_one_line_and_keeps_the_results_so_far(yolo, tmp_path):
    frames = make_video(tmp_path / "src.mp4", frames=6)
    predictor = Predictor(yolo, fast=False, batch_size=2, score_threshold=0.05)
    capture = StallingCapture(frames, good=5)
    start = time.monotonic()
    summary = predict_video(predictor, capture, tmp_path / "out", stall_timeout=0.5)
    assert time.monotonic() - start < 20
    assert summary["frames"] == 5 and summary["stopped"] and "stalled" in summary["stopped"]
    assert "\n" not in summary["stopped"]
    lines = (tmp_path / "out" / f"{summary['results'].rsplit('/', 1)[-1]}").read_text().splitlines()
    assert [json.loads(x)["frame"] for x in lines] == [0, 1, 2, 3, 4]
    capture.release()
    # the iterator itself: the frames read are yielded, then StreamStalled
    capture = StallingCapture(frames, good=3)
    seen = []
    with pytest.raises(StreamStalled, match="no frame for 0.3 s after 3 frames"):
        for f in read_frames(capture, stall_timeout=0.3):
            seen.append(f.index)
    assert seen == [0, 1, 2]
    capture.release()
    with pytest.raises(DataError, match="vid_stride = 0"):
        next(read_frames(capture, vid_stride=0))


def test_video_frames_in_python(unet, tmp_path):
    video = tmp_path / "clip.mp4"
    frames = make_video(video, frames=5)
    results = list(Predictor(unet, fast=False, batch_size=2).predict_video(str(video), max_frames=3))
    assert [f.index for f, _ in results] == [0, 1, 2]
    expected = Predictor(unet, fast=False)(frames[:3])
    for (frame, got), e in zip(results, expected):
        assert np.array_equal(frame.image, frames[frame.index])
        assert torch.equal(got["semantic"], e["semantic"])
