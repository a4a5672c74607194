#!/usr/bin/env python
"""Train from a config: same as `detkit train CONFIG [key=value ...] [--resume RUN_DIR|CKPT]`."""

import sys

from detkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
