#!/usr/bin/env bash
# The test command of the README: sets up ./.venv if needed, lints (ruff, import layers), runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup
.venv/bin/ruff check isnet_cli tests benchmarks
.venv/bin/lint-imports
# one worker per core; tests sharing a trained-model fixture stay in one worker (tests/conftest.py);
# the 15 slowest tests are listed, to keep the suite inside its CI time budget
.venv/bin/python -m pytest -q -n auto --dist loadgroup --durations=15 "$@"
