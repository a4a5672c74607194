"""``detkit train``, ``eval``, ``predict`` and ``export``: runs and trained models."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from detkit.cli.args import (
    is_main_process,
    positive_float,
    positive_int,
    split_config_and_overrides,
    threshold_or_best,
    unit_float,
)
from detkit.errors import DetkitError


def _train(args: argparse.Namespace) -> int:
    from detkit.engine import train
    from detkit.evaluation.metrics import SUMMARY_STATS

    config, overrides = split_config_and_overrides(args.args, args.resume)
    out = train(config, overrides, resume=args.resume)  # no CONFIG: the resumed run's config.yaml
    if not is_main_process():
        return 0
    print(f"run directory: {out}")
    metrics = out / "metrics.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        shown = ", ".join(f"{k}={m[k]:.4f}" for k in SUMMARY_STATS if isinstance(m.get(k), int | float))
        print(f"final validation: {shown}  ({metrics})")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from detkit.evaluation import format_table

    if args.compare:
        return _compare(args)
    if args.predictions:
        if args.target:  # no RUN_DIR/CONFIG with --predictions: a key=value there is an override
            if "=" not in args.target:
                raise DetkitError(f"{args.target}: with --predictions give the ground truth as --ground-truth, not "
                                  f"a RUN_DIR or CONFIG")
            args.overrides.insert(0, args.target)
        metrics, out = _eval_predictions(args)
    else:
        from detkit.engine.run import evaluate, evaluation_outputs

        if not args.target:
            raise DetkitError("give a RUN_DIR or CONFIG (or --predictions with --ground-truth)")
        metrics, run = evaluate(args.target, args.checkpoint, args.overrides, split=args.split, out=args.out,
                                tta=args.tta)
        if not is_main_process():
            return 0
        files = evaluation_outputs(run, args.split, args.out, args.tta)
        out = files["metrics"]
        plots = files["confusion_matrix"] if "mIoU" in metrics else files["pr_curves"]
        print(f"{'confusion matrix' if 'mIoU' in metrics else 'PR curves'}: {plots}")
    print(format_table(metrics))
    print(f"metrics: {out}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from detkit.config import load_config
    from detkit.data.build import build_dataset
    from detkit.evaluation import dataset_to_coco
    from detkit.evaluation.compare import compare_runs

    run_a, run_b = (Path(r) for r in args.compare)
    if not (run_a / "config.yaml").is_file():
        raise DetkitError(f"--compare {run_a}: not a run directory (no config.yaml)")
    cfg = load_config(run_a / "config.yaml", args.overrides)
    dataset = build_dataset(cfg.data.val, transform=None, with_masks=False, key="data.val",
                            max_pixels=cfg.data.max_image_pixels)
    out = Path(args.out or Path("runs") / "compare" / f"{run_a.name}_vs_{run_b.name}")
    result = compare_runs(run_a, run_b, out, dataset_to_coco(dataset), dataset.cat_to_label())
    print((out / "compare.md").read_text())
    print(f"comparison: {result['out']} (compare.md, per_class_ap.png, pr_overall.png)")
    return 0


def _eval_predictions(args: argparse.Namespace):
    from detkit.evaluation import score_predictions
    from detkit.utils.io import write_json

    if not args.ground_truth:
        raise DetkitError("--predictions needs --ground-truth (a COCO JSON file or a CONFIG)")
    gt = Path(args.ground_truth)
    cat_to_label = None
    if gt.suffix.lower() in (".yaml", ".yml"):
        from detkit.config import load_config
        from detkit.data.build import build_dataset
        from detkit.evaluation import dataset_to_coco

        cfg = load_config(gt, args.overrides)
        if cfg.data[args.split].format is None:
            raise DetkitError(f"{gt}: data.{args.split} is not configured")
        dataset = build_dataset(cfg.data[args.split], transform=None, with_masks=False, key=f"data.{args.split}",
                                max_pixels=cfg.data.max_image_pixels)
        cat_to_label = dataset.cat_to_label()
        ground_truth: Path | dict = dataset_to_coco(dataset)
    else:
        ground_truth = gt
    metrics = score_predictions(args.predictions, ground_truth, metric=args.metric, cat_to_label=cat_to_label)
    predictions = Path(args.predictions)
    # beside the predictions, under their own name: a run's own metrics.json is never replaced
    out = Path(args.out) if args.out else predictions.with_name(f"{predictions.stem}_metrics.json")
    write_json(metrics, out)
    return metrics, out


def _predict(args: argparse.Namespace) -> int:
    import sys

    from detkit.inference import Predictor, expand_inputs
    from detkit.inference.run import format_summary, format_video_summary, predict_files, predict_video
    from detkit.inference.video import is_video_source

    videos = [i for i in args.inputs if is_video_source(i)]
    images = [i for i in args.inputs if i not in videos]
    found: list[Path] = []  # every image under the inputs: none of them is ever overwritten
    files = expand_inputs(images, exclude=args.out, found_all=found) if images else []
    if not files and not videos:
        raise DetkitError(f"no images found in {' '.join(args.inputs)}")
    threshold = best_thresholds(args.checkpoint) if args.score_threshold == "best" else args.score_threshold
    tiles = None
    if args.tile is not None:
        tiles = {"size": args.tile, "overlap": args.overlap, "full_image": not args.no_full_image,
                 "merge": args.tile_merge, "match": args.tile_match if args.tile_merge == "nms" else "iou"}
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, batch_size=args.batch_size,
                                          score_threshold=threshold, classes=args.classes,
                                          fast=not args.no_fast, compile=args.compile, tta=args.tta or None,
                                          tiles=tiles)
    if files:
        print(format_summary(predict_files(predictor, files, args.out, protect=found)))
    stopped = []
    for source in videos:
        summary = predict_video(predictor, source, args.out, vid_stride=args.vid_stride, max_frames=args.max_frames,
                                stall_timeout=args.stall_timeout, protect=found)
        print(format_video_summary(summary))
        if summary["stopped"]:
            stopped.append(summary["stopped"])
    for line in stopped:
        print(f"detkit: {line}", file=sys.stderr)
    return 1 if stopped else 0


def best_thresholds(target: str) -> dict[str, float | None]:
    """``--score-threshold best``: the per-class thresholds of peak F1 that ``detkit eval`` wrote into the run's
    ``metrics.json``."""
    from detkit.models import resolve_checkpoint, run_dir_of

    path = Path(target)
    run = path if path.is_dir() else run_dir_of(resolve_checkpoint(path))
    metrics = run / "metrics.json" if run is not None else None
    found = json.loads(metrics.read_text()).get("best_score_threshold") if metrics and metrics.is_file() else None
    if not found:
        raise DetkitError(f"--score-threshold best: {metrics or target} has no best_score_threshold; run "
                          f"`detkit eval {run or target}` first")
    return found


def _export(args: argparse.Namespace) -> int:
    from detkit.inference.export import export_model
    from detkit.models import load_model

    info = export_model(load_model(args.checkpoint), args.format, args.out, dynamic_batch=args.dynamic_batch,
                        batch_size=args.batch_size, image_size=args.image_size, opset=args.opset,
                        fold_bn=not args.no_fold_bn)
    shape = " x ".join(str(v) for v in info.input_shape)
    print(f"{info.head} -> {info.file} ({info.format}; input images {shape}, float RGB 0..255 resized like "
          f"data.resize={info.resize}; outputs {', '.join(info.outputs)}; {info.batchnorms_folded} BatchNorms folded)")
    print(f"classes and settings: {info.file}.json")
    return 0


def add_parsers(sub) -> None:
    tr = sub.add_parser("train", help="train a model from a config (writes a run directory)")
    tr.add_argument("args", nargs="*", metavar="CONFIG [key=value ...]",
                    help="a YAML config and overrides, e.g. train.epochs=5 model.backbone.name=regnet_x_400mf")
    tr.add_argument("--resume", default=None, metavar="RUN_DIR|CKPT",
                    help="continue a run (model, optimizer, schedule, EMA, epoch, RNG) in its directory")
    tr.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="evaluate a run (COCO/VOC mAP, PR curves) or score a predictions file")
    ev.add_argument("target", nargs="?", help="a run directory or a config (with --checkpoint)")
    ev.add_argument("overrides", nargs="*", help="key=value overrides")
    ev.add_argument("--checkpoint", default=None, help="default: RUN_DIR/checkpoints/best.ckpt")
    ev.add_argument("--split", default="val", choices=("train", "val", "test"))
    ev.add_argument("--predictions", default=None, metavar="PRED.json", help="a COCO results file to score")
    ev.add_argument("--ground-truth", default=None, metavar="GT.json|CONFIG",
                    help="with --predictions: a COCO instances file or a config's dataset (--split)")
    ev.add_argument("--metric", default="all", choices=("coco", "voc07", "voc12", "all"))
    ev.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), default=None,
                    help="two evaluated runs side by side (metrics, per-class AP, PR curves) into --out (a folder)")
    ev.add_argument("--out", default=None, metavar="FILE.json",
                    help="write the metrics here (predictions and plots beside it); default: the run directory, "
                         "under names that carry the split (metrics_test.json, ...), or for --predictions "
                         "PRED_metrics.json beside them")
    ev.add_argument("--tta", action="store_true",
                    help="test-time augmentation: merge flipped and scaled passes (eval.tta); writes metrics_tta.json")
    ev.set_defaults(func=_eval)

    pr = sub.add_parser("predict", help="run a trained model over images, folders or globs")
    pr.add_argument("checkpoint", metavar="RUN_DIR|CHECKPOINT")
    pr.add_argument("inputs", nargs="+", metavar="INPUT",
                    help="image files, folders (recursive) or globs; video files, stream URLs (rtsp://...) or a "
                         "camera index (0)")
    pr.add_argument("--out", default="runs/predict", help="folder for drawn images and predictions.json")
    pr.add_argument("--score-threshold", type=threshold_or_best, default=0.3,
                    help="in [0, 1] (default 0.3), or best: each class's threshold of peak F1 (from detkit eval)")
    pr.add_argument("--batch-size", type=positive_int, default=4)
    pr.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    pr.add_argument("--classes", default=None, metavar="A,B",
                    help="comma-separated class names to keep (default: all)")
    pr.add_argument("--no-fast", action="store_true",
                    help="run the model as trained (default: BatchNorm folded into convs, channels_last)")
    pr.add_argument("--compile", action="store_true", help="also torch.compile the backbone and neck")
    pr.add_argument("--tta", action="store_true",
                    help="test-time augmentation: merge flipped and scaled passes (the run's eval.tta)")
    pr.add_argument("--tile", type=positive_int, default=None, metavar="SIZE",
                    help="cut each image into SIZE x SIZE tiles (e.g. the model's data.image_size) and merge them")
    pr.add_argument("--overlap", type=unit_float, default=0.2, help="with --tile: the tiles' overlap (default 0.2)")
    pr.add_argument("--tile-merge", default="nms", choices=("nms", "wbf"),
                    help="with --tile: merge the tiles' detections by NMS (default) or weighted box fusion")
    pr.add_argument("--tile-match", default="ios", choices=("ios", "iou"),
                    help="with --tile-merge nms: compare boxes by intersection over the smaller (default) or IoU")
    pr.add_argument("--no-full-image", action="store_true",
                    help="with --tile: tiles only (default: also one pass over the whole image)")
    pr.add_argument("--vid-stride", type=positive_int, default=1, help="videos: every N-th frame (default 1)")
    pr.add_argument("--max-frames", type=positive_int, default=None, help="videos: at most N frames predicted")
    pr.add_argument("--stall-timeout", type=positive_float, default=10.0,
                    help="streams: seconds without a frame before giving up, results kept (default 10)")
    pr.set_defaults(func=_predict)

    ex = sub.add_parser("export", help="export a trained model to ONNX or TorchScript")
    ex.add_argument("checkpoint", metavar="RUN_DIR|CHECKPOINT")
    ex.add_argument("--format", required=True, choices=("onnx", "torchscript"))
    ex.add_argument("--out", required=True, help="the file to write (a .json with classes and settings goes beside)")
    ex.add_argument("--dynamic-batch", action="store_true",
                    help="any batch size at run time (one-stage heads and U-Net; two-stage models need a fixed batch)")
    ex.add_argument("--batch-size", type=positive_int, default=1, help="the fixed batch size (default 1)")
    ex.add_argument("--image-size", type=positive_int, default=None,
                    help="square input size (default: data.image_size, rounded up to data.size_divisor)")
    ex.add_argument("--opset", type=positive_int, default=17, help="ONNX opset (default 17)")
    ex.add_argument("--no-fold-bn", action="store_true", help="keep BatchNorm layers (default: folded into convs)")
    ex.set_defaults(func=_export)
