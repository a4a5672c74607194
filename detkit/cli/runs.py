"""``detkit train``, ``eval``, ``predict`` and ``export``: runs and trained models."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from detkit.cli.args import is_main_process, positive_int, split_config_and_overrides, unit_float
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
        metrics, run = evaluate(args.target, args.checkpoint, args.overrides, split=args.split, out=args.out)
        if not is_main_process():
            return 0
        files = evaluation_outputs(run, args.split, args.out)
        out = files["metrics"]
        plots = files["confusion_matrix"] if "mIoU" in metrics else files["pr_curves"]
        print(f"{'confusion matrix' if 'mIoU' in metrics else 'PR curves'}: {plots}")
    print(format_table(metrics))
    print(f"metrics: {out}")
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
    from detkit.inference import Predictor, expand_inputs
    from detkit.inference.run import format_summary, predict_files

    found: list[Path] = []  # every image under the inputs: none of them is ever overwritten
    files = expand_inputs(args.inputs, exclude=args.out, found_all=found)  # not what an earlier run wrote into out
    if not files:
        raise DetkitError(f"no images found in {' '.join(args.inputs)}")
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, batch_size=args.batch_size,
                                          score_threshold=args.score_threshold, classes=args.classes,
                                          fast=not args.no_fast, compile=args.compile)
    print(format_summary(predict_files(predictor, files, args.out, protect=found)))
    return 0


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
    ev.add_argument("--out", default=None, metavar="FILE.json",
                    help="write the metrics here (predictions and plots beside it); default: the run directory, "
                         "under names that carry the split (metrics_test.json, ...), or for --predictions "
                         "PRED_metrics.json beside them")
    ev.set_defaults(func=_eval)

    pr = sub.add_parser("predict", help="run a trained model over images, folders or globs")
    pr.add_argument("checkpoint", metavar="RUN_DIR|CHECKPOINT")
    pr.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (recursive) or globs")
    pr.add_argument("--out", default="runs/predict", help="folder for drawn images and predictions.json")
    pr.add_argument("--score-threshold", type=unit_float, default=0.3, help="in [0, 1] (default 0.3)")
    pr.add_argument("--batch-size", type=positive_int, default=4)
    pr.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    pr.add_argument("--classes", default=None, metavar="A,B",
                    help="comma-separated class names to keep (default: all)")
    pr.add_argument("--no-fast", action="store_true",
                    help="run the model as trained (default: BatchNorm folded into convs, channels_last)")
    pr.add_argument("--compile", action="store_true", help="also torch.compile the backbone and neck")
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
