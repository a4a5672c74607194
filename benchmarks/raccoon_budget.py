"""Faster R-CNN on raccoon for a fixed CPU budget: from scratch vs the pretrained timm tf_efficientnet_lite0.

Each setting trains ``configs/faster_rcnn/raccoon.yaml`` for ``--epochs`` epochs (the LR schedule's length)
with a hard wall-clock cap of ``--minutes`` (Lightning's ``max_time``), then reports the last validation:
VOC07 mAP and COCO AP50 on the author's 40 test images. Needs ../shared (data and weights).

    .venv/bin/python benchmarks/raccoon_budget.py --minutes 10 --epochs 8 [--json runs/bench/raccoon.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import detkit

WEIGHTS = "../shared/weights/tf_efficientnet_lite0.in1k.timm.pth"
SETTINGS = {
    "resnet18 (scratch)": ["model.backbone.name=resnet18"],
    "tf_efficientnet_lite0 (ImageNet)": ["model.backbone.name=timm:tf_efficientnet_lite0",
                                         f"model.backbone.pretrained={WEIGHTS}", "model.backbone.frozen_stages=1"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-clock cap per setting")
    parser.add_argument("--epochs", type=int, default=8, help="schedule length (train.epochs)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="runs/bench/raccoon")
    parser.add_argument("--json", default=None)
    parser.add_argument("--only", default=None, help="run only settings whose name contains this")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    minutes = int(args.minutes)
    seconds = int(round((args.minutes - minutes) * 60))
    rows = []
    for name, overrides in SETTINGS.items():
        if args.only and args.only not in name:
            continue
        out = Path(args.out) / name.split()[0]
        start = time.perf_counter()
        run = detkit.train("configs/faster_rcnn/raccoon.yaml", [
            *overrides, f"train.epochs={args.epochs}", f"trainer.max_time=00:00:{minutes:02d}:{seconds:02d}",
            "trainer.enable_progress_bar=false", f"output_dir={out}"])
        elapsed = time.perf_counter() - start
        m = json.loads((run / "metrics.json").read_text())
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        rows.append({"setting": name, "epochs_done": int(ckpt["epoch"]) + 1, "minutes": elapsed / 60,
                     "voc07_mAP": m["voc07_mAP"], "bbox_AP50": m["bbox_AP50"], "bbox_AP": m["bbox_AP"]})
    print("| setting | epochs done | minutes | VOC07 mAP | bbox_AP50 | bbox_AP |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['setting']} | {r['epochs_done']} | {r['minutes']:.1f} | {r['voc07_mAP']:.3f} | "
              f"{r['bbox_AP50']:.3f} | {r['bbox_AP']:.3f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
