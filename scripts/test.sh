#!/usr/bin/env bash
# Sets everything up (.venv, fxopt, test dependencies) and runs the test suite.
# Extra arguments go to pytest. pytest's "no tests ran" (exit 5) is a failure.
# Tests run in FXOPT_TEST_WORKERS pytest-xdist workers (default 2, one per core
# of the CI machine; each worker's PyTorch then uses one thread: tests/conftest.py).
# worksteal gives each worker a contiguous half of the suite, so the models a
# file traces and caches are built by one worker (xdist's default deals the
# first quarter out one test at a time, and both build them), and moves tests
# from a busy worker's end to an idle one, so one slow file does not end the run.
set -uo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh dev || exit 1
. .venv/bin/activate
python -m pytest -q -p no:cacheprovider -n "${FXOPT_TEST_WORKERS:-2}" --dist worksteal "$@"
code=$?
if [ "$code" -eq 5 ]; then
  echo "scripts/test.sh: pytest collected no tests; failing" >&2
  exit 1
fi
exit "$code"
