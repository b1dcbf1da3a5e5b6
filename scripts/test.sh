#!/usr/bin/env bash
# Sets everything up (.venv, fxopt, test dependencies) and runs the test suite.
# Extra arguments go to pytest. pytest's "no tests ran" (exit 5) is a failure.
# Tests run in FXOPT_TEST_WORKERS pytest-xdist workers (default 2, one per core
# of the CI machine; each worker's PyTorch then uses one thread: tests/conftest.py).
# loadfile gives each worker whole files, so the models a file traces and caches
# are built once; tests/conftest.py orders the longest files first.
set -uo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh dev || exit 1
. .venv/bin/activate
python -m pytest -q -p no:cacheprovider -n "${FXOPT_TEST_WORKERS:-2}" --dist loadfile "$@"
code=$?
if [ "$code" -eq 5 ]; then
  echo "scripts/test.sh: pytest collected no tests; failing" >&2
  exit 1
fi
exit "$code"
