"""`python -m transferkit`: the `transferkit` command, where no script is on PATH."""

import os
import sys

from transferkit.cli import main

os.environ.setdefault("PYTHONUNBUFFERED", "1")  # as `python -m transferkit.cli` sets it
sys.exit(main())
