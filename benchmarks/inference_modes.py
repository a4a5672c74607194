"""Video, tiled inference and test-time augmentation: their accuracy and their cost against the plain pass,
measured in one run on the same machine, scored by detkit's evaluator.

    # frames/s of `detkit predict VIDEO` against the Predictor over the same frames as images (320 px)
    .venv/bin/python benchmarks/inference_modes.py video RUN --size 320 --frames 60
    # small objects: the validation images (resized by SHRINK) pasted onto GRID x GRID canvases; plain pass against
    # tiles of TILE pixels (each resized to the network's input, as in training); AP, AP_small, time ratio
    .venv/bin/python benchmarks/inference_modes.py tiling RUN --grid 3 --tile 640 [--shrink 0.3]
    # test-time augmentation: `detkit eval` against `detkit eval --tta` (the run's eval.tta); AP gain, time ratio
    .venv/bin/python benchmarks/inference_modes.py tta RUN [RUN ...]

RUN is a trained run directory. Each prints one JSON line per measurement; ``--json FILE`` also writes them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import write_json  # noqa: E402

from detkit import load_model  # noqa: E402
from detkit.inference import Predictor  # noqa: E402


def video(args: argparse.Namespace) -> dict:
    import cv2

    from detkit.config import load_config
    from detkit.data.build import build_dataset
    from detkit.inference.run import predict_video

    cfg = load_config(Path(args.run) / "config.yaml", [f"data.image_size={args.size}"])
    model = load_model(args.run, config=cfg)
    dataset = build_dataset(cfg.data.val, transform=None, with_masks=False, key="data.val")
    frames = []
    for i in range(args.frames):  # the validation images as frames, letterboxed onto one 16:9 frame size
        img = dataset.load(i % len(dataset))["image"]
        frame = np.zeros((360, 640, 3), np.uint8)
        h, w = img.shape[:2]
        s = min(360 / h, 640 / w)
        small = cv2.resize(img, (int(w * s), int(h * s)))
        frame[: small.shape[0], : small.shape[1]] = small
        frames.append(frame)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip.mp4"
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25.0, (640, 360))
        for f in frames:
            writer.write(f[:, :, ::-1])
        writer.release()
        predictor = Predictor(model, batch_size=args.batch, score_threshold=0.3)
        predictor(frames[: args.batch])  # warm-up
        t = time.perf_counter()
        predictor(frames)
        plain = len(frames) / (time.perf_counter() - t)
        summary = predict_video(predictor, str(path), Path(tmp) / "out")
    return {"measure": "video", "run": str(args.run), "input": args.size, "frames": summary["frames"],
            "video_frames_per_s": round(summary["frames_per_s"], 2), "images_per_s_same_frames": round(plain, 2),
            "ratio": round(summary["frames_per_s"] / plain, 3),
            "note": "video: decode + predict + draw + encode MP4 + JSON lines; images: predict only"}


def canvases(dataset, grid: int, limit: int, shrink: float = 1.0):
    """The dataset's images (resized by ``shrink``) pasted onto grid x grid canvases (cell = the largest image),
    with their boxes moved along: a COCO ground truth of large images with small objects."""
    import cv2

    n = min(len(dataset), limit)
    samples = [dict(dataset.load(i)) for i in range(n)]
    if shrink != 1.0:
        for s in samples:
            h, w = s["image"].shape[:2]
            size = (max(1, round(w * shrink)), max(1, round(h * shrink)))
            s["image"] = cv2.resize(s["image"], size, interpolation=cv2.INTER_AREA)
            sx, sy = size[0] / w, size[1] / h
            s["boxes"] = np.asarray(s["boxes"], dtype=np.float64).reshape(-1, 4) * np.array([sx, sy, sx, sy])
    images = [s["image"] for s in samples]
    cell = max(max(im.shape[:2]) for im in images)
    out, gt_images, gt_anns = [], [], []
    per = grid * grid
    for c in range(0, n - per + 1, per):
        canvas = np.full((grid * cell, grid * cell, 3), 114, np.uint8)
        image_id = len(out) + 1
        for k in range(per):
            y, x = divmod(k, grid)
            im, t = images[c + k], samples[c + k]
            canvas[y * cell:y * cell + im.shape[0], x * cell:x * cell + im.shape[1]] = im
            for box, label, crowd in zip(t["boxes"], t["labels"], t["iscrowd"]):
                if crowd:
                    continue
                x0, y0, x1, y1 = (float(v) for v in box)
                w, h = x1 - x0, y1 - y0
                gt_anns.append({"id": len(gt_anns) + 1, "image_id": image_id, "category_id": int(label),
                                "bbox": [x0 + x * cell, y0 + y * cell, w, h], "area": w * h, "iscrowd": 0})
        gt_images.append({"id": image_id, "width": grid * cell, "height": grid * cell,
                          "file_name": f"canvas{image_id}.jpg"})
        out.append(canvas)
    return out, {"images": gt_images, "annotations": gt_anns}


def tiling(args: argparse.Namespace) -> dict:
    from detkit.data.build import build_dataset
    from detkit.evaluation import score_predictions

    model = load_model(args.run)
    cfg = model.config
    dataset = build_dataset(cfg.data.val, transform=None, with_masks=False, key="data.val")
    images, gt = canvases(dataset, args.grid, args.limit, args.shrink)
    gt["categories"] = [{"id": i + 1, "name": n} for i, n in enumerate(model.classes)]
    results = {}
    for mode, tiles in (("plain", None), ("tiled", {"size": args.tile, "overlap": args.overlap})):
        predictor = Predictor(model, batch_size=4, tiles=tiles)
        predictor(images[:1])  # warm-up
        t = time.perf_counter()
        preds = predictor(images)
        seconds = time.perf_counter() - t
        dets = [{"image_id": i + 1, "category_id": int(lab), "score": float(s),
                 "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]}
                for i, p in enumerate(preds) for b, s, lab in zip(p["boxes"], p["scores"], p["labels"])]
        with tempfile.TemporaryDirectory() as tmp:
            write_json(gt, Path(tmp) / "gt.json", indent=None)
            write_json(dets, Path(tmp) / "dt.json", indent=None)
            m = score_predictions(Path(tmp) / "dt.json", Path(tmp) / "gt.json", metric="coco")
        results[mode] = {"AP": m.get("bbox_AP"), "AP50": m.get("bbox_AP50"), "AP_small": m.get("bbox_APs"),
                         "AP_medium": m.get("bbox_APm"), "s_per_image": seconds / len(images)}
    return {"measure": "tiling", "run": str(args.run), "canvases": len(images), "grid": args.grid,
            "shrink": args.shrink, "objects": len(gt["annotations"]),
            "objects_small": sum(a["area"] < 32 ** 2 for a in gt["annotations"]),
            "canvas_px": int(images[0].shape[0]), "tile": args.tile, "overlap": args.overlap,
            "network_input": int(cfg.data.image_size), **{f"{k}_{m}": (round(v, 4) if v is not None else None)
                                                          for m, r in results.items() for k, v in r.items()},
            "time_ratio": round(results["tiled"]["s_per_image"] / results["plain"]["s_per_image"], 2)}


def tta(args: argparse.Namespace, run: str) -> dict:
    from detkit.engine.run import evaluate

    timings, metrics = {}, {}
    for mode in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            m, _ = evaluate(run, out=Path(tmp) / "metrics.json", tta=mode, plots=False,
                            overrides=["eval.analysis=false", "trainer.enable_progress_bar=false", *args.override])
            timings[mode], metrics[mode] = time.perf_counter() - t, m
    main = next(k for k in ("bbox_AP", "mIoU") if k in metrics[False])
    out = {"measure": "tta", "run": run, "metric": main, "plain": round(metrics[False][main], 4),
           "tta": round(metrics[True][main], 4), "gain": round(metrics[True][main] - metrics[False][main], 4),
           "time_ratio": round(timings[True] / timings[False], 2), "overrides": args.override}
    if "segm_AP" in metrics[False]:
        out.update(segm_plain=round(metrics[False]["segm_AP"], 4), segm_tta=round(metrics[True]["segm_AP"], 4))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help="also write the results here")
    sub = p.add_subparsers(dest="what", required=True)
    v = sub.add_parser("video")
    v.add_argument("run")
    v.add_argument("--size", type=int, default=320)
    v.add_argument("--frames", type=int, default=60)
    v.add_argument("--batch", type=int, default=4)
    t = sub.add_parser("tiling")
    t.add_argument("run")
    t.add_argument("--grid", type=int, default=3)
    t.add_argument("--tile", type=int, default=640)
    t.add_argument("--overlap", type=float, default=0.2)
    t.add_argument("--limit", type=int, default=1000, help="at most this many validation images")
    t.add_argument("--shrink", type=float, default=1.0, help="resize each image by this before pasting it")
    a = sub.add_parser("tta")
    a.add_argument("runs", nargs="+")
    a.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="config overrides for both passes, e.g. 'eval.tta={scales: [1.0], hflip: true}'")
    args = p.parse_args()
    torch.manual_seed(0)
    if args.what == "video":
        rows = [video(args)]
    elif args.what == "tiling":
        rows = [tiling(args)]
    else:
        rows = [tta(args, r) for r in args.runs]
    for r in rows:
        print(json.dumps(r))
    if args.json:
        write_json(rows, args.json)


if __name__ == "__main__":
    main()
