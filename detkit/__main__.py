"""``python -m detkit ...`` = the ``detkit`` command."""

import sys

from detkit.cli import main

sys.exit(main())
