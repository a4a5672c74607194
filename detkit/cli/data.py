"""``detkit config show``, ``detkit backbones`` and ``detkit data ...``: configs, backbones and datasets."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path

from detkit.cli.args import add_dataset_args, dataset_from_args, finite_float, positive_int, seed_int
from detkit.errors import DetkitError


def _config_show(args: argparse.Namespace) -> int:
    from detkit.config import load_config, to_yaml
    from detkit.engine.run import check_config

    cfg = load_config(args.config, args.overrides)
    check_config(cfg)  # part names against their registries, every part's settings
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


def _data_stats(args: argparse.Namespace) -> int:
    from detkit.data.build import build_dataset
    from detkit.data.stats import dataset_stats, format_stats

    ds_cfg, cfg, key = dataset_from_args(args)
    logging.getLogger("detkit.data").setLevel(logging.ERROR)  # problems are part of the report
    stats = dataset_stats(build_dataset(ds_cfg, with_masks=False, key=key, max_pixels=cfg.data.max_image_pixels),
                          check_images=not args.no_check_images)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


def _data_show(args: argparse.Namespace) -> int:
    from detkit.data.build import build_dataset
    from detkit.data.show import show_samples
    from detkit.data.transforms import pipeline_from_config

    ds_cfg, cfg, key = dataset_from_args(args)
    pipeline = pipeline_from_config(cfg.data, train=True, image_size=args.image_size)
    dataset = build_dataset(ds_cfg, with_masks=True, key=key, max_pixels=cfg.data.max_image_pixels)
    written = show_samples(dataset, pipeline, args.out, args.n, args.seed)
    print(f"wrote {len(written)} images to {args.out}")
    return 0


def _data_convert(args: argparse.Namespace) -> int:
    from detkit.data.build import build_dataset
    from detkit.data.formats import FORMATS, convert_sources, convert_targets

    if args.to not in convert_targets():
        raise DetkitError(f"--to {args.to!r}: expected {' or '.join(convert_targets())}")
    if args.format not in convert_sources():
        raise DetkitError(f"--format {args.format!r}: convert takes {', '.join(convert_sources())} (datasets of "
                          f"objects)")
    ds_cfg, cfg, key = dataset_from_args(args)
    dataset = build_dataset(ds_cfg, with_masks=False, key=key, max_pixels=cfg.data.max_image_pixels)
    write = FORMATS.entry(args.to).traits.write()
    counts = write(dataset, args.out, args.images)
    left = f", {counts['crowd_left_out']} crowd boxes left out ({args.to} has none)" \
        if counts.get("crowd_left_out") else ""
    print(f"wrote {args.out}: {counts['images']} images, {counts['annotations']} annotations, "
          f"{counts['categories']} categories{left}")
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

    ds_cfg, cfg, key = dataset_from_args(args)
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
        from detkit.data.shapes import ensure_shapes

        ensure_shapes(cfg.data)
    size = args.image_size or cfg.data.image_size
    dataset = build_dataset(ds_cfg, with_masks=False, key=key, max_pixels=cfg.data.max_image_pixels)
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


def add_parsers(sub) -> None:
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
    add_dataset_args(stats)
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    stats.add_argument("--no-check-images", action="store_true", help="do not decode every image")
    stats.set_defaults(func=_data_stats)
    show = data_sub.add_parser("show", help="draw ground truth on samples after the train transforms")
    add_dataset_args(show)
    show.add_argument("--out", required=True, help="folder for the PNGs")
    show.add_argument("-n", type=positive_int, default=16, help="number of samples (default 16)")
    show.add_argument("--image-size", type=positive_int, default=None, help="default: data.image_size")
    show.add_argument("--seed", type=seed_int, default=0)
    show.set_defaults(func=_data_show)
    from detkit.data.formats import convert_targets

    convert = data_sub.add_parser("convert", help=f"write a dataset in another format ({', '.join(convert_targets())})")
    add_dataset_args(convert, config=False)
    convert.add_argument("--to", default="coco", choices=convert_targets(), help="target format (coco)")
    convert.add_argument("out", help="the COCO JSON file, or the folder (yolo, voc), to write")
    convert.set_defaults(func=_data_convert)
    shapes = data_sub.add_parser("make-shapes", help="write the generated shapes dataset (COCO JSON + masks)")
    shapes.add_argument("out", help="output folder")
    shapes.add_argument("--num-images", type=positive_int, default=240, help="train + val images (default 240)")
    shapes.add_argument("--image-size", type=positive_int, default=128, help="square image size (default 128)")
    shapes.add_argument("--seed", type=seed_int, default=0)
    shapes.set_defaults(func=_data_make_shapes)
    anchors = data_sub.add_parser("anchors", help="k-means anchors (1 - IoU) for the YOLO-style head, with BPR and "
                                                   "mean IoU, as a config override")
    add_dataset_args(anchors)
    anchors.add_argument("--num-anchors", type=positive_int, default=9, help="anchors in all (default 9)")
    anchors.add_argument("--levels", type=positive_int, default=None,
                         help="pyramid levels to split them over, fine to coarse (default: the neck's levels of a "
                              "YOLO config, else 3)")
    anchors.add_argument("--image-size", type=positive_int, default=None,
                         help="longest side of the network input (default: data.image_size)")
    anchors.add_argument("--ratio-thresh", type=finite_float, default=None,
                         help="the head's matching rule max(w/aw, aw/w, h/ah, ah/h) < this, for the BPR (default: "
                              "model.head.params.ratio_thresh of a YOLO config, else 4.0)")
    anchors.add_argument("--seed", type=seed_int, default=0)
    anchors.add_argument("--iters", type=positive_int, default=300, help="k-means iterations at most (default 300)")
    anchors.add_argument("--out", default=None, help="also write the YAML snippet to this file")
    anchors.set_defaults(func=_data_anchors)
