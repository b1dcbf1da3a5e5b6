"""``python -m fxopt``: the same command line as ``fxopt``."""

import sys

from .cli import main

sys.exit(main())
