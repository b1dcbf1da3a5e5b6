#!/usr/bin/env bash
# Sets everything up (.venv, fxopt) and runs the main job: GPT-2 small (124M,
# built from its config) through the recommended fused + int4 pipeline on ONNX
# Runtime, against the original PyTorch model: latency at prefill and at a
# one-token forward, size, accuracy. Saves out/quickstart.onnx. Extra arguments
# go to examples/quickstart.py (--help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh hf
. .venv/bin/activate
python examples/quickstart.py "$@"
