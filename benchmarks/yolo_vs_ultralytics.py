"""detkit's YOLO-style detector against Ultralytics YOLOv8n: accuracy (same data, same epochs, from scratch,
both scored by detkit's evaluator) and batch-1 CPU inference latency at the same image size.

Ultralytics is never a detkit dependency: it lives in its own venv (``bash benchmarks/setup_ultralytics.sh``
makes ``benchmarks/.venv-ultralytics``, with the project's torch pins and detkit installed editable). This
script runs with the project's venv; everything that imports ultralytics runs in that venv as a worker
subprocess (this same file, ``_worker SPEC.json``).

Accuracy (default mode)::

    .venv/bin/python benchmarks/yolo_vs_ultralytics.py --task shapes --epochs 30 --image-size 128
    .venv/bin/python benchmarks/yolo_vs_ultralytics.py --task raccoon --epochs 30 --image-size 320 \
        --out runs/bench/yolo_vs_ultralytics/raccoon.json

1. The detkit config's ``data.train`` / ``data.val`` (default ``configs/yolo/{task}.yaml``) are exported as a
   YOLO dataset under ``--work`` (images copied to ``images/{split}/<image_id><suffix>``, their labels written
   next to them by ``detkit.data.writers.to_yolo`` as ``labels/{split}/<image_id>.txt``, class k = detkit
   label k + 1, and Ultralytics' ``data.yaml``), so both models train on the same images and boxes.
2. Ultralytics trains ``yolov8n.yaml`` from random init (``pretrained=False``) for ``--epochs`` at
   ``--image-size``, CPU, fp32 (``amp=False``), ``plots=False``, ``val=False`` (only the final epoch is
   validated), otherwise its defaults: batch 16, nbs 64 (so gradients accumulate over 4 batches),
   ``optimizer=auto`` (AdamW below 10k iterations, lr from nc), mosaic and its other augmentations,
   ``close_mosaic=10``. ``--ultra-arg key=value`` passes anything else to ``YOLO.train``.
3. Its final weights (``last.pt``) predict the val split through Ultralytics' own validator
   (``YOLO.val``: letterboxed rect batches, ``multi_label=True`` NMS) at ``conf=0.001 iou=0.6 max_det=300``,
   which are the score/NMS/max-detection settings of detkit's YOLO head (``configs/_base_/models/yolo.yaml``).
   Its COCO-results JSON is rewritten with detkit's image ids and the dataset's own category ids and scored
   by detkit's evaluator (``detkit eval --predictions P --ground-truth CONFIG --split val`` does the same).
4. detkit trains with ``detkit train CONFIG train.epochs=E data.image_size=S output_dir=...`` and
   ``detkit eval RUN --checkpoint RUN/checkpoints/last.ckpt`` scores its final weights.

Latency (``--latency``): batch 1, ``--threads`` torch threads, median of ``--repeats`` timed runs after
``--warmup``, the two models interleaved in one process (the ultralytics venv, which has detkit too), on one
val image resized to S x S (no decoding, no letterbox on either side). Timed: Ultralytics = ``x / 255`` +
``DetectionModel`` forward (eval) + ``ultralytics.utils.nms.non_max_suppression``; detkit = normalisation +
``Detector`` forward (eval), which includes decode + NMS, as built and as the Predictor runs it
(``detkit_fast``: BatchNorm folded into the convolutions, channels_last). Both at the same score threshold /
NMS IoU / max detections (``--conf``, ``--iou``, 300). Ultralytics is timed unfused and with Conv+BN fused (what its
predictor does). Weights: the accuracy run's final weights when they exist under ``--work``, else random
init. Params and multiply-adds of both come from detkit's counter (``detkit.analysis.complexity``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import environment, write_json

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ULTRA_PYTHON = ROOT / "benchmarks" / ".venv-ultralytics" / "bin" / "python"
DEFAULT_WORK = ROOT / "runs" / "bench" / "yolo_vs_ultralytics"
ULTRA_MODEL = "yolov8n.yaml"


# ----------------------------------------------------------------------------------------------------------------
# helpers shared by the driver and the worker
def offline_env(work: Path) -> dict[str, str]:
    """Environment that keeps Ultralytics offline and its settings out of ~/.config."""
    return {
        "YOLO_OFFLINE": "1",  # is_online() -> False: no update checks, no hub, no downloads attempted
        "YOLO_AUTOINSTALL": "false",  # never pip-install a 'missing' requirement
        "YOLO_CONFIG_DIR": str(work.resolve() / "ultralytics-config"),  # settings.json here, not under ~/.config
        "YOLO_VERBOSE": os.environ.get("YOLO_VERBOSE", "true"),
        "MPLBACKEND": "Agg",
    }


# ----------------------------------------------------------------------------------------------------------------
# driver side (project venv)
def load_cfg(config: Path, image_size: int, overrides: list[str]):
    from detkit.config import load_config
    from detkit.data.shapes import ensure_shapes

    cfg = load_config(config, [f"data.image_size={image_size}", *overrides])
    ensure_shapes(cfg.data)  # data.generate: shapes makes the shapes set on first use
    return cfg


def build_split(cfg, split: str):
    from detkit.data.build import build_dataset

    return build_dataset(cfg.data[split], transform=None, with_masks=False, key=f"data.{split}")


def export_yolo(cfg, out: Path) -> dict[str, Any]:
    """Write data.yaml, images/{train,val}/<image_id><suffix> and labels/{train,val}/<image_id>.txt: Ultralytics
    finds an image's labels by replacing its last ``images/`` with ``labels/``, which is where
    ``detkit.data.writers.to_yolo`` writes them when given the copied images and ``OUT/images`` as their root."""
    import dataclasses

    import yaml

    from detkit.data.writers import to_yolo

    manifest: dict[str, Any] = {}
    for split in ("train", "val"):
        ds = build_split(cfg, split)
        img_dir = out / "images" / split
        for d in (img_dir, out / "labels" / split):
            shutil.rmtree(d, ignore_errors=True)
        img_dir.mkdir(parents=True)
        files, records = {}, []
        for r in ds.records:
            name = f"{int(r.image_id)}{Path(r.file).suffix.lower()}"
            shutil.copyfile(r.file, img_dir / name)  # a copy, not a link: to_yolo resolves paths under its root
            records.append(dataclasses.replace(r, file=img_dir / name))
            files[name] = int(r.image_id)
        ds.records = records
        counts = to_yolo(ds, out, out / "images")  # crowd regions left out: COCOeval ignores them, no target either
        (out / "dataset.yaml").unlink(missing_ok=True)  # to_yolo's detkit data config; Ultralytics reads data.yaml
        manifest[split] = {"images": len(files), "boxes": counts["annotations"], "files": files}
        if split == "val":
            manifest["classes"] = list(ds.classes)
            manifest["cat_ids"] = [c.item() if hasattr(c, "item") else c for c in ds.cat_ids]
    data = {"path": str(out.resolve()), "train": "images/train", "val": "images/val",
            "names": dict(enumerate(manifest["classes"]))}
    (out / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    write_json(manifest, out / "manifest.json")
    return manifest


def run_worker(args: argparse.Namespace, spec: dict[str, Any], name: str) -> dict[str, Any]:
    """Run this file's worker in the ultralytics venv; its log goes to WORK/<name>.log and to the console."""
    work = Path(spec["work"])
    spec_path = work / f"{name}.spec.json"
    result_path = work / f"{name}.result.json"
    result_path.unlink(missing_ok=True)
    write_json({**spec, "result": str(result_path)}, spec_path)
    python = Path(args.ultralytics_python)
    if not python.exists():
        raise SystemExit(f"{python} not found: run `bash benchmarks/setup_ultralytics.sh` first")
    env = {**os.environ, **offline_env(Path(args.work))}
    log = work / f"{name}.log"
    print(f"[ultralytics] {name}: {python} {Path(__file__).name} _worker {spec_path}  (log: {log})", flush=True)
    with open(log, "w") as f:
        proc = subprocess.Popen([str(python), str(Path(__file__).resolve()), "_worker", str(spec_path)], cwd=ROOT,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:  # type: ignore[union-attr]
            f.write(line)
            f.flush()
            if args.verbose:
                sys.stdout.write(line)
        rc = proc.wait()
    if rc != 0 or not result_path.exists():
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"ultralytics worker {name} failed (exit {rc}); last lines of {log}:\n{tail}")
    return json.loads(result_path.read_text())


