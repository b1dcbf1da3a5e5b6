#!/usr/bin/env bash
# Creates .venv with fxopt (editable) and the given extras (default: hf).
# torch comes first, held to the CPU build in scripts/constraints.txt: an
# unpinned resolve would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-hf}"
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -c scripts/constraints.txt torch
python -m pip install -q -c scripts/constraints.txt -e ".[${extras}]"
