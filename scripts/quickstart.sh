#!/usr/bin/env bash
# Sets everything up and runs the main job: GPT-2 small (124M, built from its
# config) through the base pipeline, lowered to ONNX Runtime, compared with the
# original and timed. Writes out/report.json and out/gpt2.onnx.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh hf
. .venv/bin/activate
fxopt optimize gpt2 --pipeline canonicalize,dce,constant-fold,cse --backend onnxruntime \
  --out out/gpt2.onnx --report out/report.json "$@"