def score_ultralytics(pred_in: Path, pred_out: Path, manifest: dict[str, Any], cfg) -> dict[str, Any]:
    """Rewrite Ultralytics' predictions.json with detkit's image ids and the dataset's own category ids, then score
    it exactly as ``detkit eval --predictions pred_out --ground-truth CONFIG --split val`` does."""
    from detkit.evaluation import dataset_to_coco, score_predictions

    cat_ids = manifest["cat_ids"]
    files = manifest["val"]["files"]
    out = []
    for p in json.loads(pred_in.read_text()):
        image_id = files[p["file_name"]] if "file_name" in p else int(p["image_id"])
        out.append({"image_id": image_id, "category_id": cat_ids[int(p["category_id"]) - 1],  # class_map: cls + 1
                    "bbox": [float(v) for v in p["bbox"]], "score": float(p["score"])})
    write_json(out, pred_out)
    ds = build_split(cfg, "val")
    metrics = score_predictions(pred_out, dataset_to_coco(ds), metric="coco", cat_to_label=ds.cat_to_label())
    from detkit.engine.callbacks import write_metrics

    write_metrics(metrics, pred_out.with_name("metrics.json"))
    return metrics


def run_logged(cmd: list[str], log: Path, verbose: bool) -> float:
    print(f"[detkit] {' '.join(cmd)}  (log: {log})", flush=True)
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:  # type: ignore[union-attr]
            f.write(line)
            f.flush()
            if verbose:
                sys.stdout.write(line)
        rc = proc.wait()
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"failed (exit {rc}): {' '.join(cmd)}; last lines of {log}:\n{tail}")
    return time.perf_counter() - t


