#!/usr/bin/env python
"""Print a resolved config: same as `detkit config show CONFIG [key=value ...]`."""

import sys

from detkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["config", "show", *sys.argv[1:]]))
