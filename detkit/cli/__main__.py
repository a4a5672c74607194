"""``python -m detkit.cli``: the same as ``detkit``."""

import sys

from detkit.cli import main

sys.exit(main())