def accuracy(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work) / args.task
    work.mkdir(parents=True, exist_ok=True)
    cfg = load_cfg(Path(args.detkit_config), args.image_size, args.detkit_override)
    rows: list[dict[str, Any]] = []
    report: dict[str, Any] = {"task": args.task, "epochs": args.epochs, "image_size": args.image_size,
                              "detkit_config": str(args.detkit_config), "rows": rows,
                              "environment": environment()}  # its load average: at the start
    if "ultralytics" in args.models:
        manifest = export_yolo(cfg, work / "dataset")
        print(f"YOLO dataset: {work / 'dataset'} ({manifest['train']['images']} train / "
              f"{manifest['val']['images']} val images, classes {manifest['classes']} -> ids {manifest['cat_ids']})")
        train_args = {"epochs": args.epochs, "imgsz": args.image_size, "batch": args.ultra_batch,
                      "workers": args.workers, "device": "cpu", "amp": False, "plots": False, "pretrained": False,
                      "val": False, "seed": args.seed, "exist_ok": True}
        for item in args.ultra_arg:
            key, _, value = item.partition("=")
            train_args[key] = _literal(value)
        spec = {"mode": "train", "work": str(work), "threads": args.train_threads,
                "model": ULTRA_MODEL, "data": str(work / "dataset" / "data.yaml"), "project": str(work / "ultralytics"),
                "train_args": train_args,
                "val_args": {"imgsz": args.image_size, "conf": args.conf, "iou": args.iou, "max_det": 300,
                             "batch": 16, "device": "cpu", "plots": False, "save_json": True, "exist_ok": True}}
        res = run_worker(args, spec, "ultralytics_train")
        metrics = score_ultralytics(Path(res["predictions"]), work / "ultralytics" / "detkit_eval" / "predictions.json",
                                    manifest, cfg)
        rows.append({"model": "ultralytics yolov8n", "epochs": args.epochs, "train_s": res["train_s"],
                     "epoch_s": res["epoch_s"], "mAP50": metrics.get("bbox_AP50"), "mAP50_95": metrics.get("bbox_AP"),
                     "ultralytics_own_mAP50": res["own_metrics"].get("metrics/mAP50(B)"),
                     "ultralytics_own_mAP50_95": res["own_metrics"].get("metrics/mAP50-95(B)"),
                     "optimizer": res.get("optimizer"), "params": res.get("params"), "weights": res["weights"],
                     "predictions": str(work / "ultralytics" / "detkit_eval" / "predictions.json"),
                     "train_args": train_args})
        print(f"  check: .venv/bin/detkit eval --predictions {rows[-1]['predictions']} --ground-truth "
              f"{args.detkit_config} --split val data.image_size={args.image_size}")
    if "detkit" in args.models:
        run = work / "detkit"
        shutil.rmtree(run, ignore_errors=True)
        detkit = [sys.executable, "-m", "detkit"]
        overrides = [f"train.epochs={args.epochs}", f"data.image_size={args.image_size}", f"output_dir={run}",
                     *args.detkit_override]
        train_s = run_logged([*detkit, "train", str(args.detkit_config), *overrides], work / "detkit_train.log",
                             args.verbose)
        run_logged([*detkit, "eval", str(run), "--checkpoint", str(run / "checkpoints" / "last.ckpt"), "--out",
                    str(run / "eval_last" / "metrics.json")], work / "detkit_eval.log", args.verbose)
        metrics = json.loads((run / "eval_last" / "metrics.json").read_text())
        rows.append({"model": f"detkit {Path(args.detkit_config).parent.name}/{Path(args.detkit_config).stem}",
                     "epochs": args.epochs, "train_s": train_s, "epoch_s": train_s / args.epochs,
                     "mAP50": metrics.get("bbox_AP50"), "mAP50_95": metrics.get("bbox_AP"), "run": str(run),
                     "overrides": overrides})
    report["loadavg_end"] = os.getloadavg()
    print_table(["model", "epochs", "train min", "s/epoch", "mAP50", "mAP50-95"],
                [[r["model"], r["epochs"], f"{r['train_s'] / 60:.1f}", f"{r['epoch_s']:.1f}", _f(r["mAP50"]),
                  _f(r["mAP50_95"])] for r in rows],
                f"{args.task} @ {args.image_size}px, {args.epochs} epochs, from scratch, scored by detkit's evaluator "
                "(val split)")
    return report


