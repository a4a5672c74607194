"""The ``detkit`` command line.

Every user mistake (a bad config key, a missing file, an unknown backbone) is reported as one line on
stderr with exit code 2; there is no traceback for bad input. Subcommands live in :mod:`detkit.cli.data`
(``config``, ``backbones``, ``data``), :mod:`detkit.cli.runs` (``train``, ``eval``, ``predict``, ``export``) and
:mod:`detkit.cli.studies` (``transfer``, ``design-space``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from detkit import __version__
from detkit.cli import data, runs, studies
from detkit.cli.args import budget_range, int_list, nonnegative_int, positive_int
from detkit.errors import DetkitError

__all__ = ["budget_range", "build_parser", "int_list", "main", "nonnegative_int", "positive_int"]


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage is one ``-h`` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="detkit", description="Detection and segmentation on swappable backbones.")
    parser.add_argument("--version", action="version", version=f"detkit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (data, runs, studies):
        module.add_parsers(sub)
    return parser


def _quiet_lightning() -> None:
    """Lightning's messages once (through its own handler, not ours too)."""
    import lightning  # noqa: F401  (attaches its handler to the "lightning" logger)

    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda record: not record.name.startswith("lightning"))
    # (the engine leaves out Lightning's warnings and tips that do not apply: detkit.engine.run.quiet_lightning)


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
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", 2)  # detkit.engine's Interrupted says which signal stopped training
        print(f"detkit: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 128 + int(signum)


if __name__ == "__main__":
    sys.exit(main())
