#!/usr/bin/env python
"""Evaluate a run or score a predictions file: same as `detkit eval ...`."""

import sys

from detkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
