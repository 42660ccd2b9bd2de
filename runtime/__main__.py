"""`python -m runtime segment IN OUT --k 6 ...` / `python -m runtime info --model DIR`."""

import sys

from .cli import main

sys.exit(main(prog="python -m runtime segment"))
