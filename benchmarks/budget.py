#!/usr/bin/env python
"""Accuracy at equal wall-clock time: detkit's configs and Ultralytics YOLOv8n, trained for the same budget on the
same machine, one after the other, scored by the same evaluator (detkit's, pycocotools) on the same validation split.

    bash benchmarks/setup_ultralytics.sh            # YOLOv8n's own venv (never a detkit dependency)
    .venv/bin/python benchmarks/budget.py --dataset raccoon --budget 10min --image-size 320
    .venv/bin/python benchmarks/budget.py --dataset coco128 --budget 10min --image-size 320 --rows ultralytics,yolo_af

Rows (``--rows``, comma-separated, default all but the Faster R-CNN ones): detkit configs from scratch (``ROWS``;
each ``detkit train CONFIG train.budget=B data.image_size=S``, then ``detkit eval`` of its final weights with
``eval.backend=pycocotools``), the same with the ImageNet ``tf_efficientnet_lite0`` weights of ``../shared/weights``
(``lite0_imagenet``), Faster R-CNN from scratch (ResNet-18) and with those weights, stem frozen
(``faster_rcnn``, ``faster_rcnn_lite0_imagenet``), and YOLOv8n from random init in the two ways a user with this
budget runs it (``--rows ultralytics`` is both): ``ultralytics_time`` with ``time=B`` (Ultralytics lays its schedule
over the time, as ``train.budget`` does) and ``ultralytics_epochs`` with the epochs that fit (a 3-epoch run times an
epoch and the setup; then ``epochs=floor((B - setup) / epoch)``), both validating each epoch as Ultralytics does by
default (``--ultralytics-no-val``: not). Its last.pt and best.pt predict the val split through its own validator at
detkit's score/NMS settings and the predictions are scored by detkit's evaluator
(``benchmarks/yolo_vs_ultralytics.py`` does the dataset export and the Ultralytics side). The reference to beat is
the better of the two modes.

Reported per row: AP (@[.5:.95]), AP50, AP75 of the final weights (and of best.pt for Ultralytics), epochs done,
training images/s (images seen / training seconds), the model's multiply-adds and params at the image size (detkit's
counter for every row), its batch-1 forward latency, and the wall time of the training command. The JSON report
goes to ``--out`` (default ``WORK/DATASET/report.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import yolo_vs_ultralytics as yvu  # noqa: E402  (the Ultralytics side and the dataset export)
from common import environment, write_json  # noqa: E402

LITE0 = ROOT.parent / "shared" / "weights" / "tf_efficientnet_lite0.in1k.timm.pth"
DATASETS = {"raccoon": "configs/{head}/raccoon.yaml", "coco128": "configs/{head}/coco128.yaml"}
# row -> (head folder, overrides): every row at the same image size and budget
LIGHT = ["train.depthwise_weight_decay=0.0"]  # the light backbones' recipe (docs/models.md#training-from-scratch)
ROWS: dict[str, tuple[str, list[str]]] = {
    "yolo": ("yolo", []),
    "yolo_af": ("yolo_af", []),
    "yolo_af_regnetx_400mf": ("yolo_af", ["model.backbone.name=regnet_x_400mf", *LIGHT]),
    "yolo_af_mobilenet_v3_large": ("yolo_af", ["model.backbone.name=mobilenet_v3_large",
                                               "model.backbone.bn_momentum=0.1", *LIGHT]),
    "yolo_af_efficientnet_b0": ("yolo_af", ["model.backbone.name=efficientnet_b0", "model.backbone.drop_path=0.0",
                                            *LIGHT]),
    # a CSP network of plain 3x3 convs (detkit/backbones/csp.py) near YOLOv8n's multiply-adds, designed by hand
    # before the design study (docs/studies.md) picks one
    "yolo_af_cspnet": ("yolo_af", ["model.backbone.name=cspnet", "model.backbone.kwargs.depths=[1,2,2,1]",
                                   "model.backbone.kwargs.widths=[32,64,160,320]"]),
    "lite0_imagenet": ("yolo_af", ["model.backbone.name=timm:tf_efficientnet_lite0",
                                   f"model.backbone.pretrained={LITE0}", *LIGHT]),
    # two-stage: pretrained against scratch at equal time (not run unless named in --rows)
    "faster_rcnn": ("faster_rcnn", ["model.backbone.name=resnet18"]),
    "faster_rcnn_lite0_imagenet": ("faster_rcnn", ["model.backbone.name=timm:tf_efficientnet_lite0",
                                                   f"model.backbone.pretrained={LITE0}",
                                                   "model.backbone.frozen_stages=1"]),
}
DEFAULT_ROWS = ["ultralytics_time", "ultralytics_epochs",
                *(name for name in ROWS if not name.startswith("faster_rcnn"))]


def detkit_row(args: argparse.Namespace, name: str, work: Path) -> dict[str, Any]:
    head, overrides = ROWS[name]
    config = ROOT / DATASETS[args.dataset].format(head=head)
    run = work / name
    cmd = [sys.executable, "-m", "detkit"]
    overrides = [*overrides, *scaled_anchors(config, args.image_size)]
    metrics_file = run / "eval_last" / "metrics.json"
    if args.reuse and metrics_file.is_file() and (run / "checkpoints" / "last.ckpt").is_file():
        wall = run_wall(run)  # a finished row of an earlier command: reported again, not retrained
    else:
        shutil.rmtree(run, ignore_errors=True)
        train = [*cmd, "train", str(config), f"train.budget={args.budget}", f"data.image_size={args.image_size}",
                 f"output_dir={run}", f"seed={args.seed}", "trainer.enable_progress_bar=false", *overrides,
                 *args.detkit_override]
        wall = yvu.run_logged(train, work / f"{name}.train.log", args.verbose)
        write_json({"wall_s": wall}, run / "wall_s.json")
        yvu.run_logged([*cmd, "eval", str(run), "--checkpoint", str(run / "checkpoints" / "last.ckpt"), "--out",
                        str(metrics_file), "eval.backend=pycocotools", "eval.skip_unreadable=true"],
                       work / f"{name}.eval.log", args.verbose)
    metrics = json.loads(metrics_file.read_text())
    import torch

    from detkit.config import load_config

    cfg = load_config(run / "config.yaml")
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    steps = int(ckpt["global_step"])
    batches = int(ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"])
    per_epoch = -(-_train_images(cfg) // int(cfg.data.batch_size))
    record = run / "budget.json"  # the plan next to what the run took (detkit's own count, inside `detkit train`)
    used = json.loads(record.read_text())["used"] if record.is_file() else None
    epochs = int(ckpt["epoch"]) + batches / per_epoch
    return {"row": name, "model": f"detkit {head} {cfg.model.backbone.name}", "config": str(config),
            "overrides": overrides, "AP": metrics.get("bbox_AP"), "AP50": metrics.get("bbox_AP50"),
            "AP75": metrics.get("bbox_AP75"), "epochs": round(epochs, 1), "steps": steps,
            "planned_steps": cfg.train.total_steps, "budget_used": used,
            "images_per_s": round(steps * cfg.data.batch_size / wall, 1), "wall_s": round(wall, 1), "run": str(run),
            **model_info(run)}


def run_wall(run: Path) -> float:
    """The training wall time of a finished run: recorded by this script, or (runs from before it recorded it)
    from the first TensorBoard event file's creation time (in its name) to the last checkpoint."""
    if (run / "wall_s.json").is_file():
        return float(json.loads((run / "wall_s.json").read_text())["wall_s"])
    first = min(int(p.name.split(".")[3]) for p in (run / "tensorboard").glob("events.out.tfevents.*"))
    return (run / "checkpoints" / "last.ckpt").stat().st_mtime - first


