#!/usr/bin/env bash
# Creates .venv with fxopt (editable) and the given extras. torch is installed
# first, pinned to the CPU build that lies on disk on these machines: an
# unpinned resolve would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-hf}"
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[${extras}]"