def latency(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work) / args.task
    work.mkdir(parents=True, exist_ok=True)
    cfg = load_cfg(Path(args.detkit_config), args.image_size, args.detkit_override)
    ds = build_split(cfg, "val")
    weights = args.ultra_weights or _existing(work / "ultralytics" / "train" / "weights" / "last.pt")
    ckpt = args.detkit_checkpoint or _existing(work / "detkit" / "checkpoints" / "last.ckpt")
    spec = {"mode": "latency", "work": str(work), "threads": args.threads, "image": str(ds.records[0].file),
            "size": args.image_size, "repeats": args.repeats, "warmup": args.warmup, "conf": args.conf,
            "iou": args.iou, "max_det": 300, "ultra_model": ULTRA_MODEL, "ultra_weights": weights,
            "nc": len(ds.classes), "detkit_config": str(args.detkit_config),
            "detkit_overrides": [f"data.image_size={args.image_size}", *args.detkit_override],
            "detkit_checkpoint": ckpt}
    res = run_worker(args, spec, "latency")
    u, uf, d, df = res["ultralytics"], res["ultralytics_fused"], res["detkit"], res["detkit_fast"]
    rows = [["ultralytics yolov8n", u["ms"], u["dets"], u["params"], u["macs"], res["ultra_weights"]],
            ["ultralytics yolov8n (fused)", uf["ms"], uf["dets"], uf["params"], uf["macs"], res["ultra_weights"]],
            ["detkit", d["ms"], d["dets"], d["params"], d["macs"], res["detkit_weights"]],
            ["detkit (fast: BN folded, channels_last)", df["ms"], df["dets"], df["params"], df["macs"],
             res["detkit_weights"]]]
    print_table(["model", "median ms", "dets", "params M", "GMACs", "weights"],
                [[r[0], f"{r[1]:.2f}", r[2], f"{r[3] / 1e6:.2f}", f"{r[4] / 1e9:.3f}", r[5]] for r in rows],
                f"{args.task}: batch 1 at {args.image_size}x{args.image_size}, {args.threads} threads, median of "
                f"{args.repeats} (interleaved) after {args.warmup} warm-up, forward + NMS")
    print(f"ratio detkit / ultralytics: {d['ms'] / u['ms']:.2f} (unfused), {d['ms'] / uf['ms']:.2f} (fused); "
          f"paired medians {res['paired_ratio']:.2f} / {res['paired_ratio_fused']:.2f}; detkit fast / ultralytics "
          f"fused: {df['ms'] / uf['ms']:.2f} (paired {res['paired_ratio_fast_fused']:.2f})")
    return {"task": args.task, "image_size": args.image_size, "threads": args.threads,
            "environment": environment(), **res,
            "ratio": d["ms"] / u["ms"], "ratio_fused": d["ms"] / uf["ms"], "ratio_fast_fused": df["ms"] / uf["ms"]}


