"""Segmentation on real data for a fixed number of epochs (the configs' schedules; wall time reported):

- U-Net on CamVid (``configs/unet/camvid.yaml``): the timm ``tf_efficientnet_lite0`` encoder with its ImageNet
  weights vs the same encoder from scratch, identical schedule;
- Mask R-CNN on Penn-Fudan (``configs/mask_rcnn/pennfudan_lite0.yaml``): mask AP.

    .venv/bin/python benchmarks/segmentation_epochs.py [--only camvid_pretrained,camvid_scratch,pennfudan]
        [--out runs/budget] [key=value ...]

Overrides apply to every run. Each run's directory is ``OUT/<name>``; a finished run (its ``metrics.json``
present) is reported, not repeated. Prints one Markdown row per run and writes ``OUT/summary.json``.
Needs ``../shared`` (datasets and weights).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import write_json

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "camvid_pretrained": ("configs/unet/camvid.yaml", [], ("mIoU", "pixel_acc", "mean_class_acc")),
    "camvid_scratch": ("configs/unet/camvid.yaml", ["model.backbone.pretrained=null"],
                       ("mIoU", "pixel_acc", "mean_class_acc")),
    "pennfudan": ("configs/mask_rcnn/pennfudan_lite0.yaml", [], ("segm_AP", "segm_AP50", "bbox_AP", "bbox_AP50")),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(RUNS), help="comma-separated subset of " + ", ".join(RUNS))
    parser.add_argument("--out", default="runs/budget")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    import detkit

    summary = {}
    for name in args.only.split(","):
        if name not in RUNS:
            raise SystemExit(f"--only: unknown run {name!r} (known: {', '.join(RUNS)})")
        config, extra, keys = RUNS[name]
        out = Path(args.out) / name
        wall = None
        if not (out / "metrics.json").is_file():
            start = time.perf_counter()
            detkit.train(ROOT / config, [*extra, *args.overrides, f"output_dir={out}",
                                         "trainer.enable_progress_bar=false"])
            wall = time.perf_counter() - start
        metrics = json.loads((out / "metrics.json").read_text())
        summary[name] = {"config": config, "overrides": extra + list(args.overrides), "wall_s": wall,
                         **{k: metrics.get(k) for k in keys}}
        shown = " | ".join(f"{k} {metrics[k]:.3f}" for k in keys if metrics.get(k) is not None)
        print(f"| {name} | {config} {' '.join(extra)} | {shown} | "
              f"{'%.1f min' % (wall / 60) if wall else 'existing run'} |", flush=True)
    write_json(summary, Path(args.out) / "summary.json")


if __name__ == "__main__":
    main()
