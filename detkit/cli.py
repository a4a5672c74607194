"""The ``detkit`` command line.

Every user mistake (a bad config key, a missing file, an unknown backbone) is reported as one line on
stderr with exit code 2; there is no traceback for bad input.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from detkit import __version__
from detkit.errors import DetkitError


def _config_show(args: argparse.Namespace) -> int:
    from detkit.config import load_config, to_yaml

    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(to_yaml(cfg))
    return 0


def _backbones(args: argparse.Namespace) -> int:
    from detkit.analysis.backbone_table import COLUMNS, backbone_table, human

    rows = backbone_table(args.names, args.input_size, args.imagenet, args.filter)
    if args.format == "json":
        print(json.dumps(rows, indent=2))
    elif args.format == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(COLUMNS)
        for r in rows:
            writer.writerow([r["name"], r["params"], r["flops"], r["activations"],
                             " ".join(f"{k}={v}" for k, v in r["out_channels"].items()),
                             " ".join(f"{k}={v}" for k, v in r["strides"].items())])
    else:
        from rich.console import Console
        from rich.table import Table

        what = "ImageNet classifier (1000 classes)" if args.imagenet else "backbone"
        table = Table(title=f"detkit backbones: {what} at {args.input_size}x{args.input_size}")
        table.add_column("name")
        for col in ("params", "flops (MACs)", "activations"):
            table.add_column(col, justify="right")
        table.add_column("out_channels")
        table.add_column("strides")
        for r in rows:
            table.add_row(r["name"], human(r["params"]), human(r["flops"]), human(r["activations"]),
                          " ".join(f"{k}:{v}" for k, v in r["out_channels"].items()),
                          " ".join(f"{k}:{v}" for k, v in r["strides"].items()))
        Console(width=max(120, Console().width)).print(table)
    return 0


def _dataset_from_args(args: argparse.Namespace):
    """(dataset config, full config) from either CONFIG [--split NAME] or --format/--images/--annotations."""
    from detkit.config import load_config

    if args.config:
        if args.format:
            raise DetkitError("give either CONFIG or --format/--images/--annotations, not both")
        cfg = load_config(args.config, args.overrides)
        split = args.split or "train"
        if split not in ("train", "val", "test"):
            raise DetkitError(f"--split {split!r}: with a config, expected train, val or test")
        return cfg.data[split], cfg, f"data.{split}"
    if not args.format or not args.images:
        raise DetkitError("name a dataset: CONFIG [--split train|val|test], or --format F --images DIR "
                          "[--annotations PATH] [--split FILE]")
    classes = args.classes
    if classes and not Path(classes).exists():
        classes = [c.strip() for c in classes.split(",") if c.strip()]
    cfg = load_config(None, args.overrides)
    ds = {"format": args.format, "images": args.images, "annotations": args.annotations, "split": args.split,
          "classes": classes, "label_suffix": args.label_suffix, "ignore_index": args.ignore_index, "name": None}
    return ds, cfg, "--format"


def _add_dataset_args(p: argparse.ArgumentParser, config: bool = True) -> None:
    if config:
        p.add_argument("config", nargs="?", help="a config (its data.<split> is used)")
        p.add_argument("overrides", nargs="*", help="key=value config overrides")
    else:
        p.set_defaults(config=None, overrides=[])
    p.add_argument("--split", default=None, help="with CONFIG: train|val|test; with --format: a file of image ids")
    p.add_argument("--format", choices=("coco", "voc", "yolo", "masks", "instance_masks"))
    p.add_argument("--images", help="image folder")
    p.add_argument("--annotations", help="annotation file (coco) or folder (voc, yolo, masks)")
    p.add_argument("--classes", help="class names, comma-separated, or a YAML/text file")
    p.add_argument("--label-suffix", default="", help="masks: <image stem><suffix>.png (PennFudan: _mask)")
    p.add_argument("--ignore-index", type=int, default=255, help="masks: the label value not trained on")


def _data_stats(args: argparse.Namespace) -> int:
    from detkit.data.build import build_dataset
    from detkit.data.stats import dataset_stats, format_stats

    ds_cfg, _, key = _dataset_from_args(args)
    logging.getLogger("detkit.data").setLevel(logging.ERROR)  # problems are part of the report
    stats = dataset_stats(build_dataset(ds_cfg, with_masks=False, key=key), check_images=not args.no_check_images)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


def _data_show(args: argparse.Namespace) -> int:
    from detkit.data.build import build_dataset
    from detkit.data.datamodule import backbone_normalization
    from detkit.data.show import show_samples
    from detkit.data.transforms import build_pipeline

    ds_cfg, cfg, key = _dataset_from_args(args)
    mean, std = backbone_normalization(cfg.model.backbone)
    size = args.image_size or cfg.data.image_size
    pipeline = build_pipeline(cfg.data.transforms.train, image_size=size, mean=mean, std=std, train=True,
                              min_visibility=cfg.data.min_visibility, where="data.transforms.train")
    dataset = build_dataset(ds_cfg, with_masks=True, key=key)
    written = show_samples(dataset, pipeline, args.out, args.n, args.seed)
    print(f"wrote {len(written)} images to {args.out}")
    return 0


def _data_convert(args: argparse.Namespace) -> int:
    from detkit.data.build import build_dataset
    from detkit.data.convert import to_coco

    if args.to != "coco":
        raise DetkitError(f"--to {args.to!r}: only coco is supported")
    if args.format not in ("voc", "yolo", "instance_masks", "coco"):
        raise DetkitError(f"--format {args.format!r}: convert takes voc, yolo or instance_masks")
    ds_cfg, _, key = _dataset_from_args(args)
    counts = to_coco(build_dataset(ds_cfg, with_masks=False, key=key), args.out, args.images)
    print(f"wrote {args.out}: {counts['images']} images, {counts['annotations']} annotations, "
          f"{counts['categories']} categories")
    return 0


def _data_make_shapes(args: argparse.Namespace) -> int:
    from detkit.data.shapes import make_shapes

    counts = make_shapes(args.out, args.num_images, args.image_size, args.seed)
    print(f"wrote {args.out}: {counts['train']} train + {counts['val']} val images (see {args.out}/dataset.yaml)")
    return 0


def _data_anchors(args: argparse.Namespace) -> int:
    from collections import Counter

    from detkit.data import anchors as A
    from detkit.data.build import build_dataset

    ds_cfg, cfg, key = _dataset_from_args(args)
    yolo = bool(args.config) and cfg.model.head.name == "yolo"  # its levels and matching rule are the defaults
    head_params = cfg.model.head.params or {}
    if args.levels is None:
        args.levels = len(cfg.model.neck.levels) if yolo and cfg.model.neck.levels else 3
    if args.ratio_thresh is None:
        args.ratio_thresh = float(head_params.get("ratio_thresh") or 4.0) if yolo else 4.0
    if args.levels > args.num_anchors or args.num_anchors % args.levels:
        raise DetkitError(f"--num-anchors {args.num_anchors} cannot be split evenly into --levels {args.levels}")
    if args.ratio_thresh <= 1:
        raise DetkitError(f"--ratio-thresh {args.ratio_thresh}: expected a ratio above 1 (the head's default is 4.0)")
    if args.config and cfg.data.generate == "shapes" and cfg.data.train.annotations \
            and not Path(cfg.data.train.annotations).exists():
        from detkit.engine.run import ensure_data

        ensure_data(cfg)
    size = args.image_size or cfg.data.image_size
    dataset = build_dataset(ds_cfg, with_masks=False, key=key)
    counts: Counter = Counter()
    wh = A.dataset_box_sizes(dataset, size, counts)
    if len(wh) == 0:
        raise DetkitError(f"{dataset.name}: no boxes to fit anchors to ({counts['images']} images)")
    try:
        anchors = A.kmeans_anchors(wh, args.num_anchors, seed=args.seed, iters=args.iters)
    except ValueError as e:
        raise DetkitError(f"{dataset.name}: {e}; ask for fewer (--num-anchors)") from None
    anchors = A.round_anchors(anchors)
    groups = A.split_levels(anchors, args.levels)
    names = A.level_names(args.levels, list(cfg.model.neck.levels or []) if args.config else None)
    bpr, mean_iou = A.anchor_fit(wh, anchors, args.ratio_thresh)
    best = A.shape_iou(wh, anchors).argmax(1) // (args.num_anchors // args.levels)

    from rich.console import Console
    from rich.table import Table

    left_out = [f"{counts[k]} {what}" for k, what in (("crowd", "crowd"), ("degenerate", "degenerate"),
                                                        ("unsized", "in images of unknown size")) if counts[k]]
    print(f"{dataset.name}: {len(wh)} boxes in {counts['images']} images at image size {size} (longest side)"
          + (f"; left out: {', '.join(left_out)} boxes" if left_out else ""))
    table = Table(title=f"{args.num_anchors} anchors (k-means, 1 - IoU, median; seed {args.seed})")
    table.add_column("level")
    table.add_column("stride", justify="right")
    table.add_column("anchors (w x h, input pixels)")
    table.add_column("boxes best fit", justify="right")
    for i, (name, group) in enumerate(zip(names, groups)):
        table.add_row(name, str(2 ** int(name[1:])), "  ".join(f"{w}x{h}" for w, h in group),
                      f"{(best == i).mean():.1%}")
    Console(width=max(100, Console().width)).print(table)
    print(f"best possible recall (BPR, ratio < {args.ratio_thresh:g}): {bpr:.4f}")
    print(f"mean IoU (best anchor per box): {mean_iou:.4f}")
    override = A.anchors_override(groups)
    snippet = A.anchors_yaml(groups, names)
    print("\nconfig override:\n" + override + "\n\nor in a config:\n" + snippet, end="")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(f"# detkit data anchors: {dataset.name}, image size {size}, BPR {bpr:.4f}, "
                                  f"mean IoU {mean_iou:.4f}\n" + snippet)
        print(f"wrote {args.out}")
    return 0


def _split_config_and_overrides(items: list[str], resume: str | None) -> tuple[str | None, list[str]]:
    """``CONFIG a.b=c ...``; with ``--resume`` the CONFIG may be left out (the run's config.yaml is used)."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    if resume is None:
        raise DetkitError("give a CONFIG file (or --resume RUN_DIR)")
    return None, items


def _is_main_process() -> bool:
    """False in the extra processes of a multi-process (DDP) run, which re-run the command: they print nothing."""
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _train(args: argparse.Namespace) -> int:
    from detkit.engine import train

    config, overrides = _split_config_and_overrides(args.args, args.resume)
    out = train(config, overrides, resume=args.resume)  # no CONFIG: the resumed run's config.yaml
    if not _is_main_process():
        return 0
    print(f"run directory: {out}")
    metrics = out / "metrics.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        shown = ", ".join(f"{k}={m[k]:.4f}" for k in ("bbox_AP", "bbox_AP50", "segm_AP", "voc07_mAP", "mIoU",
                                                      "pixel_acc")
                          if isinstance(m.get(k), int | float))
        print(f"final validation: {shown}  ({metrics})")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from detkit.evaluation import format_table

    if args.predictions:
        metrics, out = _eval_predictions(args)
    else:
        from detkit.engine import evaluate

        if not args.target:
            raise DetkitError("give a RUN_DIR or CONFIG (or --predictions with --ground-truth)")
        metrics, run = evaluate(args.target, args.checkpoint, args.overrides, split=args.split)
        if not _is_main_process():
            return 0
        out = Path(args.out) if args.out else run / "metrics.json"
        if args.out:
            from detkit.engine.callbacks import write_metrics

            write_metrics(metrics, out)
        plots = run / "confusion_matrix.png" if "mIoU" in metrics else run / "pr_curves"
        print(f"{'confusion matrix' if 'mIoU' in metrics else 'PR curves'}: {plots}")
    print(format_table(metrics))
    print(f"metrics: {out}")
    return 0


