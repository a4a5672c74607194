"""Fine-tuning from a COCO-trained detector against an ImageNet backbone only, at equal steps, same data split and
image size, scored by detkit's evaluator: Penn-Fudan (Mask R-CNN boxes and masks) and raccoon (Faster R-CNN).

    .venv/bin/python benchmarks/finetune.py --coco-weights weights/fasterrcnn_resnet50_fpn_coco.pth \\
        --imagenet-weights weights/resnet50_imagenet.pth --steps 300

The weights are local files (torchvision's state dicts, saved once on a machine that is online, as the README's
quickstart shows); without them the script says which file is missing and exits 0 without measuring (no model or
dataset hub is reached at run time). Each row trains ``configs/faster_rcnn/{pennfudan,raccoon}.yaml`` for the
same number of optimizer steps from (a) ``model.weights=COCO`` (classes kept by name: ``pedestrian`` <- COCO
``person``) and (b) ``model.backbone.pretrained=ImageNet`` only, then scores the final weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import write_json  # noqa: E402

TASKS = {"pennfudan": ("configs/faster_rcnn/pennfudan.yaml", ["model.weights_classes={pedestrian: person}"]),
         "raccoon": ("configs/faster_rcnn/raccoon.yaml", [])}
R50 = ["model.backbone.name=resnet50", "model.backbone.out_levels=[c2,c3,c4,c5]",
       "model.neck.levels=[p2,p3,p4,p5,p6]", "model.neck.extra_op=maxpool"]


def run(task: str, start: str, weights: str, steps: int, work: Path) -> dict:
    import detkit

    config, extra = TASKS[task]
    source = [f"model.weights={weights}", *extra] if start == "coco" else [f"model.backbone.pretrained={weights}"]
    out = work / task / start
    t = time.perf_counter()
    detkit.train(ROOT / config, [*R50, *source, f"trainer.max_steps={steps}", "train.epochs=1000",
                                 f"train.total_steps={steps}", f"output_dir={out}",
                                 "trainer.enable_progress_bar=false"])
    wall = time.perf_counter() - t
    metrics, _ = detkit.evaluate(out, overrides=["eval.analysis=false"])
    return {"task": task, "start": start, "steps": steps, "bbox_AP": metrics.get("bbox_AP"),
            "bbox_AP50": metrics.get("bbox_AP50"), "wall_s": round(wall, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--coco-weights", default="weights/fasterrcnn_resnet50_fpn_coco.pth")
    p.add_argument("--imagenet-weights", default="weights/resnet50_imagenet.pth")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--tasks", default="pennfudan,raccoon")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench" / "fine_tune"))
    args = p.parse_args()
    missing = [f for f in (args.coco_weights, args.imagenet_weights) if not Path(f).is_file()]
    if missing:
        print(f"skipped: {', '.join(missing)} not found (save torchvision's weights to a file on a machine that is "
              f"online; see the README's fine-tune quickstart)")
        return 0
    rows = []
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        for start, weights in (("coco", args.coco_weights), ("imagenet", args.imagenet_weights)):
            rows.append(run(task, start, weights, args.steps, Path(args.work)))
            print(json.dumps(rows[-1]), flush=True)
    write_json(rows, Path(args.work) / "report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
