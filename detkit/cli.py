"""The ``detkit`` command line.

Every user mistake (a bad config key, a missing file, an unknown backbone) is reported as one line on
stderr with exit code 2; there is no traceback for bad input.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections.abc import Sequence

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
    bb.add_argument("--input-size", type=int, default=224, help="square input size (default 224)")
    bb.add_argument("--imagenet", action="store_true",
                    help="count the ImageNet classification network (1000-class head) instead of the backbone")
    bb.add_argument("--filter", default=None, metavar="REGEX", help="only names matching this regular expression")
    bb.add_argument("--format", choices=("table", "json", "csv"), default="table")
    bb.set_defaults(func=_backbones)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except DetkitError as e:
        print(f"detkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("detkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
