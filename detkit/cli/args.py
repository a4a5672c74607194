"""Argument types and helpers the ``detkit`` subcommands share."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from detkit.errors import DetkitError


def dataset_from_args(args: argparse.Namespace):
    """(dataset config, full config) from either CONFIG [--split NAME] or --format/--images/--annotations."""
    from detkit.config import load_config

    if args.config:
        from detkit.data.formats import all_options

        flags = [f"--{n.replace('_', '-')}" for n in all_options() if getattr(args, n, None) is not None]
        if args.format or flags:
            given = "".join("/" + f for f in flags)
            raise DetkitError(f"give either CONFIG or --format/--images/--annotations{given}, not both (a config's "
                              f"options: data.<split>.<option>=VALUE)")
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
          "classes": classes, "name": None}
    from detkit.data.formats import all_options

    given = {name: getattr(args, name) for name in all_options() if getattr(args, name, None) is not None}
    for name in given:  # an option of another format is one line naming its flag
        if name not in option_fields_of(args.format):
            flag = "--" + name.replace("_", "-")
            raise DetkitError(f"{flag}: --format {args.format} has no such option (it is one of "
                              f"{', '.join(all_options()[name][1])})")
    return {**ds, **given}, cfg, "--format"


def option_fields_of(fmt: str) -> list[str]:
    from detkit.data.formats import known_format, option_fields

    return list(option_fields(known_format(fmt, "--format")))


def add_dataset_args(p: argparse.ArgumentParser, config: bool = True) -> None:
    """CONFIG [overrides] or ``--format`` (every registered format) with its paths and its own options (one flag per
    option of any format, ``--label-suffix``; unset: the format's default)."""
    from detkit.data.formats import FORMATS, all_options

    if config:
        p.add_argument("config", nargs="?", help="a config (its data.<split> is used)")
        p.add_argument("overrides", nargs="*", help="key=value config overrides")
    else:
        p.set_defaults(config=None, overrides=[])
    p.add_argument("--split", default=None, help="with CONFIG: train|val|test; with --format: a file of image ids")
    p.add_argument("--format", choices=FORMATS.names())
    p.add_argument("--images", help="image folder")
    p.add_argument("--annotations", help="annotation file or folder: " + "; ".join(
        f"{n}: {FORMATS.traits(n).annotations or 'optional'}" for n in FORMATS.names()))
    p.add_argument("--classes", help="class names, comma-separated, or a YAML/text file")
    for name, (f, formats) in all_options().items():
        default = f.default
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=None,
                       type=type(default) if isinstance(default, int | float | str) else str,
                       help=f"{', '.join(formats)}: {f.metadata.get('help', '')} (default {default!r})")


def split_config_and_overrides(items: list[str], resume: str | None) -> tuple[str | None, list[str]]:
    """``CONFIG a.b=c ...``; with ``--resume`` the CONFIG may be left out (the run's config.yaml is used)."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    if resume is None:
        raise DetkitError("give a CONFIG file (or --resume RUN_DIR)")
    return None, items


def is_main_process() -> bool:
    """False in the extra processes of a multi-process (DDP) run, which re-run the command: they print nothing."""
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


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


def finite_float(text: str) -> float:
    """A finite number (``nan`` and ``inf`` are refused in one line)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_float(text: str) -> float:
    """A finite number above 0 (seconds, ...)."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value:g} is not above 0")
    return value


def unit_float(text: str) -> float:
    """A number in [0, 1] (a score or IoU threshold)."""
    value = finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value:g} is not in [0, 1]")
    return value


def seed_int(text: str) -> int:
    """A seed: an integer in [0, 2**32 - 1]."""
    value = nonnegative_int(text)
    if value > 2**32 - 1:
        raise argparse.ArgumentTypeError(f"{value} is above 2**32 - 1")
    return value


def threshold_or_best(text: str) -> float | str:
    """A score threshold in [0, 1], or ``best`` (each class's threshold of peak F1, from ``detkit eval``)."""
    return "best" if text.strip().lower() == "best" else unit_float(text)