def scaled_anchors(config: Path, image_size: int) -> list[str]:
    """The anchor-based head's anchors, fitted at the config's image size, scaled to ``image_size``."""
    from detkit.config import load_config

    cfg = load_config(config)
    anchors = cfg.model.head.params.get("anchors") if cfg.model.head.name == "yolo" else None
    if not anchors or int(cfg.data.image_size) == image_size:
        return []
    f = image_size / int(cfg.data.image_size)
    scaled = [[[max(1, round(w * f)), max(1, round(h * f))] for w, h in level] for level in anchors]
    return [f"model.head.params.anchors={json.dumps(scaled).replace(' ', '')}"]


def _train_images(cfg) -> int:
    from detkit.data.build import build_dataset

    return len(build_dataset(cfg.data.train, with_masks=False, key="data.train"))


ULTRA_MODES = {"ultralytics_time": "time", "ultralytics_epochs": "epochs"}  # row -> how the budget is spent
TIMING_EPOCHS = 3  # epochs of the timing run that sizes the epochs mode


def ultralytics_row(args: argparse.Namespace, work: Path, row: str) -> dict[str, Any]:
    """YOLOv8n as a user with this budget runs it: ``time=B`` (mode ``time``: Ultralytics lays its schedule over the
    time) or the epochs that fit (mode ``epochs``: a short run times an epoch, validation included, and its setup;
    then ``epochs=floor((B - setup) / epoch)``). Both with Ultralytics' defaults otherwise (validation each epoch, so
    best.pt exists), batch 16; last.pt and best.pt are both scored by detkit's evaluator."""
    from detkit.engine.budget import parse_budget

    mode = ULTRA_MODES[row]
    config = ROOT / DATASETS[args.dataset].format(head="yolo_af")
    cfg = yvu.load_cfg(config, args.image_size, [])
    manifest = yvu.export_yolo(cfg, work / "dataset")
    budget_s = parse_budget(args.budget)
    common = {"imgsz": args.image_size, "batch": 16, "workers": args.workers, "device": "cpu", "amp": False,
              "plots": False, "pretrained": False, "val": not args.ultralytics_no_val, "seed": args.seed,
              "exist_ok": True}
    val_args = {"imgsz": args.image_size, "conf": 0.001, "iou": 0.6, "max_det": 300, "batch": 16, "device": "cpu",
                "plots": False, "save_json": True, "exist_ok": True}
    ns = argparse.Namespace(ultralytics_python=args.ultralytics_python, work=str(work), verbose=args.verbose)

    def spec(train_args: dict[str, Any], project: str) -> dict[str, Any]:
        return {"mode": "train", "work": str(work), "threads": args.threads, "model": yvu.ULTRA_MODEL,
                "data": str(work / "dataset" / "data.yaml"), "project": str(work / project),
                "train_args": train_args, "val_args": val_args}

    timing = None
    if mode == "time":
        train_args = {**common, "epochs": 1000, "time": budget_s / 3600}
    else:
        t = yvu.run_worker(ns, spec({**common, "epochs": TIMING_EPOCHS}, f"{row}_timing"), f"{row}_timing")
        setup_s = max(0.0, t["train_s"] - TIMING_EPOCHS * t["epoch_s"])
        epochs = max(1, int((budget_s - setup_s) // t["epoch_s"]))
        timing = {"epoch_s": round(t["epoch_s"], 2), "setup_s": round(setup_s, 1), "epochs": epochs}
        train_args = {**common, "epochs": epochs}
    start = time.perf_counter()
    res = yvu.run_worker(ns, spec(train_args, row), row)
    wall = time.perf_counter() - start
    metrics = yvu.score_ultralytics(Path(res["predictions"]), work / row / "detkit_eval" / "predictions.json",
                                    manifest, cfg)
    best = None
    if res.get("best"):
        best = yvu.score_ultralytics(Path(res["best"]["predictions"]), work / row / "detkit_eval_best" /
                                     "predictions.json", manifest, cfg)
    epochs_done = res.get("epochs_done") or (res["train_s"] / res["epoch_s"] if res["epoch_s"] else None)
    images = manifest["train"]["images"]
    return {"row": row, "model": f"Ultralytics YOLOv8n ({'time=' if mode == 'time' else 'epochs that fit '}"
                                 f"{args.budget})", "AP": metrics.get("bbox_AP"), "AP50": metrics.get("bbox_AP50"),
            "AP75": metrics.get("bbox_AP75"),
            "best_pt": {k: best.get(f"bbox_{k}") for k in ("AP", "AP50", "AP75")} if best else None,
            "epochs": round(epochs_done, 1) if epochs_done else None,
            "images_per_s": round(images * epochs_done / res["train_s"], 1) if epochs_done else None,
            "macs": res.get("macs"), "params": res.get("params"), "forward_ms": res.get("forward_ms"),
            "wall_s": round(wall, 1), "train_s": round(res["train_s"], 1), "budget_used": res["train_s"] / budget_s,
            "timing": timing, "train_args": train_args}


def model_info(run: Path) -> dict[str, Any]:
    """Multiply-adds and params of a detkit run's model on a square input of its image size (as YOLOv8n's are
    counted), and its batch-1 fast-path latency on a validation image."""
    from detkit.analysis.complexity import count_complexity
    from detkit.analysis.study import measure_model
    from detkit.config import load_config
    from detkit.models.load import load_model

    cfg = load_config(run / "config.yaml")
    comp = count_complexity(load_model(run / "checkpoints" / "last.ckpt"), int(cfg.data.image_size))
    m = measure_model(run, cfg)
    return {"macs": comp.flops, "params": comp.params, "forward_ms": m["latency_ms"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=tuple(DATASETS), default="raccoon")
    p.add_argument("--budget", default="10min")
    p.add_argument("--image-size", type=int, default=320)
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                   help=f"known: {', '.join(ULTRA_MODES)} (ultralytics: both), {', '.join(ROWS)}")
    p.add_argument("--ultralytics-no-val", action="store_true",
                   help="Ultralytics without per-epoch validation (more epochs, no best.pt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--detkit-override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--workers", type=int, default=2, help="Ultralytics dataloader workers")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the Ultralytics training")
    p.add_argument("--ultralytics-python", default=str(yvu.DEFAULT_ULTRA_PYTHON))
    p.add_argument("--work", default=str(ROOT / "runs" / "bench" / "budget"))
    p.add_argument("--out", default=None)
    p.add_argument("--reuse", action="store_true",
                   help="report rows whose run already finished (and was evaluated) instead of retraining them")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    work = Path(args.work) / args.dataset
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else work / "report.json"
    report = json.loads(out.read_text()) if out.is_file() else {"rows": {}}
    report.update(dataset=args.dataset, budget=args.budget, image_size=args.image_size, environment=environment())
    report.pop("cpus", None)  # reports written before the environment record: its cores
    names = [r.strip() for r in args.rows.split(",") if r.strip()]
    names = [n for name in names for n in (ULTRA_MODES if name == "ultralytics" else [name])]
    unknown = [n for n in names if n not in ULTRA_MODES and n not in ROWS]
    if unknown:
        p.error(f"--rows: unknown row {unknown[0]!r} (known: {', '.join([*ULTRA_MODES, *ROWS])})")
    for name in names:
        if name.endswith("lite0_imagenet") and not LITE0.is_file():
            print(f"skipping {name}: {LITE0} not found")
            continue
        row = ultralytics_row(args, work, name) if name in ULTRA_MODES else detkit_row(args, name, work)
        row["loadavg"] = os.getloadavg()
        report["rows"][name] = row
        write_json(report, out)
        print(json.dumps(row), flush=True)
    rows = list(report["rows"].values())
    def best(r: dict[str, Any]) -> str:
        b = r.get("best_pt")
        return f"{yvu._f(b['AP'])} / {yvu._f(b['AP75'])}" if b else "-"

    def giga(v: Any) -> str:
        return f"{v / 1e9:.2f}" if v else "-"

    yvu.print_table(["model", "row", "AP", "AP50", "AP75", "best.pt AP / AP75", "epochs", "img/s", "GMACs",
                     "params M", "forward ms", "wall min", "budget used"],
                    [[r["model"], r["row"], yvu._f(r["AP"]), yvu._f(r["AP50"]), yvu._f(r["AP75"]), best(r),
                      r.get("epochs"), r.get("images_per_s"), giga(r.get("macs")),
                      f"{r['params'] / 1e6:.2f}" if r.get("params") else "-", r.get("forward_ms") or "-",
                      f"{r['wall_s'] / 60:.1f}", f"{r['budget_used']:.0%}" if r.get("budget_used") else "-"]
                     for r in rows],
                    f"{args.dataset} @ {args.image_size} px, {args.budget} each, final weights (and Ultralytics' "
                    f"best.pt) scored by detkit's evaluator; GMACs at {args.image_size} px, detkit's counter")
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] if len(sys.argv) > 1 and sys.argv[1] != "_worker" else None))