def print_table(header: list[str], rows: list[list[Any]], title: str) -> None:
    print(f"\n{title}\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(v) for v in r) + " |")


def _f(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, int | float) else "-"


def _existing(path: Path) -> str | None:
    return str(path) if path.exists() else None


def _literal(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


# ----------------------------------------------------------------------------------------------------------------
# worker side (ultralytics venv)
def worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(int(spec["threads"]))
    from ultralytics.utils import SETTINGS

    off = ("sync", "hub", "tensorboard", "clearml", "comet", "dvc", "mlflow", "neptune", "raytune", "wandb", "platform")
    SETTINGS.update({k: False for k in (*off, "vscode_msg", "openvino_msg") if k in SETTINGS})  # no telemetry
    cfg_dir = Path(os.environ.get("YOLO_CONFIG_DIR", spec["work"]))  # anything it would download or write: here
    SETTINGS.update({"weights_dir": str(cfg_dir / "weights"), "runs_dir": str(cfg_dir / "runs"),
                     "datasets_dir": str(cfg_dir / "datasets")})
    # check_det_dataset() always calls check_font('Arial.ttf'), which HEADs github.com when the font is not in
    # USER_CONFIG_DIR: put matplotlib's DejaVuSans there under that name (it is only used to draw labels)
    import matplotlib
    from ultralytics.utils import USER_CONFIG_DIR

    dejavu = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        if not (USER_CONFIG_DIR / name).exists():
            USER_CONFIG_DIR.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(dejavu, USER_CONFIG_DIR / name)
    result = worker_train(spec) if spec["mode"] == "train" else worker_latency(spec)
    write_json(result, spec["result"])


def worker_train(spec: dict[str, Any]) -> dict[str, Any]:
    import csv

    from ultralytics import YOLO
    from ultralytics.models.yolo.detect import DetectionValidator

    # Our own scoring is detkit's: skip Ultralytics' faster-coco-eval pass over the saved JSON (not installed here)
    DetectionValidator.eval_json = lambda self, stats: stats

    model = YOLO(spec["model"])
    t = time.perf_counter()
    model.train(data=spec["data"], project=spec["project"], name="train", **spec["train_args"])
    train_s = time.perf_counter() - t
    trainer = model.trainer
    save_dir = Path(trainer.save_dir)
    epoch_s = train_s / spec["train_args"]["epochs"]
    csv_path = save_dir / "results.csv"
    if csv_path.exists():  # 'time' is the cumulative elapsed time at each epoch's end
        with open(csv_path) as f:
            times = [float(r["time"]) for r in csv.DictReader(f) if r.get("time")]
        if len(times) >= 2:
            epoch_s = statistics.median(b - a for a, b in zip(times, times[1:]))
    opt = trainer.optimizer
    nc = len(trainer.data["names"])  # optimizer=auto below 10k iterations: AdamW at this lr (trainer.build_optimizer)
    lr0 = round(0.002 * 5 / (4 + nc), 6) if trainer.args.optimizer == "auto" else trainer.args.lr0
    optimizer = {"name": type(opt).__name__, "lr0": lr0, "accumulate": trainer.accumulate,
                 "batch": trainer.batch_size, "nbs": trainer.args.nbs, "steps_per_epoch": len(trainer.train_loader)}
    scored: dict[str, Any] = {}
    for which in ("last", "best"):  # final weights, and best.pt when validation picked one
        weights = save_dir / "weights" / f"{which}.pt"
        if which == "best" and not (weights.is_file() and trainer.args.val):
            continue
        val_model = YOLO(str(weights))
        own = val_model.val(data=spec["data"], project=spec["project"], name=f"val_{which}", **spec["val_args"])
        scored[which] = {"weights": str(weights), "predictions": str(Path(own.save_dir) / "predictions.json"),
                         "own_metrics": {k: float(v) for k, v in own.results_dict.items()}}
    model_info = measure_ultralytics(scored["last"]["weights"], int(spec["train_args"]["imgsz"]))
    return {"train_s": train_s, "epoch_s": epoch_s, "epochs_done": len(times) if csv_path.exists() else None,
            **scored["last"], "best": scored.get("best"), "optimizer": optimizer, **model_info}


def measure_ultralytics(weights: str, size: int, repeats: int = 20, warmup: int = 3) -> dict[str, Any]:
    """Params and multiply-adds (detkit's counter, the same as its own rows) of the network at ``size`` x ``size``,
    and its batch-1 forward latency in eval mode, fused as Ultralytics predicts (median ms, no NMS)."""
    import copy

    import torch
    from ultralytics import YOLO

    from detkit.analysis.complexity import count_complexity

    model = YOLO(weights).model.float().eval()
    comp = count_complexity(model, size)
    fused = copy.deepcopy(model).fuse(verbose=False)
    x = torch.zeros(1, 3, size, size)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            t = time.perf_counter()
            fused(x)
            if i >= warmup:
                times.append(time.perf_counter() - t)
    return {"params": comp.params, "macs": comp.flops, "forward_ms": round(statistics.median(times) * 1e3, 2)}


def worker_latency(spec: dict[str, Any]) -> dict[str, Any]:
    import copy

    import numpy as np
    import torch
    from PIL import Image
    from ultralytics import YOLO
    from ultralytics.utils.nms import non_max_suppression

    from detkit import build_model, load_config
    from detkit.analysis.complexity import count_complexity
    from detkit.inference.optimize import optimize_for_inference

    size = spec["size"]
    image = np.asarray(Image.open(spec["image"]).convert("RGB").resize((size, size), Image.BILINEAR))
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float().contiguous()  # 1 x 3 x S x S in [0, 255]

    # Ultralytics: DetectionModel (trained weights or yolov8n.yaml with nc classes, random init)
    if spec["ultra_weights"]:
        ultra = YOLO(spec["ultra_weights"]).model.float()
    else:
        from ultralytics.nn.tasks import DetectionModel

        torch.manual_seed(0)
        ultra = DetectionModel(spec["ultra_model"], nc=spec["nc"], verbose=False)
    ultra.eval()
    for p in ultra.parameters():
        p.requires_grad_(False)
    fused = copy.deepcopy(ultra).fuse(verbose=False)

    # detkit: the config's model, trained checkpoint or random init
    cfg = load_config(spec["detkit_config"], spec["detkit_overrides"])
    if spec["detkit_checkpoint"]:
        from detkit.engine.run import load_checkpoint

        ours = load_checkpoint(spec["detkit_checkpoint"], cfg).model
    else:
        torch.manual_seed(0)
        ours = build_model(cfg)
    ours.eval()
    mean = torch.tensor(ours.backbone.mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(ours.backbone.std, dtype=torch.float32)[:, None, None]
    _set_detkit_thresholds(ours, spec)

    def run_ultra(model):
        def fn():
            out = model(x / 255)  # the predictor's normalisation
            return non_max_suppression(out, spec["conf"], spec["iou"], max_det=spec["max_det"])
        return fn

    fast = copy.deepcopy(ours)
    optimize_for_inference(fast)  # what detkit's Predictor runs: BatchNorm folded, channels_last

    def run_ours():
        return ours((x / 255 - mean) / std)

    def run_fast():
        return fast(((x / 255 - mean) / std).contiguous(memory_format=torch.channels_last))

    fns = {"ultralytics": run_ultra(ultra), "ultralytics_fused": run_ultra(fused), "detkit": run_ours,
           "detkit_fast": run_fast}
    with torch.inference_mode():
        dets = {"ultralytics": len(fns["ultralytics"]()[0]), "ultralytics_fused": len(fns["ultralytics_fused"]()[0]),
                "detkit": len(fns["detkit"]()[0]["boxes"]), "detkit_fast": len(fns["detkit_fast"]()[0]["boxes"])}
        for _ in range(spec["warmup"]):
            for fn in fns.values():
                fn()
        times: dict[str, list[float]] = {k: [] for k in fns}
        order = list(fns)
        for i in range(spec["repeats"]):
            for name in order if i % 2 == 0 else order[::-1]:  # interleaved, alternating order
                t = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - t)
    comp = {"ultralytics": count_complexity(ultra, size), "ultralytics_fused": count_complexity(fused, size),
            "detkit": count_complexity(ours, size), "detkit_fast": count_complexity(ours, size)}
    out: dict[str, Any] = {"ultra_weights": spec["ultra_weights"] or "random init",
                           "detkit_weights": spec["detkit_checkpoint"] or "random init", "torch_threads":
                           torch.get_num_threads()}
    for name in fns:
        out[name] = {"ms": statistics.median(times[name]) * 1e3, "dets": dets[name], "params": comp[name].params,
                     "macs": comp[name].flops, "times_ms": [t * 1e3 for t in times[name]]}
    out["paired_ratio"] = statistics.median(a / b for a, b in zip(times["detkit"], times["ultralytics"]))
    out["paired_ratio_fused"] = statistics.median(a / b for a, b in zip(times["detkit"], times["ultralytics_fused"]))
    out["paired_ratio_fast_fused"] = statistics.median(
        a / b for a, b in zip(times["detkit_fast"], times["ultralytics_fused"]))
    return out


def _set_detkit_thresholds(model, spec: dict[str, Any]) -> None:
    """Same score threshold / NMS IoU / max detections as Ultralytics, where detkit's head has these knobs."""
    head = model.head
    for obj in (head, getattr(head, "params", None), getattr(head, "roi_heads", None)):
        if obj is None:
            continue
        for names, value in ((("score_thresh",), spec["conf"]), (("nms_thresh",), spec["iou"]),
                             (("max_detections", "detections_per_img"), spec["max_det"])):
            for n in names:
                if hasattr(obj, n) and not callable(getattr(obj, n)):
                    try:
                        setattr(obj, n, value)
                    except (AttributeError, TypeError):  # a frozen dataclass: keep the config's value
                        pass


# ----------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations asks pypi.org for updates on import
    if argv[:1] == ["_worker"]:
        worker(argv[1])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("shapes", "raccoon"), default="shapes")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--image-size", type=int, default=None, help="default: the detkit config's data.image_size")
    p.add_argument("--detkit-config", default=None, help="default: configs/yolo/{task}.yaml")
    p.add_argument("--detkit-override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra detkit config override (repeatable)")
    p.add_argument("--models", default="ultralytics,detkit", help="which sides to run (comma-separated)")
    p.add_argument("--latency", action="store_true", help="measure inference latency instead of training")
    p.add_argument("--ultra-batch", type=int, default=16, help="Ultralytics batch size (its default: 16)")
    p.add_argument("--ultra-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra YOLO.train argument, e.g. nbs=16 (repeatable)")
    p.add_argument("--workers", type=int, default=2, help="Ultralytics dataloader workers (it uses 0 on a CPU)")
    p.add_argument("--train-threads", type=int, default=2, help="torch threads of the Ultralytics training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--conf", type=float, default=0.001, help="score threshold of predictions (detkit YOLO: 0.001)")
    p.add_argument("--iou", type=float, default=0.6, help="NMS IoU (detkit YOLO: 0.6; Ultralytics' val: 0.7)")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="torch threads for the latency runs")
    p.add_argument("--ultra-weights", default=None, help="latency: a YOLOv8n .pt (default: WORK/TASK's last.pt)")
    p.add_argument("--detkit-checkpoint", default=None, help="latency: a detkit .ckpt (default: WORK/TASK's last)")
    p.add_argument("--ultralytics-python", default=str(DEFAULT_ULTRA_PYTHON))
    p.add_argument("--work", default=str(DEFAULT_WORK), help="work directory (datasets, runs, logs)")
    p.add_argument("--out", default=None, help="JSON report (default: WORK/TASK/{accuracy,latency}.json)")
    p.add_argument("-v", "--verbose", action="store_true", help="stream the training logs")
    args = p.parse_args(argv)
    args.work = str(Path(args.work).resolve())  # Ultralytics nests relative project paths under its runs_dir
    os.chdir(ROOT)  # detkit configs name their data relative to the repository root
    args.detkit_config = Path(args.detkit_config or f"configs/yolo/{args.task}.yaml")
    if not args.detkit_config.exists():
        raise SystemExit(f"{args.detkit_config} not found (give --detkit-config)")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.image_size is None:
        from detkit.config import load_config

        args.image_size = int(load_config(args.detkit_config, args.detkit_override).data.image_size)
    report = latency(args) if args.latency else accuracy(args)
    out = Path(args.out) if args.out else Path(args.work) / args.task / ("latency.json" if args.latency
                                                                         else "accuracy.json")
    write_json(report, out)
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