def _eval_predictions(args: argparse.Namespace):
    from detkit.engine.callbacks import write_metrics
    from detkit.evaluation import score_predictions

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
        dataset = build_dataset(cfg.data[args.split], transform=None, with_masks=False, key=f"data.{args.split}")
        cat_to_label = dataset.cat_to_label()
        ground_truth: Path | dict = dataset_to_coco(dataset)
    else:
        ground_truth = gt
    metrics = score_predictions(args.predictions, ground_truth, metric=args.metric, cat_to_label=cat_to_label)
    out = Path(args.out) if args.out else Path(args.predictions).with_name("metrics.json")
    write_metrics(metrics, out)
    return metrics, out


def _predict(args: argparse.Namespace) -> int:
    from detkit.inference import Predictor, expand_inputs
    from detkit.inference.run import format_summary, predict_files

    files = expand_inputs(args.inputs)
    if not files:
        raise DetkitError(f"no images found in {' '.join(args.inputs)}")
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, batch_size=args.batch_size,
                                          score_threshold=args.score_threshold, classes=args.classes,
                                          fast=not args.no_fast, compile=args.compile)
    print(format_summary(predict_files(predictor, files, args.out)))
    return 0


def _export(args: argparse.Namespace) -> int:
    from detkit.engine.run import load_checkpoint, resolve_checkpoint
    from detkit.inference.export import export_model

    module = load_checkpoint(resolve_checkpoint(args.checkpoint, "best"))
    info = export_model(module, args.format, args.out, dynamic_batch=args.dynamic_batch, batch_size=args.batch_size,
                        image_size=args.image_size, opset=args.opset, fold_bn=not args.no_fold_bn)
    shape = " x ".join(str(v) for v in info.input_shape)
    print(f"{info.head} -> {info.file} ({info.format}; input images {shape}, float RGB 0..255 resized like "
          f"data.resize={info.resize}; outputs {', '.join(info.outputs)}; {info.batchnorms_folded} BatchNorms folded)")
    print(f"classes and settings: {info.file}.json")
    return 0


