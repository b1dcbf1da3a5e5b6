#!/usr/bin/env python
"""Random pipelines on small models, both backends: every run must end within
tolerance or with a clear refusal, and leave the original model bit-identical
(see fxopt/fuzz.py). Exits 1 on any finding.

    python scripts/fuzz_pipelines.py --seed 0 --count 200 [--models mlp,gpt2-tiny] [-v]
"""

import sys

from fxopt.fuzz import main

if __name__ == "__main__":
    sys.exit(main())
