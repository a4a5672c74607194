#!/usr/bin/env python
"""List backbones with their complexity: same as `detkit backbones` (see `--help`)."""

import sys

from detkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["backbones", *sys.argv[1:]]))