STUDY_OVERRIDES = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def _transfer(args: argparse.Namespace) -> int:
    from detkit.analysis.transfer import format_report, run_transfer, split_list

    out = Path(args.out or Path("runs") / "transfer" / Path(args.config).stem)
    rows = run_transfer(args.config, split_list(args.backbones), pretrained=split_list(args.pretrained),
                        seeds=args.seeds, out=out, overrides=STUDY_OVERRIDES + list(args.overrides),
                        retry_failed=args.retry_failed, latency=not args.no_latency, remeasure=args.remeasure)
    print(format_report(rows, out))
    return 0


def _design_space(args: argparse.Namespace) -> int:
    from detkit.analysis.design_space import Budget, fit_quantized_linear
    from detkit.analysis.design_study import format_summary, parse_widths, run_design_space, write_report

    if args.fit:
        widths = parse_widths(args.fit)
        e_fit, best = fit_quantized_linear(widths)
        print(f"e_fit = {e_fit:.5f} for {len(widths)} blocks (best quantized linear fit: w0 = {best['w0']:g}, "
              f"wa = {best['wa']:.2f}, wm = {best['wm']:.3f})")
        return 0
    if args.report:
        out = Path(args.report)
        print(format_summary(write_report(out), out))
        return 0
    if not args.space or not args.task:
        raise DetkitError("design-space: give SPACE[,SPACE...] and --task CONFIG (or --fit WIDTHS, --report DIR)")
    budget = Budget(flops=args.flops_budget, params=args.params_budget, activations=args.activations_budget,
                    paper_constraints=args.paper_constraints)
    out = Path(args.out or Path("runs") / "design-space" / Path(args.task).stem)
    rows = run_design_space([s.strip() for s in args.space.split(",") if s.strip()], args.n, args.task, out=out,
                            overrides=STUDY_OVERRIDES + list(args.overrides), budget=budget, seed=args.seed,
                            retry_failed=args.retry_failed)
    print(format_summary(rows, out))
    return 0


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers >= 0")
    return values


SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}


def budget_range(text: str) -> tuple[float | None, float | None]:
    """``MAX`` or ``MIN:MAX`` (either side may be empty), with an optional K/M/G suffix: ``400M``, ``360M:400M``."""
    def value(part: str) -> float | None:
        part = part.strip().upper()
        if not part:
            return None
        unit = part[-1] if part[-1] in "KMG" else ""
        try:
            number = float(part[:-1] if unit else part) * SUFFIX[unit]
        except ValueError:
            number = math.nan
        if not math.isfinite(number) or number < 0:
            raise argparse.ArgumentTypeError(f"{text!r}: expected MAX or MIN:MAX, e.g. 400M or 360M:400M")
        return number

    lo, sep, hi = text.partition(":")
    bounds = (value(lo), value(hi)) if sep else (None, value(lo))
    if bounds[0] is not None and bounds[1] is not None and bounds[0] > bounds[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: the minimum is above the maximum")
    return bounds


def _int_at_least(text: str, minimum: int, problem: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{value} {problem}")
    return value


def nonnegative_int(text: str) -> int:
    return _int_at_least(text, 0, "is negative")


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "is not a positive integer")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detkit", description="Detection and segmentation on swappable backbones.")
    parser.add_argument("--version", action="version", version=f"detkit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    config = sub.add_parser("config", help="inspect configs")
    config_sub = config.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    show = config_sub.add_parser("show", help="print the resolved config (bases merged, overrides applied)")
    show.add_argument("config", help="a YAML config file")
    show.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.backbone.name=resnet50")
    show.set_defaults(func=_config_show)

    bb = sub.add_parser("backbones", help="list backbones with params, FLOPs, activations, channels and strides")
    bb.add_argument("names", nargs="*", help="backbones to describe (default: every registered one; "
                                             "'timm:<model>' works too)")
    bb.add_argument("--input-size", type=positive_int, default=224, help="square input size (default 224)")
    bb.add_argument("--imagenet", action="store_true",
                    help="count the ImageNet classification network (1000-class head) instead of the backbone")
    bb.add_argument("--filter", default=None, metavar="REGEX", help="only names matching this regular expression")
    bb.add_argument("--format", choices=("table", "json", "csv"), default="table")
    bb.set_defaults(func=_backbones)

    data = sub.add_parser("data", help="datasets: statistics, drawings, conversion, the shapes dataset")
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    stats = data_sub.add_parser("stats", help="images, instances per class, box sizes and problems of a dataset")
    _add_dataset_args(stats)
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    stats.add_argument("--no-check-images", action="store_true", help="do not decode every image")
    stats.set_defaults(func=_data_stats)
    show = data_sub.add_parser("show", help="draw ground truth on samples after the train transforms")
    _add_dataset_args(show)
    show.add_argument("--out", required=True, help="folder for the PNGs")
    show.add_argument("-n", type=positive_int, default=16, help="number of samples (default 16)")
    show.add_argument("--image-size", type=positive_int, default=None, help="default: data.image_size")
    show.add_argument("--seed", type=int, default=0)
    show.set_defaults(func=_data_show)
    convert = data_sub.add_parser("convert", help="write a voc / yolo / instance_masks dataset as COCO JSON")
    _add_dataset_args(convert, config=False)
    convert.add_argument("--to", default="coco", help="target format (coco)")
    convert.add_argument("out", help="the COCO JSON file to write")
    convert.set_defaults(func=_data_convert)
    shapes = data_sub.add_parser("make-shapes", help="write the generated shapes dataset (COCO JSON + masks)")
    shapes.add_argument("out", help="output folder")
    shapes.add_argument("--num-images", type=positive_int, default=240, help="train + val images (default 240)")
    shapes.add_argument("--image-size", type=positive_int, default=128, help="square image size (default 128)")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.set_defaults(func=_data_make_shapes)
    anchors = data_sub.add_parser("anchors", help="k-means anchors (1 - IoU) for the YOLO-style head, with BPR and "
                                                   "mean IoU, as a config override")
    _add_dataset_args(anchors)
    anchors.add_argument("--num-anchors", type=positive_int, default=9, help="anchors in all (default 9)")
    anchors.add_argument("--levels", type=positive_int, default=None,
                         help="pyramid levels to split them over, fine to coarse (default: the neck's levels of a "
                              "YOLO config, else 3)")
    anchors.add_argument("--image-size", type=positive_int, default=None,
                         help="longest side of the network input (default: data.image_size)")
    anchors.add_argument("--ratio-thresh", type=float, default=None,
                         help="the head's matching rule max(w/aw, aw/w, h/ah, ah/h) < this, for the BPR (default: "
                              "model.head.params.ratio_thresh of a YOLO config, else 4.0)")
    anchors.add_argument("--seed", type=int, default=0)
    anchors.add_argument("--iters", type=positive_int, default=300, help="k-means iterations at most (default 300)")
    anchors.add_argument("--out", default=None, help="also write the YAML snippet to this file")
    anchors.set_defaults(func=_data_anchors)

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
    ev.add_argument("--out", default=None, help="where to write metrics.json")
    ev.set_defaults(func=_eval)

    pr = sub.add_parser("predict", help="run a trained model over images, folders or globs")
    pr.add_argument("checkpoint", metavar="RUN_DIR|CHECKPOINT")
    pr.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (recursive) or globs")
    pr.add_argument("--out", default="runs/predict", help="folder for drawn images and predictions.json")
    pr.add_argument("--score-threshold", type=float, default=0.3)
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

    tf = sub.add_parser("transfer", help="train one task config per backbone (and pretrained setting, seed) and "
                                         "report metric, complexity, training time and latency")
    tf.add_argument("config", metavar="CONFIG", help="the task: any detector or segmenter config")
    tf.add_argument("overrides", nargs="*", help="key=value overrides applied to every run (e.g. train.epochs=5)")
    tf.add_argument("--backbones", required=True, metavar="A,B,...",
                    help="registry names, timm:<model>, or efficientnet@phi=P (resolution scaled by gamma^phi)")
    tf.add_argument("--pretrained", default=None, metavar="W,...",
                    help="settings per backbone: none (from scratch), a weights name/file for all, or "
                         "BACKBONE=WEIGHTS for one (default: all from scratch)")
    tf.add_argument("--seeds", type=int_list, default=[0], metavar="S,...", help="one run per seed (default 0)")
    tf.add_argument("--out", default=None, help="study folder (default runs/transfer/<config name>); run the "
                                                 "same command again to resume")
    tf.add_argument("--retry-failed", action="store_true", help="run failed trials again (default: skip them)")
    tf.add_argument("--no-latency", action="store_true", help="do not time inference")
    tf.add_argument("--remeasure", action="store_true",
                    help="measure finished runs again (complexity, latency), e.g. on a quiet machine; no training")
    tf.set_defaults(func=_transfer)

    ds = sub.add_parser("design-space", help="sample backbones from design spaces (RegNet, AnyNet), train each on a "
                                             "task, and compare the spaces by their error EDFs")
    ds.add_argument("space", nargs="?", metavar="SPACE[,SPACE...]",
                    help="anynetx_a ... anynetx_e, regnetx_full, regnetx (refined), regnety")
    ds.add_argument("overrides", nargs="*", help="key=value overrides applied to the task")
    ds.add_argument("--task", metavar="CONFIG", help="the task config every sample trains on")
    ds.add_argument("--n", type=positive_int, default=16, help="samples per space (default 16; more extends a study)")
    ds.add_argument("--flops-budget", type=budget_range, default=(None, None), metavar="[MIN:]MAX",
                    help="ImageNet classifier FLOPs (multiply-adds) at 224, e.g. 400M or 360M:400M")
    ds.add_argument("--params-budget", type=budget_range, default=(None, None), metavar="[MIN:]MAX",
                    help="parameters, e.g. 6M")
    ds.add_argument("--activations-budget", type=budget_range, default=(None, None), metavar="[MIN:]MAX",
                    help="activations (conv outputs) at 224, e.g. 5M")
    ds.add_argument("--paper-constraints", action="store_true",
                    help="also activations <= 6.5 sqrt(GF) M and params <= 3.0 + 5.5 GF M (the refined RegNetX)")
    ds.add_argument("--seed", type=nonnegative_int, default=0, help="sampling seed (default 0)")
    ds.add_argument("--out", default=None, help="study folder (default runs/design-space/<task name>); run the "
                                                 "same command again to resume, another SPACE to add one")
    ds.add_argument("--retry-failed", action="store_true", help="run failed samples again (default: skip them)")
    ds.add_argument("--fit", default=None, metavar="WIDTHS",
                    help="only print e_fit of a network's block widths: a RegNet preset, 1x32,2x64,... or 32,64,...")
    ds.add_argument("--report", default=None, metavar="DIR", help="only rewrite the report of the study in DIR")
    ds.set_defaults(func=_design_space)
    return parser


def _quiet_lightning() -> None:
    """Lightning's messages once (through its own handler, not ours too), without its advertising."""
    import warnings

    import lightning  # noqa: F401  (attaches its handler to the "lightning" logger)

    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda record: not record.name.startswith("lightning"))
    for handler in logging.getLogger("lightning").handlers:
        handler.addFilter(lambda record: "litlogger" not in record.getMessage())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r".*is smaller than the logging interval")
    # the evaluator counts each image once (sampler padding de-duplicated by image id): the advice does not apply
    warnings.filterwarnings("ignore", message=r"Using `DistributedSampler` with the dataloaders")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (argparse stops a positional list at the first option)
    strays = [e for e in extra if "=" not in e or e.startswith("-")]
    if strays or (extra and not hasattr(args, "overrides") and not hasattr(args, "args")):
        parser.error(f"unrecognized arguments: {' '.join(strays or extra)}")
    if extra:
        (args.overrides if isinstance(getattr(args, "overrides", None), list) else args.args).extend(extra)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if args.command in ("train", "eval", "predict", "transfer", "design-space"):
        _quiet_lightning()
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except DetkitError as e:
        print(f"detkit: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an output path under a file, a full disk, no permission ...
        print(f"detkit: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("detkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
